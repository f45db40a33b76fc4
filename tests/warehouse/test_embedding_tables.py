"""Vector tables of the embeddings stage, the artifacts table and the lake helpers they use."""

from __future__ import annotations

import os

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from warehouse import embeddings as emb
from warehouse.artifacts import Artifact, artifact_tables, latest_artifact, record_artifact
from warehouse.duck import connect
from warehouse.lake import Lake
from warehouse.quarantine import QuarantineRecord, present_parts, quarantine_table

ENC = "imagegem-tiny@0123456789abcdef"


@pytest.fixture
def lake(tmp_path):
    return Lake(str(tmp_path / "lake"))


def unit(rows: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_image_files(lake: Lake, ids: list[int], failed: tuple[int, ...] = ()) -> None:
    lake.write_table(
        "image_files",
        pa.table(
            {
                "imageId": pa.array(ids, pa.int64()),
                "sha256": [f"{i:064x}" for i in ids],
                "path": [f"/m/{i}.jpeg" for i in ids],
                "status": ["failed" if i in failed else "ok" for i in ids],
            }
        ),
    )


def test_shard_sql_and_numpy_agree_and_spread_consecutive_ids():
    ids = np.arange(10_000, 10_400, dtype=np.int64)
    in_sql = duckdb.sql(
        f"SELECT {emb.shard_sql('i', 4)} FROM range(10000, 10400) t(i) ORDER BY i"
    ).fetchall()
    assert [r[0] for r in in_sql] == emb.shard_of(ids, 4).tolist()
    counts = np.bincount(emb.shard_of(ids, 4), minlength=4)
    assert counts.min() >= 80  # 100 each when perfectly balanced


def test_shard_names_round_trip_and_reject_nonsense():
    names = emb.shard_names(4)
    assert names == ["shard-00", "shard-01", "shard-02", "shard-03"]
    assert [emb.shard_index(n) for n in names] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="shard-NN"):
        emb.shard_index("3")
    with pytest.raises(ValueError, match="between 1 and 1000"):
        emb.shard_names(0)


def test_vectors_round_trip_through_parquet_as_duckdb_arrays(lake):
    con = connect(lake)
    vectors = unit(5)
    schema = emb.image_embeddings_schema(8)
    table = emb.vectors_table(schema, [5, 4, 3, 2, 1], ENC, vectors, sha256=["x"] * 5)
    lake.write_table(emb.shard_table(0), table)
    keys, back = emb.read_vectors(con, lake.scan(emb.shard_table(0)), "imageId", ENC)
    assert keys.tolist() == [1, 2, 3, 4, 5]
    assert np.array_equal(back, vectors[::-1])
    view = emb.vector_view_sql(lake.scan(emb.shard_table(0)), 8)
    dtype = con.execute(f"SELECT typeof(embedding) FROM ({view}) LIMIT 1").fetchone()[0]
    assert dtype == "FLOAT[8]"
    sim = con.execute(
        f"SELECT array_cosine_similarity(a.embedding, b.embedding) FROM ({view}) a, ({view}) b "
        "WHERE a.imageId = 1 AND b.imageId = 2"
    ).fetchone()[0]
    assert sim == pytest.approx(float(vectors[4] @ vectors[3]), abs=1e-5)


def test_incremental_refresh_embeds_only_new_images_and_carries_parts(lake):
    con = connect(lake)
    schema = emb.image_embeddings_schema(8)
    ids = list(range(100, 140))
    write_image_files(lake, ids, failed=(101,))
    shard_ids = [i for i in ids if emb.shard_of(np.array([i]), 2)[0] == 0]
    first = emb.images_to_embed(con, lake, 0, 2, ENC).column("imageId").to_pylist()
    assert first == [i for i in shard_ids if i != 101]
    with lake.writing(emb.shard_table(0)) as version:
        writer = emb.start_vector_version(con, lake, emb.shard_table(0), version, schema, ENC)
        writer.write(
            emb.vectors_table(schema, first, ENC, unit(len(first)), sha256=[str(i) for i in first])
        )
    assert emb.images_to_embed(con, lake, 0, 2, ENC).num_rows == 0
    # a new day: more downloaded images; only the new ones of the shard are selected
    write_image_files(lake, ids + list(range(140, 160)), failed=(101,))
    second = emb.images_to_embed(con, lake, 0, 2, ENC).column("imageId").to_pylist()
    assert second and min(second) >= 140
    previous = lake.current(emb.shard_table(0))
    with lake.writing(emb.shard_table(0)) as version:
        writer = emb.start_vector_version(con, lake, emb.shard_table(0), version, schema, ENC)
        assert writer.carried_rows == len(first) and writer.next_part == 1
        writer.write(
            emb.vectors_table(
                schema, second, ENC, unit(len(second), seed=1), sha256=[str(i) for i in second]
            )
        )
    keys, _ = emb.read_vectors(con, lake.scan(emb.shard_table(0)), "imageId", ENC)
    assert keys.tolist() == sorted(first + second)
    old_part = lake.parts(previous)[0]
    new_part = lake.parts(lake.current(emb.shard_table(0)))[0]
    assert os.stat(old_part).st_ino == os.stat(new_part).st_ino  # hard link, not a copy


