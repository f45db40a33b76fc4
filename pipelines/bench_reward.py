"""Benchmark of the reward model at ImageGem scale: ``python -m pipelines.bench_reward``.

Synthetic data shaped like the release (defaults: 4.9M images, 2.9M prompts, dimension 1024
as ViT-H-14, 3,000 prompt clusters), stored as float16 memmaps under ``--work`` (default
``bench/reward``; 10 GB of image vectors + 5.9 GB of prompt vectors at full size). They are
generated once, block by block, and reused by later runs with the same shape and seed (a
``manifest.json`` written last says the data are complete); the folder gets a ``.gitignore``
of ``*`` so none of it is ever committed.

* **Prompts**: ``normalise(centre[c] + 0.35·g/√d)`` around random unit centres; a
  ``--noise-share`` of prompts (5 %) belong to no cluster (``cluster_id`` −1, as HDBSCAN's
  noise), so their images are never paired.
* **Images**: each picks a prompt uniformly; ``normalise(prompt + 0.8·g/√d)``.
* **Planted preference**: quality = √d·(image · u) for a fixed random unit direction u
  (about standard normal); engagement = quality + ``--label-noise``·N(0, 1) (1.0: pairs are
  noisy, even the planted quality orders only ~75-80 % of them as the labels do).

Each run then (a) builds pairs with :func:`ml.preferences.engagement.build_pairs` (same
cluster, engagement apart by ``--margin``, ``--pairs-per-cluster`` per cluster, a held-out
10 % of images by hash), (b) trains the reward model for at most ``--budget`` seconds
(reading batches straight from the memmaps), and (c) scores every image, streaming the
memmaps in chunks. It prints the wall time and peak RSS of each phase (peak RSS from the
kernel's high-water mark, reset between phases, so each phase is measured on its own) and the
held-out accuracy of the model against the planted quality's accuracy on the same pairs (the
ceiling the labels allow). Targets on 2 cores: pairs + training + scoring ≤ 10 min, each
phase ≤ 8 GiB peak RSS. The last line is the report as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml.preferences.engagement import build_pairs
from ml.preferences.reward import (
    RewardConfig,
    pairwise_accuracy,
    release_pages,
    score_embeddings,
    train_reward_model,
)
from warehouse.files import atomic_write_bytes
from warehouse.progress import Progress

TARGET_SECONDS = 10 * 60.0
TARGET_RSS_GIB = 8.0
FULL_IMAGES = 4_900_000
PROMPTS_PER_IMAGE = 2.9 / 4.9  # 2.9M prompts for 4.9M images
DIM = 1024
CLUSTERS = 3_000
BLOCK = 32_768
LOG = logging.getLogger("bench_reward")


@dataclass(frozen=True)
class Shape:
    images: int
    prompts: int
    dim: int
    clusters: int
    noise_share: float
    label_noise: float
    seed: int

    def folder(self, work: Path) -> Path:
        return work / (
            f"data-{self.images}x{self.dim}-p{self.prompts}-c{self.clusters}-s{self.seed}"
            f"-n{self.noise_share:g}-l{self.label_noise:g}"
        )


@dataclass
class Data:
    images: np.memmap  # (n, d) float16
    prompts: np.memmap  # (p, d) float16
    prompt_index: np.ndarray  # (n,) int32
    cluster: np.ndarray  # (n,) int32, the image's prompt's cluster (−1: noise)
    quality: np.ndarray  # (n,) float32 planted
    engagement: np.ndarray  # (n,) float32 observed
    generate_s: float
    reused: bool


# ---------------------------------------------------------------------------------------------
# Memory accounting


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark of this process (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    """VmHWM (the peak resident set since the last reset) or, without /proc, ru_maxrss."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gib() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


