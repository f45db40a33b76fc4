"""Prompt clustering (ml.clustering): planted blobs recovered on both paths, noise, sad paths."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from ml.clustering import (
    PATH_BUCKETS,
    PATH_DIRECT,
    ClusterConfig,
    ClusterResult,
    assign_buckets,
    cluster_embeddings,
    reduce_dimensions,
    relabel_by_size,
    size_histogram,
)

BLOBS = 12
PER_BLOB = 150
DIMS = 64
# Forces the bucketed path on 1,800 rows: ceil(1800 / 400) = 5 k-means buckets for 12 blobs.
# Most buckets hold several blobs; one holds a single blob, which plain HDBSCAN calls all noise
# and only the second pass recovers.
BUCKETED = {"bucket_threshold": 500, "bucket_size": 400}


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted_blobs(
    blobs: int = BLOBS,
    per_blob: int = PER_BLOB,
    dims: int = DIMS,
    spread: float = 0.3,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around ``blobs`` random unit centres (cosine to the centre about 0.96)."""
    rng = np.random.default_rng(seed)
    centres = _normalise(rng.standard_normal((blobs, dims)))
    truth = np.repeat(np.arange(blobs), per_blob)
    x = centres[truth] + spread * rng.standard_normal((truth.size, dims)) / np.sqrt(dims)
    order = rng.permutation(truth.size)  # rows of one blob must not be contiguous
    return _normalise(x[order]), truth[order]


