"""The pipeline's resources, one per external system.

* :class:`WarehouseResource` (``warehouse``) — where the data lives (lake, catalog, S3), how
  DuckDB is bounded, which source is ingested and how rows are cleaned;
* :class:`CivitaiResource` (``civitai``) — the Civitai site the crawl and downloads talk to;
* :class:`MediaResource` (``media``) — what the image and LoRA downloads fetch and keep;
* :class:`EncoderResource` (``encoder``) — the encoder, checkpoint and device of the ML stages;
* :class:`PreferencesResource` (``preferences``) — the preference and alignment stages:
  scorers and their checkpoints, pairing, the reward model and the Diffusion-DPO fine-tune.

Each is built with plain values (CLI, tests) or, in the code location, bound to environment
variables as ``dg.EnvVar`` so the UI shows where a value comes from and never the value. The
variables, their defaults and the binding live in :mod:`pipelines.config`; nothing here reads
the environment.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, field, replace

import dagster as dg

from pipelines.civitai.client import DEFAULT_BASE_URL, CivitaiClient
from pipelines.civitai.downloads import image_url_map
from warehouse.clean import CleanConfig
from warehouse.duck import DuckSettings, connect
from warehouse.lake import Lake, is_remote
from warehouse.safety import ToxicityScorer, make_scorer

DEV_SALT = "imagegem-dev-salt-change-me"
SOURCES = ("sample", "release", "civitai")


class WarehouseResource(dg.ConfigurableResource):
    """The lake, the catalog, DuckDB's limits, the source and the cleaning rules."""

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

    # -- locations -----------------------------------------------------------------------------
    def home_root(self) -> str:
        """The absolute home (a local path, or the ``s3://`` URL as given)."""
        return self.home.rstrip("/") if is_remote(self.home) else os.path.abspath(self.home)

    def storage_options(self) -> dict:
        """fsspec options for the lake and the release (the S3 endpoint, when set)."""
        return (
            {"client_kwargs": {"endpoint_url": self.s3_endpoint_url}}
            if self.s3_endpoint_url
            else {}
        )

    def lake(self) -> Lake:
        """The versioned Parquet lake under ``$IMAGEGEM_HOME/lake``."""
        return Lake(posixpath.join(self.home_root(), "lake"), self.storage_options())

    def catalog_path(self) -> str:
        """The DuckDB catalog file (always local, also when the lake is on S3)."""
        if self.catalog:
            return os.path.abspath(self.catalog)
        if is_remote(self.home):
            return os.path.abspath(os.path.join("data", "warehouse.duckdb"))
        return os.path.join(self.home_root(), "warehouse.duckdb")

    def sample_dir(self) -> str:
        """Where the embedded sample is generated (always local: it is the 'download')."""
        base = os.path.abspath("data") if is_remote(self.home) else self.home_root()
        return os.path.join(base, "sources", "sample")

    def truth_root(self) -> str | None:
        """The sample folder holding a planted ``truth/`` for the evaluation assets (the
        configured release when it is a generated sample, else the embedded sample), or
        None on data without planted truth (a published release, the live crawl)."""
        roots = [self.sample_dir()]
        if self.source == "release" and self.release_path:
            roots.insert(0, self.release_path)
        return next((r for r in roots if os.path.isdir(os.path.join(r, "truth"))), None)

    def civitai_release_dir(self) -> str:
        """Where the crawl's pages, mapped to the release format, are written."""
        return posixpath.join(self.home_root(), "sources", "civitai")

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
        """The clean stage's rules with this resource's thresholds."""
        return CleanConfig(
            max_browsing_level=self.max_browsing_level,
            toxicity_threshold=self.toxicity_threshold,
            max_prompt_chars=self.max_prompt_chars,
            source=self.source,
        )

    def scorer(self) -> ToxicityScorer:
        """Detoxify from the configured checkpoint, else the bundled scorer."""
        return make_scorer(self.detoxify_checkpoint)

    def duck(self):
        """A bounded DuckDB connection that can reach the lake."""
        temp = None if is_remote(self.home) else os.path.join(self.home_root(), "tmp", "duckdb")
        settings = DuckSettings(self.duckdb_memory_limit, self.duckdb_threads, temp)
        return connect(self.lake(), settings)


class CivitaiResource(dg.ConfigurableResource):
    """The Civitai site (or a local fake server) for the crawl and the downloads.

    Without ``base_url`` no site is configured: the crawl runs only when the warehouse source
    is ``civitai`` (then against civitai.com) and the downloads have nothing to fetch from.
    """

    base_url: str | None = None
    api_token: str | None = None
    rate_limit: int = 5

    def site(self) -> str:
        """The base URL requests go to."""
        return self.base_url or DEFAULT_BASE_URL

    def client(self, logger: logging.Logger | None = None) -> CivitaiClient:
        """An API client for this site: the token only in the header, the rate limit applied."""
        return CivitaiClient(
            self.site(), self.api_token, rate_limit=self.rate_limit or None, logger=logger
        )


class MediaResource(dg.ConfigurableResource):
    """What the image and LoRA downloads fetch and keep."""

    image_base_url: str | None = None
    max_images: int = 2000
    max_side: int = 512
    concurrency: int = 8
    lora_max_mb: int = 512

    def image_url_map(self, civitai_base_url: str | None) -> dict[str, str]:
        """Image CDN → the configured image host (else the Civitai site, e.g. the fake one)."""
        target = self.image_base_url or civitai_base_url
        return image_url_map(target) if target else {}


