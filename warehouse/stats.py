"""The paper's Table 1 (raw vs safety-filtered dataset statistics) computed from the lake.

"raw" is every row that passed the row rules (typed, deduplicated) before the safety filter:
the clean table plus the rows the safety filter quarantined (read back from their payload).
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa

from warehouse.lake import Lake
from warehouse.paper import PAPER_RATIOS, PAPER_TABLE1

COUNT_COLUMNS = (
    "images",
    "unique_prompts",
    "loras",
    "unique_tags",
    "users",
    "uploaders",
    "distinct_image_ids",
)


@dataclass(frozen=True)
class Table1:
    rows: dict[str, dict[str, float]]  # "raw"/"filtered" → column → value

    def ratios(self) -> dict[str, float]:
        f, r = self.rows["filtered"], self.rows["raw"]
        return {
            "users_per_uploader": f["users"] / max(f["uploaders"], 1),
            "loras_per_uploader": f["loras"] / max(f["uploaders"], 1),
            "images_per_user": f["images"] / max(f["users"], 1),
            "unique_prompts_per_image": f["unique_prompts"] / max(f["images"], 1),
            "unique_tags_per_lora": f["unique_tags"] / max(f["loras"], 1),
            "safety_removed_share": 1 - f["images"] / max(r["images"], 1),
        }

    def to_arrow(self) -> pa.Table:
        names = list(self.rows["raw"])
        columns: dict[str, pa.Array] = {"stage": pa.array(list(self.rows))}
        for n in names:
            values = [self.rows[s][n] for s in self.rows]
            columns[n] = (
                pa.array([int(v) for v in values], pa.int64())
                if n in COUNT_COLUMNS
                else pa.array([round(float(v), 2) for v in values], pa.float64())
            )
        return pa.table(columns)

    def markdown(self) -> str:
        names = list(self.rows["raw"])
        head = "| | " + " | ".join(n.replace("_", " ") for n in names) + " |"
        lines = [head, "|---" * (len(names) + 1) + "|"]
        for stage, values in self.rows.items():
            cells = [f"{v:,.0f}" if n in COUNT_COLUMNS else f"{v:,.1f}" for n, v in values.items()]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        for stage, values in PAPER_TABLE1.items():
            cells = [f"{values[n]:,}" if n in values else "" for n in names]
            lines.append(f"| paper {stage} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def ratios_markdown(self) -> str:
        lines = ["| ratio | this data | ImageGem | deviation |", "|---|---:|---:|---:|"]
        for name, value in self.ratios().items():
            paper = PAPER_RATIOS[name]
            lines.append(
                f"| {name} | {value:.3f} | {paper:.3f} | {100 * (value / paper - 1):+.0f}% |"
            )
        return "\n".join(lines)


# The columns Table 1 reads, with their types (the quarantine payload is JSON text).
IMAGE_COLUMNS = {
    "imageId": "BIGINT",
    "modelVersionId": "BIGINT",
    "prompt": "VARCHAR",
    "userHash": "VARCHAR",
}
MODEL_COLUMNS = {"modelVersionId": "BIGINT", "tags": "VARCHAR", "userHash": "VARCHAR"}


def _unsafe_rows(lake: Lake, part: str, columns: dict[str, str]) -> str:
    """Rows the safety filter quarantined, with ``columns`` (name → type) from the payload.

    One json_extract_string over the list of paths parses each payload once, not once per
    column."""
    paths = ", ".join(f"'$.{c}'" for c in columns)
    fields = ", ".join(
        f'CAST(_v[{i}] AS {t}) AS "{c}"' for i, (c, t) in enumerate(columns.items(), start=1)
    )
    return (
        f"SELECT {fields} FROM (SELECT json_extract_string(payload, [{paths}]) AS _v "
        f"FROM {lake.scan(part)} WHERE reason LIKE 'unsafe:%')"
    )


def _distinct(source: str, column: str, not_null: bool = True) -> str:
    """How many distinct ``column`` values in all rows of ``source`` and in its safe rows.

    One grouping serves both stages (the filtered rows are the raw rows flagged ``safe``);
    like count(DISTINCT), NULL is not counted unless ``not_null`` is False (UNION's rule)."""
    where = f" WHERE {column} IS NOT NULL" if not_null else ""
    return (
        f"SELECT count(*), count_if(_safe) FROM (SELECT {column}, bool_or(_safe) AS _safe "
        f"FROM ({source}){where} GROUP BY {column})"
    )


def compute_table1(con: duckdb.DuckDBPyConnection, lake: Lake) -> Table1:
    """Table 1 of the paper on this lake's data.

    "raw" reads the clean rows plus the safety-quarantined rows (``_safe`` false), "filtered"
    the clean rows alone; each figure is one pass that counts both stages at once.
    """
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _t1_unsafe_img AS "
        + _unsafe_rows(lake, "quarantine/images", IMAGE_COLUMNS)
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _t1_unsafe_mod AS "
        + _unsafe_rows(lake, "quarantine/models", MODEL_COLUMNS)
    )
    img_cols = ", ".join(f'"{c}"' for c in IMAGE_COLUMNS)
    mod_cols = ", ".join(f'"{c}"' for c in MODEL_COLUMNS)
    img = (
        f"SELECT {img_cols}, true AS _safe FROM {lake.scan('images')} "
        f"UNION ALL SELECT *, false FROM _t1_unsafe_img"
    )
    mod = (
        f"SELECT {mod_cols}, true AS _safe FROM {lake.scan('models')} "
        f"UNION ALL SELECT *, false FROM _t1_unsafe_mod"
    )
    tags = f"SELECT trim(unnest(string_split(tags, ','))) AS tag, _safe FROM ({mod})"
    users = f"SELECT userHash, _safe FROM ({img}) UNION ALL SELECT userHash, _safe FROM ({mod})"
    queries = {
        "images": f"SELECT count(*), count_if(_safe) FROM ({img})",
        "unique_prompts": _distinct(img, "prompt"),
        "distinct_image_ids": _distinct(img, "imageId"),
        "used_loras": _distinct(img, "modelVersionId"),
        "loras": _distinct(mod, "modelVersionId"),
        "unique_tags": _distinct(f"SELECT * FROM ({tags}) WHERE tag <> ''", "tag"),
        "uploaders": _distinct(mod, "userHash"),
        "users": _distinct(users, "userHash", not_null=False),
    }
    counts = {name: con.execute(sql).fetchone() for name, sql in queries.items()}
    con.execute("DROP TABLE _t1_unsafe_img; DROP TABLE _t1_unsafe_mod")
    rows: dict[str, dict[str, float]] = {}
    for index, stage in enumerate(("raw", "filtered")):
        n = {name: value[index] for name, value in counts.items()}
        rows[stage] = {
            "images": n["images"],
            "unique_prompts": n["unique_prompts"],
            "loras": n["loras"],
            "unique_tags": n["unique_tags"],
            "users": n["users"],
            "uploaders": n["uploaders"],
            "images_per_user": n["images"] / max(n["users"], 1),
            "loras_per_uploader": n["loras"] / max(n["uploaders"], 1),
            "images_per_lora_used": n["images"] / max(n["used_loras"], 1),
            "distinct_image_ids": n["distinct_image_ids"],
        }
    return Table1(rows)
