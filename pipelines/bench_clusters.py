"""Benchmark of prompt clustering at ImageGem scale: ``python -m pipelines.bench_clusters``.

Plants ``--centres`` recipes (default 3,000 random unit vectors) in ``--dims`` dimensions
(default 1024, ViT-H-14's width) and draws ``--n`` prompts (default 2,900,000, the ImageGem
release's distinct prompts) around them: each row is ``centre + spread * g / sqrt(dims)``
with ``g`` standard normal, re-normalised, so its cosine to its centre is about
``1 / sqrt(1 + spread^2)`` (0.94 at the default spread 0.35). A ``--background`` share of rows
(default 5 %) are uniform random unit vectors: one-off prompts that belong to no recipe.
Rows are generated block by block straight into a float16 array (5.9 GB at full size; a
float32 copy would be 11.9 GB), and the clustering reads that array block by block too.

The planted centres are isotropic, which is the hard case for the PCA step: real CLIP text
embeddings concentrate their variance in a few dozen directions, random centres do not.

Then `ml.clustering.cluster_embeddings` runs on the bucketed path and the report gives the
wall time per phase, the total, the process's peak RSS (``ru_maxrss``), the number of
clusters, the noise share, and the adjusted Rand index against the planted recipes over the
rows that are planted and that the clustering did not call noise (plus how many planted
rows were kept and how many background rows came out as noise). The last line is the same
report as JSON. Targets on 2 cores: clustering of the full size in <= 15 min, <= 12 GiB peak.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from dataclasses import asdict

import numpy as np

from ml.clustering import ClusterConfig, ClusterResult, Progress, cluster_embeddings

TARGET_SECONDS = 15 * 60.0
TARGET_RSS_GIB = 12.0
FULL_N = 2_900_000
DIMS = 1024
CENTRES = 3_000
GEN_BLOCK = 65_536


def synthetic_embeddings(
    n: int,
    dims: int = DIMS,
    centres: int = CENTRES,
    spread: float = 0.35,
    background: float = 0.05,
    skew: float = 0.0,
    seed: int = 0,
    log: logging.Logger | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors, truth)``: n x dims float16 unit rows and their planted recipe (-1: background).

    Recipe ``r`` (0-based) is drawn with probability proportional to ``(r + 1) ** -skew``:
    0 gives equal sizes, 0.7 a long tail like real prompt recipes (at 2.9M rows and 3,000
    recipes the largest holds ~76k rows, the smallest ~300). Each block draws from its own
    generator seeded with ``(seed, block)``, so the data depend on nothing but the arguments.
    """
    if n < 1 or dims < 1 or centres < 1:
        raise ValueError(f"n, dims and centres must be >= 1, got {n}, {dims}, {centres}")
    if not 0.0 <= background < 1.0:
        raise ValueError(f"background must be in [0, 1), got {background}")
    log = log or logging.getLogger(__name__)
    rng = np.random.default_rng([seed, 1 << 20])
    planted = rng.standard_normal((centres + 1, dims), dtype=np.float32)
    planted /= np.linalg.norm(planted, axis=1, keepdims=True)
    planted[centres] = 0.0  # row -1: background rows get no centre, only their random direction
    vectors = np.empty((n, dims), dtype=np.float16)
    truth = np.empty(n, dtype=np.int32)
    scale = np.float32(spread / np.sqrt(dims))
    weights = np.arange(1, centres + 1, dtype=np.float64) ** -skew
    cumulative = np.cumsum(weights / weights.sum())
    cumulative[-1] = 1.0
    progress = Progress(log, "generate", n, unit="rows")
    # Buffers reused across blocks: fresh 256 MB temporaries per block cost more in page faults
    # than the arithmetic.
    noise = np.empty((min(n, GEN_BLOCK), dims), dtype=np.float32)
    centre = np.empty_like(noise)
    for block, start in enumerate(range(0, n, GEN_BLOCK)):
        stop = min(n, start + GEN_BLOCK)
        rows = stop - start
        brng = np.random.default_rng([seed, block])
        label = np.searchsorted(cumulative, brng.random(rows), side="right").astype(np.int32)
        label[brng.random(rows) < background] = -1
        x, c = noise[:rows], centre[:rows]
        brng.standard_normal(dtype=np.float32, out=x)
        x *= scale  # background rows are re-normalised below: the scale does not matter to them
        np.take(planted, label, axis=0, out=c)  # label -1 takes the zero row
        x += c
        x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
        vectors[start:stop] = x
        truth[start:stop] = label
        progress.update(rows)
    return vectors, truth


def score(result: ClusterResult, truth: np.ndarray) -> dict[str, float]:
    """Quality against the planted recipes.

    ``ari``: adjusted Rand index over the planted rows the clustering kept (noise excluded);
    ``planted_kept``: the share of planted rows in some cluster; ``top10_kept``: the same for
    the rows of the ten largest recipes (the ones a bucketed clustering is most likely to lose:
    they span several buckets); ``background_as_noise``: background rows labelled noise.
    """
    from sklearn.metrics import adjusted_rand_score

    planted = truth >= 0
    kept = planted & (result.labels >= 0)
    top10 = np.isin(truth, np.argsort(-np.bincount(truth[planted]), kind="stable")[:10])
    return {
        "top10_kept": float(np.mean(result.labels[top10] >= 0)),
        "ari": float(adjusted_rand_score(truth[kept], result.labels[kept])) if kept.any() else 0.0,
        "planted_kept": float(kept.sum() / max(planted.sum(), 1)),
        "background_as_noise": float(
            (result.labels[~planted] < 0).sum() / max((~planted).sum(), 1)
        ),
    }


