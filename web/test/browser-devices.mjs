// Drive browser devices in headless Chromium (Debian's /usr/bin/chromium through puppeteer-core, no browser
// download): one browser context (its own storage) per device, each trains until the run is done.
//   node test/browser-devices.mjs --page URL --ws URL --run RUN --spki BASE64 --out DIR
//        --device NAME=CREDENTIALS_JSON,SHARD_JSONL [--device ...] [--threads N] [--timeout-s S]
// Writes DIR/<NAME>/round-<r>.{json,global,update} (as node-device.mjs --record) and DIR/<NAME>/log.txt;
// --mobile emulates a phone's viewport and user agent, --throttle N slows each page's CPU N times (a rig of
// emulated phones: every device has its own browser context, i.e. its own storage);
// --close NAME closes that device's tab as soon as it reports busy (DIR/<NAME>/closed.json has when);
// --keep-blobs keeps every stage's files in the browser and copies each round's to DIR/<NAME>/blobs/<sha256>.
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import puppeteer, { KnownDevices } from 'puppeteer-core';

const { values: args } = parseArgs({
  options: {
    page: { type: 'string' }, ws: { type: 'string' }, run: { type: 'string' }, spki: { type: 'string' }, out: { type: 'string' },
    device: { type: 'string', multiple: true }, threads: { type: 'string', default: '1' }, 'timeout-s': { type: 'string', default: '600' },
    chromium: { type: 'string', default: '/usr/bin/chromium' }, 'keep-blobs': { type: 'boolean', default: false },
    close: { type: 'string' }, throttle: { type: 'string', default: '1' }, mobile: { type: 'boolean', default: false },
  },
});

const browser = await puppeteer.launch({
  executablePath: args.chromium, headless: true, protocolTimeout: 3_600_000, // a page blocks while it builds a big session
  // the fleet's own CA signs the gateway's certificate: trust exactly that key, nothing else
  args: ['--no-sandbox', `--ignore-certificate-errors-spki-list=${args.spki}`, '--disable-gpu'],
});
const deadline = Date.now() + Number(args['timeout-s']) * 1000;
let failed = 0;

async function runDevice(spec) {
  const [name, files] = spec.split('=');
  const [credPath, shardPath] = files.split(',');
  const dir = path.join(args.out, name);
  mkdirSync(dir, { recursive: true });
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  if (args.mobile) await page.emulate(KnownDevices['Pixel 5']); // a phone's viewport and user agent
  const throttle = Number(args.throttle);
  if (throttle > 1) await (await page.createCDPSession()).send('Emulation.setCPUThrottlingRate', { rate: throttle });
  const lines = [];
  page.on('console', (m) => lines.push(`console: ${m.text()}`));
  page.on('pageerror', (e) => lines.push(`pageerror: ${e.message}`));
  await page.goto(args.page, { waitUntil: 'load' });
  const creds = JSON.parse(readFileSync(credPath, 'utf8'));
  const shardText = readFileSync(shardPath, 'utf8');
  const isolated = await page.evaluate(() => globalThis.crossOriginIsolated);
  lines.push(`crossOriginIsolated: ${isolated}`);
  page.evaluate((o) => window.devftStart(o).catch(() => {}), { creds, shardText, runId: args.run, wsUrl: args.ws, threads: Number(args.threads), prune: !args['keep-blobs'] });
  let st;
  if (name === args.close) { // a tab closed mid-round: its will must tell the coordinator at once
    while (Date.now() < deadline && (await page.evaluate(() => window.devft.status)) !== 'busy') await new Promise((r) => setTimeout(r, 20));
    writeFileSync(path.join(dir, 'closed.json'), JSON.stringify({ closed_unix: Date.now() / 1000 }));
    await page.close();
    await context.close();
    return;
  }
  while (Date.now() < deadline) {
    st = await page.evaluate(() => ({ done: window.devft.done, error: window.devft.error, n: window.devft.records.length }));
    if (st.done || st.error) break;
    await new Promise((r) => setTimeout(r, 500));
  }
  const state = await page.evaluate(() => ({ log: window.devft.log, records: window.devft.records, done: window.devft.done, error: window.devft.error }));
  for (const r of state.records) {
    const base = path.join(dir, `round-${r.control.round}`);
    writeFileSync(`${base}.json`, JSON.stringify({ control: r.control, losses: r.losses, draws: r.draws }));
    writeFileSync(`${base}.global`, Buffer.from(r.global, 'base64'));
    writeFileSync(`${base}.update`, Buffer.from(r.update, 'base64'));
    if (args['keep-blobs']) { // the files the round trained on, for replays (--keep-blobs turns the device's pruning off)
      mkdirSync(path.join(dir, 'blobs'), { recursive: true });
      for (const f of r.control.artifacts.onnx.files) {
        const blob = path.join(dir, 'blobs', f.sha256);
        if (existsSync(blob)) continue; // rounds of a stage share their files: copy each once
        writeFileSync(blob, Buffer.from(await page.evaluate((sha) => window.devftBlob(sha), f.sha256), 'base64'));
      }
    }
  }
  writeFileSync(path.join(dir, 'log.txt'), [...lines, ...state.log, `done: ${state.done} error: ${state.error}`].join('\n') + '\n');
  if (!state.done) failed += 1;
  await context.close();
}

try {
  await Promise.all(args.device.map(runDevice));
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
