"""Training the tiny CLIP encoder: learning, budgets, bad input, determinism, save → load.

Fast tests use a synthetic set where an image's colour is a word of its caption (and each
caption is otherwise unique), so a few dozen steps must lift held-out Recall@10 well above the
untrained model's. The end-to-end run on a generated sample is marked slow.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ml.encoders import TINY_ENCODER, build_model, load_encoder
from ml.encoders.checkpoint import file_sha256
from ml.train_clip import (
    TrainConfig,
    _Captions,
    _decode,
    _normalise,
    _pixel_recipe,
    holdout_mask,
    recall_at_k,
    sample_pairs,
    save_trained,
    train_clip,
)

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "cyan": (40, 210, 220),
    "black": (15, 15, 15),
}
NOUNS = ("kite", "house", "boat", "lamp", "chair", "tree", "cloud", "shoe")

# Small and quick: 30 steps of 32 pairs; a quarter held out so Recall@10 is measured over
# ~64 distinct prompts (chance ~0.16, a colour-perfect model ~1.0).
FAST = TrainConfig(
    batch_size=32,
    lr=5e-3,
    warmup_steps=5,
    max_steps=30,
    time_budget_s=None,
    holdout_fraction=0.25,
    device="cpu",
)


def _jpeg(colour: tuple[int, int, int], rng: np.random.Generator) -> bytes:
    """A 32-64 px JPEG of ``colour`` with noise and a grey square somewhere."""
    w, h = (int(v) for v in rng.integers(32, 65, size=2))
    pixels = np.array(colour, dtype=np.float32) + rng.normal(0, 12, size=(h, w, 3))
    x, y, s = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2)), int(rng.integers(6, 14))
    pixels[y : y + s, x : x + s] = 128
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _synthetic_pairs(n: int = 256, seed: int = 0) -> list[tuple[int, bytes, str]]:
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    pairs = []
    for i in range(n):
        colour = names[i % len(names)]
        noun = NOUNS[int(rng.integers(len(NOUNS)))]
        caption = f"a {colour} {noun}, picture number {i}"
        pairs.append((1000 + i, _jpeg(COLOURS[colour], rng), caption))
    return pairs


@pytest.fixture(scope="module")
def pairs():
    return _synthetic_pairs()


@pytest.fixture(scope="module")
def trained(pairs):
    return train_clip(pairs, FAST)


def test_loss_decreases(trained):
    losses = [loss for _, loss in trained.loss_curve]
    assert [s for s, _ in trained.loss_curve] == list(range(1, 31))
    assert trained.steps == 30 and trained.stop_reason == "max_steps"
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert math.isfinite(trained.final_loss)


def test_trained_recall_beats_the_random_init(trained):
    assert trained.n_holdout_prompts > 2 * 10  # Recall@10 is not trivially 1
    assert trained.n_train + trained.n_holdout == 256
    assert trained.init_recall_at_10 < 0.5
    assert trained.recall_at_10 >= trained.init_recall_at_10 + 0.3
    assert trained.eval_curve[0] == (0, trained.init_recall_at_10)
    assert trained.eval_curve[-1] == (30, trained.recall_at_10)


def test_result_model_is_on_cpu_in_eval_mode(trained):
    assert not trained.model.training
    assert next(trained.model.parameters()).device.type == "cpu"
    assert 0 < float(trained.model.logit_scale.detach().exp()) <= 100.0 + 1e-4


def test_time_budget_stops_early_and_counts_steps(pairs):
    budget = 4.0
    config = TrainConfig(
        batch_size=32, max_steps=100_000, time_budget_s=budget, holdout_fraction=0.25
    )
    started = time.perf_counter()
    result = train_clip(pairs, config)
    wall = time.perf_counter() - started
    assert result.stop_reason == "time_budget"
    assert 0 < result.steps < 100_000
    assert result.steps == len(result.loss_curve)
    assert result.seconds <= budget + 0.5
    assert wall <= budget + 1.0


def test_save_then_load_encoder_gives_identical_vectors(trained, tmp_path):
    checkpoint, sidecar, digest = save_trained(trained, tmp_path / "enc")
    assert checkpoint.name == "imagegem-tiny.safetensors"
    assert sidecar.name == "imagegem-tiny.json"
    assert digest == file_sha256(checkpoint)
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == [
        "imagegem-tiny.json",
        "imagegem-tiny.safetensors",
    ]  # no temporary files left behind

    encoder = load_encoder(FAST.model, checkpoint=checkpoint, device="cpu")
    assert encoder.tag == f"imagegem-tiny@{digest[:16]}"
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    tokens = encoder.tokenizer(["a red kite", "a blue boat", "", "a cyan lamp"])
    with torch.inference_mode():
        want_images = torch.nn.functional.normalize(trained.model.encode_image(pixels), dim=-1)
        want_texts = torch.nn.functional.normalize(trained.model.encode_text(tokens), dim=-1)
    assert torch.equal(encoder.encode_image_tensors(pixels), want_images)
    assert torch.equal(encoder.encode_token_tensors(tokens), want_texts)

    with safe_open(str(checkpoint), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["model"] == "imagegem-tiny" and metadata["tiny_model"] == "true"
    assert metadata["steps"] == "30" and metadata["seed"] == "0"
    document = json.loads(sidecar.read_text())
    assert document["sha256"] == digest
    assert document["encoder"] == encoder.tag
    assert document["open_clip_config"]["embed_dim"] == 64
    assert document["train_config"]["max_steps"] == 30
    assert document["metrics"]["recall_at_10"] == trained.recall_at_10
    assert document["metrics"]["init_recall_at_10"] == trained.init_recall_at_10


def test_trained_weights_differ_from_the_init(trained):
    _, _, init, _ = build_model(TINY_ENCODER, seed=0)
    key = "visual.conv1.weight"
    assert not torch.equal(trained.model.state_dict()[key], init.state_dict()[key])


def test_undecodable_images_are_skipped_and_counted(pairs, tmp_path):
    good = pairs[:160]
    truncated = good[0][1][: len(good[0][1]) // 3]
    bad = [
        (1, b"not an image at all", "a red kite"),
        (2, b"", "a blue boat"),
        (3, truncated, "a green lamp"),
        (4, tmp_path / "missing.jpeg", "a black shoe"),
    ]
    config = TrainConfig(batch_size=32, max_steps=2, time_budget_s=None, holdout_fraction=0.25)
    result = train_clip(bad + good, config)
    assert result.skipped == {"undecodable": 4}
    assert result.undecodable_ids == (1, 2, 3, 4)
    assert result.n_train + result.n_holdout == len(good)
    assert result.steps == 2


def test_repeated_ids_and_empty_prompts_are_counted(pairs):
    config = TrainConfig(batch_size=32, max_steps=1, time_budget_s=None, holdout_fraction=0.25)
    extra = [(pairs[0][0], pairs[1][1], "again"), (5, pairs[2][1], "   "), (6, pairs[3][1], None)]
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = train_clip(pairs[:160] + extra, config)
        assert torch.get_num_threads() == 2  # training ran on config.threads=1, then restored
    finally:
        torch.set_num_threads(caller_threads)
    assert result.skipped == {"duplicate_id": 1, "empty_prompt": 2}
    assert result.n_train + result.n_holdout == 160


def test_too_few_pairs_is_a_clear_error(pairs):
    config = TrainConfig(batch_size=32, max_steps=5, time_budget_s=None)
    with pytest.raises(ValueError, match="need at least two batches"):
        train_clip(pairs[:60], config)
    garbage = [(i, b"\xff\xd8garbage", "a red kite") for i in range(200)]
    with pytest.raises(ValueError, match="'undecodable': 200"):
        train_clip(garbage, config)


def test_same_seed_same_curve_other_seed_other_curve(pairs):
    config = TrainConfig(batch_size=32, max_steps=4, time_budget_s=None, holdout_fraction=0.25)
    a = train_clip(pairs, config)
    b = train_clip(pairs, config)
    c = train_clip(pairs, replace(config, seed=1))
    assert len(a.loss_curve) == 4
    assert a.loss_curve == b.loss_curve
    assert a.recall_at_10 == b.recall_at_10
    assert a.loss_curve != c.loss_curve


def test_cached_pixels_match_the_encoder_preprocess(pairs):
    """Training must see exactly what inference feeds: decode-once uint8 + batch
    normalisation equals open_clip's eval transform on the same image."""
    _, _, _, preprocess = build_model(TINY_ENCODER, seed=0)
    recipe = _pixel_recipe(preprocess, 64)
    data = pairs[5][1]
    cached = _decode(data, recipe)
    assert cached.dtype == np.uint8 and cached.shape == (3, 64, 64)
    ours = _normalise(torch.from_numpy(cached)[None], recipe)[0]
    theirs = preprocess(Image.open(io.BytesIO(data)))
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_caption_dropout_drops_parts_and_matches_the_tokenizer_when_keeping_all():
    import open_clip

    tokenizer = open_clip.get_tokenizer(TINY_ENCODER)
    prompts = [
        "(masterpiece:1.2), anime screencap, (kimono girl:1.1), rainy alley, <lora:x_v1:0.8>",
        "a red kite, picture number 3",
        "no commas here",
        "(worst quality, low quality:1.4), lowres, " + "word, " * 60 + "end",  # > 77 tokens
    ]
    tokens = tokenizer(prompts)
    index = torch.arange(len(prompts))
    keep_all = _Captions(prompts, tokens, tokenizer, dropout=1e-12)
    assert torch.equal(keep_all.batch(index, torch.Generator().manual_seed(0)), tokens)

    dropping = _Captions(prompts, tokens, tokenizer, dropout=0.5)
    batch = dropping.batch(index, torch.Generator().manual_seed(0))
    assert batch.shape == tokens.shape
    lengths, full = (batch != 0).sum(1), (tokens != 0).sum(1)
    assert bool((lengths <= full).all()) and bool((lengths < full).any())
    assert lengths[2] == full[2]  # a prompt of one part keeps it
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    assert batch[:, 0].tolist() == [sot] * 4
    assert [int(row[n - 1]) for row, n in zip(batch, lengths.tolist(), strict=True)] == [eot] * 4


