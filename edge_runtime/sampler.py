"""The batch sampler of the device contract: SplitMix64 and a partial Fisher-Yates shuffle.

Every device and every simulated client draws its round's batches with it, so a device in any
language reproduces them from docs/device-client.md section 4 (a dozen lines of 64-bit integer
arithmetic) instead of re-implementing numpy's Generator.choice. Protocol version 3; version 2
drew with numpy.random.default_rng(seed).choice(n, k, replace=False). Pure Python, no numpy.
"""

from __future__ import annotations

from collections.abc import Iterator

MASK64 = (1 << 64) - 1
NAME = "splitmix64-fisher-yates"  # part of every benchmark's cache key: the draws decide every number
GOLDEN_GAMMA = 0x9E3779B97F4A7C15


class SplitMix64:
    """Steele, Lea and Flood's SplitMix64 (the JDK's SplittableRandom mixer): one uint64 per call."""

    def __init__(self, seed: int) -> None:
        if not 0 <= seed <= MASK64:
            raise ValueError(f"seed must be an unsigned 64-bit integer, got {seed}")
        self.state = seed

    def next(self) -> int:
        self.state = (self.state + GOLDEN_GAMMA) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)


def draw_batch(rng: SplitMix64, n: int, k: int) -> list[int]:
    """k distinct indices of 0..n-1: the first k places of a Fisher-Yates shuffle of 0..n-1.

    `next() % (n - i)` has a bias of at most n / 2^64, far below anything a shard size can show,
    and keeps the rule one line in every language (unsigned 64-bit remainder)."""
    if not 0 < k <= n:
        raise ValueError(f"cannot draw {k} distinct examples of {n}")
    a = list(range(n))
    for i in range(k):
        j = i + rng.next() % (n - i)
        a[i], a[j] = a[j], a[i]
    return a[:k]


def round_draws(seed: int, n: int, batch_size: int, steps: int) -> Iterator[list[int]]:
    """The example indices of each of a round's `steps` batches: min(batch_size, n) distinct ones per
    batch, from one SplitMix64 stream seeded with the device's seed and used across the round."""
    rng = SplitMix64(seed)
    for _ in range(steps):
        yield draw_batch(rng, n, min(batch_size, n))
