"""ImageGem's preference pairs: within each prompt cluster, the best image against the worst.

The paper pairs, in every HDBSCAN cluster of prompt embeddings, the image a preference scorer
rates highest with the one it rates lowest, and fine-tunes on those pairs with Diffusion-DPO.
:func:`min_max_pairs` does that, optionally for the top-k against the bottom-k (the i-th best
against the i-th worst, so no image is in two pairs), vectorised over all clusters at once.

What is never paired, and counted: noise (cluster −1), images without a finite score, clusters
left with a single image, pairs whose two scores are equal (nothing to prefer) or closer than
``min_margin``. Ties in score are broken by imageId, so the pairs are the same on every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PairingConfig:
    """``top_k`` pairs per cluster at most (1: the paper's best vs worst); pairs whose score
    difference is at most ``min_margin`` are dropped."""

    top_k: int = 1
    min_margin: float = 0.0

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not np.isfinite(self.min_margin) or self.min_margin < 0:
            raise ValueError(f"min_margin must be finite and >= 0, got {self.min_margin}")


@dataclass
class Pairs:
    """Index pairs into the input arrays (winner, loser), and what was left out."""

    winner: np.ndarray  # int64 (p,) row indices of the inputs
    loser: np.ndarray  # int64 (p,)
    clusters: int = 0  # clusters (noise excluded) with at least one scored image
    clusters_paired: int = 0
    single_image_clusters: int = 0
    all_equal_clusters: int = 0  # clusters of 2+ images whose scores are all equal
    noise_images: int = 0
    unscored_images: int = 0  # NaN or infinite score
    dropped_pairs: dict[str, int] = field(default_factory=dict)  # reason → pairs

    def __len__(self) -> int:
        return len(self.winner)


def min_max_pairs(
    cluster_ids: np.ndarray, image_ids: np.ndarray, scores: np.ndarray, config: PairingConfig
) -> Pairs:
    """Best-vs-worst pairs within each cluster (see the module docstring).

    ``cluster_ids``, ``image_ids`` and ``scores`` are aligned (n,); the result indexes them.
    """
    cluster_ids = np.asarray(cluster_ids, dtype=np.int64)
    image_ids = np.asarray(image_ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if not (cluster_ids.shape == image_ids.shape == scores.shape) or cluster_ids.ndim != 1:
        raise ValueError(
            f"cluster_ids, image_ids and scores must be aligned 1-d arrays, got "
            f"{cluster_ids.shape}, {image_ids.shape}, {scores.shape}"
        )
    noise = cluster_ids < 0
    finite = np.isfinite(scores)
    keep = np.flatnonzero(~noise & finite)
    empty = np.zeros(0, np.int64)
    result = Pairs(
        empty, empty, noise_images=int(noise.sum()), unscored_images=int((~noise & ~finite).sum())
    )
    if keep.size == 0:
        return result
    # clusters ascending, then score descending, then imageId ascending (deterministic ties)
    order = keep[np.lexsort((image_ids[keep], -scores[keep], cluster_ids[keep]))]
    sorted_clusters = cluster_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_clusters[1:] != sorted_clusters[:-1]])
    sizes = np.diff(np.r_[starts, order.size])
    result.clusters = int(starts.size)
    result.single_image_clusters = int((sizes == 1).sum())
    best = scores[order[starts]]
    worst = scores[order[starts + sizes - 1]]
    result.all_equal_clusters = int(((sizes >= 2) & (best == worst)).sum())
    # pair i (0-based) of a cluster: its i-th best against its i-th worst, for i < min(k, n//2)
    per_cluster = np.minimum(config.top_k, sizes // 2)
    cluster_of_pair = np.repeat(np.arange(starts.size), per_cluster)
    rank = np.arange(per_cluster.sum()) - np.repeat(
        np.cumsum(per_cluster) - per_cluster, per_cluster
    )
    winner = order[starts[cluster_of_pair] + rank]
    loser = order[starts[cluster_of_pair] + sizes[cluster_of_pair] - 1 - rank]
    margin = scores[winner] - scores[loser]
    equal = margin <= 0
    small = ~equal & (margin <= config.min_margin)
    if equal.any():
        result.dropped_pairs["equal scores"] = int(equal.sum())
    if small.any():
        result.dropped_pairs[f"margin <= {config.min_margin:g}"] = int(small.sum())
    kept = ~equal & ~small
    result.winner = winner[kept].astype(np.int64)
    result.loser = loser[kept].astype(np.int64)
    result.clusters_paired = int(np.unique(cluster_of_pair[kept]).size)
    return result
