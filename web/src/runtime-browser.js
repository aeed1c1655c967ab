// The browser adapter: onnxruntime-web (WASM; threads when the page is cross-origin isolated), mqtt.js over
// secure WebSockets, crypto.subtle for SHA-256, and blobs in the Cache API (kept across visits, per origin).
import * as ort from 'onnxruntime-web';
import mqtt from 'mqtt';

const hex = (buf) => Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, '0')).join('');
export const sha256Hex = async (bytes) => hex(await crypto.subtle.digest('SHA-256', bytes));

/** Why this browser cannot be a device, or null: a clear message for the page instead of a failure later. */
export function browserProblem() {
  if (!globalThis.isSecureContext) return 'this page must be opened over HTTPS (a secure context): crypto.subtle, the Cache API and WASM threads need it';
  if (typeof WebAssembly !== 'object') return 'this browser has no WebAssembly (turned off, as in Lockdown Mode or a JIT-less security setting); a device needs it to run onnxruntime-web: allow JavaScript optimisation for this site or use another browser';
  if (!globalThis.caches) return 'this browser has no Cache API to keep the model files in';
  return null;
}

export class CacheStore {
  constructor(name = 'devft-blobs') { this.name = name; }

  key(sha) { return new Request(`${location.origin}/devft-blob/${sha}`); }

  async cache() { return caches.open(this.name); }

  async has(sha, size) {
    const r = await (await this.cache()).match(this.key(sha));
    return !!r && (size === undefined || Number(r.headers.get('x-size')) === size);
  }

  async get(sha) {
    const r = await (await this.cache()).match(this.key(sha));
    if (!r) throw new Error(`blob ${sha.slice(0, 12)} is not in the browser cache`);
    return new Uint8Array(await r.arrayBuffer());
  }

  async put(sha, bytes) {
    try {
      await (await this.cache()).put(this.key(sha), new Response(bytes, { headers: { 'x-size': String(bytes.length) } }));
    } catch (e) {
      if (e?.name === 'QuotaExceededError') throw new Error(`the browser's storage quota is exhausted storing ${bytes.length} bytes; free space for this site or use a smaller stage`);
      throw e;
    }
  }

  async verify(sha, size) {
    if (!(await this.has(sha, size))) return false;
    const ok = (await sha256Hex(await this.get(sha))) === sha;
    if (!ok) await (await this.cache()).delete(this.key(sha));
    return ok;
  }

  async prune(keep) {
    const c = await this.cache();
    for (const req of await c.keys()) {
      const sha = req.url.split('/').pop();
      if (!keep.has(sha)) await c.delete(req);
    }
  }
}

/** wsUrl: wss://host:port/ of the fleet's WebSocket gateway; threads: onnxruntime-web threads (1 = no worker threads). */
/**
 * proxy: run onnxruntime-web in its worker, off the page's main thread: building a big stage's session
 * or a long step would otherwise block the page, and with it mqtt.js's keep-alive pings (the broker
 * drops a connection silent for 1.5 x 30 s and publishes the device's will).
 */
/** A platform name as the hello may carry it (docs/protocol.md: 1-64 characters of letters, digits, space, ._,;:()/+-),
 * or undefined when nothing is left. */
export function capabilityText(text) {
  const clean = String(text ?? '').replace(/[^A-Za-z0-9 ._,;:()/+-]/g, '').trim().slice(0, 64);
  return clean || undefined;
}

/** The memory a page offers training, in MiB: half the device's RAM (navigator.deviceMemory, GiB rounded down to a
 * power of two, at most 8): the OS and resident apps hold the rest (an Android phone with 6 GB lets about 3 GB go to
 * one app before its low-memory killer acts), and at most 4096 (a wasm32 memory's limit). Undefined where the
 * browser does not say (Firefox, Safari): the coordinator then samples the page for every stage. */
export function pageBudgetMb(deviceMemoryGiB) {
  return deviceMemoryGiB > 0 ? Math.min(4096, Math.round((deviceMemoryGiB * 1024) / 2)) : undefined;
}

