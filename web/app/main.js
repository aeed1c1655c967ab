// The page of a browser device: window.devftStart({creds, shardText, runId, wsUrl, threads}) trains until the
// run is done; window.devft holds its log, its state and every round's record (for tests and replays).
import { Device } from '../src/device.js';
import { readShard } from '../src/data.js';
import { browserProblem, browserRuntime } from '../src/runtime-browser.js';

const b64 = (bytes) => { let s = ''; for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000)); return btoa(s); };
const state = { log: [], records: [], abandoned: [], done: false, error: null, device: null, status: null };
window.devft = state;

function log(line) {
  state.log.push(line);
  document.getElementById('log').textContent = state.log.slice(-200).join('\n');
}

function show(text) { document.getElementById('state').textContent = text; }

/** A stored blob as base64 (tests copy the files a round trained on). */
window.devftBlob = async (sha) => b64(await (await browserRuntime({})).store.get(sha));

const STORED = 'devft-device';

/** A join link (#join=<token>): exchange the token once for this device's credentials, run and shard, kept here. */
async function join(token) {
  history.replaceState(null, '', location.pathname); // the token leaves the address bar and the history
  const r = await fetch('/api/join', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ token }) });
  const answer = await r.json().catch(() => ({ error: `the gateway answered HTTP ${r.status}` }));
  if (!r.ok) throw new Error(answer.error ?? `the gateway answered HTTP ${r.status}`);
  const saved = { creds: answer.credentials, runId: answer.run_id, shardText: answer.shard_text, wsUrl: answer.mqtt_ws_url };
  localStorage.setItem(STORED, JSON.stringify(saved));
  return saved;
}

async function boot() {
  const problem = browserProblem();
  if (problem) { show(`cannot train here: ${problem}`); state.error = problem; return; }
  const token = new URLSearchParams(location.hash.slice(1)).get('join');
  let saved = JSON.parse(localStorage.getItem(STORED) || 'null');
  if (token) {
    try {
      saved = await join(token);
      state.enrolled = saved.creds.username;
    } catch (e) {
      state.error = e.message;
      show(`cannot join: ${e.message}`);
      return;
    }
  }
  if (!saved) { show('ready: open this page through a join link from the fleet operator'); return; }
  if (!saved.shardText) { show(`enrolled as ${saved.creds.username}, but the join link carried no data shard`); return; }
  // window.devftOptions (set by a driver before the page loads): the rig of emulated phones trains on the page's
  // own thread ({proxy: false, threads: 1}), since DevTools CPU throttling slows a page's thread and no worker
  const opts = window.devftOptions ?? {};
  const ramMb = Number(new URLSearchParams(location.hash.slice(1)).get('ram_mb')) || undefined;
  window.devftStart({ ...saved, threads: opts.threads ?? Math.min(4, navigator.hardwareConcurrency || 1), proxy: opts.proxy, ramMb }).catch(() => {});
}

// ramMb: the memory the page offers training, in MiB (default: half of navigator.deviceMemory; #ram_mb=N in the URL)
window.devftStart = async ({ creds, shardText, runId, wsUrl, threads = 1, prune = true, proxy = true, ramMb }) => {
  try {
    const runtime = await browserRuntime({ wsUrl, threads, proxy, ramMb });
    const onRecord = (kind, r) => state.records.push({ control: r.control, losses: r.losses, draws: r.draws, global: b64(r.global), update: b64(r.update) });
    // a round given up (the storage quota full, a file that failed its hash) is shown, not only logged: the device
    // stays in the fleet and tries again with the next control, so nothing it holds is lost
    const onAbandon = (ctrl, e) => {
      state.abandoned.push({ stage: ctrl.stage, round: ctrl.round, error: e.message });
      show(`stage ${ctrl.stage + 1} round ${ctrl.round + 1} given up: ${e.message}`);
    };
    const device = new Device({ runtime, creds, shard: readShard(shardText, 'shard'), runId, threads, log, onRecord, onAbandon, prune,
      onStatus: (st, extra) => { state.status = st; if (st === 'busy') show(`training round ${extra.round + 1}`); } });
    state.device = device;
    state.runtime = runtime.name;
    show(`training in run ${runId} as ${creds.username} (${runtime.name})`);
    const code = await device.run();
    if (device.refused) { state.error = `refused by the coordinator: ${device.refused}`; show(state.error); return code; }
    show(`run ${runId} is done`);
    state.done = true;
    return code;
  } catch (e) {
    state.error = e.message;
    show(`error: ${e.message}`);
    throw e;
  }
};

boot();
