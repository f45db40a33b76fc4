"""Materialize the whole graph in-process, through the named jobs, and summarise what ran.

Used by ``imagegem demo``, the tests and anyone scripting the pipeline. Runs go through the
code location's jobs (``imagegem_all``, or ``imagegem_warehouse`` when there is no Civitai
site to crawl, ``civitai_refresh`` for extra crawl windows and ``embed_images`` for the image
shards) with the given resources, so the Dagster UI lists them under those names. The crawl
covers today's window unless other windows are given (oldest first; each but the last in its
own run, the last together with every unpartitioned asset up to the image shards, so the
warehouse is built once from all of them); then every shard of ``image_embeddings`` runs,
one run each, and last the assets downstream of the shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg

from assets.civitai import crawl_configured
from assets.embeddings import image_embeddings
from pipelines.definitions import build_definitions, defs
from pipelines.jobs import all_assets_job, crawl_job, embed_images_job, warehouse_job
from pipelines.partitions import embedding_shards, today_window
from pipelines.resources import PipelineResources
from warehouse.artifacts import latest_artifact


def _run_config(log_level: str | None) -> dict:
    if log_level is None:
        return {}
    return {"loggers": {"console": {"config": {"log_level": log_level.upper()}}}}


def materialize_runs(
    resources: PipelineResources,
    instance: dg.DagsterInstance | None = None,
    selection: dg.AssetSelection | None = None,
    raise_on_error: bool = True,
    windows: Sequence[str] | None = None,
    log_level: str | None = None,
) -> list[dg.ExecuteInProcessResult]:
    """Run every asset and check (or ``selection``) with ``resources`` (plain values, as
    ``config.resources_from_env(bind_env_vars=False)`` gives); every run's result.

    Without a Civitai site to crawl, the crawl assets are left out (the run goes through
    ``imagegem_warehouse``): they could only fail. ``log_level`` sets the console logger of
    the runs (the instance keeps every event whatever it is).
    """
    instance = instance or dg.DagsterInstance.ephemeral()
    graph = defs.resolve_asset_graph()
    wanted = (selection or dg.AssetSelection.all()).resolve(graph)
    crawling = crawl_configured(resources.warehouse, resources.civitai)
    job = all_assets_job if crawling else warehouse_job
    job_keys = (job.selection or dg.AssetSelection.all()).resolve(graph)
    shards_key = image_embeddings.key
    after_shards = dg.AssetSelection.assets(image_embeddings).downstream().resolve(graph)
    keys = sorted(wanted & job_keys)
    before = [k for k in keys if k not in after_shards]
    after = [k for k in keys if k in after_shards and k != shards_key]
    pages = defs.resolve_assets_def("civitai_pages").key
    windows = list(windows) if windows else [today_window()]
    bound = build_definitions(resources)
    common = dict(
        instance=instance, raise_on_error=raise_on_error, run_config=_run_config(log_level)
    )
    results = []
    if pages in keys:
        for window in windows[:-1]:
            results.append(
                bound.resolve_job_def(crawl_job.name).execute_in_process(
                    partition_key=window, **common
                )
            )
    if before:
        results.append(
            bound.resolve_job_def(job.name).execute_in_process(
                asset_selection=before,
                partition_key=windows[-1] if pages in keys else None,
                **common,
            )
        )
    # The shards and what follows them need an encoder: a configured checkpoint, or the one
    # clip_encoder trained (it records no materialization when there was nothing to train on).
    encoder_ready = bool(resources.encoder.checkpoint) or (
        latest_artifact(resources.warehouse.lake(), "clip_encoder") is not None
    )
    if not encoder_ready:
        return results
    if shards_key in wanted:
        shards = bound.resolve_job_def(embed_images_job.name)
        for shard in embedding_shards.get_partition_keys():
            results.append(shards.execute_in_process(partition_key=shard, **common))
    if after:
        results.append(
            bound.resolve_job_def(job.name).execute_in_process(asset_selection=after, **common)
        )
    return results


def materialize_all(
    resources: PipelineResources,
    instance: dg.DagsterInstance | None = None,
    selection: dg.AssetSelection | None = None,
    raise_on_error: bool = True,
    windows: Sequence[str] | None = None,
    log_level: str | None = None,
) -> dg.ExecuteInProcessResult:
    """:func:`materialize_runs`, returning the last run."""
    return materialize_runs(resources, instance, selection, raise_on_error, windows, log_level)[-1]


# -- the summary a person reads after a demo -------------------------------------------------


@dataclass(frozen=True)
class StageRow:
    """One materialized asset: its group, row counts and step time (None: not reported)."""

    group: str
    asset: str
    rows_in: int | None
    rows_out: int | None
    quarantined: int | None
    seconds: float | None


def _value(metadata: dict, *names: str) -> int | None:
    found = [metadata[n].value for n in names if n in metadata]
    numbers = [v for v in found if isinstance(v, int | float) and not isinstance(v, bool)]
    return int(sum(numbers)) if numbers else None


def _rows_out(metadata: dict) -> int | None:
    if "dagster/row_count" in metadata:
        return _value(metadata, "dagster/row_count")
    if "items" in metadata:  # the crawl: items landed per stream
        items = metadata["items"].value
        return int(sum(items.values())) if isinstance(items, dict) else None
    return _value(metadata, "image_rows", "model_rows")


def stage_rows(results: Sequence[dg.ExecuteInProcessResult]) -> list[StageRow]:
    """Every materialization of ``results``, in run order, as a :class:`StageRow`."""
    graph = defs.resolve_asset_graph()
    rows = []
    for result in results:
        seconds = {
            e.step_key: e.event_specific_data.duration_ms / 1000
            for e in result.all_events
            if e.event_type_value == "STEP_SUCCESS"
        }
        for event in result.get_asset_materialization_events():
            mat = event.event_specific_data.materialization
            metadata = dict(mat.metadata)
            key = mat.asset_key
            name = key.to_user_string() + (f" [{mat.partition}]" if mat.partition else "")
            quarantined = _value(metadata, "quarantined")
            if quarantined is None:
                quarantined = _value(metadata, "failed", "refused")
            rows.append(
                StageRow(
                    group=graph.get(key).group_name or "default",
                    asset=name,
                    rows_in=_value(metadata, "rows_in"),
                    rows_out=_rows_out(metadata),
                    quarantined=quarantined,
                    seconds=seconds.get(event.step_key),
                )
            )
    return rows


def format_summary(rows: Sequence[StageRow]) -> str:
    """A plain-text table of :func:`stage_rows`, one line per asset, grouped by stage."""

    def num(value: int | None) -> str:
        return "—" if value is None else f"{value:,}"

    header = ("stage", "asset", "rows in", "rows out", "quarantined", "seconds")
    lines = [header]
    for row in sorted(rows, key=lambda r: _STAGE_ORDER.get(r.group, 99)):
        seconds = "—" if row.seconds is None else f"{row.seconds:.1f}"
        lines.append(
            (
                row.group,
                row.asset,
                num(row.rows_in),
                num(row.rows_out),
                num(row.quarantined),
                seconds,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


_STAGE_ORDER = {"ingest": 0, "warehouse": 1, "media": 2, "embeddings": 3}


def format_checks(results: Sequence[dg.ExecuteInProcessResult]) -> str:
    """One line: how many asset checks passed, and which failed."""
    evaluations = [c for r in results for c in r.get_asset_check_evaluations()]
    failed = [f"{c.asset_key.to_user_string()}:{c.check_name}" for c in evaluations if not c.passed]
    line = f"asset checks: {len(evaluations) - len(failed)} passed, {len(failed)} failed"
    return line + (f" ({', '.join(failed)})" if failed else "")
