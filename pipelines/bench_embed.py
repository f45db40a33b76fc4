"""Embedding throughput benchmark: the ``image_embeddings`` path vs a bare model loop.

``python -m pipelines.bench_embed`` (``make bench-embed``) writes the default sample's media
once (3,000 real sample JPEGs), loads the encoder the stage would use (``--model``, default
the tiny ``imagegem-tiny`` at its seeded initialisation: speed does not depend on the weights;
``--checkpoint`` for real ones) and measures, ``--runs`` times each:

* the asset path: :func:`ml.embed.embed_images` over the JPEG files (read, decode, preprocess,
  batch, encode), at ``--workers`` decoding processes;
* the bare loop: the same model over the same images decoded beforehand.

It prints images/s of both and the ratio (target on CPU: ≥ 0.85), median and range.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

TARGET_RATIO = 0.85


def _sample_images(work: Path, limit: int) -> list[tuple[int, str]]:
    from pipelines.sample.generator import SampleSpec, generate_sample

    sample = work / "sample"
    images = sample / "media" / "images"
    if not images.is_dir():
        generate_sample(sample, SampleSpec())
    files = sorted(images.glob("*.jpeg"))[:limit]
    return [(int(f.stem), str(f)) for f in files]


def main(argv: list[str] | None = None) -> int:
    from ml.embed import embedding_throughput
    from ml.encoders import load_encoder

    parser = argparse.ArgumentParser(prog="python -m pipelines.bench_embed", description=__doc__)
    parser.add_argument("--work", default="bench/embed")
    parser.add_argument("--model", default="imagegem-tiny")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    items = _sample_images(Path(args.work), args.images)
    encoder = load_encoder(args.model, args.checkpoint, args.device, args.precision)
    print(
        f"{len(items):,} sample JPEGs, encoder {encoder.tag} on {encoder.device} "
        f"({args.precision}), batch {args.batch_size}, {args.runs} runs each"
    )
    print(f"{'workers':>7}  {'asset path img/s':>24}  {'bare loop img/s':>24}  {'ratio':>18}")
    for workers in args.workers:
        runs = [
            embedding_throughput(
                encoder, items, args.batch_size, workers, torch_threads=args.threads
            )
            for _ in range(args.runs)
        ]
        asset = [r["asset_images_per_s"] for r in runs]
        bare = [r["bare_images_per_s"] for r in runs]
        ratio = [r["ratio"] for r in runs]

        def show(values: list[float], digits: int = 0) -> str:
            return (
                f"{statistics.median(values):.{digits}f} "
                f"({min(values):.{digits}f}–{max(values):.{digits}f})"
            )

        print(f"{workers:>7}  {show(asset):>24}  {show(bare):>24}  {show(ratio, 2):>18}")
    print(f"target: asset path ≥ {TARGET_RATIO:.0%} of the bare loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
