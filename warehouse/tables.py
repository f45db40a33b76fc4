"""The normalised warehouse tables derived from the clean ``images`` and ``models``.

Each builder is one DuckDB query over the committed clean tables, written to a new committed
lake version, and returns the number of rows written. Keys:

* ``users(userHash)`` — per user activity, uploader or not;
* ``loras(modelVersionId)`` — one row per LoRA model version, its primary file;
* ``image_loras(imageId, modelVersionId)`` — the LoRAs each image used, with the weight of
  the matching ``<lora:name:w>`` prompt tag (multi-LoRA images have several rows);
* ``prompts(prompt_id)`` — distinct normalised prompts;
* ``interactions(userHash, item_kind, item_id, kind)`` — user → item events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import duckdb

from warehouse.duck import copy_to_parquet, quote
from warehouse.lake import Lake
from warehouse.sqlfiles import install_macros


def _src(lake: Lake, table: str) -> str:
    return f"read_parquet({quote(lake.glob(table))})"


def users_sql(lake: Lake) -> str:
    images, models = _src(lake, "images"), _src(lake, "models")
    return f"""
    WITH img AS (
        SELECT userHash, count(*) AS n_image_rows, count(DISTINCT imageId) AS n_images,
               count(DISTINCT modelVersionId) AS n_loras_used,
               min(createdAt) AS first_image_at, max(createdAt) AS last_image_at
        FROM {images} GROUP BY userHash
    ), upl AS (
        SELECT userHash, count(DISTINCT modelVersionId) AS n_loras_uploaded,
               min(publishedAt) AS first_upload_at
        FROM {models} GROUP BY userHash
    )
    SELECT userHash,
           coalesce(n_image_rows, 0) AS n_image_rows, coalesce(n_images, 0) AS n_images,
           coalesce(n_loras_used, 0) AS n_loras_used,
           coalesce(n_loras_uploaded, 0) AS n_loras_uploaded,
           coalesce(n_loras_uploaded, 0) > 0 AS is_uploader,
           least(first_image_at, first_upload_at) AS first_seen_at,
           last_image_at
    FROM img FULL OUTER JOIN upl USING (userHash)
    ORDER BY userHash
    """


def loras_sql(lake: Lake) -> str:
    images, models = _src(lake, "images"), _src(lake, "models")
    return f"""
    WITH files AS (
        SELECT *, count(*) OVER (PARTITION BY modelVersionId) AS n_files,
               row_number() OVER (PARTITION BY modelVersionId
                                  ORDER BY "primary" DESC NULLS LAST, fileId) AS rank
        FROM {models}
    ), usage AS (
        SELECT modelVersionId, count(*) AS n_image_rows, count(DISTINCT userHash) AS n_users
        FROM {images} GROUP BY modelVersionId
    )
    SELECT modelVersionId, modelId, modelName, modelVersionName, baseModel, baseModelType,
           fileId, fileName, lora_name(fileName) AS lora_name, format, fileType, fp, sizeKB,
           hashSHA256, hashAutoV2, downloadUrl,
           coalesce("primary", 0) = 1 AS has_primary_file, n_files,
           list_filter(list_transform(string_split(coalesce(tags, ''), ','), lambda t: trim(t)),
                       lambda t: t <> '') AS tags,
           list_filter(list_transform(string_split(coalesce(trainedWords, ''), ','), lambda t: trim(t)),
                       lambda t: t <> '') AS trained_words,
           publishedAt, userHash, modelNsfwLevel, modelVersionNsfwLevel,
           downloadCount, ratingCount, rating, thumbsUpCount, thumbsDownCount,
           coalesce(u.n_image_rows, 0) AS n_image_rows, coalesce(u.n_users, 0) AS n_users
    FROM files LEFT JOIN usage u USING (modelVersionId)
    WHERE rank = 1
    ORDER BY modelVersionId
    """


def image_loras_sql(lake: Lake) -> str:
    images, loras = _src(lake, "images"), _src(lake, "loras")
    # The tag of a row's LoRA is found by plain substring search on `<lora:NAME:` (case-
    # insensitive), not by extracting every tag with a regex: 5x faster on millions of rows.
    # Its weight follows the same rule as the lora_tag_weights macro (first weight, default 1).
    return f"""
    WITH per_image AS (SELECT imageId, count(*) AS n_loras FROM {images} GROUP BY imageId),
    rows AS (
        SELECT i.imageId, i.modelVersionId, l.lora_name, lower(i.prompt) AS p,
               '<lora:' || lower(l.lora_name) AS tag
        FROM {images} i LEFT JOIN {loras} l USING (modelVersionId)
    ),
    found AS (
        SELECT *, contains(p, tag || ':') OR contains(p, tag || '>') AS tag_in_prompt,
               split_part(split_part(split_part(p, tag || ':', 2), '>', 1), ':', 1) AS weight_text
        FROM rows
    )
    SELECT f.imageId, f.modelVersionId, pi.n_loras, f.lora_name,
           CASE WHEN f.tag_in_prompt THEN coalesce(try_cast(nullif(f.weight_text, '') AS DOUBLE), 1.0)
           END AS tag_weight,
           coalesce(f.tag_in_prompt, false) AS tag_in_prompt
    FROM found f JOIN per_image pi USING (imageId)
    """


def prompts_sql(lake: Lake) -> list[str]:
    images = _src(lake, "images")
    # Aggregate per raw prompt first (an image has one prompt), normalise only the distinct
    # raw prompts, then fold raw variants into their normalised prompt. Steps go through temp
    # tables (one big CTE query plans 2-3x slower) and join on 64-bit hashes of the texts.
    return [
        f"""CREATE OR REPLACE TEMP TABLE _per_raw AS
        SELECT hash(prompt) AS h, any_value(prompt) AS prompt, count(DISTINCT imageId) AS n_images,
               min(createdAt) AS first_seen_at, max(createdAt) AS last_seen_at
        FROM {images} WHERE prompt IS NOT NULL GROUP BY 1""",
        # normalize_prompt is a macro: referencing its alias again (filter, hash) would
        # re-expand it, so it is materialised alone first.
        "CREATE OR REPLACE TEMP TABLE _keyed AS SELECT *, normalize_prompt(prompt) AS normalized FROM _per_raw",
        "CREATE OR REPLACE TEMP TABLE _keyed AS SELECT *, hash(normalized) AS nh FROM _keyed WHERE normalized IS NOT NULL",
        f"""CREATE OR REPLACE TEMP TABLE _n_users AS
        SELECT k.nh, count(DISTINCT pu.u) AS n_users
        FROM (SELECT DISTINCT hash(prompt) AS h, hash(userHash) AS u
              FROM {images} WHERE prompt IS NOT NULL) pu
        JOIN _keyed k USING (h) GROUP BY k.nh""",
        """SELECT prompt_id(normalized) AS prompt_id, normalized AS prompt, n_images, n_users,
               n_raw_variants, first_seen_at, last_seen_at, example_raw_prompt
        FROM (
            SELECT nh, any_value(normalized) AS normalized, sum(n_images)::BIGINT AS n_images,
                   count(*) AS n_raw_variants, min(first_seen_at) AS first_seen_at,
                   max(last_seen_at) AS last_seen_at, any_value(prompt) AS example_raw_prompt
            FROM _keyed GROUP BY nh
        ) JOIN _n_users USING (nh)""",
    ]


def interactions_sql(lake: Lake) -> str:
    images, models = _src(lake, "images"), _src(lake, "models")
    return f"""
    SELECT userHash, 'lora' AS item_kind, modelVersionId AS item_id, 'generated_with' AS kind,
           count(DISTINCT imageId) AS n_events, min(createdAt) AS first_at, max(createdAt) AS last_at
    FROM {images} GROUP BY ALL
    UNION ALL
    SELECT userHash, 'image', imageId, 'created', 1, min(createdAt), max(createdAt)
    FROM {images} GROUP BY ALL
    UNION ALL
    SELECT userHash, 'lora', modelVersionId, 'uploaded', 1, min(publishedAt), min(publishedAt)
    FROM {models} GROUP BY ALL
    """


@dataclass(frozen=True)
class DerivedTable:
    """A normalised table: its name, key columns and SQL builder."""

    name: str
    key: tuple[str, ...]
    sql: Callable[[Lake], str | list[str]]  # preparatory statements, then the final SELECT
    needs: tuple[str, ...]
    description: str


DERIVED: dict[str, DerivedTable] = {
    t.name: t
    for t in (
        DerivedTable(
            "users",
            ("userHash",),
            users_sql,
            ("images", "models"),
            "One row per user (images ∪ uploads): activity counts, uploader flag, first/last seen.",
        ),
        DerivedTable(
            "loras",
            ("modelVersionId",),
            loras_sql,
            ("images", "models"),
            "One row per LoRA model version: its primary file, tags and trained words as lists, "
            "uploader, and how many image rows and users used it.",
        ),
        DerivedTable(
            "image_loras",
            ("imageId", "modelVersionId"),
            image_loras_sql,
            ("images", "loras"),
            "The LoRAs each image used (multi-LoRA images have several rows), with the weight of "
            "the matching `<lora:name:w>` tag parsed from the prompt.",
        ),
        DerivedTable(
            "prompts",
            ("prompt_id",),
            prompts_sql,
            ("images",),
            "Distinct normalised prompts (LoRA tags removed, lower case, whitespace tidied) with "
            "usage counts; prompt_id = first 16 hex of SHA-256 of the normalised text.",
        ),
        DerivedTable(
            "interactions",
            ("userHash", "item_kind", "item_id", "kind"),
            interactions_sql,
            ("images", "models"),
            "User → item events: generated_with (user, LoRA), created (user, image), uploaded "
            "(user, LoRA). The release carries reaction counts only, so no per-user reactions.",
        ),
    )
}


def build_derived(con: duckdb.DuckDBPyConnection, lake: Lake, name: str) -> int:
    """Write the derived table ``name`` as a new committed version; returns its row count."""
    table = DERIVED[name]
    install_macros(con)
    statements = table.sql(lake)
    *prepare, final = [statements] if isinstance(statements, str) else statements
    for statement in prepare:
        con.execute(statement)
    with lake.writing(name) as version:
        copy_to_parquet(con, final, version.part(0))
    for (temp,) in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE temporary AND starts_with(table_name, '_')"
    ).fetchall():
        con.execute(f'DROP TABLE "{temp}"')
    return con.execute(f"SELECT count(*) FROM {_src(lake, name)}").fetchone()[0]


def duplicate_keys(
    con: duckdb.DuckDBPyConnection, lake: Lake, table: str, key: tuple[str, ...]
) -> int:
    """How many key values occur more than once in a committed table (0 when the key holds)."""
    cols = ", ".join(f'"{k}"' for k in key)
    return con.execute(
        f"SELECT count(*) FROM (SELECT {cols} FROM {_src(lake, table)} GROUP BY ALL HAVING count(*) > 1)"
    ).fetchone()[0]
