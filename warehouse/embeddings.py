"""The vector tables of the embeddings stage: shapes, shards, incremental selection, writing.

Tables (lake; each a catalog view with the vector as ``FLOAT[d]``):

* ``image_embeddings(imageId, encoder, embedding, sha256, embedded_at)`` — one L2-normalised
  vector per downloaded image, stored as one lake table per shard
  (``image_embeddings/shard-03``: shards are written by separate runs, in parallel);
* ``prompt_embeddings(prompt_id, encoder, embedding, truncated, embedded_at)`` — one per
  distinct normalised prompt;
* ``lora_embeddings(modelVersionId, encoder, embedding, n_images)`` — the mean of the
  normalised vectors of the LoRA's images (as ImageGem does), re-normalised.

The key of every table includes ``encoder`` (config name + checkpoint digest). Refreshes are
incremental: a run selects only the items its encoder has not embedded yet and adds them as
new Parquet parts of a new version that carries the previous parts over
(:meth:`Lake.carry_over`, hard links locally), so a day's refresh costs what its new items
cost. A new encoder starts the table afresh: its first run embeds everything, and the vectors
of the previous encoder leave with that version (one encoder per table at a time; old versions
stay readable until pruned).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb
import numpy as np
import pyarrow as pa

from warehouse.duck import quote
from warehouse.lake import Lake, TableVersion, parquet_writer

IMAGE_EMBEDDINGS = "image_embeddings"  # folder of the shard tables
PROMPT_EMBEDDINGS = "prompt_embeddings"
LORA_EMBEDDINGS = "lora_embeddings"
IMAGE_QUARANTINE = "quarantine/image_embeddings"  # folder of the shards' quarantine tables
PROMPT_QUARANTINE = "quarantine/prompt_embeddings"
# Knuth's multiplicative hash: neighbouring imageIds (one user's uploads) land on different
# shards; the same formula in SQL and numpy, stable across DuckDB versions (hash() is not).
_SHARD_MULTIPLIER = 2654435761


def vector_type(dim: int) -> pa.DataType:
    """A fixed-size list of float32: Parquet keeps it compact, DuckDB reads it as FLOAT[dim]."""
    if dim <= 0:
        raise ValueError(f"vector dimension must be positive, got {dim}")
    return pa.list_(pa.float32(), dim)


def image_embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("imageId", pa.int64()),
            ("encoder", pa.string()),
            ("embedding", vector_type(dim)),
            ("sha256", pa.string()),
            ("embedded_at", pa.timestamp("us")),
        ]
    )


def prompt_embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("prompt_id", pa.string()),
            ("encoder", pa.string()),
            ("embedding", vector_type(dim)),
            ("truncated", pa.bool_()),
            ("embedded_at", pa.timestamp("us")),
        ]
    )


def lora_embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("modelVersionId", pa.int64()),
            ("encoder", pa.string()),
            ("embedding", vector_type(dim)),
            ("n_images", pa.int64()),
        ]
    )


# -- shards -----------------------------------------------------------------------------------


def shard_names(n_shards: int) -> list[str]:
    """Partition keys of the image shards: ``shard-00`` ... (sortable)."""
    if not 1 <= n_shards <= 1000:
        raise ValueError(f"embedding shards must be between 1 and 1000, got {n_shards}")
    return [f"shard-{i:02d}" for i in range(n_shards)]


def shard_index(name: str) -> int:
    if not name.startswith("shard-") or not name[6:].isdigit():
        raise ValueError(f"not a shard name: {name!r} (expected shard-NN)")
    return int(name[6:])


def shard_table(shard: int) -> str:
    return posixpath.join(IMAGE_EMBEDDINGS, f"shard-{shard:02d}")


def shard_quarantine_table(shard: int) -> str:
    return posixpath.join(IMAGE_QUARANTINE, f"shard-{shard:02d}")


def shard_sql(column: str, n_shards: int) -> str:
    """SQL: the shard of an integer id column."""
    return f"(CAST({column} AS HUGEINT) * {_SHARD_MULTIPLIER} % 4294967296 % {int(n_shards)})"


def shard_of(ids: np.ndarray, n_shards: int) -> np.ndarray:
    """The shard of each id (the same formula as :func:`shard_sql`)."""
    values = np.asarray(ids, dtype=np.int64).astype(object)
    return np.array([(int(v) * _SHARD_MULTIPLIER) % 4294967296 % n_shards for v in values])


# -- what to embed ----------------------------------------------------------------------------


def _embedded_ids(lake: Lake, table: str, key: str, encoder: str) -> str | None:
    """SQL of the keys ``table`` already holds for ``encoder`` (None when it has none)."""
    if lake.current(table) is None:
        return None
    return f"SELECT {key} FROM {lake.scan(table)} WHERE encoder = {quote(encoder)}"


def images_to_embed(
    con: duckdb.DuckDBPyConnection, lake: Lake, shard: int, n_shards: int, encoder: str
) -> pa.Table:
    """(imageId, sha256, path) of the shard's downloaded images that ``encoder`` has not
    embedded yet and that were not already rejected with the same content (an image whose
    bytes cannot be decoded stays in the shard's quarantine until a new download changes
    them), by imageId. Empty when nothing was downloaded."""
    if lake.current("image_files") is None:
        return pa.table({"imageId": pa.array([], pa.int64()), "sha256": [], "path": []})
    done = _embedded_ids(lake, shard_table(shard), "imageId", encoder)
    skip = f"AND imageId NOT IN ({done})" if done else ""
    rejected = shard_quarantine_table(shard)
    if lake.current(rejected) is not None:
        skip += (
            " AND (imageId, sha256) NOT IN (SELECT CAST(payload->>'imageId' AS BIGINT), "
            f"payload->>'sha256' FROM {lake.scan(rejected)})"
        )
    return con.sql(
        f"""SELECT imageId, sha256, path FROM {lake.scan("image_files")}
        WHERE status = 'ok' AND {shard_sql("imageId", n_shards)} = {int(shard)} {skip}
        ORDER BY imageId"""
    ).to_arrow_table()


def rejected_images(lake: Lake, shard: int, retried: set[int]) -> list[dict]:
    """The shard's earlier quarantine rows that still stand (their image was not retried)."""
    table = shard_quarantine_table(shard)
    if lake.current(table) is None:
        return []
    rows = lake.read_table(table).to_pylist()
    return [r for r in rows if int(r["record_key"].split("=", 1)[1]) not in retried]


