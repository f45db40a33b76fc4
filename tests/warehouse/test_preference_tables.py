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