/** Seconds an artifact GET may go without a byte (no answer, or a body that stops) before it is abandoned, as the Node
 * runtime's socket timeout does: fetch() itself never gives up, and a hung origin would freeze the device's loop for
 * good (it would miss even the run's end). fetch.js retries an abandoned GET with backoff. */
export const HTTP_STALL_S = 30;

/** fetch(url) whose every wait (for the answer, then for each piece of its body) is bounded by `stallS` seconds. */
export async function getWithStallTimeout(url, headers, stallS = HTTP_STALL_S) {
  const abort = new AbortController();
  let timer;
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(() => abort.abort(new Error(`no bytes from ${url} for ${stallS} s`)), stallS * 1000);
  };
  arm();
  try {
    const res = await fetch(url, { headers, mode: 'cors', cache: 'no-store', credentials: 'omit', signal: abort.signal });
    const parts = [];
    let size = 0;
    const reader = res.body?.getReader();
    for (;;) {
      if (!reader) break;
      arm();
      const { done, value } = await reader.read();
      if (done) break;
      parts.push(value);
      size += value.length;
    }
    const body = new Uint8Array(size);
    let at = 0;
    for (const part of parts) { body.set(part, at); at += part.length; }
    return { status: res.status, body };
  } finally {
    clearTimeout(timer);
  }
}

export async function browserRuntime({ wsUrl, threads = 1, proxy = true, wasmPaths = '/node_modules/onnxruntime-web/dist/', ramMb, httpStallS = HTTP_STALL_S } = {}) {
  const problem = browserProblem();
  if (problem) throw new Error(problem);
  ort.env.wasm.wasmPaths = wasmPaths;
  ort.env.wasm.numThreads = globalThis.crossOriginIsolated ? threads : 1;
  ort.env.wasm.proxy = proxy;
  const store = new CacheStore();
  const pageId = crypto.getRandomValues(new Uint32Array(2)).join('-');
  return {
    name: `onnxruntime-web ${ort.env.versions.web} (wasm, ${ort.env.wasm.numThreads} thread(s)${proxy ? ', worker' : ''}, ${navigator.userAgent.match(/(Chrome|Firefox|Safari)\/[\d.]+/)?.[0] ?? 'browser'})`,
    ort,
    ortVersion: ort.env.versions.web,
    store,
    sha256: sha256Hex,
    processId: () => pageId,
    cpuTimeS: () => null,
    peakRssBytes: () => null, // a page cannot read its process's RSS (performance.memory is only the JS heap)
    capabilities: () => ({
      platform: capabilityText(navigator.userAgentData?.platform || navigator.platform), runtime: 'onnxruntime-web',
      ram_mb: ramMb ?? pageBudgetMb(navigator.deviceMemory), cores: navigator.hardwareConcurrency || undefined,
      cross_origin_isolated: globalThis.crossOriginIsolated, wasm_threads: ort.env.wasm.numThreads,
    }),
    async openSession(art, graph) {
      const externalData = [];
      for (const [rel, sha] of Object.entries(art.files)) if (rel.startsWith('weights/')) externalData.push({ path: rel, data: await store.get(sha) });
      return ort.InferenceSession.create(await store.get(art.files[graph]), { executionProviders: ['wasm'], externalData });
    },
    /** GET with the browser's fetch (the browser verifies the origin's certificate; CORS: server_sdk/fleet/origin.py),
     * abandoned after `httpStallS` seconds without a byte. */
    httpGet: (url, headers) => getWithStallTimeout(url, headers, httpStallS),
    async connectMqtt(creds, { will, clientId }) {
      const client = mqtt.connect(wsUrl, {
        username: creds.username, password: creds.password, clientId, protocolVersion: 5, clean: false,
        properties: { sessionExpiryInterval: 7 * 24 * 3600 }, keepalive: 30, will, reconnectPeriod: 500,
        connectTimeout: 30_000, resubscribe: false,
        createWebsocket: (url) => { const ws = new WebSocket(url, ['binary']); ws.binaryType = 'arraybuffer'; return ws; },
      });
      await new Promise((resolve, reject) => {
        client.once('connect', resolve);
        client.once('error', (e) => { client.end(true); reject(new Error(`cannot connect to ${wsUrl} as ${creds.username}: ${e.message}`)); });
      });
      return client;
    },
  };
}
