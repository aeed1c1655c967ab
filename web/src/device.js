// A devft fleet device (docs/device-client.md), the same code in Node and in a browser: the runtime
// adapter (runtime-node.js, runtime-browser.js) supplies onnxruntime, the MQTT connection, SHA-256,
// the content-addressed blob store and the process measurements.
import { loadTokenizer, encodeShard, padId } from './data.js';
import { Fetcher, FetchCancelled } from './fetch.js';
import { decodeControl, decodeGlobal, encodeStatus, encodeUpdate, firstOffered, randomHex, topics, checkName } from './protocol.js';
import { Trainer, latencySummary, meanLoss } from './trainer.js';

const MIN_ONNXRUNTIME = '1.17.0';

// the frozen-weight byte formats a portable trainer can be sent (edge_runtime/manifest.py WEIGHT_FORMATS' values, the
// manifest's `weights`, absent meaning fp32) and the onnxruntime each needs: the quantized graphs (DequantizeLinear
// on uint8 codes, int4's split by BitwiseAnd and BitShift) are opset 21 (onnxruntime 1.20)
const WEIGHT_FORMATS = { fp32: MIN_ONNXRUNTIME, 'int8-asym': '1.20.0', 'int4-asym': '1.20.0' };

const CONTROL_RETRIES = 3; // a failed control is handled again at most this often (2 s, 4 s, 6 s later)

export function versionTuple(text) {
  return String(text).split('+')[0].split('.').slice(0, 3).map((p) => parseInt(p.replace(/\D/g, '') || '0', 10));
}

export function versionAtLeast(have, need) {
  const a = versionTuple(have), b = versionTuple(need);
  for (let i = 0; i < 3; i++) if ((a[i] ?? 0) !== (b[i] ?? 0)) return (a[i] ?? 0) > (b[i] ?? 0);
  return true;
}

/** Topic filter match for MQTT wildcards (+ and a trailing #). */
function matches(filter, topic) {
  const f = filter.split('/'), t = topic.split('/');
  for (let i = 0; i < f.length; i++) {
    if (f[i] === '#') return true;
    if (i >= t.length || (f[i] !== '+' && f[i] !== t[i])) return false;
  }
  return f.length === t.length;
}

export const REFUSED_EXIT = 4; // the coordinator refuses this device (its control names it in `refused`), as devft-edge

/** The weight formats an onnxruntime of version `ortVersion` runs: what the hello declares as `weights`. */
export function weightFormats(ortVersion) {
  return Object.entries(WEIGHT_FORMATS).filter(([, need]) => versionAtLeast(ortVersion, need)).map(([name]) => name);
}

/**
 * Refuse a stage's manifest this runtime cannot train, with the reason: not the portable backend, graphs for a newer
 * onnxruntime (versions.min_onnxruntime), or frozen weights in a format the hello does not declare.
 */
export function checkManifest(manifest, ortVersion) {
  if (manifest.backend !== 'onnx') throw new Error(`the coordinator announced onnx artifacts but their manifest says ${JSON.stringify(manifest.backend)}`);
  const need = manifest.versions?.min_onnxruntime ?? MIN_ONNXRUNTIME;
  if (!versionAtLeast(ortVersion, need)) throw new Error(`onnxruntime ${ortVersion} is too old for these graphs: they need ${need}`);
  const weights = manifest.weights ?? 'fp32';
  if (!weightFormats(ortVersion).includes(weights)) {
    throw new Error(`the stage's frozen weights are ${JSON.stringify(weights)}; this device (onnxruntime ${ortVersion}) runs ${weightFormats(ortVersion)}: update the device`);
  }
}

