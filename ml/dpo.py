"""Diffusion-DPO: fine-tune a LoRA on a Stable Diffusion UNet from preference pairs.

The alignment stage of ImageGem turns users' reactions into (caption, preferred image,
rejected image) pairs and aligns the generator with them by Diffusion-DPO (Wallace et al.,
"Diffusion Model Alignment Using Direct Preference Optimization", CVPR 2024), as diffusers'
research example ``examples/research_projects/diffusion_dpo`` does it with a LoRA:

* The base pipeline (:func:`ml.diffusion.load_pipeline`) is frozen — VAE, text encoder and
  UNet — and a peft LoRA adapter (``to_q/to_k/to_v/to_out.0`` of every attention block,
  gaussian init, so ``lora_B = 0`` and the adapted UNet starts *equal* to the base) is the only
  thing trained. The reference model is the same UNet with its adapters disabled, so no second
  copy of the UNet is kept.
* Per step, each pair's winner and loser get the **same** noise ε and the **same** timestep t;
  both noised latents go through the adapted UNet (θ, with gradients) and the reference (no
  gradients), and with per-sample MSEs ``m_w = ‖ε − ε_θ(x_w,t)‖²``, ``r_w = ‖ε − ε_ref(x_w,t)‖²``
  (mean over C, H, W; likewise ``m_l``, ``r_l``) the loss is (:func:`dpo_loss`)::

      inside = −β/2 · ((m_w − r_w) − (m_l − r_l)),    loss = −log σ(inside)

  i.e. the paper's objective with T·ω(λ_t) folded into β, exactly as the original
  Diffusion-DPO code writes it (``scale_term = −0.5 · beta_dpo``). The implicit accuracy is the
  share of pairs with ``inside > 0`` (the model prefers the winner more than the reference
  does); at θ = ref ``inside`` is 0, the loss is log 2 and the accuracy 0. With a
  ``v_prediction`` scheduler the target is the velocity instead of ε.
* **Held-out implicit accuracy** uses the same formula on pairs not trained on, with noise and
  timesteps drawn once from a fixed generator (``heldout_draws`` draws per pair, latents at
  the VAE posterior's mean), so evaluations at different steps differ only by the adapter.
  It is measured at step 0 (trivially 0: θ = ref), every ``heldout_every`` steps, and at the
  end.

What makes it fit a CPU budget (the demo trains the tiny pipeline, see :mod:`ml.diffusion`):
every image is decoded and VAE-encoded **once** (the posterior's mean and std are cached, and a
step samples ``mean + std·z``, which is what ``latent_dist.sample()`` does), each distinct
caption is text-encoded once, training runs on ``threads`` CPU threads (1 by default, see
:func:`ml.runtime.torch_threads`), and ``time_budget_s`` bounds the whole call (loading,
encoding, evaluations and training): a step starts only if it still fits with the final
evaluation. GPU paths are the real ones: ``device`` auto/cuda, fp16/bf16 frozen weights with
fp32 LoRA parameters under autocast (and a gradient scaler for fp16), gradient checkpointing
on the UNet.

Bad input: pairs whose winner or loser cannot be decoded are **skipped and counted**
(``DPOResult.skipped``, like :mod:`ml.train_clip`), as are pairs whose two images decode to the
same pixels (no preference to learn) and pairs with a caption that is not a string; a run with
no usable training pair left is a ValueError that says how many of each were skipped. A missing
or invalid base folder fails first, before any image is decoded, with the folder's name
(:func:`ml.diffusion.check_pipeline_folder`, then :func:`ml.diffusion.load_pipeline`).

Determinism: on CPU with ``time_budget_s=None`` a run is a pure function of (base pipeline,
pairs, config): the LoRA init, pair order, latent samples, noise and timesteps all come from
``seed``. No Dagster imports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ml.diffusion import (
    DECODE_ERRORS,
    PICKLE_SUFFIXES,
    ImageSource,
    check_pipeline_folder,
    decode_image,
    is_tiny,
    load_pipeline,
    to_model_range,
)
from ml.encoders import PRECISIONS, resolve_device
from ml.encoders.checkpoint import file_sha256
from ml.runtime import out_of_time, tail_mean, torch_threads
from warehouse.files import atomic_write_bytes, fsync_tree, replace_dir

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

LOG = logging.getLogger(__name__)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
DPO_CONFIG = "dpo_config.json"
TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_EVAL_CHUNK = 32  # pairs per forward pass in evaluations and encoding
_CURVE_POINTS = 200  # points per curve kept in dpo_config.json
_HELDOUT_SEED_OFFSET = 7919  # held-out draws come from seed + this, apart from training's


@dataclass(frozen=True)
class PreferencePair:
    """One preference: for ``caption``, ``winner`` was preferred over ``loser``. Images are
    encoded file bytes (JPEG, PNG, …) or a path to such a file."""

    caption: str
    winner: ImageSource
    loser: ImageSource


@dataclass(frozen=True)
class DPOConfig:
    """How to fine-tune. The defaults are for the tiny pipeline on the 2-core demo machine
    (measured on 32 training / 16 held-out synthetic pairs whose winners share one colour
    layout and losers another); :meth:`sd15` gives the SD 1.5 recipe.

    ``beta`` is the paper's β (the original Diffusion-DPO code's ``beta_dpo``): the loss scales
    the MSE differences by β/2, so SD 1.5's β = 5000 is an effective 2500, which is what the
    diffusers example calls ``beta_dpo`` (it has no ½).

    * ``beta`` 100, ``lr`` 1e-2: held-out implicit accuracy 0.81-0.85 after 60 steps (four
      seeds), 0.95 after 100, 1.0 after 180, held-out loss 0.69 → 0.03. β = 200 learns the
      same a little slower (0.75 / 0.91 / 0.97); SD 1.5's β = 5000 saturates the sigmoid on
      the tiny model (held-out loss 1.7-4.5, i.e. confidently wrong on many draws) and with
      lr 1e-3 stays at chance. lr 3e-2 diverged, 1e-3 barely moves in a demo budget: the
      tiny UNet's weights are random, so its LoRA needs far larger steps than a pretrained
      SD 1.5 LoRA (1e-5).
    * ``rank`` 4, ``lora_alpha`` = rank (scale 1): 10k LoRA parameters on the tiny UNet.
    * ``batch_size`` 8 pairs: 16 images through θ (with gradients) and 16 through the
      reference per step, ~3-4 steps/s on one core.
    * ``threads`` 1: see :func:`ml.runtime.torch_threads`; on the loaded 2-core demo
      machine two threads made the tiny UNet over 10x slower.
    """

    beta: float = 100.0  # the paper's β; 5000 for SD 1.5 (see above)
    rank: int = 4
    lora_alpha: float | None = None  # None: = rank (LoRA scale 1)
    lr: float = 1e-2
    weight_decay: float = 1e-2  # AdamW; the diffusers example's default
    warmup_steps: int = 0  # linear warmup, then constant (the example's constant_with_warmup)
    max_grad_norm: float = 1.0
    steps: int = 500  # maximum number of optimisation steps
    batch_size: int = 8  # preference pairs per step
    resolution: int = 32  # 32 for the tiny pipeline; 512 for SD 1.5
    seed: int = 0
    device: str = "auto"  # auto: CUDA when present, else CPU
    precision: str = "fp32"  # fp16/bf16: frozen weights in that dtype + autocast, CUDA only
    gradient_checkpointing: bool = False
    time_budget_s: float | None = 60.0  # whole call; None = steps only (deterministic)
    heldout_every: int = 25  # steps between held-out evaluations (0: start and end only)
    heldout_draws: int = 4  # fixed (noise, timestep) draws per held-out pair
    threads: int | None = 1  # CPU threads while training (None: leave torch's setting)
    log_every_s: float = 5.0

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.beta) and self.beta > 0):
            problems.append(f"beta must be a finite number > 0, got {self.beta}")
        if self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            problems.append(f"lora_alpha must be > 0 or None (= rank), got {self.lora_alpha}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.max_grad_norm <= 0:
            problems.append("weight_decay and warmup_steps must be >= 0, max_grad_norm > 0")
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 pair, got {self.batch_size}")
        if self.resolution < 8 or self.resolution % 8:
            problems.append(f"resolution must be a multiple of 8 (>= 8), got {self.resolution}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            problems.append(f"time_budget_s must be > 0 or None, got {self.time_budget_s}")
        if self.heldout_every < 0:
            problems.append(f"heldout_every must be >= 0, got {self.heldout_every}")
        if self.heldout_draws < 1:
            problems.append(f"heldout_draws must be >= 1, got {self.heldout_draws}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1 or None, got {self.threads}")
        if not isinstance(self.device, str) or not self.device:
            problems.append(
                f"device must be a string (auto, cpu, cuda, cuda:N), got {self.device!r}"
            )
        if problems:
            raise ValueError("DPOConfig: " + "; ".join(problems))

    @classmethod
    def tiny_base(cls, **overrides: Any) -> DPOConfig:
        """The recipe for the tiny base once ``diffusion_base`` has trained it on the
        warehouse's images: the defaults with ``lr`` 3e-3. Measured on the demo's pairs
        (110 training / 18 held-out, 60 s): held-out implicit accuracy stayed at 0.56-0.68
        through training at 3e-3 and 1e-3, while 1e-2 (right for a random UNet, above)
        peaked at 0.63 by step 25 and then overfit, held-out loss rising to 1.14 and
        accuracy falling to 0.47."""
        return cls(**{"lr": 3e-3, **overrides})

    @classmethod
    def sd15(cls, **overrides: Any) -> DPOConfig:
        """The SD 1.5 recipe (the paper's β and diffusers' LoRA example: rank 8, lr 1e-5,
        batch 16 at 512 px, gradient checkpointing) on a GPU in bf16, with ``overrides``."""
        settings: dict[str, Any] = {
            "beta": 5000.0,
            "rank": 8,
            "lr": 1e-5,
            "steps": 10_000,
            "batch_size": 16,
            "resolution": 512,
            "precision": "bf16",
            "gradient_checkpointing": True,
            "time_budget_s": None,
            "heldout_every": 200,
            "threads": None,
        }
        settings.update(overrides)
        return cls(**settings)

    @property
    def alpha(self) -> float:
        """The LoRA alpha actually used (``lora_alpha``, or ``rank`` when None)."""
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)


@dataclass
class DPOResult:
    """A trained DPO LoRA (on CPU, diffusers format) and how it got there."""

    lora_state_dict: dict[str, torch.Tensor]  # "unet.<module>.lora.{down,up}.weight"
    lora_config: dict[str, Any]  # the peft LoraConfig fields (saved as adapter metadata)
    config: DPOConfig
    base_folder: str
    tiny_model: bool  # the base is a tiny development pipeline
    steps: int
    seconds: float  # wall time of the whole call
    train_seconds: float  # wall time of the optimisation loop
    loss_curve: list[tuple[int, float]]  # (step, training DPO loss)
    accuracy_curve: list[tuple[int, float]]  # (step, training implicit accuracy)
    heldout_curve: list[tuple[int, float]]  # (step, held-out implicit accuracy); step 0 first
    heldout_loss_curve: list[tuple[int, float]]  # (step, held-out DPO loss)
    n_pairs: int  # training pairs used
    n_heldout: int  # held-out pairs used
    skipped: dict[str, int]  # training pairs not used, by reason
    heldout_skipped: dict[str, int]
    stop_reason: str  # "steps" or "time_budget"
    device: str
    precision: str  # what ran: fp32 on CPU whatever was asked
    prediction_type: str
    warnings: list[str] = field(default_factory=list)

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 10 % of steps (NaN without steps)."""
        return tail_mean(self.loss_curve)

    @property
    def final_accuracy(self) -> float:
        return tail_mean(self.accuracy_curve)

    @property
    def heldout_accuracy(self) -> float | None:
        """Held-out implicit accuracy at the end (None without held-out pairs)."""
        return self.heldout_curve[-1][1] if self.heldout_curve else None

    def metrics(self) -> dict[str, Any]:
        """JSON-able summary (what dpo_config.json and asset metadata record)."""
        return {
            "final_loss": self.final_loss if self.loss_curve else None,
            "first_loss": self.loss_curve[0][1] if self.loss_curve else None,
            "final_implicit_accuracy": self.final_accuracy if self.accuracy_curve else None,
            "heldout_implicit_accuracy": self.heldout_accuracy,
            "heldout_loss": self.heldout_loss_curve[-1][1] if self.heldout_loss_curve else None,
            "steps": self.steps,
            "steps_per_s": round(self.steps_per_s, 3),
            "seconds": round(self.seconds, 2),
            "train_seconds": round(self.train_seconds, 2),
            "n_pairs": self.n_pairs,
            "n_heldout": self.n_heldout,
            "skipped": dict(self.skipped),
            "heldout_skipped": dict(self.heldout_skipped),
            "stop_reason": self.stop_reason,
            "device": self.device,
            "precision": self.precision,
            "prediction_type": self.prediction_type,
            "tiny_model": self.tiny_model,
            "warnings": list(self.warnings),
        }


