// The Node adapter: onnxruntime-node (or onnxruntime-web's WASM build, for comparisons), mqtt.js over
// TLS with the fleet's CA, node:crypto, and blobs as files under <cache>/blobs/<sha256>.
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { availableParallelism, freemem } from 'node:os';
import https from 'node:https';
import path from 'node:path';
import mqtt from 'mqtt';

export class FileStore {
  constructor(root) {
    this.root = root;
    this.blobs = path.join(root, 'blobs');
  }

  blobPath(sha) { return path.join(this.blobs, sha); }

  async has(sha, size) {
    try { const st = await fs.stat(this.blobPath(sha)); return size === undefined || st.size === size; } catch { return false; }
  }

  async get(sha) { return new Uint8Array(await fs.readFile(this.blobPath(sha))); }

  async put(sha, bytes) {
    await fs.mkdir(this.blobs, { recursive: true });
    const tmp = `${this.blobPath(sha)}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`; // concurrent puts of one blob
    await fs.writeFile(tmp, bytes);
    await fs.rename(tmp, this.blobPath(sha));
  }

  /** True when the blob hashes to its name and has `size` bytes; a rotten blob is deleted (fetched again). */
  async verify(sha, size) {
    if (!(await this.has(sha, size))) return false;
    const ok = sha256Hex(await this.get(sha)) === sha;
    if (!ok) await fs.rm(this.blobPath(sha), { force: true });
    return ok;
  }

  async prune(keep) {
    let names = [];
    try { names = await fs.readdir(this.blobs); } catch { return; }
    for (const n of names) if (/^[0-9a-f]{64}$/.test(n) && !keep.has(n)) await fs.rm(path.join(this.blobs, n), { force: true });
  }

  /** The artifact laid out as files (hard links to the blobs) so that onnxruntime finds the external weights. */
  async materialize(art) {
    const dir = path.join(this.root, 'stages', art.artifactId);
    await fs.rm(dir, { recursive: true, force: true });
    const files = art.manifestSha ? { ...art.files, 'manifest.json': art.manifestSha } : art.files;
    for (const [rel, sha] of Object.entries(files)) {
      const dest = path.join(dir, rel);
      await fs.mkdir(path.dirname(dest), { recursive: true });
      try { await fs.link(this.blobPath(sha), dest); } catch { await fs.copyFile(this.blobPath(sha), dest); }
    }
    return dir;
  }
}

export function sha256Hex(bytes) { return createHash('sha256').update(bytes).digest('hex'); }

/** onnxruntime session options shared by both node engines: one thread, no arena, no prepacking or folding (as devft-edge). */
function sessionOptions(threads) {
  return {
    executionProviders: ['cpu'], intraOpNumThreads: threads, interOpNumThreads: 1, enableCpuMemArena: false,
    graphOptimizationLevel: 'all', executionMode: 'sequential',
    extra: { session: { disable_prepacking: '1' }, optimization: { disable_specified_optimizers: 'ConstantFolding' } },
  };
}

/**
 * engine: 'node' (onnxruntime-node, native) or 'web' (onnxruntime-web's WASM in Node: the browser's numerics).
 * host/port override the credentials' broker address.
 */
export async function nodeRuntime({ cacheDir, engine = 'node', host, port, ramMb } = {}) {
  const ort = engine === 'web' ? await import('onnxruntime-web') : (await import('onnxruntime-node')).default;
  if (engine === 'web') { ort.env.wasm.numThreads = 1; }
  const store = new FileStore(cacheDir);
  const version = engine === 'web' ? ort.env.versions.web : ort.env.versions.node;
  return {
    name: `onnxruntime-${engine} ${version} (node ${process.versions.node})`,
    ort,
    ortVersion: version,
    store,
    sha256: async (bytes) => sha256Hex(bytes),
    processId: () => process.pid,
    cpuTimeS: () => { const u = process.cpuUsage(); return (u.user + u.system) / 1e6; },
    peakRssBytes: () => process.resourceUsage().maxRSS * 1024,
    // ram_mb: the memory this device offers training (the coordinator samples it only for stages whose need fits):
    // ramMb (--ram-mb) if given, else what the OS can give a process now (os.freemem: MemAvailable on Linux; totalmem
    // also counts the OS and every other program), as devft-edge declares it
    capabilities: () => ({ platform: `node-${process.platform}-${process.arch}`, runtime: `onnxruntime-${engine}`,
      ram_mb: ramMb ?? Math.max(1, Math.floor(freemem() / 2 ** 20)), cores: Math.max(1, availableParallelism()) }),
    async openSession(art, graph, threads) {
      if (engine === 'web') {
        const externalData = [];
        for (const [rel, sha] of Object.entries(art.files)) if (rel.startsWith('weights/')) externalData.push({ path: rel, data: await this.store.get(sha) });
        return ort.InferenceSession.create(await this.store.get(art.files[graph]), { executionProviders: ['wasm'], externalData });
      }
      const dir = await this.store.materialize(art);
      return ort.InferenceSession.create(path.join(dir, graph), sessionOptions(threads));
    },
    /** GET over TLS verified with the fleet CA (`ca`): {status, body}. An artifact origin (fetch.js). */
    httpGet(url, headers, ca) {
      return new Promise((resolve, reject) => {
        const req = https.get(url, { headers, ca, rejectUnauthorized: true, timeout: 30_000 }, (res) => {
          const parts = [];
          res.on('data', (d) => parts.push(d));
          res.on('end', () => resolve({ status: res.statusCode, body: new Uint8Array(Buffer.concat(parts)) }));
          res.on('error', reject);
        });
        req.on('timeout', () => req.destroy(new Error('timed out')));
        req.on('error', reject);
      });
    },
    async connectMqtt(creds, { will, clientId }) {
      const client = mqtt.connect({
        protocol: 'mqtts', host: host ?? creds.host, port: port ?? creds.port, ca: creds.ca_pem, servername: host ?? creds.host,
        rejectUnauthorized: true, username: creds.username, password: creds.password, clientId, protocolVersion: 5,
        clean: false, properties: { sessionExpiryInterval: 7 * 24 * 3600 }, keepalive: 30, will,
        reconnectPeriod: 500, connectTimeout: 30_000, resubscribe: false,
      });
      client.on('connect', () => client.stream?.setNoDelay?.(true)); // TCP_NODELAY: no 40 ms delayed-ACK waits
      await new Promise((resolve, reject) => {
        client.once('connect', resolve);
        client.once('error', (e) => { client.end(true); reject(new Error(`cannot connect to the broker as ${creds.username}: ${e.message}`)); });
      });
      return client;
    },
  };
}