export class Device {
  /**
   * runtime: the adapter; creds: {username, password, ...}; shard: [{prompt, completion}]; runId: the run to follow
   * (its will needs it); onRecord(kind, data): optional hook that sees every round's inputs and outputs (tests, replays);
   * onAbandon(ctrl, error): sees every round or stage this device gave up (a page shows why: a full storage quota).
   */
  constructor({ runtime, creds, shard, runId, threads = 1, log = console.log, onRecord = null, onStatus = null, onAbandon = null, prune = true }) {
    this.runtime = runtime;
    this.creds = creds;
    this.deviceId = checkName('device_id', creds.username);
    this.runId = checkName('run_id', runId);
    this.shard = shard;
    this.threads = threads;
    this.log = log;
    this.onRecord = onRecord;
    this.onStatus = onStatus; // sees every status this device publishes (a page shows it)
    this.onAbandon = onAbandon;
    this.prune = prune; // false keeps every stage's blobs (replays of old rounds)
    this.formats = ['onnx'];
    this.handlers = []; // [filter, fn]
    this.globals = new Map(); // round -> payload
    this.globalTopic = null; // the round's global adapter topic while a sampled round waits for it (else none)
    this.globalWaiters = [];
    this.pending = null; // newest unhandled control: {payload, retained}
    this.retries = new Map(); // control (state/stage/round/session) -> times its handling failed
    this.generation = 0; // bumped by every control message (cancels a prefetch)
    this.wakeLoop = null;
    this.answered = new Set();
    this.readySent = new Set();
    this.holding = null; // artifact id of the stage files held: in every status (a restarted coordinator reads it)
    this.acked = new Set(); // `${round}/${session}` acknowledged with `busy`, or artifact ids announced `fetching`
    this.prefetched = new Set();
    this.stageDownloads = new Map();
    this.stageFetchS = new Map();
    this.prefetchBytes = 0;
    this.prefetchS = 0;
    this.payloadBytes = 0;
    this.roundsTrained = 0;
    this.session = null; // {artifactId, trainer}
    this.encoded = null; // {key, data}
    this.stopped = false;
    this.processId = runtime.processId();
  }

  // -- MQTT ------------------------------------------------------------------------------

  info(extra = {}) {
    const held = this.holding ? { ready: this.holding } : {};
    const weights = weightFormats(this.runtime.ortVersion).join(','); // the run's scheme must be here, or the coordinator refuses us
    return { formats: this.formats, onnxruntime: this.runtime.ortVersion, weights, ...this.runtime.capabilities(), ...held, ...extra };
  }

  status(state, extra = {}) {
    this.onStatus?.(state, extra);
    return this.publish(topics.status(this.runId, this.deviceId), encodeStatus(this.deviceId, state, this.info(extra)), { retain: true });
  }

  publish(topic, payload, { retain = false } = {}) {
    return new Promise((resolve, reject) => {
      this.client.publish(topic, payload, { qos: 1, retain }, (err, packet) => (err ? reject(err) : resolve(packet)));
    });
  }

  subscribe(filter, fn) {
    this.handlers.push([filter, fn]);
    return new Promise((resolve, reject) => this.client.subscribe(filter, { qos: 1 }, (err) => (err ? reject(err) : resolve())));
  }

  unsubscribe(filter, fn) {
    this.handlers = this.handlers.filter(([f, h]) => !(f === filter && h === fn));
    // one MQTT subscription per filter serves every handler of it: while another handler (a stage fetch beside a
    // prefetch still winding down) wants the filter, the broker keeps sending it
    if (this.handlers.some(([f]) => f === filter)) return Promise.resolve();
    return new Promise((resolve) => this.client.unsubscribe(filter, () => resolve()));
  }

  async connect() {
    const will = { topic: topics.status(this.runId, this.deviceId), payload: encodeStatus(this.deviceId, 'offline'), qos: 1, retain: true };
    this.client = await this.runtime.connectMqtt(this.creds, { will, clientId: this.creds.client_id || this.deviceId });
    this.client.on('message', (topic, payload, packet) => {
      this.payloadBytes += payload.length;
      for (const [filter, fn] of this.handlers) if (matches(filter, topic)) fn(topic, payload, packet);
    });
    let first = true;
    const onConnect = (connack) => {
      // birth and will: a hello after every connect (a restarting broker may have published our will)
      this.status('hello', { reconnected: !first, examples: this.shard.length }).catch(() => {});
      if (!first && !connack?.sessionPresent) {
        for (const f of [topics.control(this.runId), this.globalTopic]) if (f) this.client.subscribe(f, { qos: 1 });
      }
      first = false;
    };
    this.client.on('connect', onConnect);
    // global adapters: only the round's, subscribed to while a sampled round waits for it (globalFor), as devft-edge
    await this.subscribe(topics.control(this.runId), (topic, payload, packet) => this.onControl(payload, packet));
    onConnect({ sessionPresent: true });
  }

