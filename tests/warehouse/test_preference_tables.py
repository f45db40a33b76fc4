"""The preference stage's tables: image_scores rows and the Pick-a-Pic-style export."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from warehouse.lake import Lake
from warehouse.preferences import (
    PICKAPIC,
    PICKAPIC_SCHEMA,
    PREFERENCE_PAIRS_SCHEMA,
    image_scores_table,
    write_pickapic,
)


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def pairs_table(rows: list[tuple[int, int, int]]) -> pa.Table:
    """(cluster, winner, loser) → preference_pairs rows."""
    return pa.Table.from_pylist(
        [
            {
                "cluster_id": c,
                "prompt_id": f"p{w}",
                "winner_imageId": w,
                "loser_imageId": lo,
                "winner_score": 1.0,
                "loser_score": 0.0,
                "margin": 1.0,
                "scorer": "reward_model",
                "loser_prompt_id": f"p{lo}",
                "encoder": "enc",
            }
            for c, w, lo in rows
        ],
        schema=PREFERENCE_PAIRS_SCHEMA,
    )


def test_image_scores_rows_per_scorer_with_nan_as_null():
    table = image_scores_table(
        np.array([1, 2, 3]),
        "enc@x",
        {"reward_model": np.array([0.5, np.nan, -1.0]), "clip_score": np.array([0.1, 0.2, 0.3])},
        {"reward_model": True},
    )
    assert table.num_rows == 6
    rows = {(r["imageId"], r["scorer"]): r for r in table.to_pylist()}
    assert rows[(2, "reward_model")]["score"] is None
    assert rows[(3, "reward_model")]["score"] == -1.0
    assert rows[(1, "reward_model")]["tiny_model"] and not rows[(1, "clip_score")]["tiny_model"]
    with pytest.raises(ValueError, match=r"\(2,\) scores for 3 images"):
        image_scores_table(np.array([1, 2, 3]), "e", {"s": np.zeros(2)}, {})


def test_pickapic_export_opens_with_datasets_and_labels_the_winner(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # read at import: nothing may go online
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    lake = Lake(str(tmp_path / "lake"))
    colours = {i: (6 * i, 0, 0) for i in range(1, 41)}
    files = {i: jpeg(c) for i, c in colours.items()}
    files.pop(40)  # one image file is missing: that pair is left out, counted
    rows = [(c, 2 * c + 1, 2 * c + 2) for c in range(20)]
    captions = {f"p{w}": f"a prompt {w}" for _, w, _ in rows}
    path, written, missing = write_pickapic(
        lake, pairs_table(rows), captions, files.get, rows_per_shard=8
    )
    assert (written, missing) == (19, 1)
    shards = sorted(p.name for p in (tmp_path / "lake" / PICKAPIC).rglob("part-*.parquet"))
    assert len(shards) == 3  # 19 pairs in shards of 8
    data = datasets.load_dataset("parquet", data_files=f"{path}/*.parquet", split="train")
    assert data.num_rows == 19
    assert set(PICKAPIC_SCHEMA.names) <= set(data.column_names)
    firsts = 0
    for row in data:
        winner = int(row["best_image_uid"])
        first_is_winner = row["label_0"] == 1.0
        firsts += first_is_winner
        assert row["label_0"] + row["label_1"] == 1.0
        assert int(row["image_0_uid" if first_is_winner else "image_1_uid"]) == winner
        shown = row["jpg_0" if first_is_winner else "jpg_1"]
        red = Image.open(io.BytesIO(shown)).convert("RGB").getpixel((8, 8))[0]
        assert abs(red - 6 * winner) <= 2  # the bytes are the winner's image
        assert row["caption"] == f"a prompt {winner}"
    assert 3 <= firsts <= 16  # the winner's side is mixed, not always jpg_0


def test_pickapic_export_of_no_pairs_is_an_empty_table(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    path, written, missing = write_pickapic(lake, pairs_table([]), {}, lambda i: None)
    assert (written, missing) == (0, 0)
    assert lake.read_table(PICKAPIC).num_rows == 0
    assert lake.read_table(PICKAPIC).schema.equals(PICKAPIC_SCHEMA)


def _scoring_world(tmp_path, image_ids, embedded_ids):
    """A lake with `images` (one prompt per image, two prompts in all), vectors of
    ``embedded_ids``, prompt vectors for the first prompt only and a cluster for it."""
    from datetime import datetime

    from warehouse import embeddings as emb
    from warehouse.duck import connect
    from warehouse.preferences import REACTIONS
    from warehouse.sqlfiles import install_macros

    lake = Lake(str(tmp_path / "lake"))
    con = connect(lake)
    install_macros(con)
    prompts = ["a red fox", "A  blue whale"]
    rows = {
        "imageId": pa.array(image_ids, pa.int64()),
        "prompt": [prompts[i % 2] for i in image_ids],
        "userHash": ["a" * 64] * len(image_ids),
        "createdAt": pa.array([datetime(2026, 1, 1 + i % 20) for i in image_ids]),
        **{
            c: pa.array([i * (k + 1) for i in image_ids], pa.int64())
            for k, c in enumerate(REACTIONS)
        },
    }
    lake.write_table("images", pa.table(rows))
    vecs = np.eye(4, dtype=np.float32)[[i % 4 for i in embedded_ids]]
    lake.write_table(
        emb.shard_table(0),
        emb.vectors_table(
            emb.image_embeddings_schema(4), embedded_ids, "enc", vecs, sha256=["x"] * len(vecs)
        ),
    )
    [pid] = con.execute("SELECT prompt_id(normalize_prompt(?))", [prompts[0]]).fetchone()
    lake.write_table(
        emb.PROMPT_EMBEDDINGS,
        emb.vectors_table(
            emb.prompt_embeddings_schema(4),
            [pid],
            "enc",
            np.eye(4, dtype=np.float32)[:1],
            truncated=[False],
        ),
    )
    lake.write_table(
        "prompt_clusters",
        pa.table({"prompt_id": [pid], "encoder": ["enc"], "cluster_id": pa.array([3], pa.int64())}),
    )
    return lake, con


def test_scoring_inputs_align_rows_and_count_what_they_leave_out(tmp_path):
    from warehouse.preferences import scoring_inputs

    # images 1..8 were embedded; 7 and 8 have since been deleted from `images`
    lake, con = _scoring_world(tmp_path, [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8])
    inputs = scoring_inputs(con, lake, "enc")
    # even ids have the first prompt (vector + cluster 3); odd ids lack a prompt vector
    assert inputs.image_ids.tolist() == [2, 4, 6]
    assert inputs.no_longer_in_images == 2 and inputs.without_prompt_vector == 3
    assert inputs.cluster_ids.tolist() == [3, 3, 3] and inputs.unclustered == 0
    assert inputs.image_vectors.shape == inputs.prompt_vectors.shape == (3, 4)
    assert np.allclose(inputs.image_vectors, np.eye(4)[[2, 0, 2]])
    assert inputs.reactions["heartCount"].tolist() == [4, 8, 12]
    assert inputs.paths == [None, None, None]  # no image_files table yet
    assert len(scoring_inputs(con, lake, "another-encoder")) == 0


def test_scoring_inputs_before_the_embeddings_say_what_to_run(tmp_path):
    from warehouse.duck import connect
    from warehouse.preferences import scoring_inputs

    lake = Lake(str(tmp_path / "lake"))
    with pytest.raises(ValueError, match="materialize the embeddings stage first"):
        scoring_inputs(connect(lake), lake, "enc")
