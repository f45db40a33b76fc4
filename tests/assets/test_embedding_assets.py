"""The embeddings stage end to end on a small sample served by the fake Civitai (the ``stage``
world of conftest.py): the encoder trained and recorded, every shard embedded, vectors
queryable in the catalog, a refresh that embeds only new images, bad images quarantined, and
the quality evaluation against truth."""

from __future__ import annotations

import io
import shutil

import dagster as dg
import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from pipelines.partitions import embedding_shards
from pipelines.resources import EncoderResource, PipelineResources, WarehouseResource
from tests.assets.conftest import mats
from warehouse import embeddings as emb
from warehouse.artifacts import latest_artifact
from warehouse.catalog import connect_readonly
from warehouse.media import MediaStore

pytestmark = pytest.mark.slow


def test_every_run_succeeds_and_every_shard_ran(stage):
    _, first, second = stage
    assert first and all(r.success for r in first)
    assert second and all(r.success for r in second)
    shard_runs = [r for r in first if r.dagster_run.job_name == "embed_images"]
    assert sorted(r.dagster_run.tags["dagster/partition"] for r in shard_runs) == sorted(
        embedding_shards.get_partition_keys()
    )


def test_encoder_trained_recorded_and_flagged_tiny(stage):
    settings, first, _ = stage
    [mat] = mats(first, "clip_encoder")
    meta = mat.metadata
    assert meta["tiny_model"].value is True
    assert meta["steps"].value > 0
    assert "data:image/png;base64," in meta["loss_curve"].value
    artifact = latest_artifact(settings.lake(), "clip_encoder")
    assert artifact is not None and artifact.tiny_model
    assert artifact.tag == meta["encoder"].value
    checkpoint = artifact.file(artifact.config["checkpoint_file"])
    assert checkpoint.endswith(".safetensors")


def test_vectors_are_unit_norm_and_keyed_by_encoder_in_the_catalog(stage):
    settings, first, _ = stage
    tag = mats(first, "clip_encoder")[0].metadata["encoder"].value
    con = connect_readonly(settings.catalog_path(), settings.lake())
    ok = con.execute("SELECT count(*) FROM image_files WHERE status = 'ok'").fetchone()[0]
    rows = con.execute(
        "SELECT count(*), count(DISTINCT imageId), min(encoder), max(encoder), "
        "max(abs(list_sum(list_transform(embedding::FLOAT[], lambda x: x * x)) - 1)) "
        "FROM image_embeddings"
    ).fetchone()
    n, distinct, lo, hi, worst = rows
    quarantined = con.execute(
        "SELECT count(*) FROM quarantine WHERE step = 'image_embeddings'"
    ).fetchone()[0]
    assert n == distinct and n + quarantined == ok
    assert lo == hi == tag
    assert worst < 1e-4
    dtype = con.execute("SELECT typeof(embedding) FROM image_embeddings LIMIT 1").fetchone()[0]
    assert dtype.startswith("FLOAT[") and dtype != "FLOAT[]"
    # vectors join to the release tables: an image's nearest prompt by cosine, in SQL
    joined = con.execute(
        "SELECT count(*) FROM image_embeddings e JOIN images i USING (imageId)"
    ).fetchone()[0]
    assert joined >= n
    n_prompts = con.execute("SELECT count(*) FROM prompts").fetchone()[0]
    assert con.execute("SELECT count(*) FROM prompt_embeddings").fetchone()[0] == n_prompts
    loras = con.execute("SELECT count(*), min(n_images) FROM lora_embeddings").fetchone()
    assert loras[0] > 0 and loras[1] >= 1
    assert con.execute("SELECT count(*) FROM artifacts").fetchone()[0] >= 2