def test_recall_at_k_counts_shared_prompts_once():
    texts = torch.eye(4)
    # images 0 and 1 share prompt 0; image 2 → prompt 2; image 3 points at prompt 3
    images = torch.stack([texts[0], texts[0], texts[2], texts[1]])
    targets = torch.tensor([0, 0, 2, 3])
    assert recall_at_k(images, texts, targets, k=1) == pytest.approx(0.75)
    assert recall_at_k(images, texts, targets, k=4) == pytest.approx(1.0)


def test_holdout_split_is_stable_and_near_its_fraction():
    ids = list(range(10_000, 20_000))
    mask = holdout_mask(ids, 0.1)
    assert 0.08 < mask.mean() < 0.12
    assert np.array_equal(mask[:500], holdout_mask(ids[:500], 0.1))  # same id, same side


@pytest.mark.parametrize(
    "bad",
    [
        {"holdout_fraction": 0.0},
        {"holdout_fraction": 1.0},
        {"batch_size": 1},
        {"lr": 0.0},
        {"threads": 0},
        {"caption_dropout": 1.0},
        {"crop_scale": (0.0, 1.0)},
    ],
)
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_sample_pairs_joins_media_files_to_prompts(tmp_path, pairs):
    media = tmp_path / "media" / "images"
    media.mkdir(parents=True)
    for image_id in (1, 2, 3):
        (media / f"{image_id}.jpeg").write_bytes(pairs[image_id][1])
    (media / "notes.txt").write_text("not an image")
    (tmp_path / "images").mkdir()
    rows = {
        "imageId": [1, 1, 1, 2, 2, 99, None],
        "prompt": ["a red kite", "a red kite", "a red kite" + "!" * 5000, "b", None, "x", "y"],
    }
    pq.write_table(pa.table(rows), tmp_path / "images" / "part-00000.parquet")
    got = sample_pairs(tmp_path)
    assert [(i, p.name, prompt) for i, p, prompt in got] == [
        (1, "1.jpeg", "a red kite"),
        (2, "2.jpeg", "b"),
    ]
    with pytest.raises(ValueError, match="no image media"):
        sample_pairs(tmp_path / "nowhere")


@pytest.mark.slow
def test_trains_on_a_generated_sample(tmp_path):
    from pipelines.sample.generator import SampleSpec, generate_sample

    generate_sample(tmp_path / "sample", SampleSpec(users=120, media_images=800))
    pairs = sample_pairs(tmp_path / "sample")
    assert len(pairs) > 500
    config = TrainConfig(batch_size=64, max_steps=150, time_budget_s=120.0, holdout_fraction=0.2)
    result = train_clip(pairs, config)
    assert result.n_holdout_prompts > 50
    assert result.recall_at_10 >= 2 * result.init_recall_at_10
    checkpoint, _, digest = save_trained(result, tmp_path / "out")
    assert load_encoder(TINY_ENCODER, checkpoint=checkpoint, device="cpu").tag.endswith(digest[:16])
