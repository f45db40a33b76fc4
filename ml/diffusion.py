"""The base diffusion pipeline of the alignment stage: build a tiny one, save it, load any one.

Production fine-tunes Stable Diffusion 1.5 (a diffusers folder an operator provides: nothing
can be downloaded here). Tests and the demo use a **tiny SD-1.5-shaped pipeline** built from
:data:`TINY_CONFIG` with a fixed seed: the same component classes and the same layout as SD
1.5 (a cross-attention UNet whose attention modules are ``to_q/to_k/to_v/to_out.0``, a KL VAE
with 4 latent channels, a CLIP text encoder and CLIP's BPE tokenizer, a DDPM scheduler), only
narrow: 32 px images, 8x8 latents, 32-wide text. Its weights are random, so what it generates
is noise; what matters is that every code path (LoRA training, saving, loading into the base,
generating) runs exactly as it would on SD 1.5. Everything it produces must say so:
:func:`is_tiny` reads the marker. One change to the random init makes the VAE behave like SD's
(see :func:`_tiny_vae`): its posterior is made near-deterministic and its ``scaling_factor`` is
set the way SD's 0.18215 was, so latents carry the image rather than posterior noise and have
about unit variance (without it a DPO preference between two kinds of image is invisible).

* **Tokenizer offline.** CLIP's ``vocab.json`` / ``merges.txt`` cannot be downloaded; they
  are rebuilt from open_clip's bundled BPE merges exactly as OpenAI CLIP's ``SimpleTokenizer``
  builds its vocabulary (the 256 byte characters, the same with ``</w>``, every merge, then
  ``<|startoftext|>`` and ``<|endoftext|>``: 49,408 entries), so token ids are CLIP's (tested
  against open_clip's tokenizer).
* **Layout.** :func:`build_tiny_pipeline` writes a normal diffusers folder
  (``save_pretrained(safe_serialization=True)``: ``model_index.json``, ``unet/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``) plus the marker ``imagegem.json``
  (``{"tiny_model": true, "config": …, "seed": …}``). It builds in a temporary folder beside
  the target and renames it into place, so a killed build leaves no half pipeline; a folder
  that already holds a complete pipeline with the same marker is reused as it is.
* **Loading safely.** :func:`load_pipeline` loads with ``local_files_only=True`` and
  ``use_safetensors=True`` and checks the folder first: a missing folder, a folder that is not
  a diffusers layout, and a model component whose weights exist only as pickles (``.bin``,
  ``.ckpt``, ``.pt``, …) are refused by name before anything is read (pickles are never
  unpickled); a component that does not load (a broken config, weights of another
  architecture) is a :class:`PipelineFolderError` naming the folder and the component.

No Dagster imports.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import importlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ml.encoders import resolve_device
from warehouse.files import atomic_write_bytes, fsync_tree, replace_dir

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

LOG = logging.getLogger(__name__)

MARKER = "imagegem.json"
MODEL_INDEX = "model_index.json"
MODEL_COMPONENTS = ("unet", "vae", "text_encoder")  # components with weights
REQUIRED_COMPONENTS = (*MODEL_COMPONENTS, "tokenizer", "scheduler")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
_LIBRARIES = ("diffusers", "transformers")  # libraries a model_index.json may name
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MARKER_FORMAT = 1

# CLIP's tokenizer: the first line of the BPE file is a header, then 49152 - 256 - 2 merges.
_N_MERGES = 49152 - 256 - 2
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77

# The tiny SD-1.5-shaped pipeline. SD 1.5 itself: UNet (320, 640, 1280, 1280), 2 layers per
# block, cross-attention 768, 8 heads; VAE (128, 256, 512, 512); CLIP ViT-L text 768 x 12.
TINY_CONFIG: dict[str, Any] = {
    "resolution": 32,
    "vae_posterior_logvar": -14.0,  # see _tiny_vae
    "unet": {
        "sample_size": 8,  # latents 8x8 = 32 px through the 4x VAE
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [16, 32, 32],  # three levels: two downsamples, 4x
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "layers_per_block": 1,
        "norm_num_groups": 8,
    },
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": CONTEXT_LENGTH,
        "vocab_size": 49408,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "hidden_act": "quick_gelu",
        "projection_dim": 32,
    },
    # SD 1.5's training noise schedule.
    "scheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "steps_offset": 1,
    },
}


class PipelineFolderError(ValueError):
    """A pipeline folder that is not a loadable, safe diffusers Stable Diffusion layout."""


# ---------------------------------------------------------------------------------------------
# The CLIP tokenizer, offline


def clip_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of OpenAI CLIP's tokenizer, rebuilt from open_clip's bundled BPE file.

    The vocabulary is built exactly as CLIP's ``SimpleTokenizer`` does: the 256 byte
    characters of ``bytes_to_unicode``, the same with ``</w>``, the joined merges, then the
    start and end tokens (ids 49406 and 49407)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"open_clip's BPE file {default_bpe()} is not CLIP's (merges differ)")
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), SOT, EOT]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("CLIP vocabulary rebuilt with duplicate tokens")
    return vocab, merges  # type: ignore[return-value]


def write_clip_tokenizer(folder: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (with the ``#version`` header Hugging Face's
    tokenizers expect) of CLIP's tokenizer into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab()
    atomic_write_bytes(
        str(folder / "vocab.json"), json.dumps(vocab, ensure_ascii=False).encode("utf-8")
    )
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    atomic_write_bytes(str(folder / "merges.txt"), text.encode("utf-8"))
    return folder


def load_clip_tokenizer(folder: str | os.PathLike) -> Any:
    """``CLIPTokenizer`` from a folder holding ``vocab.json`` + ``merges.txt`` (or a saved
    tokenizer), with SD 1.5's settings (77 tokens, padding with ``<|endoftext|>``)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        str(folder), local_files_only=True, model_max_length=CONTEXT_LENGTH
    )


