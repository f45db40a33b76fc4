"""Tables of the preference stage: what the scorers read, ``image_scores``,
``preference_pairs`` and the pairs exported as a Pick-a-Pic-style preference dataset.

* :func:`scoring_inputs` — every embedded image of one encoder with what the scorers and the
  reward model need: its prompt (raw text, ``prompt_id``, prompt vector), its prompt cluster,
  its file, its uploader, its creation time and its reaction counts;
* ``image_scores(imageId, encoder, scorer, score, tiny_model, scored_at)`` — one row per image
  and scorer that ran (long, so a new scorer is rows, not a schema change); ``score`` is null
  where a scorer could not score an image;
* ``preference_pairs(cluster_id, prompt_id, winner_imageId, loser_imageId, winner_score,
  loser_score, margin, scorer, loser_prompt_id, encoder)`` — the pairs of
  :func:`ml.preferences.pairs.min_max_pairs`;
* ``exports/preference_pairs_pickapic`` — the same pairs with their image bytes in the layout
  the community's DPO trainers read (Pick-a-Pic: ``caption``, ``jpg_0``, ``jpg_1``,
  ``label_0``, ``label_1``), as Parquet shards that ``datasets.load_dataset("parquet",
  data_files=...)`` opens as they are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb
import numpy as np
import pyarrow as pa

from warehouse.duck import quote
from warehouse.embeddings import IMAGE_EMBEDDINGS, PROMPT_EMBEDDINGS, image_embeddings_sql
from warehouse.lake import Lake, parquet_writer
from warehouse.sqlfiles import install_macros

IMAGE_SCORES = "image_scores"
PREFERENCE_PAIRS = "preference_pairs"
PICKAPIC = "exports/preference_pairs_pickapic"
PICKAPIC_ROWS_PER_SHARD = 512  # pairs per Parquet file of the export (two images each)
REACTIONS = ("likeCount", "heartCount", "laughCount", "cryCount", "dislikeCount", "commentCount")

IMAGE_SCORES_SCHEMA = pa.schema(
    [
        ("imageId", pa.int64()),
        ("encoder", pa.string()),
        ("scorer", pa.string()),
        ("score", pa.float64()),
        ("tiny_model", pa.bool_()),
        ("scored_at", pa.timestamp("us")),
    ]
)

PREFERENCE_PAIRS_SCHEMA = pa.schema(
    [
        ("cluster_id", pa.int64()),
        ("prompt_id", pa.string()),
        ("winner_imageId", pa.int64()),
        ("loser_imageId", pa.int64()),
        ("winner_score", pa.float64()),
        ("loser_score", pa.float64()),
        ("margin", pa.float64()),
        ("scorer", pa.string()),
        ("loser_prompt_id", pa.string()),
        ("encoder", pa.string()),
    ]
)

PICKAPIC_SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),  # 1.0: jpg_0 is preferred
        ("label_1", pa.float64()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
        ("best_image_uid", pa.string()),
        ("are_different", pa.bool_()),
        ("has_label", pa.bool_()),
        ("cluster_id", pa.int64()),
        ("prompt_id", pa.string()),
        ("scorer", pa.string()),
    ]
)


@dataclass
class ScoringInputs:
    """Every embedded image of one encoder, aligned row by row (n images, d dimensions)."""

    encoder: str
    image_ids: np.ndarray  # int64 (n,)
    prompt_ids: list[str]
    prompts: list[str]
    cluster_ids: np.ndarray  # int64 (n,): −1 noise, also for prompts not clustered yet
    image_vectors: np.ndarray  # float32 (n, d), unit norm
    prompt_vectors: np.ndarray  # float32 (n, d), unit norm
    paths: list[str | None]  # the image file in the media store (None: not stored)
    user_hashes: list[str]
    created_at: np.ndarray  # datetime64[us] (n,)
    reactions: dict[str, np.ndarray] = field(default_factory=dict)  # int64 (n,) per count
    without_prompt_vector: int = 0  # embedded images left out: their prompt has no vector
    no_longer_in_images: int = 0  # embedded images left out: gone from `images` (deleted)
    unclustered: int = 0  # images whose prompt has no cluster row (kept, as noise)

    def __len__(self) -> int:
        return len(self.image_ids)


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    array = column.combine_chunks()
    if len(array) == 0:
        return np.zeros((0, 0), np.float32)
    flat = array.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(array), -1).astype(np.float32, copy=False)


def scoring_inputs(con: duckdb.DuckDBPyConnection, lake: Lake, encoder: str) -> ScoringInputs:
    """The images ``encoder`` embedded, each with its prompt, prompt vector, cluster, file,
    uploader, creation time and reactions (one row per image, in imageId order).

    An image's prompt id is that of its normalised prompt (the ``prompts`` table's rule, via
    the catalog macros); images whose prompt has no vector of this encoder, and vectors of
    images no longer in ``images`` (deleted upstream since they were embedded), are left out
    and counted; images whose prompt has no cluster yet count as noise."""
    images_sql = image_embeddings_sql(lake)
    if images_sql is None or lake.current(PROMPT_EMBEDDINGS) is None:
        raise ValueError(
            f"no {IMAGE_EMBEDDINGS} or {PROMPT_EMBEDDINGS} yet: materialize the embeddings "
            "stage first"
        )
    install_macros(con)
    clusters = (
        f"SELECT prompt_id, cluster_id FROM {lake.scan('prompt_clusters')} "
        f"WHERE encoder = {quote(encoder)}"
        if lake.current("prompt_clusters") is not None
        else "SELECT NULL::VARCHAR AS prompt_id, NULL::BIGINT AS cluster_id WHERE false"
    )
    files = (
        f"SELECT imageId, any_value(path) AS path FROM {lake.scan('image_files')} "
        "WHERE status = 'ok' GROUP BY imageId"
        if lake.current("image_files") is not None
        else "SELECT NULL::BIGINT AS imageId, NULL::VARCHAR AS path WHERE false"
    )
    counts = ", ".join(f'any_value("{c}") AS "{c}"' for c in REACTIONS)
    table = con.sql(
        f"""
        WITH img AS (
            SELECT imageId, any_value(prompt) AS prompt, any_value(userHash) AS userHash,
                   min(createdAt) AS createdAt, {counts}
            FROM {lake.scan("images")} GROUP BY imageId
        ), ids AS (
            SELECT *, prompt_id(normalize_prompt(prompt)) AS prompt_id, true AS present
            FROM img
        ), vec AS (
            SELECT imageId, any_value(embedding) AS embedding FROM {images_sql}
            WHERE encoder = {quote(encoder)} GROUP BY imageId
        )
        SELECT v.imageId, i.prompt_id, i.prompt, c.cluster_id, v.embedding AS image_vector,
               p.embedding AS prompt_vector, f.path, i.userHash, i.createdAt,
               {", ".join(f'i."{c}"' for c in REACTIONS)}, i.present
        FROM vec v LEFT JOIN ids i USING (imageId)
        LEFT JOIN (SELECT prompt_id, any_value(embedding) AS embedding
                   FROM {lake.scan(PROMPT_EMBEDDINGS)} WHERE encoder = {quote(encoder)}
                   GROUP BY prompt_id) p USING (prompt_id)
        LEFT JOIN ({clusters}) c USING (prompt_id)
        LEFT JOIN ({files}) f USING (imageId)
        ORDER BY v.imageId
        """
    ).to_arrow_table()
    present = np.asarray(table.column("present").is_valid())
    gone = int((~present).sum())
    table = table.filter(pa.array(present))
    has_prompt = np.asarray(table.column("prompt_vector").is_valid())
    without = int((~has_prompt).sum())
    table = table.filter(pa.array(has_prompt))
    cluster = table.column("cluster_id")
    unclustered = int(cluster.null_count)
    return ScoringInputs(
        encoder=encoder,
        image_ids=table.column("imageId").to_numpy().astype(np.int64),
        prompt_ids=table.column("prompt_id").to_pylist(),
        prompts=table.column("prompt").to_pylist(),
        cluster_ids=np.asarray(cluster.fill_null(-1).to_numpy(), dtype=np.int64),
        image_vectors=_matrix(table.column("image_vector")),
        prompt_vectors=_matrix(table.column("prompt_vector")),
        paths=table.column("path").to_pylist(),
        user_hashes=table.column("userHash").to_pylist(),
        created_at=table.column("createdAt").to_numpy(zero_copy_only=False),
        reactions={
            c: np.asarray(table.column(c).fill_null(0).to_numpy(), dtype=np.int64)
            for c in REACTIONS
        },
        without_prompt_vector=without,
        no_longer_in_images=gone,
        unclustered=unclustered,
    )


def image_scores_table(
    image_ids: np.ndarray, encoder: str, scores: dict[str, np.ndarray], tiny: dict[str, bool]
) -> pa.Table:
    """Rows of ``image_scores`` for each scorer's scores (NaN → null)."""
    now = datetime.now(UTC).replace(tzinfo=None)
    parts = []
    for scorer, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        n = len(image_ids)
        if values.shape != (n,):
            raise ValueError(f"scorer {scorer}: {values.shape} scores for {n} images")
        parts.append(
            pa.table(
                {
                    "imageId": pa.array(np.asarray(image_ids, dtype=np.int64)),
                    "encoder": pa.array([encoder] * n, pa.string()),
                    "scorer": pa.array([scorer] * n, pa.string()),
                    "score": pa.array(values, mask=~np.isfinite(values)),
                    "tiny_model": pa.array([bool(tiny.get(scorer, False))] * n),
                    "scored_at": pa.array([now] * n, pa.timestamp("us")),
                },
                schema=IMAGE_SCORES_SCHEMA,
            )
        )
    return pa.concat_tables(parts) if parts else IMAGE_SCORES_SCHEMA.empty_table()


