// onnxruntime-web step times in Debian's headless Chromium, one fresh browser per configuration, printed as JSON lines:
//   node bench/browser.mjs --page https://localhost:P/app/bench.html --base /bench/NAME/ --spki B64
//        --config threads=1,throttle=1[,proxy=1] [--config ...] [--warmup 1] [--steps 5]
// Peak memory: the highest VmHWM among the browser's renderer processes (the page and its WASM workers).
import { readFileSync, readdirSync } from 'node:fs';
import { parseArgs } from 'node:util';
import puppeteer from 'puppeteer-core';

const { values: a } = parseArgs({ options: {
  page: { type: 'string' }, base: { type: 'string' }, spki: { type: 'string' }, config: { type: 'string', multiple: true },
  warmup: { type: 'string', default: '1' }, steps: { type: 'string', default: '5' }, chromium: { type: 'string', default: '/usr/bin/chromium' },
} });

function descendants(root) {
  const kids = new Map();
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (!kids.has(ppid)) kids.set(ppid, []);
      kids.get(ppid).push(Number(d));
    } catch { /* gone */ }
  }
  const out = [], todo = [root];
  while (todo.length) { const p = todo.pop(); out.push(p); todo.push(...(kids.get(p) ?? [])); }
  return out;
}

function rendererPeakBytes(browserPid) {
  let peak = 0;
  for (const pid of descendants(browserPid)) {
    try {
      if (!readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('--type=renderer')) continue;
      const m = readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmHWM:\s+(\d+) kB/);
      if (m) peak = Math.max(peak, Number(m[1]) * 1024);
    } catch { /* gone */ }
  }
  return peak;
}

for (const spec of a.config) {
  const cfg = Object.fromEntries(spec.split(',').map((kv) => kv.split('=')).map(([k, v]) => [k, Number(v)]));
  const browser = await puppeteer.launch({ executablePath: a.chromium, headless: true, protocolTimeout: 1_800_000,
    args: ['--no-sandbox', `--ignore-certificate-errors-spki-list=${a.spki}`, '--disable-gpu'] });
  try {
    const page = await browser.newPage();
    await page.goto(a.page, { waitUntil: 'load' });
    if (cfg.throttle > 1) await (await page.createCDPSession()).send('Emulation.setCPUThrottlingRate', { rate: cfg.throttle });
    const r = await page.evaluate((o) => window.devftBench(o), { base: a.base, threads: cfg.threads, proxy: !!cfg.proxy, warmup: Number(a.warmup), steps: Number(a.steps) });
    console.log(JSON.stringify({ ...r, throttle: cfg.throttle ?? 1, peak_rss_bytes: rendererPeakBytes(browser.process().pid) }));
  } catch (e) {
    console.log(JSON.stringify({ error: e.message, threads: cfg.threads, throttle: cfg.throttle ?? 1 }));
  } finally {
    await browser.close();
  }
}
