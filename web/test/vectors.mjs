// Checks every piece of the web device against docs/test-vectors (docs/test-vectors/README.md):
//   node test/vectors.mjs [--engine node|web] [--vectors DIR]
// Prints one line per check and exits 1 on the first mismatch. Float32 values compare by their bits
// where the vectors' runtime and machine match ours (onnxruntime-node on x86_64), else within 1e-5.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { SplitMix64, roundDraws } from '../src/sampler.js';
import { makeOptimizer } from '../src/optim.js';
import { decodeGlobal, decodeUpdate, artifactListing, frame, encodeUpdate } from '../src/protocol.js';
import { decodeSafetensors, encodeSafetensors } from '../src/safetensors.js';
import { Trainer, meanLoss } from '../src/trainer.js';
import { FileStore, nodeRuntime, sha256Hex } from '../src/runtime-node.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const opt = (name, dflt) => { const i = args.indexOf(name); return i >= 0 ? args[i + 1] : dflt; };
const engine = opt('--engine', 'node');
const dir = opt('--vectors', path.join(here, '..', '..', 'docs', 'test-vectors'));
const load = (name) => JSON.parse(readFileSync(path.join(dir, name), 'utf8'));
const f32 = (t) => { const b = Buffer.from(t.f32le_base64, 'base64'); return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.length)); };
const bits = (x) => { const a = new Float32Array([x]); return new Uint32Array(a.buffer)[0]; };
let failures = 0;

