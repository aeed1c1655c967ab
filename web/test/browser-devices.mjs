// Drive browser devices in headless Chromium (Debian's /usr/bin/chromium through puppeteer-core, no browser
// download): one browser context (its own storage) per device, each trains until the run is done.
//   node test/browser-devices.mjs --page URL --ws URL --run RUN --spki BASE64 --out DIR
//        --device NAME=CREDENTIALS_JSON,SHARD_JSONL [--device ...] [--threads N] [--timeout-s S]
// Writes DIR/<NAME>/round-<r>.{json,global,update} (as node-device.mjs --record) and DIR/<NAME>/log.txt;
// --mobile emulates a phone's viewport and user agent, --throttle N slows each page's CPU N times (a rig of
// emulated phones: every device has its own browser context, i.e. its own storage);
// --close NAME closes that device's tab as soon as it reports busy (DIR/<NAME>/closed.json has when);
// --quota BYTES caps each page's origin storage (the Cache API the blobs go into; DIR/<NAME>/abandoned.json has what
// the page gave up and showed); --keep-blobs keeps every stage's files in the browser and copies each round's to DIR/<NAME>/blobs/<sha256>.
// Stopped (SIGTERM) before a page is done, it still writes that page's log.txt and abandoned.json, as far as it got.
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { collectConsole, emulatePhone, launch, limitStorage, pageState, saveRecords, throttleCpu, waitForDevice, waitInPage } from '../driver/chromium.mjs';

const { values: args } = parseArgs({
  options: {
    page: { type: 'string' }, ws: { type: 'string' }, run: { type: 'string' }, spki: { type: 'string' }, out: { type: 'string' },
    device: { type: 'string', multiple: true }, threads: { type: 'string', default: '1' }, 'timeout-s': { type: 'string', default: '600' },
    chromium: { type: 'string', default: '/usr/bin/chromium' }, 'keep-blobs': { type: 'boolean', default: false },
    close: { type: 'string' }, throttle: { type: 'string', default: '1' }, mobile: { type: 'boolean', default: false },
    quota: { type: 'string' },
  },
});

const browser = await launch({ spki: args.spki, chromium: args.chromium, handleSIGTERM: false });
const deadline = Date.now() + Number(args['timeout-s']) * 1000;
let failed = 0;
const running = new Map(); // device name -> {page, dir, lines} until its files are written

function writeState(dir, state, lines, ending = []) {
  writeFileSync(path.join(dir, 'abandoned.json'), JSON.stringify({ abandoned: state.abandoned, page_text: state.page_text }));
  writeFileSync(path.join(dir, 'log.txt'), [...lines, ...state.log, ...ending, `done: ${state.done} error: ${state.error}`].join('\n') + '\n');
}

process.once('SIGTERM', async () => { // a test gave up waiting: leave what each page got to, then end
  const timeout = new Promise((resolve) => setTimeout(resolve, 5000, null));
  await Promise.all([...running.values()].map(async ({ page, dir, lines }) => {
    const state = await Promise.race([pageState(page).catch(() => null), timeout]);
    if (state) writeState(dir, state, lines, [`stopped by SIGTERM at ${new Date().toISOString()} before the page was done`]);
  }));
  process.exit(143); // puppeteer's exit handler kills the browser; closing it here would fail the polls in flight
});

async function runDevice(spec) {
  const [name, files] = spec.split('=');
  const [credPath, shardPath] = files.split(',');
  const dir = path.join(args.out, name);
  mkdirSync(dir, { recursive: true });
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  const throttle = Number(args.throttle);
  if (args.mobile) await emulatePhone(page, { throttle }); // a phone's viewport, user agent and CPU
  else await throttleCpu(page, throttle);
  const lines = collectConsole(page);
  running.set(name, { page, dir, lines });
  if (args.quota) await limitStorage(page, new URL(args.page).origin, Number(args.quota));
  await page.goto(args.page, { waitUntil: 'load' });
  const creds = JSON.parse(readFileSync(credPath, 'utf8'));
  const shardText = readFileSync(shardPath, 'utf8');
  const isolated = await page.evaluate(() => globalThis.crossOriginIsolated);
  lines.push(`crossOriginIsolated: ${isolated}`);
  page.evaluate((o) => window.devftStart(o).catch(() => {}), { creds, shardText, runId: args.run, wsUrl: args.ws, threads: Number(args.threads), prune: !args['keep-blobs'] });
  if (name === args.close) { // a tab closed mid-round: its will must tell the coordinator at once
    await waitInPage(page, () => window.devft.status === 'busy', deadline, 20);
    writeFileSync(path.join(dir, 'closed.json'), JSON.stringify({ closed_unix: Date.now() / 1000 }));
    running.delete(name);
    await page.close();
    await context.close();
    return;
  }
  await waitForDevice(page, deadline);
  const state = await pageState(page);
  await saveRecords(page, state.records, dir, { keepBlobs: args['keep-blobs'] });
  writeState(dir, state, lines);
  running.delete(name);
  if (!state.done) failed += 1;
  await context.close();
}

try {
  await Promise.all(args.device.map(runDevice));
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