# ---------------------------------------------------------------------------------------------
# The loss


def dpo_loss(
    model_w: torch.Tensor,
    model_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, implicit accuracy, inside) of Diffusion-DPO from per-sample denoising MSEs.

    ``model_w``/``model_l``: the trained model's MSE on each pair's winner/loser [n];
    ``ref_w``/``ref_l``: the reference's on the same noised latents. ``inside`` [n] is
    ``−β/2 · ((model_w − ref_w) − (model_l − ref_l))``; the loss is the mean of
    ``−log σ(inside)`` and the implicit accuracy the share of ``inside > 0`` (a tie counts as
    wrong, so θ = ref gives loss log 2 and accuracy 0)."""
    shapes = {tuple(t.shape) for t in (model_w, model_l, ref_w, ref_l)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"dpo_loss expects four [n] tensors of one shape, got {sorted(shapes)}")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    model_diff = model_w.float() - model_l.float()
    ref_diff = ref_w.float() - ref_l.float()
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    accuracy = (inside > 0).float().mean()
    return loss, accuracy, inside


# ---------------------------------------------------------------------------------------------
# Decoding and encoding the pairs


@dataclass
class _Encoded:
    """What the loop needs of a set of pairs, computed once (kept on CPU, fp32)."""

    mean_w: torch.Tensor  # VAE posterior mean x scaling_factor [n, 4, h, w]
    std_w: torch.Tensor  # its std x scaling_factor
    mean_l: torch.Tensor
    std_l: torch.Tensor
    caption_index: torch.Tensor  # [n] → row of hidden
    hidden: torch.Tensor  # text encoder states of the distinct captions [k, 77, d]

    def __len__(self) -> int:
        return int(self.mean_w.shape[0])


def _check_pairs(pairs: Sequence[PreferencePair], what: str) -> None:
    for number, pair in enumerate(pairs):
        if not isinstance(pair, PreferencePair):
            raise TypeError(
                f"dpo: {what} pair {number} is a {type(pair).__name__}, not a PreferencePair"
            )


@torch.no_grad()
def _prepare(
    pipe: StableDiffusionPipeline,
    pairs: Sequence[PreferencePair],
    resolution: int,
    what: str,
    run: _Run,
    log: logging.Logger,
) -> tuple[_Encoded | None, dict[str, int]]:
    """Decode and VAE-encode every usable pair once, ``_EVAL_CHUNK`` pairs at a time (so only
    one chunk of pixels is ever in memory), and text-encode each distinct caption once.
    Returns (the encoded pairs or None when none is usable, skipped pairs by reason)."""
    vae, scale = pipe.vae, float(pipe.vae.config.scaling_factor)
    skipped: Counter[str] = Counter()
    parts: dict[str, list[torch.Tensor]] = {"mean_w": [], "std_w": [], "mean_l": [], "std_l": []}
    pending: dict[str, list[np.ndarray]] = {"w": [], "l": []}
    index: list[int] = []
    distinct: dict[str, int] = {}

    def flush() -> None:
        for side in ("w", "l"):
            if not pending[side]:
                continue
            pixels = torch.from_numpy(np.stack(pending[side]))
            images = to_model_range(pixels).to(run.device, dtype=run.weight_dtype)
            with run.autocast():
                dist = vae.encode(images).latent_dist
            parts[f"mean_{side}"].append((dist.mean.float() * scale).cpu())
            parts[f"std_{side}"].append((dist.std.float() * scale).cpu())
            pending[side].clear()

    for number, pair in enumerate(pairs):
        if not isinstance(pair.caption, str):
            skipped["bad_caption"] += 1
            continue
        decoded = []
        for side in ("winner", "loser"):
            try:
                decoded.append(decode_image(getattr(pair, side), resolution))
            except DECODE_ERRORS as exc:
                # PIL: UnidentifiedImageError (an OSError) for garbage, OSError for truncated
                # data or a missing file, SyntaxError/ValueError for broken headers.
                skipped[f"undecodable_{side}"] += 1
                if sum(v for k, v in skipped.items() if k.startswith("undecodable")) <= 3:
                    log.warning(
                        "dpo: %s pair %d: %s undecodable, skipped (%s)", what, number, side, exc
                    )
                break
        if len(decoded) < 2:
            continue
        if np.array_equal(decoded[0], decoded[1]):
            skipped["identical_images"] += 1
            continue
        pending["w"].append(decoded[0])
        pending["l"].append(decoded[1])
        index.append(distinct.setdefault(pair.caption, len(distinct)))
        if len(pending["w"]) == _EVAL_CHUNK:
            flush()
    flush()
    if skipped:
        log.warning("dpo: %s pairs skipped: %s (of %d)", what, dict(skipped), len(pairs))
    if not index:
        return None, dict(skipped)
    tokens = pipe.tokenizer(
        list(distinct),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    hidden = []
    for chunk in tokens.split(_EVAL_CHUNK):
        with run.autocast():
            hidden.append(pipe.text_encoder(chunk.to(run.device))[0].float().cpu())
    encoded = _Encoded(
        **{name: torch.cat(tensors) for name, tensors in parts.items()},
        caption_index=torch.tensor(index, dtype=torch.long),
        hidden=torch.cat(hidden),
    )
    return encoded, dict(skipped)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class _Run:
    """Device and precision of a run."""

    device: torch.device
    precision: str  # what runs: fp32 on CPU
    weight_dtype: torch.dtype  # of the frozen weights

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.precision in _AUTOCAST_DTYPES:
            return torch.autocast("cuda", dtype=_AUTOCAST_DTYPES[self.precision])
        return contextlib.nullcontext()


def _target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, t)  # v_prediction


def _pair_mses(
    unet: torch.nn.Module,
    scheduler: Any,
    latents_w: torch.Tensor,
    latents_l: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    run: _Run,
    grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model_w, model_l, ref_w, ref_l) per-sample MSEs of one batch of pairs: winner and
    loser share the noise and the timestep; θ runs with gradients iff ``grad``, the
    reference (adapters disabled) never."""
    latents = torch.cat([latents_w, latents_l])
    noise2 = torch.cat([noise, noise])
    t2 = torch.cat([timesteps, timesteps])
    noisy = scheduler.add_noise(latents, noise2, t2)
    target = _target(scheduler, latents, noise2, t2).float()
    states = torch.cat([hidden, hidden])
    model_input = noisy.to(run.weight_dtype)
    states = states.to(run.weight_dtype)

    def mse(prediction: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))

    with torch.no_grad():
        unet.disable_adapters()
        try:
            with run.autocast():
                ref = mse(unet(model_input, t2, states).sample)
        finally:
            unet.enable_adapters()
    with torch.set_grad_enabled(grad), run.autocast():
        model = mse(unet(model_input, t2, states).sample)
    model_w, model_l = model.chunk(2)
    ref_w, ref_l = ref.chunk(2)
    return model_w, model_l, ref_w, ref_l


