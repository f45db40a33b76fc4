"""The pipeline's one configuration resource, read from environment variables.

| variable | meaning | default |
|---|---|---|
| ``IMAGEGEM_HOME`` | root of lake, catalog and media; may be ``s3://bucket/prefix`` | ``./data`` |
| ``IMAGEGEM_SOURCE`` | ``sample`` (embedded generator) or ``release`` | ``sample`` |
| ``IMAGEGEM_RELEASE_PATH`` | folder or ``s3://`` prefix holding the release parquet | — |
| ``IMAGEGEM_USER_SALT`` | salt for hashing raw usernames (keep it secret) | a dev salt |
| ``IMAGEGEM_CATALOG`` | path of the DuckDB catalog file | ``$IMAGEGEM_HOME/warehouse.duckdb`` |
| ``IMAGEGEM_MAX_BROWSING_LEVEL`` | safety filter: highest browsingLevel kept | ``1`` |
| ``IMAGEGEM_DETOXIFY_CHECKPOINT`` | local Detoxify checkpoint; unset → bundled lexicon | — |
| ``IMAGEGEM_DUCKDB_MEMORY`` | DuckDB memory limit for pipeline writers | ``2GB`` |
| ``IMAGEGEM_SAMPLE_USERS`` / ``IMAGEGEM_SAMPLE_SEED`` | size and seed of the sample | ``500`` / ``0`` |
| ``IMAGEGEM_S3_ENDPOINT_URL`` | S3 endpoint (MinIO, moto); credentials from the AWS vars | — |
| ``CIVITAI_BASE_URL`` | Civitai site (or the local fake server) for crawl and downloads | — (crawl off) |
| ``CIVITAI_API_TOKEN`` | API token, sent as ``Authorization: Bearer`` (secret) | — |
| ``CIVITAI_RATE_LIMIT`` | requests per second to the API | ``5`` |
| ``IMAGEGEM_CRAWL_START`` | first daily crawl partition (YYYY-MM-DD) | today |
| ``IMAGEGEM_IMAGE_BASE_URL`` | where image URLs are fetched (replaces https://image.civitai.com) | ``CIVITAI_BASE_URL`` |
| ``IMAGEGEM_MEDIA_MAX_IMAGES`` | images downloaded: whole users in userHash order up to this many | ``2000`` |
| ``IMAGEGEM_MEDIA_MAX_SIDE`` | stored images are shrunk to this longest side | ``512`` |

In Dagster the values that come from the environment are bound as ``dg.EnvVar`` so the UI
shows their source and never their value; the CLI builds the same class with plain values.
"""

from __future__ import annotations

import os
import posixpath

import dagster as dg

from warehouse.clean import CleanConfig
from warehouse.duck import DuckSettings, connect
from warehouse.lake import Lake, is_remote
from warehouse.safety import ToxicityScorer, make_scorer

DEV_SALT = "imagegem-dev-salt-change-me"

# field name → (environment variable, is integer)
ENV_FIELDS: dict[str, tuple[str, bool]] = {
    "home": ("IMAGEGEM_HOME", False),
    "source": ("IMAGEGEM_SOURCE", False),
    "release_path": ("IMAGEGEM_RELEASE_PATH", False),
    "user_salt": ("IMAGEGEM_USER_SALT", False),
    "catalog": ("IMAGEGEM_CATALOG", False),
    "max_browsing_level": ("IMAGEGEM_MAX_BROWSING_LEVEL", True),
    "detoxify_checkpoint": ("IMAGEGEM_DETOXIFY_CHECKPOINT", False),
    "duckdb_memory_limit": ("IMAGEGEM_DUCKDB_MEMORY", False),
    "sample_users": ("IMAGEGEM_SAMPLE_USERS", True),
    "sample_seed": ("IMAGEGEM_SAMPLE_SEED", True),
    "s3_endpoint_url": ("IMAGEGEM_S3_ENDPOINT_URL", False),
    "civitai_base_url": ("CIVITAI_BASE_URL", False),
    "civitai_api_token": ("CIVITAI_API_TOKEN", False),
    "civitai_rate_limit": ("CIVITAI_RATE_LIMIT", True),
    "image_base_url": ("IMAGEGEM_IMAGE_BASE_URL", False),
    "media_max_images": ("IMAGEGEM_MEDIA_MAX_IMAGES", True),
    "media_max_side": ("IMAGEGEM_MEDIA_MAX_SIDE", True),
}
SOURCES = ("sample", "release", "civitai")


