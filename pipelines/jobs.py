"""Jobs of the code location.

* ``imagegem_all`` — every asset and check: the crawl (needs a Civitai site), the warehouse
  and the media. ``imagegem demo`` launches its runs through it.
* ``imagegem_warehouse`` — the warehouse and the media from the configured source, without
  the crawl (for a source other than ``civitai`` and no Civitai site).
* ``civitai_refresh`` — one daily window of the crawl (the daily schedule's target).
"""

import dagster as dg

from assets.civitai import civitai_pages, civitai_release

CRAWL = dg.AssetSelection.assets(civitai_pages, civitai_release)

all_assets_job = dg.define_asset_job(
    "imagegem_all",
    selection=dg.AssetSelection.all(),
    description="Every asset and check: crawl (needs a Civitai site), warehouse, media.",
)

warehouse_job = dg.define_asset_job(
    "imagegem_warehouse",
    selection=dg.AssetSelection.all() - CRAWL,
    description="The warehouse and the media from the configured source, without the crawl.",
)

crawl_job = dg.define_asset_job(
    "civitai_refresh",
    selection=dg.AssetSelection.assets(civitai_pages),
    description="Crawl one daily window of the Civitai API.",
)

JOBS = [all_assets_job, warehouse_job, crawl_job]