# ---------------------------------------------------------------------------------------------
# Synthetic data


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def generate(shape: Shape, work: Path, log: logging.Logger) -> Data:
    """The data of ``shape`` under ``work``, generated once (see the module docstring)."""
    folder = shape.folder(work)
    manifest = folder / "manifest.json"
    images_path, prompts_path, meta_path = (
        folder / "images.f16",
        folder / "prompts.f16",
        folder / "meta.npz",
    )
    started = time.perf_counter()
    reused = manifest.is_file() and json.loads(manifest.read_text()).get("shape") == asdict(shape)
    if not reused:
        folder.mkdir(parents=True, exist_ok=True)
        manifest.unlink(missing_ok=True)
        _generate(shape, images_path, prompts_path, meta_path, log)
        atomic_write_bytes(str(manifest), json.dumps({"shape": asdict(shape)}).encode())
    meta = np.load(meta_path)
    data = Data(
        images=np.memmap(images_path, np.float16, "r", shape=(shape.images, shape.dim)),
        prompts=np.memmap(prompts_path, np.float16, "r", shape=(shape.prompts, shape.dim)),
        prompt_index=meta["prompt_index"],
        cluster=meta["prompt_cluster"][meta["prompt_index"]],
        quality=meta["quality"],
        engagement=meta["engagement"],
        generate_s=time.perf_counter() - started,
        reused=reused,
    )
    log.info(
        "data: %s images x %d, %s prompts, %d clusters (%s) in %.0f s",
        f"{shape.images:,}",
        shape.dim,
        f"{shape.prompts:,}",
        shape.clusters,
        "reused" if reused else "generated",
        data.generate_s,
    )
    return data


