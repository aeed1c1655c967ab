// window.devftBench({base, threads, warmup, steps}): step time of onnxruntime-web in this page on the artifact
// served under `base` (benchmarks/web.py serves it through the gateway's HTTPS server), on `base`/batch.json.
import * as ort from 'onnxruntime-web';
import { measureSteps } from '../src/bench.js';
import { decodeSafetensors } from '../src/safetensors.js';

const get = async (url) => { const r = await fetch(url); if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`); return new Uint8Array(await r.arrayBuffer()); };

window.devftBench = async ({ base, threads = 1, warmup = 1, steps = 5, proxy = false }) => {
  ort.env.wasm.wasmPaths = '/node_modules/onnxruntime-web/dist/';
  ort.env.wasm.numThreads = threads;
  ort.env.wasm.proxy = proxy;
  const manifest = JSON.parse(new TextDecoder().decode(await get(`${base}manifest.json`)));
  const externalData = [];
  for (const rel of Object.keys(manifest.files)) if (rel.startsWith('weights/')) externalData.push({ path: rel, data: await get(base + rel) });
  const t0 = performance.now();
  const session = await ort.InferenceSession.create(await get(`${base}train.onnx`), { executionProviders: ['wasm'], externalData });
  const loadS = (performance.now() - t0) / 1000;
  externalData.length = 0;
  const lora = Object.fromEntries(Object.entries(decodeSafetensors(await get(`${base}lora.safetensors`))).map(([k, t]) => [k, t.data]));
  const batch = JSON.parse(new TextDecoder().decode(await get(`${base}batch.json`)));
  const r = await measureSteps(ort, session, manifest, lora, batch, { warmup, steps });
  await session.release();
  return { engine: `onnxruntime-web ${ort.env.versions.web} (chromium${proxy ? ', worker' : ''})`, threads, proxy, cross_origin_isolated: crossOriginIsolated, load_s: loadS, ...r };
};
document.getElementById('state').textContent = 'benchmark page ready';