@dataclass
class _Heldout:
    """Held-out pairs with their fixed draws: latents at the posterior mean, and for each
    draw a noise tensor and timesteps, all from one seeded generator."""

    encoded: _Encoded
    noise: list[torch.Tensor]  # per draw [n, 4, h, w]
    timesteps: list[torch.Tensor]  # per draw [n]


def _heldout_draws(encoded: _Encoded, config: DPOConfig, n_timesteps: int) -> _Heldout:
    generator = torch.Generator().manual_seed(config.seed + _HELDOUT_SEED_OFFSET)
    noise, timesteps = [], []
    for _ in range(config.heldout_draws):
        noise.append(torch.randn(encoded.mean_w.shape, generator=generator))
        timesteps.append(torch.randint(0, n_timesteps, (len(encoded),), generator=generator))
    return _Heldout(encoded, noise, timesteps)


def _evaluate(
    unet: torch.nn.Module, scheduler: Any, heldout: _Heldout, beta: float, run: _Run
) -> tuple[float, float]:
    """(held-out implicit accuracy, held-out DPO loss) over every pair and draw."""
    inside = []
    enc = heldout.encoded
    for noise, timesteps in zip(heldout.noise, heldout.timesteps, strict=True):
        for start in range(0, len(enc), _EVAL_CHUNK):
            rows = slice(start, start + _EVAL_CHUNK)
            mses = _pair_mses(
                unet,
                scheduler,
                enc.mean_w[rows].to(run.device),
                enc.mean_l[rows].to(run.device),
                noise[rows].to(run.device),
                timesteps[rows].to(run.device),
                enc.hidden[enc.caption_index[rows]].to(run.device),
                run,
                grad=False,
            )
            inside.append(dpo_loss(*mses, beta)[2].cpu())
    values = torch.cat(inside)
    return float((values > 0).float().mean()), float(-F.logsigmoid(values).mean())