def test_a_new_encoder_starts_the_table_afresh(lake):
    con = connect(lake)
    schema = emb.prompt_embeddings_schema(8)
    lake.write_table(
        emb.PROMPT_EMBEDDINGS,
        emb.vectors_table(schema, ["a", "b"], ENC, unit(2), truncated=[False, False]),
    )
    with lake.writing(emb.PROMPT_EMBEDDINGS) as version:
        writer = emb.start_vector_version(
            con, lake, emb.PROMPT_EMBEDDINGS, version, schema, "other@ffff"
        )
        assert writer.carried_rows == 0 and writer.next_part == 0
        writer.write(emb.vectors_table(schema, ["a"], "other@ffff", unit(1), truncated=[True]))
    assert emb.table_encoders(con, lake, emb.PROMPT_EMBEDDINGS) == ["other@ffff"]


def test_lora_means_average_normalised_image_vectors_and_count_loras_without(lake):
    con = connect(lake)
    schema = emb.image_embeddings_schema(2)
    vectors = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    lake.write_table(
        emb.shard_table(0),
        emb.vectors_table(schema, [1, 2, 3], ENC, vectors, sha256=["a", "b", "c"]),
    )
    lake.write_table(
        "image_loras",
        pa.table({"imageId": [1, 2, 3, 9], "modelVersionId": [10, 10, 20, 30]}),
    )
    lake.write_table("loras", pa.table({"modelVersionId": [10, 20, 30, 40]}))
    means = emb.lora_means(con, lake, ENC)
    assert means.model_version_ids.tolist() == [10, 20]
    assert means.n_images.tolist() == [2, 1]
    assert np.allclose(means.vectors[0], [2**-0.5, 2**-0.5])
    assert np.allclose(means.vectors[1], [1, 0])
    assert means.loras_without_images == 2  # 30 (image not embedded) and 40 (no image)


def test_lora_means_need_image_embeddings(lake):
    with pytest.raises(ValueError, match="image_embeddings first"):
        emb.lora_means(connect(lake), lake, ENC)


def test_artifacts_keep_history_and_find_the_latest(lake):
    assert latest_artifact(lake, "clip_encoder") is None
    first = record_artifact(
        lake, Artifact("clip_encoder", "open_clip", "tiny@aa", "/x", {"m.safetensors": "aa"})
    )
    second = record_artifact(
        lake,
        Artifact(
            "clip_encoder", "open_clip", "tiny@bb", "/y", metrics={"recall": 0.5}, tiny_model=True
        ),
    )
    record_artifact(lake, Artifact("image_index", "usearch", "idx", "/z"))
    assert first.code_version and first.created_at is not None
    assert latest_artifact(lake, "clip_encoder").tag == "tiny@bb"
    assert (
        latest_artifact(lake, "clip_encoder", tag="tiny@aa").file("m.safetensors")
        == "/x/m.safetensors"
    )
    assert latest_artifact(lake, "clip_encoder").metrics == {"recall": 0.5}
    assert second.tiny_model is True
    assert artifact_tables(lake) == ["artifacts/clip_encoder", "artifacts/image_index"]
    with pytest.raises(KeyError, match="no file"):
        latest_artifact(lake, "image_index").file("missing.bin")


def test_sharded_quarantine_tables_join_the_union(lake):
    record = QuarantineRecord("media", "image_embeddings", "image_files", "imageId=1", "empty file")
    lake.write_table(emb.shard_quarantine_table(3), quarantine_table([record]))
    assert "quarantine/image_embeddings/shard-03" in present_parts(lake)


def test_scan_many_needs_tables(lake):
    with pytest.raises(ValueError, match="at least one"):
        lake.scan_many([])