def read_scores(
    con: duckdb.DuckDBPyConnection, lake: Lake, scorer: str, encoder: str
) -> dict[int, float]:
    """imageId → score of one scorer (null scores left out)."""
    rows = con.execute(
        f"SELECT imageId, score FROM {lake.scan(IMAGE_SCORES)} WHERE scorer = ? AND encoder = ? "
        "AND score IS NOT NULL",
        [scorer, encoder],
    ).fetchall()
    return {int(i): float(s) for i, s in rows}


def scorers_in(con: duckdb.DuckDBPyConnection, lake: Lake, encoder: str) -> list[str]:
    """The scorers whose scores ``image_scores`` holds for ``encoder``."""
    if lake.current(IMAGE_SCORES) is None:
        return []
    rows = con.execute(
        f"SELECT DISTINCT scorer FROM {lake.scan(IMAGE_SCORES)} WHERE encoder = ? ORDER BY 1",
        [encoder],
    ).fetchall()
    return [r[0] for r in rows]


def _side(pair_key: str) -> bool:
    """Which side the winner goes to in the export: a hash of the pair, so it is balanced,
    not position-biased, and the same on every run."""
    return hashlib.sha256(pair_key.encode()).digest()[0] % 2 == 0


def write_pickapic(
    lake: Lake,
    pairs: pa.Table,
    captions: dict[str, str],
    image_bytes: Callable[[int], bytes | None],
    rows_per_shard: int = PICKAPIC_ROWS_PER_SHARD,
) -> tuple[str, int, int]:
    """Write ``pairs`` (``preference_pairs`` rows) with their images as the Pick-a-Pic-style
    export ``exports/preference_pairs_pickapic``; returns (version path, pairs written, pairs
    left out because an image file was missing). The winner is ``jpg_0`` or ``jpg_1`` by a
    hash of the pair (``label_0 = 1.0`` when it is ``jpg_0``), the caption is the winner's
    prompt."""
    rows: list[dict] = []
    missing = 0
    for pair in pairs.to_pylist():
        winner, loser = int(pair["winner_imageId"]), int(pair["loser_imageId"])
        data_w, data_l = image_bytes(winner), image_bytes(loser)
        if data_w is None or data_l is None:
            missing += 1
            continue
        first_is_winner = _side(f"{pair['cluster_id']}/{winner}/{loser}")
        images = [(winner, data_w), (loser, data_l)]
        if not first_is_winner:
            images.reverse()
        rows.append(
            {
                "caption": captions.get(pair["prompt_id"], ""),
                "jpg_0": images[0][1],
                "jpg_1": images[1][1],
                "label_0": 1.0 if first_is_winner else 0.0,
                "label_1": 0.0 if first_is_winner else 1.0,
                "image_0_uid": str(images[0][0]),
                "image_1_uid": str(images[1][0]),
                "best_image_uid": str(winner),
                "are_different": True,
                "has_label": True,
                "cluster_id": int(pair["cluster_id"]),
                "prompt_id": pair["prompt_id"],
                "scorer": pair["scorer"],
            }
        )
    with lake.writing(PICKAPIC) as version:
        shards: Sequence[list[dict]] = [
            rows[i : i + rows_per_shard] for i in range(0, len(rows), rows_per_shard)
        ] or [[]]
        for index, shard in enumerate(shards):
            with (
                lake.fs.open(version.part(index), "wb") as sink,
                parquet_writer(sink, PICKAPIC_SCHEMA) as writer,
            ):
                writer.write_table(pa.Table.from_pylist(shard, schema=PICKAPIC_SCHEMA))
    return version.path, len(rows), missing
