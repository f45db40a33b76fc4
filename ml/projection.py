"""2-D projections of embedding vectors, for the maps attached to asset metadata.

PCA is the default and, for now, the only method (UMAP is not installed). It also suits the
job on its own merits:

* deterministic — same vectors and seed, same map, run after run (a map that reshuffles on
  every materialization cannot be compared across runs);
* linear — distances along the two axes mean the same thing everywhere on the map, and the
  explained-variance ratio says how much of the geometry the map shows at all;
* cheap at millions of points — it is fitted on a sample (``fit_sample`` rows, a
  d x d covariance) and applying it is one (n, d) x (d, 2) product, done in blocks so the
  memory on top of the input stays at a few MB.

The price: clusters that are separable only non-linearly may overlap in the map. The map is a
picture for people; quality is measured in the full space (`ml.evaluation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA

METHODS = ("pca",)
# Rows transformed at a time: 65 536 x 2 float32 out, and one input block of 65 536 x d.
_BLOCK_ROWS = 65536


@dataclass(frozen=True)
class Projection:
    """The 2-D coordinates of every input row and how they were obtained.

    ``xy`` is float32 (n, 2), row i for input row i. ``explained_variance_ratio`` (PCA only)
    is the share of the fitted sample's variance along each of the two axes; their sum says how
    faithful the map is. ``fit_rows`` is how many rows the projection was fitted on.
    """

    xy: np.ndarray
    method: str
    explained_variance_ratio: np.ndarray | None
    fit_rows: int


def _check_finite(block: np.ndarray, start: int) -> None:
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        row = start + int(np.flatnonzero(~finite)[0])
        raise ValueError(f"vectors contain NaN or infinite values (first at row {row})")


def project_2d(
    vectors: np.ndarray,
    method: str = "pca",
    seed: int = 0,
    fit_sample: int = 50000,
) -> Projection:
    """Project (n, d) vectors to (n, 2): fit on a deterministic sample, apply to all rows.

    The sample is ``fit_sample`` rows drawn uniformly without replacement with ``seed`` (all
    rows when n <= fit_sample); 50 000 rows pin the top principal axes of a few hundred
    dimensions far more precisely than a plot can show. The PCA axes have scikit-learn's sign
    convention (deterministic), so the map does not flip between runs.

    Raises ValueError for an unknown method, input that is not 2-D, fewer than 3 rows or 2
    columns (no plane to fit), non-finite values (the first offending row is named), a fitted
    sample whose rows are all identical, or ``fit_sample`` below 3.
    """
    if method not in METHODS:
        raise ValueError(f"unknown projection method {method!r}; supported: {', '.join(METHODS)}")
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise ValueError(f"vectors must be 2-D (n, d), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"vectors must be numeric, got dtype {arr.dtype}")
    n, d = arr.shape
    if n < 3:
        raise ValueError(f"project_2d needs at least 3 rows, got {n}")
    if d < 2:
        raise ValueError(f"project_2d needs at least 2 columns, got {d}")
    if fit_sample < 3:
        raise ValueError(f"fit_sample must be >= 3, got {fit_sample}")

    if n <= fit_sample:
        fit_rows = np.arange(n)
    else:
        rng = np.random.default_rng(seed)
        fit_rows = np.sort(rng.choice(n, size=fit_sample, replace=False))
    sample = np.ascontiguousarray(arr[fit_rows], dtype=np.float32)
    finite = np.isfinite(sample).all(axis=1)
    if not finite.all():
        row = int(fit_rows[np.flatnonzero(~finite)[0]])
        raise ValueError(f"vectors contain NaN or infinite values (first at row {row})")

    if (sample.max(axis=0) == sample.min(axis=0)).all():
        # sklearn would divide 0 by 0 and report NaN ratios; constant embeddings are a bug
        # upstream (a collapsed model, a fill value), worth an error of their own.
        raise ValueError("all fitted rows are identical: there is no variance to project")
    pca = PCA(n_components=2, random_state=seed)
    pca.fit(sample)
    del sample

    xy = np.empty((n, 2), dtype=np.float32)
    for start in range(0, n, _BLOCK_ROWS):
        block = np.asarray(arr[start : start + _BLOCK_ROWS], dtype=np.float32)
        _check_finite(block, start)
        xy[start : start + block.shape[0]] = pca.transform(block)
    return Projection(
        xy=xy,
        method=method,
        explained_variance_ratio=pca.explained_variance_ratio_.astype(np.float64),
        fit_rows=int(fit_rows.size),
    )