  onControl(payload, packet) {
    // a retained control (sent on subscribe) may predate this device's hello: only a live one's `refused` counts
    this.pending = { payload, retained: Boolean(packet?.retain) };
    this.generation += 1;
    this.acknowledge(payload);
    if (this.wakeLoop) this.wakeLoop();
  }

  /** Answer a control at once, before any download (device-client.md section 2): `busy` with the round when it
   * samples this device, `hello` with `fetching` when it names stage files this device does not hold yet. A
   * device silent for the coordinator's start_timeout_s is not waited for. */
  acknowledge(payload) {
    let ctrl;
    try { ctrl = decodeControl(payload); } catch { return; }
    if (ctrl.run_id !== this.runId || ctrl.state === 'done') return;
    const offered = firstOffered(ctrl.artifacts ?? {}, this.formats);
    const sampled = ctrl.state === 'train' && ctrl.sampled_clients.includes(this.deviceId);
    if (sampled) {
      const key = `${ctrl.round}/${ctrl.hyperparams.session}`;
      if (!this.acked.has(key)) {
        this.acked.add(key);
        this.status('busy', { stage: ctrl.stage, round: ctrl.round }).catch(() => {});
      }
    } else if (offered && offered[1].artifact_id !== this.holding && !this.acked.has(offered[1].artifact_id)) {
      this.acked.add(offered[1].artifact_id);
      this.status('hello', { fetching: offered[1].artifact_id }).catch(() => {});
    }
  }

  onGlobal(topic, payload) {
    if (!payload.length) return; // an old round's retained global being cleared
    const round = Number(topic.slice(topic.lastIndexOf('/') + 1));
    if (!Number.isInteger(round)) return;
    this.globals.set(round, payload);
    for (const key of [...this.globals.keys()].sort((a, b) => a - b).slice(0, -4)) this.globals.delete(key);
    this.globalWaiters.forEach((w) => w());
  }

  /** The round's global adapter: subscribed to for this round only (it is retained, so it arrives on subscribe), so
   * the broker sends each round's adapter to the devices sampled for it, not to every device. */
  async globalFor(ctrl) {
    const deadline = (ctrl.deadline_unix ?? Date.now() / 1000 + 600) * 1000;
    const topic = topics.global(ctrl.run_id, ctrl.round);
    const handler = (t, payload) => this.onGlobal(t, payload);
    this.globalTopic = topic;
    await this.subscribe(topic, handler);
    let payload;
    try {
      while (!this.globals.has(ctrl.round)) {
        if (Date.now() > deadline || this.stopped) throw new Error(`no global adapter for round ${ctrl.round} arrived before the deadline`);
        await new Promise((resolve) => { this.globalWaiters.push(resolve); setTimeout(resolve, 500); });
        this.globalWaiters = [];
      }
      payload = this.globals.get(ctrl.round);
      this.globals.delete(ctrl.round);
    } finally {
      this.globalTopic = null;
      await this.unsubscribe(topic, handler);
    }
    const glob = decodeGlobal(payload);
    if (glob.run_id !== ctrl.run_id || glob.stage !== ctrl.stage || glob.round !== ctrl.round) {
      throw new Error(`global message is for ${glob.run_id}/${glob.stage}/${glob.round}, control says ${ctrl.run_id}/${ctrl.stage}/${ctrl.round}`);
    }
    return { glob, payload };
  }

  // -- main loop -------------------------------------------------------------------------

