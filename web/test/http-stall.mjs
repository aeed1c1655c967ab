// The browser runtime's artifact GET against origins that stop answering, as JSON (tests/test_web_device.py asserts on it):
//   node test/http-stall.mjs --page URL --spki B64 --stall-s S --get NAME=URL [--get ...]
// The device page at URL (served by the gateway: its import map and code) runs getWithStallTimeout on each URL in turn
// with a stall limit of S seconds; each NAME gets {ok, status, bytes} or {ok: false, error}, and the seconds it took.
import { parseArgs } from 'node:util';
import { launch } from '../driver/chromium.mjs';

const { values: a } = parseArgs({ options: { page: { type: 'string' }, spki: { type: 'string', default: '' },
  'stall-s': { type: 'string', default: '2' }, get: { type: 'string', multiple: true, default: [] } } });
const urls = Object.fromEntries(a.get.map((g) => [g.slice(0, g.indexOf('=')), g.slice(g.indexOf('=') + 1)]));
const browser = await launch({ spki: a.spki, protocolTimeout: 180_000 });
let out;
try {
  const page = await (await browser.createBrowserContext()).newPage();
  await page.goto(a.page, { waitUntil: 'load' });
  out = await page.evaluate(async ({ urls, stallS }) => {
    const { getWithStallTimeout } = await import('/src/runtime-browser.js');
    const got = {};
    for (const [name, url] of Object.entries(urls)) {
      const t0 = performance.now();
      try {
        const res = await getWithStallTimeout(url, { Authorization: 'Basic ZGV2LTAwMDpwdw==' }, stallS);
        got[name] = { ok: true, status: res.status, bytes: res.body.length };
      } catch (e) {
        got[name] = { ok: false, error: String(e?.message ?? e) };
      }
      got[name].seconds = (performance.now() - t0) / 1000;
    }
    return got;
  }, { urls, stallS: Number(a['stall-s']) });
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
process.exit(0);
