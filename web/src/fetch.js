// Artifact files over MQTT chunk requests (protocol.md section 5), or from the descriptor's HTTPS `origin`, into a
// content-addressed store.
import { encodeChunkRequest, topics, MAX_CHUNKS_PER_REQUEST } from './protocol.js';

export class FetchCancelled extends Error {}

/**
 * Fetches files by sha256 through `bus` (subscribe/unsubscribe/publish over one MQTT connection) into `store`.
 * Every chunk is checked against its hash and length, every file against its sha256 and size; nothing
 * unverified reaches the store.
 */
export class Fetcher {
  /**
   * httpGet(url, headers, ca) -> {status, body: Uint8Array} (the runtime's) and login {username, password, ca} let it
   * download from a descriptor's `origin` (protocol.md section 5) with the device's own fleet login; without them
   * it fetches MQTT chunks, which the coordinator always serves too.
   */
  constructor({ bus, store, sha256, runId, deviceId, window = 16, chunkTimeoutS = 10, maxRetries = 5, httpGet = null, login = null, backoffS = 0.5 }) {
    Object.assign(this, { bus, store, sha256, runId, deviceId, window, chunkTimeoutS, maxRetries, httpGet, login, backoffS });
    this.bytesDownloaded = 0;
  }

  /** Make every file of a descriptor present in the store, `filesAtOnce` at a time; `cancelled()` stops it. */
  async fetchAll(descriptor, { filesAtOnce = 4, cancelled = () => false } = {}) {
    const unique = new Map(descriptor.files.map((f) => [f.sha256, f]));
    const missing = [];
    for (const f of unique.values()) if (!(await this.store.has(f.sha256, f.size))) missing.push(f);
    const queue = [...missing];
    const https = descriptor.origin && this.httpGet && this.login;
    let failed = false;
    const stop = () => failed || cancelled();
    const worker = async () => {
      while (queue.length && !stop()) {
        const entry = queue.shift();
        try {
          await (https ? this.fetchHttps(descriptor.origin, entry, stop) : this.fetchFile(entry, stop));
        } catch (e) {
          failed = true; // the other workers stop too
          throw e;
        }
      }
      if (cancelled()) throw new FetchCancelled(`fetch of ${descriptor.artifact_id.slice(0, 12)} cancelled`);
    };
    // every worker has ended (its subscriptions and writes done) before this returns or throws: a fetch that starts
    // next (the stage after a cancelled prefetch) never races one still winding down
    const results = await Promise.allSettled(Array.from({ length: Math.min(filesAtOnce, queue.length) }, worker));
    const first = results.find((r) => r.status === 'rejected' && !(r.reason instanceof FetchCancelled))
      ?? results.find((r) => r.status === 'rejected');
    if (first) throw first.reason;
  }

  /**
   * One file from `origin + sha256`: every chunk checked against its hash, the file against its sha256, as for MQTT
   * chunks. 401/403 (not enrolled, wrong login) are final; bytes failing their hash twice refuse the file; network
   * errors and other answers are retried with exponential backoff and jitter, maxRetries times in a row.
   */
  async fetchHttps(origin, entry, cancelled = () => false) {
    if (await this.store.has(entry.sha256, entry.size)) return;
    const url = origin + entry.sha256;
    const auth = 'Basic ' + btoa(`${this.login.username}:${this.login.password}`); // fleet logins are ASCII
    let failures = 0, corrupt = 0;
    for (;;) {
      if (cancelled()) throw new FetchCancelled(`fetch of ${entry.path} cancelled`);
      let res = null, why = null;
      try {
        res = await this.httpGet(url, { Authorization: auth }, this.login.ca);
      } catch (e) {
        why = e.message;
      }
      if (res && (res.status === 401 || res.status === 403)) {
        throw new Error(`${entry.path}: the artifact origin refused this device: HTTP ${res.status} for ${url} as ${this.login.username} (a device fetches only while it is enrolled in the run, with its own fleet login)`);
      }
      if (res && res.status === 200 && res.body.length === entry.size) {
        this.bytesDownloaded += res.body.length;
        const bad = await this.firstBadChunk(entry, res.body);
        if (bad === null && (await this.sha256(res.body)) === entry.sha256) {
          await this.store.put(entry.sha256, res.body);
          return;
        }
        corrupt += 1;
        const detail = bad === null ? 'the file does not hash to its name' : `chunk ${bad} does not hash to the descriptor's`;
        if (corrupt >= 2) throw new Error(`${entry.path}: refused the file served at ${url}: ${detail}; the origin's copy is corrupt or was tampered with`);
        continue;
      }
      why = why ?? (res ? `HTTP ${res.status}, ${res.body.length} of ${entry.size} bytes` : 'no answer');
      failures += 1;
      if (failures > this.maxRetries) throw new Error(`${entry.path} (${entry.sha256.slice(0, 12)}): ${url} failed ${failures} times in a row (${why}) - is the origin up?`);
      await new Promise((resolve) => setTimeout(resolve, this.backoffS * 1000 * 2 ** (failures - 1) * (0.5 + Math.random())));
    }
  }

