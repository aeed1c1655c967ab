// Open a join link in headless Chromium and report what the page did, as JSON:
//   node test/join.mjs --url 'https://localhost:P/app/#join=TOKEN' --spki B64 [--wait-s 60] [--chromium-arg ARG ...]
import { parseArgs } from 'node:util';
import puppeteer from 'puppeteer-core';

const { values: a } = parseArgs({ options: { url: { type: 'string' }, spki: { type: 'string', default: '' }, 'wait-s': { type: 'string', default: '60' },
  'chromium-arg': { type: 'string', multiple: true, default: [] } } });
const browser = await puppeteer.launch({ executablePath: '/usr/bin/chromium', headless: true,
  args: ['--no-sandbox', `--ignore-certificate-errors-spki-list=${a.spki}`, '--disable-gpu', ...a['chromium-arg']] });
const out = {};
try {
  const page = await browser.newPage();
  await page.goto(a.url, { waitUntil: 'load' });
  const deadline = Date.now() + Number(a['wait-s']) * 1000;
  while (Date.now() < deadline) {
    const st = await page.evaluate(() => ({ status: window.devft.status, error: window.devft.error }));
    if (st.status === 'hello' || st.error) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  Object.assign(out, await page.evaluate(() => ({
    status: window.devft.status, error: window.devft.error, enrolled: window.devft.enrolled ?? null,
    address: location.href, stored_user: JSON.parse(localStorage.getItem('devft-device') || 'null')?.creds?.username ?? null,
    page_text: document.getElementById('state').textContent,
  })));
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
process.exit(0);