class EncoderResource(dg.ConfigurableResource):
    """The encoder of the ML stages: which model, from which weights, on which device.

    ``encoder`` names a model config of the encoder registry (:mod:`ml.encoders`: an open_clip
    config name such as ``ViT-H-14``, a shipped config such as ``imagegem-tiny``, or a JSON
    file). ``checkpoint`` is a local weights file (safetensors preferred); when it is set,
    ``clip_encoder`` registers it, else ``clip_encoder`` trains the config on the warehouse's
    (image, prompt) pairs for at most ``train_seconds``. ``device`` is ``auto`` (CUDA when
    available, else CPU), ``cpu`` or ``cuda[:N]``; ``precision`` (``fp32``, ``fp16``,
    ``bf16``) applies as autocast on CUDA; ``workers`` decode images in that many processes.
    """

    encoder: str = "imagegem-tiny"
    checkpoint: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 64
    workers: int = 1
    train_seconds: int = 90

    def load(self, lake: Lake, cache_dir: str):
        """The encoder the embedding assets use: the configured checkpoint, else the latest
        ``clip_encoder`` artifact of this config. Remote checkpoints are copied to
        ``cache_dir`` first (by content digest, so each is fetched once)."""
        from ml.encoders import load_encoder
        from warehouse.artifacts import latest_artifact

        if self.checkpoint:
            return load_encoder(self.encoder, self.checkpoint, self.device, self.precision)
        artifact = latest_artifact(lake, "clip_encoder")
        if artifact is None or artifact.config.get("model") != self.encoder:
            raise ValueError(
                f"no trained encoder for config {self.encoder!r}: materialize clip_encoder "
                "first (or set IMAGEGEM_ENCODER_CHECKPOINT)"
            )
        checkpoint = artifact.file(artifact.config["checkpoint_file"])
        if lake.remote:
            digest = artifact.files[artifact.config["checkpoint_file"]]
            local = os.path.join(cache_dir, f"{digest}.safetensors")
            if not os.path.exists(local):
                os.makedirs(cache_dir, exist_ok=True)
                lake.fs.get(checkpoint, local)
            checkpoint = local
        return load_encoder(self.encoder, checkpoint, self.device, self.precision)


class PreferencesResource(dg.ConfigurableResource):
    """The preference and alignment stages (ImageGem's aggregate preference alignment).

    ``hpsv2_checkpoint``: a local HPSv2 checkpoint (open_clip ``hpsv2_model``, ViT-H-14);
    when set, ``image_scores`` also runs HPSv2 and it is the default pair scorer.
    ``pair_scorer``: which scorer orders the images of a cluster (``auto``: HPSv2 when
    configured, else the reaction-trained reward model; or ``hpsv2``, ``reward_model``,
    ``clip_score``); ``pairs_top_k`` pairs per cluster: the k best against the k worst (1 is
    the paper's best vs worst; the default 16 because the sample's prompts fall into about
    ten clusters, one per planted style, where ImageGem's 2.9 M prompts give thousands).
    ``reward_seconds`` bounds the reward model's training. ``dpo_base``: a local diffusers
    folder of the base model (SD 1.5 in production); unset, the pipeline builds a tiny SD-1.5
    shaped pipeline from config once, trains it for at most ``base_train_seconds`` on the
    warehouse's images and fine-tunes that (every output says ``tiny_model``).
    ``dpo_steps`` / ``dpo_seconds`` bound the fine-tune; ``dpo_beta`` and ``dpo_rank`` are
    Diffusion-DPO's β (100 suits the tiny base; the paper's 5000 for SD 1.5) and the LoRA rank; ``dpo_resolution`` the training image size (32 for
    the tiny base, 512 for SD 1.5).
    """

    hpsv2_checkpoint: str | None = None
    hpsv2_model: str = "ViT-H-14"
    pair_scorer: str = "auto"
    pairs_top_k: int = 16
    reward_seconds: int = 60
    dpo_base: str | None = None
    base_train_seconds: int = 60
    dpo_steps: int = 500
    dpo_seconds: int = 60
    dpo_beta: int = 100
    dpo_rank: int = 4
    dpo_resolution: int = 32

    def scorer_for_pairs(self) -> str:
        """The scorer ``preference_pairs`` orders clusters by."""
        choices = ("auto", "hpsv2", "reward_model", "clip_score")
        if self.pair_scorer not in choices:
            raise ValueError(
                f"IMAGEGEM_PAIR_SCORER={self.pair_scorer!r}: expected one of {', '.join(choices)}"
            )
        if self.pair_scorer == "auto":
            return "hpsv2" if self.hpsv2_checkpoint else "reward_model"
        if self.pair_scorer == "hpsv2" and not self.hpsv2_checkpoint:
            raise ValueError("IMAGEGEM_PAIR_SCORER=hpsv2 needs IMAGEGEM_HPSV2_CHECKPOINT")
        return self.pair_scorer


RESOURCE_KEYS = ("warehouse", "civitai", "media", "encoder", "preferences")


@dataclass(frozen=True)
class PipelineResources:
    """One value of every resource, as the code location binds them (``as_dict``)."""

    warehouse: WarehouseResource = field(default_factory=WarehouseResource)
    civitai: CivitaiResource = field(default_factory=CivitaiResource)
    media: MediaResource = field(default_factory=MediaResource)
    encoder: EncoderResource = field(default_factory=EncoderResource)
    preferences: PreferencesResource = field(default_factory=PreferencesResource)

    def as_dict(self) -> dict[str, dg.ConfigurableResource]:
        """Resource key → resource, for ``Definitions`` and ``execute_in_process``."""
        return {key: getattr(self, key) for key in RESOURCE_KEYS}

    def replace(self, **resources: dg.ConfigurableResource) -> PipelineResources:
        """A copy with some resources swapped."""
        return replace(self, **resources)
