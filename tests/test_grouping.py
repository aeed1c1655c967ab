import numpy as np
import pytest
import torch

from server_sdk.engine.model import tiny_random_model
from server_sdk.method.grouping import random_groups, sequential_groups, spectral_groups
from server_sdk.method.similarity import layer_similarity


def _is_partition(groups, n, k):
    flat = sorted(i for g in groups for i in g)
    return flat == list(range(n)) and len(groups) == k and all(groups)


def test_spectral_recovers_planted_layer_clusters():
    base = tiny_random_model(n_layers=9, hidden=32, seed=1)
    planted = [[0, 4, 8], [1, 2, 6], [3, 5, 7]]
    layers = base.model.model.layers
    torch.manual_seed(0)
    with torch.no_grad():
        for cluster in planted:
            centre = {n: torch.randn_like(p) for n, p in layers[cluster[0]].named_parameters()}
            for i in cluster:
                for n, p in layers[i].named_parameters():
                    p.copy_(centre[n] + 0.3 * torch.randn_like(p))
    sim = layer_similarity(base.model)
    assert sim.shape == (9, 9) and np.allclose(np.diag(sim), 1.0)
    groups = spectral_groups(sim, 3, seed=0)
    assert sorted(groups) == sorted(planted)


def test_spectral_gives_exactly_k_nonempty_groups_even_when_kmeans_collapses():
    sim = np.ones((8, 8))  # every layer identical: k-means would put all in one cluster
    for k in (1, 3, 5, 8):
        groups = spectral_groups(sim, k, seed=0)
        assert _is_partition(groups, 8, k)
    assert spectral_groups(sim, 3, seed=0) == spectral_groups(sim, 3, seed=0)  # deterministic


@pytest.mark.parametrize("k", [1, 2, 5, 7])
def test_random_and_sequential_are_valid_partitions(k):
    r = random_groups(7, k, seed=3)
    s = sequential_groups(7, k)
    assert _is_partition(r, 7, k) and _is_partition(s, 7, k)
    assert all(g == list(range(g[0], g[-1] + 1)) for g in s)  # contiguous blocks
    assert random_groups(7, k, seed=3) == r


def test_bad_group_count_is_rejected():
    with pytest.raises(ValueError, match="cannot split 4 layers into 5 groups"):
        sequential_groups(4, 5)
