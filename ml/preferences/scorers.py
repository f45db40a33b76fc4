"""One interface over every image scorer of the preferences stage.

A scorer has a ``name`` and ``score(batch) -> float per image``; a :class:`ScoringBatch` carries
whatever the scorers may need (image ids always; image files or bytes, prompt texts, image
and prompt embeddings where available) and each scorer reads only its own parts. An image a
scorer cannot score gets NaN and its reason is counted in the scorer's ``rejections``
(never an exception for one bad image; a batch without the inputs a scorer needs is an
error). :func:`score_batches` runs a scorer over batches and counts the NaNs.

* :class:`HPSv2Scorer` — Human Preference Score v2: open_clip ViT-H-14 fine-tuned on human
  preference pairs, with the weights from a configured *local* checkpoint (the release's
  ``HPS_v2_compressed.pt`` holds ``{"state_dict": ...}``; loaded through
  :func:`ml.encoders.load_encoder`, so only with ``torch.load(weights_only=True)`` and matched
  key by key against the architecture). The score is what the HPSv2 package computes: the
  cosine of the L2-normalised image and text features (``image_features @ text_features.T``,
  diagonal), images through the model's own eval preprocess, prompts through its tokenizer,
  under inference mode with fp16 autocast on CUDA (HPSv2's ``amp``), fp32 on CPU.
* :class:`RewardModelScorer` — the reaction-trained reward model of
  :mod:`ml.preferences.reward` on the batch's embeddings (refusing another encoder's vectors).
* :class:`ClipScoreScorer` — the cosine of an image's embedding and its prompt's (the stage's
  own encoder; no model run). This is the raw cosine, not CLIPScore's ``2.5·max(cos, 0)``.

:func:`make_scorers` builds the ones that can run from the configuration (HPSv2 only with a
checkpoint configured, the reward model only once one has been trained) and says which it
skipped and why.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ml.encoders import PRODUCTION_ENCODER

LOG = logging.getLogger(__name__)

ImageInput = str | os.PathLike | bytes | None


@dataclass(frozen=True)
class ScoringBatch:
    """The images to score and what is known about them; every field but ``image_ids`` is
    optional, and each given field has one entry (row) per image."""

    image_ids: np.ndarray  # int64 (n,)
    images: Sequence[ImageInput] | None = None  # local paths or encoded bytes (None: missing)
    prompts: Sequence[str | None] | None = None
    image_embeddings: np.ndarray | None = None  # (n, d), L2-normalised
    prompt_embeddings: np.ndarray | None = None  # (n, d), the image's prompt's vector
    encoder: str | None = None  # tag of the encoder that made the embeddings

    def __post_init__(self) -> None:
        ids = np.asarray(self.image_ids)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise ValueError(f"image_ids must be a 1-D integer array, got {ids.shape} {ids.dtype}")
        object.__setattr__(self, "image_ids", ids.astype(np.int64, copy=False))
        n = ids.shape[0]
        for name in ("images", "prompts"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} image ids")
        for name in ("image_embeddings", "prompt_embeddings"):
            value = getattr(self, name)
            if value is None:
                continue
            if getattr(value, "ndim", 0) != 2 or value.shape[0] != n:
                raise ValueError(f"{name} must be ({n}, d), got {getattr(value, 'shape', None)}")
        if (
            self.image_embeddings is not None
            and self.prompt_embeddings is not None
            and self.image_embeddings.shape[1] != self.prompt_embeddings.shape[1]
        ):
            raise ValueError(
                f"image_embeddings ({self.image_embeddings.shape[1]}) and prompt_embeddings "
                f"({self.prompt_embeddings.shape[1]}) have different dimensions"
            )

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])

    def require(self, scorer: str, *fields: str) -> None:
        """ValueError naming the scorer and the fields it needs that this batch lacks."""
        missing = [name for name in fields if getattr(self, name) is None]
        if missing:
            raise ValueError(f"scorer {scorer!r} needs {', '.join(missing)} in the ScoringBatch")


@runtime_checkable
class ImageScorer(Protocol):
    """Anything with a ``name`` that maps a batch to one float per image (NaN: not scored)."""

    name: str

    def score(self, batch: ScoringBatch) -> np.ndarray: ...


@dataclass
class ScorerRun:
    """A scorer's scores over several batches, concatenated in order."""

    name: str
    scores: np.ndarray  # float32 (n,)
    n_nan: int
    rejections: dict[str, int] = field(default_factory=dict)  # reason → images, where known

    def metrics(self) -> dict[str, Any]:
        finite = self.scores[np.isfinite(self.scores)]
        return {
            "scorer": self.name,
            "n_images": int(self.scores.shape[0]),
            "n_nan": self.n_nan,
            "rejections": dict(self.rejections),
            "mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std()) if finite.size else None,
        }