def blobs_and_outliers(outliers: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Blobs in a cap of the sphere and ``outliers`` rows spread over the opposite hemisphere.

    Rows and mask of the outliers. Everything lies in a random 24-dimensional subspace of the
    64, so that the PCA to 32 dimensions loses nothing: the test is about HDBSCAN's noise, not
    about what a projection does to distances. Blobs are ~0.85 apart, outliers ≥ 1.4 from
    every blob and ~1.4 from each other: they join the cluster tree only after all blobs have
    merged, which is HDBSCAN's definition of noise. (Fewer of them than ``min_cluster_size``:
    more, and HDBSCAN rightly calls a group of them a sparse cluster of its own.)
    """
    rng = np.random.default_rng(seed)
    sub = 24
    axis = np.eye(sub)[0]
    centres = _normalise(axis + 0.6 * rng.standard_normal((BLOBS, sub)) / np.sqrt(sub))
    truth = np.repeat(np.arange(BLOBS), PER_BLOB)
    inliers = _normalise(
        centres[truth] + 0.3 * rng.standard_normal((truth.size, sub)) / np.sqrt(sub)
    )
    far = rng.standard_normal((outliers, sub))
    far[:, 0] = -np.abs(far[:, 0])  # opposite hemisphere
    basis, _ = np.linalg.qr(rng.standard_normal((DIMS, sub)))
    rows = np.vstack([inliers, _normalise(far)]) @ basis.T
    mask = np.r_[np.zeros(truth.size, dtype=bool), np.ones(outliers, dtype=bool)]
    return rows.astype(np.float32), mask


def purity(labels: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """For each cluster id 0..max: the share of its rows that belong to its majority blob."""
    ids = np.unique(labels[labels >= 0])
    assert ids.size > 0
    return np.array(
        [np.bincount(truth[labels == c]).max() / np.count_nonzero(labels == c) for c in ids]
    )


def assert_consistent(result: ClusterResult, n: int) -> None:
    """Invariants of every result: aligned int64 labels, dense ids by size, sizes that add up."""
    assert result.labels.dtype == np.int64
    assert result.labels.shape == (n,)
    assert result.labels.min() >= -1
    ids = np.unique(result.labels[result.labels >= 0])
    np.testing.assert_array_equal(ids, np.arange(result.n_clusters))
    np.testing.assert_array_equal(
        result.cluster_sizes, np.bincount(result.labels[result.labels >= 0], minlength=0)
    )
    assert list(result.cluster_sizes) == sorted(result.cluster_sizes, reverse=True)
    assert result.cluster_sizes.sum() + result.n_noise == n
    assert result.noise_share == pytest.approx(result.n_noise / n)


# -- recovery ----------------------------------------------------------------------------------


def test_direct_path_recovers_planted_blobs():
    x, truth = planted_blobs()
    result = cluster_embeddings(x, ClusterConfig())
    assert result.path == PATH_DIRECT
    assert result.buckets == 1
    assert result.reduced_dims == 32  # 64 > pca_dims: reduced on the direct path too
    assert_consistent(result, x.shape[0])
    assert result.n_clusters == BLOBS
    assert result.noise_share < 0.05
    # Noise counted as a label of its own: the whole labelling, not only the clustered rows.
    assert adjusted_rand_score(truth, result.labels) >= 0.9
    assert purity(result.labels, truth).min() == 1.0


def test_bucketed_path_recovers_blobs_with_globally_unique_ids():
    x, truth = planted_blobs()
    config = ClusterConfig(**BUCKETED)
    result = cluster_embeddings(x, config)
    assert result.path == PATH_BUCKETS
    assert result.buckets >= 5
    assert result.second_pass >= 1
    assert_consistent(result, x.shape[0])
    assert adjusted_rand_score(truth, result.labels) >= 0.8
    # Ids reused across buckets would put two blobs under one id: every cluster is pure, and
    # every blob is found.
    assert purity(result.labels, truth).min() >= 0.95
    assert result.n_clusters >= BLOBS
    assert set(result.seconds) >= {"reduce", "bucket", "cluster", "merge", "relabel", "total"}


def test_bucketed_ids_are_unique_per_bucket_without_merge():
    x, truth = planted_blobs()
    config = ClusterConfig(merge_ratio=None, **BUCKETED)
    result = cluster_embeddings(x, config)
    assert result.merged == 0
    buckets = assign_buckets(reduce_dimensions(x, config), config)
    assert np.unique(buckets).size == result.buckets
    ids = np.unique(result.labels[result.labels >= 0])
    assert ids.size >= BLOBS
    # Without the merge each cluster lives in exactly one bucket, and no two buckets share an id.
    for c in ids:
        assert np.unique(buckets[result.labels == c]).size == 1
    assert purity(result.labels, truth).min() >= 0.95


def one_large_blob() -> tuple[np.ndarray, np.ndarray]:
    """A 1,200-row blob and four of 150: k-means with buckets of 300 must slice the large one."""
    rng = np.random.default_rng(0)
    centres = _normalise(rng.standard_normal((5, DIMS)))
    truth = np.repeat(np.arange(5), [1_200, 150, 150, 150, 150])
    x = centres[truth] + 0.3 * rng.standard_normal((truth.size, DIMS)) / np.sqrt(DIMS)
    return _normalise(x), truth


def test_a_blob_larger_than_a_bucket_is_sliced_then_merged_whole():
    x, truth = one_large_blob()
    sliced = ClusterConfig(bucket_threshold=500, bucket_size=300, merge_ratio=None)
    buckets = assign_buckets(reduce_dimensions(x, sliced), sliced)
    assert np.unique(buckets[truth == 0]).size >= 3
    unmerged = cluster_embeddings(x, sliced)
    # Every slice is a bucket holding one blob only: plain HDBSCAN calls it all noise (it
    # never selects the root); the second pass makes each slice a cluster.
    assert unmerged.second_pass >= 3
    assert np.mean(unmerged.labels[truth == 0] >= 0) > 0.9
    assert np.unique(unmerged.labels[truth == 0]).size >= 3
    merged = cluster_embeddings(x, ClusterConfig(bucket_threshold=500, bucket_size=300))
    assert merged.n_clusters == 5
    assert merged.merged == unmerged.n_clusters - merged.n_clusters
    assert merged.merged >= 2
    assert adjusted_rand_score(truth, merged.labels) >= 0.95
    assert merged.cluster_sizes[0] >= 1_150  # the large blob, in one piece


@pytest.mark.parametrize("overrides", [{}, BUCKETED], ids=["direct", "bucketed"])
def test_points_far_from_everything_are_noise(overrides):
    rows, outlier = blobs_and_outliers(9)
    result = cluster_embeddings(rows, ClusterConfig(**overrides))
    assert result.path == (PATH_BUCKETS if overrides else PATH_DIRECT)
    assert_consistent(result, rows.shape[0])
    assert outlier.sum() == 9
    np.testing.assert_array_equal(result.labels[outlier], -1)
    # ...while every blob is found, under an id of its own (HDBSCAN trims some rims as noise).
    truth = np.repeat(np.arange(BLOBS), PER_BLOB)
    inliers = result.labels[~outlier]
    majority = [np.bincount(inliers[truth == k] + 1).argmax() - 1 for k in range(BLOBS)]
    assert min(majority) >= 0
    assert len(set(majority)) == BLOBS
    assert np.mean(inliers >= 0) > 0.85


def test_a_bucket_of_scattered_rows_stays_noise_in_the_second_pass():
    rows, outlier = blobs_and_outliers(300)
    config = ClusterConfig(**BUCKETED)
    buckets = assign_buckets(reduce_dimensions(rows, config), config)
    # k-means gives the 300 scattered rows a bucket of their own: plain HDBSCAN leaves it all
    # noise, so it takes the second pass, which may call a bucket one cluster...
    only_outliers = [b for b in np.unique(buckets) if outlier[buckets == b].all()]
    assert len(only_outliers) == 1
    assert np.count_nonzero(buckets == only_outliers[0]) == 300
    result = cluster_embeddings(rows, config)
    assert result.second_pass >= 1
    # ...but only when its rows are linked at the scale of a typical recipe: these are not.
    np.testing.assert_array_equal(result.labels[outlier], -1)
    # The buckets holding a single blob (also mostly noise at first) became clusters.
    assert np.mean(result.labels[~outlier] >= 0) > 0.9


def test_same_seed_same_labels_and_input_untouched():
    x, _ = planted_blobs()
    x16 = x.astype(np.float16)
    before = x16.copy()
    config = ClusterConfig(seed=7, **BUCKETED)
    first = cluster_embeddings(x16, config)
    second = cluster_embeddings(x16, config)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.cluster_sizes, second.cluster_sizes)
    np.testing.assert_array_equal(x16, before)


def test_float16_input_clusters_like_float32():
    x, truth = planted_blobs()
    full = cluster_embeddings(x, ClusterConfig())
    half = cluster_embeddings(x.astype(np.float16), ClusterConfig())
    assert half.n_clusters == full.n_clusters == BLOBS
    assert adjusted_rand_score(full.labels, half.labels) >= 0.99


def test_input_not_wider_than_pca_dims_is_not_reduced():
    x, truth = planted_blobs(dims=16)
    result = cluster_embeddings(x, ClusterConfig(pca_dims=32))
    assert result.reduced_dims == 16
    assert adjusted_rand_score(truth, result.labels) >= 0.9


# -- sad paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "word"), [(np.nan, "NaN"), (np.inf, "infinity"), (-np.inf, "infinity")]
)
def test_non_finite_values_raise_naming_the_row(value, word):
    x, _ = planted_blobs()
    x[17, 3] = value
    with pytest.raises(ValueError, match=rf"non-finite values \({word}\) in row 17\b"):
        cluster_embeddings(x, ClusterConfig())


def test_non_finite_values_raise_on_the_bucketed_path_and_in_late_blocks():
    x, _ = planted_blobs()
    x[1_234, 0] = np.nan
    # Small blocks and a PCA sample that cannot contain every row: the block check finds it.
    config = ClusterConfig(block_rows=100, pca_fit_sample=200, **BUCKETED)
    with pytest.raises(ValueError, match=r"\(NaN\) in row 1234\b"):
        cluster_embeddings(x, config)


@pytest.mark.parametrize(
    ("vectors", "match"),
    [
        (np.zeros(64, dtype=np.float32), r"must be 2-D .* got 1-D"),
        (np.zeros((4, 4, 4), dtype=np.float32), r"must be 2-D .* got 3-D"),
        (np.zeros((50, 0), dtype=np.float32), r"at least one column"),
        (np.array([["a", "b"]] * 20), r"real numbers"),
        ([[0.0, 1.0]] * 20, r"numpy array"),
    ],
    ids=["1-D", "3-D", "no-columns", "strings", "list"],
)
def test_malformed_input_raises(vectors, match):
    with pytest.raises(ValueError, match=match):
        cluster_embeddings(vectors, ClusterConfig())


def test_fewer_rows_than_min_cluster_size_is_all_noise_with_a_reason():
    x, _ = planted_blobs()
    result = cluster_embeddings(x[:5], ClusterConfig(min_cluster_size=10))
    np.testing.assert_array_equal(result.labels, np.full(5, -1))
    assert result.labels.dtype == np.int64
    assert result.n_clusters == 0
    assert result.cluster_sizes.size == 0
    assert result.noise_share == 1.0
    assert result.buckets == 0
    assert result.reason is not None
    assert "min_cluster_size=10" in result.reason
    assert "5 row(s)" in result.reason


def test_empty_input_is_an_empty_result_but_tiny_nan_input_still_raises():
    empty = cluster_embeddings(np.zeros((0, 64), dtype=np.float32), ClusterConfig())
    assert empty.labels.shape == (0,)
    assert empty.n_clusters == 0
    assert empty.noise_share == 0.0
    assert empty.reason is not None
    tiny = np.ones((3, 64), dtype=np.float32)
    tiny[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"\(NaN\) in row 2\b"):
        cluster_embeddings(tiny, ClusterConfig())


def test_at_least_min_cluster_size_rows_get_a_real_run():
    x, truth = planted_blobs(blobs=1, per_blob=12)
    result = cluster_embeddings(x, ClusterConfig(min_cluster_size=10, min_samples=None))
    assert result.reason is None
    assert result.buckets == 1
    assert_consistent(result, 12)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"min_cluster_size": 1}, "min_cluster_size"),
        ({"min_samples": 0}, "min_samples"),
        ({"pca_dims": 0}, "pca_dims"),
        ({"bucket_size": 5, "min_cluster_size": 10}, "bucket_size"),
        ({"cluster_selection_method": "dbscan"}, "cluster_selection_method"),
        ({"merge_ratio": 0.0}, "merge_ratio"),
        ({"n_jobs": 0}, "n_jobs"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        ClusterConfig(**overrides)


# -- bucketing ---------------------------------------------------------------------------------


def test_oversized_buckets_are_split():
    rng = np.random.default_rng(3)
    big = rng.standard_normal((1_900, 8)).astype(np.float32)
    far = rng.standard_normal((100, 8)).astype(np.float32) + 50.0
    points = np.vstack([big, far])
    config = ClusterConfig(bucket_size=1_000, max_bucket_factor=1.0)
    buckets = assign_buckets(points, config)
    counts = np.bincount(buckets)
    # k = 2 puts the 1,900-row mass in one cell; the split brings every bucket under 1,000.
    assert counts.size >= 3
    assert counts.max() <= 1_000
    assert counts.sum() == 2_000


def test_identical_rows_cannot_be_split_and_do_not_loop():
    points = np.ones((600, 4), dtype=np.float32)
    config = ClusterConfig(bucket_size=100, max_bucket_factor=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k-means: fewer distinct points than clusters
        buckets = assign_buckets(points, config)
    assert np.unique(buckets).size == 1
    np.testing.assert_array_equal(np.unique(buckets), [0])


# -- helpers ----------------------------------------------------------------------------------


def test_relabel_by_size_orders_by_size_then_first_row():
    labels, sizes = relabel_by_size(np.array([5, 5, -1, 2, 2, 2, 7, 9]))
    np.testing.assert_array_equal(labels, [1, 1, -1, 0, 0, 0, 2, 3])
    np.testing.assert_array_equal(sizes, [3, 2, 1, 1])
    none, no_sizes = relabel_by_size(np.array([-1, -1]))
    np.testing.assert_array_equal(none, [-1, -1])
    assert no_sizes.size == 0


def test_size_histogram_counts_every_cluster_on_log_bins():
    x, _ = planted_blobs(blobs=4, per_blob=150)
    extra, _ = planted_blobs(blobs=3, per_blob=20, seed=5)
    result = cluster_embeddings(np.vstack([x, extra]), ClusterConfig())
    assert result.n_clusters == 7
    edges, counts = size_histogram(result, bins=5)
    assert edges.shape == (6,)
    assert counts.shape == (5,)
    assert counts.sum() == 7
    assert np.all(np.diff(edges) > 0)
    assert edges[0] == result.cluster_sizes.min()
    assert edges[-1] == result.cluster_sizes.max()
    # Geometric bins: equal ratios between consecutive edges.
    ratios = edges[1:] / edges[:-1]
    np.testing.assert_allclose(ratios, ratios[0])


def test_size_histogram_of_no_clusters_and_of_equal_sizes():
    empty = cluster_embeddings(np.zeros((3, 8), dtype=np.float32), ClusterConfig())
    edges, counts = size_histogram(empty)
    assert edges.size == 0
    assert counts.size == 0
    x, _ = planted_blobs(blobs=3, per_blob=100)
    result = cluster_embeddings(x, ClusterConfig())
    assert result.n_clusters == 3
    edges, counts = size_histogram(result)
    np.testing.assert_array_equal(edges, [99.5, 100.5])
    np.testing.assert_array_equal(counts, [3])
    with pytest.raises(ValueError, match="bins"):
        size_histogram(result, bins=0)


def test_cluster_embeddings_reports_progress_on_the_given_logger(caplog):
    x, _ = planted_blobs()
    log = logging.getLogger("test.clustering.run")
    with caplog.at_level(logging.INFO, logger=log.name):
        cluster_embeddings(x, ClusterConfig(**BUCKETED), log)
    ours = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert any(m.startswith("HDBSCAN (buckets): ") and "ETA" in m for m in ours)
    assert any(m.startswith("reduce (rows): 1,800/1,800") for m in ours)
    assert any("pca+buckets" in m for m in ours)
