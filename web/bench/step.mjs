// One engine's step time on an artifact directory, printed as JSON (benchmarks/web.py runs it):
//   node bench/step.mjs --art DIR --batch batch.json --engine node|web [--threads 1] [--warmup 1] [--steps 5]
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { measureSteps } from '../src/bench.js';
import { decodeSafetensors } from '../src/safetensors.js';
import { FileStore, nodeRuntime } from '../src/runtime-node.js';

const { values: a } = parseArgs({ options: {
  art: { type: 'string' }, batch: { type: 'string' }, engine: { type: 'string', default: 'node' },
  threads: { type: 'string', default: '1' }, warmup: { type: 'string', default: '1' }, steps: { type: 'string', default: '5' },
} });
const manifest = JSON.parse(readFileSync(path.join(a.art, 'manifest.json'), 'utf8'));
const rt = await nodeRuntime({ cacheDir: a.art, engine: a.engine });
const threads = Number(a.threads);
if (a.engine === 'web') rt.ort.env.wasm.numThreads = threads;
const store = new FileStore(a.art);
store.materialize = async () => a.art; // already laid out
store.get = async (sha) => new Uint8Array(readFileSync(path.join(a.art, Object.entries(manifest.files).find(([, f]) => f.sha256 === sha)[0])));
rt.store = store;
const art = { artifactId: 'bench', manifest, files: Object.fromEntries(Object.entries(manifest.files).map(([k, f]) => [k, f.sha256])) };
const t0 = performance.now();
const session = await rt.openSession(art, 'train.onnx', threads);
const loadS = (performance.now() - t0) / 1000;
const lora = Object.fromEntries(Object.entries(decodeSafetensors(new Uint8Array(readFileSync(path.join(a.art, 'lora.safetensors'))))).map(([k, t]) => [k, t.data]));
const batch = JSON.parse(readFileSync(a.batch, 'utf8'));
const r = await measureSteps(rt.ort, session, manifest, lora, batch, { warmup: Number(a.warmup), steps: Number(a.steps) });
console.log(JSON.stringify({ engine: rt.name, threads, load_s: loadS, ...r, peak_rss_bytes: process.resourceUsage().maxRSS * 1024 }));
process.exit(0);
