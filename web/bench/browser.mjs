// onnxruntime-web step times in Debian's headless Chromium, one fresh browser per configuration, printed as JSON lines:
//   node bench/browser.mjs --page https://localhost:P/app/bench.html --base /bench/NAME/ --spki B64
//        --config threads=1,throttle=1[,proxy=1] [--config ...] [--warmup 1] [--steps 5]
// Peak memory: the highest VmHWM among the browser's renderer processes (the page and its WASM workers).
import { parseArgs } from 'node:util';
import { launch, rendererPeakBytes, throttleCpu } from '../driver/chromium.mjs';

const { values: a } = parseArgs({ options: {
  page: { type: 'string' }, base: { type: 'string' }, spki: { type: 'string' }, config: { type: 'string', multiple: true },
  warmup: { type: 'string', default: '1' }, steps: { type: 'string', default: '5' }, chromium: { type: 'string', default: '/usr/bin/chromium' },
} });

for (const spec of a.config) {
  const cfg = Object.fromEntries(spec.split(',').map((kv) => kv.split('=')).map(([k, v]) => [k, Number(v)]));
  const browser = await launch({ spki: a.spki, chromium: a.chromium, protocolTimeout: 1_800_000 });
  try {
    const page = await browser.newPage();
    await page.goto(a.page, { waitUntil: 'load' });
    await throttleCpu(page, cfg.throttle ?? 1);
    const r = await page.evaluate((o) => window.devftBench(o), { base: a.base, threads: cfg.threads, proxy: !!cfg.proxy, warmup: Number(a.warmup), steps: Number(a.steps) });
    console.log(JSON.stringify({ ...r, throttle: cfg.throttle ?? 1, peak_rss_bytes: rendererPeakBytes(browser) }));
  } catch (e) {
    console.log(JSON.stringify({ error: e.message, threads: cfg.threads, throttle: cfg.throttle ?? 1 }));
  } finally {
    await browser.close();
  }
}