# ---------------------------------------------------------------------------------------------
# Building the tiny pipeline


ImageSource = bytes | str | os.PathLike


def decode_image(source: ImageSource, resolution: int) -> np.ndarray:
    """uint8 [3, resolution, resolution] of an image (bytes or a path): RGB, the shorter side
    resized to ``resolution`` (bilinear, as the diffusers example), then centre-cropped.
    Raises OSError/ValueError/SyntaxError on anything undecodable."""
    if isinstance(source, bytes | bytearray | memoryview):
        handle: Any = io.BytesIO(bytes(source))
    elif isinstance(source, str | os.PathLike):
        handle = os.fspath(source)
    else:
        raise ValueError(f"an image must be bytes or a path, not {type(source).__name__}")
    with Image.open(handle) as image:
        image.load()
        picture = image.convert("RGB")
    width, height = picture.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != picture.size:
        picture = picture.resize(size, Image.Resampling.BILINEAR)
    left = (size[0] - resolution) // 2
    top = (size[1] - resolution) // 2
    picture = picture.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(picture, dtype=np.uint8)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] → float in [-1, 1] (what the SD VAE takes)."""
    return pixels.float() / 127.5 - 1.0


DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# Stable Diffusion 1.5's own architecture (its published configs), for speed and memory checks
# at real size from a random initialisation (``build_random_pipeline``): weights cannot be
# downloaded here, and neither speed nor memory depends on them.
SD15_CONFIG: dict[str, Any] = {
    "resolution": 512,
    "unet": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "sample_size": 512,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
    },
    "text_encoder": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": CONTEXT_LENGTH,
        "vocab_size": 49408,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    "scheduler": TINY_CONFIG["scheduler"],
}


def tiny_marker(seed: int = 0) -> dict[str, Any]:
    """What ``imagegem.json`` of a tiny pipeline built with ``seed`` holds."""
    return {
        "tiny_model": True,
        "format": _MARKER_FORMAT,
        "config": copy.deepcopy(TINY_CONFIG),
        "seed": int(seed),
    }


def build_tiny_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny SD-1.5-shaped pipeline into ``folder`` (see the module docstring).

    Idempotent: a folder that already holds a complete pipeline with the same marker is
    returned as it is. A tiny pipeline with another marker (other seed or config) or an
    incomplete one is replaced; any other non-empty folder is refused (ValueError), never
    overwritten."""
    folder = Path(folder)
    marker = tiny_marker(seed)
    if _is_complete(folder) and _read_marker(folder) == marker:
        return folder
    if folder.exists() and not folder.is_dir():
        raise PipelineFolderError(f"tiny pipeline target {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not _read_marker(folder).get("tiny_model"):
        raise PipelineFolderError(
            f"tiny pipeline target {folder} is a non-empty folder that is not a tiny pipeline "
            f"(no {MARKER} with tiny_model); refusing to overwrite it"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.build-"))
    try:
        with _quiet_loaders():
            _build_into(tmp, seed)
        atomic_write_bytes(str(tmp / MARKER), (json.dumps(marker, indent=2) + "\n").encode())
        fsync_tree(str(tmp))
        replace_dir(tmp, folder, lambda: _is_complete(folder) and _read_marker(folder) == marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    LOG.info("diffusion: built tiny pipeline (seed %d) in %s", seed, folder)
    return folder


def build_random_pipeline(folder: str | os.PathLike, config: dict[str, Any], seed: int = 0) -> Path:
    """A randomly initialised pipeline of ``config``'s architecture (e.g. :data:`SD15_CONFIG`)
    written to ``folder`` (atomically), for speed and memory checks at real size. Its marker
    says ``random_init``; it is not a tiny development model. An existing complete folder with
    the same marker is returned as it is; any other non-empty folder is refused."""
    folder = Path(folder)
    marker = {"random_init": True, "format": _MARKER_FORMAT, "config": config, "seed": int(seed)}
    if _is_complete(folder) and _read_marker(folder) == marker:
        return folder
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PipelineFolderError(f"random pipeline target {folder} exists and is not empty")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.build-"))
    try:
        with _quiet_loaders():
            _build_into(tmp, seed, config)
        atomic_write_bytes(str(tmp / MARKER), (json.dumps(marker, indent=2) + "\n").encode())
        fsync_tree(str(tmp))
        replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _build_into(folder: Path, seed: int, config: dict[str, Any] = TINY_CONFIG) -> None:
    """Instantiate every component from ``config`` under ``seed`` and save the pipeline (the
    tiny config's VAE made usable, see :func:`_tiny_vae`)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_clip_tokenizer(write_clip_tokenizer(folder / "tokenizer"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config["unet"])
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**config["vae"])
        if config is TINY_CONFIG:
            vae = _tiny_vae(vae)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(**config["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)


_CALIBRATION_IMAGES = 32


@torch.no_grad()
def _tiny_vae(vae: Any) -> Any:
    """Make the randomly initialised tiny VAE usable as SD's is: a near-deterministic
    encoder (the posterior's log-variance half of ``quant_conv`` set to a constant
    e^-14 variance; a random init has std ≈ 1, so sampled latents would be mostly noise) and
    ``scaling_factor`` chosen as SD's 0.18215 was, 1 / std of the latents, on a fixed set of
    smooth random colour images (so latents have unit variance, like the noise)."""
    channels = vae.config.latent_channels
    vae.quant_conv.weight[channels:] = 0.0
    vae.quant_conv.bias[channels:] = TINY_CONFIG["vae_posterior_logvar"]
    generator = torch.Generator().manual_seed(0)
    size = vae.config.sample_size
    blocks = torch.rand((_CALIBRATION_IMAGES, 3, 4, 4), generator=generator)
    images = torch.nn.functional.interpolate(blocks, size=(size, size), mode="bilinear")
    images = images + 0.1 * torch.randn(images.shape, generator=generator)
    latents = vae.encode(images.clamp(0, 1) * 2 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 5))
    return vae


def _read_marker(folder: Path) -> dict[str, Any]:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def is_tiny(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a tiny development pipeline (its ``imagegem.json`` says so);
    False for a folder without a readable marker (e.g. a real SD 1.5)."""
    return _read_marker(Path(folder)).get("tiny_model") is True


def _is_complete(folder: Path) -> bool:
    """Every required component's folder and config is there and the models have safetensors."""
    if not (folder / MODEL_INDEX).is_file():
        return False
    for name in REQUIRED_COMPONENTS:
        if not (folder / name).is_dir():
            return False
    return all(any((folder / name).glob("*.safetensors")) for name in MODEL_COMPONENTS)


# ---------------------------------------------------------------------------------------------
# Loading


def check_pipeline_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """Validate a pipeline folder without loading weights; returns its ``model_index.json``.

    Raises FileNotFoundError for a missing folder and :class:`PipelineFolderError` for a
    folder that is not a Stable Diffusion diffusers layout or whose weights are pickles only."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"diffusion pipeline folder {folder} does not exist")
    if not folder.is_dir():
        raise PipelineFolderError(f"diffusion pipeline {folder} is not a folder")
    index_path = folder / MODEL_INDEX
    if not index_path.is_file():
        raise PipelineFolderError(
            f"diffusion pipeline folder {folder} is not a diffusers layout: no {MODEL_INDEX} "
            f"(a single-file .safetensors/.ckpt checkpoint must be converted to diffusers first)"
        )
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineFolderError(f"diffusion pipeline {index_path}: unreadable ({exc})") from exc
    if not isinstance(index, dict):
        raise PipelineFolderError(f"diffusion pipeline {index_path}: not a JSON object")
    for name in REQUIRED_COMPONENTS:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and all(entry)):
            raise PipelineFolderError(
                f"diffusion pipeline folder {folder}: {MODEL_INDEX} has no {name!r} component "
                f"(a Stable Diffusion pipeline needs {', '.join(REQUIRED_COMPONENTS)})"
            )
        if not (folder / name).is_dir():
            raise PipelineFolderError(
                f"diffusion pipeline folder {folder}: component folder {name}/ is missing"
            )
    for name in MODEL_COMPONENTS:
        sub = folder / name
        files = [p for p in sub.iterdir() if p.is_file()]
        if not any(p.name.endswith(".safetensors") for p in files):
            pickles = sorted(p.name for p in files if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                raise PipelineFolderError(
                    f"diffusion pipeline folder {folder}: component {name!r} has weights only "
                    f"in pickle form ({', '.join(pickles)}); refusing to unpickle them — "
                    f"convert them to safetensors"
                )
            raise PipelineFolderError(
                f"diffusion pipeline folder {folder}: component {name!r} has no .safetensors "
                f"weights"
            )
    return index


def load_pipeline(
    folder: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """The Stable Diffusion pipeline of a diffusers folder, on ``device`` in ``dtype``, with no
    safety checker (see the module docstring for what is refused, and how)."""
    from diffusers import StableDiffusionPipeline

    if dtype not in _DTYPES:
        raise ValueError(f"pipeline dtype {dtype} not one of {_DTYPES}")
    target = resolve_device(device)
    folder = Path(folder)
    index = check_pipeline_folder(folder)
    try:
        with _quiet_loaders():
            pipe = StableDiffusionPipeline.from_pretrained(
                str(folder),
                local_files_only=True,
                use_safetensors=True,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                dtype=dtype,
            )
    except Exception as exc:
        component, cause = _diagnose(folder, index)
        raise PipelineFolderError(
            f"diffusion pipeline folder {folder}: component {component!r} does not load "
            f"({type(cause).__name__}: {_short(cause)})"
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(target)


def _diagnose(folder: Path, index: dict[str, Any]) -> tuple[str, BaseException | str]:
    """Which component makes the pipeline fail to load: each is loaded alone with the class
    its ``model_index.json`` entry names (diffusers / transformers only)."""
    for name in REQUIRED_COMPONENTS:
        library, class_name = index[name]
        try:
            if library not in _LIBRARIES:
                raise PipelineFolderError(f"library {library!r} is not one of {_LIBRARIES}")
            cls = getattr(importlib.import_module(library), class_name, None)
            if cls is None:
                raise PipelineFolderError(f"{library} has no class {class_name!r}")
            kwargs: dict[str, Any] = {"local_files_only": True}
            if name in MODEL_COMPONENTS:
                kwargs["use_safetensors"] = True
            with _quiet_loaders():
                cls.from_pretrained(str(folder / name), **kwargs)
        except Exception as exc:
            return name, exc
    return "pipeline", "the components load one by one but not together"


def _short(cause: BaseException | str, limit: int = 400) -> str:
    text = " ".join(str(cause).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def _quiet_loaders() -> Iterator[None]:
    """diffusers/transformers print progress bars and INFO chatter while loading."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, (verbosity, bars) in zip(libraries, before, strict=True):
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()
