"""The vector index: recall against brute force, exclusion of the query's own id, padding,
save/load round trips, and a clear error for every bad input or damaged file."""

from __future__ import annotations

import os

import numpy as np
import pytest
from usearch.index import Index

from ml.index import (
    IndexConfig,
    VectorIndex,
    build_index,
    exact_search,
    recall_at_k,
    similar_by_id,
    similar_by_vector,
)

DIM = 64
ONE_THREAD = IndexConfig(threads=1)  # deterministic builds, and the machine's cores are shared


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, seed: int = 0, centres: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around a few centres (like CLIP embeddings of a few subjects), keyed
    by shuffled, sparse ids so that a row number is never mistaken for an id."""
    rng = np.random.default_rng(seed)
    centre = unit(rng.normal(size=(centres, DIM)))
    vectors = unit(centre[rng.integers(0, centres, n)] + 0.05 * rng.normal(size=(n, DIM)))
    ids = rng.permutation(n).astype(np.int64) * 13 + 1_000
    return ids, vectors


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(2_000)


@pytest.fixture(scope="module")
def index(data) -> VectorIndex:
    return build_index(*data, ONE_THREAD)


def naive_top_k(ids, vectors, query, k):
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order], scores[order]


# -- quality ----------------------------------------------------------------------------------


def test_recall_at_10_on_clustered_vectors(index, data):
    ids, vectors = data
    assert len(index) == 2_000
    assert index.ndim == DIM
    assert recall_at_k(index, ids, vectors, k=10, n_queries=1_000) >= 0.95


def test_recall_at_k_reports_a_wrong_index_as_bad(data):
    """The figure can fail: an index whose ids point at other images' vectors finds the
    right vectors under the wrong names."""
    ids, vectors = data
    shuffled = build_index(np.random.default_rng(1).permutation(ids), vectors, ONE_THREAD)
    assert recall_at_k(shuffled, ids, vectors, k=10, n_queries=200) < 0.2


@pytest.mark.parametrize(
    ("dtype", "tolerance", "min_recall"), [("f16", 1e-3, 0.95), ("i8", 2e-2, 0.8)]
)
def test_quantised_index_stores_approximate_vectors(data, dtype, tolerance, min_recall):
    ids, vectors = data
    quantised = build_index(ids, vectors, IndexConfig(dtype=dtype, threads=1))
    assert quantised.dtype == dtype
    assert np.abs(quantised.vector(int(ids[5])) - vectors[5]).max() < tolerance
    assert recall_at_k(quantised, ids, vectors, k=10, n_queries=200) >= min_recall


def test_recall_at_k_refuses_vectors_the_index_was_not_built_from(index, data):
    ids, vectors = data
    with pytest.raises(ValueError, match="holds 2000 vectors but 1999"):
        recall_at_k(index, ids[1:], vectors[1:])
    with pytest.raises(ValueError, match="not in the index"):
        recall_at_k(index, ids + 1, vectors, n_queries=10)


def test_build_is_reproducible_with_one_thread():
    ids, vectors = clustered(500, seed=3)
    first = build_index(ids, vectors, ONE_THREAD).search(vectors[:50], 10)
    second = build_index(ids, vectors, ONE_THREAD).search(vectors[:50], 10)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_ip_metric_ranks_like_cosine_and_normalises_queries(data):
    ids, vectors = data
    cos = build_index(ids[:300], vectors[:300], ONE_THREAD)
    ip = build_index(ids[:300], vectors[:300], IndexConfig(metric="ip", threads=1))
    assert ip.metric == "ip"
    query = 3.0 * vectors[7]  # not unit-norm: similarities must still be cosines
    found_cos, sims_cos = cos.search(query, 5)
    found_ip, sims_ip = ip.search(query, 5)
    np.testing.assert_array_equal(found_ip, found_cos)
    np.testing.assert_allclose(sims_ip, sims_cos, atol=1e-5)
    assert sims_ip[0] == pytest.approx(1.0, abs=1e-5)


# -- exact search -----------------------------------------------------------------------------


def test_exact_search_equals_a_naive_argsort():
    rng = np.random.default_rng(5)
    vectors = unit(rng.normal(size=(300, DIM)))
    ids = rng.permutation(300).astype(np.int64) + 50
    queries = rng.normal(size=(20, DIM)).astype(np.float32)
    # Small tiles so the running top-k is merged across many query and vector blocks.
    found, sims = exact_search(ids, vectors, queries, 10, query_block=7, vector_block=37)
    assert found.shape == (20, 10)
    assert found.dtype == np.int64
    assert sims.dtype == np.float32
    for row, query in enumerate(unit(queries)):
        want_ids, want_sims = naive_top_k(ids, vectors, query, 10)
        np.testing.assert_array_equal(found[row], want_ids)
        np.testing.assert_allclose(sims[row], want_sims, atol=1e-5)


def test_exact_search_excludes_by_id_and_pads():
    rng = np.random.default_rng(6)
    vectors = unit(rng.normal(size=(6, DIM)))
    ids = np.arange(6, dtype=np.int64) * 10
    found, sims = exact_search(ids, vectors, vectors[:2], 8, exclude_ids=ids[:2], vector_block=4)
    assert found.shape == (2, 8)
    assert 0 not in found[0]
    assert 10 not in found[1]
    np.testing.assert_array_equal(found[:, 5:], -1)
    assert np.isnan(sims[:, 5:]).all()
    assert not np.isnan(sims[:, :5]).any()
    want_ids, _ = naive_top_k(ids[1:], vectors[1:], vectors[0], 5)
    np.testing.assert_array_equal(found[0, :5], want_ids)


# -- searching the index ----------------------------------------------------------------------


def test_search_agrees_with_exact_search_on_its_best_match(index, data):
    ids, vectors = data
    queries = vectors[:100] + 0.01
    approx, sims = index.search(queries, 5)
    exact, exact_sims = exact_search(ids, vectors, queries, 5)
    assert (approx[:, 0] == exact[:, 0]).mean() >= 0.95
    np.testing.assert_allclose(sims[:, 0], exact_sims[:, 0], atol=1e-4)
    assert (np.diff(sims, axis=1) <= 1e-6).all(), "similarities must decrease along a row"


def test_exclude_self_drops_the_query_id_and_still_returns_k(index, data):
    ids, vectors = data
    query_ids = ids[:20]
    with_self, _ = index.search(vectors[:20], 11)
    assert (with_self[:, 0] == query_ids).all()  # each vector is its own best match
    found, sims = index.search_by_id(query_ids, 10, exclude_self=True)
    assert found.shape == (20, 10)
    assert not (found == query_ids[:, None]).any()
    assert (found >= 0).all()
    np.testing.assert_array_equal(found, with_self[:, 1:])
    kept, _ = index.search_by_id(query_ids, 10, exclude_self=False)
    np.testing.assert_array_equal(kept[:, 0], query_ids)


def test_exclude_self_is_by_id_not_by_rank():
    """Two images with the very same embedding: querying one must return the other first,
    whichever of the two ties at rank 0."""
    ids, vectors = clustered(50, seed=4)
    vectors = vectors.copy()
    vectors[1] = vectors[0]
    twin = build_index(ids, vectors, ONE_THREAD)
    for me, other in ((ids[0], ids[1]), (ids[1], ids[0])):
        found, sims = twin.search_by_id(int(me), 3)
        assert me not in found
        assert found[0] == other
        assert sims[0] == pytest.approx(1.0, abs=1e-5)


def test_k_larger_than_the_index_pads_with_minus_one_and_nan():
    ids, vectors = clustered(5, seed=2)
    small = build_index(ids, vectors, ONE_THREAD)
    found, sims = small.search(vectors[:2], 8)
    assert found.shape == (2, 8)
    assert sims.shape == (2, 8)
    assert sorted(found[0, :5].tolist()) == sorted(ids.tolist())
    np.testing.assert_array_equal(found[:, 5:], -1)
    assert np.isnan(sims[:, 5:]).all()
    assert not np.isnan(sims[:, :5]).any()
    others, other_sims = small.search_by_id(ids[:1], 8)
    assert sorted(others[0, :4].tolist()) == sorted(ids[1:].tolist())
    np.testing.assert_array_equal(others[0, 4:], -1)
    assert np.isnan(other_sims[0, 4:]).all()


def test_single_vector_query_gives_one_row_of_results(index, data):
    ids, vectors = data
    found, sims = index.search(vectors[3], 7)
    assert found.shape == (7,)
    assert sims.shape == (7,)
    batch, batch_sims = index.search(vectors[3:4], 7)
    assert batch.shape == (1, 7)
    np.testing.assert_array_equal(found, batch[0])
    np.testing.assert_array_equal(sims, batch_sims[0])
    assert found[0] == ids[3]


def test_vector_lookup_returns_the_stored_vector(index, data):
    ids, vectors = data
    np.testing.assert_array_equal(index.vector(int(ids[42])), vectors[42])
    assert int(ids[42]) in index
    assert -1 not in index
    with pytest.raises(KeyError, match="not in the index"):
        index.vector(7)  # ids are 1000 + 13 i


def test_similar_by_id_and_by_vector(index, data):
    ids, vectors = data
    pairs = similar_by_id(index, int(ids[9]), k=4)
    assert len(pairs) == 4
    assert int(ids[9]) not in [image_id for image_id, _ in pairs]
    assert [type(v) for pair in pairs for v in pair] == [int, float] * 4
    assert [s for _, s in pairs] == sorted((s for _, s in pairs), reverse=True)
    by_vector = similar_by_vector(index, vectors[9], k=5)
    assert by_vector[0][0] == int(ids[9])
    assert [image_id for image_id, _ in by_vector[1:]] == [image_id for image_id, _ in pairs]
    with pytest.raises(KeyError, match="not in the index"):
        similar_by_id(index, 7)
    with pytest.raises(ValueError, match=r"one \(d,\) vector"):
        similar_by_vector(index, vectors[:2])


def test_similar_by_id_on_a_tiny_index_returns_only_what_exists():
    ids, vectors = clustered(3, seed=8)
    tiny = build_index(ids, vectors, ONE_THREAD)
    pairs = similar_by_id(tiny, int(ids[0]), k=10)
    assert sorted(i for i, _ in pairs) == sorted(ids[1:].tolist())


# -- save / load ------------------------------------------------------------------------------


def test_save_load_round_trip_returns_identical_results(index, data, tmp_path):
    ids, vectors = data
    path = tmp_path / "images.usearch"
    index.save(path)
    assert sorted(os.listdir(tmp_path)) == ["images.usearch"]  # no temporary file left
    loaded = VectorIndex.load(path, expected_dim=DIM)
    assert len(loaded) == len(index)
    assert (loaded.ndim, loaded.metric, loaded.dtype) == (DIM, "cos", "f32")
    before = index.search(vectors[:50], 10)
    after = loaded.search(vectors[:50], 10)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(loaded.vector(int(ids[0])), vectors[0])


def test_saved_file_still_opens_with_plain_usearch(index, data, tmp_path):
    ids, vectors = data
    path = tmp_path / "images.usearch"
    index.save(path)
    plain = Index.restore(str(path))
    assert len(plain) == len(index)
    assert plain.search(vectors[0], 1).keys[0] == ids[0]


def test_load_of_a_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.usearch"
    with pytest.raises(FileNotFoundError, match="nowhere.usearch"):
        VectorIndex.load(path)


def test_load_of_a_garbage_file_names_the_path(tmp_path):
    path = tmp_path / "garbage.usearch"
    path.write_bytes(np.random.default_rng(0).bytes(4_096))
    with pytest.raises(ValueError, match="garbage.usearch"):
        VectorIndex.load(path)


def test_load_of_a_plain_usearch_file_is_refused(data, tmp_path):
    """No trailer, so no checksum to vouch for the graph: refused rather than trusted."""
    ids, vectors = data
    plain = Index(ndim=DIM, metric="cos", dtype="f32")
    plain.add(ids[:10].astype(np.uint64), vectors[:10])
    path = tmp_path / "plain.usearch"
    plain.save(str(path))
    with pytest.raises(ValueError, match="plain.usearch.*no checksum trailer"):
        VectorIndex.load(path)


def test_load_with_the_wrong_dimension_names_both(index, tmp_path):
    path = tmp_path / "images.usearch"
    index.save(path)
    with pytest.raises(ValueError, match=r"images.usearch holds 64-dimensional.*expected 1024"):
        VectorIndex.load(path, expected_dim=1024)


def test_load_of_a_truncated_file_names_the_path(index, tmp_path):
    path = tmp_path / "images.usearch"
    index.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="images.usearch"):
        VectorIndex.load(path)


def test_load_of_a_file_damaged_in_the_middle_is_refused(index, tmp_path):
    """usearch itself loads such a file and crashes the process on the first search."""
    path = tmp_path / "images.usearch"
    index.save(path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 50] = b"\xff" * 50
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="images.usearch is damaged"):
        VectorIndex.load(path)


# -- bad input --------------------------------------------------------------------------------


def _bad_inputs() -> list:
    ids, vectors = clustered(10, seed=9)
    nan = vectors.copy()
    nan[3, 5] = np.nan
    inf = vectors.copy()
    inf[4, 0] = np.inf
    zero = vectors.copy()
    zero[2] = 0.0
    dupes = ids.copy()
    dupes[7] = dupes[2]
    return [
        pytest.param(ids, vectors[0], "2-D", id="one-vector-not-a-matrix"),
        pytest.param(ids, vectors[:, :, None], "2-D", id="3-d-array"),
        pytest.param(ids, vectors[:9], "10 ids but 9 vectors", id="length-mismatch"),
        pytest.param(ids, nan, r"NaN or infinite.*rows \[3\]", id="nan"),
        pytest.param(ids, inf, r"NaN or infinite.*rows \[4\]", id="inf"),
        pytest.param(ids, zero, r"all-zero.*rows \[2\]", id="zero-vector"),
        pytest.param(ids, vectors * 2, "L2-normalised", id="not-normalised"),
        pytest.param(dupes, vectors, rf"unique.*\[{dupes[2]}\]", id="duplicate-ids"),
        pytest.param(ids - 10_000, vectors, "non-negative", id="negative-ids"),
        pytest.param(ids.astype(float), vectors, "integers", id="float-ids"),
        pytest.param(ids[:0], vectors[:0], "empty", id="empty"),
        pytest.param(ids, vectors.astype(np.int32), "floating point", id="integer-vectors"),
    ]


@pytest.mark.parametrize(("ids", "vectors", "message"), _bad_inputs())
def test_build_refuses_bad_input_saying_what_is_wrong(ids, vectors, message):
    with pytest.raises(ValueError, match=message):
        build_index(ids, vectors, ONE_THREAD)


@pytest.mark.parametrize(("ids", "vectors", "message"), _bad_inputs())
def test_exact_search_refuses_bad_input_saying_what_is_wrong(ids, vectors, message):
    query = np.ones(DIM, dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        exact_search(ids, vectors, query, 3)


def test_search_refuses_bad_queries(index):
    good = np.ones((2, DIM), dtype=np.float32)
    with pytest.raises(ValueError, match="dimension 32, expected 64"):
        index.search(np.ones((2, 32), dtype=np.float32), 3)
    with pytest.raises(ValueError, match="dimension 32, expected 64"):
        index.search(np.ones(32, dtype=np.float32), 3)
    nan = good.copy()
    nan[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"queries contain NaN.*rows \[1\]"):
        index.search(nan, 3)
    with pytest.raises(ValueError, match="all-zero"):
        index.search(np.zeros(DIM, dtype=np.float32), 3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(good, 0)
    with pytest.raises(ValueError, match="one integer id per query"):
        index.search(good, 3, exclude_ids=np.array([1, 2, 3]))


def test_querying_an_empty_index_says_it_is_empty():
    empty = VectorIndex(Index(ndim=DIM, metric="cos", dtype="f32"))
    assert len(empty) == 0
    with pytest.raises(ValueError, match="index is empty"):
        empty.search(np.ones(DIM, dtype=np.float32), 3)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("metric", "l2sq", "metric must be one of"),
        ("dtype", "f64", "dtype must be one of"),
        ("connectivity", 1, "connectivity must be an integer >= 2"),
        ("expansion_search", 0, "expansion_search must be an integer >= 2"),
        ("threads", -1, "threads must be an integer >= 0"),
    ],
)
def test_index_config_refuses_bad_settings(field, value, message):
    with pytest.raises(ValueError, match=message):
        IndexConfig(**{field: value})


def test_index_config_defaults():
    config = IndexConfig()
    assert (config.metric, config.dtype) == ("cos", "f32")
    assert (config.connectivity, config.expansion_add, config.expansion_search) == (16, 128, 64)
