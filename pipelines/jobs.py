"""Jobs of the code location.

A run covers one partition of the assets it targets, and Dagster runs only assets of one
partitioning together, so the sharded ``image_embeddings`` has its own job:

* ``imagegem_all`` — every asset and check but the image shards: the crawl (needs a Civitai
  site), the warehouse, the media and the rest of the embeddings stage. ``imagegem demo``
  launches its runs through it and ``embed_images`` (see :mod:`pipelines.runner`).
* ``imagegem_warehouse`` — the same without the crawl (for a source other than ``civitai``
  and no Civitai site).
* ``embed_images`` — one shard of ``image_embeddings`` (partition ``shard-NN``).
* ``civitai_refresh`` — one daily window of the crawl (the daily schedule's target).
"""

import dagster as dg

from assets.civitai import civitai_pages, civitai_release
from assets.embeddings import image_embeddings

CRAWL = dg.AssetSelection.assets(civitai_pages, civitai_release)
SHARDS = dg.AssetSelection.assets(image_embeddings)
# Everything before the ML stages: sources, warehouse, media (tests and scripts that do not
# need models select this, and skip every training). Named positively, so a new ML group is
# never pulled in by accident.
WAREHOUSE_AND_MEDIA = dg.AssetSelection.groups("ingest", "warehouse", "media")

all_assets_job = dg.define_asset_job(
    "imagegem_all",
    selection=dg.AssetSelection.all() - SHARDS,
    description="Every asset and check but the image embedding shards (job embed_images): "
    "crawl (needs a Civitai site), warehouse, media, embeddings.",
)

warehouse_job = dg.define_asset_job(
    "imagegem_warehouse",
    selection=dg.AssetSelection.all() - CRAWL - SHARDS,
    description="The warehouse, media and embeddings from the configured source, without the "
    "crawl and the image shards.",
)

embed_images_job = dg.define_asset_job(
    "embed_images",
    selection=SHARDS,
    description="Embed one shard of the downloaded images (partition shard-NN).",
)

crawl_job = dg.define_asset_job(
    "civitai_refresh",
    selection=dg.AssetSelection.assets(civitai_pages),
    description="Crawl one daily window of the Civitai API.",
)

JOBS = [all_assets_job, warehouse_job, embed_images_job, crawl_job]
