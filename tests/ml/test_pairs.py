"""ImageGem's min–max preference pairs within prompt clusters."""

from __future__ import annotations

import numpy as np
import pytest

from ml.preferences.pairs import PairingConfig, min_max_pairs


def pairs_of(clusters, scores, ids=None, **config):
    clusters = np.asarray(clusters)
    ids = np.arange(100, 100 + len(clusters)) if ids is None else np.asarray(ids)
    result = min_max_pairs(clusters, ids, np.asarray(scores, float), PairingConfig(**config))
    winners, losers = ids[result.winner], ids[result.loser]
    return result, [(int(w), int(lo)) for w, lo in zip(winners, losers, strict=True)]


def test_best_against_worst_in_every_cluster():
    result, pairs = pairs_of([0, 0, 0, 1, 1, 1, 1], [0.5, 0.9, 0.1, 3.0, 1.0, 2.0, 0.0])
    assert pairs == [(101, 102), (103, 106)]
    assert result.clusters == result.clusters_paired == 2


def test_top_k_pairs_ith_best_with_ith_worst_and_no_image_twice():
    scores = [9, 8, 7, 6, 5, 4, 3]
    result, pairs = pairs_of([4] * 7, scores, top_k=3)
    assert pairs == [(100, 106), (101, 105), (102, 104)]
    used = [i for p in pairs for i in p]
    assert len(used) == len(set(used))
    _, capped = pairs_of([4] * 3, [3, 2, 1], top_k=5)  # three images hold one pair only
    assert capped == [(100, 102)]


def test_noise_unscored_single_and_equal_clusters_are_counted_not_paired():
    clusters = [-1, -1, 2, 3, 3, 5, 5, 5]
    scores = [9.0, 0.0, 1.0, 4.0, 4.0, np.nan, 2.0, np.inf]
    result, pairs = pairs_of(clusters, scores)
    assert pairs == []
    assert result.noise_images == 2
    assert result.unscored_images == 2
    assert result.single_image_clusters == 2  # cluster 2, and cluster 5 once its NaN/inf left
    assert result.all_equal_clusters == 1
    assert result.dropped_pairs == {"equal scores": 1}


def test_margin_filter_drops_close_pairs():
    result, pairs = pairs_of([0, 0, 1, 1], [1.0, 0.95, 1.0, 0.2], min_margin=0.1)
    assert pairs == [(102, 103)]
    assert result.dropped_pairs == {"margin <= 0.1": 1}


def test_ties_are_broken_by_image_id_so_runs_agree():
    clusters = [0, 0, 0, 0]
    scores = [1.0, 1.0, 0.0, 0.0]
    _, a = pairs_of(clusters, scores, ids=[40, 10, 30, 20])
    _, b = pairs_of(clusters[::-1], scores[::-1], ids=[20, 30, 10, 40])
    assert a == b == [(10, 30)]


def test_every_pair_is_inside_one_cluster_and_winner_scores_higher_at_scale():
    rng = np.random.default_rng(0)
    clusters = rng.integers(-1, 300, size=20_000)
    scores = rng.normal(size=20_000)
    scores[rng.random(20_000) < 0.01] = np.nan
    ids = rng.permutation(20_000)
    result = min_max_pairs(clusters, ids, scores, PairingConfig(top_k=2))
    assert len(result) > 400
    assert (clusters[result.winner] == clusters[result.loser]).all()
    assert (clusters[result.winner] >= 0).all()
    assert (scores[result.winner] > scores[result.loser]).all()
    assert np.isfinite(scores[result.winner]).all() and np.isfinite(scores[result.loser]).all()
    per_cluster = np.bincount(clusters[result.winner])
    assert per_cluster.max() <= 2
    # cluster c's best and worst finite scores are the first pair of c
    c = int(clusters[result.winner[0]])
    mine = (clusters == c) & np.isfinite(scores)
    assert scores[result.winner[0]] == scores[mine].max()
    assert scores[result.loser[0]] == scores[mine].min()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 0}, "top_k"),
        ({"min_margin": -1.0}, "min_margin"),
        ({"min_margin": np.nan}, "min_margin"),
    ],
)
def test_invalid_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PairingConfig(**kwargs)


def test_misaligned_inputs_are_an_error():
    with pytest.raises(ValueError, match="aligned"):
        min_max_pairs(np.zeros(3), np.zeros(2), np.zeros(3), PairingConfig())