function check(what, ok, detail = '') {
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}${detail ? `: ${detail}` : ''}`);
  if (!ok) failures += 1;
}

/** Largest |a - b| and whether the float32 bits are identical. */
function compare(a, b) {
  let max = 0, same = a.length === b.length;
  for (let i = 0; i < a.length; i++) { max = Math.max(max, Math.abs(a[i] - b[i])); if (bits(a[i]) !== bits(b[i])) same = false; }
  return { max, same };
}

// sampler
const sampler = load('sampler.json');
for (const s of sampler.streams) {
  const rng = new SplitMix64(s.seed);
  const got = s.next.map(() => rng.next().toString(16).padStart(16, '0'));
  check(`sampler stream seed ${s.seed}`, JSON.stringify(got) === JSON.stringify(s.next));
}
for (const r of sampler.rounds) {
  const got = roundDraws(r.seed, r.n, r.batch_size, r.local_steps);
  check(`sampler round seed ${r.seed} n ${r.n} batch ${r.batch_size}`, JSON.stringify(got) === JSON.stringify(r.batches));
}

// optimisers, bit for bit
for (const c of load('optim.json').cases) {
  const o = makeOptimizer(c.optimizer, c.lr);
  const p = { w: f32(c.p0) };
  let same = true;
  c.grads.forEach((g, i) => { o.step(p, { w: f32(g) }); same &&= compare(p.w, f32(c.p_after_step[i])).same; });
  check(`${c.optimizer} lr ${c.lr}, ${c.grads.length} steps, bit for bit`, same);
}

// frames: decode, and our encoder's tensors decode back the same
for (const fr of load('frames.json').frames) {
  const bytes = new Uint8Array(Buffer.from(fr.frame_base64, 'base64'));
  const msg = fr.kind === 'update' ? decodeUpdate(bytes) : decodeGlobal(bytes);
  const { tensors, ...header } = msg;
  let ok = JSON.stringify(header) === JSON.stringify(fr.header);
  for (const [name, t] of Object.entries(fr.tensors)) ok &&= compare(tensors[name].data, f32(t)).same && JSON.stringify(tensors[name].shape) === JSON.stringify(t.shape);
  check(`${fr.kind} frame decodes`, ok);
  // as mqtt.js delivers it: a Buffer view into a larger pool (a decoder must copy, not reinterpret the pool)
  const pooled = Buffer.concat([Buffer.alloc(13, 7), Buffer.from(bytes)]).subarray(13);
  const again = (fr.kind === 'update' ? decodeUpdate : decodeGlobal)(pooled);
  check(`${fr.kind} frame decodes from a pooled Buffer`, Object.entries(fr.tensors).every(([k, t]) => compare(again.tensors[k].data, f32(t)).same));
  const body = encodeSafetensors(Object.fromEntries(Object.entries(fr.tensors).map(([k, t]) => [k, { shape: t.shape, data: f32(t) }])));
  const back = decodeSafetensors(body);
  check(`${fr.kind} tensors re-encode`, Object.entries(fr.tensors).every(([k, t]) => compare(back[k].data, f32(t)).same));
  if (fr.kind === 'update') {
    const h = fr.header;
    const again = decodeUpdate(encodeUpdate({ runId: h.run_id, stage: h.stage, round: h.round, deviceId: h.device_id, nonce: h.nonce,
      numSamples: h.num_samples, metrics: h.metrics, telemetry: h.telemetry,
      delta: Object.fromEntries(Object.entries(fr.tensors).map(([k, t]) => [k, { shape: t.shape, data: f32(t) }])) }));
    check('update frame round-trips', again.nonce === h.nonce && Object.entries(fr.tensors).every(([k, t]) => compare(again.tensors[k].data, f32(t)).same));
  }
}
void frame;

// artifact ids
for (const c of load('artifact_id.json').cases) {
  const files = Object.entries(c.files).map(([p, b64]) => { const b = Buffer.from(b64, 'base64'); return { path: p, sha256: sha256Hex(b), size: b.length }; });
  const listing = artifactListing(files);
  check(`artifact_id of ${files.length} files`, listing === c.listing && sha256Hex(Buffer.from(listing)) === c.artifact_id);
}

// the tiny artifact through onnxruntime
const tinyDir = path.join(dir, 'tiny');
const manifest = JSON.parse(readFileSync(path.join(tinyDir, 'manifest.json'), 'utf8'));
const rt = await nodeRuntime({ cacheDir: path.join(tinyDir, '..'), engine });
const store = new FileStore(tinyDir);
store.materialize = async () => tinyDir; // the vectors' directory is already laid out
store.get = async (sha) => { const rel = Object.entries(manifest.files).find(([, f]) => f.sha256 === sha)[0]; return new Uint8Array(readFileSync(path.join(tinyDir, rel))); };
const art = { artifactId: 'tiny', manifest, files: Object.fromEntries(Object.entries(manifest.files).map(([k, f]) => [k, f.sha256])) };
rt.store = store;
const session = await rt.openSession(art, 'train.onnx', 1);
const trainer = new Trainer(rt.ort, session, manifest);
const exact = engine === 'node' && process.arch === 'x64';
const step = load('train_step.json');
const lora = Object.fromEntries(Object.entries(step.lora).map(([k, t]) => [k, f32(t)]));
const dims = [step.input_ids.length, step.input_ids[0].length];
const ids = BigInt64Array.from(step.input_ids.flat().map(BigInt)), labels = BigInt64Array.from(step.labels.flat().map(BigInt));
const { loss, grads } = await trainer.lossAndGrads(lora, ids, labels, dims);
const lossOk = exact ? bits(loss) === parseInt(step.loss.f32, 16) : Math.abs(loss - step.loss.value) < 1e-5;
let gmax = 0, gsame = true;
for (const [k, t] of Object.entries(step.grads)) { const c = compare(grads[k], f32(t)); gmax = Math.max(gmax, c.max); gsame &&= c.same; }
check(`train_step on ${rt.name}: loss ${exact ? 'bit for bit' : 'within 1e-5'}`, lossOk, `${loss} vs ${step.loss.value}`);
check(`train_step gradients ${exact ? 'bit for bit' : 'within 1e-5'}`, exact ? gsame : gmax < 1e-5, `max |diff| ${gmax.toExponential(2)}`);

const rounds = load('round.json');
const initial = decodeSafetensors(new Uint8Array(readFileSync(path.join(tinyDir, 'lora.safetensors'))));
const received = Object.fromEntries(Object.entries(initial).map(([k, t]) => [k, t.data]));
const encoded = rounds.shard.map((e) => [e.ids, e.labels]);
for (const c of rounds.cases) {
  const hp = { lr: c.lr, optimizer: c.optimizer, batch_size: c.batch_size, local_steps: c.local_steps, trainable: c.trainable, micro_batch: c.micro_batch };
  const res = await trainer.trainRound(received, hp, c.seed, encoded, rounds.pad_id);
  const lossesOk = res.losses.length === c.step_losses.length && res.losses.every((l, i) => (exact ? bits(l) === parseInt(c.step_losses[i].f32, 16) : Math.abs(l - c.step_losses[i].value) < 1e-5));
  let dmax = 0, dsame = true;
  for (const [k, t] of Object.entries(c.delta)) {
    const d = res.trained[k].map((v, i) => v - received[k][i]);
    const cmp = compare(d, f32(t)); dmax = Math.max(dmax, cmp.max); dsame &&= cmp.same;
  }
  check(`round seed ${c.seed} ${c.optimizer}${c.micro_batch ? ` micro ${c.micro_batch}` : ''}: draws`, JSON.stringify(res.draws) === JSON.stringify(c.draws));
  check(`round seed ${c.seed} ${c.optimizer}${c.micro_batch ? ` micro ${c.micro_batch}` : ''}: ${res.steps} step losses and train_loss`, lossesOk && (exact ? meanLoss(res.losses) === c.train_loss : Math.abs(meanLoss(res.losses) - c.train_loss) < 1e-5),
    `${meanLoss(res.losses)} vs ${c.train_loss}`);
  check(`round seed ${c.seed} ${c.optimizer}${c.micro_batch ? ` micro ${c.micro_batch}` : ''}: delta ${exact ? 'bit for bit' : 'within 1e-5'}`, exact ? dsame : dmax < 1e-5, `max |diff| ${dmax.toExponential(2)}`);
}
console.log(failures ? `${failures} check(s) failed` : `all checks passed (${engine})`);
process.exit(failures ? 1 : 0);