def prompts_to_embed(con: duckdb.DuckDBPyConnection, lake: Lake, encoder: str) -> pa.Table:
    """(prompt_id, prompt) of the distinct normalised prompts ``encoder`` has not embedded."""
    done = _embedded_ids(lake, PROMPT_EMBEDDINGS, "prompt_id", encoder)
    skip = f"WHERE prompt_id NOT IN ({done})" if done else ""
    return con.sql(
        f"SELECT prompt_id, prompt FROM {lake.scan('prompts')} {skip} ORDER BY prompt_id"
    ).to_arrow_table()


def training_pairs(
    con: duckdb.DuckDBPyConnection, lake: Lake, limit: int | None = None
) -> pa.Table:
    """(imageId, path, prompt) of every downloaded image with its raw prompt: the pairs the
    pipeline's own CLIP is trained on (one row per image, whatever its number of LoRAs)."""
    cap = f"LIMIT {int(limit)}" if limit else ""
    return con.sql(
        f"""SELECT f.imageId, f.path, any_value(i.prompt) AS prompt
        FROM {lake.scan("image_files")} f JOIN {lake.scan("images")} i USING (imageId)
        WHERE f.status = 'ok' AND i.prompt IS NOT NULL
        GROUP BY f.imageId, f.path ORDER BY f.imageId {cap}"""
    ).to_arrow_table()


# -- writing ----------------------------------------------------------------------------------


def table_encoders(con: duckdb.DuckDBPyConnection, lake: Lake, table: str) -> list[str]:
    """The encoders whose vectors ``table``'s committed version holds."""
    if lake.current(table) is None:
        return []
    rows = con.execute(f"SELECT DISTINCT encoder FROM {lake.scan(table)}").fetchall()
    return sorted(r[0] for r in rows)


