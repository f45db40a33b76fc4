"""A reaction-trained reward model: a Bradley–Terry preference head on frozen CLIP embeddings.

The model scores an (image, prompt) pair from the vectors the embeddings stage already
computed (same encoder for both, L2-normalised, dimension d)::

    x     = [√d·img, √d·prompt, d·(img ⊙ prompt)]          (3d features)
    score = MLP(x)   (``layers`` × [Linear → GELU → Dropout], hidden width ``hidden``, → Linear → 1)

The √d and d factors give every feature block about unit scale (a unit vector's components
are ~1/√d, a product of two ~1/d), so the default initialisation and one learning rate fit
every encoder width, 64 (the tiny dev encoder) as well as 1024 (ViT-H-14). The product block
lets even a linear layer express prompt-dependent taste (a diagonal bilinear form).

Training (:func:`train_reward_model`) minimises the Bradley–Terry loss −log σ(s_w − s_l) over
(winner, loser) pairs from :mod:`ml.preferences.engagement`, with AdamW (weight decay on the
weight matrices only), linear warmup then cosine decay following the progress through the
epochs or the time budget (whichever runs out first), and early stopping on held-out pairwise
accuracy (evaluated ``evals_per_epoch`` times an epoch; the best weights are restored). A
wall-clock budget bounds the whole call, like :mod:`ml.train_clip`. The reported held-out
accuracy is the best of a handful of evaluations on the same held-out pairs, so it is
slightly optimistic; with 10^5 held-out pairs one evaluation's standard error is ~0.15 point.

Memory: the embeddings are never copied as a whole. Batches are gathered row by row from the
arrays the caller passes (numpy, float16 or float32, memory-mapped or not); prompt vectors may
be stored once per prompt with ``prompt_index`` mapping each image to its prompt's row (2.9M
prompts for 4.9M images at ImageGem scale). Pages of read-only/shared ``np.memmap`` inputs are
released from the process (``madvise(MADV_DONTNEED)``; they stay in the page cache) as the
reads move on, so a pass over a 10 GB memmap does not leave 10 GB in the resident set.

Files (:func:`save_reward_model`): ``reward_model.safetensors`` + ``reward_model.json`` (config,
dims, metrics, curve, the encoder tag and tiny flag given by the caller, the checkpoint's
SHA-256), each written atomically, the JSON last. :func:`load_reward_model` never unpickles.

Devices: CUDA (bf16 autocast, pinned host batches) when ``device`` asks for it; tested on CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ml.encoders import resolve_device
from ml.runtime import bf16_autocast, out_of_time, torch_threads

LOG = logging.getLogger(__name__)

CHECKPOINT_NAME = "reward_model.safetensors"
SIDECAR_NAME = "reward_model.json"
FORMAT_VERSION = 1
DEFAULT_SCORE_BATCH = 4096
_RELEASE_BYTES = 256 << 20  # release an input's memmap pages after this much was read from it
_CURVE_POINTS = 200

Pairs = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class RewardConfig:
    """How to train the reward model. The defaults were measured on synthetic planted
    preferences (linear + prompt-dependent quality, labels = quality + unit noise, so even the
    planted quality orders only ~75 % of held-out pairs as the labels do) on the 2-core box:

    * ``hidden`` 128, one hidden layer, ``lr`` 1e-3 (100 warmup steps, cosine), ``dropout``
      0.1, ``weight_decay`` 0.01, ``batch_size`` 512 pairs. d=64, 40k training pairs: held-out
      accuracy 0.739 vs 0.739 for the planted quality. d=1024, 160k pairs: 0.731 after one
      epoch (ceiling 0.750); lr 3e-4 reached 0.735 in two, hidden 64 0.731, a purely linear
      head 0.741 in five — on a planted function that is linear in the features, so the MLP's
      ~1 point of overfitting is the price of being able to fit a non-linear taste. With
      fewer pairs per parameter (40k at d=1024) the gap grows to 3 points; production has
      millions of pairs. On CPU a budget buys about one epoch of 1.4M pairs at d=1024.
    * ``epochs`` 5, ``evals_per_epoch`` 2, ``patience`` 2 (evaluations, so one epoch without
      progress): held-out accuracy peaked at epoch 1-2 in every run above and then fell — the
      labels' noise is per image, and an image in many pairs lets the MLP learn it (200k
      images in 1.5M pairs: 0.721 after 0.2 epochs, 0.711 after 0.4, ceiling 0.734). Two
      evaluations per epoch let early stopping act within the one epoch a CPU budget allows
      (an evaluation of 240k held-out images costs ~6 s at d=1024); the best weights are kept.
    * ``threads`` 1: with another process busy on the second core, 2 threads ran a step
      2.4x *slower* (2.1k vs 5.0k pairs/s at d=1024), as :func:`ml.runtime.torch_threads`
      found for the CLIP towers; set 2 on an idle box.
    * ``margin``, ``max_pairs_per_cluster``, ``heldout_fraction``: how the pairs were built
      (:func:`ml.preferences.engagement.build_pairs`); recorded with the model, not used here.
    """

    hidden: int = 128
    layers: int = 1
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine floor, as a fraction of lr
    epochs: int = 5
    batch_size: int = 512  # pairs per step (2x rows)
    evals_per_epoch: int = 2  # held-out evaluations per epoch (early stopping's granularity)
    patience: int = 2  # evaluations without improvement before stopping
    seed: int = 0
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (CUDA when present)
    threads: int | None = 1  # CPU threads while training (None: leave torch's setting)
    time_budget_s: float | None = 300.0  # whole call; None: epochs only (deterministic)
    eval_batch_size: int = DEFAULT_SCORE_BATCH
    margin: float = 0.3
    max_pairs_per_cluster: int = 2000
    heldout_fraction: float = 0.1
    log_every_s: float = 10.0

    @staticmethod
    def heldout_fraction_for(n_images: int, base: float = 0.1, min_heldout: int = 100) -> float:
        """The held-out share of images: ``base`` once that holds ``min_heldout`` images, more
        on a small warehouse (up to 0.3), so the held-out side still has pairs to score. A
        larger fraction only adds images (the held-out set is a threshold on a hash), so the
        images held out at 0.1 stay held out."""
        if n_images < 1:
            return base
        return float(min(0.3, max(base, min_heldout / n_images)))

    @classmethod
    def for_pairs(cls, n_train_pairs: int, **overrides: Any) -> RewardConfig:
        """The defaults, with the batch and the epochs sized to ``n_train_pairs``.

        The defaults buy about one epoch of millions of pairs; a few thousand pairs (the
        sample: ~1.6 k embedded images) would get 40 steps of 512 and stop inside the
        warm-up. Here every epoch has at least ~64 steps (batch down to 32) and the run at
        least ~2000 steps (up to 50 epochs), with patience 5: on the default sample's 15 k
        training pairs that took held-out accuracy from 0.733 to 0.763 (ceiling 0.840)."""
        base = cls()
        batch = int(min(base.batch_size, max(32, n_train_pairs // 64)))
        per_epoch = max(1, n_train_pairs // batch)
        epochs = int(min(50, max(base.epochs, -(-2000 // per_epoch))))
        sized: dict[str, Any] = {"batch_size": batch, "epochs": epochs}
        if epochs > base.epochs:
            sized["patience"] = 5
            sized["warmup_steps"] = min(base.warmup_steps, epochs * per_epoch // 20)
        return cls(**{**sized, **overrides})

    def __post_init__(self) -> None:
        if isinstance(self.device, torch.device):  # kept as text: the config goes to JSON
            object.__setattr__(self, "device", str(self.device))
        if not isinstance(self.device, str) or not self.device:
            raise TypeError(f"device must be a device name (cpu, cuda, auto), got {self.device!r}")
        if self.hidden < 1 or self.layers < 1:
            raise ValueError(f"hidden and layers must be >= 1, got {self.hidden}, {self.layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("weight_decay and warmup_steps must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be >= 1")
        if self.evals_per_epoch < 1:
            raise ValueError(f"evals_per_epoch must be >= 1, got {self.evals_per_epoch}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 or None, got {self.time_budget_s}")
        if not (self.margin > 0 and math.isfinite(self.margin)):
            raise ValueError(f"margin must be > 0, got {self.margin}")
        if self.max_pairs_per_cluster < 1:
            raise ValueError("max_pairs_per_cluster must be >= 1")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


class RewardModel(nn.Module):
    """score(image, prompt): the MLP of the module docstring over [img, prompt, img ⊙ prompt].

    The first layer is applied block by block (three matmuls into one accumulator, with the
    feature scales folded into its weight columns) instead of on a concatenated (rows, 3d)
    copy: the same function and parameters, ~1.5-2x the rows per second on a CPU."""

    def __init__(self, embed_dim: int, hidden: int = 128, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        if embed_dim < 1 or hidden < 1 or layers < 1:
            raise ValueError(
                f"embed_dim, hidden and layers must be >= 1, got {embed_dim}, {hidden}, {layers}"
            )
        self.embed_dim = d = int(embed_dim)
        self.hidden = int(hidden)
        self.layers = int(layers)
        self.input = nn.Linear(3 * d, self.hidden)
        blocks: list[nn.Module] = [nn.GELU(), nn.Dropout(dropout)]
        for _ in range(self.layers - 1):
            blocks += [nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Dropout(dropout)]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(self.hidden, 1)
        scale = torch.cat([torch.full((2 * d,), math.sqrt(d)), torch.full((d,), float(d))])
        self.register_buffer("feature_scale", scale, persistent=False)

    def forward(self, image: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        d = self.embed_dim
        weight = self.input.weight * self.feature_scale  # (hidden, 3d): scales folded in
        h = F.linear(image, weight[:, :d], self.input.bias)
        h = torch.addmm(h, prompt, weight[:, d : 2 * d].t())
        h = torch.addmm(h, image * prompt, weight[:, 2 * d :].t())
        return self.head(self.body(h)).squeeze(-1)

    def dims(self) -> dict[str, int]:
        return {"embed_dim": self.embed_dim, "hidden": self.hidden, "layers": self.layers}


@dataclass(frozen=True)
class CurvePoint:
    """One evaluation: after ``epoch`` epochs (fractional when the budget cut one short)."""

    epoch: float
    steps: int
    train_loss: float  # mean BT loss over the steps since the previous point (NaN at step 0)
    heldout_accuracy: float
    seconds: float  # since the call started


@dataclass
class RewardResult:
    """A trained reward model (eval mode, on CPU, best held-out weights) and how it got there."""

    model: RewardModel
    config: RewardConfig
    curve: list[CurvePoint]
    heldout_accuracy: float  # of the restored (best) weights
    init_heldout_accuracy: float  # of the seeded initialisation
    best_epoch: float
    steps: int
    n_train_pairs: int
    n_heldout_pairs: int
    n_heldout_images: int
    seconds: float  # the whole call
    train_seconds: float  # the optimisation steps alone
    stop_reason: str  # "epochs", "early_stopping" or "time_budget"
    device: str
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, batch loss)

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def pairs_per_s(self) -> float:
        return (
            self.steps * self.config.batch_size / self.train_seconds if self.train_seconds else 0.0
        )

    def metrics(self) -> dict[str, Any]:
        """JSON-able summary (what the sidecar and asset metadata record)."""
        return {
            "heldout_accuracy": self.heldout_accuracy,
            "init_heldout_accuracy": self.init_heldout_accuracy,
            "best_epoch": self.best_epoch,
            "steps": self.steps,
            "n_train_pairs": self.n_train_pairs,
            "n_heldout_pairs": self.n_heldout_pairs,
            "n_heldout_images": self.n_heldout_images,
            "seconds": round(self.seconds, 2),
            "train_seconds": round(self.train_seconds, 2),
            "pairs_per_s": round(self.pairs_per_s, 1),
            "stop_reason": self.stop_reason,
            "device": self.device,
            "curve": [asdict(point) for point in self.curve],
        }


# ---------------------------------------------------------------------------------------------
# Accuracy


def pairwise_accuracy(
    scores: np.ndarray,
    winner_idx: np.ndarray,
    loser_idx: np.ndarray,
    nan_policy: Literal["tie", "omit"] = "tie",
) -> float:
    """Share of pairs whose winner scores higher than its loser; a tie counts 0.5.

    Any scores work (the reward model, raw reactions as a baseline, a planted quality as the
    ceiling), so every scorer is measured the same way. A pair with a NaN score counts as a
    tie by default (a scorer gains nothing from the images it could not score); ``"omit"``
    leaves such pairs out. NaN when no pair counts."""
    scores = np.asarray(scores)
    winner_idx = np.asarray(winner_idx, dtype=np.int64)
    loser_idx = np.asarray(loser_idx, dtype=np.int64)
    if winner_idx.shape != loser_idx.shape or winner_idx.ndim != 1:
        raise ValueError(
            f"winner_idx {winner_idx.shape} and loser_idx {loser_idx.shape} must be 1-D, equal"
        )
    if nan_policy not in ("tie", "omit"):
        raise ValueError(f"nan_policy must be 'tie' or 'omit', got {nan_policy!r}")
    if winner_idx.size == 0:
        return float("nan")
    low = min(int(winner_idx.min()), int(loser_idx.min()))
    high = max(int(winner_idx.max()), int(loser_idx.max()))
    if low < 0 or high >= scores.shape[0]:
        raise IndexError(f"pair positions {low}..{high} outside the {scores.shape[0]} scores")
    s_w = scores[winner_idx].astype(np.float64)
    s_l = scores[loser_idx].astype(np.float64)
    known = np.isfinite(s_w) & np.isfinite(s_l)
    credit = np.where(s_w > s_l, 1.0, np.where(s_w == s_l, 0.5, 0.0))
    if nan_policy == "omit":
        return float(credit[known].mean()) if known.any() else float("nan")
    return float(np.where(known, credit, 0.5).mean())


# ---------------------------------------------------------------------------------------------
# Reading rows (memmaps included)


def release_pages(*arrays: Any) -> None:
    """Drop the resident pages of shared, memory-mapped inputs from this process.

    For an ``np.memmap`` opened ``r``/``r+``/``w+`` (a shared mapping) this is
    ``madvise(MADV_DONTNEED)`` on its mapping: the data stay in the file and the page cache,
    the next read faults them back in, and the resident set no longer grows with every page
    ever read. Copy-on-write (``c``) maps, plain arrays and platforms without ``madvise`` are
    left alone."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    for array in arrays:
        node, mode = array, None
        while node is not None and not isinstance(node, mmap.mmap):
            if isinstance(node, np.memmap) and mode is None:
                mode = node.mode
            node = getattr(node, "base", None)
        if isinstance(node, mmap.mmap) and mode in ("r", "r+", "w+", "readonly", "readwrite"):
            with contextlib.suppress(OSError, ValueError):
                node.madvise(mmap.MADV_DONTNEED)