  /** Follow the run until its control says done (resolves 0) or stop() (resolves 0). */
  async run() {
    await this.connect();
    this.fetcher = new Fetcher({ bus: this, store: this.runtime.store, sha256: this.runtime.sha256, runId: this.runId, deviceId: this.deviceId,
      httpGet: this.runtime.httpGet ?? null, login: { username: this.creds.username, password: this.creds.password, ca: this.creds.ca_pem } });
    this.log(`${this.deviceId} connected, following ${this.runId} (${this.runtime.name})`);
    try {
      while (!this.stopped) {
        if (this.pending === null) {
          await new Promise((resolve) => { this.wakeLoop = resolve; setTimeout(resolve, 500); });
          this.wakeLoop = null;
          continue;
        }
        const { payload, retained } = this.pending;
        this.pending = null;
        let ctrl;
        try { ctrl = decodeControl(payload); } catch (e) { this.log(`ignoring malformed control message: ${e.message}`); continue; }
        if (ctrl.run_id !== this.runId) continue;
        if (ctrl.refused[this.deviceId] !== undefined && !retained) {
          this.log(`${this.deviceId}: the coordinator refuses this device: ${ctrl.refused[this.deviceId]}`);
          this.refused = ctrl.refused[this.deviceId];
          return REFUSED_EXIT;
        }
        if (ctrl.state === 'done') {
          this.log(`${this.deviceId}: run ${this.runId} is done after ${this.roundsTrained} rounds here`);
          // not awaited: a broker that stops with the run would never acknowledge it and the device would never end;
          // close() below waits for it 5 s at most (devft-edge publishes it the same way)
          this.status('hello', { finished: true }).catch(() => {});
          return 0;
        }
        try {
          await this.act(ctrl);
        } catch (e) {
          this.log(`${this.deviceId}: stage ${ctrl.stage} round ${ctrl.round} abandoned: ${e.message}`);
          this.onAbandon?.(ctrl, e);
          this.retryLater({ payload, retained }, ctrl);
          continue;
        }
        await this.prefetch(ctrl);
      }
      return 0;
    } finally {
      await this.close();
    }
  }

  /** A control whose handling failed (a fetch that timed out, say) is tried again after a pause, a few times, unless a
   *  newer control came meanwhile: otherwise a device that lost its stage files would wait for the round's end. */
  retryLater(pending, ctrl) {
    const key = `${ctrl.state}/${ctrl.stage}/${ctrl.round}/${ctrl.hyperparams?.session ?? ''}`;
    const tries = (this.retries.get(key) ?? 0) + 1;
    this.retries.set(key, tries);
    if (tries > CONTROL_RETRIES || this.stopped) return;
    setTimeout(() => {
      if (this.pending === null && !this.stopped) {
        this.pending = pending;
        if (this.wakeLoop) this.wakeLoop();
      }
    }, 2000 * tries);
  }

  stop() {
    this.stopped = true;
    if (this.wakeLoop) this.wakeLoop();
  }

  async close() {
    if (this.session) await this.session.trainer.session.release?.();
    this.session = null;
    // a clean end waits for every publish still in flight; one the broker never acknowledges must not keep the
    // device from ending (its statuses that matter were awaited): after 5 s the connection is closed anyway
    await new Promise((resolve) => {
      const timer = setTimeout(() => this.client.end(true, {}, resolve), 5000);
      this.client.end(false, {}, () => { clearTimeout(timer); resolve(); });
    });
  }

  async act(ctrl) {
    if (!ctrl.artifacts || !Object.keys(ctrl.artifacts).length) return;
    if (!firstOffered(ctrl.artifacts, this.formats)) {
      throw new Error(`the coordinator offers ${Object.keys(ctrl.artifacts)} artifacts for stage ${ctrl.stage}; this device runs ${this.formats}`);
    }
    const sampled = ctrl.state === 'train' && ctrl.sampled_clients.includes(this.deviceId);
    if (!sampled) {
      const art = await this.stageFiles(ctrl);
      if (!this.readySent.has(art.artifactId)) {
        this.readySent.add(art.artifactId);
        this.holding = art.artifactId;
        await this.status('hello');
      }
      return;
    }
    const key = `${ctrl.stage}/${ctrl.round}/${ctrl.hyperparams.session}`;
    if (this.answered.has(key)) return;
    if (ctrl.deadline_unix != null && Date.now() / 1000 > ctrl.deadline_unix) {
      this.log(`${this.deviceId}: round ${ctrl.round} deadline already passed; skipping`);
      return;
    }
    const update = await this.trainRound(ctrl);
    await this.send(update, ctrl);
    this.answered.add(key);
    this.roundsTrained += 1;
  }

  // -- artifacts ---------------------------------------------------------------------------

