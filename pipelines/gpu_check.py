"""The prepared GPU check of the embeddings stage (``make gpu-check``), for a machine with CUDA.

Runs the production encoder config (ViT-H-14, the HPSv2 architecture) at its seeded random
initialisation — speed and memory do not depend on the weights, and none can be downloaded —
through the same code the ``image_embeddings`` asset uses (:func:`ml.embed.embed_images` on
JPEG files, decoded in worker processes, bf16 autocast), and through a bare loop over
pre-decoded tensors. Prints images/s of both, their ratio and the peak GPU memory, as one JSON
line (also written to ``--out`` if given). Exits 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch

    from ml.embed import embedding_throughput
    from ml.encoders import PRODUCTION_ENCODER, load_encoder
    from pipelines.bench_embed import _sample_images

    parser = argparse.ArgumentParser(prog="python -m pipelines.gpu_check", description=__doc__)
    parser.add_argument("--model", default=PRODUCTION_ENCODER)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--work", default="bench/embed")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU check needs a machine with a GPU", file=sys.stderr)
        return 2
    items = _sample_images(Path(args.work), args.images)
    encoder = load_encoder(args.model, None, "cuda", args.precision)
    torch.cuda.reset_peak_memory_stats()
    figures = embedding_throughput(encoder, items, args.batch_size, args.workers)
    figures.update(
        model=args.model,
        precision=args.precision,
        gpu=torch.cuda.get_device_name(),
        peak_memory_gib=round(torch.cuda.max_memory_allocated() / 1024**3, 2),
    )
    line = json.dumps(figures)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
