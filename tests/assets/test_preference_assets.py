"""The preference and alignment stages end to end on the ``stage`` world (conftest.py): the
reward model trained on reactions and recorded, every image scored by the scorers that can run,
min-max pairs inside prompt clusters (checks, catalog view, Pick-a-Pic export), the tiny
diffusion base trained and the DPO LoRA loading into it; and the configuration mistakes a
user can make, each a clear error naming what is wrong."""

from __future__ import annotations

import pickle

import dagster as dg
import numpy as np
import pytest

from pipelines.resources import EncoderResource, PipelineResources, PreferencesResource
from tests.assets.conftest import PREFERENCES, mats
from warehouse import preferences as prefs
from warehouse.artifacts import latest_artifact
from warehouse.catalog import connect_readonly

pytestmark = pytest.mark.slow


def test_every_stage_ran_and_every_check_passed(stage):
    _, first, second = stage
    for results in (first, second):
        assert results and all(r.success for r in results)
    for asset in ("reward_model", "image_scores", "preference_pairs", "diffusion_base", "dpo_lora"):
        assert mats(first, asset), asset
    checks = {
        (c.asset_key.to_user_string(), c.check_name): c.passed
        for r in first
        for c in r.get_asset_check_evaluations()
        if c.asset_key.to_user_string() == "preference_pairs"
    }
    assert checks == {
        ("preference_pairs", "distinct_images_and_scores"): True,
        ("preference_pairs", "pairs_inside_one_cluster"): True,
        ("preference_pairs", "pairs_per_cluster_bounded"): True,
    }
    # the refresh re-scored and re-paired with the first day's reward model (a weekly retrain)
    assert mats(second, "image_scores") and not mats(second, "reward_model")


def test_reward_model_is_recorded_with_its_baselines(stage):
    from ml.preferences.reward import load_reward_model

    settings, first, _ = stage
    [mat] = mats(first, "reward_model")
    meta = mat.metadata
    assert meta["tiny_model"].value is True
    assert 0.0 <= meta["heldout_accuracy"].value <= 1.0
    assert meta["heldout_pairs"].value > 0 and meta["train_pairs"].value > 0
    # on the sample the ceiling (planted quality on the same held-out pairs) is reported
    assert 0.5 < meta["planted_quality_ceiling"].value <= 1.0
    assert 0.0 <= meta["raw_reactions_accuracy"].value <= 1.0
    assert "data:image/png;base64," in meta["learning_curve"].value
    artifact = latest_artifact(settings.lake(), "reward_model")
    assert artifact is not None and artifact.tiny_model
    assert artifact.encoder == meta["encoder"].value
    saved = load_reward_model(artifact.path)
    assert saved.encoder == artifact.encoder


def test_every_image_is_scored_by_every_scorer_that_ran(stage):
    settings, first, _ = stage
    [mat] = mats(first, "image_scores")
    assert mat.metadata["scorers"].value == "clip_score, reward_model"
    assert "HPSv2 checkpoint" in str(mat.metadata["skipped"].value)
    con = connect_readonly(settings.catalog_path(), settings.lake())
    rows = con.execute(
        "SELECT scorer, count(*), count(DISTINCT imageId), count(score) FROM image_scores "
        "GROUP BY scorer ORDER BY scorer"
    ).fetchall()
    embedded = con.execute("SELECT count(DISTINCT imageId) FROM image_embeddings").fetchone()[0]
    assert [r[0] for r in rows] == ["clip_score", "reward_model"]
    for _, n, distinct, scored in rows:
        assert n == distinct == embedded and scored == n
    # clip_score is the cosine of the image and prompt vectors, recomputed in SQL
    gap = con.execute(
        """SELECT max(abs(s.score - array_cosine_similarity(e.embedding, p.embedding)))
        FROM image_scores s JOIN image_embeddings e USING (imageId, encoder)
        JOIN (SELECT imageId, any_value(prompt_id(normalize_prompt(prompt))) AS prompt_id
              FROM images GROUP BY imageId) i USING (imageId)
        JOIN prompt_embeddings p ON p.prompt_id = i.prompt_id AND p.encoder = s.encoder
        WHERE s.scorer = 'clip_score'"""
    ).fetchone()[0]
    assert gap < 1e-5