def _generate(
    shape: Shape, images_path: Path, prompts_path: Path, meta_path: Path, log: logging.Logger
) -> None:
    n, p, d = shape.images, shape.prompts, shape.dim
    generator = torch.Generator().manual_seed(shape.seed)
    rng = np.random.default_rng([shape.seed, 1])
    centres = _unit_rows(torch.randn(shape.clusters, d, generator=generator))
    direction = _unit_rows(torch.randn(1, d, generator=generator))[0]
    prompt_cluster = rng.integers(0, shape.clusters, p).astype(np.int32)
    prompt_cluster[rng.random(p) < shape.noise_share] = -1
    prompt_index = rng.integers(0, p, n).astype(np.int32)
    quality = np.empty(n, dtype=np.float32)

    prompts = np.memmap(prompts_path, np.float16, "w+", shape=(p, d))
    progress = Progress("generate prompts", p, log, every_s=15.0)
    noise = torch.empty(BLOCK, d)
    for start in range(0, p, BLOCK):
        stop = min(p, start + BLOCK)
        block = noise[: stop - start].normal_(generator=generator).mul_(0.35 / math.sqrt(d))
        labels = torch.from_numpy(prompt_cluster[start:stop].astype(np.int64))
        centred = torch.where(labels[:, None] >= 0, centres[labels.clamp(min=0)], 0.0)
        rows = _unit_rows(block + centred)
        prompts[start:stop] = rows.half().numpy()
        progress.advance(stop - start)
        if (start // BLOCK) % 16 == 15:
            prompts.flush()
            release_pages(prompts)
    prompts.flush()
    del prompts
    progress.done()

    prompts = np.memmap(prompts_path, np.float16, "r", shape=(p, d))
    images = np.memmap(images_path, np.float16, "w+", shape=(n, d))
    progress = Progress("generate images", n, log, every_s=15.0)
    root_d = math.sqrt(d)
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        block = noise[: stop - start].normal_(generator=generator).mul_(0.8 / root_d)
        base = torch.from_numpy(np.asarray(prompts[prompt_index[start:stop]])).float()
        rows = _unit_rows(block + base)
        quality[start:stop] = (rows @ direction * root_d).numpy()
        images[start:stop] = rows.half().numpy()
        progress.advance(stop - start)
        if (start // BLOCK) % 16 == 15:
            images.flush()
            release_pages(images, prompts)
    images.flush()
    del images, prompts
    progress.done()
    quality = (quality - quality.mean()) / quality.std()
    engagement = quality + shape.label_noise * rng.standard_normal(n).astype(np.float32)
    np.savez(
        meta_path,
        prompt_index=prompt_index,
        prompt_cluster=prompt_cluster,
        quality=quality.astype(np.float32),
        engagement=engagement.astype(np.float32),
    )


# ---------------------------------------------------------------------------------------------
# One run


def run_once(data: Data, args: argparse.Namespace, log: logging.Logger) -> dict[str, Any]:
    n = data.images.shape[0]
    report: dict[str, Any] = {}
    exact = reset_peak_rss()
    tick = time.perf_counter()
    split = build_pairs(
        np.arange(n, dtype=np.int64),
        data.cluster,
        data.engagement,
        margin=args.margin,
        max_pairs_per_cluster=args.pairs_per_cluster,
        heldout_fraction=0.1,
        seed=args.seed,
    )
    report["pairs"] = {
        "seconds": time.perf_counter() - tick,
        "peak_rss_gib": peak_rss_gib(),
        "train_pairs": split.n_train,
        "heldout_pairs": split.n_heldout,
    }
    log.info("pairs: %s train, %s held out in %.1f s", f"{split.n_train:,}",
             f"{split.n_heldout:,}", report["pairs"]["seconds"])  # fmt: skip

    config = RewardConfig(
        hidden=args.hidden,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        threads=args.threads,
        time_budget_s=args.budget,
        margin=args.margin,
        max_pairs_per_cluster=args.pairs_per_cluster,
        seed=args.seed,
    )
    release_pages(data.images, data.prompts)
    reset_peak_rss()
    tick = time.perf_counter()
    result = train_reward_model(
        data.images,
        data.prompts,
        split.train,
        split.heldout,
        config,
        log,
        prompt_index=data.prompt_index,
    )
    report["train"] = {
        "seconds": time.perf_counter() - tick,
        "peak_rss_gib": peak_rss_gib(),
        "steps": result.steps,
        "epochs": result.curve[-1].epoch,
        "pairs_per_s": result.pairs_per_s,
        "stop_reason": result.stop_reason,
        "curve": [[p.epoch, p.heldout_accuracy] for p in result.curve],
    }

    release_pages(data.images, data.prompts)
    reset_peak_rss()
    tick = time.perf_counter()
    scores = score_embeddings(
        result.model,
        data.images,
        data.prompts,
        args.score_batch,
        prompt_index=data.prompt_index,
        threads=args.threads,
        log=log,
    )
    seconds = time.perf_counter() - tick
    report["score"] = {
        "seconds": seconds,
        "peak_rss_gib": peak_rss_gib(),
        "rows_per_s": n / seconds,
        "nan": int(np.isnan(scores).sum()),
    }
    sample = np.random.default_rng(0).choice(n, size=min(n, 200_000), replace=False)
    report["quality"] = {
        "heldout_accuracy": result.heldout_accuracy,
        "heldout_accuracy_of_all_scores": pairwise_accuracy(scores, *split.heldout),
        "planted_heldout_accuracy": pairwise_accuracy(data.quality, *split.heldout),
        "init_heldout_accuracy": result.init_heldout_accuracy,
        "spearman_vs_planted": _spearman(scores[sample], data.quality[sample]),
    }
    report["total_s"] = sum(report[k]["seconds"] for k in ("pairs", "train", "score"))
    report["peak_rss_gib"] = max(report[k]["peak_rss_gib"] for k in ("pairs", "train", "score"))
    report["peak_rss_per_phase"] = exact
    return report


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


# ---------------------------------------------------------------------------------------------
# Report


def format_report(shape: Shape, data: Data, runs: list[dict[str, Any]]) -> str:
    lines = [
        f"reward model: {shape.images:,} images x {shape.dim} and {shape.prompts:,} prompts "
        f"(float16 memmaps), {shape.clusters:,} clusters; data "
        f"{'reused' if data.reused else 'generated'} in {data.generate_s:,.0f}s",
    ]
    for i, r in enumerate(runs, 1):
        q = r["quality"]
        ok_time = r["total_s"] <= TARGET_SECONDS
        ok_rss = r["peak_rss_gib"] <= TARGET_RSS_GIB
        lines += [
            f" run {i}: pairs {r['pairs']['seconds']:,.1f}s ({r['pairs']['train_pairs']:,} train / "
            f"{r['pairs']['heldout_pairs']:,} held-out, peak {r['pairs']['peak_rss_gib']:.2f} GiB)",
            f"   (a) training {r['train']['seconds']:,.1f}s, peak RSS "
            f"{r['train']['peak_rss_gib']:.2f} GiB: {r['train']['steps']:,} steps, "
            f"{r['train']['epochs']:.2f} epochs, {r['train']['pairs_per_s']:,.0f} pairs/s, "
            f"stopped by {r['train']['stop_reason']}",
            f"   (b) scoring {r['score']['seconds']:,.1f}s, peak RSS "
            f"{r['score']['peak_rss_gib']:.2f} GiB: {r['score']['rows_per_s']:,.0f} images/s",
            f"   total {r['total_s']:,.1f}s (target ≤ {TARGET_SECONDS:,.0f}s: "
            f"{'met' if ok_time else 'MISSED'}), peak RSS {r['peak_rss_gib']:.2f} GiB (target ≤ "
            f"{TARGET_RSS_GIB:.0f} GiB: {'met' if ok_rss else 'MISSED'})"
            + ("" if r["peak_rss_per_phase"] else " [cumulative: peak could not be reset]"),
            f"   held-out accuracy {q['heldout_accuracy']:.4f} vs planted quality "
            f"{q['planted_heldout_accuracy']:.4f} (init {q['init_heldout_accuracy']:.4f}); "
            f"Spearman vs planted {q['spearman_vs_planted']:.3f}",
        ]
    if len(runs) > 1:
        lines.append(
            f" median of {len(runs)}: total {statistics.median(r['total_s'] for r in runs):,.1f}s, "
            f"training {statistics.median(r['train']['seconds'] for r in runs):,.1f}s, scoring "
            f"{statistics.median(r['score']['seconds'] for r in runs):,.1f}s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench_reward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    defaults = RewardConfig()
    parser.add_argument("--images", type=int, default=FULL_IMAGES)
    parser.add_argument("--prompts", type=int, help="default: images x 2.9/4.9")
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--clusters", type=int, default=CLUSTERS)
    parser.add_argument("--noise-share", type=float, default=0.05)
    parser.add_argument("--label-noise", type=float, default=1.0)
    parser.add_argument("--work", default="bench/reward")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds")
    parser.add_argument("--margin", type=float, default=defaults.margin)
    parser.add_argument("--pairs-per-cluster", type=int, default=defaults.max_pairs_per_cluster)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--score-batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 1000 or args.dim < 1 or args.runs < 1:
        parser.error("--images must be >= 1000, --dim and --runs >= 1")
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    LOG.setLevel(logging.INFO)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / ".gitignore").exists():
        (work / ".gitignore").write_text("*\n")  # gigabytes of synthetic vectors: never commit
    prompts = args.prompts or max(1, round(args.images * PROMPTS_PER_IMAGE))
    shape = Shape(args.images, prompts, args.dim, args.clusters, args.noise_share,
                  args.label_noise, args.seed)  # fmt: skip
    data = generate(shape, work, LOG)
    runs = [run_once(data, args, LOG) for _ in range(args.runs)]
    print(format_report(shape, data, runs))
    print(json.dumps({"shape": asdict(shape), "generate_s": data.generate_s,
                      "reused": data.reused, "runs": runs, "cpu_count": os.cpu_count()}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
