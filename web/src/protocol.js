// Messages and topics of the devft wire protocol, version 3 (docs/protocol.md).
import { decodeSafetensors, encodeSafetensors } from './safetensors.js';

export const PROTOCOL_VERSION = 3;
export const MAX_CHUNKS_PER_REQUEST = 64;
const NAME_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const SHA_RE = /^[0-9a-f]{64}$/;

export function checkName(kind, value) {
  if (typeof value !== 'string' || !NAME_RE.test(value)) throw new Error(`${kind} ${JSON.stringify(value)} must match ${NAME_RE}`);
  return value;
}

export const topics = {
  control: (run) => `devft/${run}/control`,
  global: (run, round) => `devft/${run}/global/${round}`,
  chunk: (run, sha, index) => `devft/${run}/artifacts/${sha}/${index}`,
  fetch: (run, dev) => `devft/${run}/fetch/${dev}`,
  update: (run, dev) => `devft/${run}/update/${dev}`,
  status: (run, dev) => `devft/${run}/status/${dev}`,
};

const enc = new TextEncoder();
const dec = new TextDecoder('utf-8', { fatal: true });

/** JSON with non-finite numbers as null (JSON has no NaN). */
export function dumps(obj) {
  return enc.encode(JSON.stringify(obj, (_, v) => (typeof v === 'number' && !Number.isFinite(v) ? null : v)));
}

function loads(bytes, what) {
  let obj;
  try { obj = JSON.parse(typeof bytes === 'string' ? bytes : dec.decode(bytes)); } catch (e) { throw new Error(`${what} is not valid UTF-8 JSON: ${e.message}`); }
  if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) throw new Error(`${what} must be a JSON object`);
  if (obj.version !== PROTOCOL_VERSION) {
    throw new Error(`${what} has protocol version ${JSON.stringify(obj.version)}; this side speaks version ${PROTOCOL_VERSION} - upgrade the older side`);
  }
  return obj;
}

// ---------------------------------------------------------------- framing (section 4)

export function frame(header, body) {
  const head = dumps({ ...header, body_size: body.length });
  const out = new Uint8Array(4 + head.length + body.length);
  new DataView(out.buffer).setUint32(0, head.length, false);
  out.set(head, 4);
  out.set(body, 4 + head.length);
  return out;
}

export function unframe(bytes, what) {
  if (bytes.length < 4) throw new Error(`${what} is ${bytes.length} bytes, too short to hold a frame header length`);
  const n = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(0, false);
  if (4 + n > bytes.length) throw new Error(`${what} declares a ${n}-byte header but holds ${bytes.length - 4} bytes after the length`);
  const header = loads(bytes.subarray(4, 4 + n), `${what} header`);
  const body = bytes.subarray(4 + n);
  if (header.body_size !== body.length) throw new Error(`${what} body is ${body.length} bytes but the header declares ${header.body_size} (truncated?)`);
  return { header, body };
}

export function decodeGlobal(bytes) {
  const { header, body } = unframe(bytes, 'global message');
  if (header.kind !== 'global') throw new Error(`global message header kind is ${JSON.stringify(header.kind)}`);
  return { ...header, tensors: decodeSafetensors(body) };
}

export function decodeUpdate(bytes) {
  const { header, body } = unframe(bytes, 'update message');
  if (header.kind !== 'update') throw new Error(`update message header kind is ${JSON.stringify(header.kind)}`);
  return { ...header, tensors: decodeSafetensors(body) };
}

/** An UpdateMessage frame: `delta` maps PEFT names to {shape, data: Float32Array}. */
export function encodeUpdate({ runId, stage, round, deviceId, nonce, numSamples, delta, metrics, telemetry }) {
  checkName('run_id', runId);
  checkName('device_id', deviceId);
  const header = { version: PROTOCOL_VERSION, kind: 'update', run_id: runId, stage, round, device_id: deviceId, nonce,
    num_samples: numSamples, metrics, telemetry };
  return frame(header, encodeSafetensors(delta));
}

// ---------------------------------------------------------------- JSON messages (section 3)

export function encodeStatus(deviceId, state, info = {}) {
  return dumps({ version: PROTOCOL_VERSION, device_id: checkName('device_id', deviceId), state, timestamp: Date.now() / 1000, info });
}