@dataclass
class VectorWriter:
    """Adds batches of vectors to a new version of a vector table, as new parts after the
    carried-over ones (see the module docstring); commit by leaving ``lake.writing``."""

    lake: Lake
    version: TableVersion
    schema: pa.Schema
    next_part: int
    rows: int = 0
    carried_rows: int = 0

    def write(self, batch: pa.Table) -> None:
        if batch.num_rows == 0:
            return
        with (
            self.lake.fs.open(self.version.part(self.next_part), "wb") as sink,
            parquet_writer(sink, self.schema) as writer,
        ):
            writer.write_table(batch.cast(self.schema))
        self.next_part += 1
        self.rows += batch.num_rows


def start_vector_version(
    con: duckdb.DuckDBPyConnection,
    lake: Lake,
    table: str,
    version: TableVersion,
    schema: pa.Schema,
    encoder: str,
) -> VectorWriter:
    """A :class:`VectorWriter` on ``version``, carrying over the committed parts when they
    hold ``encoder``'s vectors only (a new encoder starts afresh)."""
    current = lake.current(table)
    if current is None or table_encoders(con, lake, table) != [encoder]:
        return VectorWriter(lake, version, schema, next_part=0)
    carried = con.execute(f"SELECT count(*) FROM {lake.scan(table)}").fetchall()[0][0]
    next_part = lake.carry_over(current, version)
    return VectorWriter(lake, version, schema, next_part=next_part, carried_rows=int(carried))


def vectors_table(
    schema: pa.Schema,
    keys: Iterable,
    encoder: str,
    vectors: np.ndarray,
    **columns: Iterable,
) -> pa.Table:
    """An Arrow table of ``schema`` from keys, one encoder tag and a (n, d) float32 matrix."""
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = matrix.shape
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim)
    key_name = schema.names[0]
    data: dict[str, pa.Array] = {
        key_name: pa.array(list(keys), schema.field(key_name).type),
        "encoder": pa.array([encoder] * n, pa.string()),
        "embedding": embedding,
    }
    now = datetime.now(UTC).replace(tzinfo=None)
    for name in schema.names[3:]:
        if name == "embedded_at":
            data[name] = pa.array([now] * n, pa.timestamp("us"))
        else:
            data[name] = pa.array(list(columns[name]), schema.field(name).type)
    return pa.table(data, schema=schema)


