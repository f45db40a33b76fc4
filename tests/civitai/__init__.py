"""Helpers shared by the Civitai tests: a generated sample, release comparisons, the crawler
with the tests' salt, and API items to map."""

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


def crawl(lake, window: str, client, *, logger=None, **options: Any):
    """The crawler with the tests' salt (usernames are hashed before landing); ``options``
    are :class:`~pipelines.civitai.crawler.CrawlOptions` fields."""
    from pipelines.civitai.crawler import CrawlOptions
    from pipelines.civitai.crawler import crawl as run_crawl

    return run_crawl(lake, window, client, CrawlOptions(user_salt=SALT, **options), logger=logger)


# -- API items ---------------------------------------------------------------------------------


def model_item(**overrides) -> dict:
    item = {
        "id": 11,
        "name": "Neon Style",
        "description": "<p>desc</p>",
        "type": "LORA",
        "nsfw": False,
        "nsfwLevel": 1,
        "poi": False,
        "minor": False,
        "availability": "Public",
        "allowNoCredit": True,
        "allowCommercialUse": "Image, RentCivit",
        "allowDerivatives": True,
        "allowDifferentLicense": False,
        "cosmetic": None,
        "stats": {
            "downloadCount": 9,
            "thumbsUpCount": 2,
            "thumbsDownCount": 0,
            "ratingCount": 1,
            "rating": 5,
        },
        "creator": {"username": "alice"},
        "tags": ["anime", "style"],
        "modelVersions": [
            {
                "id": 101,
                "modelId": 11,
                "name": "v1.0",
                "description": None,
                "baseModel": "SD 1.5",
                "baseModelType": "Standard",
                "nsfwLevel": 1,
                "publishedAt": "2023-05-01T10:00:00.000Z",
                "trainedWords": ["neon", "glow"],
                "availability": "Public",
                "stats": {
                    "downloadCount": 7,
                    "ratingCount": 1,
                    "rating": 4.5,
                    "thumbsUpCount": 2,
                    "thumbsDownCount": 0,
                },
                "downloadUrl": "https://civitai.com/api/download/models/101",
                "files": [
                    {
                        "id": 1001,
                        "name": "neon.safetensors",
                        "sizeKB": 1024.5,
                        "type": "Model",
                        "primary": True,
                        "metadata": {"fp": "fp16", "format": "SafeTensor"},
                        "hashes": {
                            "AutoV1": "ab12cd34",
                            "AutoV2": "0123456789",
                            "SHA256": "0123456789" + "A" * 54,
                            "CRC32": "DEADBEEF",
                            "BLAKE3": "B" * 64,
                        },
                        "pickleScanResult": "Success",
                        "pickleScanMessage": "No Pickle imports",
                        "virusScanResult": "Success",
                        "scannedAt": "2023-05-01T10:05:00",
                        "downloadUrl": "https://civitai.com/api/download/models/101",
                    },
                    {
                        "id": 1002,
                        "name": "neon_dataset.zip",
                        "sizeKB": 20.0,
                        "type": "Training Data",
                        "metadata": {"format": "Other"},
                        "hashes": {"SHA256": "C" * 64},
                        "scannedAt": "2023-05-01T10:06:00Z",
                        "downloadUrl": "https://civitai.com/api/download/models/101?type=Training%20Data",
                    },
                ],
            }
        ],
    }
    item.update(overrides)
    return item


def image_item(**overrides) -> dict:
    item = {
        "id": 555,
        "url": "https://image.civitai.com/key/uuid/width=512/555.jpeg",
        "hash": "U5ABCDEF",
        "width": 512,
        "height": 768,
        "nsfw": False,
        "nsfwLevel": 1,
        "browsingLevel": 1,
        "createdAt": "2023-06-01T12:00:00.000Z",
        "postId": 77,
        "type": "image",
        "stats": {
            "cryCount": 0,
            "laughCount": 1,
            "likeCount": 5,
            "dislikeCount": 0,
            "heartCount": 2,
            "commentCount": 3,
        },
        "username": "bob",
        "baseModel": "SD 1.5",
        "meta": {
            "prompt": "a cat <lora:neon:0.8>",
            "negativePrompt": "blurry",
            "seed": 42,
            "steps": 30,
            "sampler": "Euler a",
            "cfgScale": 7,
            "clipSkip": 2,
            "civitaiResources": [
                {"type": "lora", "modelVersionId": 101, "weight": 0.8},
                {"type": "checkpoint", "modelVersionId": 9},
            ],
        },
    }
    item.update(overrides)
    return item
