"""The paper's Table 1 (raw vs safety-filtered dataset statistics) computed from the lake.

"raw" is every row that passed the row rules (typed, deduplicated) before the safety filter:
the clean table plus the rows the safety filter quarantined (read back from their payload).
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa

from warehouse.duck import quote
from warehouse.lake import Lake

# The published figures (paper, Table 1), for side-by-side display.
PAPER_TABLE1 = {
    "raw": {
        "images": 5_658_107,
        "unique_prompts": 2_975_943,
        "loras": 242_889,
        "unique_tags": 105_788,
        "users": 57_245,
        "uploaders": 19_003,
    },
    "filtered": {
        "images": 4_916_134,
        "unique_prompts": 2_895_364,
        "loras": 242_118,
        "unique_tags": 97_434,
        "users": 57_245,
        "uploaders": 18_889,
    },
}

# The shape ratios of imagegem_schema.md (after the safety filter).
PAPER_RATIOS = {
    "users_per_uploader": 3.03,
    "loras_per_uploader": 12.8,
    "images_per_user": 85.9,
    "unique_prompts_per_image": 0.589,
    "unique_tags_per_lora": 0.40,
    "safety_removed_share": 0.131,
}

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


def _unsafe_rows(lake: Lake, part: str, columns: dict[str, str]) -> str:
    """Rows the safety filter quarantined, with ``columns`` (name → type) from the payload."""
    fields = ", ".join(
        f"CAST(json_extract_string(payload, '$.{c}') AS {t}) AS \"{c}\"" for c, t in columns.items()
    )
    return (
        f"SELECT {fields} FROM read_parquet({quote(lake.glob(part))}) WHERE reason LIKE 'unsafe:%'"
    )


def compute_table1(con: duckdb.DuckDBPyConnection, lake: Lake) -> Table1:
    """Table 1 of the paper on this lake's data."""
    img_cols = {
        "imageId": "BIGINT",
        "modelVersionId": "BIGINT",
        "prompt": "VARCHAR",
        "userHash": "VARCHAR",
    }
    mod_cols = {"modelVersionId": "BIGINT", "tags": "VARCHAR", "userHash": "VARCHAR"}
    img_sel = ", ".join(f'"{c}"' for c in img_cols)
    mod_sel = ", ".join(f'"{c}"' for c in mod_cols)
    images = f"SELECT {img_sel} FROM read_parquet({quote(lake.glob('images'))})"
    models = f"SELECT {mod_sel} FROM read_parquet({quote(lake.glob('models'))})"
    sources = {
        "raw": (
            f"{images} UNION ALL {_unsafe_rows(lake, 'quarantine/images', img_cols)}",
            f"{models} UNION ALL {_unsafe_rows(lake, 'quarantine/models', mod_cols)}",
        ),
        "filtered": (images, models),
    }
    rows: dict[str, dict[str, float]] = {}
    for stage, (img, mod) in sources.items():
        con.execute(f"CREATE OR REPLACE TEMP TABLE _t1_img AS {img}")
        con.execute(f"CREATE OR REPLACE TEMP TABLE _t1_mod AS {mod}")
        (n_images, n_prompts, n_image_ids, loras, tags, uploaders, users, used_loras) = con.execute(
            """
            SELECT (SELECT count(*) FROM _t1_img),
                   (SELECT count(DISTINCT prompt) FROM _t1_img),
                   (SELECT count(DISTINCT imageId) FROM _t1_img),
                   (SELECT count(DISTINCT modelVersionId) FROM _t1_mod),
                   (SELECT count(DISTINCT trim(t)) FROM
                       (SELECT unnest(string_split(tags, ',')) AS t FROM _t1_mod) WHERE trim(t) <> ''),
                   (SELECT count(DISTINCT userHash) FROM _t1_mod),
                   (SELECT count(*) FROM (SELECT userHash FROM _t1_img UNION SELECT userHash FROM _t1_mod)),
                   (SELECT count(DISTINCT modelVersionId) FROM _t1_img)
            """
        ).fetchone()
        rows[stage] = {
            "images": n_images,
            "unique_prompts": n_prompts,
            "loras": loras,
            "unique_tags": tags,
            "users": users,
            "uploaders": uploaders,
            "images_per_user": n_images / max(users, 1),
            "loras_per_uploader": loras / max(uploaders, 1),
            "images_per_lora_used": n_images / max(used_loras, 1),
            "distinct_image_ids": n_image_ids,
        }
    con.execute("DROP TABLE _t1_img; DROP TABLE _t1_mod")
    return Table1(rows)
