"""The scorer interface: HPSv2 from a checkpoint in HPSv2's layout, the reward model, CLIP score."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ml.encoders import TINY_ENCODER, build_model, resolve_config
from ml.preferences.reward import (
    RewardConfig,
    save_reward_model,
    score_embeddings,
    train_reward_model,
)
from ml.preferences.scorers import (
    ClipScoreScorer,
    HPSv2Scorer,
    ImageScorer,
    RewardModelScorer,
    ScoringBatch,
    make_scorers,
    score_batches,
)

SEED = 11


def hpsv2_layout(model: torch.nn.Module, path: Path) -> Path:
    """What HPS_v2_compressed.pt holds: a torch file with {"state_dict": model.state_dict()}."""
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    _, _, model, preprocess = build_model(TINY_ENCODER, seed=SEED)
    path = hpsv2_layout(model, tmp_path_factory.mktemp("hps") / "HPS_v2_compressed.pt")
    return path, model.eval(), preprocess


def picture(seed: int, size=(80, 60), fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def direct_hpsv2(model, preprocess, images: list[bytes], prompts: list[str]) -> np.ndarray:
    """HPSv2's own computation: model(image, text) gives normalised features; the score is
    the diagonal of image_features @ text_features.T."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(TINY_ENCODER)
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images])
    with torch.no_grad():
        image_features, text_features, _ = model(pixels, tokenizer(prompts))
        return torch.diagonal(image_features @ text_features.T).numpy()


def test_hpsv2_equals_the_direct_computation(tiny_hps, tmp_path):
    path, model, preprocess = tiny_hps
    images = [
        picture(i, size=(64 + 9 * i, 50 + 5 * i), fmt="PNG" if i % 2 else "JPEG") for i in range(7)
    ]
    prompts = ["a red fox", "castle at night", "a red fox", "portrait, oil", "", "x", "sea"]
    prompts[4] = "an empty room"
    on_disk = tmp_path / "3.png"
    on_disk.write_bytes(images[3])
    sources = list(images)
    sources[3] = str(on_disk)  # paths and bytes mixed
    scorer = HPSv2Scorer(path, model=TINY_ENCODER, device="cpu", batch_size=3, decode_threads=2)
    assert isinstance(scorer, ImageScorer) and scorer.name == "hpsv2"
    assert scorer.tag.startswith("imagegem-tiny@")
    batch = ScoringBatch(np.arange(7), images=sources, prompts=prompts)
    scores = scorer.score(batch)
    expected = direct_hpsv2(model, preprocess, images, prompts)
    assert scores.dtype == np.float32 and scores.shape == (7,)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.all(np.abs(scores) <= 1.0 + 1e-6)  # cosines
    assert not scorer.rejections


def test_hpsv2_unscorable_images_are_nan_with_reasons(tiny_hps, tmp_path):
    path, model, preprocess = tiny_hps
    good = [picture(20), picture(21)]
    sources = [good[0], str(tmp_path / "missing.png"), b"not an image", good[1], None, good[0]]
    prompts = ["a cat", "a dog", "a bird", "a fish", "a cow", None]
    scorer = HPSv2Scorer(path, model=TINY_ENCODER, device="cpu", batch_size=4, decode_threads=1)
    run = score_batches(scorer, [ScoringBatch(np.arange(6), images=sources, prompts=prompts)])
    assert run.n_nan == 4
    assert run.rejections == {
        "file not found": 1,
        "not a decodable image (unknown format)": 1,
        "no image": 1,
        "no prompt": 1,
    }
    expected = direct_hpsv2(model, preprocess, good, ["a cat", "a fish"])
    np.testing.assert_allclose(run.scores[[0, 3]], expected, atol=1e-5)
    assert np.isnan(run.scores[[1, 2, 4, 5]]).all()
    with pytest.raises(ValueError, match="hpsv2.*needs prompts"):
        scorer.score(ScoringBatch(np.arange(1), images=[good[0]]))


def test_hpsv2_checkpoint_errors_name_the_file(tmp_path):
    missing = tmp_path / "HPS_v2_compressed.pt"
    with pytest.raises(FileNotFoundError, match="HPS_v2_compressed.pt"):
        HPSv2Scorer(missing, model=TINY_ENCODER, device="cpu")

    # another architecture's weights in the right layout
    _, config = resolve_config(TINY_ENCODER)
    other = json.loads(json.dumps(config))
    other["embed_dim"] = 32
    config_path = tmp_path / "other-clip.json"
    config_path.write_text(json.dumps(other))
    _, _, other_model, _ = build_model(str(config_path), seed=0)
    wrong = hpsv2_layout(other_model, tmp_path / "wrong_arch.pt")
    with pytest.raises(ValueError, match="wrong_arch.pt does not fit config 'imagegem-tiny'"):
        HPSv2Scorer(wrong, model=TINY_ENCODER, device="cpu")

    # a pickle that would run code when loaded
    marker = tmp_path / "pwned"
    _, _, model, _ = build_model(TINY_ENCODER, seed=0)
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "hook": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match="evil.pt: not loadable with torch.load\\(weights_only"):
        HPSv2Scorer(evil, model=TINY_ENCODER, device="cpu")
    assert not marker.exists()

    text = tmp_path / "weights.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="weights.txt: unsupported format"):
        HPSv2Scorer(text, model=TINY_ENCODER, device="cpu")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---------------------------------------------------------------------------------------------
