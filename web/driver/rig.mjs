// The rig of emulated phones (`devft rig` runs it): each device's join link in a headless Chromium of its own, with
// its own profile directory (storage kept as a phone keeps it), a phone's viewport, touch and user agent, and its
// CPU slowed through the DevTools protocol; each page is watched until its run is done.
//   node driver/rig.mjs --spki B64 --out DIR --profiles DIR --device NAME=URL [--device ...]
//        [--phone 'Pixel 5'] [--throttle 4] [--timeout-s 3600]
// Writes DIR/<NAME>.json: what the rig saw from outside (kind "emulated", the phone profile, CPU throttling, the
// renderer's peak RSS, which a page cannot read) and what the page did (each round's losses, rounds it gave up,
// its error, the end of its log). Exit code 0 when every page saw its run end.
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { collectConsole, emulatePhone, launch, rendererPeakBytes, waitForDevice } from './chromium.mjs';

const { values: a } = parseArgs({ options: {
  spki: { type: 'string', default: '' }, out: { type: 'string' }, profiles: { type: 'string' }, device: { type: 'string', multiple: true },
  phone: { type: 'string', default: 'Pixel 5' }, throttle: { type: 'string', default: '4' }, 'timeout-s': { type: 'string', default: '3600' },
  chromium: { type: 'string', default: '/usr/bin/chromium' },
} });
const deadline = Date.now() + Number(a['timeout-s']) * 1000;
mkdirSync(a.out, { recursive: true });

async function phone(spec) {
  const name = spec.slice(0, spec.indexOf('='));
  const url = spec.slice(spec.indexOf('=') + 1);
  const userDataDir = path.join(a.profiles, name);
  mkdirSync(userDataDir, { recursive: true });
  const t0 = Date.now();
  const browser = await launch({ spki: a.spki, chromium: a.chromium, userDataDir });
  const out = { device: name, kind: 'emulated', measured: false, chromium: await browser.version(), profile_dir: userDataDir };
  let lines = [];
  try {
    const page = (await browser.pages())[0] ?? await browser.newPage();
    Object.assign(out, await emulatePhone(page, { profile: a.phone, throttle: Number(a.throttle) }));
    lines = collectConsole(page);
    // DevTools throttling slows a page's own thread and no worker (Chromium refuses it for workers), so a throttled
    // phone trains on the page's thread with one WASM thread: onnxruntime-web's worker would run at full speed
    out.trains_on_page_thread = Number(a.throttle) > 1;
    if (out.trains_on_page_thread) await page.evaluateOnNewDocument(() => { window.devftOptions = { proxy: false, threads: 1 }; });
    await page.goto(url, { waitUntil: 'load' });
    await waitForDevice(page, deadline);
    Object.assign(out, await page.evaluate(() => ({
      done: !!window.devft.done, error: window.devft.error, page_text: document.getElementById('state').textContent,
      enrolled: window.devft.enrolled ?? null, given_up: window.devft.abandoned ?? [], log_tail: window.devft.log.slice(-20),
      rounds: window.devft.records.map((r) => ({ stage: r.control.stage, round: r.control.round, losses: r.losses })),
      hardware_concurrency: navigator.hardwareConcurrency, cross_origin_isolated: globalThis.crossOriginIsolated,
      runtime: window.devft.runtime ?? null,
    })));
    out.renderer_peak_rss_bytes = rendererPeakBytes(browser);
  } catch (e) {
    out.error = out.error ?? e.message;
  } finally {
    out.wall_s = (Date.now() - t0) / 1000;
    out.console_tail = lines.slice(-20);
    await browser.close();
  }
  writeFileSync(path.join(a.out, `${name}.json`), JSON.stringify(out, null, 1));
  return out.done === true;
}

const ok = await Promise.all(a.device.map(phone));
process.exit(ok.every(Boolean) ? 0 : 1);
