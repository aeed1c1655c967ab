"""Deconfliction-guided layer grouping (DEVFT §3.2) and its ablations.

Layers whose effective weights point the same way conflict least when fused, so we
cluster the cosine-similarity graph of layers (`similarity.layer_similarity`) spectrally
into as many groups as the stage has layers. `random` and `sequential` sit behind the
same interface: `GROUPINGS` maps each config name to its rule, so a new grouping is one
function registered there plus its test.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.cluster.vq
import scipy.linalg

Groups = list[list[int]]
GroupingRule = Callable[[np.ndarray, int, int], Groups]  # (similarity, k, seed) -> k groups


def spectral_groups(similarity: np.ndarray, k: int, seed: int = 0, restarts: int = 10) -> Groups:
    """Normalised spectral clustering of the layer graph into exactly k non-empty groups."""
    n = similarity.shape[0]
    _check_k(n, k)
    if k == n:
        return [[i] for i in range(n)]
    affinity = np.clip(similarity, 0.0, None)
    np.fill_diagonal(affinity, 0.0)
    degree = affinity.sum(axis=1)
    d_inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1e-12))
    laplacian = np.eye(n) - d_inv_sqrt[:, None] * affinity * d_inv_sqrt[None, :]
    _, vecs = scipy.linalg.eigh(laplacian, subset_by_index=[0, k - 1])
    emb = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    best_labels, best_cost = None, np.inf
    rng = np.random.default_rng(seed)
    for _ in range(restarts):
        centroids, labels = scipy.cluster.vq.kmeans2(emb, k, minit="++", seed=rng.integers(2**31), iter=50)
        cost = float(((emb - centroids[labels]) ** 2).sum())
        if cost < best_cost:
            best_cost, best_labels = cost, labels
    return _repair(best_labels, emb, k)


def _repair(labels: np.ndarray, emb: np.ndarray, k: int) -> Groups:
    """Make exactly k non-empty groups: while one is empty, move the member of the largest
    group that lies farthest from its group's centroid into it (deterministic)."""
    groups = [sorted(np.flatnonzero(labels == c).tolist()) for c in range(k)]
    while any(not g for g in groups):
        empty = next(i for i, g in enumerate(groups) if not g)
        big = max(range(k), key=lambda i: (len(groups[i]), -i))
        members = groups[big]
        centroid = emb[members].mean(axis=0)
        far = max(members, key=lambda m: (float(((emb[m] - centroid) ** 2).sum()), m))
        members.remove(far)
        groups[empty] = [far]
    return sort_groups(groups)


def random_groups(n: int, k: int, seed: int = 0) -> Groups:
    """Ablation: a seeded random partition into k non-empty groups."""
    _check_k(n, k)
    perm = np.random.default_rng(seed).permutation(n)
    return sort_groups([sorted(int(x) for x in chunk) for chunk in np.array_split(perm, k)])


def sequential_groups(n: int, k: int) -> Groups:
    """Ablation: k contiguous blocks of layers, as even as possible."""
    _check_k(n, k)
    return [[int(x) for x in chunk] for chunk in np.array_split(np.arange(n), k)]


def first_last_groups(n: int, k: int) -> Groups:
    """The first k-1 layers alone, then one group of every other layer (with the `last` anchor and
    `select` fusion: a submodel of the first k-1 layers plus the last one, the contiguous layers
    that layer-pruning studies find keep a model's output closest; issue #12)."""
    _check_k(n, k)
    return [[i] for i in range(k - 1)] + [list(range(k - 1, n))]


def sort_groups(groups: Groups) -> Groups:
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])


GROUPINGS: dict[str, GroupingRule] = {
    "deconfliction": lambda similarity, k, seed: spectral_groups(similarity, k, seed=seed),
    "random": lambda similarity, k, seed: random_groups(similarity.shape[0], k, seed=seed),
    "sequential": lambda similarity, k, seed: sequential_groups(similarity.shape[0], k),
    "first-last": lambda similarity, k, seed: first_last_groups(similarity.shape[0], k),
}


def make_groups(method: str, similarity: np.ndarray, k: int, seed: int) -> Groups:
    """Split the layers of `similarity` into k groups with the rule registered as `method`."""
    if method not in GROUPINGS:
        raise ValueError(f"unknown grouping method {method!r}; use one of {list(GROUPINGS)}")
    return GROUPINGS[method](similarity, k, seed)


def _check_k(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} layers into {k} groups; need 1 <= k <= {n}")