export function encodeChunkRequest(runId, deviceId, sha256, chunks) {
  if (!(chunks.length > 0 && chunks.length <= MAX_CHUNKS_PER_REQUEST)) throw new Error(`a chunk request asks for 1..64 chunks, got ${chunks.length}`);
  return dumps({ version: PROTOCOL_VERSION, run_id: runId, device_id: deviceId, sha256, chunks });
}

function checkDescriptor(desc, what) {
  if (!desc || !Array.isArray(desc.files) || typeof desc.artifact_id !== 'string') throw new Error(`${what} is not an artifact descriptor`);
  for (const f of desc.files) {
    if (typeof f.path !== 'string' || !f.path || f.path.startsWith('/') || f.path.split('/').includes('..')) {
      throw new Error(`${what} file path ${JSON.stringify(f.path)} must be relative and stay inside the artifact`);
    }
    if (!SHA_RE.test(f.sha256) || !Number.isSafeInteger(f.size) || f.size < 0 || !Number.isSafeInteger(f.chunk_size) || f.chunk_size <= 0
        || !Array.isArray(f.chunks) || f.chunks.length !== Math.max(1, Math.ceil(f.size / f.chunk_size)) || !f.chunks.every((c) => SHA_RE.test(c))) {
      throw new Error(`${what} file ${f.path}: bad sha256, size, chunk_size or chunk list`);
    }
  }
  return desc;
}

export function decodeControl(bytes) {
  const what = 'control message';
  const obj = loads(bytes, what);
  if (!['idle', 'train', 'done'].includes(obj.state)) throw new Error(`${what} state ${JSON.stringify(obj.state)} is not idle, train or done`);
  checkName('run_id', obj.run_id);
  for (const key of ['stage', 'round']) if (!Number.isInteger(obj[key])) throw new Error(`${what} field ${key} must be an integer`);
  for (const key of ['artifacts', 'prefetch']) {
    for (const [fmt, desc] of Object.entries(obj[key] || {})) checkDescriptor(desc, `${what} ${key}.${fmt}`);
  }
  if (obj.state === 'train') {
    const hp = obj.hyperparams;
    if (!hp || typeof hp !== 'object') throw new Error(`${what} in state train needs hyperparams`);
    if (!(hp.lr > 0) || !Number.isInteger(hp.local_steps) || hp.local_steps < 1 || !Number.isInteger(hp.batch_size) || hp.batch_size < 1) {
      throw new Error(`${what} hyperparams need a positive lr, local_steps and batch_size`);
    }
    const mb = hp.micro_batch;
    if (mb !== undefined && mb !== null && (!Number.isInteger(mb) || mb < 1 || mb > hp.batch_size)) {
      throw new Error(`${what} hyperparams micro_batch must be a whole number in [1, batch_size=${hp.batch_size}], got ${JSON.stringify(mb)}`);
    }
    for (const [dev, seed] of Object.entries(hp.seeds || {})) {
      if (!Number.isSafeInteger(seed) || seed < 0) throw new Error(`${what} seed of ${dev} must be an integer in [0, 2^53 - 1]`);
    }
    if (!Array.isArray(obj.sampled_clients)) throw new Error(`${what} in state train needs sampled_clients`);
  }
  const refused = obj.refused ?? {};
  if (typeof refused !== 'object' || Array.isArray(refused)) throw new Error(`${what} refused must be an object`);
  for (const [dev, why] of Object.entries(refused)) {
    checkName('refused device', dev);
    if (typeof why !== 'string' || why.length > 400) throw new Error(`${what} refused[${dev}] must be a string of at most 400 characters`);
  }
  obj.refused = refused;
  return obj;
}

/** The first format of `formats` (the device's preference order) that `offer` carries, as [format, descriptor]. */
export function firstOffered(offer, formats) {
  for (const f of formats) if (offer && offer[f]) return [f, offer[f]];
  return null;
}

export function randomHex(bytes = 16) {
  const b = new Uint8Array(bytes);
  globalThis.crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

/** artifact_id: sha256 of the compact JSON [[path, sha256, size], ...] sorted by path (protocol.md section 5). */
export function artifactListing(files) {
  const rows = files.map((f) => [f.path, f.sha256, f.size]).sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  return JSON.stringify(rows);
}