  /** Fetch (or find) the stage's files, verified; returns {artifactId, manifest, files: {relative path: sha256}}. */
  async stageFiles(ctrl) {
    const [, desc] = firstOffered(ctrl.artifacts, this.formats);
    const before = this.fetcher.bytesDownloaded, t0 = performance.now();
    await this.fetcher.fetchAll(desc);
    const id = desc.artifact_id;
    this.stageFetchS.set(id, (this.stageFetchS.get(id) ?? 0) + (performance.now() - t0) / 1000);
    this.stageDownloads.set(id, (this.stageDownloads.get(id) ?? 0) + this.fetcher.bytesDownloaded - before);
    const manifests = desc.files.filter((f) => f.path.split('/').pop() === 'manifest.json');
    if (manifests.length !== 1) throw new Error(`artifact ${id.slice(0, 12)} has ${manifests.length} manifests; expected one`);
    const prefix = manifests[0].path.slice(0, -'manifest.json'.length);
    const manifest = JSON.parse(new TextDecoder().decode(await this.runtime.store.get(manifests[0].sha256)));
    checkManifest(manifest, this.runtime.ortVersion);
    const byPath = new Map(desc.files.map((f) => [f.path, f]));
    const files = {};
    for (const [rel, spec] of Object.entries(manifest.files)) {
      const f = byPath.get(prefix + rel);
      if (!f || f.sha256 !== spec.sha256 || f.size !== spec.size) throw new Error(`manifest file ${rel} is not in the descriptor with its sha256 and size; refusing the stage`);
      files[rel] = f.sha256;
    }
    // the earlier stages' files are dead weight now (what this stage shares with them, and the hint, stays)
    const hint = firstOffered(ctrl.prefetch, this.formats);
    const keep = new Set([...desc.files, ...(hint ? hint[1].files : [])].map((f) => f.sha256));
    if (this.prune) await this.runtime.store.prune(keep);
    return { artifactId: id, manifest, files, manifestSha: manifests[0].sha256 };
  }

  async trainerFor(art) {
    if (this.session?.artifactId === art.artifactId) return this.session.trainer;
    if (this.session) await this.session.trainer.session.release?.();
    this.session = null;
    // never train on unverified files: every file of the manifest is hashed again before the session opens
    for (const [rel, sha] of Object.entries(art.files)) {
      if (!(await this.runtime.store.verify(sha, art.manifest.files[rel].size))) throw new Error(`cached ${rel} failed verification; it will be fetched again`);
    }
    const graph = art.manifest.versions?.train_graph ?? 'train.onnx';
    const session = await this.runtime.openSession(art, graph, this.threads);
    const trainer = new Trainer(this.runtime.ort, session, art.manifest);
    this.session = { artifactId: art.artifactId, trainer };
    return trainer;
  }

  async encodedShard(art) {
    const name = art.manifest.tokenizer_file;
    if (!name) throw new Error('the artifacts carry no tokenizer.json; the server must export with one');
    const key = `${art.files[name]}/${art.manifest.seq_len}`;
    if (this.encoded?.key !== key) {
      const tok = loadTokenizer(new TextDecoder().decode(await this.runtime.store.get(art.files[name])));
      this.encoded = { key, data: encodeShard(tok, this.shard, art.manifest.seq_len) };
    }
    return this.encoded.data;
  }

  async prefetch(ctrl) {
    const hint = firstOffered(ctrl.prefetch, this.formats);
    if (!hint || this.prefetched.has(hint[1].artifact_id) || this.pending !== null) return;
    const gen = this.generation, before = this.fetcher.bytesDownloaded, t0 = performance.now();
    try {
      await this.fetcher.fetchAll(hint[1], { cancelled: () => this.generation !== gen || this.stopped });
      this.prefetched.add(hint[1].artifact_id);
    } catch (e) {
      if (!(e instanceof FetchCancelled)) this.log(`${this.deviceId}: prefetch stopped (${e.message}); the files come with the stage`);
    } finally {
      this.prefetchBytes += this.fetcher.bytesDownloaded - before;
      this.prefetchS += (performance.now() - t0) / 1000;
    }
  }

  // -- a round -----------------------------------------------------------------------------