class ImageGemSettings(dg.ConfigurableResource):
    """Where the data lives and how it is cleaned (see the module docstring for the env vars)."""

    home: str = "./data"
    source: str = "sample"
    release_path: str | None = None
    user_salt: str = DEV_SALT
    catalog: str | None = None
    max_browsing_level: int = 1
    toxicity_threshold: float = 0.2
    max_prompt_chars: int = 16_384
    detoxify_checkpoint: str | None = None
    duckdb_memory_limit: str = "2GB"
    duckdb_threads: int = 2
    sample_users: int = 500
    sample_seed: int = 0
    s3_endpoint_url: str | None = None
    civitai_base_url: str | None = None
    civitai_api_token: str | None = None
    civitai_rate_limit: int = 5
    image_base_url: str | None = None
    media_max_images: int = 2000
    media_max_side: int = 512
    media_concurrency: int = 8
    lora_max_mb: int = 512

    @classmethod
    def from_env(cls, bind_env_vars: bool = True) -> ImageGemSettings:
        """Settings from the environment; ``bind_env_vars`` binds them as ``dg.EnvVar``."""
        values: dict[str, object] = {}
        for name, (var, is_int) in ENV_FIELDS.items():
            if not os.environ.get(var):
                continue
            if bind_env_vars:
                values[name] = dg.EnvVar.int(var) if is_int else dg.EnvVar(var)
            else:
                values[name] = int(os.environ[var]) if is_int else os.environ[var]
        return cls(**values)

    def with_overrides(self, **values: object) -> ImageGemSettings:
        """A copy with some fields replaced (Dagster rebuilds resources from their init args,
        so ``model_copy`` would not reach the assets)."""
        return type(self)(**{**self.model_dump(), **values})

    # -- derived locations ---------------------------------------------------------------------
    def home_root(self) -> str:
        return self.home.rstrip("/") if is_remote(self.home) else os.path.abspath(self.home)

    def storage_options(self) -> dict:
        return (
            {"client_kwargs": {"endpoint_url": self.s3_endpoint_url}}
            if self.s3_endpoint_url
            else {}
        )

    def lake(self) -> Lake:
        return Lake(posixpath.join(self.home_root(), "lake"), self.storage_options())

    def catalog_path(self) -> str:
        if self.catalog:
            return os.path.abspath(self.catalog)
        if is_remote(self.home):
            return os.path.abspath(os.path.join("data", "warehouse.duckdb"))
        return os.path.join(self.home_root(), "warehouse.duckdb")

    def sample_dir(self) -> str:
        """Where the embedded sample is generated (always local: it is the 'download')."""
        base = os.path.abspath("data") if is_remote(self.home) else self.home_root()
        return os.path.join(base, "sources", "sample")

    def civitai_release_dir(self) -> str:
        """Where the crawl's pages, mapped to the release format, are written."""
        return posixpath.join(self.home_root(), "sources", "civitai")

    def crawl_enabled(self) -> bool:
        """The crawl runs for the civitai source, or wherever a Civitai base URL is set."""
        return self.source == "civitai" or bool(self.civitai_base_url)

    def media_enabled(self) -> bool:
        """Downloads need a reachable site: a configured Civitai base URL (real or local)."""
        return bool(self.civitai_base_url)

    def image_url_map(self) -> dict[str, str]:
        """Image CDN → the configured image host (the local fake server in the demo)."""
        target = self.image_base_url or self.civitai_base_url
        return {"https://image.civitai.com": target} if target else {}

    def release_root(self) -> str:
        """The release folder the ingest reads: the sample, the crawl's, or the configured one."""
        if self.source not in SOURCES:
            raise ValueError(
                f"IMAGEGEM_SOURCE={self.source!r}: expected one of {', '.join(SOURCES)}"
            )
        if self.source == "sample":
            return self.sample_dir()
        if self.source == "civitai":
            return self.civitai_release_dir()
        if not self.release_path:
            raise ValueError("IMAGEGEM_SOURCE=release needs IMAGEGEM_RELEASE_PATH")
        return self.release_path

    # -- helpers for the warehouse layer -------------------------------------------------------
    def clean_config(self) -> CleanConfig:
        return CleanConfig(
            max_browsing_level=self.max_browsing_level,
            toxicity_threshold=self.toxicity_threshold,
            max_prompt_chars=self.max_prompt_chars,
            source=self.source,
        )

    def scorer(self) -> ToxicityScorer:
        return make_scorer(self.detoxify_checkpoint)

    def duck(self):
        """A bounded DuckDB connection that can reach the lake."""
        temp = None if is_remote(self.home) else os.path.join(self.home_root(), "tmp", "duckdb")
        settings = DuckSettings(self.duckdb_memory_limit, self.duckdb_threads, temp)
        return connect(self.lake(), settings)