def peak_rss_gib() -> float:
    """This process's peak resident set (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench_clusters", description=__doc__)
    parser.add_argument("--n", type=int, default=FULL_N, help="rows (default %(default)s)")
    parser.add_argument("--dims", type=int, default=DIMS)
    parser.add_argument("--centres", type=int, default=CENTRES)
    parser.add_argument("--spread", type=float, default=0.35)
    parser.add_argument("--background", type=float, default=0.05)
    parser.add_argument(
        "--skew", type=float, default=0.0, help="Zipf exponent of recipe sizes (0: equal)"
    )
    parser.add_argument("--seed", type=int, default=0)
    defaults = ClusterConfig()
    parser.add_argument("--pca-dims", type=int, default=defaults.pca_dims)
    parser.add_argument("--bucket-size", type=int, default=defaults.bucket_size)
    parser.add_argument("--bucket-threshold", type=int, default=defaults.bucket_threshold)
    parser.add_argument("--min-cluster-size", type=int, default=defaults.min_cluster_size)
    parser.add_argument("--min-samples", type=int, default=defaults.min_samples)
    parser.add_argument("--jobs", type=int, default=2, help="bucket HDBSCAN threads")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    log = logging.getLogger("bench_clusters")
    config = ClusterConfig(
        min_cluster_size=args.min_cluster_size,
        min_samples=args.min_samples,
        pca_dims=args.pca_dims,
        bucket_threshold=args.bucket_threshold,
        bucket_size=args.bucket_size,
        n_jobs=args.jobs,
        seed=args.seed,
    )
    started = time.perf_counter()
    vectors, truth = synthetic_embeddings(
        args.n,
        dims=args.dims,
        centres=args.centres,
        spread=args.spread,
        background=args.background,
        skew=args.skew,
        seed=args.seed,
        log=log,
    )
    generate_s = time.perf_counter() - started
    log.info("generated %s x %s float16 (%.2f GB) in %.0fs", f"{args.n:,}", args.dims,
             vectors.nbytes / 1e9, generate_s)  # fmt: skip
    result = cluster_embeddings(vectors, config, log)
    tick = time.perf_counter()
    scores = score(result, truth)
    score_s = time.perf_counter() - tick
    report = {
        "n": args.n,
        "dims": args.dims,
        "centres": args.centres,
        "skew": args.skew,
        "config": asdict(config),
        "path": result.path,
        "buckets": result.buckets,
        "second_pass": result.second_pass,
        "merged": result.merged,
        "reduced_dims": result.reduced_dims,
        "seconds": {"generate": generate_s, **result.seconds, "score": score_s},
        "cluster_s": result.seconds["total"],
        "wall_s": time.perf_counter() - started,
        "peak_rss_gib": peak_rss_gib(),
        "n_clusters": result.n_clusters,
        "noise_share": result.noise_share,
        "largest_cluster": int(result.cluster_sizes[0]) if result.n_clusters else 0,
        **scores,
    }
    print(format_report(report))
    print(json.dumps(report))
    return 0


def format_report(r: dict) -> str:
    """The human-readable report: phases, totals against the targets, quality."""
    phases = ", ".join(f"{k} {v:,.1f}s" for k, v in r["seconds"].items() if k != "total")
    ok_time = r["cluster_s"] <= TARGET_SECONDS
    ok_rss = r["peak_rss_gib"] <= TARGET_RSS_GIB
    return "\n".join(
        [
            f"prompt clustering: {r['n']:,} x {r['dims']} float16, {r['centres']:,} planted recipes",
            f"  path {r['path']}: PCA → {r['reduced_dims']} dims, {r['buckets']:,} buckets",
            f"  phases: {phases}",
            f"  clustering {r['cluster_s']:,.1f}s (target ≤ {TARGET_SECONDS:,.0f}s: "
            f"{'met' if ok_time else 'MISSED'}), wall incl. generation {r['wall_s']:,.1f}s",
            f"  peak RSS {r['peak_rss_gib']:.2f} GiB (target ≤ {TARGET_RSS_GIB:.0f} GiB: "
            f"{'met' if ok_rss else 'MISSED'})",
            f"  {r['n_clusters']:,} clusters (largest {r['largest_cluster']:,}), "
            f"noise {100 * r['noise_share']:.1f} %",
            f"  ARI vs planted (noise excluded) {r['ari']:.4f}; planted rows kept "
            f"{100 * r['planted_kept']:.1f} % (10 largest recipes {100 * r['top10_kept']:.1f} %), "
            f"background → noise {100 * r['background_as_noise']:.1f} %",
            f"  {r['second_pass']:,} bucket(s) from the second pass, {r['merged']:,} "
            "cluster(s) merged across bucket boundaries",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
