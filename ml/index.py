"""Approximate nearest-neighbour index over the embeddings stage's vectors (usearch HNSW).

The embeddings stage stores one L2-normalised float32 vector per image (CLIP; d = 64 for the
tests and the demo's tiny encoder, 1024 for ViT-H-14), keyed by the image's int64 ``imageId``.
This module turns those into a searchable index and measures how good it is:

* `build_index` validates the vectors (shape, finiteness, unit norm, unique non-negative ids)
  and builds a usearch HNSW graph under an `IndexConfig`;
* `VectorIndex` answers top-k queries with cosine similarities, by vector or by a stored id
  (optionally leaving the query's own id out), looks a stored vector up, and saves / loads
  itself as one file;
* `exact_search` is the brute-force reference (blocked numpy dot products) and
  `recall_at_k` the figure the ``image_index`` asset reports: the mean fraction of the exact
  top-k the index returns;
* `similar_by_id` / `similar_by_vector` give the small ``[(id, similarity), ...]`` lists the CLI
  prints.

Conventions shared by every search here: results are ``(ids int64, similarities float32)``
sorted by decreasing similarity; a row with fewer than ``k`` results is padded with id ``-1``
and similarity ``nan`` (which is why ids must be non-negative). Similarity is cosine
similarity, ``1 - usearch distance`` for the ``cos`` and ``ip`` metrics.

Why usearch rather than faiss: a small wheel with no BLAS, HNSW with cosine built in, and a
single-file save/load. Its file format is used as is (never pickle) with a 48-byte trailer
appended by `VectorIndex.save` (magic, payload length, SHA-256): usearch loads a file whose
graph bytes are damaged without complaint and then crashes the process on the first search,
so `VectorIndex.load` checks the digest before handing the file to usearch. usearch ignores the
trailer, so the file still opens with usearch alone.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from usearch.index import BatchMatches, Index, MetricKind

from warehouse.files import atomic_local_path

Metric = Literal["cos", "ip"]
Quantisation = Literal["f32", "f16", "i8"]

# The pipeline normalises embeddings in float32 (or float16 on a GPU: a relative error of at
# most 2**-11 per component), so a norm further than this from 1 means a stage forgot to.
NORM_TOLERANCE = 1e-3
# Rows handed to usearch per `add` call: bounds the copy made by the seeded insertion order.
ADD_CHUNK = 65_536
# `exact_search` tiles queries x stored vectors so the score block stays at
# QUERY_BLOCK x VECTOR_BLOCK float32 (16 MiB) however large the collection is.
QUERY_BLOCK = 256
VECTOR_BLOCK = 16_384

_TRAILER_MAGIC = b"IGEMVIX1"
_TRAILER = struct.Struct("<8sQ32s")  # magic, payload length in bytes, SHA-256 of the payload
_READ_CHUNK = 8 << 20
_METRICS = {"cos": MetricKind.Cos, "ip": MetricKind.IP}


@dataclass(frozen=True)
class IndexConfig:
    """How the HNSW graph is built and searched.

    ``metric``: ``"cos"`` (usearch normalises every vector itself) or ``"ip"`` (inner product;
    the same ranking for the unit vectors this module insists on, minus the normalisation).
    Either way similarity is ``1 - distance``. ``connectivity`` is HNSW's M (links per node:
    more links, better recall, more memory); ``expansion_add`` / ``expansion_search`` are the
    candidate-list sizes (efConstruction / ef) at build and query time, the recall-vs-speed
    knobs. ``dtype`` is how vectors are stored: ``"f32"`` exact, ``"f16"`` half the memory at a
    barely measurable recall cost, ``"i8"`` a quarter of the memory with a visible recall cost
    (components scaled by 127, which is only meaningful because vectors are unit-norm); the
    recall the ``image_index`` asset reports says what a choice costs on real data.
    ``seed`` fixes the random order in which vectors are inserted: HNSW graphs built from input
    sorted by cluster or time link early nodes only to their own kind, and a fixed seed makes
    the build reproducible (exactly so with ``threads=1``; several threads insert concurrently).
    ``threads`` is for building and searching, 0 meaning all cores.
    """

    metric: Metric = "cos"
    connectivity: int = 16
    expansion_add: int = 128
    expansion_search: int = 64
    dtype: Quantisation = "f32"
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        if self.metric not in get_args(Metric):
            raise ValueError(f"metric must be one of {get_args(Metric)}, not {self.metric!r}")
        if self.dtype not in get_args(Quantisation):
            raise ValueError(f"dtype must be one of {get_args(Quantisation)}, not {self.dtype!r}")
        for name in ("connectivity", "expansion_add", "expansion_search"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an integer >= 2, not {value!r}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(
                f"threads must be an integer >= 0 (0: all cores), not {self.threads!r}"
            )


# -- validation -------------------------------------------------------------------------------


def _as_ids(ids: np.ndarray, what: str = "ids") -> np.ndarray:
    """``ids`` as a non-empty 1-D int64 array of unique non-negative values, or a ValueError
    saying which rule it breaks (-1 is the padding id, and duplicates would make one image's
    vector silently shadow another's)."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty: nothing to index")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be integers (imageId), got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.unsignedinteger) and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{what} must fit in int64, got {int(arr.max())}")
    arr = arr.astype(np.int64, copy=False)
    if arr.min() < 0:
        bad = arr[arr < 0][:5].tolist()
        raise ValueError(f"{what} must be non-negative (-1 marks padding), got {bad}")
    uniq, counts = np.unique(arr, return_counts=True)
    if len(uniq) != len(arr):
        dupes = uniq[counts > 1]
        raise ValueError(
            f"{what} must be unique: {len(dupes)} duplicated, e.g. {dupes[:5].tolist()}"
        )
    return arr


def _as_matrix(values: np.ndarray, what: str, ndim: int | None = None) -> np.ndarray:
    """``values`` as a non-empty C-contiguous float32 (n, d) matrix with ``d == ndim`` when
    given; finiteness and norms are `_row_norms`'s job."""
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (n, d) array, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{what} is empty: no vectors")
    if arr.shape[1] == 0:
        raise ValueError(f"{what} have dimension 0")
    if ndim is not None and arr.shape[1] != ndim:
        raise ValueError(f"{what} have dimension {arr.shape[1]}, expected {ndim}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} must be floating point, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _row_norms(matrix: np.ndarray, what: str, ids: np.ndarray | None = None) -> np.ndarray:
    """Each row's L2 norm, computed in float64 without an (n, d) temporary; raises if a row is
    non-finite (a NaN or inf anywhere in a row makes its squared norm NaN or inf) or zero
    (cosine similarity is undefined for it)."""
    squares = np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64)
    bad = ~np.isfinite(squares)
    if bad.any():
        raise ValueError(f"{what} contain NaN or infinite values, {_rows(bad, ids)}")
    zero = squares == 0.0
    if zero.any():
        raise ValueError(f"{what} contain all-zero vectors (no direction), {_rows(zero, ids)}")
    return np.sqrt(squares)


def _rows(mask: np.ndarray, ids: np.ndarray | None) -> str:
    rows = np.flatnonzero(mask)
    where = f"rows {rows[:5].tolist()}"
    if ids is not None:
        where += f" (ids {ids[rows[:5]].tolist()})"
    return f"{len(rows)} in all, first {where}"


def _stored_vectors(ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(ids, vectors)`` of a collection: matching lengths, unit-norm rows (the
    pipeline's contract, which makes dot product = cosine in `exact_search` and keeps ``i8``
    quantisation in range)."""
    ids = _as_ids(ids)
    matrix = _as_matrix(vectors, "vectors")
    if len(matrix) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(matrix)} vectors")
    norms = _row_norms(matrix, "vectors", ids)
    off = np.abs(norms - 1.0) > NORM_TOLERANCE
    if off.any():
        first = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"vectors must be L2-normalised: {_rows(off, ids)}; row {first} has norm "
            f"{norms[first]:.6g}"
        )
    return ids, matrix


def _queries(queries: np.ndarray, ndim: int) -> tuple[np.ndarray, bool]:
    """Queries as a unit-norm float32 (m, d) matrix, and whether a single (d,) vector came in.
    Normalising here keeps similarities cosine under the ``ip`` metric too."""
    arr = np.asarray(queries)
    single = arr.ndim == 1
    matrix = _as_matrix(arr[None, :] if single else arr, "queries", ndim)
    norms = _row_norms(matrix, "queries")
    return (matrix / norms[:, None].astype(np.float32)), single


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, not {k!r}")
    return int(k)


def _exclusions(exclude_ids: np.ndarray | int | None, m: int) -> np.ndarray | None:
    if exclude_ids is None:
        return None
    arr = np.atleast_1d(np.asarray(exclude_ids))
    if arr.shape != (m,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"exclude_ids must hold one integer id per query ({m}), got {arr.dtype} {arr.shape}"
        )
    return arr.astype(np.int64, copy=False)


def _drop_excluded(
    ids: np.ndarray, sims: np.ndarray, exclude: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's excluded id and keep the first ``k`` of what remains, padding with
    (-1, nan). By id, not by position: a near-duplicate image with the very same embedding
    ties with the query and may rank first, so "drop rank 0" would drop the wrong image."""
    if exclude is not None:
        hit = ids == exclude[:, None]
        order = np.argsort(hit, axis=1, kind="stable")  # non-excluded first, order kept
        ids = np.take_along_axis(ids, order, axis=1)
        sims = np.take_along_axis(sims, order, axis=1)
        ids = np.where(np.sort(hit, axis=1), -1, ids)
        sims = np.where(ids < 0, np.float32(np.nan), sims)
    m, have = ids.shape
    if have >= k:
        return ids[:, :k], sims[:, :k]
    pad_ids = np.full((m, k - have), -1, dtype=np.int64)
    pad_sims = np.full((m, k - have), np.nan, dtype=np.float32)
    return np.hstack([ids, pad_ids]), np.hstack([sims, pad_sims])


# -- the index --------------------------------------------------------------------------------


class VectorIndex:
    """A usearch HNSW index over unit vectors keyed by non-negative int64 ids.

    Searches return ``(ids, similarities)``: int64 and float32 arrays of shape (m, k) for an
    (m, d) query matrix and (k,) for a single (d,) vector, best first, padded with (-1, nan)
    when fewer than ``k`` are found (an index smaller than ``k``, or ``k`` beyond what the
    graph reaches). Build one with `build_index` or `VectorIndex.load`.
    """

    def __init__(self, index: Index, *, threads: int = 0) -> None:
        if index.metric_kind not in _METRICS.values():
            raise ValueError(
                f"similarity = 1 - distance needs the cos or ip metric, not {index.metric_kind}"
            )
        if index.multi:
            raise ValueError("a multi-vector usearch index holds several vectors per id")
        self._index = index
        self._threads = threads

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id: object) -> bool:
        if isinstance(image_id, bool) or not isinstance(image_id, int | np.integer):
            return False
        return image_id >= 0 and bool(self._index.contains(np.uint64(image_id)))

    def __repr__(self) -> str:
        return f"VectorIndex({len(self)} x {self.ndim}, {self.metric}, {self.dtype})"

    @property
    def ndim(self) -> int:
        """The vectors' dimension d."""
        return int(self._index.ndim)

    @property
    def metric(self) -> str:
        return "cos" if self._index.metric_kind == MetricKind.Cos else "ip"

    @property
    def dtype(self) -> str:
        """How vectors are stored ("f32", "f16", "i8")."""
        return str(self._index.dtype).rsplit(".", 1)[-1].lower()

    def search(
        self, queries: np.ndarray, k: int, *, exclude_ids: np.ndarray | int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` stored ids by cosine similarity to each query (any non-zero norm).

        ``exclude_ids`` (one id per query) leaves that id out of its query's results while
        still returning ``k`` of the others: usearch is asked for ``k + 1``.
        """
        k = _check_k(k)
        matrix, single = _queries(queries, self.ndim)
        exclude = _exclusions(exclude_ids, len(matrix))
        if len(self) == 0:
            raise ValueError("the index is empty: nothing to search")
        fetch = k + (exclude is not None)
        ids, sims = self._raw_search(matrix, fetch)
        ids, sims = _drop_excluded(ids, sims, exclude, k)
        return (ids[0], sims[0]) if single else (ids, sims)

    def _raw_search(self, matrix: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        matches = self._index.search(matrix, fetch, threads=self._threads)
        return _unpack(matches, len(matrix), fetch)

    def search_by_id(
        self, ids: np.ndarray | int, k: int, *, exclude_self: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` neighbours of images already in the index, queried with their stored
        vectors; ``exclude_self`` drops each query's own id (it is its own best match).
        A scalar id gives (k,) results, an array of m ids (m, k)."""
        single = np.ndim(ids) == 0
        query_ids = np.atleast_1d(np.asarray(ids))
        vectors = self.vectors(query_ids)
        exclude = query_ids if exclude_self else None
        found, sims = self.search(vectors, k, exclude_ids=exclude)
        return (found[0], sims[0]) if single else (found, sims)

    def vector(self, image_id: int) -> np.ndarray:
        """The stored vector of one id as float32 (d,); dequantised, so approximate for f16/i8.
        KeyError if the id is not in the index."""
        return self.vectors(np.array([image_id]))[0]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of several ids as float32 (m, d); KeyError naming the ids that
        are not in the index."""
        arr = np.atleast_1d(np.asarray(ids))
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"ids must be a non-empty 1-D integer array, got {arr.dtype} {arr.shape}"
            )
        arr = arr.astype(np.int64, copy=False)
        present = arr >= 0
        present[present] = np.asarray(self._index.contains(arr[present].astype(np.uint64)))
        if not present.all():
            missing = arr[~present]
            raise KeyError(f"{len(missing)} ids not in the index, e.g. {missing[:5].tolist()}")
        got = self._index.get(arr.astype(np.uint64), dtype=np.float32)
        return np.stack(got).astype(np.float32, copy=False)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to one local file atomically (temp file beside it, then rename):
        usearch's own format followed by the checksum trailer `load` verifies."""
        with atomic_local_path(os.fspath(path)) as tmp:
            self._index.save(tmp)
            length = os.path.getsize(tmp)
            digest = _digest(tmp, length)
            with open(tmp, "ab") as handle:
                handle.write(_TRAILER.pack(_TRAILER_MAGIC, length, digest))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        expected_dim: int | None = None,
        *,
        expansion_search: int = IndexConfig.expansion_search,
        threads: int = 0,
    ) -> VectorIndex:
        """Read an index written by `save`.

        FileNotFoundError for a missing file; ValueError naming the path for a file that is
        truncated, damaged (checksum mismatch), not a usearch index, or whose dimension is
        not ``expected_dim`` (an index built by another encoder). The file is hashed in full
        before usearch sees it. ``expansion_search`` is not stored in the file, hence a
        parameter.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no vector index file at {path}")
        length, saved_digest = _check_trailer(path)
        try:
            meta = Index.metadata(path)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"{path} is not a usearch index: {exc}") from exc
        if not meta:
            raise ValueError(f"{path} is not a usearch index (no readable header)")
        dim = int(meta["dimensions"])
        if expected_dim is not None and dim != expected_dim:
            raise ValueError(
                f"{path} holds {dim}-dimensional vectors, expected {expected_dim} "
                "(built by a different encoder?)"
            )
        if _digest(path, length) != saved_digest:
            raise ValueError(f"{path} is damaged: its SHA-256 does not match the one saved")
        try:
            index = Index.restore(path, expansion_search=expansion_search)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"{path} could not be read as a usearch index: {exc}") from exc
        if index is None:
            raise ValueError(f"{path} is not a usearch index (no readable header)")
        return cls(index, threads=threads)


def _digest(path: str, length: int) -> bytes:
    """SHA-256 of the first ``length`` bytes of ``path``, read in chunks."""
    sha = hashlib.sha256()
    remaining = length
    with open(path, "rb") as handle:
        while remaining:
            chunk = handle.read(min(_READ_CHUNK, remaining))
            if not chunk:
                raise ValueError(f"{path} is truncated")
            sha.update(chunk)
            remaining -= len(chunk)
    return sha.digest()


def _check_trailer(path: str) -> tuple[int, bytes]:
    """The payload length and digest the trailer declares, once the length matches the file's
    size (cheap: the digest itself is checked by `load` after the dimension)."""
    size = os.path.getsize(path)
    if size < _TRAILER.size:
        raise ValueError(f"{path} is too short ({size} bytes) to be a saved vector index")
    with open(path, "rb") as handle:
        handle.seek(size - _TRAILER.size)
        magic, length, digest = _TRAILER.unpack(handle.read(_TRAILER.size))
    if magic != _TRAILER_MAGIC:
        raise ValueError(
            f"{path} is not a vector index saved by VectorIndex.save, or it is truncated "
            "(no checksum trailer)"
        )
    if length != size - _TRAILER.size:
        raise ValueError(f"{path} is damaged: trailer says {length} bytes, file has {size}")
    return length, digest


def build_index(
    ids: np.ndarray, vectors: np.ndarray, config: IndexConfig | None = None
) -> VectorIndex:
    """An HNSW index over ``vectors`` (n, d) keyed by ``ids`` (n,).

    Raises ValueError, saying what is wrong, for empty input, a shape mismatch, NaN/inf or
    non-normalised vectors, and negative or duplicate ids: an index built from bad rows would
    answer queries without complaint, just wrongly.
    """
    config = config or IndexConfig()
    ids, matrix = _stored_vectors(ids, vectors)
    index = Index(
        ndim=matrix.shape[1],
        metric=config.metric,
        dtype=config.dtype,
        connectivity=config.connectivity,
        expansion_add=config.expansion_add,
        expansion_search=config.expansion_search,
    )
    keys = ids.astype(np.uint64)
    order = np.random.default_rng(config.seed).permutation(len(ids))
    for start in range(0, len(order), ADD_CHUNK):
        rows = order[start : start + ADD_CHUNK]
        index.add(keys[rows], matrix[rows], threads=config.threads)
    return VectorIndex(index, threads=config.threads)


def _unpack(matches: object, m: int, fetch: int) -> tuple[np.ndarray, np.ndarray]:
    """usearch's answer as padded (m, fetch) arrays: a batch gives (m, fetch) keys with
    ``counts`` valid per row, a single query (usearch returns `Matches` for m == 1) only the
    valid ones."""
    ids = np.full((m, fetch), -1, dtype=np.int64)
    sims = np.full((m, fetch), np.nan, dtype=np.float32)
    if isinstance(matches, BatchMatches):
        valid = np.arange(fetch)[None, :] < np.asarray(matches.counts)[:, None]
        keys = np.asarray(matches.keys).reshape(m, fetch)
        dist = np.asarray(matches.distances, dtype=np.float32).reshape(m, fetch)
        ids[valid] = keys[valid].astype(np.int64)
        sims[valid] = 1.0 - dist[valid]
    else:
        keys = np.asarray(matches.keys)
        ids[0, : len(keys)] = keys.astype(np.int64)
        sims[0, : len(keys)] = 1.0 - np.asarray(matches.distances, dtype=np.float32)
    return ids, sims


# -- exact reference and quality -----------------------------------------------------------------


def exact_search(
    ids: np.ndarray,
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    exclude_ids: np.ndarray | int | None = None,
    query_block: int = QUERY_BLOCK,
    vector_block: int = VECTOR_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` by dot product (= cosine: ``vectors`` must be unit-norm, queries
    are normalised), with `VectorIndex.search`'s shapes, padding and ``exclude_ids``.

    The exact answer `recall_at_k` measures the index against. Scores are computed tile by
    tile (``query_block`` queries x ``vector_block`` stored vectors) keeping a running top-k
    per query, so memory stays bounded and each query block reads the collection once. Ties
    are ordered by storage row; which of several vectors tied at the k-th place is kept is
    unspecified.
    """
    k = _check_k(k)
    if query_block < 1 or vector_block < 1:
        raise ValueError("query_block and vector_block must be positive")
    ids, matrix = _stored_vectors(ids, vectors)
    q, single = _queries(queries, matrix.shape[1])
    exclude = _exclusions(exclude_ids, len(q))
    fetch = min(k + (exclude is not None), len(ids))
    out_ids = np.empty((len(q), fetch), dtype=np.int64)
    out_sims = np.empty((len(q), fetch), dtype=np.float32)
    for q_start in range(0, len(q), query_block):
        block = q[q_start : q_start + query_block]
        best_sims = np.empty((len(block), 0), dtype=np.float32)
        best_rows = np.empty((len(block), 0), dtype=np.int64)
        for v_start in range(0, len(matrix), vector_block):
            scores = block @ matrix[v_start : v_start + vector_block].T
            rows = np.broadcast_to(
                np.arange(v_start, v_start + scores.shape[1], dtype=np.int64), scores.shape
            )
            best_sims = np.hstack([best_sims, scores])
            best_rows = np.hstack([best_rows, rows])
            if best_sims.shape[1] > fetch:
                keep = np.argpartition(-best_sims, fetch - 1, axis=1)[:, :fetch]
                best_sims = np.take_along_axis(best_sims, keep, axis=1)
                best_rows = np.take_along_axis(best_rows, keep, axis=1)
        order = np.lexsort((best_rows, -best_sims), axis=-1)
        out_sims[q_start : q_start + len(block)] = np.take_along_axis(best_sims, order, axis=1)
        out_ids[q_start : q_start + len(block)] = ids[np.take_along_axis(best_rows, order, axis=1)]
    found, sims = _drop_excluded(out_ids, out_sims, exclude, k)
    return (found[0], sims[0]) if single else (found, sims)