def test_pairs_are_min_max_inside_clusters_and_exported(stage):
    settings, _, second = stage
    [mat] = mats(second, "preference_pairs")
    meta = mat.metadata
    con = connect_readonly(settings.catalog_path(), settings.lake())
    pairs = con.execute(
        "SELECT cluster_id, winner_imageId, loser_imageId, winner_score, loser_score, scorer "
        "FROM preference_pairs"
    ).fetchall()
    assert pairs and len(pairs) == meta["dagster/row_count"].value
    assert {p[5] for p in pairs} == {"reward_model"}
    assert all(w_s > l_s for _, _, _, w_s, l_s, _ in pairs)
    per_cluster = np.bincount([p[0] for p in pairs])
    assert per_cluster.max() <= PREFERENCES.pairs_top_k
    # the first pair of a cluster is its best against its worst image by the scorer
    cluster = pairs[0][0]
    best, worst = con.execute(
        f"""SELECT max(s.score), min(s.score) FROM image_scores s
        JOIN (SELECT imageId, any_value(prompt_id(normalize_prompt(prompt))) AS prompt_id
              FROM images GROUP BY imageId) i USING (imageId)
        JOIN prompt_clusters c ON c.prompt_id = i.prompt_id AND c.encoder = s.encoder
        WHERE s.scorer = 'reward_model' AND c.cluster_id = {cluster}"""
    ).fetchone()
    first_pair = max((p for p in pairs if p[0] == cluster), key=lambda p: p[3] - p[4])
    assert first_pair[3] == pytest.approx(best) and first_pair[4] == pytest.approx(worst)
    # winners beat losers on the planted quality (measured by evaluation code only)
    assert 0.0 <= meta["winner_has_higher_planted_quality/reward_model"].value <= 1.0
    export = settings.lake().read_table(prefs.PICKAPIC)
    assert export.num_rows == meta["exported_pairs"].value == len(pairs)
    assert set(export.column("label_0").to_pylist()) <= {0.0, 1.0}


def test_dpo_lora_loads_into_the_trained_base_and_reports_generation(stage):
    from ml.diffusion import is_tiny
    from ml.dpo import generate

    settings, first, _ = stage
    [base] = mats(first, "diffusion_base")
    assert base.metadata["tiny_model"].value is True and base.metadata["steps"].value > 0
    [mat] = mats(first, "dpo_lora")
    meta = mat.metadata
    assert meta["tiny_model"].value is True and "tiny" in meta["note"].value
    assert meta["steps"].value > 0 and meta["train_pairs"].value >= 2
    for name in ("clip_score_before", "clip_score_after", "reward_before", "reward_after"):
        assert np.isfinite(meta[name].value), name
    assert "data:image/png;base64," in meta["implicit_accuracy"].value
    lora = latest_artifact(settings.lake(), "dpo_lora")
    base_artifact = latest_artifact(settings.lake(), "diffusion_base")
    assert lora is not None and base_artifact is not None
    assert lora.base_model == base_artifact.path and is_tiny(base_artifact.path)
    assert any(name.endswith(".safetensors") for name in lora.files)
    before = generate(base_artifact.path, ["a test prompt"], steps=2)
    after = generate(base_artifact.path, ["a test prompt"], lora_folder=lora.path, steps=2)
    assert np.asarray(before[0]).shape == np.asarray(after[0]).shape
    con = connect_readonly(settings.catalog_path(), settings.lake())
    names = {r[0] for r in con.execute("SELECT DISTINCT name FROM artifacts").fetchall()}
    assert {"clip_encoder", "reward_model", "diffusion_base", "dpo_lora"} <= names


# -- what a user can get wrong -----------------------------------------------------------------


def run(settings, preferences: PreferencesResource, *assets: str):
    from pipelines.definitions import build_definitions

    resources = PipelineResources(
        settings, encoder=EncoderResource(device="cpu", workers=0), preferences=preferences
    )
    defs = build_definitions(resources)
    return dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=dg.AssetSelection.assets(*assets),
        resources=resources.as_dict(),
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def failure_text(result) -> str:
    return "\n".join(
        str(e.event_specific_data.error) for e in result.all_events if e.is_step_failure
    )


def test_a_missing_hpsv2_checkpoint_is_an_error_naming_it(stage, tmp_path):
    settings, _, _ = stage
    missing = tmp_path / "HPS_v2_compressed.pt"
    result = run(settings, PreferencesResource(hpsv2_checkpoint=str(missing)), "image_scores")
    assert not result.success
    assert str(missing) in failure_text(result)


def test_pairs_by_hpsv2_without_a_checkpoint_is_an_error(stage):
    settings, _, _ = stage
    result = run(settings, PreferencesResource(pair_scorer="hpsv2"), "preference_pairs")
    assert not result.success
    assert "IMAGEGEM_HPSV2_CHECKPOINT" in failure_text(result)


def test_an_unknown_pair_scorer_is_an_error(stage):
    settings, _, _ = stage
    result = run(settings, PreferencesResource(pair_scorer="aesthetics"), "preference_pairs")
    assert not result.success
    assert "IMAGEGEM_PAIR_SCORER='aesthetics'" in failure_text(result)


@pytest.mark.parametrize("layout", ["missing", "not diffusers", "pickle weights"])
def test_a_bad_configured_base_is_an_error_naming_it_and_nothing_is_unpickled(
    stage, tmp_path, layout
):
    settings, _, _ = stage
    base = tmp_path / "sd15"
    marker = tmp_path / "unpickled"
    if layout == "not diffusers":
        base.mkdir()
        (base / "readme.txt").write_text("not a pipeline")
    if layout == "pickle weights":
        from ml.diffusion import build_tiny_pipeline

        build_tiny_pipeline(base)
        unet = base / "unet"
        for weights in unet.glob("*.safetensors"):
            weights.unlink()

        class Payload:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        (unet / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    result = run(settings, PreferencesResource(dpo_base=str(base)), "diffusion_base")
    assert not result.success
    assert str(base) in failure_text(result)
    assert not marker.exists()
