"""Materialize the whole graph in-process: every asset, every check and every crawl window.

Used by `imagegem demo`, the benchmark and the tests. Crawl windows (daily partitions of
`civitai_pages`) run oldest first; the last window's run also materializes every unpartitioned
asset, so the warehouse is built once from all of them.
"""

from __future__ import annotations

import dagster as dg

from assets.civitai import civitai_pages, crawl_windows
from pipelines.definitions import defs
from pipelines.resources import ImageGemSettings


def materialize_all(
    settings: ImageGemSettings,
    instance: dg.DagsterInstance | None = None,
    selection: dg.AssetSelection | None = None,
    raise_on_error: bool = True,
) -> dg.ExecuteInJobResult:
    """Run every asset and check (or ``selection``) with ``settings``; returns the last run."""
    instance = instance or dg.DagsterInstance.ephemeral()
    every = [*defs.assets, *defs.asset_checks]
    resources = {"imagegem": settings}
    windows = crawl_windows.get_partition_keys()
    selected = selection or dg.AssetSelection.all()
    keys = {k for k in selected.resolve(defs.resolve_asset_graph())}
    crawling = civitai_pages.key in keys
    for window in windows[:-1] if crawling else []:
        dg.materialize(
            every,
            selection=dg.AssetSelection.assets(civitai_pages),
            partition_key=window,
            resources=resources,
            instance=instance,
            raise_on_error=raise_on_error,
        )
    return dg.materialize(
        every,
        selection=selected,
        partition_key=windows[-1] if crawling else None,
        resources=resources,
        instance=instance,
        raise_on_error=raise_on_error,
    )
