// Debian's headless Chromium (/usr/bin/chromium) through puppeteer-core, no browser download: the one driver the
// browser tests (test/), the benchmark (bench/browser.mjs) and the rig of emulated phones (driver/rig.mjs) share.
import { existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import puppeteer, { KnownDevices } from 'puppeteer-core';

export const CHROMIUM = '/usr/bin/chromium';

/**
 * A headless Chromium. spki: the base64 SHA-256 of the gateway certificate's key (server_sdk.fleet.web_gateway.spki_sha256):
 * the fleet's own CA signs it, so the browser trusts exactly that key and nothing else. userDataDir: a profile
 * directory of its own (storage kept across launches, as a phone keeps it); without one, a fresh temporary profile.
 * A page blocks while it builds a big session, hence the long protocol timeout. handleSIGTERM false: the caller's own
 * SIGTERM handler may still read its pages before it closes the browser.
 */
export async function launch({ spki = '', chromium = CHROMIUM, args = [], userDataDir, protocolTimeout = 3_600_000, handleSIGTERM = true } = {}) {
  return puppeteer.launch({
    executablePath: chromium, headless: true, protocolTimeout, userDataDir, handleSIGTERM,
    args: ['--no-sandbox', '--disable-gpu', ...(spki ? [`--ignore-certificate-errors-spki-list=${spki}`] : []), ...args],
  });
}

/** Slow the page's CPU `rate` times through the DevTools protocol (Emulation.setCPUThrottlingRate); 1 = no throttling. */
export async function throttleCpu(page, rate) {
  if (rate > 1) await (await page.createCDPSession()).send('Emulation.setCPUThrottlingRate', { rate });
}

/** Cap the storage of `origin` at `bytes` (DevTools Storage.overrideQuotaForOrigin): a phone whose storage is full. */
export async function limitStorage(page, origin, bytes) {
  await (await page.createCDPSession()).send('Storage.overrideQuotaForOrigin', { origin, quotaSize: bytes });
}

/** A phone's viewport, pixel ratio, touch and user agent (puppeteer's KnownDevices, e.g. 'Pixel 5'), and its CPU. */
export async function emulatePhone(page, { profile = 'Pixel 5', throttle = 1 } = {}) {
  const device = KnownDevices[profile];
  if (!device) throw new Error(`unknown phone profile ${JSON.stringify(profile)}; puppeteer knows e.g. 'Pixel 5', 'Galaxy S9+', 'iPhone 13'`);
  await page.emulate(device);
  await throttleCpu(page, throttle);
  return { profile, viewport: device.viewport, user_agent: device.userAgent, cpu_throttle: throttle };
}

/** Every console line and uncaught error of a page, in order (for a device's log file). */
export function collectConsole(page) {
  const lines = [];
  page.on('console', (m) => lines.push(`console: ${m.text()}`));
  page.on('pageerror', (e) => lines.push(`pageerror: ${e.message}`));
  return lines;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Poll `fn` (evaluated in the page) every `everyMs` until it returns something truthy or `deadline` (ms since epoch). */
export async function waitInPage(page, fn, deadline, everyMs = 500) {
  let got;
  while (Date.now() < deadline) {
    got = await page.evaluate(fn);
    if (got) return got;
    await sleep(everyMs);
  }
  return got;
}

/** What the device page (app/main.js) shows: its state line, status, error, log, records, and what it enrolled as. */
export async function pageState(page) {
  return page.evaluate(() => ({
    status: window.devft?.status ?? null, error: window.devft?.error ?? null, done: !!window.devft?.done,
    enrolled: window.devft?.enrolled ?? null, log: window.devft?.log ?? [], records: window.devft?.records ?? [],
    abandoned: window.devft?.abandoned ?? [], address: location.href, page_text: document.getElementById('state')?.textContent ?? '',
    stored_user: JSON.parse(localStorage.getItem('devft-device') || 'null')?.creds?.username ?? null,
  }));
}

/** A device page until its run is done or it failed (state.error), or until `deadline`. */
export async function waitForDevice(page, deadline) {
  return waitInPage(page, () => window.devft?.done || window.devft?.error, deadline);
}

/**
 * Each recorded round of a page as DIR/round-<r>.{json,global,update} (as node-device.mjs --record writes them);
 * keepBlobs also copies the files each round trained on to DIR/blobs/<sha256> (each once), for replays.
 */
export async function saveRecords(page, records, dir, { keepBlobs = false } = {}) {
  for (const r of records) {
    const base = path.join(dir, `round-${r.control.round}`);
    writeFileSync(`${base}.json`, JSON.stringify({ control: r.control, losses: r.losses, draws: r.draws }));
    writeFileSync(`${base}.global`, Buffer.from(r.global, 'base64'));
    writeFileSync(`${base}.update`, Buffer.from(r.update, 'base64'));
    if (!keepBlobs) continue;
    mkdirSync(path.join(dir, 'blobs'), { recursive: true });
    for (const f of r.control.artifacts.onnx.files) {
      const blob = path.join(dir, 'blobs', f.sha256);
      if (existsSync(blob)) continue; // rounds of a stage share their files
      writeFileSync(blob, Buffer.from(await page.evaluate((sha) => window.devftBlob(sha), f.sha256), 'base64'));
    }
  }
}

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

/** The highest VmHWM among a browser's renderer processes (the page and its WASM workers): a page cannot read it. */
export function rendererPeakBytes(browser) {
  let peak = 0;
  for (const pid of descendants(browser.process().pid)) {
    try {
      if (!readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('--type=renderer')) continue;
      const m = readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmHWM:\s+(\d+) kB/);
      if (m) peak = Math.max(peak, Number(m[1]) * 1024);
    } catch { /* gone */ }
  }
  return peak;
}
