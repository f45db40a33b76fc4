"""Quality of the preference stage against the sample's planted truth (evaluation only).

The sample plants each image's hidden ``quality`` (it drives reactions and degrades pixels)
and the exposure that also drives reactions (the uploader's reach ``fame``, the image's
``exposure`` by age). Nothing here is ever given to a model; the assets call it to report:

* :func:`pair_agreement` — the share of preference pairs whose winner has the higher planted
  quality (the issue's bar: ≥ 0.85 with the reward-model scorer);
* :func:`quality_of` — planted quality aligned to image ids, the *ceiling* scorer of the
  reward model's held-out pairs (no model can order noisy engagement pairs better on average
  than the quality that generated them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from ml.evaluation.embeddings import read_truth


def planted_quality(sample_root: str | Path) -> dict[int, float]:
    """imageId → the planted quality of that image (one value per image)."""
    table = read_truth(sample_root, "image_truth", ["imageId", "quality"])
    ids = table.column("imageId")
    keep = pc.is_valid(ids)
    table = table.filter(keep)
    return dict(
        zip(
            table.column("imageId").to_pylist(),
            table.column("quality").to_pylist(),
            strict=True,
        )
    )


def quality_of(image_ids: np.ndarray, quality: dict[int, float]) -> np.ndarray:
    """Planted quality of each image id (NaN for ids the truth does not know)."""
    return np.array([quality.get(int(i), np.nan) for i in np.asarray(image_ids)], np.float64)


def pair_agreement(
    winner_ids: np.ndarray, loser_ids: np.ndarray, quality: dict[int, float]
) -> tuple[float, int]:
    """(share of pairs whose winner has the higher planted quality, pairs judged); pairs with
    an image the truth does not know are not judged. NaN share when no pair is judged."""
    q_w = quality_of(winner_ids, quality)
    q_l = quality_of(loser_ids, quality)
    known = np.isfinite(q_w) & np.isfinite(q_l)
    if not known.any():
        return float("nan"), 0
    return float((q_w[known] > q_l[known]).mean()), int(known.sum())
