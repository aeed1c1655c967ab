// The batch sampler of the device contract (docs/device-client.md section 4): SplitMix64 feeding a
// partial Fisher-Yates shuffle, in unsigned 64-bit arithmetic (BigInt, wrapped with asUintN).

const MASK = (x) => BigInt.asUintN(64, x);
const GAMMA = 0x9E3779B97F4A7C15n;

export class SplitMix64 {
  constructor(seed) {
    if (!Number.isSafeInteger(Number(seed)) || Number(seed) < 0) throw new Error(`seed must be an integer in [0, 2^53), got ${seed}`);
    this.state = MASK(BigInt(seed));
  }

  next() {
    this.state = MASK(this.state + GAMMA);
    let z = this.state;
    z = MASK((z ^ (z >> 30n)) * 0xBF58476D1CE4E5B9n);
    z = MASK((z ^ (z >> 27n)) * 0x94D049BB133111EBn);
    return z ^ (z >> 31n);
  }
}

/** k distinct indices of 0..n-1, in draw order: the first k places of a Fisher-Yates shuffle. */
export function drawBatch(rng, n, k) {
  if (!(k > 0 && k <= n)) throw new Error(`cannot draw ${k} distinct examples of ${n}`);
  const a = Array.from({ length: n }, (_, i) => i);
  for (let i = 0; i < k; i++) {
    const j = i + Number(rng.next() % BigInt(n - i));
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a.slice(0, k);
}

/** The example indices of a round's `steps` batches, one stream seeded once. */
export function roundDraws(seed, n, batchSize, steps) {
  const rng = new SplitMix64(seed);
  const out = [];
  for (let s = 0; s < steps; s++) out.push(drawBatch(rng, n, Math.min(batchSize, n)));
  return out;
}
