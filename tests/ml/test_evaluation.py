"""Embedding and clustering measures against planted truth, and reading the truth tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ml.evaluation import (
    adjusted_rand,
    embeddings,
    knn_label_accuracy,
    read_truth,
    recall_at_k_pairs,
)
from ml.evaluation.embeddings import truth_path


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _planted_clusters(n_per: int, n_clusters: int, d: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(n_clusters, d)))
    labels = np.repeat(np.arange(n_clusters), n_per)
    vectors = _unit(centres[labels] + spread * rng.normal(size=(labels.size, d)))
    return vectors, labels


def _on_circle(angles: list[float]) -> np.ndarray:
    a = np.asarray(angles)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


# -- kNN label accuracy ------------------------------------------------------------------------


def test_knn_accuracy_is_one_on_well_separated_clusters() -> None:
    vectors, labels = _planted_clusters(n_per=50, n_clusters=5, d=32, spread=0.05, seed=0)
    style_names = np.array(["anime", "photo", "oil", "pixel", "ink"])[labels]
    assert knn_label_accuracy(vectors, style_names, k=10) == 1.0


def test_knn_accuracy_is_chance_on_random_labels() -> None:
    # Labels independent of the vectors: the majority label of any neighbourhood is independent
    # of the query's own label, so the expected accuracy is 1/4. 2000 queries: std ~0.01;
    # the tolerance is 5 std.
    rng = np.random.default_rng(1)
    vectors = _unit(rng.normal(size=(2000, 16)))
    labels = rng.integers(0, 4, size=2000)
    accuracy = knn_label_accuracy(vectors, labels, k=10)
    assert accuracy == pytest.approx(0.25, abs=0.05)


def test_knn_excludes_the_query_itself() -> None:
    # Rows 0 and 2 ("a") sit on opposite sides, row 1 ("b") next to row 0. With k=1 and the
    # query counted as its own neighbour every row would be right (1.0); excluded, each row's
    # nearest other row carries the other label: 0 → 1 (b), 1 → 0 (a), 2 → 1 (b, cos -0.995
    # beats -1).
    vectors = _on_circle([0.0, 0.1, np.pi])
    labels = np.array(["a", "b", "a"])
    assert knn_label_accuracy(vectors, labels, k=1) == 0.0


def test_knn_tie_goes_to_the_nearest_neighbour() -> None:
    # Query row 0; its two neighbours in order: row 1 ("y", nearer) then row 2 ("x"). One vote
    # each: the tie goes to the nearer "y" (a tie broken by label order would pick "x").
    vectors = _on_circle([0.0, 0.1, -0.3, np.pi])
    mask = np.array([True, False, False, False])
    assert knn_label_accuracy(vectors, np.array(["y", "y", "x", "x"]), k=2, query_mask=mask) == 1.0
    assert knn_label_accuracy(vectors, np.array(["x", "y", "x", "x"]), k=2, query_mask=mask) == 0.0


def test_knn_query_mask_picks_queries_but_neighbours_come_from_all_rows() -> None:
    # Two tight pairs; only row 0 is a query. Its nearest neighbour is row 1, which is not a
    # query but must still be a candidate neighbour.
    vectors = _on_circle([0.0, 0.01, 2.0, 2.01])
    labels = np.array([7, 7, 9, 9])
    only_row0 = np.array([True, False, False, False])
    assert knn_label_accuracy(vectors, labels, k=1, query_mask=only_row0) == 1.0
    # Row 1 relabelled: row 0's one neighbour now disagrees.
    assert knn_label_accuracy(vectors, np.array([7, 8, 9, 9]), k=1, query_mask=only_row0) == 0.0


def test_knn_max_queries_samples_deterministically() -> None:
    rng = np.random.default_rng(2)
    vectors = _unit(rng.normal(size=(600, 8)))
    labels = rng.integers(0, 3, size=600)
    first = knn_label_accuracy(vectors, labels, k=5, max_queries=100, seed=4)
    assert first == knn_label_accuracy(vectors, labels, k=5, max_queries=100, seed=4)
    # A share of 100 queries: a multiple of 1/100.
    assert round(first * 100, 9) == int(round(first * 100))


def test_knn_blocked_products_agree_with_a_brute_force_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Shrink the similarity block to 8 query rows so 100 queries take 13 blocks (the last one
    # partial), and compare with a plain per-row reference.
    monkeypatch.setattr(embeddings, "_BLOCK_ELEMENTS", 8 * 500)
    vectors, labels = _planted_clusters(n_per=100, n_clusters=5, d=8, spread=0.8, seed=3)
    queries = np.arange(0, 500, 5)
    mask = np.zeros(500, dtype=bool)
    mask[queries] = True
    hits = 0
    for q in queries:
        row = vectors @ vectors[q]
        row[q] = -np.inf
        nearest = np.argsort(-row, kind="stable")[:7]
        values, first_seen, counts = np.unique(
            labels[nearest], return_index=True, return_counts=True
        )
        best = values[np.lexsort((first_seen, -counts))[0]]
        hits += int(best == labels[q])
    expected = hits / queries.size
    assert 0.3 < expected < 1.0  # overlapping clusters: a measure that can be wrong both ways
    assert knn_label_accuracy(vectors, labels, k=7, query_mask=mask) == pytest.approx(expected)


def test_knn_rejects_bad_input() -> None:
    vectors = _on_circle([0.0, 1.0, 2.0])
    labels = np.array([0, 1, 0])
    with pytest.raises(ValueError, match="L2-normalised; row 1"):
        knn_label_accuracy(vectors * np.array([[1.0], [2.0], [1.0]], dtype=np.float32), labels)
    with pytest.raises(ValueError, match="k must be between 1 and n - 1 = 2"):
        knn_label_accuracy(vectors, labels, k=3)
    with pytest.raises(ValueError, match="labels must have shape"):
        knn_label_accuracy(vectors, labels[:2], k=1)
    with pytest.raises(ValueError, match="selects no rows"):
        knn_label_accuracy(vectors, labels, k=1, query_mask=np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="bool array"):
        knn_label_accuracy(vectors, labels, k=1, query_mask=np.array([1, 0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        knn_label_accuracy(np.full((3, 2), np.nan, dtype=np.float32), labels, k=1)
    with pytest.raises(ValueError, match="2-D"):
        knn_label_accuracy(vectors[0], labels, k=1)


# -- adjusted Rand -----------------------------------------------------------------------------


def test_ari_is_one_for_a_relabelled_perfect_clustering() -> None:
    truth = np.array(["anime"] * 5 + ["photo"] * 5 + ["oil"] * 5)
    pred = np.array([2] * 5 + [0] * 5 + [7] * 5)
    ari, noise_share = adjusted_rand(pred, truth)
    assert ari == pytest.approx(1.0)
    assert noise_share == 0.0


def test_ari_excludes_noise_and_reports_its_share() -> None:
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([5, 5, 5, -1, 6, 6, -1, -1])
    ari, noise_share = adjusted_rand(pred, truth)
    assert ari == pytest.approx(1.0)  # every placed row is right
    assert noise_share == pytest.approx(3 / 8)
    # Counted as one more cluster, the noise rows (one of style 0, two of style 1) cost ARI.
    ari_with_noise, share_again = adjusted_rand(pred, truth, exclude_noise=False)
    assert ari_with_noise < 0.9
    assert share_again == pytest.approx(3 / 8)


def test_ari_is_near_zero_for_a_random_clustering() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, size=5000)
    pred = rng.integers(0, 5, size=5000)
    ari, _ = adjusted_rand(pred, truth)
    assert abs(ari) < 0.01


def test_ari_of_all_noise_is_nan() -> None:
    ari, noise_share = adjusted_rand(np.array([-1, -1, -1]), np.array([0, 1, 2]))
    assert np.isnan(ari)
    assert noise_share == 1.0


def test_ari_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="labels_true must have shape"):
        adjusted_rand(np.array([0, 1]), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="non-empty"):
        adjusted_rand(np.array([], dtype=int), np.array([]))
    with pytest.raises(ValueError, match="integer cluster ids"):
        adjusted_rand(np.array(["a", "b"]), np.array([0, 1]))


# -- paired retrieval --------------------------------------------------------------------------


def test_recall_is_one_for_identical_sets() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 32)).astype(np.float32)
    assert recall_at_k_pairs(vectors, vectors, k=1) == 1.0
    assert recall_at_k_pairs(vectors, vectors * 3.0, k=1) == 1.0  # cosine: length is ignored


def test_recall_is_small_for_shuffled_pairs() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(500, 32)).astype(np.float32)
    shuffled = vectors[rng.permutation(500)]
    # Chance is k/n = 0.02, plus the few rows the permutation leaves in place.
    assert recall_at_k_pairs(vectors, shuffled, k=10) < 0.06


def test_recall_counts_duplicates_of_the_true_target_as_hits() -> None:
    # Eight images of one prompt: every target is the same text vector, so all tie. The true
    # target is never outranked, even at k=1.
    rng = np.random.default_rng(2)
    text = rng.normal(size=(1, 16)).astype(np.float32)
    images = text + 0.1 * rng.normal(size=(8, 16)).astype(np.float32)
    assert recall_at_k_pairs(images, np.repeat(text, 8, axis=0), k=1) == 1.0


def test_recall_at_k_grows_with_k() -> None:
    rng = np.random.default_rng(3)
    targets = rng.normal(size=(300, 16)).astype(np.float32)
    queries = targets + 1.0 * rng.normal(size=(300, 16)).astype(np.float32)
    r1 = recall_at_k_pairs(queries, targets, k=1)
    r10 = recall_at_k_pairs(queries, targets, k=10)
    assert 0.0 < r1 < r10 < 1.0
    assert recall_at_k_pairs(queries, targets, k=300) == 1.0


def test_recall_blocked_products_agree_with_a_brute_force_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(embeddings, "_BLOCK_ELEMENTS", 7 * 200)  # 7 query rows a block
    rng = np.random.default_rng(4)
    targets = _unit(rng.normal(size=(200, 16)))
    queries = _unit(targets + 0.8 * rng.normal(size=(200, 16)).astype(np.float32))
    sims = queries.astype(np.float64) @ targets.astype(np.float64).T
    ranks = (sims > np.diag(sims)[:, None]).sum(axis=1)
    expected = float((ranks < 5).mean())
    assert 0.1 < expected < 1.0
    assert recall_at_k_pairs(queries, targets, k=5) == pytest.approx(expected)


def test_recall_does_not_modify_its_inputs() -> None:
    vectors = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)
    before = vectors.copy()
    recall_at_k_pairs(vectors, vectors, k=1)
    np.testing.assert_array_equal(vectors, before)


def test_recall_rejects_bad_input() -> None:
    a = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="same shape"):
        recall_at_k_pairs(a, a[:2])
    with pytest.raises(ValueError, match="k must be between 1 and n = 3"):
        recall_at_k_pairs(a, a, k=4)
    with pytest.raises(ValueError, match="zero vector"):
        recall_at_k_pairs(a, np.zeros((3, 3), dtype=np.float32), k=1)


# -- truth tables ------------------------------------------------------------------------------


def _write_truth(root: Path) -> None:
    (root / "truth").mkdir(parents=True)
    table = pa.table(
        {"imageId": [1, 2, 3], "style": ["anime", "oil", "anime"], "style_id": [0, 2, 0]}
    )
    pq.write_table(table, root / "truth" / "image_truth.parquet")


def test_read_truth_reads_the_table_and_selected_columns(tmp_path: Path) -> None:
    _write_truth(tmp_path)
    table = read_truth(str(tmp_path), "image_truth")
    assert table.num_rows == 3
    assert table.column_names == ["imageId", "style", "style_id"]
    picked = read_truth(str(tmp_path), "image_truth", columns=["style_id", "imageId"])
    assert picked.column_names == ["style_id", "imageId"]
    assert picked.column("style_id").to_pylist() == [0, 2, 0]


def test_read_truth_names_the_missing_file(tmp_path: Path) -> None:
    _write_truth(tmp_path)
    expected = tmp_path / "truth" / "lora_styles.parquet"
    with pytest.raises(FileNotFoundError) as raised:
        read_truth(str(tmp_path), "lora_styles")
    assert str(expected) in str(raised.value)
    assert "image_truth" in str(raised.value)  # what is there instead


def test_read_truth_without_a_truth_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no truth tables"):
        read_truth(str(tmp_path), "image_truth")


def test_read_truth_names_missing_columns(tmp_path: Path) -> None:
    _write_truth(tmp_path)
    with pytest.raises(KeyError, match="recipe_id"):
        read_truth(str(tmp_path), "image_truth", columns=["imageId", "recipe_id"])


def test_truth_table_names_cannot_leave_the_truth_folder(tmp_path: Path) -> None:
    assert truth_path(tmp_path, "styles") == tmp_path / "truth" / "styles.parquet"
    with pytest.raises(ValueError, match="truth table name"):
        read_truth(str(tmp_path), "../images/images")