def recall_at_k(
    index: VectorIndex,
    ids: np.ndarray,
    vectors: np.ndarray,
    k: int = 10,
    n_queries: int = 1000,
    seed: int = 0,
) -> float:
    """Mean fraction of the exact top-``k`` neighbours that the index returns (recall@k).

    Queries are ``n_queries`` stored vectors sampled without replacement (all of them when
    there are fewer), each searched with its own id excluded on both sides, since finding
    itself says nothing about the graph. ``ids`` / ``vectors`` must be what the index was
    built from. Exact ties at the k-th place can cost a perfect index a little recall.
    """
    k = _check_k(k)
    if isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < 1:
        raise ValueError(f"n_queries must be a positive integer, not {n_queries!r}")
    ids, matrix = _stored_vectors(ids, vectors)
    if len(ids) < 2:
        raise ValueError("recall needs at least 2 vectors: each query's neighbours exclude itself")
    if len(index) != len(ids):
        raise ValueError(
            f"the index holds {len(index)} vectors but {len(ids)} were given: recall must be "
            "measured against the vectors the index was built from"
        )
    rows = np.random.default_rng(seed).choice(
        len(ids), size=min(n_queries, len(ids)), replace=False
    )
    query_ids = ids[rows]
    missing = [int(i) for i in query_ids if int(i) not in index]
    if missing:
        raise ValueError(f"ids {missing[:5]} are not in the index it was supposedly built from")
    exact, _ = exact_search(ids, matrix, matrix[rows], k, exclude_ids=query_ids)
    found, _ = index.search(matrix[rows], k, exclude_ids=query_ids)
    wanted = exact >= 0
    hits = ((exact[:, :, None] == found[:, None, :]) & wanted[:, :, None]).any(axis=2)
    return float(np.mean(hits.sum(axis=1) / wanted.sum(axis=1)))


# -- what the CLI prints ----------------------------------------------------------------------


def similar_by_id(index: VectorIndex, image_id: int, k: int = 10) -> list[tuple[int, float]]:
    """The ``k`` images most similar to a stored one, itself left out, as
    ``[(imageId, cosine similarity), ...]`` best first (shorter when the index is small).
    KeyError if ``image_id`` is not in the index."""
    found, sims = index.search_by_id(image_id, k, exclude_self=True)
    return _pairs(found, sims)


def similar_by_vector(
    index: VectorIndex, vector: np.ndarray, k: int = 10
) -> list[tuple[int, float]]:
    """The ``k`` stored images most similar to one (d,) vector (say a text embedding), as
    ``[(imageId, cosine similarity), ...]`` best first."""
    if np.ndim(vector) != 1:
        raise ValueError(f"expected one (d,) vector, got shape {np.shape(vector)}")
    found, sims = index.search(vector, k)
    return _pairs(found, sims)


def _pairs(found: np.ndarray, sims: np.ndarray) -> list[tuple[int, float]]:
    return [(int(i), float(s)) for i, s in zip(found, sims, strict=True) if i >= 0]