def score_batches(
    scorer: ImageScorer, batches: Iterable[ScoringBatch], log: logging.Logger | None = None
) -> ScorerRun:
    """Run ``scorer`` over ``batches``; check each result has one float per image; count NaNs
    (and their reasons, for scorers that keep ``rejections``)."""
    before = Counter(getattr(scorer, "rejections", {}))
    parts: list[np.ndarray] = []
    for batch in batches:
        scores = np.asarray(scorer.score(batch), dtype=np.float32)
        if scores.shape != (len(batch),):
            raise ValueError(
                f"scorer {scorer.name!r} returned shape {scores.shape} for {len(batch)} images"
            )
        parts.append(scores)
    scores = np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)
    after = Counter(getattr(scorer, "rejections", {}))
    rejections = dict(after - before)
    n_nan = int(np.isnan(scores).sum())
    if n_nan and log is not None:
        log.warning(
            "scorer %s: %d of %d image(s) not scored (%s)",
            scorer.name,
            n_nan,
            scores.shape[0],
            ", ".join(f"{k}: {v}" for k, v in rejections.items()) or "no reason recorded",
        )
    return ScorerRun(scorer.name, scores, n_nan, rejections)


def _finite_rows(*arrays: np.ndarray) -> np.ndarray:
    ok = np.ones(arrays[0].shape[0], dtype=bool)
    for array in arrays:
        ok &= np.isfinite(array).all(axis=1)
    return ok


# ---------------------------------------------------------------------------------------------
# CLIP score


class ClipScoreScorer:
    """cos(image embedding, prompt embedding), computed in float64 from the given vectors
    (re-normalised, so vectors that are not exactly unit still give the cosine). A row with a
    non-finite or zero vector is NaN (``missing embedding`` / ``zero vector``)."""

    name = "clip_score"

    def __init__(self) -> None:
        self.rejections: Counter[str] = Counter()

    def score(self, batch: ScoringBatch) -> np.ndarray:
        batch.require(self.name, "image_embeddings", "prompt_embeddings")
        image = np.asarray(batch.image_embeddings, dtype=np.float64)
        prompt = np.asarray(batch.prompt_embeddings, dtype=np.float64)
        out = np.full(len(batch), np.nan, dtype=np.float32)
        finite = _finite_rows(image, prompt)
        norms = np.linalg.norm(image, axis=1) * np.linalg.norm(prompt, axis=1)
        nonzero = norms > 0
        ok = finite & nonzero
        out[ok] = np.einsum("ij,ij->i", image[ok], prompt[ok]) / norms[ok]
        self.rejections["missing embedding"] += int((~finite).sum())
        self.rejections["zero vector"] += int((finite & ~nonzero).sum())
        self.rejections += Counter()  # drop zero counts
        return out


# ---------------------------------------------------------------------------------------------
# Reward model


