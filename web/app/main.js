// The page of a browser device: window.devftStart({creds, shardText, runId, wsUrl, threads}) trains until the
// run is done; window.devft holds its log, its state and every round's record (for tests and replays).
import { Device } from '../src/device.js';
import { readShard } from '../src/data.js';
import { browserProblem, browserRuntime } from '../src/runtime-browser.js';

const b64 = (bytes) => { let s = ''; for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000)); return btoa(s); };
const state = { log: [], records: [], done: false, error: null, device: null };
window.devft = state;

function log(line) {
  state.log.push(line);
  document.getElementById('log').textContent = state.log.slice(-200).join('\n');
}

function show(text) { document.getElementById('state').textContent = text; }

/** A stored blob as base64 (tests copy the files a round trained on). */
window.devftBlob = async (sha) => b64(await (await browserRuntime({})).store.get(sha));

const problem = browserProblem();
show(problem ? `cannot train here: ${problem}` : 'ready: waiting for credentials');

window.devftStart = async ({ creds, shardText, runId, wsUrl, threads = 1, prune = true }) => {
  try {
    const runtime = await browserRuntime({ wsUrl, threads });
    const onRecord = (kind, r) => state.records.push({ control: r.control, losses: r.losses, draws: r.draws, global: b64(r.global), update: b64(r.update) });
    const device = new Device({ runtime, creds, shard: readShard(shardText, 'shard'), runId, threads, log, onRecord, prune });
    state.device = device;
    show(`training in run ${runId} as ${creds.username} (${runtime.name})`);
    const code = await device.run();
    show(`run ${runId} is done`);
    state.done = true;
    return code;
  } catch (e) {
    state.error = e.message;
    show(`error: ${e.message}`);
    throw e;
  }
};
