// One round of LoRA training on a portable (`onnx`) artifact through onnxruntime (node or web).
import { makeOptimizer } from './optim.js';
import { collate, hasTargets, targetCount } from './data.js';
import { roundDraws } from './sampler.js';

const LOSS = 'loss';
const GRAD = 'grad.';

export class Trainer {
  /** `session`: an onnxruntime InferenceSession on train.onnx; `manifest`: the parsed manifest.json. */
  constructor(ort, session, manifest) {
    this.ort = ort;
    this.session = session;
    this.manifest = manifest;
    this.specs = manifest.trainable; // graph order: {name, peft_name, shape, dtype}
    this.checkGraph();
  }

  checkGraph() {
    const lora = this.specs.map((t) => t.name);
    const wantIn = [...this.manifest.inputs.map((i) => i.name), ...lora].sort();
    const wantOut = [LOSS, ...lora.map((n) => GRAD + n)].sort();
    const gotIn = [...this.session.inputNames].sort(), gotOut = [...this.session.outputNames].sort();
    if (JSON.stringify(gotIn) !== JSON.stringify(wantIn) || JSON.stringify(gotOut) !== JSON.stringify(wantOut)) {
      throw new Error(`train graph does not match its manifest: inputs ${gotIn.slice(0, 4)}..., outputs ${gotOut.slice(0, 3)}...; re-export the stage`);
    }
  }

  /** Loss (a float32 value as a number) and gradients {peft_name: Float32Array} of one batch. */
  async lossAndGrads(lora, ids, labels, dims) {
    // copies: onnxruntime-web's worker (proxy) takes the inputs' buffers, which would empty the caller's arrays
    const feeds = { input_ids: new this.ort.Tensor('int64', ids.slice(), dims), labels: new this.ort.Tensor('int64', labels.slice(), dims) };
    for (const t of this.specs) feeds[t.name] = new this.ort.Tensor('float32', lora[t.peft_name].slice(), t.shape);
    const out = await this.session.run(feeds);
    const grads = {};
    for (const t of this.specs) grads[t.peft_name] = out[GRAD + t.name].data;
    return { loss: out[LOSS].data[0], grads };
  }

  /**
   * Loss and gradients of a batch run in micro-batches of `micro` rows (docs/device-client.md section 4,
   * "Micro-batches, exactly"; devft-edge's OnnxTrainer._accumulate): w_i = f32(f32(n_i) / f32(N)), the first
   * micro-batch gives w_1 * g_1, each later one adds w_i * g_i, every operation rounded to float32.
   */
  async microLossAndGrads(lora, ids, labels, dims, micro) {
    const [rows, width] = dims;
    if (!micro || micro >= rows) return this.lossAndGrads(lora, ids, labels, dims);
    const parts = [];
    for (let r0 = 0; r0 < rows; r0 += micro) {
      const r1 = Math.min(r0 + micro, rows), n = targetCount(labels, dims, r0, r1);
      if (n) parts.push([r0, r1, n]);
    }
    const total = parts.reduce((a, [, , n]) => a + n, 0);
    let loss = null;
    const grads = {};
    for (const [r0, r1, n] of parts) {
      const w = Math.fround(n / total);
      const out = await this.lossAndGrads(lora, ids.subarray(r0 * width, r1 * width), labels.subarray(r0 * width, r1 * width), [r1 - r0, width]);
      const first = loss === null;
      loss = first ? Math.fround(w * out.loss) : Math.fround(loss + Math.fround(w * out.loss));
      for (const [k, g] of Object.entries(out.grads)) {
        const acc = first ? (grads[k] = new Float32Array(g.length)) : grads[k];
        if (first) for (let j = 0; j < g.length; j++) acc[j] = w * g[j];
        else for (let j = 0; j < g.length; j++) acc[j] = acc[j] + Math.fround(w * g[j]);
      }
    }
    return { loss, grads };
  }

  /**
   * Train one round from `received` ({peft_name: Float32Array}); returns {trained, losses, steps, skipped, stepSeconds, tokens}.
   * hp: the control's hyperparams; encoded: [ids, labels] per shard example.
   */
  async trainRound(received, hp, seed, encoded, pad, clock = () => performance.now() / 1000) {
    const lora = {};
    for (const [k, v] of Object.entries(received)) lora[k] = Float32Array.from(v);
    const trainable = hp.trainable ?? this.specs.map((t) => t.peft_name);
    const known = new Set(this.specs.map((t) => t.peft_name));
    const unknown = trainable.filter((k) => !known.has(k));
    if (unknown.length) throw new Error(`control names trainable tensors the artifacts lack: ${unknown.slice(0, 3)}`);
    const opt = makeOptimizer(hp.optimizer ?? 'adamw', hp.lr);
    const losses = [], stepSeconds = [], draws = [];
    let tokens = 0, skipped = 0;
    for (const idx of roundDraws(seed, encoded.length, hp.batch_size, hp.local_steps)) {
      draws.push(idx);
      const batch = collate(idx.map((i) => encoded[i]), pad);
      if (!hasTargets(batch.labels, batch.dims)) { skipped += 1; continue; }
      const t0 = clock();
      const { loss, grads } = await this.microLossAndGrads(lora, batch.ids, batch.labels, batch.dims, hp.micro_batch);
      const sel = {};
      for (const k of trainable) sel[k] = grads[k];
      opt.step(lora, sel);
      stepSeconds.push(clock() - t0);
      losses.push(loss);
      tokens += idx.reduce((a, i) => a + encoded[i][0].length, 0);
    }
    return { trained: lora, losses, steps: losses.length, skipped, stepSeconds, tokens, draws };
  }
}

/** train_loss as devft-edge computes it: numpy's mean of the losses (float64; a[0] + pairwise sum of the rest). */
export function meanLoss(losses) {
  if (!losses.length) return null;
  return (losses[0] + pairwiseSum(losses.slice(1))) / losses.length;
}

function pairwiseSum(a) {
  const n = a.length;
  if (n < 8) { let res = 0; for (const x of a) res += x; return res; }
  if (n <= 128) {
    const r = a.slice(0, 8);
    let i = 8;
    for (; i < n - (n % 8); i += 8) for (let j = 0; j < 8; j++) r[j] += a[i + j];
    let res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; i++) res += a[i];
    return res;
  }
  let n2 = Math.floor(n / 2);
  n2 -= n2 % 8;
  return pairwiseSum(a.slice(0, n2)) + pairwiseSum(a.slice(n2));
}

/** {p50, p95, mean} of step seconds, numpy-style linear percentiles. */
export function latencySummary(xs) {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  const q = (p) => { const at = (s.length - 1) * p, lo = Math.floor(at), hi = Math.ceil(at); return s[lo] + (s[hi] - s[lo]) * (at - lo); };
  return { p50: q(0.5), p95: q(0.95), mean: xs.reduce((a, b) => a + b, 0) / xs.length };
}