# CLIP score


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_clip_score_is_the_dot_product_of_normalised_vectors():
    rng = np.random.default_rng(0)
    image, prompt = unit(rng.standard_normal((50, 16))), unit(rng.standard_normal((50, 16)))
    scorer = ClipScoreScorer()
    scores = scorer.score(
        ScoringBatch(np.arange(50), image_embeddings=image, prompt_embeddings=prompt)
    )
    np.testing.assert_allclose(scores, np.einsum("ij,ij->i", image, prompt), atol=1e-6)
    # unnormalised input still gives the cosine
    again = scorer.score(
        ScoringBatch(np.arange(50), image_embeddings=3 * image, prompt_embeddings=0.5 * prompt)
    )
    np.testing.assert_allclose(again, scores, atol=1e-6)


def test_clip_score_nan_rows_are_counted():
    rng = np.random.default_rng(1)
    image, prompt = unit(rng.standard_normal((6, 8))), unit(rng.standard_normal((6, 8)))
    image[1, 0] = np.nan
    prompt[4] = 0.0
    scorer = ClipScoreScorer()
    batches = [
        ScoringBatch(np.arange(3), image_embeddings=image[:3], prompt_embeddings=prompt[:3]),
        ScoringBatch(np.arange(3, 6), image_embeddings=image[3:], prompt_embeddings=prompt[3:]),
    ]
    run = score_batches(scorer, batches, logging.getLogger("test"))
    assert run.n_nan == 2 and run.rejections == {"missing embedding": 1, "zero vector": 1}
    assert np.isnan(run.scores[[1, 4]]).all() and np.isfinite(run.scores[[0, 2, 3, 5]]).all()
    assert run.metrics()["n_nan"] == 2
    with pytest.raises(ValueError, match="clip_score.*needs image_embeddings"):
        scorer.score(ScoringBatch(np.arange(2), prompts=["a", "b"]))


def test_scoring_batch_validates_lengths():
    with pytest.raises(ValueError, match="prompts has 1 entries for 2"):
        ScoringBatch(np.arange(2), prompts=["a"])
    with pytest.raises(ValueError, match="different dimensions"):
        ScoringBatch(
            np.arange(2), image_embeddings=np.zeros((2, 4)), prompt_embeddings=np.zeros((2, 5))
        )
    with pytest.raises(ValueError, match="image_embeddings must be"):
        ScoringBatch(np.arange(2), image_embeddings=np.zeros((3, 4)))


def test_score_batches_rejects_a_scorer_returning_the_wrong_shape():
    class Broken:
        name = "broken"

        def score(self, batch):
            return np.zeros(len(batch) + 1)

    with pytest.raises(ValueError, match="broken.*returned shape"):
        score_batches(Broken(), [ScoringBatch(np.arange(3))])


# ---------------------------------------------------------------------------------------------
# Reward model scorer and the selection


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    rng = np.random.default_rng(2)
    n, d = 2000, 16
    image, prompt = unit(rng.standard_normal((n, d))), unit(rng.standard_normal((n, d)))
    w = np.arange(0, 1000, 2)
    lo = w + 1
    config = RewardConfig(epochs=1, time_budget_s=None, batch_size=128, hidden=16)
    result = train_reward_model(image, prompt, (w, lo), (w + 1000, lo + 1000), config)
    folder = tmp_path_factory.mktemp("reward")
    save_reward_model(result, folder, encoder="imagegem-tiny@feed", tiny_model=True)
    return folder, result.model, image, prompt


def test_reward_model_scorer_scores_the_embeddings(reward_folder):
    folder, model, image, prompt = reward_folder
    scorer = RewardModelScorer.from_folder(folder)
    assert scorer.encoder == "imagegem-tiny@feed"
    rows = slice(0, 300)
    image_part, prompt_part = image[rows].copy(), prompt[rows].copy()
    image_part[7] = np.nan
    batch = ScoringBatch(
        np.arange(300), image_embeddings=image_part, prompt_embeddings=prompt_part,
        encoder="imagegem-tiny@feed",
    )  # fmt: skip
    run = score_batches(scorer, [batch])
    expected = score_embeddings(model, image[rows], prompt[rows])
    assert run.n_nan == 1 and run.rejections == {"missing embedding": 1}
    np.testing.assert_allclose(
        np.delete(run.scores, 7), np.delete(expected, 7), rtol=1e-5, atol=1e-6
    )
    other = ScoringBatch(
        np.arange(300), image_embeddings=image_part, prompt_embeddings=prompt_part,
        encoder="ViT-H-14@0123",
    )  # fmt: skip
    with pytest.raises(ValueError, match="ViT-H-14@0123.*imagegem-tiny@feed"):
        scorer.score(other)


def test_make_scorers_runs_what_is_configured(reward_folder, tiny_hps, tmp_path):
    folder, _, _, _ = reward_folder
    path, _, _ = tiny_hps
    nothing = make_scorers(None, None)
    assert nothing.names == ["clip_score"]
    assert set(nothing.skipped) == {"hpsv2", "reward_model"}
    untrained = make_scorers(None, tmp_path / "not-yet")
    assert "not trained yet" in untrained.skipped["reward_model"]
    everything = make_scorers(path, folder, hpsv2_model=TINY_ENCODER, device="cpu")
    assert everything.names == ["clip_score", "reward_model", "hpsv2"]
    assert everything.skipped == {}
    assert "hpsv2" in everything.describe()
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        make_scorers(tmp_path / "missing.pt", None, hpsv2_model=TINY_ENCODER, device="cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "reward_model.json").write_text("{}")
    with pytest.raises(ValueError, match="reward_model.json"):
        make_scorers(None, broken)