def _index_stream(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled epochs, ``batch_size`` pairs at a time (wrapping across epochs, so
    every pair is used and a set smaller than a batch still fills one)."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _lora_config(config: DPOConfig) -> dict[str, Any]:
    """The peft LoraConfig fields of the adapter (also saved as diffusers' adapter metadata,
    so ``load_lora_weights`` rebuilds the same scale alpha / r)."""
    return {
        "r": config.rank,
        "lora_alpha": config.alpha,
        "init_lora_weights": "gaussian",
        "target_modules": list(TARGET_MODULES),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
    }


def train_dpo_lora(
    pipeline_folder: str | os.PathLike,
    pairs: Sequence[PreferencePair],
    config: DPOConfig | None = None,
    heldout: Sequence[PreferencePair] = (),
    log: logging.Logger | None = None,
) -> DPOResult:
    """Fine-tune a Diffusion-DPO LoRA on the UNet of the pipeline in ``pipeline_folder``.

    ``pairs`` are trained on, ``heldout`` only measured (held-out implicit accuracy). Raises
    ValueError when no usable training pair remains after skipping (see the module
    docstring), and FileNotFoundError / :class:`ml.diffusion.PipelineFolderError` for a bad
    base folder."""
    config = config or DPOConfig()
    log = log or LOG
    if len(pairs) == 0:
        raise ValueError("dpo: no preference pairs given")
    with torch_threads(config.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _train(Path(pipeline_folder), pairs, config, heldout, log)


def _train(
    folder: Path,
    pairs: Sequence[PreferencePair],
    config: DPOConfig,
    heldout_pairs: Sequence[PreferencePair],
    log: logging.Logger,
) -> DPOResult:
    from peft import LoraConfig

    started = time.perf_counter()
    check_pipeline_folder(folder)  # fail on a bad base before decoding anything
    device = resolve_device(config.device)
    warnings: list[str] = []
    precision = config.precision if device.type == "cuda" else "fp32"
    if precision != config.precision:
        warnings.append(f"precision {config.precision} asked for on {device}: running fp32")
        log.warning("dpo: %s", warnings[-1])
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dpo: precision bf16 asked for, but {device} does not support it")
    run = _Run(device, precision, _AUTOCAST_DTYPES.get(precision, torch.float32))

    _check_pairs(pairs, "training")
    _check_pairs(heldout_pairs, "held-out")

    pipe = load_pipeline(folder, device=str(device), dtype=run.weight_dtype)
    unet, scheduler = pipe.unet, pipe.scheduler
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"dpo: scheduler of {folder} predicts {prediction_type!r}; only epsilon and "
            f"v_prediction are supported"
        )
    if not hasattr(scheduler, "add_noise") or not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(
            f"dpo: scheduler of {folder} ({type(scheduler).__name__}) cannot add noise"
        )
    size = int(unet.config.sample_size) * int(pipe.vae_scale_factor)
    if size != config.resolution:
        warnings.append(f"training at {config.resolution} px; the base generates at {size} px")
        log.warning("dpo: %s", warnings[-1])
    for module in (pipe.vae, pipe.text_encoder, unet):
        module.requires_grad_(False)
    pipe.vae.eval()
    pipe.text_encoder.eval()
    lora = _lora_config(config)
    unet.add_adapter(LoraConfig(**lora))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for param in trainable:  # LoRA weights train in fp32 whatever the frozen weights are
        param.data = param.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    n_timesteps = int(scheduler.config.num_train_timesteps)

    train, skipped = _prepare(pipe, pairs, config.resolution, "training", run, log)
    if train is None:
        raise ValueError(
            f"dpo: no usable training pairs: all {len(pairs)} skipped ({skipped}); a pair "
            f"needs a string caption and two decodable, different images"
        )
    held, heldout_skipped = _prepare(pipe, heldout_pairs, config.resolution, "held-out", run, log)
    heldout = _heldout_draws(held, config, n_timesteps) if held is not None else None
    n_held = len(held) if held is not None else 0
    log.info(
        "dpo: %s on %s (%s), %d training / %d held-out pairs (skipped %s / %s), LoRA rank %d "
        "alpha %g (%d parameters), prepared in %.1f s",
        folder,
        device,
        precision,
        len(train),
        n_held,
        skipped or "none",
        heldout_skipped or "none",
        config.rank,
        config.alpha,
        sum(p.numel() for p in trainable),
        time.perf_counter() - started,
    )

    heldout_curve: list[tuple[int, float]] = []
    heldout_loss_curve: list[tuple[int, float]] = []
    eval_cost = 0.0
    unet.train()
    if heldout is not None:
        eval_started = time.perf_counter()
        accuracy, loss = _evaluate(unet, scheduler, heldout, config.beta, run)
        eval_cost = time.perf_counter() - eval_started
        heldout_curve.append((0, accuracy))
        heldout_loss_curve.append((0, loss))

    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    generator = torch.Generator().manual_seed(config.seed)
    batches = _index_stream(len(train), config.batch_size, generator)
    deadline = math.inf
    if config.time_budget_s is not None:
        deadline = started + config.time_budget_s - (eval_cost + 0.5)
    losses: list[tuple[int, float]] = []
    accuracies: list[tuple[int, float]] = []
    loop_start = time.perf_counter()
    last_log = loop_start
    step_time = 0.0
    stop_reason = "steps"
    step = 0
    while step < config.steps:
        now = time.perf_counter()
        if out_of_time(step, now, step_time, deadline):
            stop_reason = "time_budget"
            break
        lr = (
            config.lr * min(1.0, (step + 1) / config.warmup_steps)
            if config.warmup_steps
            else config.lr
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = next(batches)
        latents_w = train.mean_w[index] + train.std_w[index] * torch.randn(
            train.mean_w[index].shape, generator=generator
        )
        latents_l = train.mean_l[index] + train.std_l[index] * torch.randn(
            train.mean_l[index].shape, generator=generator
        )
        noise = torch.randn(latents_w.shape, generator=generator)
        timesteps = torch.randint(0, n_timesteps, (len(index),), generator=generator)
        mses = _pair_mses(
            unet,
            scheduler,
            latents_w.to(device),
            latents_l.to(device),
            noise.to(device),
            timesteps.to(device),
            train.hidden[train.caption_index[index]].to(device),
            run,
            grad=True,
        )
        loss, accuracy, _ = dpo_loss(*mses, config.beta)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"dpo: loss became {value} at step {step} (lr {lr})")
        losses.append((step, value))
        accuracies.append((step, float(accuracy)))
        took = time.perf_counter() - now
        step_time = took if step == 1 else max(took, 0.8 * step_time + 0.2 * took)
        if (
            heldout is not None
            and config.heldout_every
            and step % config.heldout_every == 0
            and step < config.steps
            and time.perf_counter() + 2 * eval_cost <= deadline
        ):
            accuracy_h, loss_h = _evaluate(unet, scheduler, heldout, config.beta, run)
            heldout_curve.append((step, accuracy_h))
            heldout_loss_curve.append((step, loss_h))
            log.info(
                "dpo: step %d held-out implicit accuracy %.3f loss %.4f", step, accuracy_h, loss_h
            )
        if time.perf_counter() - last_log >= config.log_every_s:
            last_log = time.perf_counter()
            rate = step / (last_log - loop_start)
            eta = min((config.steps - step) / rate, max(0.0, deadline - last_log))
            log.info(
                "dpo: step %d/%d loss %.4f (mean of last 20: %.4f) implicit accuracy %.2f "
                "(last 20: %.2f), %.2f steps/s, ETA %.0f s",
                step,
                config.steps,
                value,
                float(np.mean([v for _, v in losses[-20:]])),
                accuracies[-1][1],
                float(np.mean([v for _, v in accuracies[-20:]])),
                rate,
                eta,
            )
    train_seconds = time.perf_counter() - loop_start
    if heldout is not None and (not heldout_curve or heldout_curve[-1][0] != step):
        accuracy_h, loss_h = _evaluate(unet, scheduler, heldout, config.beta, run)
        heldout_curve.append((step, accuracy_h))
        heldout_loss_curve.append((step, loss_h))
    if step == 0:
        warnings.append("no training step fitted in the time budget: the LoRA is zero (= base)")
        log.warning("dpo: %s", warnings[-1])
    state = _lora_state_dict(unet)
    seconds = time.perf_counter() - started
    log.info(
        "dpo: done, %d steps in %.1f s (%s), loss %.4f → %.4f, held-out implicit accuracy %s",
        step,
        seconds,
        stop_reason,
        losses[0][1] if losses else float("nan"),
        tail_mean(losses),
        f"{heldout_curve[0][1]:.3f} → {heldout_curve[-1][1]:.3f}" if heldout_curve else "n/a",
    )
    return DPOResult(
        lora_state_dict=state,
        lora_config=lora,
        config=config,
        base_folder=str(folder.resolve()),
        tiny_model=is_tiny(folder),
        steps=step,
        seconds=seconds,
        train_seconds=train_seconds,
        loss_curve=losses,
        accuracy_curve=accuracies,
        heldout_curve=heldout_curve,
        heldout_loss_curve=heldout_loss_curve,
        n_pairs=len(train),
        n_heldout=n_held,
        skipped=skipped,
        heldout_skipped=heldout_skipped,
        stop_reason=stop_reason,
        device=str(device),
        precision=precision,
        prediction_type=prediction_type,
        warnings=warnings,
    )


def _lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' LoRA format with the ``unet.`` prefix that
    ``StableDiffusionPipeline.save_lora_weights(unet_lora_layers=…)`` adds (fp32, CPU), so
    ``pipe.load_lora_weights`` takes the dict or its file as is."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {
        f"unet.{key}": value.detach().to("cpu", torch.float32).contiguous().clone()
        for key, value in state.items()
    }


