"""Quality of embeddings and clusterings, measured against the sample's planted truth.

The generated sample plants the structure the models are supposed to find (each image's style,
prompt recipe and quality; each LoRA's main style) and writes it to ``<sample_root>/truth/``.
Only evaluation code may read ``truth/`` (`read_truth` is the one door); models, indexes and
clusterings never do, or the measures below would measure a leak instead of what was learnt.

Measures:

* `knn_label_accuracy` — does an item's neighbourhood share its planted label? (kNN
  classification accuracy with leave-one-out queries.)
* `adjusted_rand` — does a clustering recover the planted labels? (ARI, noise excluded.)
* `recall_at_k_pairs` — does each image retrieve its own prompt? (Recall@k as CLIP papers
  report it.)

All similarity work is blocked matrix products over float32, so memory stays bounded (a few
tens of MB on top of the inputs) at n ~ 100 000; everything is deterministic.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import adjusted_rand_score

TRUTH_DIR = "truth"
NOISE_LABEL = -1
# Similarity scores held at once: block rows x n columns of float32 (16 MB), plus the int64
# positions argpartition returns (32 MB).
_BLOCK_ELEMENTS = 1 << 22
# How far an L2 norm may stray from 1 before the vectors count as not normalised (float32
# storage and half-precision models round to ~1e-3).
_NORM_TOLERANCE = 1e-2
# A retrieval target only outranks the true one if its cosine is higher by more than this:
# exact duplicates of the true target may differ in the last float32 bits of a matrix product.
_TIE_TOLERANCE = 1e-6
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_]+$")


# -- input checks ------------------------------------------------------------------------------


def _matrix(vectors: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D (n, d), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape})")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return arr


def _row_norms(arr: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", arr, arr, dtype=np.float64))


def _unit_rows(arr: np.ndarray, what: str) -> np.ndarray:
    """A normalised copy (the caller's array is never written to)."""
    norms = _row_norms(arr)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(f"{what} row {int(zero[0])} is a zero vector (it has no direction)")
    return arr / norms[:, None].astype(np.float32)


def _labels(labels: np.ndarray, n: int, what: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), got {arr.shape}")
    return arr


# -- kNN label accuracy ------------------------------------------------------------------------


def knn_label_accuracy(
    vectors: np.ndarray,
    labels: np.ndarray,
    k: int = 10,
    query_mask: np.ndarray | None = None,
    seed: int = 0,
    max_queries: int | None = None,
) -> float:
    """Share of query rows whose k nearest neighbours' majority label is their own label.

    ``vectors`` are (n, d) and L2-normalised (cosine similarity is then a dot product; rows
    whose norm is off 1 by more than 1e-2 raise ValueError rather than silently ranking by
    length). ``labels`` (n,) are the planted labels, any comparable dtype.

    Each query's neighbours are drawn from ALL rows except the query itself (leave-one-out:
    counting itself would hand every query one vote for its own label). Neighbours are ordered
    by similarity, then by row index; the majority label wins, and a tie between labels goes
    to the label of the nearest neighbour among the tied ones. With labels independent of the
    vectors the expected accuracy is 1 / (number of labels), whatever k.

    ``query_mask`` (bool, n) picks the queries (e.g. a held-out split); default all rows. When
    there are more than ``max_queries`` of them, a uniform sample drawn with ``seed`` is used
    instead (n ~ 100 000 queries over 100 000 rows is 10^10 dot products per dimension; a few
    thousand queries give the accuracy to about +-1 %). Exactly equal similarities at the k-th
    place are resolved by whichever row argpartition keeps (deterministic for the same input).

    Raises ValueError on bad shapes, non-finite or non-normalised vectors, k outside
    1..n-1, a mask that is not boolean of length n or selects nothing, or max_queries < 1.
    """
    arr = _matrix(vectors, "vectors")
    n = arr.shape[0]
    norms = _row_norms(arr)
    bad = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOLERANCE)
    if bad.size:
        raise ValueError(
            f"vectors must be L2-normalised; row {int(bad[0])} has norm {norms[bad[0]]:.4g} "
            f"({bad.size} rows off)"
        )
    truth = _labels(labels, n, "labels")
    if not 1 <= k <= n - 1:
        raise ValueError(
            f"k must be between 1 and n - 1 = {n - 1} (the query is excluded), got {k}"
        )
    if query_mask is None:
        queries = np.arange(n)
    else:
        mask = np.asarray(query_mask)
        if mask.dtype != np.bool_ or mask.shape != (n,):
            raise ValueError(
                f"query_mask must be a bool array of shape ({n},), got {mask.dtype} {mask.shape}"
            )
        queries = np.flatnonzero(mask)
        if queries.size == 0:
            raise ValueError("query_mask selects no rows")
    if max_queries is not None:
        if max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {max_queries}")
        if queries.size > max_queries:
            rng = np.random.default_rng(seed)
            queries = np.sort(rng.choice(queries, size=max_queries, replace=False))

    _, codes = np.unique(truth, return_inverse=True)
    codes = codes.reshape(-1)
    block = max(1, _BLOCK_ELEMENTS // n)
    hits = 0
    for start in range(0, queries.size, block):
        rows = queries[start : start + block]
        sims = arr[rows] @ arr.T  # (b, n)
        sims[np.arange(rows.size), rows] = -np.inf  # never its own neighbour
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        # Nearest first; equal similarities by row index (lexsort: last key is primary).
        order = np.lexsort((top, -top_sims), axis=1)
        neighbours = np.take_along_axis(top, order, axis=1)
        votes = codes[neighbours]  # (b, k) label codes, nearest first
        # For each position, how many of the k neighbours share its label; argmax takes the
        # first maximum, i.e. the most frequent label, ties to the nearest of the tied ones.
        tally = (votes[:, :, None] == votes[:, None, :]).sum(axis=2)
        winners = votes[np.arange(rows.size), np.argmax(tally, axis=1)]
        hits += int((winners == codes[rows]).sum())
    return hits / queries.size


# -- clustering agreement ----------------------------------------------------------------------


def adjusted_rand(
    labels_pred: np.ndarray,
    labels_true: np.ndarray,
    exclude_noise: bool = True,
) -> tuple[float, float]:
    """ARI of a clustering against planted labels, and the share of rows left as noise.

    ``labels_pred`` are integer cluster ids with -1 for noise (HDBSCAN's convention). With
    ``exclude_noise`` the ARI is computed on the non-noise rows only: a density clustering
    that declines to place 20 % of the rows is judged on the 80 % it placed, and the
    ``noise_share`` (over all rows) is reported next to it so a clustering cannot look good by
    calling everything noise. Without it, noise counts as one more cluster. ARI is invariant to
    renaming clusters: 1 for a perfect recovery, ~0 for chance, negative below chance.

    Returns ``(ari, noise_share)``; ari is NaN when every row is noise (there is nothing to
    compare). Raises ValueError on empty or mismatched inputs or non-integer ``labels_pred``.
    """
    pred = np.asarray(labels_pred)
    if pred.ndim != 1 or pred.size == 0:
        raise ValueError(f"labels_pred must be a non-empty 1-D array, got shape {pred.shape}")
    if not np.issubdtype(pred.dtype, np.integer):
        raise ValueError(
            f"labels_pred must be integer cluster ids (-1 = noise), got dtype {pred.dtype}"
        )
    true = _labels(labels_true, pred.size, "labels_true")
    noise = pred == NOISE_LABEL
    noise_share = float(noise.mean())
    if exclude_noise:
        if noise.all():
            return float("nan"), noise_share
        pred, true = pred[~noise], true[~noise]
    return float(adjusted_rand_score(true, pred)), noise_share


# -- paired retrieval --------------------------------------------------------------------------


def recall_at_k_pairs(
    query_vectors: np.ndarray,
    target_vectors: np.ndarray,
    k: int = 10,
) -> float:
    """Recall@k of paired retrieval: query row i should find target row i among its top k.

    E.g. image embeddings as queries and their prompts' text embeddings as targets, ranked by
    cosine similarity over all targets (both sides are L2-normalised here, so raw model
    outputs are fine). Duplicates are allowed on both sides (two images of one prompt): a
    target outranks the true one only if its similarity is higher by more than 1e-6, so an
    exact duplicate of the true target never pushes it out of the top k.

    Raises ValueError when the two sets differ in rows or dimension, are empty or non-finite,
    contain a zero vector (no direction), or k is outside 1..n.
    """
    queries = _matrix(query_vectors, "query_vectors")
    targets = _matrix(target_vectors, "target_vectors")
    if queries.shape != targets.shape:
        raise ValueError(
            f"query_vectors {queries.shape} and target_vectors {targets.shape} must have the "
            "same shape (row i of one pairs with row i of the other)"
        )
    n = queries.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and n = {n}, got {k}")
    queries = _unit_rows(queries, "query_vectors")
    targets = _unit_rows(targets, "target_vectors")
    block = max(1, _BLOCK_ELEMENTS // n)
    hits = 0
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        sims = queries[rows] @ targets.T  # (b, n)
        # Read the true score from the same product, so duplicates are compared like for like.
        true_sims = sims[np.arange(rows.size), rows]
        above = (sims > (true_sims + _TIE_TOLERANCE)[:, None]).sum(axis=1)
        hits += int((above < k).sum())
    return hits / n


# -- truth tables ------------------------------------------------------------------------------


def truth_path(sample_root: str | Path, table: str) -> Path:
    """``<sample_root>/truth/<table>.parquet``; ValueError for a table name that is not a bare
    identifier (no path tricks reach outside ``truth/``)."""
    if not _TABLE_NAME.match(table):
        raise ValueError(f"truth table name must be letters, digits and _, got {table!r}")
    return Path(sample_root) / TRUTH_DIR / f"{table}.parquet"


def read_truth(
    sample_root: str | Path,
    table: str,
    columns: list[str] | None = None,
) -> pa.Table:
    """Read one planted-truth table of a generated sample (evaluation code only).

    Tables a sample writes: image_truth (imageId, modelVersionId, style, style_id, recipe_id,
    quality, ...), image_media (imageId, style, style_id, motif, quality, has_media, ...),
    styles (style_id, style, label, ...), lora_styles (modelVersionId, main_style,
    main_style_id, style_mix, ...), user_tastes, and a few more.

    Raises FileNotFoundError naming the missing file (and the tables that do exist), and
    KeyError naming requested columns the table lacks (with the ones it has).
    """
    path = truth_path(sample_root, table)
    if not path.is_file():
        folder = path.parent
        known = sorted(p.stem for p in folder.glob("*.parquet")) if folder.is_dir() else []
        hint = f"tables there: {', '.join(known)}" if known else f"no truth tables in {folder}"
        raise FileNotFoundError(f"truth table {table!r} not found: {path} ({hint})")
    if columns is not None:
        available = pq.read_schema(path).names
        missing = [c for c in columns if c not in available]
        if missing:
            raise KeyError(
                f"{path} has no column(s) {', '.join(missing)}; it has {', '.join(available)}"
            )
    return pq.read_table(path, columns=columns)
