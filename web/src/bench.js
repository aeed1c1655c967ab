// Step time of the training step (train.onnx forward + backward, then AdamW on the LoRA tensors), the same
// work as devft-edge's OnnxTrainer.train_step, on a fixed batch: for benchmarks/web.py, in Node and in a page.
import { AdamW } from './optim.js';
import { Trainer } from './trainer.js';

export async function measureSteps(ort, session, manifest, lora, batch, { warmup = 1, steps = 5 } = {}) {
  const trainer = new Trainer(ort, session, manifest);
  const dims = [batch.ids.length, batch.ids[0].length];
  const ids = BigInt64Array.from(batch.ids.flat().map(BigInt));
  const labels = BigInt64Array.from(batch.labels.flat().map(BigInt));
  const params = {};
  for (const [k, v] of Object.entries(lora)) params[k] = Float32Array.from(v);
  const opt = new AdamW(1e-4);
  const times = [], losses = [];
  for (let i = 0; i < warmup + steps; i++) {
    const t0 = performance.now();
    const { loss, grads } = await trainer.lossAndGrads(params, ids, labels, dims);
    opt.step(params, grads);
    if (i >= warmup) times.push((performance.now() - t0) / 1000);
    losses.push(loss);
  }
  const sorted = [...times].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  const median = sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  return { step_s: median, step_times: times, losses };
}