# ---------------------------------------------------------------------------------------------
# Saving and generating


def save_dpo_lora(result: DPOResult, folder: str | os.PathLike) -> Path:
    """Write ``<folder>/pytorch_lora_weights.safetensors`` (diffusers' LoRA layout, with the
    adapter config as metadata) and ``<folder>/dpo_config.json`` (config, metrics, curves,
    base model folder, tiny_model flag, the weights' SHA-256), atomically: both are written to
    a temporary folder beside ``folder`` that then replaces it. A non-empty ``folder`` that is
    not an earlier DPO output is refused. Returns ``folder``."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / DPO_CONFIG).is_file():
        raise ValueError(
            f"dpo: {folder} is a non-empty folder without {DPO_CONFIG}; refusing to replace it"
        )
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"dpo: {folder} exists and is not a folder")
    if not result.lora_state_dict:
        raise ValueError("dpo: the result holds no LoRA weights")
    layers = {key.removeprefix("unet."): value for key, value in result.lora_state_dict.items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.save-"))
    try:
        StableDiffusionPipeline.save_lora_weights(
            str(tmp),
            unet_lora_layers=layers,
            unet_lora_adapter_metadata=dict(result.lora_config),
            weight_name=LORA_WEIGHTS,
            safe_serialization=True,
        )
        document = {
            "kind": "diffusion_dpo_lora",
            "weights": LORA_WEIGHTS,
            "sha256": file_sha256(tmp / LORA_WEIGHTS),
            "base_model": result.base_folder,
            "tiny_model": result.tiny_model,
            "config": asdict(result.config),
            "lora": dict(result.lora_config),
            "metrics": result.metrics(),
            "curves": {
                name: _thin(curve)
                for name, curve in (
                    ("loss", result.loss_curve),
                    ("implicit_accuracy", result.accuracy_curve),
                    ("heldout_implicit_accuracy", result.heldout_curve),
                    ("heldout_loss", result.heldout_loss_curve),
                )
            },
        }
        atomic_write_bytes(str(tmp / DPO_CONFIG), (json.dumps(document, indent=2) + "\n").encode())
        fsync_tree(str(tmp))
        replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _thin(curve: Sequence[tuple[int, float]]) -> list[list[float]]:
    every = max(1, len(curve) // _CURVE_POINTS)
    points = list(curve[::every])
    if curve and points[-1] != curve[-1]:
        points.append(curve[-1])
    return [[s, round(v, 6)] for s, v in points]


def lora_weights_file(folder: str | os.PathLike) -> Path:
    """``<folder>/pytorch_lora_weights.safetensors``, checked: a missing folder or file is a
    FileNotFoundError, pickled LoRA weights (``pytorch_lora_weights.bin``, …) are refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dpo: LoRA folder {folder} does not exist")
    path = folder / LORA_WEIGHTS
    if not path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"dpo: LoRA folder {folder} holds only pickled weights ({', '.join(pickles)}); "
                f"refusing to unpickle them — convert them to {LORA_WEIGHTS}"
            )
        raise FileNotFoundError(f"dpo: LoRA folder {folder} has no {LORA_WEIGHTS}")
    return path