class RewardModelScorer:
    """The reward model of :mod:`ml.preferences.reward` on the batch's embeddings.

    ``encoder`` is the tag of the encoder the model was trained on; a batch whose ``encoder``
    is set and differs is refused (the scores would be meaningless). Rows with a non-finite
    vector are NaN (``missing embedding``)."""

    name = "reward_model"

    def __init__(
        self,
        model: Any,
        encoder: str | None = None,
        batch_size: int = 4096,
        device: str = "cpu",
    ) -> None:
        from ml.preferences.reward import RewardModel

        if not isinstance(model, RewardModel):
            raise TypeError(f"model must be a RewardModel, got {type(model).__name__}")
        self.model = model.eval()
        self.encoder = encoder
        self.batch_size = batch_size
        self.device = device
        self.rejections: Counter[str] = Counter()

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, batch_size: int = 4096, device: str = "cpu"
    ) -> RewardModelScorer:
        from ml.preferences.reward import load_reward_model

        saved = load_reward_model(folder)
        return cls(saved.model, saved.encoder, batch_size, device)

    def score(self, batch: ScoringBatch) -> np.ndarray:
        from ml.preferences.reward import score_embeddings

        batch.require(self.name, "image_embeddings", "prompt_embeddings")
        if batch.encoder and self.encoder and batch.encoder != self.encoder:
            raise ValueError(
                f"scorer {self.name!r}: the batch's embeddings come from encoder "
                f"{batch.encoder!r}, the reward model was trained on {self.encoder!r}"
            )
        image, prompt = batch.image_embeddings, batch.prompt_embeddings
        assert image is not None and prompt is not None  # require() checked
        out = np.full(len(batch), np.nan, dtype=np.float32)
        ok = _finite_rows(image, prompt)
        self.rejections["missing embedding"] += int((~ok).sum())
        self.rejections += Counter()
        if ok.all():
            return score_embeddings(self.model, image, prompt, self.batch_size, device=self.device)
        if ok.any():
            out[ok] = score_embeddings(
                self.model, image[ok], prompt[ok], self.batch_size, device=self.device
            )
        return out


# ---------------------------------------------------------------------------------------------
# HPSv2


class HPSv2Scorer:
    """HPSv2 (see the module docstring) from a local checkpoint.

    ``model`` is the open_clip config (``ViT-H-14`` for the real checkpoint; any config name
    or JSON file for tests). Raises at construction, naming the file, when the checkpoint is
    missing, is not a weights-only torch/safetensors file, or does not fit the architecture.

    Per image, NaN with a reason in ``rejections``: ``no image``, ``file not found``, the
    decoding policy's reasons (:func:`ml.embed.decode_image`), ``no prompt``. Decoding runs in
    ``decode_threads`` threads (PIL releases the GIL while decoding); ``batch_size`` images go
    through the model at a time."""

    name = "hpsv2"

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        model: str = PRODUCTION_ENCODER,
        device: str = "auto",
        precision: str = "fp16",
        batch_size: int = 32,
        decode_threads: int = 4,
        reader: Callable[[str], bytes] | None = None,
    ) -> None:
        from ml.embed import read_local_file
        from ml.encoders import load_encoder

        if batch_size < 1 or decode_threads < 1:
            raise ValueError("batch_size and decode_threads must be >= 1")
        self.encoder = load_encoder(
            model, checkpoint=checkpoint, device=device, precision=precision
        )
        self.batch_size = batch_size
        self.decode_threads = decode_threads
        self.reader = reader or read_local_file
        self.rejections: Counter[str] = Counter()

    @property
    def tag(self) -> str:
        """``<config>@<checkpoint sha prefix>``: which HPSv2 weights produced the scores."""
        return self.encoder.tag

    def _pixels(self, source: ImageInput) -> torch.Tensor | str:
        """The preprocessed image tensor, or the reason it could not be made."""
        from ml.embed import ImageRejected, decode_image

        if source is None:
            return "no image"
        try:
            data = (
                bytes(source)
                if isinstance(source, bytes | bytearray | memoryview)
                else self.reader(os.fspath(source))
            )
        except FileNotFoundError:
            return "file not found"
        try:
            picture = decode_image(data)
        except ImageRejected as exc:
            return exc.reason
        return self.encoder.preprocess(picture)

    def score(self, batch: ScoringBatch) -> np.ndarray:
        batch.require(self.name, "images", "prompts")
        assert batch.images is not None and batch.prompts is not None
        out = np.full(len(batch), np.nan, dtype=np.float32)
        threads = min(self.decode_threads, max(1, len(batch)))
        with ThreadPoolExecutor(threads) if threads > 1 else _Inline() as pool:
            for start in range(0, len(batch), self.batch_size):
                stop = min(len(batch), start + self.batch_size)
                prompts = [batch.prompts[i] for i in range(start, stop)]
                sources = [
                    batch.images[i] if _has_text(prompts[i - start]) else None
                    for i in range(start, stop)
                ]
                decoded = list(pool.map(self._pixels, sources))
                keep: list[int] = []
                for k, item in enumerate(decoded):
                    if not _has_text(prompts[k]):
                        self.rejections["no prompt"] += 1
                    elif isinstance(item, str):
                        self.rejections[item] += 1
                    else:
                        keep.append(k)
                if keep:
                    out[[start + k for k in keep]] = self._cosines(
                        torch.stack([decoded[k] for k in keep]),  # type: ignore[misc]
                        [str(prompts[k]) for k in keep],
                    )
        return out

    def _cosines(self, pixels: torch.Tensor, prompts: list[str]) -> np.ndarray:
        """cos(image features, text features) per row; each distinct prompt encoded once."""
        distinct = {text: i for i, text in enumerate(dict.fromkeys(prompts))}
        tokens = self.encoder.tokenizer(list(distinct))
        images = self.encoder.encode_image_tensors(pixels)  # normalised, inference mode
        texts = self.encoder.encode_token_tensors(tokens)
        rows = torch.as_tensor([distinct[p] for p in prompts], dtype=torch.long)
        return (images * texts[rows]).sum(dim=-1).numpy()