def _convert(source: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = source`` as float32. float16/float64 go through torch's vectorised cast (4-5x
    numpy's on the 2-core box); a read-only source (a memmap slice) is copied first, since torch
    cannot wrap it, which costs a memcpy of the half-size rows."""
    if source.dtype == np.float32:
        np.copyto(out, source)
        return
    if not (source.flags.writeable and source.flags.c_contiguous):
        source = np.array(source, order="C")
    torch.from_numpy(out).copy_(torch.from_numpy(source))


class _RowReader:
    """Rows of one input array at arbitrary positions.

    A random row read through a memory map costs far more than the row: the page fault maps
    the whole cached folio around it (measured on Linux 6.18: ~1.4 MB mapped per random 2 KB
    row of a 10 GB float16 memmap, so one training step of 1,024 rows mapped more than a GB
    and a held-out evaluation 7.6 GB of resident set). For a whole, C-contiguous
    ``np.memmap`` the rows are therefore read with ``os.preadv`` from its file, straight into
    the batch (page cache → buffer, nothing mapped); other arrays are fancy-indexed."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.fd: int | None = None
        whole = isinstance(array, np.memmap) and array.base is getattr(array, "_mmap", None)
        # not copy-on-write ("c") maps: their private writes are not in the file
        shared = whole and getattr(array, "mode", "c") != "c"
        if shared and array.filename and array.flags.c_contiguous and hasattr(os, "preadv"):
            self.fd = os.open(array.filename, os.O_RDONLY)
            self.offset = int(array.offset)
            self.row_bytes = int(array.dtype.itemsize) * int(np.prod(array.shape[1:]))

    def take(self, rows: np.ndarray) -> np.ndarray:
        if self.fd is None:
            return self.array[rows]
        out = np.empty((rows.shape[0], *self.array.shape[1:]), dtype=self.array.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        size, fd, base = self.row_bytes, self.fd, self.offset
        for k, row in enumerate(rows.tolist()):
            got = os.preadv(fd, [view[k * size : (k + 1) * size]], base + row * size)
            if got != size:
                raise OSError(f"short read of row {row} from {self.array.filename}")
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Rows:
    """(image, prompt) float32 rows of given image positions, gathered from the caller's arrays.

    Contiguous ranges (:meth:`slice`) are read through the arrays (memmap pages released every
    ``_RELEASE_BYTES``); scattered rows (:meth:`gather`, and prompts through ``prompt_index``)
    through :class:`_RowReader`. Call :meth:`close` when done (file descriptors)."""

    def __init__(
        self, image_emb: Any, prompt_emb: Any, prompt_index: np.ndarray | None, what: str
    ) -> None:
        if getattr(image_emb, "ndim", 0) != 2 or getattr(prompt_emb, "ndim", 0) != 2:
            raise ValueError(
                f"{what}: image_emb and prompt_emb must be 2-D arrays, got shapes "
                f"{getattr(image_emb, 'shape', None)} and {getattr(prompt_emb, 'shape', None)}"
            )
        for name, array in (("image_emb", image_emb), ("prompt_emb", prompt_emb)):
            if not np.issubdtype(array.dtype, np.floating):
                raise TypeError(f"{what}: {name} must be float16/32/64, got {array.dtype}")
        if image_emb.shape[1] != prompt_emb.shape[1]:
            raise ValueError(
                f"{what}: image_emb has dimension {image_emb.shape[1]} but prompt_emb "
                f"{prompt_emb.shape[1]} (vectors of one encoder are needed)"
            )
        n = image_emb.shape[0]
        if prompt_index is None:
            if prompt_emb.shape[0] != n:
                raise ValueError(
                    f"{what}: {n} image rows but {prompt_emb.shape[0]} prompt rows; pass "
                    "prompt_index when prompt vectors are stored once per prompt"
                )
        else:
            prompt_index = np.asarray(prompt_index)
            if prompt_index.shape != (n,) or not np.issubdtype(prompt_index.dtype, np.integer):
                raise ValueError(
                    f"{what}: prompt_index must be ({n},) integers, got {prompt_index.shape} "
                    f"{prompt_index.dtype}"
                )
            if n and (prompt_index.min() < 0 or prompt_index.max() >= prompt_emb.shape[0]):
                raise IndexError(
                    f"{what}: prompt_index outside 0..{prompt_emb.shape[0] - 1} "
                    f"(min {prompt_index.min()}, max {prompt_index.max()})"
                )
        self.image_emb = image_emb
        self.prompt_emb = prompt_emb
        self.prompt_index = prompt_index
        self.n = int(n)
        self.dim = int(image_emb.shape[1])
        self._row = [int(a.dtype.itemsize) * self.dim for a in (image_emb, prompt_emb)]
        self._since_release = [0, 0]
        self._readers = [_RowReader(image_emb), _RowReader(prompt_emb)]

    def gather(self, index: np.ndarray, out_image: np.ndarray, out_prompt: np.ndarray) -> int:
        """Copy the rows of ``index`` (positions) into the float32 buffers; returns the count."""
        m = index.shape[0]
        _convert(self._readers[0].take(index), out_image[:m])
        prompt_rows = index if self.prompt_index is None else self.prompt_index[index]
        _convert(self._readers[1].take(prompt_rows), out_prompt[:m])
        return m

    def slice(self, start: int, stop: int, out_image: np.ndarray, out_prompt: np.ndarray) -> int:
        """Copy rows start..stop (a contiguous, cheaper read) into the buffers."""
        m = stop - start
        _convert(self.image_emb[start:stop], out_image[:m])
        self._read(0, m * self._row[0])
        if self.prompt_index is None:
            _convert(self.prompt_emb[start:stop], out_prompt[:m])
            self._read(1, m * self._row[1])
        else:
            _convert(self._readers[1].take(self.prompt_index[start:stop]), out_prompt[:m])
        return m

    def _read(self, which: int, nbytes: int) -> None:
        """Count a contiguous read; release that input's memmap pages past the threshold."""
        self._since_release[which] += nbytes
        if self._since_release[which] >= _RELEASE_BYTES:
            release_pages(self.image_emb if which == 0 else self.prompt_emb)
            self._since_release[which] = 0

    def release(self) -> None:
        release_pages(self.image_emb, self.prompt_emb)
        self._since_release = [0, 0]

    def close(self) -> None:
        self.release()
        for reader in self._readers:
            reader.close()


# ---------------------------------------------------------------------------------------------
# Scoring


def score_embeddings(
    model: RewardModel,
    image_emb: Any,
    prompt_emb: Any,
    batch_size: int = DEFAULT_SCORE_BATCH,
    *,
    prompt_index: np.ndarray | None = None,
    device: str = "cpu",
    threads: int | None = None,
    log: logging.Logger | None = None,
) -> np.ndarray:
    """float32 reward of every image row, in order, ``batch_size`` rows at a time (with
    ``threads`` CPU threads; None leaves torch's setting).

    ``image_emb`` (n, d) and ``prompt_emb`` ((n, d), or (n_prompts, d) with ``prompt_index``)
    may be float16/32 numpy arrays or memmaps of any size: besides the (n,) result, memory is
    two float32 (batch, d) buffers and the model's activations, and memmap pages are released
    as the scan moves on. A row with a NaN component scores NaN."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = _Rows(image_emb, prompt_emb, prompt_index, "score_embeddings")
    try:
        _check_dim(model, rows.dim, "score_embeddings")
        target = resolve_device(device)
        out = np.empty(rows.n, dtype=np.float32)
        progress = _progress("score_embeddings", rows.n, log)
        with torch_threads(threads), _eval_mode(model, target):
            _score_into(model, rows, out, batch_size, target, progress=progress)
        if progress is not None:
            progress.done()
    finally:
        rows.close()
    return out


def _score_into(
    model: RewardModel,
    rows: _Rows,
    out: np.ndarray,
    batch_size: int,
    device: torch.device,
    index: np.ndarray | None = None,
    progress: Any = None,
) -> None:
    """out[k] = score of row k (contiguous) or of row index[k]; model already in eval mode."""
    total = rows.n if index is None else index.shape[0]
    width = min(batch_size, max(total, 1))
    pin = device.type == "cuda"
    image_buf = _buffer(width, rows.dim, pin)
    prompt_buf = _buffer(width, rows.dim, pin)
    image_t = torch.from_numpy(image_buf)
    prompt_t = torch.from_numpy(prompt_buf)
    with torch.inference_mode():
        for start in range(0, total, width):
            stop = min(total, start + width)
            if index is None:
                m = rows.slice(start, stop, image_buf, prompt_buf)
            else:
                m = rows.gather(index[start:stop], image_buf, prompt_buf)
            image = image_t[:m].to(device, non_blocking=True)
            prompt = prompt_t[:m].to(device, non_blocking=True)
            with bf16_autocast(device):
                scores = model(image, prompt)
            out[start:stop] = scores.float().cpu().numpy()
            if progress is not None:
                progress.advance(m)


def _buffer(rows: int, dim: int, pin: bool) -> np.ndarray:
    if pin:
        return torch.empty((rows, dim), dtype=torch.float32).pin_memory().numpy()
    return np.empty((rows, dim), dtype=np.float32)


@contextlib.contextmanager
def _eval_mode(model: RewardModel, device: torch.device) -> Iterator[None]:
    """Eval mode on ``device`` for a block; the model goes back to its mode and device after."""
    was_training = model.training
    before = next(model.parameters()).device
    model.eval().to(device)
    try:
        yield
    finally:
        model.train(was_training)
        model.to(before)


def _check_dim(model: RewardModel, dim: int, what: str) -> None:
    if dim != model.embed_dim:
        raise ValueError(
            f"{what}: embeddings have dimension {dim} but the reward model was trained on "
            f"{model.embed_dim} (another encoder?)"
        )


def _progress(label: str, total: int, log: logging.Logger | None) -> Any:
    if log is None:
        return None
    from warehouse.progress import Progress

    return Progress(label, total, log, every_s=10.0)


# ---------------------------------------------------------------------------------------------
# Training


def _check_pairs(pairs: Pairs, n: int, what: str) -> Pairs:
    if not (isinstance(pairs, tuple | list) and len(pairs) == 2):
        raise TypeError(f"{what} must be a (winner_idx, loser_idx) tuple")
    winner = np.asarray(pairs[0], dtype=np.int64)
    loser = np.asarray(pairs[1], dtype=np.int64)
    if winner.ndim != 1 or winner.shape != loser.shape:
        raise ValueError(
            f"{what}: winner {winner.shape} and loser {loser.shape} must be 1-D, equal"
        )
    if winner.size and (min(winner.min(), loser.min()) < 0 or max(winner.max(), loser.max()) >= n):
        raise IndexError(f"{what}: positions outside the {n} image rows")
    if np.any(winner == loser):
        raise ValueError(f"{what}: {int(np.sum(winner == loser))} pair(s) of an image with itself")
    return winner, loser


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only (not on biases)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _lr_at(config: RewardConfig, step: int, progress: float) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _Evaluator:
    """Held-out pairwise accuracy: scores each held-out image once per evaluation."""

    def __init__(self, rows: _Rows, pairs: Pairs, batch_size: int, device: torch.device) -> None:
        self.rows = rows
        self.images, inverse = np.unique(np.concatenate(pairs), return_inverse=True)
        n = pairs[0].shape[0]
        self.winner, self.loser = inverse[:n], inverse[n:]
        self.batch_size = batch_size
        self.device = device
        self.scores = np.empty(self.images.shape[0], dtype=np.float32)

    def __call__(self, model: RewardModel) -> float:
        was_training = model.training
        model.eval()
        try:
            _score_into(model, self.rows, self.scores, self.batch_size, self.device, self.images)
        finally:
            model.train(was_training)
        return pairwise_accuracy(self.scores, self.winner, self.loser)


def train_reward_model(
    image_emb: Any,
    prompt_emb: Any,
    train_pairs: Pairs,
    heldout_pairs: Pairs,
    config: RewardConfig | None = None,
    log: logging.Logger | None = None,
    *,
    prompt_index: np.ndarray | None = None,
) -> RewardResult:
    """Train a :class:`RewardModel` on (winner_idx, loser_idx) pairs of image positions.

    ``image_emb`` (n, d) holds the image vectors, ``prompt_emb`` each image's prompt vector
    ((n, d), or one row per prompt with ``prompt_index``); numpy arrays or memmaps, float16
    or float32, never copied whole. Held-out pairs must share no image with the training
    pairs (:func:`ml.preferences.engagement.build_pairs` makes such a split); they drive early
    stopping and the reported accuracy. Raises ValueError on empty pair sets, self-pairs,
    mismatched shapes, and FloatingPointError if the loss diverges."""
    config = config or RewardConfig()
    log = log or LOG
    started = time.perf_counter()
    rows = _Rows(image_emb, prompt_emb, prompt_index, "train_reward_model")
    try:
        with torch_threads(config.threads):
            return _train(rows, train_pairs, heldout_pairs, config, log, started)
    finally:
        rows.close()


def _train(
    rows: _Rows,
    train_pairs: Pairs,
    heldout_pairs: Pairs,
    config: RewardConfig,
    log: logging.Logger,
    started: float,
) -> RewardResult:
    winner, loser = _check_pairs(train_pairs, rows.n, "train_pairs")
    held = _check_pairs(heldout_pairs, rows.n, "heldout_pairs")
    if winner.size == 0:
        raise ValueError("train_reward_model: no training pairs")
    if held[0].size == 0:
        raise ValueError("train_reward_model: no held-out pairs (needed for early stopping)")
    shared = np.intersect1d(np.concatenate([winner, loser]), np.concatenate(held)).size
    if shared:
        log.warning(
            "train_reward_model: %d image(s) appear in both training and held-out pairs; "
            "held-out accuracy will be optimistic (use build_pairs)",
            shared,
        )
    device = resolve_device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = RewardModel(rows.dim, config.hidden, config.layers, config.dropout).to(device)
        evaluate = _Evaluator(rows, held, config.eval_batch_size, device)
        eval_started = time.perf_counter()
        init_accuracy = evaluate(model)
        eval_cost = time.perf_counter() - eval_started
        init_seconds = time.perf_counter() - started
        log.info(
            "train_reward_model: d=%d hidden=%d on %s, %d train / %d held-out pairs "
            "(%d held-out images), held-out accuracy at init %.4f (%.1f s to evaluate)",
            rows.dim,
            config.hidden,
            device,
            winner.size,
            held[0].size,
            evaluate.images.size,
            init_accuracy,
            eval_cost,
        )
        loop = _loop(
            model, rows, (winner, loser), evaluate, config, device, started, eval_cost, log
        )
    model.load_state_dict(loop.best_state)
    model.to("cpu").eval()
    seconds = time.perf_counter() - started
    log.info(
        "train_reward_model: %s after %d steps (%.1f epochs) in %.1f s; held-out accuracy "
        "%.4f (epoch %.2f; init %.4f)",
        loop.stop_reason,
        loop.steps,
        loop.curve[-1].epoch if loop.curve else 0.0,
        seconds,
        loop.best_accuracy,
        loop.best_epoch,
        init_accuracy,
    )
    return RewardResult(
        model=model,
        config=config,
        curve=[CurvePoint(0.0, 0, float("nan"), init_accuracy, init_seconds), *loop.curve],
        heldout_accuracy=loop.best_accuracy if loop.curve else init_accuracy,
        init_heldout_accuracy=init_accuracy,
        best_epoch=loop.best_epoch,
        steps=loop.steps,
        n_train_pairs=int(winner.size),
        n_heldout_pairs=int(held[0].size),
        n_heldout_images=int(evaluate.images.size),
        seconds=seconds,
        train_seconds=loop.seconds,
        stop_reason=loop.stop_reason,
        device=str(device),
        loss_curve=loop.losses,
    )


@dataclass
class _Loop:
    steps: int
    seconds: float
    stop_reason: str
    curve: list[CurvePoint]
    losses: list[tuple[int, float]]
    best_state: dict[str, torch.Tensor]
    best_accuracy: float
    best_epoch: float


def _loop(
    model: RewardModel,
    rows: _Rows,
    pairs: Pairs,
    evaluate: Callable[[RewardModel], float],
    config: RewardConfig,
    device: torch.device,
    started: float,
    eval_cost: float,
    log: logging.Logger,
) -> _Loop:
    """Epochs of shuffled batches, bounded by ``epochs``, early stopping and the deadline (the
    budget minus a reserve for the final evaluation; a step starts only if it would fit)."""
    winner, loser = pairs
    n_pairs = winner.shape[0]
    batch = min(config.batch_size, n_pairs)
    steps_per_epoch = math.ceil(n_pairs / batch)
    planned = steps_per_epoch * config.epochs
    rng = np.random.default_rng(config.seed)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    pin = device.type == "cuda"
    image_buf = _buffer(2 * batch, rows.dim, pin)
    prompt_buf = _buffer(2 * batch, rows.dim, pin)
    image_t, prompt_t = torch.from_numpy(image_buf), torch.from_numpy(prompt_buf)
    index = np.empty(2 * batch, dtype=np.int64)

    deadline = math.inf
    if config.time_budget_s is not None:
        deadline = started + config.time_budget_s - (2.0 * eval_cost + 0.5)
    loop_start = time.perf_counter()
    span = max(deadline - loop_start, 1e-9)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    best_accuracy, best_epoch, stale = -1.0, 0.0, 0
    curve: list[CurvePoint] = []
    losses: list[tuple[int, float]] = []
    step, step_time, train_time = 0, 0.0, 0.0
    last_log = loop_start
    stop_reason = "epochs"
    window: list[float] = []

    def checkpoint(epoch: float) -> bool:
        """Evaluate; keep the best weights; True when early stopping says stop."""
        nonlocal best_accuracy, best_epoch, best_state, stale
        accuracy = evaluate(model)
        loss = float(np.mean(window)) if window else float("nan")
        window.clear()
        curve.append(CurvePoint(epoch, step, loss, accuracy, time.perf_counter() - started))
        log.info(
            "train_reward_model: epoch %.2f step %d train loss %.4f held-out accuracy %.4f",
            epoch,
            step,
            loss,
            accuracy,
        )
        if accuracy > best_accuracy + 1e-6:
            best_accuracy, best_epoch, stale = accuracy, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        stale += 1
        return stale >= config.patience

    model.train()
    # evaluations inside an epoch: after these batch counts (the epoch's end always evaluates)
    marks = {
        math.ceil(steps_per_epoch * j / config.evals_per_epoch)
        for j in range(1, config.evals_per_epoch)
    }
    stopped = False
    for epoch in range(config.epochs):
        order = rng.permutation(n_pairs)
        cut = False
        start = 0
        for k, start in enumerate(range(0, n_pairs, batch)):
            if k in marks and checkpoint(epoch + start / n_pairs):
                stopped = True
                break
            now = time.perf_counter()
            if out_of_time(step, now, step_time, deadline):
                cut = True
                break
            progress = step / planned
            if math.isfinite(deadline):
                progress = max(progress, (now - loop_start) / span)
            lr = _lr_at(config, step, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            chosen = order[start : start + batch]
            m = chosen.shape[0]
            index[:m] = winner[chosen]
            index[m : 2 * m] = loser[chosen]
            # The buffers are reused: safe with pinned memory and non_blocking copies because
            # float(loss) below waits for the step, so the copy is done before the next gather.
            rows.gather(index[: 2 * m], image_buf, prompt_buf)
            image = image_t[: 2 * m].to(device, non_blocking=True)
            prompt = prompt_t[: 2 * m].to(device, non_blocking=True)
            with bf16_autocast(device):
                scores = model(image, prompt).float()
            loss = F.softplus(scores[m : 2 * m] - scores[:m]).mean()  # −log σ(s_w − s_l)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"train_reward_model: loss became {value} at step {step} (lr {lr:.2e})"
                )
            window.append(value)
            losses.append((step, value))
            took = time.perf_counter() - now
            train_time += took
            step_time = took if step == 1 else max(took, 0.8 * step_time + 0.2 * took)
            if time.perf_counter() - last_log >= config.log_every_s:
                last_log = time.perf_counter()
                rate = step / max(last_log - loop_start, 1e-9)
                eta = min((planned - step) / rate, max(0.0, deadline - last_log))
                log.info(
                    "train_reward_model: epoch %d step %d/%d loss %.4f (mean of last 50 "
                    "%.4f) lr %.2e, %.0f pairs/s, ETA %.0f s",
                    epoch + 1,
                    step,
                    planned,
                    value,
                    float(np.mean(window[-50:])),
                    lr,
                    rate * batch,
                    eta,
                )
        fraction = epoch + (start / n_pairs if cut else 1.0)
        if stopped:
            stop_reason = "early_stopping"
            break
        if cut:
            stop_reason = "time_budget"
            # trained enough since the last evaluation to be worth one more (the full-scale
            # benchmark once spent 7 s evaluating 8 steps); otherwise the best weights stand
            if len(window) >= max(1, steps_per_epoch // (4 * config.evals_per_epoch)):
                checkpoint(fraction)
            break
        if checkpoint(fraction):
            stop_reason = "early_stopping"
            break
    if len(losses) > _CURVE_POINTS * 50:
        stride = len(losses) // (_CURVE_POINTS * 50)
        losses = losses[::stride]
    return _Loop(
        steps=step,
        seconds=train_time,
        stop_reason=stop_reason,
        curve=curve,
        losses=losses,
        best_state=best_state,
        best_accuracy=best_accuracy,
        best_epoch=best_epoch,
    )


# ---------------------------------------------------------------------------------------------
# Files


def save_reward_model(
    result: RewardResult,
    folder: str | os.PathLike,
    encoder: str,
    tiny_model: bool,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path, str]:
    """Write ``<folder>/reward_model.safetensors`` and ``<folder>/reward_model.json``, each
    atomically, the JSON last (it names the checkpoint's SHA-256, so a sidecar on disk always
    describes a complete checkpoint); returns (checkpoint, sidecar, sha256).

    ``encoder`` is the tag of the encoder whose vectors the model was trained on (the model
    is meaningless on another encoder's vectors); ``tiny_model`` says whether that encoder is a
    tiny development model. ``extra`` adds JSON-able fields (e.g. baseline accuracies)."""
    from ml.encoders.checkpoint import save_state_dict
    from warehouse.files import atomic_write_bytes

    if not isinstance(encoder, str) or not encoder:
        raise ValueError("save_reward_model: encoder must be the (non-empty) encoder tag")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / CHECKPOINT_NAME
    sidecar = folder / SIDECAR_NAME
    digest = save_state_dict(
        result.model,
        checkpoint,
        metadata={
            "kind": "reward_model",
            "encoder": encoder,
            "tiny_model": "true" if tiny_model else "false",
            "embed_dim": str(result.model.embed_dim),
        },
    )
    stride = max(1, len(result.loss_curve) // _CURVE_POINTS)
    document = {
        "kind": "reward_model",
        "format_version": FORMAT_VERSION,
        "checkpoint": CHECKPOINT_NAME,
        "sha256": digest,
        "encoder": encoder,
        "tiny_model": bool(tiny_model),
        "dims": result.model.dims(),
        "config": asdict(result.config),
        "metrics": _json_safe(result.metrics()),
        "loss_curve": [[s, round(v, 5)] for s, v in result.loss_curve[::stride]],
        **(_json_safe(extra) if extra else {}),
    }
    atomic_write_bytes(str(sidecar), (json.dumps(document, indent=2) + "\n").encode())
    return checkpoint, sidecar, digest


def _json_safe(value: Any) -> Any:
    """NaN/inf → None (JSON has neither), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class SavedRewardModel:
    """A reward model read back from its folder."""

    model: RewardModel  # eval mode, CPU
    encoder: str  # the encoder tag its vectors must come from
    tiny_model: bool
    sha256: str
    folder: Path
    metadata: dict[str, Any]  # the whole sidecar

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim


def load_reward_model(folder: str | os.PathLike) -> SavedRewardModel:
    """The model :func:`save_reward_model` wrote to ``folder``.

    The weights are read with safetensors only (nothing is ever unpickled). Raises
    FileNotFoundError for a missing folder, sidecar or checkpoint, and ValueError naming the
    file for an unreadable sidecar, a checkpoint that is not safetensors, a digest that
    differs from the sidecar's, or weights whose names/shapes do not fit the recorded dims."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ml.encoders.checkpoint import file_sha256

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reward model folder {folder} does not exist")
    sidecar = folder / SIDECAR_NAME
    if not sidecar.is_file():
        raise FileNotFoundError(f"reward model sidecar {sidecar} does not exist")
    try:
        document = json.loads(sidecar.read_text())
        dims = document["dims"]
        embed_dim, hidden, layers = int(dims["embed_dim"]), int(dims["hidden"]), int(dims["layers"])
        encoder = str(document["encoder"])
        expected_sha = str(document["sha256"])
        name = str(document.get("checkpoint", CHECKPOINT_NAME))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(
            f"reward model sidecar {sidecar}: unreadable or incomplete ({type(exc).__name__}: "
            f"{exc}); expected the JSON save_reward_model writes"
        ) from exc
    if document.get("kind") != "reward_model":
        raise ValueError(f"reward model sidecar {sidecar}: kind is {document.get('kind')!r}")
    if Path(name).name != name:
        raise ValueError(f"reward model sidecar {sidecar}: checkpoint name {name!r} is a path")
    checkpoint = folder / name
    if not checkpoint.is_file():
        raise FileNotFoundError(f"reward model checkpoint {checkpoint} does not exist")
    try:
        state = load_file(str(checkpoint), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(
            f"reward model checkpoint {checkpoint}: not a readable safetensors file ({exc})"
        ) from exc
    digest = file_sha256(checkpoint)
    if digest != expected_sha:
        raise ValueError(
            f"reward model checkpoint {checkpoint}: SHA-256 {digest[:16]}… differs from the "
            f"{expected_sha[:16]}… that {sidecar.name} records (replaced or partly written)"
        )
    try:
        model = RewardModel(embed_dim, hidden, layers)
    except ValueError as exc:
        raise ValueError(f"reward model sidecar {sidecar}: bad dims {dims} ({exc})") from exc
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = [
            f"{k}: checkpoint {found[k]} vs dims {expected[k]}"
            for k in sorted(set(expected) & set(found))
            if found[k] != expected[k]
        ]
        raise ValueError(
            f"reward model checkpoint {checkpoint} does not fit the dims {dims} of "
            f"{sidecar.name}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {wrong[:5]}"
        )
    model.load_state_dict(state, strict=True)
    model.eval()
    return SavedRewardModel(
        model=model,
        encoder=encoder,
        tiny_model=bool(document.get("tiny_model", False)),
        sha256=digest,
        folder=folder,
        metadata=document,
    )