def read_vectors(
    con: duckdb.DuckDBPyConnection, source_sql: str, key: str, encoder: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(keys, (n, d) float32 matrix) of a vector table's rows (of one encoder if given)."""
    where = f"WHERE encoder = {quote(encoder)}" if encoder else ""
    table = con.sql(
        f"SELECT {key}, embedding FROM {source_sql} {where} ORDER BY {key}"
    ).to_arrow_table()
    column = table.column("embedding").combine_chunks()
    if len(column) == 0:
        return table.column(key).to_numpy(), np.zeros((0, 0), np.float32)
    # Parquet has no fixed-size list: DuckDB hands the vectors back as a variable list
    flat = column.flatten().to_numpy(zero_copy_only=False)
    if len(flat) % len(column):
        raise ValueError("vectors of different lengths in one table")
    matrix = flat.reshape(len(column), -1).astype(np.float32, copy=False)
    return table.column(key).to_numpy(zero_copy_only=False), matrix


def image_embeddings_sql(lake: Lake) -> str | None:
    """SQL over every committed image shard (None before the first shard is written)."""
    shards = lake.tables_under(IMAGE_EMBEDDINGS)
    return lake.scan_many(shards) if shards else None


@dataclass(frozen=True)
class LoraMeans:
    """The LoRA vectors: per version the re-normalised mean of its images' vectors."""

    model_version_ids: np.ndarray  # int64 (m,)
    vectors: np.ndarray  # float32 (m, d), unit norm
    n_images: np.ndarray  # int64 (m,): images averaged
    loras_without_images: int  # LoRAs of the loras table with no embedded image (no vector)


def lora_means(con: duckdb.DuckDBPyConnection, lake: Lake, encoder: str) -> LoraMeans:
    """Mean of the normalised image vectors of each LoRA (via ``image_loras``), as ImageGem
    builds LoRA embeddings; LoRAs none of whose images was embedded get no vector and are
    counted, never invented."""
    image_ids, vectors = all_image_vectors(con, lake, encoder)
    links = con.sql(
        f"SELECT imageId, modelVersionId FROM {lake.scan('image_loras')}"
    ).to_arrow_table()
    all_loras = con.sql(f"SELECT modelVersionId FROM {lake.scan('loras')}").to_arrow_table()
    link_images = links.column("imageId").to_numpy()
    link_loras = links.column("modelVersionId").to_numpy()
    order = np.argsort(image_ids)
    position = np.searchsorted(image_ids[order], link_images)
    position = np.clip(position, 0, max(len(image_ids) - 1, 0))
    found = (image_ids[order][position] == link_images) if len(image_ids) else np.zeros(0, bool)
    rows = order[position[found]]
    loras, inverse = np.unique(link_loras[found], return_inverse=True)
    dim = vectors.shape[1] if vectors.size else 0
    sums = np.zeros((len(loras), dim), np.float64)
    np.add.at(sums, inverse, vectors[rows].astype(np.float64))
    counts = np.bincount(inverse, minlength=len(loras)).astype(np.int64)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    means = (sums / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    without = np.setdiff1d(all_loras.column(0).to_numpy(), loras)
    return LoraMeans(loras.astype(np.int64), means, counts, int(len(without)))


def vector_view_sql(source_sql: str, dim: int) -> str:
    """A catalog view body exposing ``embedding`` as DuckDB's FLOAT[dim] array type, so
    ``array_cosine_similarity`` and friends work directly."""
    return f"SELECT * REPLACE (embedding::FLOAT[{int(dim)}] AS embedding) FROM {source_sql}"


def all_image_vectors(
    con: duckdb.DuckDBPyConnection, lake: Lake, encoder: str
) -> tuple[np.ndarray, np.ndarray]:
    """(imageIds, vectors) of every shard for ``encoder``; a clear error when there are none."""
    source = image_embeddings_sql(lake)
    if source is None:
        raise ValueError("no image embeddings yet: materialize image_embeddings first")
    ids, vectors = read_vectors(con, source, "imageId", encoder)
    if len(ids) == 0:
        raise ValueError(f"no image vectors of encoder {encoder}")
    return ids, vectors


def image_base_models(
    con: duckdb.DuckDBPyConnection, lake: Lake, image_ids: np.ndarray
) -> np.ndarray:
    """Per image id, the base model of its first LoRA (lowest modelVersionId with a known
    LoRA), ``unknown`` when it has none: the colour of the embedding map on real data."""
    con.register("_map_ids", pa.table({"imageId": pa.array(np.asarray(image_ids), pa.int64())}))
    try:
        rows = con.sql(
            f"""SELECT m.imageId, coalesce(b.baseModel, 'unknown') AS base_model
            FROM _map_ids m LEFT JOIN (
                SELECT il.imageId, arg_min(l.baseModel, il.modelVersionId) AS baseModel
                FROM {lake.scan("image_loras")} il JOIN {lake.scan("loras")} l USING (modelVersionId)
                GROUP BY il.imageId
            ) b USING (imageId)"""
        ).to_arrow_table()
    finally:
        con.unregister("_map_ids")
    lookup = dict(zip(rows.column(0).to_pylist(), rows.column(1).to_pylist(), strict=True))
    return np.array([lookup[int(i)] for i in np.asarray(image_ids)], dtype=object)


# Vector tables of the catalog: view name → (key column, how to find its lake tables).
VECTOR_VIEWS = ("image_embeddings", "prompt_embeddings", "lora_embeddings")


def vector_view_sources(lake: Lake) -> dict[str, str]:
    """View name → SQL source of every vector table that has data (for the catalog)."""
    sources: dict[str, str] = {}
    images = image_embeddings_sql(lake)
    if images is not None:
        sources["image_embeddings"] = images
    for name in (PROMPT_EMBEDDINGS, LORA_EMBEDDINGS):
        if lake.current(name) is not None:
            sources[name] = lake.scan(name)
    return sources


def vector_dim(con: duckdb.DuckDBPyConnection, source_sql: str) -> int | None:
    """The dimension of a vector table's embeddings (None when it has no rows)."""
    rows = con.execute(f"SELECT len(embedding) FROM {source_sql} LIMIT 1").fetchall()
    return int(rows[0][0]) if rows else None
