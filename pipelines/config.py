"""Every environment variable of the pipeline: the registry, the binding, the one reader.

:data:`VARIABLES` names each variable, the system it configures, the resource field it binds
(if any), its meaning and its default. Defaults of resource-bound variables are the resource
fields' own defaults (one home); the README's configuration table is this registry
(``python -m pipelines.config`` prints it, and a test compares the two both ways).

:func:`resources_from_env` builds the resources of :mod:`pipelines.resources` from the
environment — bound as ``dg.EnvVar`` for the code location (the UI shows the variable, never
its value) or as plain values for the CLI. The few variables that configure something other
than a resource (the crawl's first partition, the CLI's log level, the fake server's token)
are read by the functions below. No other module reads the environment.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import dagster as dg

from pipelines.resources import (
    CivitaiResource,
    EncoderResource,
    MediaResource,
    PipelineResources,
    PreferencesResource,
    WarehouseResource,
)

RESOURCE_CLASSES: dict[str, type[dg.ConfigurableResource]] = {
    "warehouse": WarehouseResource,
    "civitai": CivitaiResource,
    "media": MediaResource,
    "encoder": EncoderResource,
    "preferences": PreferencesResource,
}

# The first daily crawl partition when IMAGEGEM_CRAWL_START is unset. Fixed, so the partition
# set never moves when the code location reloads; windows since then can be backfilled.
DEFAULT_CRAWL_START = "2026-11-01"
DEFAULT_LOG_LEVEL = "WARNING"
DEFAULT_EMBED_SHARDS = 4


@dataclass(frozen=True)
class Variable:
    """One environment variable: what it configures and its default.

    ``system`` says what it configures; ``resource``/``field`` name the resource field it
    binds (``None`` for the variables read directly here); ``default`` is that field's default
    (else ``literal_default``); ``shown_default`` replaces the default's text in the docs where
    the value itself says little.
    """

    name: str
    system: str
    meaning: str
    resource: str | None = None
    field: str | None = None
    literal_default: Any = None
    shown_default: str | None = None
    secret: bool = False

    @property
    def kind(self) -> type:
        """``int`` or ``str``: how a value of the variable is parsed and bound."""
        if self.resource is None:
            return str
        annotation = RESOURCE_CLASSES[self.resource].model_fields[self.field].annotation
        return int if annotation is int else str

    @property
    def default(self) -> Any:
        """The value used when the variable is unset (``None``: nothing)."""
        if self.resource is None:
            return self.literal_default
        return RESOURCE_CLASSES[self.resource].model_fields[self.field].default

    @property
    def configures(self) -> str:
        """What the variable configures, as the README shows it."""
        return f"`{self.resource}` resource" if self.resource else self.system

    @property
    def default_text(self) -> str:
        """The default as the README shows it."""
        if self.shown_default is not None:
            return self.shown_default
        return "—" if self.default is None else f"`{self.default}`"


def _w(name: str, field: str, meaning: str, **kw: Any) -> Variable:
    return Variable(name, "warehouse", meaning, "warehouse", field, **kw)


def _c(name: str, field: str, meaning: str, **kw: Any) -> Variable:
    return Variable(name, "civitai", meaning, "civitai", field, **kw)


def _m(name: str, field: str, meaning: str, **kw: Any) -> Variable:
    return Variable(name, "media", meaning, "media", field, **kw)


def _e(name: str, field: str, meaning: str, **kw: Any) -> Variable:
    return Variable(name, "encoder", meaning, "encoder", field, **kw)


def _p(name: str, field: str, meaning: str, **kw: Any) -> Variable:
    return Variable(name, "preferences", meaning, "preferences", field, **kw)


VARIABLES: tuple[Variable, ...] = (
    # lake / warehouse
    _w(
        "IMAGEGEM_HOME",
        "home",
        "root of lake, catalog and sample; the lake may be `s3://bucket/prefix`",
    ),
    _w(
        "IMAGEGEM_SOURCE",
        "source",
        "what the warehouse ingests: `sample` (embedded generator), `release` (published "
        "parquet at `IMAGEGEM_RELEASE_PATH`) or `civitai` (the crawl's release)",
    ),
    _w(
        "IMAGEGEM_RELEASE_PATH",
        "release_path",
        "folder or `s3://` prefix with the release (`images/*.parquet`, `models/*.parquet`, "
        "or HF's `ImageGem-images/`…)",
    ),
    _w(
        "IMAGEGEM_USER_SALT",
        "user_salt",
        "salt for SHA-256 hashing of raw usernames (secret)",
        shown_default="a dev salt",
        secret=True,
    ),
    _w(
        "IMAGEGEM_CATALOG",
        "catalog",
        "the DuckDB catalog file",
        shown_default="`$IMAGEGEM_HOME/warehouse.duckdb`",
    ),
    _w(
        "IMAGEGEM_MAX_BROWSING_LEVEL",
        "max_browsing_level",
        "safety filter: highest `browsingLevel` kept (1 = PG)",
    ),
    _w(
        "IMAGEGEM_DETOXIFY_CHECKPOINT",
        "detoxify_checkpoint",
        "local Detoxify checkpoint for the prompt toxicity filter; unset → the bundled scorer",
    ),
    _w("IMAGEGEM_DUCKDB_MEMORY", "duckdb_memory_limit", "DuckDB memory limit of pipeline writers"),
    _w("IMAGEGEM_DUCKDB_THREADS", "duckdb_threads", "DuckDB threads of pipeline writers"),
    _w("IMAGEGEM_SAMPLE_USERS", "sample_users", "users of the embedded sample"),
    _w("IMAGEGEM_SAMPLE_SEED", "sample_seed", "seed of the embedded sample"),
    _w(
        "IMAGEGEM_S3_ENDPOINT_URL",
        "s3_endpoint_url",
        "S3 endpoint (MinIO, moto); credentials from the usual `AWS_*` variables",
    ),
    # Civitai
    _c(
        "CIVITAI_BASE_URL",
        "base_url",
        "Civitai site for the crawl and downloads (`https://civitai.com`, or a local fake "
        "server; `make ui`/`make demo` start one); unset → no downloads, and the crawl only "
        "with `IMAGEGEM_SOURCE=civitai` (then against civitai.com)",
    ),
    _c(
        "CIVITAI_API_TOKEN",
        "api_token",
        "API token, sent only as `Authorization: Bearer` (never logged or stored)",
        secret=True,
    ),
    _c("CIVITAI_RATE_LIMIT", "rate_limit", "requests per second to the site (0 = unlimited)"),
    Variable(
        "IMAGEGEM_CRAWL_START",
        "crawl partitions",
        "first daily crawl partition (YYYY-MM-DD), read when the code location loads",
        literal_default=DEFAULT_CRAWL_START,
    ),
    # media
    _m(
        "IMAGEGEM_IMAGE_BASE_URL",
        "image_base_url",
        "host that serves image URLs instead of `https://image.civitai.com`",
        shown_default="`CIVITAI_BASE_URL`",
    ),
    _m(
        "IMAGEGEM_MEDIA_MAX_IMAGES",
        "max_images",
        "images downloaded: whole users in userHash order up to this many",
    ),
    _m("IMAGEGEM_MEDIA_MAX_SIDE", "max_side", "stored images are shrunk to this longest side"),
    _m("IMAGEGEM_MEDIA_CONCURRENCY", "concurrency", "parallel image downloads (LoRAs: half)"),
    _m("IMAGEGEM_LORA_MAX_MB", "lora_max_mb", "largest LoRA file downloaded, in MB"),
    # ML stages
    _e(
        "IMAGEGEM_ENCODER",
        "encoder",
        "CLIP model config of the ML stages: an open_clip name (`ViT-H-14` in production), "
        "`imagegem-tiny`, or a JSON file",
    ),
    _e(
        "IMAGEGEM_ENCODER_CHECKPOINT",
        "checkpoint",
        "local encoder weights (safetensors, or .pt/.bin loaded weights-only); unset → "
        "`clip_encoder` trains the config on the warehouse's image–prompt pairs",
    ),
    _e("IMAGEGEM_DEVICE", "device", "`auto`, `cpu` or `cuda[:N]` for the ML stages"),
    _e("IMAGEGEM_PRECISION", "precision", "`fp32`, `fp16` or `bf16` (autocast on CUDA)"),
    _e("IMAGEGEM_BATCH_SIZE", "batch_size", "batch size of the ML stages"),
    _e("IMAGEGEM_ENCODER_WORKERS", "workers", "processes decoding images for the encoder"),
    _e(
        "IMAGEGEM_CLIP_TRAIN_SECONDS",
        "train_seconds",
        "wall-time budget of `clip_encoder`'s training when no checkpoint is set",
    ),
    Variable(
        "IMAGEGEM_EMBED_SHARDS",
        "embeddings stage",
        "static shards of `image_embeddings` (partitions; fixed when the code location loads)",
        literal_default=str(DEFAULT_EMBED_SHARDS),
    ),
    # preference and alignment stages
    _p(
        "IMAGEGEM_HPSV2_CHECKPOINT",
        "hpsv2_checkpoint",
        "local HPSv2 checkpoint (`HPS_v2_compressed.pt`, loaded weights-only); set → "
        "`image_scores` runs HPSv2 and pairs use it",
    ),
    _p("IMAGEGEM_HPSV2_MODEL", "hpsv2_model", "open_clip config of the HPSv2 checkpoint"),
    _p(
        "IMAGEGEM_PAIR_SCORER",
        "pair_scorer",
        "scorer that orders each prompt cluster's images: `auto` (HPSv2 when configured, else "
        "the reward model), `hpsv2`, `reward_model` or `clip_score`",
    ),
    _p(
        "IMAGEGEM_PAIRS_TOP_K",
        "pairs_top_k",
        "pairs per prompt cluster: the k best against the k worst (1 = the paper's best vs "
        "worst; the sample has only about ten clusters)",
    ),
    _p(
        "IMAGEGEM_REWARD_SECONDS",
        "reward_seconds",
        "wall-time budget of `reward_model`'s training",
    ),
    _p(
        "IMAGEGEM_DPO_BASE",
        "dpo_base",
        "local diffusers folder of the base model `dpo_lora` fine-tunes (SD 1.5 in "
        "production); unset → a tiny SD-1.5-shaped pipeline the pipeline builds from config",
    ),
    _p(
        "IMAGEGEM_BASE_TRAIN_SECONDS",
        "base_train_seconds",
        "wall-time budget of `diffusion_base`'s training of the tiny base (no IMAGEGEM_DPO_BASE)",
    ),
    _p("IMAGEGEM_DPO_STEPS", "dpo_steps", "most optimisation steps of `dpo_lora`"),
    _p("IMAGEGEM_DPO_SECONDS", "dpo_seconds", "wall-time budget of `dpo_lora`'s training"),
    _p(
        "IMAGEGEM_DPO_BETA",
        "dpo_beta",
        "Diffusion-DPO's β (the loss scales by β/2): 100 for the tiny base, 5000 for SD 1.5",
    ),
    _p("IMAGEGEM_DPO_RANK", "dpo_rank", "rank of the DPO LoRA (its alpha equals the rank)"),
    _p(
        "IMAGEGEM_DPO_RESOLUTION",
        "dpo_resolution",
        "training image size of `dpo_lora` (32 for the tiny base; 512 for SD 1.5)",
    ),
    # command line and local tools
    Variable(
        "IMAGEGEM_LOG_LEVEL",
        "`imagegem` command",
        "its Python log level (the demo's Dagster runs: `imagegem demo --log-level`)",
        literal_default=DEFAULT_LOG_LEVEL,
    ),
    Variable(
        "DAGSTER_HOME",
        "Dagster instance",
        "where runs and their logs are kept (`make` sets the repository root, whose "
        "`dagster.yaml` keeps them under `.dagster/`)",
        shown_default="— (the demo's runs are not kept)",
    ),
    Variable(
        "IMAGEGEM_FAKE_CIVITAI_TOKEN",
        "local fake Civitai",
        "API key it requires (`imagegem fake-civitai --token`)",
        shown_default="— (none required)",
        secret=True,
    ),
)
BY_NAME: dict[str, Variable] = {v.name: v for v in VARIABLES}


class ConfigError(ValueError):
    """An environment variable holds a value of the wrong kind."""


def env(name: str) -> str | None:
    """The value of a registered variable, ``None`` when unset or empty."""
    if name not in BY_NAME:
        raise KeyError(f"{name} is not a registered variable (add it to pipelines.config)")
    return os.environ.get(name) or None


def _parse(variable: Variable, text: str) -> Any:
    if variable.kind is not int:
        return text
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{variable.name}={text!r}: expected an integer") from None


def _bind(variable: Variable) -> Any:
    return dg.EnvVar.int(variable.name) if variable.kind is int else dg.EnvVar(variable.name)


def resource_values(resource: str, bind_env_vars: bool) -> dict[str, Any]:
    """Field → value (or ``dg.EnvVar``) for the variables of ``resource`` that are set."""
    values: dict[str, Any] = {}
    for variable in VARIABLES:
        if variable.resource != resource:
            continue
        text = env(variable.name)
        if text is None:
            continue
        value = _parse(variable, text)  # a bad value fails here, with the variable's name
        values[variable.field] = _bind(variable) if bind_env_vars else value
    return values


def resources_from_env(bind_env_vars: bool = True) -> PipelineResources:
    """Every resource from the environment; ``bind_env_vars`` binds set values as ``EnvVar``."""
    return PipelineResources(
        **{key: cls(**resource_values(key, bind_env_vars)) for key, cls in RESOURCE_CLASSES.items()}
    )


def crawl_start() -> str:
    """The first daily crawl partition: ``IMAGEGEM_CRAWL_START`` or a fixed date."""
    return env("IMAGEGEM_CRAWL_START") or DEFAULT_CRAWL_START


def embed_shards() -> int:
    """How many static shards ``image_embeddings`` is partitioned into."""
    text = env("IMAGEGEM_EMBED_SHARDS")
    if text is None:
        return DEFAULT_EMBED_SHARDS
    try:
        shards = int(text)
    except ValueError:
        raise ConfigError(f"IMAGEGEM_EMBED_SHARDS={text!r}: expected an integer") from None
    if not 1 <= shards <= 1000:
        raise ConfigError(f"IMAGEGEM_EMBED_SHARDS={shards}: expected 1 to 1000")
    return shards


def log_level() -> str:
    """The ``imagegem`` command's Python log level."""
    return (env("IMAGEGEM_LOG_LEVEL") or DEFAULT_LOG_LEVEL).upper()


def dagster_home() -> str | None:
    """The Dagster instance folder, if one is configured."""
    return env("DAGSTER_HOME")


def fake_civitai_token() -> str | None:
    """The API key the local fake Civitai requires, if any."""
    return env("IMAGEGEM_FAKE_CIVITAI_TOKEN")


def environment_for(values: dict[str, str]) -> dict[str, str]:
    """This process's environment with some registered variables set (for child processes)."""
    unknown = set(values) - set(BY_NAME)
    if unknown:
        raise KeyError(f"not registered variables: {', '.join(sorted(unknown))}")
    return {**os.environ, **values}


def markdown_table() -> str:
    """The README's configuration table."""
    lines = ["| variable | configures | meaning | default |", "|---|---|---|---|"]
    lines += [
        f"| `{v.name}` | {v.configures} | {v.meaning} | {v.default_text} |" for v in VARIABLES
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
