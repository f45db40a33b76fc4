"""The Dagster code location: assets and checks, jobs, schedules, sensors, resources."""

import dagster as dg

from assets import alignment, civitai, embeddings, ingest, media, preferences, warehouse
from pipelines.config import resources_from_env
from pipelines.jobs import JOBS
from pipelines.resources import PipelineResources
from pipelines.schedules import SCHEDULES
from pipelines.sensors import SENSORS

ASSETS = [
    civitai.civitai_pages,
    civitai.civitai_release,
    ingest.release_files,
    ingest.raw_images,
    ingest.raw_models,
    *warehouse.ALL_ASSETS,
    media.image_files,
    media.lora_files,
    *embeddings.ALL_ASSETS,
    *preferences.ALL_ASSETS,
    *alignment.ALL_ASSETS,
]


def build_definitions(resources: PipelineResources) -> dg.Definitions:
    """The code location with ``resources`` bound (the runner binds plain values)."""
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=warehouse.ALL_CHECKS,
        jobs=JOBS,
        schedules=SCHEDULES,
        sensors=SENSORS,
        resources=resources.as_dict(),
    )


defs = build_definitions(resources_from_env())