  async firstBadChunk(entry, bytes) {
    for (let i = 0; i < entry.chunks.length; i++) {
      const part = bytes.subarray(i * entry.chunk_size, Math.min(entry.size, (i + 1) * entry.chunk_size));
      if ((await this.sha256(part)) !== entry.chunks[i]) return i;
    }
    return null;
  }

  async fetchFile(entry, cancelled = () => false) {
    if (await this.store.has(entry.sha256, entry.size)) return;
    const total = entry.chunks.length;
    const got = new Map();
    const filter = `devft/${this.runId}/artifacts/${entry.sha256}/+`;
    let wake = null;
    const inbox = [];
    const onChunk = (topic, payload) => { inbox.push([topic, payload]); if (wake) wake(); };
    await this.bus.subscribe(filter, onChunk);
    try {
      const toRequest = Array.from({ length: total }, (_, i) => i);
      const outstanding = new Set();
      let retries = 0, lastProgress = Date.now();
      while (got.size < total) {
        if (cancelled()) throw new FetchCancelled(`fetch of ${entry.path} cancelled with ${total - got.size}/${total} chunks missing`);
        const want = [];
        while (toRequest.length && outstanding.size + want.length < this.window) {
          const i = toRequest.shift();
          if (!got.has(i) && !outstanding.has(i)) want.push(i);
        }
        for (let s = 0; s < want.length; s += MAX_CHUNKS_PER_REQUEST) {
          const part = want.slice(s, s + MAX_CHUNKS_PER_REQUEST);
          this.bus.publish(topics.fetch(this.runId, this.deviceId), encodeChunkRequest(this.runId, this.deviceId, entry.sha256, part));
          part.forEach((i) => outstanding.add(i));
        }
        if (!inbox.length) await new Promise((resolve) => { wake = resolve; setTimeout(resolve, 200); });
        wake = null;
        while (inbox.length) {
          const [topic, payload] = inbox.shift();
          const index = Number(topic.slice(topic.lastIndexOf('/') + 1));
          if (!Number.isInteger(index) || index < 0 || index >= total || got.has(index)) continue; // not ours, or a duplicate
          const length = Math.min(entry.size, (index + 1) * entry.chunk_size) - index * entry.chunk_size;
          if (payload.length !== length || (await this.sha256(payload)) !== entry.chunks[index]) continue; // a bad chunk is asked again
          got.set(index, payload);
          outstanding.delete(index);
          this.bytesDownloaded += payload.length;
          retries = 0;
          lastProgress = Date.now();
        }
        if (Date.now() - lastProgress > this.chunkTimeoutS * 1000) {
          retries += 1;
          if (retries > this.maxRetries) {
            throw new Error(`no chunks of ${entry.path} (${entry.sha256.slice(0, 12)}) arrived for ${this.chunkTimeoutS}s, ${this.maxRetries} times; ${total - got.size}/${total} chunks missing`);
          }
          for (const i of outstanding) toRequest.push(i);
          outstanding.clear();
          lastProgress = Date.now();
        }
      }
    } finally {
      await this.bus.unsubscribe(filter, onChunk);
    }
    const bytes = new Uint8Array(entry.size);
    for (let i = 0; i < total; i++) bytes.set(got.get(i), i * entry.chunk_size);
    if ((await this.sha256(bytes)) !== entry.sha256) throw new Error(`${entry.path}: assembled file does not hash to ${entry.sha256}`);
    await this.store.put(entry.sha256, bytes);
  }
}
