"""The Bradley–Terry reward model: learning a planted preference, files, memory-bounded scoring."""

from __future__ import annotations

import json
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from ml.preferences.engagement import build_pairs
from ml.preferences.reward import (
    CHECKPOINT_NAME,
    SIDECAR_NAME,
    RewardConfig,
    RewardModel,
    load_reward_model,
    pairwise_accuracy,
    release_pages,
    save_reward_model,
    score_embeddings,
    train_reward_model,
)

DIM = 32


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted(n=24_000, dim=DIM, prompts=4_000, clusters=40, noise=1.0, seed=0):
    """Images around their prompts; quality = a fixed direction of the image plus a
    prompt-dependent (diagonal bilinear) term; engagement = quality + noise."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, dim)))
    prompt_cluster = rng.integers(0, clusters, prompts)
    prompt_emb = unit(centres[prompt_cluster] + 0.35 * rng.standard_normal((prompts, dim)) / 3)
    prompt_index = rng.integers(0, prompts, n)
    image_emb = unit(prompt_emb[prompt_index] + 0.8 * rng.standard_normal((n, dim)) / 3)
    u, v = unit(rng.standard_normal((2, dim)))

    def z(x):
        return (x - x.mean()) / x.std()

    quality = z(image_emb @ u) + 0.5 * z((image_emb * prompt_emb[prompt_index]) @ v)
    engagement = quality + noise * rng.standard_normal(n)
    split = build_pairs(
        np.arange(n, dtype=np.int64),
        prompt_cluster[prompt_index],
        engagement,
        margin=0.5,
        max_pairs_per_cluster=400,
        heldout_fraction=0.2,
        seed=seed,
    )
    return image_emb, prompt_emb, prompt_index, quality, split


FAST = RewardConfig(epochs=4, patience=2, time_budget_s=None, warmup_steps=20, batch_size=256)


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def trained(data):
    image_emb, prompt_emb, prompt_index, _, split = data
    return train_reward_model(
        image_emb, prompt_emb, split.train, split.heldout, FAST, prompt_index=prompt_index
    )


def test_learns_the_planted_preference_close_to_its_ceiling(data, trained):
    _, _, _, quality, split = data
    ceiling = pairwise_accuracy(quality, *split.heldout)  # the planted score on the same pairs
    assert split.n_train > 10_000 and split.n_heldout > 2_000
    assert 0.7 < ceiling < 0.95  # the labels are noisy: even the truth is not always right
    assert trained.heldout_accuracy > 0.7
    assert trained.heldout_accuracy > ceiling - 0.03
    assert abs(trained.init_heldout_accuracy - 0.5) < 0.1
    assert trained.n_train_pairs == split.n_train and trained.n_heldout_pairs == split.n_heldout
    assert len(trained.curve) >= 3 and trained.curve[0].steps == 0
    # evals_per_epoch=2: an evaluation half-way through each epoch and one at its end
    assert [p.epoch for p in trained.curve[:3]] == pytest.approx([0.0, 0.5, 1.0], abs=0.02)
    assert trained.heldout_accuracy == max(p.heldout_accuracy for p in trained.curve)
    assert trained.stop_reason in ("epochs", "early_stopping")
    assert not trained.model.training and next(trained.model.parameters()).device.type == "cpu"


def test_returned_model_is_the_best_one_and_reproduces_its_accuracy(data, trained):
    image_emb, prompt_emb, prompt_index, _, split = data
    scores = score_embeddings(trained.model, image_emb, prompt_emb, prompt_index=prompt_index)
    assert scores.dtype == np.float32 and scores.shape == (image_emb.shape[0],)
    assert pairwise_accuracy(scores, *split.heldout) == pytest.approx(trained.heldout_accuracy)


def test_shuffled_labels_learn_nothing(data):
    """Control: with each pair's orientation a coin flip, held-out accuracy stays at chance
    (so the accuracy above is not an artefact of the split or the scoring)."""
    image_emb, prompt_emb, prompt_index, _, split = data
    rng = np.random.default_rng(1)
    flip = rng.random(split.n_train) < 0.5
    w, lo = split.train
    noisy = (np.where(flip, lo, w), np.where(flip, w, lo))
    config = RewardConfig(epochs=3, patience=1, time_budget_s=None, batch_size=256)
    result = train_reward_model(
        image_emb, prompt_emb, noisy, split.heldout, config, prompt_index=prompt_index
    )
    # early stopping keeps the best of a few near-chance evaluations
    assert result.heldout_accuracy < 0.58


def test_training_is_deterministic_without_a_time_budget(data):
    image_emb, prompt_emb, prompt_index, _, split = data
    small = (split.train[0][:3000], split.train[1][:3000])
    config = RewardConfig(epochs=1, time_budget_s=None, batch_size=256)
    a = train_reward_model(
        image_emb, prompt_emb, small, split.heldout, config, prompt_index=prompt_index
    )
    b = train_reward_model(
        image_emb, prompt_emb, small, split.heldout, config, prompt_index=prompt_index
    )
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key


def test_time_budget_bounds_the_call(data):
    image_emb, prompt_emb, prompt_index, _, split = data
    config = RewardConfig(epochs=1000, time_budget_s=1.5, batch_size=64)
    result = train_reward_model(
        image_emb, prompt_emb, split.train, split.heldout, config, prompt_index=prompt_index
    )
    assert result.stop_reason == "time_budget"
    assert result.seconds < 1.5 + 1.0
    assert result.steps > 0 and result.heldout_accuracy > 0.6


def test_per_image_prompt_rows_equal_prompt_index(data, trained):
    image_emb, prompt_emb, prompt_index, _, _ = data
    expanded = prompt_emb[prompt_index]
    a = score_embeddings(trained.model, image_emb, prompt_emb, 1000, prompt_index=prompt_index)
    b = score_embeddings(trained.model, image_emb, expanded, 777)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        direct = trained.model(torch.from_numpy(image_emb[:50]), torch.from_numpy(expanded[:50]))
    np.testing.assert_allclose(a[:50], direct.numpy(), rtol=1e-5, atol=1e-6)


def test_training_input_errors(data):
    image_emb, prompt_emb, prompt_index, _, split = data
    empty = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
    with pytest.raises(ValueError, match="no held-out pairs"):
        train_reward_model(
            image_emb, prompt_emb, split.train, empty, FAST, prompt_index=prompt_index
        )
    with pytest.raises(ValueError, match="no training pairs"):
        train_reward_model(
            image_emb, prompt_emb, empty, split.heldout, FAST, prompt_index=prompt_index
        )
    with pytest.raises(ValueError, match="itself"):
        train_reward_model(
            image_emb, prompt_emb, (np.array([1]), np.array([1])), split.heldout, FAST,
            prompt_index=prompt_index,
        )  # fmt: skip
    with pytest.raises(IndexError, match="outside"):
        train_reward_model(
            image_emb, prompt_emb, (np.array([10**9]), np.array([1])), split.heldout, FAST,
            prompt_index=prompt_index,
        )  # fmt: skip
    with pytest.raises(ValueError, match="dimension"):
        train_reward_model(image_emb, prompt_emb[:, :16], split.train, split.heldout, FAST,
                           prompt_index=prompt_index)  # fmt: skip
    with pytest.raises(ValueError, match="prompt_index"):
        train_reward_model(image_emb, prompt_emb, split.train, split.heldout, FAST)
    with pytest.raises(ValueError, match="margin"):
        RewardConfig(margin=0)
    with pytest.raises(ValueError, match="hidden"):
        RewardConfig(hidden=0)
    assert RewardConfig(device=torch.device("cpu")).device == "cpu"  # JSON-able
    with pytest.raises(TypeError, match="device"):
        RewardConfig(device=None)


def test_pairwise_accuracy_counts_ties_and_nans():
    scores = np.array([3.0, 1.0, 1.0, np.nan])
    w, lo = np.array([0, 1, 2, 3]), np.array([1, 2, 0, 0])
    # 0>1 right, 1=2 tie, 2<0 wrong, NaN tie
    assert pairwise_accuracy(scores, w, lo) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert pairwise_accuracy(scores, w, lo, nan_policy="omit") == pytest.approx(1.5 / 3)
    assert np.isnan(pairwise_accuracy(scores, np.array([], int), np.array([], int)))
    with pytest.raises(IndexError):
        pairwise_accuracy(scores, np.array([4]), np.array([0]))
    with pytest.raises(ValueError, match="1-D"):
        pairwise_accuracy(scores, np.array([0, 1]), np.array([1]))


# ---------------------------------------------------------------------------------------------
# Files


def test_save_load_round_trip_gives_identical_scores(data, trained, tmp_path):
    image_emb, prompt_emb, prompt_index, _, _ = data
    checkpoint, sidecar, digest = save_reward_model(
        trained, tmp_path / "rm", encoder="imagegem-tiny@abc", tiny_model=True,
        extra={"baseline_accuracy": 0.61, "nan": float("nan")},
    )  # fmt: skip
    assert checkpoint.name == CHECKPOINT_NAME and sidecar.name == SIDECAR_NAME
    document = json.loads(sidecar.read_text())
    assert document["sha256"] == digest and document["encoder"] == "imagegem-tiny@abc"
    assert document["tiny_model"] is True and document["dims"]["embed_dim"] == DIM
    assert document["metrics"]["heldout_accuracy"] == pytest.approx(trained.heldout_accuracy)
    assert document["baseline_accuracy"] == 0.61 and document["nan"] is None
    assert not list((tmp_path / "rm").glob(".*tmp"))  # no temporary left behind
    saved = load_reward_model(tmp_path / "rm")
    assert saved.encoder == "imagegem-tiny@abc" and saved.tiny_model and saved.sha256 == digest
    a = score_embeddings(trained.model, image_emb, prompt_emb, prompt_index=prompt_index)
    b = score_embeddings(saved.model, image_emb, prompt_emb, prompt_index=prompt_index)
    np.testing.assert_array_equal(a, b)


@pytest.fixture
def saved_folder(trained, tmp_path):
    folder = tmp_path / "model"
    save_reward_model(trained, folder, encoder="enc@1", tiny_model=False)
    return folder


def test_load_errors_name_the_file(saved_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_reward_model(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=SIDECAR_NAME):
        load_reward_model(empty)
    (saved_folder / SIDECAR_NAME).rename(tmp_path / "kept.json")
    (saved_folder / SIDECAR_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=SIDECAR_NAME):
        load_reward_model(saved_folder)
    (tmp_path / "kept.json").replace(saved_folder / SIDECAR_NAME)
    (saved_folder / CHECKPOINT_NAME).rename(tmp_path / "kept.safetensors")
    with pytest.raises(FileNotFoundError, match=CHECKPOINT_NAME):
        load_reward_model(saved_folder)


class _Payload:
    """Unpickling this would create the marker file: proof that nothing unpickles."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_named_safetensors_is_refused_without_running_it(saved_folder, tmp_path):
    marker = tmp_path / "pwned"
    (saved_folder / CHECKPOINT_NAME).write_bytes(pickle.dumps({"w": _Payload(marker)}))
    with pytest.raises(ValueError, match=f"{CHECKPOINT_NAME}.*not a readable safetensors"):
        load_reward_model(saved_folder)
    assert not marker.exists()