def generate(
    pipeline_folder: str | os.PathLike,
    prompts: Sequence[str],
    lora_folder: str | os.PathLike | None = None,
    steps: int = 10,
    seed: int = 0,
    device: str = "cpu",
    guidance_scale: float = 7.5,
    threads: int | None = 1,
) -> list[Image.Image]:
    """One image per prompt from the base pipeline, or with the LoRA in ``lora_folder`` loaded
    through ``pipe.load_lora_weights`` (so a LoRA that does not fit the base fails here).

    Prompt ``i`` is generated from its own generator seeded ``seed + i`` (on CPU), so the
    same call with and without a LoRA starts from the same latents: before/after images are
    comparable, and an image does not depend on the other prompts."""
    if isinstance(prompts, str):
        raise TypeError("generate: prompts must be a sequence of strings, not one string")
    if not prompts:
        raise ValueError("generate: no prompts")
    if steps < 1:
        raise ValueError(f"generate: steps must be >= 1, got {steps}")
    weights = lora_weights_file(lora_folder) if lora_folder is not None else None
    with torch_threads(threads):
        pipe = load_pipeline(pipeline_folder, device=device)
        if weights is not None:
            try:
                pipe.load_lora_weights(str(weights.parent), weight_name=weights.name)
            except Exception as exc:
                raise ValueError(
                    f"dpo: LoRA {weights} does not load into the pipeline {pipeline_folder} "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
        output = pipe(
            list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pil",
        )
    return list(output.images)
