// Open join links (or any device page) in headless Chromium and report what each page did, as a JSON list
// (one object per --url, in order, each in its own browser context: its own storage):
//   node test/join.mjs --url 'https://localhost:P/app/#join=TOKEN' [--url ...] --spki B64 [--wait-s 60]
//        [--chromium-arg ARG ...]
// A page is watched until it says hello through the gateway or shows an error.
import { parseArgs } from 'node:util';
import { launch, pageState, waitInPage } from '../driver/chromium.mjs';

const { values: a } = parseArgs({ options: { url: { type: 'string', multiple: true }, spki: { type: 'string', default: '' },
  'wait-s': { type: 'string', default: '60' }, 'chromium-arg': { type: 'string', multiple: true, default: [] } } });
const browser = await launch({ spki: a.spki, args: a['chromium-arg'], protocolTimeout: 180_000 });
const out = [];
try {
  for (const url of a.url) {
    const context = await browser.createBrowserContext();
    const page = await context.newPage();
    await page.goto(url, { waitUntil: 'load' });
    await waitInPage(page, () => window.devft?.status === 'hello' || window.devft?.error, Date.now() + Number(a['wait-s']) * 1000, 200);
    const { records, log, ...st } = await pageState(page);
    out.push({ ...st, log: log.slice(-20), wasm: await page.evaluate(() => typeof WebAssembly) });
    await context.close();
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
process.exit(0);
