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

const browser = await launch({ spki: args.spki, chromium: args.chromium });
const deadline = Date.now() + Number(args['timeout-s']) * 1000;
let failed = 0;

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
    await page.close();
    await context.close();
    return;
  }
  await waitForDevice(page, deadline);
  const state = await pageState(page);
  await saveRecords(page, state.records, dir, { keepBlobs: args['keep-blobs'] });
  writeFileSync(path.join(dir, 'abandoned.json'), JSON.stringify({ abandoned: state.abandoned, page_text: state.page_text }));
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
