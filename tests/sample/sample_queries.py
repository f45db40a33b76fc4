"""Test helpers: load a written sample into DuckDB (release rows joined to their truth rows)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.sample.generator import read_manifest
from warehouse.paper import PAPER_RATIOS


def _read_shards(out: Path, files: list[str]) -> pa.Table:
    table = pa.concat_tables([pq.read_table(out / f) for f in files])
    return table.append_column("row_index", pa.array(np.arange(table.num_rows, dtype=np.int64)))


def connect(out: Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with views over one sample.

    Views: images / models (raw release rows in file order, plus `row_index`), the truth tables,
    and clean_images / clean_models: the rows the truth marks neither unsafe nor malformed.
    """
    manifest = read_manifest(out)
    assert manifest is not None, f"no manifest under {out}"
    con = duckdb.connect()
    tables = {
        "images": _read_shards(out, manifest["files"]["images"]),
        "models": _read_shards(out, manifest["files"]["models"]),
    }
    for name in (
        "image_truth",
        "model_truth",
        "user_tastes",
        "lora_styles",
        "raw_usernames",
        "styles",
    ):
        tables[name] = pq.read_table(out / "truth" / f"{name}.parquet")
    for name, table in tables.items():
        con.register(f"{name}_arrow", table)
        con.execute(f"create view {name} as select * from {name}_arrow")
    con.execute(
        """
        create view clean_images as
            select i.* from images i join image_truth t using (row_index)
            where t.unsafe_kind is null and t.malformed_kind is null;
        create view clean_models as
            select m.* from models m join model_truth t using (row_index)
            where t.unsafe_kind is null and t.malformed_kind is null;
        """
    )
    return con


def scalar(con: duckdb.DuckDBPyConnection, sql: str) -> object:
    """The single value a query returns."""
    row = con.execute(sql).fetchone()
    assert row is not None
    return row[0]


def shape_ratios(con: duckdb.DuckDBPyConnection) -> dict[str, float]:
    """The paper's shape ratios (the keys of ``PAPER_RATIOS``), computed the way the pipeline
    does, over the rows the truth calls clean."""
    users = scalar(
        con,
        "select count(distinct u) from (select userHash u from clean_images "
        "union select userHash from clean_models)",
    )
    uploaders = scalar(con, "select count(distinct userHash) from clean_models")
    loras = scalar(con, "select count(distinct modelVersionId) from clean_models")
    image_rows = scalar(con, "select count(*) from clean_images")
    prompts = scalar(con, "select count(distinct prompt) from clean_images")
    tags = scalar(
        con,
        "select count(distinct trim(tag)) from "
        "(select unnest(string_split(tags, ',')) as tag from clean_models)",
    )
    raw_rows = scalar(con, "select count(*) from image_truth")
    unsafe_rows = scalar(con, "select count(*) from image_truth where unsafe_kind is not null")
    ratios = {
        "users_per_uploader": users / uploaders,
        "loras_per_uploader": loras / uploaders,
        "images_per_user": image_rows / users,
        "unique_prompts_per_image": prompts / image_rows,
        "unique_tags_per_lora": tags / loras,
        "safety_removed_share": unsafe_rows / raw_rows,
    }
    assert ratios.keys() == PAPER_RATIOS.keys()
    return ratios
