"""Prompt clustering of the embeddings stage: HDBSCAN over prompt embeddings, with a scaling path.

ImageGem groups prompts of the same "recipe" by clustering their text embeddings with HDBSCAN.
The embeddings are L2-normalised, so the Euclidean distance used here is a monotone function of
the cosine distance (``|a - b|^2 = 2 - 2 cos(a, b)``) and no other metric is offered.

HDBSCAN as scikit-learn implements it builds its minimum spanning tree with Prim's algorithm
over the data matrix: memory is linear, but time is quadratic in the number of rows and linear
in the dimension. That is fine for the demo sample (~30k prompts of dimension 64), hopeless
for the ImageGem release (2.9M prompts of dimension 1024, ViT-H-14). `cluster_embeddings`
therefore takes one of two paths:

``direct``
    At most ``bucket_threshold`` rows: one HDBSCAN over all rows (after the reduction below),
    plain, as in the paper; like any HDBSCAN it never calls the whole input one cluster.

``pca+buckets``
    More rows than that:

    1. **reduce** — PCA to ``pca_dims`` dimensions, fitted on a random sample of
       ``pca_fit_sample`` rows and applied in blocks of ``block_rows``. Only the reduced matrix
       (n x pca_dims float32; 371 MB at 2.9M x 32) is ever allocated in full: a 2.9M x 1024
       input (5.9 GB as float16) is never copied, cast or centred as a whole. float16 input is
       accepted and cast block by block. The same reduction also runs on the direct path
       whenever the input is wider than ``pca_dims`` (it halves HDBSCAN's time on the demo's
       64 dimensions and costs almost nothing).
    2. **bucket** — a coarse MiniBatchKMeans with ``k = ceil(n / bucket_size)`` centres, fitted
       on a sample of ``kmeans_fit_sample`` reduced rows, assigns every row to a bucket. k-means
       cells are unequal, so a bucket larger than ``max_bucket_factor * bucket_size`` is split
       again by a k-means of its own (HDBSCAN's cost is quadratic in the bucket size).
    3. **cluster** — one HDBSCAN per bucket (``n_jobs`` threads; the MST code releases the GIL
       for part of its time). Cluster ids are offset bucket by bucket, in bucket order, so they
       are globally unique; ``-1`` is noise everywhere. Buckets smaller than
       ``min_cluster_size`` cannot hold a cluster and are noise as a whole. HDBSCAN never
       returns its whole input as one cluster, so a bucket that *is* one recipe (a slice of a
       recipe larger than a bucket, or a recipe k-means isolated) comes out all noise: without
       a remedy the largest recipes vanish (measured on 300k synthetic prompts with long-tailed
       recipe sizes: 0.4 % of the rows of the ten largest recipes kept; at 2.9M, 381 of 1,130
       buckets were mostly noise). Buckets left more than half noise therefore run once more,
       allowed to be a single cluster when they are dense at the scale of a typical recipe
       (`_cluster_buckets` explains how).
    4. **merge** — a true cluster cut by a k-means boundary comes out of step 3 as two
       clusters in two buckets. Halves of one cluster have centroids far closer than the
       cluster's radius (for a ball cut through its middle in 32 dimensions, about 0.3 radius),
       distinct clusters have them several radii apart; so clusters of *different* buckets
       whose centroids are closer than ``merge_ratio`` (0.5) times the larger RMS radius are
       merged (transitively). A fragment smaller than ``min_cluster_size`` is noise and stays
       noise: the recall lost there is what the benchmark's "planted rows kept" measures.

    Total cost is about ``n * bucket_size * pca_dims`` instead of ``n^2 * d``. The benchmark
    (``python -m pipelines.bench_clusters``) measures what the bucketing costs in quality as
    the adjusted Rand index against planted clusters.

Finally, clusters are renumbered by decreasing size (ties: first row), so id 0 is the largest
cluster whichever path ran. Everything random (samples, PCA, k-means) derives from ``seed``:
the same input and config give the same labels.

Inputs with fewer rows than ``min_cluster_size`` (including none) are not an error: no cluster
can exist, so every row is noise and `ClusterResult.reason` says why. A partition with only a
handful of new prompts is a legitimate input and must not fail the asset. Malformed input
(not 2-D, no columns, non-numeric, NaN or infinity) raises ``ValueError`` naming the problem.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from warehouse.progress import Progress

PATH_DIRECT = "direct"
PATH_BUCKETS = "pca+buckets"
SELECTION_METHODS = ("eom", "leaf")


@dataclass(frozen=True)
class ClusterConfig:
    """Parameters of `cluster_embeddings`; the defaults suit prompts of ViT-H-14 or the demo's CLIP.

    * ``min_cluster_size`` — smallest group of prompts that counts as a recipe.
    * ``min_samples`` — HDBSCAN's density smoothing (neighbours of a core point); ``None`` means
      ``min_cluster_size``. Smaller values label fewer points as noise.
    * ``pca_dims`` — reduce to this many dimensions first when the input is wider; ``None``
      keeps the input dimension (then the bucketed path's cost grows linearly with it).
    * ``pca_fit_sample`` — rows the PCA is fitted on (a random sample: the covariance of
      100k rows is as good as that of 2.9M for the top components, at 1/29 of the time).
    * ``bucket_threshold`` — above this many rows the bucketed path runs.
    * ``bucket_size`` — target rows per bucket; HDBSCAN time per row is linear in it.
    * ``max_bucket_factor`` — buckets above ``max_bucket_factor * bucket_size`` rows are split.
    * ``kmeans_fit_sample`` — rows the bucketing k-means is fitted on (all rows are assigned).
    * ``cluster_selection_method`` — HDBSCAN's ``"eom"`` (default) or ``"leaf"`` (many small,
      homogeneous clusters).
    * ``merge_ratio`` — bucketed path only: clusters of different buckets whose centroids lie
      closer than ``merge_ratio`` times the larger one's RMS radius are one cluster cut by a
      bucket boundary and are merged; ``None`` disables the merge.
    * ``block_rows`` — rows per block when reducing or assigning; bounds the temporaries.
    * ``n_jobs`` — threads running bucket HDBSCANs concurrently.
    * ``seed`` — every random choice derives from it.
    """

    min_cluster_size: int = 10
    min_samples: int | None = 5
    pca_dims: int | None = 32
    pca_fit_sample: int = 100_000
    bucket_threshold: int = 50_000
    bucket_size: int = 4_000
    max_bucket_factor: float = 1.5
    kmeans_fit_sample: int = 500_000
    cluster_selection_method: str = "eom"
    merge_ratio: float | None = 0.5
    block_rows: int = 65_536
    n_jobs: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_cluster_size < 2:
            raise ValueError(f"min_cluster_size must be >= 2, got {self.min_cluster_size}")
        if self.min_samples is not None and self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1 or None, got {self.min_samples}")
        if self.pca_dims is not None and self.pca_dims < 1:
            raise ValueError(f"pca_dims must be >= 1 or None, got {self.pca_dims}")
        if self.pca_fit_sample <= (self.pca_dims or 1):
            raise ValueError(
                f"pca_fit_sample ({self.pca_fit_sample}) must exceed pca_dims ({self.pca_dims})"
            )
        if self.bucket_size < self.min_cluster_size:
            raise ValueError(
                f"bucket_size ({self.bucket_size}) must be >= min_cluster_size "
                f"({self.min_cluster_size})"
            )
        if self.bucket_threshold < 1:
            raise ValueError(f"bucket_threshold must be >= 1, got {self.bucket_threshold}")
        if self.max_bucket_factor < 1.0:
            raise ValueError(f"max_bucket_factor must be >= 1, got {self.max_bucket_factor}")
        if self.kmeans_fit_sample < 1:
            raise ValueError(f"kmeans_fit_sample must be >= 1, got {self.kmeans_fit_sample}")
        if self.cluster_selection_method not in SELECTION_METHODS:
            raise ValueError(
                f"cluster_selection_method must be one of {SELECTION_METHODS}, "
                f"got {self.cluster_selection_method!r}"
            )
        if self.merge_ratio is not None and not 0.0 < self.merge_ratio < 2.0:
            raise ValueError(f"merge_ratio must be in (0, 2) or None, got {self.merge_ratio}")
        if self.block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {self.block_rows}")
        if self.n_jobs < 1:
            raise ValueError(f"n_jobs must be >= 1, got {self.n_jobs}")

    @property
    def effective_min_samples(self) -> int:
        """``min_samples`` as HDBSCAN will use it (``None`` → ``min_cluster_size``)."""
        return self.min_cluster_size if self.min_samples is None else self.min_samples


@dataclass(frozen=True)
class ClusterResult:
    """What `cluster_embeddings` found.

    ``labels[i]`` is the cluster of input row ``i`` (int64; ``-1`` = noise); cluster ids run
    from 0 to ``n_clusters - 1`` by decreasing size, and ``cluster_sizes[c]`` is the size of
    cluster ``c``. ``path`` is ``"direct"`` or ``"pca+buckets"``; ``buckets`` the number of
    HDBSCAN runs (1 on the direct path, 0 when none could run); ``reduced_dims`` the dimension
    HDBSCAN saw; ``merged`` how many bucket clusters were merged into a cluster of another
    bucket; ``second_pass`` how many buckets took the result of the second pass;
    ``seconds`` the wall time per phase (``validate``, ``reduce``, ``bucket``, ``cluster``,
    ``merge``, ``relabel``, ``total``); ``reason`` explains an all-noise result that comes from
    the input's size rather than from the data (else ``None``).
    """

    labels: np.ndarray
    cluster_sizes: np.ndarray
    n_clusters: int
    noise_share: float
    path: str
    buckets: int
    reduced_dims: int
    merged: int = 0
    second_pass: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    reason: str | None = None

    @property
    def n_rows(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_noise(self) -> int:
        return int(np.count_nonzero(self.labels < 0))


# -- public entry points ------------------------------------------------------------------------


def cluster_embeddings(
    vectors: np.ndarray, config: ClusterConfig | None = None, log: logging.Logger | None = None
) -> ClusterResult:
    """Cluster the rows of ``vectors`` (n x d, L2-normalised prompt embeddings) with HDBSCAN.

    ``vectors`` may be float16, float32 or float64 (or integer) and is never modified nor
    copied as a whole; see the module docstring for the two paths and their costs. Progress
    of the long loops (reduction blocks, buckets) is logged on ``log`` with counts, rate and ETA.

    Raises ``ValueError`` when ``vectors`` is not a 2-D numeric array with at least one column,
    or holds NaN or infinity (the message names the first offending row).
    """
    config = config or ClusterConfig()
    log = log or logging.getLogger(__name__)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    _check_shape(vectors)
    n, d = vectors.shape
    seconds["validate"] = time.perf_counter() - started

    if n < config.min_cluster_size:
        reason = (
            f"{n} row(s), fewer than min_cluster_size={config.min_cluster_size}: "
            "no cluster can form, every row is noise"
        )
        # Still reject NaN/inf: malformed input is an error at any size.
        for start, stop in _blocks(n, config.block_rows):
            _check_finite(np.asarray(vectors[start:stop], dtype=np.float32), start)
        log.info("clustering skipped: %s", reason)
        seconds["total"] = time.perf_counter() - started
        return ClusterResult(
            labels=np.full(n, -1, dtype=np.int64),
            cluster_sizes=np.zeros(0, dtype=np.int64),
            n_clusters=0,
            noise_share=1.0 if n else 0.0,
            path=PATH_DIRECT,
            buckets=0,
            reduced_dims=d,
            seconds=seconds,
            reason=reason,
        )

    tick = time.perf_counter()
    reduced = reduce_dimensions(vectors, config, log)
    seconds["reduce"] = time.perf_counter() - tick

    if n <= config.bucket_threshold:
        path = PATH_DIRECT
        seconds["bucket"] = 0.0
        tick = time.perf_counter()
        labels = _hdbscan(reduced, config)
        n_buckets = 1
        second_pass = 0
        seconds["cluster"] = time.perf_counter() - tick
        merged = 0
        seconds["merge"] = 0.0
    else:
        path = PATH_BUCKETS
        tick = time.perf_counter()
        buckets = assign_buckets(reduced, config, log)
        seconds["bucket"] = time.perf_counter() - tick
        tick = time.perf_counter()
        labels, n_buckets, second_pass = _cluster_buckets(reduced, buckets, config, log)
        seconds["cluster"] = time.perf_counter() - tick
        tick = time.perf_counter()
        merged = 0
        if config.merge_ratio is not None:
            labels, merged = merge_split_clusters(reduced, labels, buckets, config.merge_ratio)
            log.info("merged %s cluster(s) cut by bucket boundaries", f"{merged:,}")
        seconds["merge"] = time.perf_counter() - tick

    tick = time.perf_counter()
    labels, sizes = relabel_by_size(labels)
    seconds["relabel"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - started
    noise = int(np.count_nonzero(labels < 0))
    result = ClusterResult(
        labels=labels,
        cluster_sizes=sizes,
        n_clusters=int(sizes.shape[0]),
        noise_share=noise / n,
        path=path,
        buckets=n_buckets,
        reduced_dims=int(reduced.shape[1]),
        merged=merged,
        second_pass=second_pass,
        seconds=seconds,
    )
    log.info(
        "clustered %s rows (%s dims → %s, %s): %s clusters, %.1f %% noise, %s bucket(s), %.1fs",
        f"{n:,}",
        d,
        result.reduced_dims,
        path,
        f"{result.n_clusters:,}",
        100 * result.noise_share,
        f"{n_buckets:,}",
        seconds["total"],
    )
    return result


def size_histogram(result: ClusterResult, bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of cluster sizes on logarithmic bins, for the asset's plot: ``(edges, counts)``.

    Sizes are heavy-tailed (a few recipes with thousands of prompts, many with ten), so the
    edges are spaced geometrically from the smallest to the largest size; ``len(edges) ==
    len(counts) + 1`` and ``counts.sum() == result.n_clusters``. Without clusters both arrays
    are empty. Noise is not a cluster and is not counted (it is ``result.noise_share``).
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    sizes = np.asarray(result.cluster_sizes, dtype=np.int64)
    if sizes.size == 0:
        return np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64)
    low, high = float(sizes.min()), float(sizes.max())
    if low == high:
        edges = np.array([low - 0.5, high + 0.5])
    else:
        edges = np.geomspace(low, high, bins + 1)
        edges[0], edges[-1] = low, high  # exact ends: geomspace may round them
    counts, edges = np.histogram(sizes, bins=edges)
    return edges, counts.astype(np.int64)


# -- phases ---------------------------------------------------------------------------------------


def reduce_dimensions(
    vectors: np.ndarray, config: ClusterConfig, log: logging.Logger | None = None
) -> np.ndarray:
    """The n x min(d, pca_dims) float32 matrix HDBSCAN and k-means work on; checks finiteness.

    PCA is fitted on ``pca_fit_sample`` rows drawn without replacement (sorted, so the read is
    sequential), with scikit-learn's exact ``covariance_eigh`` solver: it needs one d x d
    covariance, deterministic and fast when rows far outnumber columns. The projection then
    runs block by block (cast to float32, centre, multiply), so peak extra memory is one block.
    Without reduction (``pca_dims`` None or >= d, or no more rows than ``pca_dims``) the blocks
    are only cast to float32.
    Every block is checked for NaN/infinity on the way, which costs one pass we make anyway.
    """
    log = log or logging.getLogger(__name__)
    n, d = vectors.shape
    # PCA needs more rows than components; inputs that small are cheap to cluster as they are.
    reduce = config.pca_dims is not None and config.pca_dims < d and n > config.pca_dims
    out_dims = config.pca_dims if reduce else d
    mean = components = None
    if reduce:
        from sklearn.decomposition import PCA

        rng = np.random.default_rng(config.seed)
        fit_rows = min(n, config.pca_fit_sample)
        index = np.sort(rng.choice(n, size=fit_rows, replace=False)) if fit_rows < n else None
        sample = np.asarray(vectors[index] if index is not None else vectors, dtype=np.float32)
        _check_finite(sample, 0, index)
        pca = PCA(n_components=out_dims, svd_solver="covariance_eigh").fit(sample)
        del sample
        mean = pca.mean_.astype(np.float32)
        components = np.ascontiguousarray(pca.components_.T, dtype=np.float32)
        log.info(
            "PCA %s → %s dims fitted on %s rows: %.1f %% of the variance kept",
            d,
            out_dims,
            f"{fit_rows:,}",
            100 * float(pca.explained_variance_ratio_.sum()),
        )
    out = np.empty((n, out_dims), dtype=np.float32)
    progress = Progress("reduce (rows)", n, log, every_s=10.0)
    for start, stop in _blocks(n, config.block_rows):
        block = np.asarray(vectors[start:stop], dtype=np.float32)
        _check_finite(block, start)
        if reduce:
            block = block - mean
            np.matmul(block, components, out=out[start:stop])
        else:
            out[start:stop] = block
        progress.advance(stop - start)
    return out


def assign_buckets(
    reduced: np.ndarray, config: ClusterConfig, log: logging.Logger | None = None
) -> np.ndarray:
    """Bucket id per row (int64, 0..buckets-1) from a coarse k-means, oversized cells split again.

    k = ceil(n / bucket_size) centres are fitted with MiniBatchKMeans on a sample of
    ``kmeans_fit_sample`` rows, and every row goes to its nearest centre (in blocks). k-means
    cells are unequal, and HDBSCAN is quadratic in a bucket's size, so each bucket above
    ``max_bucket_factor * bucket_size`` is split by a small k-means of its own (`_lloyd`), for
    up to three rounds (a mass of identical rows cannot be split and stays one bucket).
    """
    log = log or logging.getLogger(__name__)
    n = reduced.shape[0]
    k = max(1, math.ceil(n / config.bucket_size))
    labels = _kmeans_labels(reduced, k, config, config.seed)
    log.info("bucketing %s rows into %s k-means cells", f"{n:,}", f"{k:,}")
    limit = config.max_bucket_factor * config.bucket_size
    next_id = k
    for attempt in range(1, 4):  # each round splits every oversized bucket once
        counts = np.bincount(labels, minlength=next_id)
        oversized = np.flatnonzero(counts > limit)
        if oversized.size == 0:
            break
        log.info(
            "splitting %s oversized bucket(s) (largest %s rows > %s), round %s",
            oversized.size,
            f"{int(counts[oversized].max()):,}",
            f"{int(limit):,}",
            attempt,
        )
        for bucket in oversized:
            rows = np.flatnonzero(labels == bucket)
            parts = math.ceil(rows.size / config.bucket_size)
            sub = _lloyd(reduced[rows], parts, config.seed + 1 + int(bucket))
            moved = sub > 0  # part 0 keeps the bucket's id, the others get new ones
            labels[rows[moved]] = next_id + sub[moved] - 1
            next_id += parts - 1
    # Renumber densely (a split may leave ids unused).
    _, labels = np.unique(labels, return_inverse=True)
    return labels.astype(np.int64, copy=False)


def relabel_by_size(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber clusters 0..m-1 by decreasing size (ties: first occurrence); -1 stays -1.

    Returns ``(labels, sizes)`` with ``sizes[c]`` the size of the new cluster ``c``. Makes ids
    independent of the path and of the bucket order, and cluster 0 the largest.
    """
    labels = np.asarray(labels, dtype=np.int64)
    member = labels >= 0
    if not member.any():
        return np.full(labels.shape, -1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    ids, first, inverse, counts = np.unique(
        labels[member], return_index=True, return_inverse=True, return_counts=True
    )
    order = np.lexsort((first, -counts))  # by size descending, then by first occurrence
    rank = np.empty(ids.size, dtype=np.int64)
    rank[order] = np.arange(ids.size, dtype=np.int64)
    out = np.full(labels.shape, -1, dtype=np.int64)
    out[member] = rank[inverse]
    return out, counts[order].astype(np.int64)


def merge_split_clusters(
    reduced: np.ndarray, labels: np.ndarray, buckets: np.ndarray, ratio: float
) -> tuple[np.ndarray, int]:
    """Merge clusters of different buckets whose centroids are closer than ``ratio`` x radius.

    ``radius`` is the larger of the two clusters' RMS distances to their centroid. Candidates
    are each centroid's 8 nearest centroids; merges are transitive (connected components).
    Returns the new labels (ids not yet dense: `relabel_by_size` follows) and how many
    clusters disappeared into another.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from sklearn.neighbors import NearestNeighbors

    member = np.flatnonzero(labels >= 0)
    if member.size == 0:
        return labels, 0
    ids, lab = np.unique(labels[member], return_inverse=True)
    m = ids.size
    if m < 2:
        return labels, 0
    counts = np.bincount(lab, minlength=m)
    order = member[np.argsort(lab, kind="stable")]
    centroids, radius = _group_stats(reduced, order, counts)
    starts = np.concatenate(([0], np.cumsum(counts[:-1]))).astype(np.int64)
    bucket_of = buckets[order[starts]]
    k = min(8, m)
    dist, near = NearestNeighbors(n_neighbors=k).fit(centroids).kneighbors(centroids)
    src = np.repeat(np.arange(m), k)
    dst = near.ravel()
    close = dist.ravel() < ratio * np.maximum(radius[src], radius[dst])
    keep = close & (bucket_of[src] != bucket_of[dst]) & (src != dst)
    if not keep.any():
        return labels, 0
    graph = coo_matrix((np.ones(int(keep.sum())), (src[keep], dst[keep])), shape=(m, m))
    n_components, component = connected_components(graph, directed=False)
    out = labels.copy()
    out[member] = component[lab]
    return out, int(m - n_components)


# -- progress -------------------------------------------------------------------------------------


# -- internals ------------------------------------------------------------------------------------


def _check_shape(vectors: object) -> None:
    if not isinstance(vectors, np.ndarray):
        raise ValueError(f"vectors must be a numpy array, got {type(vectors).__name__}")
    if vectors.ndim != 2:
        raise ValueError(
            f"vectors must be 2-D (rows x dims), got {vectors.ndim}-D with shape {vectors.shape}"
        )
    if vectors.shape[1] == 0:
        raise ValueError(f"vectors must have at least one column, got shape {vectors.shape}")
    kind = vectors.dtype.kind
    if kind not in "fiub":
        raise ValueError(f"vectors must be real numbers, got dtype {vectors.dtype}")


def _check_finite(block: np.ndarray, offset: int, index: np.ndarray | None = None) -> None:
    """Raise naming the first row (in input numbering) holding NaN or infinity."""
    finite = np.isfinite(block).all(axis=1)
    if finite.all():
        return
    local = int(np.argmin(finite))
    row = int(index[local]) if index is not None else offset + local
    bad = block[local][~np.isfinite(block[local])]
    what = "NaN" if np.isnan(bad).any() else "infinity"
    raise ValueError(f"vectors hold non-finite values ({what}) in row {row}")


def _blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _hdbscan(
    points: np.ndarray, config: ClusterConfig, single_within: float | None = None
) -> np.ndarray:
    """One HDBSCAN over ``points``; fewer rows than ``min_cluster_size`` are all noise.

    ``single_within`` (the second pass of the bucketed path) lets HDBSCAN return the whole
    bucket as one cluster, made of the rows linked to it within that distance; see
    `_cluster_buckets` for why.
    """
    from sklearn.cluster import HDBSCAN

    n = points.shape[0]
    if n < config.min_cluster_size:
        return np.full(n, -1, dtype=np.int64)
    # scikit-learn needs min_samples <= rows; with fewer rows the density estimate uses them all.
    min_samples = min(config.effective_min_samples, n)
    model = HDBSCAN(
        min_cluster_size=config.min_cluster_size,
        min_samples=min_samples,
        cluster_selection_method=config.cluster_selection_method,
        allow_single_cluster=single_within is not None,
        cluster_selection_epsilon=single_within or 0.0,
        copy=False,  # `points` is always our own array (reduced, or a bucket's fancy-indexed copy)
    )
    return model.fit_predict(points).astype(np.int64, copy=False)


def _kmeans_labels(points: np.ndarray, k: int, config: ClusterConfig, seed: int) -> np.ndarray:
    """Nearest-centre id per row for a MiniBatchKMeans fitted on a sample of ``points``."""
    n = points.shape[0]
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    from sklearn.cluster import MiniBatchKMeans

    rng = np.random.default_rng(seed)
    fit_rows = min(n, max(config.kmeans_fit_sample, 3 * k))
    sample = (
        points[np.sort(rng.choice(n, size=fit_rows, replace=False))] if fit_rows < n else points
    )
    batch = min(fit_rows, max(4_096, 4 * k))
    model = MiniBatchKMeans(
        n_clusters=k,
        batch_size=batch,
        init_size=min(fit_rows, max(3 * batch, 3 * k)),
        n_init=1,
        max_no_improvement=10,
        random_state=seed,
        compute_labels=False,
    ).fit(sample)
    labels = np.empty(n, dtype=np.int64)
    for start, stop in _blocks(n, config.block_rows):
        labels[start:stop] = model.predict(points[start:stop])
    return labels


def _lloyd(
    points: np.ndarray, k: int, seed: int, iterations: int = 10, sample: int = 4_096
) -> np.ndarray:
    """Labels of a small k-means: k-means++ seeds and a few Lloyd steps on a sample, then all rows.

    For the splits of oversized buckets (k of 2-4 on ~10k rows), where a coarse split is all
    that is needed. MiniBatchKMeans costs about a second per such call, mostly fixed overhead
    (thread-pool limits set and reset at every step): minutes for the ~200 splits of the
    full-size benchmark; this takes milliseconds. Identical rows cannot seed a second centre:
    they all keep label 0.
    """
    rng = np.random.default_rng(seed)
    n = points.shape[0]
    fit = points[np.sort(rng.choice(n, size=sample, replace=False))] if n > sample else points
    x = fit.astype(np.float32)
    centres = [x[rng.integers(x.shape[0])]]
    closest = _square_distances(x, centres[0])
    while len(centres) < min(k, x.shape[0]):
        total = float(closest.sum(dtype=np.float64))
        if total <= 0.0:
            break
        pick = x[rng.choice(x.shape[0], p=closest.astype(np.float64) / total)]
        centres.append(pick)
        closest = np.minimum(closest, _square_distances(x, pick))
    c = np.array(centres)
    labels = np.full(x.shape[0], -1, dtype=np.int64)
    for _ in range(iterations):
        new = np.stack([_square_distances(x, centre) for centre in c], 1).argmin(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in np.flatnonzero(np.bincount(labels, minlength=c.shape[0])):
            c[j] = x[labels == j].mean(axis=0)
    rows = points.astype(np.float32, copy=False)
    return np.stack([_square_distances(rows, centre) for centre in c], 1).argmin(axis=1)


def _square_distances(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
    diff = x - centre
    return np.einsum("ij,ij->i", diff, diff)


def _cluster_buckets(
    reduced: np.ndarray, buckets: np.ndarray, config: ClusterConfig, log: logging.Logger
) -> tuple[np.ndarray, int, int]:
    """HDBSCAN inside each bucket; a second pass where a bucket came out mostly noise.

    Returns ``(labels, buckets, second_pass)``: cluster ids offset in bucket order so that they
    are globally unique, the number of buckets, and how many buckets took the second pass's
    result.

    Why a second pass: HDBSCAN never selects the root of its cluster tree, i.e. never calls
    its whole input one cluster. A bucket that holds a single recipe (a slice of a recipe too
    large for one bucket, or a recipe k-means gave a cell of its own) is such a root and comes
    out all noise, or shattered into density fluctuations; in the global tree the recipe would
    have had neighbours to separate from. So each bucket left more than half noise runs again
    with ``allow_single_cluster`` and ``cluster_selection_epsilon`` = 2 x the median RMS radius
    of the clusters found in the first pass: the bucket may now be one cluster, made of the
    rows linked to it by mutual-reachability edges no longer than that (scikit-learn's rule
    for a single cluster with an epsilon), and sub-clusters split off at shorter distances
    are not kept apart. A dense slice (internal edges about one radius) becomes a cluster; a
    bucket of scattered one-off prompts (edges of the order of the bucket's size) stays noise.
    The second result replaces the first only when it has fewer noise rows. Buckets that were
    not mostly noise keep the plain result: with ``allow_single_cluster`` EOM lumps
    neighbouring recipes of a bucket together more easily.
    """
    order = np.argsort(buckets, kind="stable")
    counts = np.bincount(buckets)
    bounds = np.concatenate(([0], np.cumsum(counts)))
    n_buckets = int(counts.size)
    log.info(
        "HDBSCAN in %s buckets (sizes %s..%s, median %s) on %s thread(s)",
        f"{n_buckets:,}",
        f"{int(counts.min()):,}",
        f"{int(counts.max()):,}",
        f"{int(np.median(counts)):,}",
        config.n_jobs,
    )

    def rows_of(bucket: int) -> np.ndarray:
        return order[bounds[bucket] : bounds[bucket + 1]]

    results = _run_buckets(
        lambda b: _hdbscan(reduced[rows_of(b)], config),
        list(range(n_buckets)),
        counts,
        config.n_jobs,
        Progress("HDBSCAN (buckets)", n_buckets, log, every_s=10.0),
    )
    labels = _assemble(results, order, bounds, reduced.shape[0])
    noisy = [
        b
        for b in range(n_buckets)
        if counts[b] >= config.min_cluster_size and np.mean(results[b] < 0) > 0.5
    ]
    if not noisy:
        return labels, n_buckets, 0
    within = 2.0 * _typical_radius(reduced, labels, order, bounds, noisy)
    log.info(
        "%s bucket(s) mostly noise: again, as one cluster if linked within %.4g "
        "(2 x the typical radius)",
        f"{len(noisy):,}",
        within,
    )
    again = _run_buckets(
        lambda b: _hdbscan(reduced[rows_of(b)], config, single_within=within),
        noisy,
        counts,
        config.n_jobs,
        Progress("HDBSCAN second pass (buckets)", len(noisy), log, every_s=10.0),
    )
    taken = 0
    for bucket, local in zip(noisy, again, strict=True):
        if np.count_nonzero(local < 0) < np.count_nonzero(results[bucket] < 0):
            results[bucket] = local
            taken += 1
    return _assemble(results, order, bounds, reduced.shape[0]), n_buckets, taken


def _run_buckets(
    run: Callable[[int], np.ndarray],
    todo: list[int],
    counts: np.ndarray,
    n_jobs: int,
    progress: Progress,
) -> list[np.ndarray]:
    """``run(b)`` for each bucket of ``todo``, on ``n_jobs`` threads; results in ``todo`` order.

    Larger buckets start first so that both threads stay busy to the end; results are placed
    by position, so the outcome does not depend on scheduling.
    """
    schedule = sorted(range(len(todo)), key=lambda i: (-int(counts[todo[i]]), i))
    results: list[np.ndarray | None] = [None] * len(todo)
    if n_jobs == 1:
        for i in schedule:
            results[i] = run(todo[i])
            progress.advance()
    else:
        with ThreadPoolExecutor(max_workers=n_jobs) as pool:
            futures = {i: pool.submit(run, todo[i]) for i in schedule}
            for i in schedule:
                results[i] = futures[i].result()
                progress.advance()
    return [r for r in results if r is not None]


def _assemble(
    results: list[np.ndarray], order: np.ndarray, bounds: np.ndarray, n: int
) -> np.ndarray:
    """Global labels from per-bucket ones: each bucket's ids offset past the previous ones."""
    labels = np.full(n, -1, dtype=np.int64)
    offset = 0
    for bucket, local in enumerate(results):
        rows = order[bounds[bucket] : bounds[bucket + 1]]
        member = local >= 0
        labels[rows[member]] = local[member] + offset
        offset += int(local.max()) + 1 if member.any() else 0
    return labels


def _group_stats(
    reduced: np.ndarray, rows: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and RMS radius of consecutive groups of ``rows`` (sizes ``counts``, all > 0)."""
    points = reduced[rows].astype(np.float64)
    starts = np.concatenate(([0], np.cumsum(counts[:-1]))).astype(np.int64)
    sizes = counts.astype(np.float64)
    centroids = np.add.reduceat(points, starts, axis=0) / sizes[:, None]
    square = np.add.reduceat(np.einsum("ij,ij->i", points, points), starts) / sizes
    radius = np.sqrt(np.maximum(square - np.einsum("ij,ij->i", centroids, centroids), 0.0))
    return centroids, radius


def _typical_radius(
    reduced: np.ndarray,
    labels: np.ndarray,
    order: np.ndarray,
    bounds: np.ndarray,
    noisy: list[int],
) -> float:
    """The median RMS radius of the clusters found so far: the scale of a typical recipe.

    When no bucket produced any cluster, the median RMS radius of the ``noisy`` buckets: with
    no recipe to compare with, each bucket is taken for one recipe (or one recipe's slice).
    """
    member = np.flatnonzero(labels >= 0)
    if member.size:
        _, lab = np.unique(labels[member], return_inverse=True)
        counts = np.bincount(lab)
        _, radius = _group_stats(reduced, member[np.argsort(lab, kind="stable")], counts)
        return max(float(np.median(radius)), 1e-12)
    rows = np.concatenate([order[bounds[b] : bounds[b + 1]] for b in noisy])
    _, radius = _group_stats(reduced, rows, np.diff(bounds)[noisy])
    return max(float(np.median(radius)), 1e-12)