def test_wrong_dims_and_replaced_weights_are_refused(saved_folder):
    sidecar = saved_folder / SIDECAR_NAME
    document = json.loads(sidecar.read_text())
    good = json.dumps(document)
    document["dims"]["hidden"] = 64
    sidecar.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=f"{CHECKPOINT_NAME} does not fit the dims"):
        load_reward_model(saved_folder)
    sidecar.write_text(good)
    from ml.encoders.checkpoint import save_state_dict

    save_state_dict(RewardModel(DIM, 128), saved_folder / CHECKPOINT_NAME)  # other weights
    with pytest.raises(ValueError, match="SHA-256"):
        load_reward_model(saved_folder)


# ---------------------------------------------------------------------------------------------
# Scoring at scale


def test_scoring_a_200k_row_memmap_stays_bounded(tmp_path):
    n, d = 200_000, 64
    rng = np.random.default_rng(0)
    images = np.lib.format.open_memmap(tmp_path / "img.npy", "w+", np.float16, (n, d))
    prompts = np.lib.format.open_memmap(tmp_path / "prm.npy", "w+", np.float16, (n // 4, d))
    for start in range(0, n, 50_000):
        images[start : start + 50_000] = unit(rng.standard_normal((50_000, d)))
    prompts[:] = unit(rng.standard_normal((n // 4, d)))
    images.flush()
    prompts.flush()
    del images, prompts
    images = np.load(tmp_path / "img.npy", mmap_mode="r")
    prompts = np.load(tmp_path / "prm.npy", mmap_mode="r")
    index = (np.arange(n) % (n // 4)).astype(np.int32)
    model = RewardModel(d, 64)
    tracemalloc.start()
    try:
        scores = score_embeddings(model, images, prompts, 4096, prompt_index=index)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scores.dtype == np.float32 and scores.shape == (n,)
    # the float32 copy of the images alone would be 51 MB, a float64 copy 102 MB; scoring
    # holds the (n,) result (0.8 MB) and a few batch-sized buffers
    assert peak < 8 * 2**20, f"numpy peak {peak / 2**20:.1f} MiB"
    rows = np.array([0, 1, 77_777, n - 1])
    with torch.inference_mode():
        direct = model(
            torch.from_numpy(np.asarray(images[rows], dtype=np.float32)),
            torch.from_numpy(np.asarray(prompts[index[rows]], dtype=np.float32)),
        )
    np.testing.assert_allclose(scores[rows], direct.numpy(), rtol=1e-5, atol=1e-6)


def test_nan_rows_score_nan_and_dimension_mismatch_is_refused():
    model = RewardModel(8, 16)
    image = unit(np.random.default_rng(0).standard_normal((5, 8)))
    image[2, 3] = np.nan
    scores = score_embeddings(model, image, image.copy(), 2)
    assert np.isnan(scores[2]) and np.isfinite(np.delete(scores, 2)).all()
    with pytest.raises(ValueError, match="dimension 8 but the reward model was trained on 4"):
        score_embeddings(RewardModel(4, 16), image, image, 2)
    with pytest.raises(TypeError, match="float"):
        score_embeddings(model, np.ones((5, 8), dtype=np.int64), image, 2)


def test_training_from_memmaps_equals_training_in_memory(data, tmp_path):
    """Scattered rows of whole memmaps are read from the file (pread), not through the map:
    the model must come out bit-identical; a copy-on-write map's private writes are seen."""
    image_emb, prompt_emb, prompt_index, _, split = data
    np.save(tmp_path / "img.npy", image_emb.astype(np.float16))
    np.save(tmp_path / "prm.npy", prompt_emb.astype(np.float16))
    image16 = np.load(tmp_path / "img.npy", mmap_mode="r")
    prompt16 = np.load(tmp_path / "prm.npy", mmap_mode="r")
    small = (split.train[0][:2000], split.train[1][:2000])
    config = RewardConfig(epochs=1, time_budget_s=None, batch_size=256)
    mapped = train_reward_model(
        image16, prompt16, small, split.heldout, config, prompt_index=prompt_index
    )
    memory = train_reward_model(
        np.asarray(image16).copy(), np.asarray(prompt16).copy(), small, split.heldout, config,
        prompt_index=prompt_index,
    )  # fmt: skip
    assert mapped.heldout_accuracy == memory.heldout_accuracy
    for key, value in mapped.model.state_dict().items():
        assert torch.equal(value, memory.model.state_dict()[key]), key
    private = np.load(tmp_path / "prm.npy", mmap_mode="c")
    private[prompt_index[0]] = 0.0
    scores = score_embeddings(mapped.model, image16, private, prompt_index=prompt_index)
    zeroed = score_embeddings(
        mapped.model, image16[:1].astype(np.float32), np.zeros((1, DIM), np.float32)
    )
    assert scores[0] == pytest.approx(float(zeroed[0]), abs=1e-6)


def test_release_pages_keeps_data_and_never_discards_private_writes(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(1 << 16, dtype=np.float32))
    shared = np.load(path, mmap_mode="r")
    total = float(shared.sum())
    release_pages(shared, shared[10:20], np.zeros(3))  # plain arrays are ignored
    assert float(shared.sum()) == total
    private = np.load(path, mmap_mode="c")
    private[5] = -1.0
    release_pages(private)  # copy-on-write: DONTNEED would drop the write, so it is skipped
    assert private[5] == -1.0


def test_config_for_few_pairs_takes_enough_steps_and_for_many_keeps_the_defaults():
    small = RewardConfig.for_pairs(4_000)
    steps = small.epochs * (4_000 // small.batch_size)
    assert small.batch_size < RewardConfig().batch_size and steps >= 1_900
    assert small.warmup_steps < steps // 10 and small.patience > RewardConfig().patience
    big = RewardConfig.for_pairs(2_000_000)
    assert (big.batch_size, big.epochs, big.patience) == (512, 5, 2)
    assert RewardConfig.for_pairs(4_000, batch_size=128, epochs=3).epochs == 3  # overrides win


def test_heldout_fraction_grows_on_small_warehouses_and_keeps_the_base_on_large_ones():
    from ml.preferences.engagement import heldout_images

    assert RewardConfig.heldout_fraction_for(1_000_000) == RewardConfig.heldout_fraction
    assert RewardConfig.heldout_fraction_for(1_000) == RewardConfig.heldout_fraction
    small = RewardConfig.heldout_fraction_for(380)
    assert 0.25 <= small <= 0.3 and RewardConfig.heldout_fraction_for(10) == 0.3
    ids = np.arange(1, 5_000)
    base, grown = heldout_images(ids, 0.1), heldout_images(ids, small)
    assert (grown | base).sum() == grown.sum() > base.sum()  # a superset: held out stays held out
