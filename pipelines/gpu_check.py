"""The prepared GPU check of the ML stages (``make gpu-check``), for a machine with CUDA.

Two checks, each printed as one JSON line (all of them also written to ``--out`` if given):

* ``embed``: the production encoder config (ViT-H-14, the HPSv2 architecture) at its seeded
  random initialisation — speed and memory do not depend on the weights, and none can be
  downloaded — through the same code the ``image_embeddings`` asset uses
  (:func:`ml.embed.embed_images` on JPEG files, decoded in worker processes, bf16 autocast),
  and through a bare loop over pre-decoded tensors: images/s of both, their ratio, peak memory.
* ``dpo``: Diffusion-DPO steps of :func:`ml.dpo.train_dpo_lora` — the ``dpo_lora`` asset's
  code — on a Stable Diffusion 1.5-size pipeline built from SD 1.5's architecture at random
  init (:data:`ml.diffusion.SD15_CONFIG`), 512 px pairs, bf16 frozen weights, fp32 LoRA,
  gradient checkpointing: s/step and peak memory. ``--dpo-base tiny`` runs the same path on the
  tiny pipeline (a dry run; works on CPU with ``--device cpu``).

Exits 2 without CUDA (unless ``--device cpu``).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any


def embed_check(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ml.embed import embedding_throughput
    from ml.encoders import load_encoder
    from pipelines.bench_embed import _sample_images

    items = _sample_images(Path(args.work), args.images)
    encoder = load_encoder(args.model, None, args.device, args.precision)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    figures = embedding_throughput(encoder, items, args.batch_size, args.workers)
    figures.update(check="embed", model=args.model, precision=args.precision)
    return figures


def _pairs(n: int, resolution: int, seed: int = 0) -> list:
    """``n`` synthetic preference pairs of smooth random colour images at ``resolution``."""
    import numpy as np
    from PIL import Image

    from ml.dpo import PreferencePair

    rng = np.random.default_rng(seed)

    def png() -> bytes:
        blocks = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        image = Image.fromarray(blocks).resize((resolution, resolution), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    return [PreferencePair(f"a synthetic picture number {i}", png(), png()) for i in range(n)]


def dpo_check(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ml.diffusion import SD15_CONFIG, TINY_CONFIG, build_random_pipeline, build_tiny_pipeline
    from ml.dpo import DPOConfig, train_dpo_lora

    work = Path(args.work)
    started = time.perf_counter()
    if args.dpo_base == "sd15":
        config, base = SD15_CONFIG, build_random_pipeline(work / "sd15-random", SD15_CONFIG)
    else:
        config, base = TINY_CONFIG, build_tiny_pipeline(work / "tiny-sd15")
    built = time.perf_counter() - started
    resolution = int(config["resolution"])
    pairs = _pairs(args.dpo_batch_size * 2, resolution)
    cuda = args.device.startswith("cuda")
    dpo = DPOConfig(
        beta=5000.0 if args.dpo_base == "sd15" else 100.0,
        steps=args.dpo_steps,
        batch_size=args.dpo_batch_size,
        resolution=resolution,
        device=args.device,
        precision=args.precision if cuda else "fp32",
        gradient_checkpointing=args.dpo_base == "sd15",
        time_budget_s=None,
        heldout_every=0,
        threads=None,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = train_dpo_lora(base, pairs, dpo)
    return {
        "check": "dpo",
        "base": args.dpo_base,
        "random_init": args.dpo_base == "sd15",
        "tiny_model": result.tiny_model,
        "resolution": resolution,
        "pairs_per_step": args.dpo_batch_size,
        "steps": result.steps,
        "s_per_step": round(result.train_seconds / max(result.steps, 1), 3),
        "prepare_s": round(result.seconds - result.train_seconds, 1),
        "build_s": round(built, 1),
        "precision": result.precision,
        "gradient_checkpointing": dpo.gradient_checkpointing,
        "final_loss": round(result.loss_curve[-1][1], 4) if result.loss_curve else None,
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from ml.encoders import PRODUCTION_ENCODER

    parser = argparse.ArgumentParser(prog="python -m pipelines.gpu_check", description=__doc__)
    parser.add_argument("--checks", default="embed,dpo", help="comma-separated: embed, dpo")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default=PRODUCTION_ENCODER)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--dpo-base", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--dpo-steps", type=int, default=20)
    parser.add_argument("--dpo-batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--work", default="bench/embed")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = sorted(set(checks) - {"embed", "dpo"})
    if unknown or not checks:
        parser.error(f"--checks: unknown {unknown or 'none given'}; choose from embed, dpo")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: the GPU check needs a machine with a GPU", file=sys.stderr)
        return 2
    lines = []
    for check in checks:
        figures = embed_check(args) if check == "embed" else dpo_check(args)
        if args.device.startswith("cuda"):
            figures.update(
                gpu=torch.cuda.get_device_name(),
                peak_memory_gib=round(torch.cuda.max_memory_allocated() / 1024**3, 2),
            )
        lines.append(json.dumps(figures))
        print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
