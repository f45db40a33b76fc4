"""The CLIP encoder registry: a model config (name or JSON file) + an optional checkpoint in;
model, preprocessing and tokenizer out. Built like open_clip's own factory, and on it.

* **Configs.** Any open_clip model config name (``ViT-H-14``, the production default: the
  architecture HPSv2 fine-tunes), the configs shipped here (``configs/*.json``; ``imagegem-tiny``
  is the embedded default, small enough to train on a CPU in minutes), or a path to an
  open_clip-format JSON file (``{"embed_dim": …, "vision_cfg": {…}, "text_cfg": {…}}``),
  registered under the file's stem.
* **Weights.** Nothing is ever downloaded. Without a checkpoint the model keeps its seeded
  initialisation (tests, and the tiny encoder before it is trained) and its tag says so. A
  checkpoint is loaded by :mod:`ml.encoders.checkpoint`: safetensors directly, ``.pt``/``.bin``
  only through ``torch.load(weights_only=True)``, anything else refused; a missing file or a
  state dict that does not fit the architecture is an error naming the file and the mismatch.
* **Tag.** Every vector records the encoder that made it as ``<config name>@<first 16 hex of
  the checkpoint's SHA-256>`` (``@init-seed<N>`` without a checkpoint): a new checkpoint is a
  new tag, and tables keyed by (item, encoder) re-embed everything for it.
* **Device and precision.** ``auto`` picks CUDA when present; fp16/bf16 apply as autocast on
  CUDA only (weights stay fp32); CPU always runs fp32.

No Dagster imports; the encoder resource in ``pipelines/resources.py`` calls :func:`load_encoder`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ml.encoders.checkpoint import file_sha256, load_state_dict, match_state_dict

PRODUCTION_ENCODER = "ViT-H-14"
TINY_ENCODER = "imagegem-tiny"
PRECISIONS = ("fp32", "fp16", "bf16")
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class EncoderConfigError(ValueError):
    """An encoder config name or file that cannot be resolved."""


def builtin_configs() -> dict[str, Path]:
    """The configs shipped in ``ml/encoders/configs``: name → JSON path."""
    folder = resources.files("ml.encoders").joinpath("configs")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".json")}


def resolve_config(model: str) -> tuple[str, dict[str, Any]]:
    """(name, open_clip model config) of a config name or a JSON file path.

    Shipped configs and JSON files are registered with open_clip (``add_model_config``) so
    its factory, transforms and tokenizer all see them."""
    import open_clip

    if model.endswith(".json") or os.sep in model:
        path = Path(model)
        if not path.is_file():
            raise EncoderConfigError(f"encoder config file {path} does not exist")
        name = path.stem
        open_clip.add_model_config(str(path))
    else:
        name = model
        shipped = builtin_configs()
        if name in shipped:
            open_clip.add_model_config(str(shipped[name]))
    config = open_clip.get_model_config(name)
    if config is None:
        known = sorted(builtin_configs()) + ["ViT-B-32", "ViT-L-14", "ViT-H-14", "…"]
        raise EncoderConfigError(
            f"unknown encoder config {model!r}: not an open_clip model config, not a shipped "
            f"config, not a JSON file (known include {', '.join(known)})"
        )
    for part in ("embed_dim", "vision_cfg", "text_cfg"):
        if part not in config:
            raise EncoderConfigError(f"encoder config {model!r} has no {part!r}")
    return name, config


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(
            f"encoder device {device!r}: not a device (cpu, cuda, cuda:N, auto)"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"encoder device {device!r} asked for, but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"encoder device {device!r}: only cpu, cuda and auto are supported")
    return resolved


def encoder_tag(name: str, checkpoint_sha256: str | None, seed: int = 0) -> str:
    """What every vector records as ``encoder``: config name + checkpoint digest."""
    return f"{name}@{checkpoint_sha256[:16]}" if checkpoint_sha256 else f"{name}@init-seed{seed}"


@dataclass
class Encoder:
    """A loaded CLIP encoder: the model in eval mode, its preprocessing and tokenizer."""

    name: str
    config: dict[str, Any]
    model: torch.nn.Module
    preprocess: Callable  # PIL image → float tensor [3, H, W] (open_clip's eval transform)
    tokenizer: Callable  # list[str] → LongTensor [n, context_length]
    device: torch.device
    precision: str
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    seed: int = 0
    log: logging.Logger = field(default_factory=lambda: logging.getLogger(__name__))

    @property
    def tag(self) -> str:
        return encoder_tag(self.name, self.checkpoint_sha256, self.seed)

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.config["vision_cfg"].get("image_size", 224)
        return int(size if isinstance(size, int) else size[0])

    @property
    def context_length(self) -> int:
        return int(self.config["text_cfg"].get("context_length", 77))

    @property
    def is_tiny(self) -> bool:
        """True for the shipped small configs: their outputs must say they came from a tiny model."""
        return self.name in builtin_configs()

    @property
    def trained(self) -> bool:
        return self.checkpoint_sha256 is not None

    def autocast(self) -> contextlib.AbstractContextManager:
        """fp16/bf16 autocast on CUDA; nothing on CPU (fp32)."""
        if self.device.type == "cuda" and self.precision in _AUTOCAST_DTYPES:
            return torch.autocast("cuda", dtype=_AUTOCAST_DTYPES[self.precision])
        return contextlib.nullcontext()

    @torch.inference_mode()
    def encode_image_tensors(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image vectors of a preprocessed batch [n, 3, H, W] (on CPU)."""
        with self.autocast():
            features = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_token_tensors(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 text vectors of a tokenised batch [n, context_length]."""
        with self.autocast():
            features = self.model.encode_text(tokens.to(self.device, non_blocking=True))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    def describe(self) -> dict[str, Any]:
        """What asset metadata and the artifacts table record about this encoder."""
        return {
            "encoder": self.tag,
            "config": self.name,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "device": str(self.device),
            "precision": self.precision if self.device.type == "cuda" else "fp32",
            "tiny_model": self.is_tiny,
            "trained": self.trained,
        }


def build_model(model: str, seed: int = 0) -> tuple[str, dict[str, Any], torch.nn.Module, Callable]:
    """(name, config, freshly initialised model, eval preprocessing) of a config; no weights
    are loaded. The seed makes the initialisation reproducible."""
    import open_clip

    name, config = resolve_config(model)
    with _seeded(seed), _quiet_open_clip():
        net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return name, config, net, preprocess


def load_encoder(
    model: str = TINY_ENCODER,
    checkpoint: str | os.PathLike | None = None,
    device: str = "auto",
    precision: str = "fp32",
    seed: int = 0,
) -> Encoder:
    """The encoder of ``model`` (a config name or JSON file) with ``checkpoint``'s weights.

    Raises FileNotFoundError for a missing checkpoint, and ValueError for an unknown config,
    an unsupported checkpoint format, or weights that do not fit the architecture (each
    message names the file and the mismatch)."""
    import open_clip

    if precision not in PRECISIONS:
        raise ValueError(f"encoder precision {precision!r} not in {PRECISIONS}")
    target = resolve_device(device)
    name, config, net, preprocess = build_model(model, seed)
    digest = None
    if checkpoint is not None:
        path = Path(checkpoint)
        state = load_state_dict(path)
        match_state_dict(net, state, path, name)
        net.load_state_dict(state, strict=True)
        digest = file_sha256(path)
    net.eval().to(target)
    tokenizer = open_clip.get_tokenizer(name)
    return Encoder(
        name=name,
        config=config,
        model=net,
        preprocess=preprocess,
        tokenizer=tokenizer,
        device=target,
        precision=precision,
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        checkpoint_sha256=digest,
        seed=seed,
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _NoPretrainedNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip warns (on the root logger) that no pretrained weights were loaded; here that
    is the point (weights come from our own loader), so that one message is dropped."""
    notice = _NoPretrainedNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)