  async trainRound(ctrl) {
    const hp = ctrl.hyperparams;
    const seed = hp.seeds?.[this.deviceId];
    if (seed === undefined) throw new Error(`the train control for round ${ctrl.round} carries no seed for ${this.deviceId}`);
    await this.status('busy', { stage: ctrl.stage, round: ctrl.round });
    const startedUnix = Date.now() / 1000, t0 = performance.now(), cpu0 = this.runtime.cpuTimeS();
    const aid = firstOffered(ctrl.artifacts, this.formats)[1].artifact_id;
    const fetchedBefore = this.stageFetchS.get(aid) ?? 0, bytesBefore = this.fetcher.bytesDownloaded;
    const art = await this.stageFiles(ctrl);
    this.holding = art.artifactId;
    const trainer = await this.trainerFor(art);
    const { glob, payload: globalPayload } = await this.globalFor(ctrl);
    const received = {};
    const specs = new Map(art.manifest.trainable.map((t) => [t.peft_name, t]));
    for (const [name, spec] of specs) {
      const t = glob.tensors[name];
      if (!t || t.dtype !== 'F32' || JSON.stringify(t.shape) !== JSON.stringify(spec.shape)) throw new Error(`global adapter tensor ${name} is missing or not float32 ${spec.shape}`);
      received[name] = t.data;
    }
    if (Object.keys(glob.tensors).length !== specs.size) throw new Error('the global adapter holds tensors the manifest does not list');
    const encoded = await this.encodedShard(art);
    const setupS = (performance.now() - t0) / 1000;
    const r0 = performance.now(), rcpu0 = this.runtime.cpuTimeS();
    const result = await trainer.trainRound(received, hp, seed, encoded, padId(art.manifest.model_config));
    const durationS = (performance.now() - r0) / 1000;
    if (result.skipped) this.log(`${this.deviceId}: ${result.skipped} batch(es) without completion tokens within seq_len ${art.manifest.seq_len} skipped`);
    const trainable = hp.trainable ?? [...specs.keys()];
    const delta = {};
    for (const k of trainable) {
      const d = new Float32Array(received[k].length);
      for (let i = 0; i < d.length; i++) d[i] = result.trained[k][i] - received[k][i];
      delta[k] = { shape: specs.get(k).shape, data: d };
    }
    const cpu = this.runtime.cpuTimeS();
    const telemetry = {
      steps: result.steps, step_latency_s: latencySummary(result.stepSeconds), duration_s: durationS,
      cpu_time_s: cpu === null ? null : cpu - rcpu0, train_s: (performance.now() - t0) / 1000, setup_s: setupS,
      started_unix: startedUnix, fetch_s: (this.stageFetchS.get(aid) ?? 0) - fetchedBefore, stage_fetch_s: this.stageFetchS.get(aid) ?? 0,
      tokens: result.tokens, tokens_per_s: durationS > 0 ? result.tokens / durationS : null,
      peak_rss_bytes: this.runtime.peakRssBytes(), backend: 'onnx', runtime: this.runtime.name, threads: this.threads,
      process: this.processId, artifact_id: aid, download_bytes: this.fetcher.bytesDownloaded - bytesBefore,
      stage_download_bytes: this.stageDownloads.get(aid) ?? 0, prefetch_bytes: this.prefetchBytes, prefetch_s: this.prefetchS,
      cache_bytes_downloaded_total: this.fetcher.bytesDownloaded, mqtt_payload_bytes_received: this.payloadBytes,
      round_cpu_time_s: cpu === null ? null : cpu - cpu0,
    };
    for (const k of Object.keys(telemetry)) if (telemetry[k] === null) delete telemetry[k];
    const update = {
      runId: ctrl.run_id, stage: ctrl.stage, round: ctrl.round, deviceId: this.deviceId, nonce: randomHex(16),
      numSamples: this.shard.length, delta, metrics: { train_loss: meanLoss(result.losses) }, telemetry,
    };
    const frame = encodeUpdate(update);
    this.onRecord?.('round', { control: ctrl, global: globalPayload, update: frame, losses: result.losses, draws: result.draws });
    return { frame, update };
  }

  async send({ frame, update }, ctrl) {
    await this.publish(topics.update(ctrl.run_id, this.deviceId), frame);
    const t = update.telemetry;
    this.log(`${this.deviceId}: stage ${ctrl.stage + 1} round ${ctrl.round + 1}: ${t.steps} steps in ${t.train_s.toFixed(2)} s, `
      + `train loss ${update.metrics.train_loss?.toFixed(4)}, sent ${(frame.length / 1e3).toFixed(1)} kB`);
    await this.status('hello', { stage: ctrl.stage, round: ctrl.round });
  }
}
