"""The normalised warehouse tables derived from the clean ``images`` and ``models``.

Each builder is one DuckDB query (``prompts``: a few statements through temp tables) over the
committed tables it ``needs`` (clean tables, or derived tables listed before it in
``DERIVED``), written to a new committed lake version; ``build_derived`` returns the number of
rows written. Keys:

* ``interactions(userHash, item_kind, item_id, kind)`` — user → item events;
* ``users(userHash)`` — per user activity, uploader or not (aggregated from interactions);
* ``loras(modelVersionId)`` — one row per LoRA model version, its primary file;
* ``image_loras(imageId, modelVersionId)`` — the LoRAs each image used, with the weight of
  the matching ``<lora:name:w>`` prompt tag (multi-LoRA images have several rows);
* ``prompts(prompt_id)`` — distinct normalised prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import duckdb

from warehouse.duck import copy_to_parquet
from warehouse.lake import Lake
from warehouse.sqlfiles import install_macros


def users_sql(lake: Lake) -> str:
    # Every user count is an aggregate of the user's interactions (already grouped per user
    # and item: 2x fewer rows than images, no second scan of images or models). Exact since
    # the clean tables' keys and userHash are not null: n_events counts the image rows.
    return f"""
    SELECT userHash,
           coalesce(sum(n_events) FILTER (kind = 'generated_with'), 0)::BIGINT AS n_image_rows,
           count(*) FILTER (kind = 'created') AS n_images,
           count(*) FILTER (kind = 'generated_with') AS n_loras_used,
           count(*) FILTER (kind = 'uploaded') AS n_loras_uploaded,
           count(*) FILTER (kind = 'uploaded') > 0 AS is_uploader,
           min(first_at) AS first_seen_at,
           max(last_at) FILTER (kind = 'generated_with') AS last_image_at
    FROM {lake.scan("interactions")}
    GROUP BY userHash
    ORDER BY userHash
    """


def loras_sql(lake: Lake) -> str:
    models, interactions = lake.scan("models"), lake.scan("interactions")
    return f"""
    WITH files AS (
        SELECT *, count(*) OVER (PARTITION BY modelVersionId) AS n_files,
               row_number() OVER (PARTITION BY modelVersionId
                                  ORDER BY "primary" DESC NULLS LAST, fileId) AS rank
        FROM {models}
    ), usage AS (  -- one generated_with interaction per (user, LoRA), n_events image rows
        SELECT item_id AS modelVersionId, sum(n_events)::BIGINT AS n_image_rows,
               count(*) AS n_users
        FROM {interactions} WHERE kind = 'generated_with' GROUP BY item_id
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
    images, loras = lake.scan("images"), lake.scan("loras")
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
    images = lake.scan("images")
    # Texts are handled once each: the distinct raw prompts are normalised (2.9M of 4.8M rows
    # at full scale); everything else runs on 64-bit hashes of the texts (h: raw prompt,
    # nh: normalised prompt, u: user) and joins back to the texts only for the output. Steps
    # go through temp tables: one big CTE query plans 2-3x slower.
    return [
        # One row per (raw prompt, image, user): n_images, n_users and first/last seen come
        # from here, without a count(DISTINCT) (2-3x slower in DuckDB).
        f"""CREATE OR REPLACE TEMP TABLE _prompt_images AS
        SELECT hash(prompt) AS h, imageId, hash(userHash) AS u,
               min(createdAt) AS first_at, max(createdAt) AS last_at
        FROM {images} WHERE prompt IS NOT NULL GROUP BY ALL""",
        # normalize_prompt is a macro: a filter on its alias would re-expand it (4x slower),
        # so NULL results are filtered only in the next steps, from the materialised table.
        f"""CREATE OR REPLACE TEMP TABLE _raw_prompts AS
        SELECT h, prompt, normalized, hash(normalized) AS nh
        FROM (SELECT hash(prompt) AS h, prompt, normalize_prompt(prompt) AS normalized
              FROM (SELECT DISTINCT prompt FROM {images} WHERE prompt IS NOT NULL))""",
        """CREATE OR REPLACE TEMP TABLE _prompt_rows AS
        SELECT k.nh, p.* FROM _prompt_images p
        JOIN (SELECT h, nh FROM _raw_prompts WHERE normalized IS NOT NULL) k USING (h)""",
        """CREATE OR REPLACE TEMP TABLE _prompt_stats AS
        WITH per_image AS (
            SELECT nh, count(imageId) AS n_images, min(first_at) AS first_seen_at,
                   max(last_at) AS last_seen_at
            FROM (SELECT nh, h, imageId, min(first_at) AS first_at, max(last_at) AS last_at
                  FROM _prompt_rows GROUP BY nh, h, imageId)
            GROUP BY nh
        ), per_user AS (
            SELECT nh, count(*) AS n_users FROM (SELECT DISTINCT nh, u FROM _prompt_rows) GROUP BY nh
        ), variants AS (
            -- the example raw prompt is the variant with the smallest hash (deterministic)
            SELECT nh, count(*) AS n_raw_variants, min(h) AS example_h
            FROM _raw_prompts WHERE normalized IS NOT NULL GROUP BY nh
        )
        SELECT * FROM variants JOIN per_image USING (nh) JOIN per_user USING (nh)""",
        """SELECT prompt_id(k.normalized) AS prompt_id, k.normalized AS prompt, s.n_images,
               s.n_users, s.n_raw_variants, s.first_seen_at, s.last_seen_at,
               k.prompt AS example_raw_prompt
        FROM _prompt_stats s JOIN _raw_prompts k ON k.h = s.example_h""",
    ]


def interactions_sql(lake: Lake) -> str:
    images, models = lake.scan("images"), lake.scan("models")
    # n_events of generated_with counts the user's images with that LoRA: count(*), since
    # (imageId, modelVersionId) is the key of the clean images (unique and not null; checked
    # by its unique_key check). count(DISTINCT imageId) gave the same, 3x slower.
    return f"""
    SELECT userHash, 'lora' AS item_kind, modelVersionId AS item_id, 'generated_with' AS kind,
           count(*) AS n_events, min(createdAt) AS first_at, max(createdAt) AS last_at
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


# In build order: users and loras aggregate interactions; image_loras reads loras.
DERIVED: dict[str, DerivedTable] = {
    t.name: t
    for t in (
        DerivedTable(
            "interactions",
            ("userHash", "item_kind", "item_id", "kind"),
            interactions_sql,
            ("images", "models"),
            "User → item events: generated_with (user, LoRA), created (user, image), uploaded "
            "(user, LoRA). The release carries reaction counts only, so no per-user reactions.",
        ),
        DerivedTable(
            "users",
            ("userHash",),
            users_sql,
            ("interactions",),
            "One row per user (images ∪ uploads): activity counts, uploader flag, first/last seen.",
        ),
        DerivedTable(
            "loras",
            ("modelVersionId",),
            loras_sql,
            ("models", "interactions"),
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
    return con.execute(f"SELECT count(*) FROM {lake.scan(name)}").fetchone()[0]


def duplicate_keys(
    con: duckdb.DuckDBPyConnection, lake: Lake, table: str, key: tuple[str, ...]
) -> int:
    """How many key values occur more than once in a committed table (0 when the key holds).

    Equal keys have equal hashes, so distinct hashes on every row prove the key unique; that
    one pass over the key's hash is 2-3x faster than grouping by the key columns (strings
    included). Only when hashes repeat are the key values themselves grouped and counted.
    """
    cols = ", ".join(f'"{k}"' for k in key)
    src = lake.scan(table)
    rows, hashes = con.execute(
        f"SELECT count(*), count(DISTINCT hash({cols})) FROM {src}"
    ).fetchone()
    if rows == hashes:
        return 0
    return con.execute(
        f"SELECT count(*) FROM (SELECT {cols} FROM {src} GROUP BY ALL HAVING count(*) > 1)"
    ).fetchone()[0]
