// Artifact files over MQTT chunk requests (protocol.md section 5), into a content-addressed store.
import { encodeChunkRequest, topics, MAX_CHUNKS_PER_REQUEST } from './protocol.js';

export class FetchCancelled extends Error {}

/**
 * Fetches files by sha256 through `bus` (subscribe/unsubscribe/publish over one MQTT connection) into `store`.
 * Every chunk is checked against its hash and length, every file against its sha256 and size; nothing
 * unverified reaches the store.
 */
export class Fetcher {
  constructor({ bus, store, sha256, runId, deviceId, window = 16, chunkTimeoutS = 10, maxRetries = 5 }) {
    Object.assign(this, { bus, store, sha256, runId, deviceId, window, chunkTimeoutS, maxRetries });
    this.bytesDownloaded = 0;
  }

  /** Make every file of a descriptor present in the store, `filesAtOnce` at a time; `cancelled()` stops it. */
  async fetchAll(descriptor, { filesAtOnce = 4, cancelled = () => false } = {}) {
    const unique = new Map(descriptor.files.map((f) => [f.sha256, f]));
    const missing = [];
    for (const f of unique.values()) if (!(await this.store.has(f.sha256, f.size))) missing.push(f);
    const queue = [...missing];
    const worker = async () => { while (queue.length) await this.fetchFile(queue.shift(), cancelled); };
    await Promise.all(Array.from({ length: Math.min(filesAtOnce, queue.length) }, worker));
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
