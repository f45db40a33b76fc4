"""Helpers shared by the Civitai crawl tests: a generated sample and release comparisons."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import duckdb

from pipelines.sample.generator import SampleSpec, generate_sample
from warehouse.schema import IMAGES, MODELS


def sample_spec(**kwargs: Any) -> SampleSpec:
    """A metadata-only SampleSpec (no truth, no media files where the generator has them)."""
    names = {f.name for f in dataclasses.fields(SampleSpec)}
    wanted = {"with_truth": False, "with_media": False} | kwargs
    return SampleSpec(**{k: v for k, v in wanted.items() if k in names})


SPEC = sample_spec(users=60, seed=3)


def make_sample(folder: Path, spec: SampleSpec = SPEC) -> Path:
    """Generate the sample release into ``folder`` and return it."""
    generate_sample(folder, spec)
    return folder


SALT = "test-salt"
# What the crawl lands for a release userHash: hashes stay, raw usernames are salted-hashed.
PSEUDONYMIZED = (
    "CASE WHEN regexp_full_match(lower(trim(userHash)), '[0-9a-f]{64}') "
    f"THEN lower(trim(userHash)) ELSE sha256('{SALT}' || trim(userHash)) END AS userHash"
)


def _cols(names: list[str]) -> str:
    return ", ".join(PSEUDONYMIZED if c == "userHash" else f'"{c}"' for c in names)


def release_differences(sample: Path, built: Path) -> dict[str, object]:
    """Rows that differ between a sample release and a release built from the crawl.

    The expected rows are the sample's distinct rows that an API can carry:
    * images: non-null ``imageId`` (null ids cannot exist in an API); every column compared;
    * models: non-null ``modelVersionId`` / ``fileId``; every column compared except
      ``publishedAt`` of versions whose files disagree on it in the release (the API has
      one ``publishedAt`` per version, so only one of the disagreeing values can come back).

    Returns the counts of missing / unexpected rows per table plus the number of versions
    whose ``publishedAt`` was excluded and the sample's planted bad dates.
    """
    con = duckdb.connect()
    try:
        src = {t: f"read_parquet('{sample}/{t}/*.parquet')" for t in ("images", "models")}
        got = {t: f"read_parquet('{built}/{t}/*.parquet')" for t in ("images", "models")}
        out: dict[str, object] = {}
        images = _cols(IMAGES.column_names)
        expected_images = f"SELECT DISTINCT {images} FROM {src['images']} WHERE imageId IS NOT NULL"
        actual_images = f"SELECT {images.replace(PSEUDONYMIZED, 'userHash')} FROM {got['images']}"
        out["images_missing"] = _count(con, f"{expected_images} EXCEPT ALL {actual_images}")
        out["images_unexpected"] = _count(con, f"{actual_images} EXCEPT ALL {expected_images}")
        con.execute(
            f"CREATE TEMP TABLE conflicted AS SELECT modelVersionId FROM "
            f"(SELECT DISTINCT * FROM {src['models']} WHERE modelVersionId IS NOT NULL) "
            f"GROUP BY modelVersionId HAVING count(DISTINCT publishedAt) > 1"
        )
        other = [c for c in MODELS.column_names if c != "publishedAt"]
        published = (
            "CASE WHEN modelVersionId IN (SELECT modelVersionId FROM conflicted) "
            'THEN NULL ELSE "publishedAt" END AS "publishedAt"'
        )
        expected_models = (
            f"SELECT DISTINCT {_cols(other)}, {published} FROM {src['models']} "
            f"WHERE modelVersionId IS NOT NULL AND fileId IS NOT NULL"
        )
        actual_models = f"SELECT {_cols(other).replace(PSEUDONYMIZED, 'userHash')}, {published} FROM {got['models']}"
        out["models_missing"] = _count(con, f"{expected_models} EXCEPT ALL {actual_models}")
        out["models_unexpected"] = _count(con, f"{actual_models} EXCEPT ALL {expected_models}")
        out["conflicted_versions"] = _count(con, "SELECT * FROM conflicted")
        manifest = json.loads((sample / "manifest.json").read_text())
        out["planted_model_bad_dates"] = manifest["counts"]["model_malformed_rows"]["bad_date"]
        return out
    finally:
        con.close()


def _count(con: duckdb.DuckDBPyConnection, query: str) -> int:
    return int(con.execute(f"SELECT count(*) FROM ({query})").fetchall()[0][0])


def assert_same_release(sample: Path, built: Path) -> None:
    """Every row an API can carry comes back, and nothing else (see release_differences)."""
    diff = release_differences(sample, built)
    assert diff["images_missing"] == 0, diff
    assert diff["images_unexpected"] == 0, diff
    assert diff["models_missing"] == 0, diff
    assert diff["models_unexpected"] == 0, diff
    # Only versions with a planted bad date on one of their files may be excluded.
    assert diff["conflicted_versions"] <= diff["planted_model_bad_dates"], diff


def same_tables(a: Path, b: Path) -> bool:
    """Two built releases hold exactly the same rows (both tables, all columns)."""
    con = duckdb.connect()
    try:
        for table in ("images", "models"):
            left = f"SELECT * FROM read_parquet('{a}/{table}/*.parquet')"
            right = f"SELECT * FROM read_parquet('{b}/{table}/*.parquet')"
            if _count(con, f"({left} EXCEPT ALL {right}) UNION ALL ({right} EXCEPT ALL {left})"):
                return False
        return True
    finally:
        con.close()


def crawl(*args, **kwargs):
    """The crawler with the tests' salt (usernames are hashed before landing)."""
    from pipelines.civitai.crawler import crawl as crawl_with_salt

    kwargs.setdefault("user_salt", SALT)
    return crawl_with_salt(*args, **kwargs)
