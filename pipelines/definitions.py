"""The Dagster code location: assets, checks, jobs and the configuration resource."""

from __future__ import annotations

import dagster as dg

from assets import ingest, warehouse
from pipelines.resources import ImageGemSettings

all_assets_job = dg.define_asset_job(
    "imagegem_all",
    selection=dg.AssetSelection.all(),
    description="Materialize every asset (and run every check) on the configured source.",
)

defs = dg.Definitions(
    assets=[ingest.release_files, ingest.raw_images, ingest.raw_models, *warehouse.ALL_ASSETS],
    asset_checks=warehouse.ALL_CHECKS,
    jobs=[all_assets_job],
    resources={"imagegem": ImageGemSettings.from_env()},
)