def _has_text(prompt: str | None) -> bool:
    return isinstance(prompt, str) and bool(prompt.strip())


class _Inline:
    """A one-thread stand-in for ThreadPoolExecutor (``map`` in the caller's thread)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Callable, items: Iterable) -> Iterable:
        return map(fn, items)


# ---------------------------------------------------------------------------------------------
# Which scorers can run


@dataclass
class ScorerSelection:
    """The scorers that can run, and the ones that cannot with the reason."""

    scorers: list[ImageScorer]
    skipped: dict[str, str]

    @property
    def names(self) -> list[str]:
        return [scorer.name for scorer in self.scorers]

    def describe(self) -> str:
        ran = ", ".join(self.names) or "none"
        skipped = "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        return f"scorers {ran}" + (f" (skipped {skipped})" if skipped else "")


def make_scorers(
    hpsv2_checkpoint: str | os.PathLike | None,
    reward_model_folder: str | os.PathLike | None,
    *,
    hpsv2_model: str = PRODUCTION_ENCODER,
    device: str = "auto",
    precision: str = "fp16",
    clip_score: bool = True,
    hpsv2_batch_size: int = 32,
    log: logging.Logger | None = None,
) -> ScorerSelection:
    """The scorers this configuration can run, in the order clip_score, reward_model, hpsv2.

    * ``clip_score``: always (unless ``clip_score=False``): it needs only the embeddings.
    * ``reward_model``: when ``reward_model_folder`` holds a trained model (its sidecar
      exists); skipped while none has been trained. A folder whose model is broken is an error.
    * ``hpsv2``: only when ``hpsv2_checkpoint`` is configured; a configured checkpoint that is
      missing or unusable is an error naming the file (a misconfiguration is not a skip)."""
    from ml.preferences.reward import SIDECAR_NAME

    log = log or LOG
    scorers: list[ImageScorer] = []
    skipped: dict[str, str] = {}
    if clip_score:
        scorers.append(ClipScoreScorer())
    else:
        skipped["clip_score"] = "disabled"
    if reward_model_folder is None:
        skipped["reward_model"] = "no reward model folder configured"
    elif not (Path(reward_model_folder) / SIDECAR_NAME).is_file():
        skipped["reward_model"] = f"not trained yet (no {SIDECAR_NAME} in {reward_model_folder})"
    else:
        scorers.append(RewardModelScorer.from_folder(reward_model_folder))
    if hpsv2_checkpoint is None:
        skipped["hpsv2"] = "no HPSv2 checkpoint configured"
    else:
        scorers.append(
            HPSv2Scorer(
                hpsv2_checkpoint,
                model=hpsv2_model,
                device=device,
                precision=precision,
                batch_size=hpsv2_batch_size,
            )
        )
    selection = ScorerSelection(scorers, skipped)
    log.info("preferences: %s", selection.describe())
    return selection
