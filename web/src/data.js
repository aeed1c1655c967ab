// From shard lines to tensors (docs/device-client.md section 5).
import { Tokenizer } from '@huggingface/tokenizers';

export const IGNORE_INDEX = -100;

/** Parse a JSONL shard: one {prompt, completion} per non-empty line. */
export function readShard(text, name = 'shard') {
  const out = [];
  text.split('\n').forEach((line, i) => {
    if (!line.trim()) return;
    let rec;
    try { rec = JSON.parse(line); } catch (e) { throw new Error(`${name}:${i + 1}: not JSON (${e.message}); a shard line needs prompt and completion`); }
    if (typeof rec?.prompt !== 'string' || typeof rec?.completion !== 'string') {
      throw new Error(`${name}:${i + 1}: not a devft example record; it needs prompt and completion strings`);
    }
    out.push(rec);
  });
  if (!out.length) throw new Error(`${name} holds no examples; a device needs a non-empty shard`);
  return out;
}

export function loadTokenizer(jsonText) {
  return new Tokenizer(JSON.parse(jsonText), {});
}

/** [ids, labels] per example: prompt and completion tokenised without special tokens, prompt masked, truncated. */
export function encodeShard(tokenizer, shard, seqLen) {
  return shard.map(({ prompt, completion }) => {
    const p = tokenizer.encode(prompt, { add_special_tokens: false }).ids;
    const c = tokenizer.encode(completion, { add_special_tokens: false }).ids;
    const ids = [...p, ...c].slice(0, seqLen);
    const labels = [...p.map(() => IGNORE_INDEX), ...c].slice(0, seqLen);
    return [ids, labels];
  });
}

/** Right-padded int64 [B, T] input_ids and labels (BigInt64Array) of the examples in draw order. */
export function collate(examples, padId) {
  const width = Math.max(...examples.map(([ids]) => ids.length));
  const ids = new BigInt64Array(examples.length * width).fill(BigInt(padId));
  const labels = new BigInt64Array(examples.length * width).fill(BigInt(IGNORE_INDEX));
  examples.forEach(([x, y], r) => {
    x.forEach((v, c) => { ids[r * width + c] = BigInt(v); });
    y.forEach((v, c) => { labels[r * width + c] = BigInt(v); });
  });
  return { ids, labels, dims: [examples.length, width] };
}

/** True when some label after the first position is a target (else the batch is skipped). */
export function hasTargets(labels, dims) {
  const [b, t] = dims;
  for (let r = 0; r < b; r++) for (let c = 1; c < t; c++) if (labels[r * t + c] !== BigInt(IGNORE_INDEX)) return true;
  return false;
}

/** Supervised positions of rows [r0, r1) of a batch: labels after the first position that are not -100. */
export function targetCount(labels, dims, r0 = 0, r1 = dims[0]) {
  const t = dims[1];
  let n = 0;
  for (let r = r0; r < r1; r++) for (let c = 1; c < t; c++) if (labels[r * t + c] !== BigInt(IGNORE_INDEX)) n += 1;
  return n;
}

/** The pad id: pad_token_id, else eos_token_id, else bos_token_id (first of a list), else 0. */
export function padId(config = {}) {
  for (const key of ['pad_token_id', 'eos_token_id', 'bos_token_id']) {
    let v = config[key];
    if (Array.isArray(v)) v = v.length ? v[0] : null;
    if (Number.isInteger(v)) return v;
  }
  return 0;
}
