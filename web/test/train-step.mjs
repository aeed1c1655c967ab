// One training-graph step of an exported stage through the web device's own code: the stage's files go into the
// device's blob store, checkManifest and Device.trainerFor (hash check, session, Trainer) open it as a fleet round
// would, and Trainer.lossAndGrads runs one batch from the stage's initial LoRA (tests/test_web_quantized.py).
//   node test/train-step.mjs --artifacts DIR --batch FILE --cache DIR [--engine web|node]
// FILE: {"input_ids": [[...]], "labels": [[...]]}. Prints one JSON line: {runtime, weights (the hello's declaration),
// manifest_weights, loss, grads: {peft_name: float32 little-endian, base64}}. Exits 1 with the error when the
// device refuses the stage or onnxruntime cannot run it.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Device, checkManifest } from '../src/device.js';
import { decodeSafetensors } from '../src/safetensors.js';
import { nodeRuntime } from '../src/runtime-node.js';

const { values: a } = parseArgs({ options: {
  artifacts: { type: 'string' }, batch: { type: 'string' }, cache: { type: 'string' }, engine: { type: 'string', default: 'web' },
} });

const manifest = JSON.parse(readFileSync(path.join(a.artifacts, 'manifest.json'), 'utf8'));
const rt = await nodeRuntime({ cacheDir: a.cache, engine: a.engine });
checkManifest(manifest, rt.ortVersion);
const files = {};
for (const [rel, spec] of Object.entries(manifest.files)) {
  await rt.store.put(spec.sha256, readFileSync(path.join(a.artifacts, rel)));
  files[rel] = spec.sha256;
}
const device = new Device({ runtime: rt, creds: { username: 'train-step' }, shard: [], runId: 'train-step', log: () => {} });
const trainer = await device.trainerFor({ artifactId: 'train-step', manifest, files });

const lora = {};
for (const [k, t] of Object.entries(decodeSafetensors(await rt.store.get(files[manifest.versions.initial_lora])))) lora[k] = t.data;
const batch = JSON.parse(readFileSync(a.batch, 'utf8'));
const dims = [batch.input_ids.length, batch.input_ids[0].length];
const ids = BigInt64Array.from(batch.input_ids.flat().map(BigInt)), labels = BigInt64Array.from(batch.labels.flat().map(BigInt));
const { loss, grads } = await trainer.lossAndGrads(lora, ids, labels, dims);
const b64 = (x) => Buffer.from(x.buffer, x.byteOffset, x.byteLength).toString('base64');
console.log(JSON.stringify({
  runtime: rt.name, weights: device.info().weights, manifest_weights: manifest.weights ?? 'fp32', loss,
  grads: Object.fromEntries(Object.entries(grads).map(([k, g]) => [k, b64(Float32Array.from(g))])),
}));
