"""The Dagster code location: assets, checks, jobs, schedules, sensors and the resource."""

import dagster as dg

from assets import civitai, ingest, media, warehouse
from pipelines.resources import ImageGemSettings

all_assets_job = dg.define_asset_job(
    "imagegem_all",
    selection=dg.AssetSelection.all(),
    description="Materialize every asset (and run every check) on the configured source.",
)

# Brings every downstream table up to date when new raw data lands (eager conditions).
warehouse_automation = dg.AutomationConditionSensorDefinition(
    "warehouse_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Materializes assets whose eager automation condition fires (new crawl pages → clean tables → catalog).",
)

defs = dg.Definitions(
    assets=[
        civitai.civitai_pages,
        civitai.civitai_release,
        ingest.release_files,
        ingest.raw_images,
        ingest.raw_models,
        *warehouse.ALL_ASSETS,
        media.image_files,
        media.lora_files,
    ],
    asset_checks=warehouse.ALL_CHECKS,
    jobs=[all_assets_job, civitai.crawl_job],
    schedules=[civitai.civitai_daily_refresh],
    sensors=[warehouse_automation],
    resources={"imagegem": ImageGemSettings.from_env()},
)