def test_refresh_embeds_only_the_new_images(stage):
    settings, first, second = stage
    before = sum(m.metadata["embedded"].value for m in mats(first, "image_embeddings"))
    again = mats(second, "image_embeddings")
    assert again, "the second day downloaded more images, so some shard has new work"
    new = sum(m.metadata["embedded"].value for m in again)
    carried = sum(m.metadata["carried_over"].value for m in again)
    con = connect_readonly(settings.catalog_path(), settings.lake())
    total = con.execute("SELECT count(*) FROM image_embeddings").fetchone()[0]
    assert 0 < new < total
    assert carried + new == sum(m.metadata["dagster/row_count"].value for m in again)
    assert before + new == total
    # the encoder was not retrained by the refresh (its retrain is a weekly cron)
    assert len({m.metadata["encoder"].value for m in mats(second, "image_embeddings")}) == 1


def test_index_recall_and_similar_images(stage):
    settings, first, _ = stage
    [mat] = mats(first, "image_index")
    assert mat.metadata["recall_at_10_vs_exact"].value >= 0.9


def test_prompt_clusters_and_map(stage):
    settings, first, _ = stage
    [clusters] = mats(first, "prompt_clusters")
    assert clusters.metadata["dagster/row_count"].value > 0
    assert 0.0 <= clusters.metadata["noise_share"].value <= 1.0
    [emap] = mats(first, "embedding_map")
    assert "data:image/png;base64," in emap.metadata["map"].value


def test_evaluation_reports_quality_against_truth(stage):
    _, first, _ = stage
    [evaluation] = mats(first, "embedding_eval")
    meta = evaluation.metadata
    assert meta["holdout_images"].value > 0
    assert 0.0 <= meta["image_style_knn"].value <= 1.0
    assert 0.0 <= meta["image_style_knn_init"].value <= 1.0
    assert meta["prompts"].value > 0
    assert "data:image/png;base64," in meta["map_by_planted_style"].value


def test_a_damaged_image_is_quarantined_and_the_shard_finishes(stage, tmp_path):
    """A stored image whose bytes no longer decode: its shard still finishes, the image is
    quarantined with the reason, the other new images are embedded. Runs on a copy of the
    shared world (the other modules' tests read it afterwards)."""
    shared, _, _ = stage
    settings = WarehouseResource(
        home=str(tmp_path / "home"), source=shared.source, release_path=shared.release_path
    )
    shutil.copytree(shared.home, settings.home)
    lake = settings.lake()
    files = lake.read_table("image_files")  # the copy's files, not the shared world's
    column = files.schema.get_field_index("path")
    moved = pc.replace_substring(files.column("path"), shared.home, settings.home)
    lake.write_table("image_files", files.set_column(column, "path", moved))
    con = settings.duck()
    shard = 0
    victim = con.execute(
        f"SELECT imageId, path FROM {lake.scan('image_files')} "
        f"WHERE status = 'ok' AND {emb.shard_sql('imageId', len(embedding_shards.get_partition_keys()))} = {shard} "
        "ORDER BY imageId LIMIT 1"
    ).fetchone()
    assert victim is not None
    # drop the victim from the shard table so the next run selects it again, then damage it
    table = emb.shard_table(shard)
    kept = lake.read_table(table)
    kept = kept.filter(np.array(kept.column("imageId").to_pylist()) != victim[0])
    lake.write_table(table, kept)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "JPEG")
    with open(victim[1], "wb") as f:
        f.write(buffer.getvalue()[:200])  # truncated
    resources = PipelineResources(
        settings, encoder=EncoderResource(device="cpu", train_seconds=8, workers=0)
    )
    from pipelines.definitions import build_definitions
    from pipelines.jobs import embed_images_job

    result = (
        build_definitions(resources)
        .resolve_job_def(embed_images_job.name)
        .execute_in_process(
            partition_key=f"shard-{shard:02d}", instance=dg.DagsterInstance.ephemeral()
        )
    )
    assert result.success
    [mat] = result.asset_materializations_for_node("image_embeddings")
    assert mat.metadata["quarantined"].value == 1
    assert mat.metadata["embedded"].value == 0
    reasons = lake.read_table(emb.shard_quarantine_table(shard)).column("reason").to_pylist()
    assert reasons == ["truncated image"]
    assert MediaStore(lake).exists(victim[1]) and victim[1].startswith(settings.home)
