"""Partition definitions of the code location.

``crawl_windows`` — one partition per UTC day, the window a crawl run lands its pages in. It
starts at a fixed date (``IMAGEGEM_CRAWL_START``, default in :mod:`pipelines.config`), never at
"today": a reload tomorrow keeps every window that exists today, so materialized windows stay
inside the set and older ones can be backfilled. ``end_offset=1`` makes today's window exist
(a refresh crawls "today so far").
"""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg

from pipelines import config

WINDOW_FORMAT = "%Y-%m-%d"


def utc_now() -> datetime:
    """The current time, timezone-aware UTC (the one clock of the partition helpers)."""
    return datetime.now(UTC)


def crawl_windows_def(start: str | None = None) -> dg.DailyPartitionsDefinition:
    """Daily UTC windows from ``start`` (default: the configured crawl start) to today."""
    return dg.DailyPartitionsDefinition(
        start_date=start or config.crawl_start(), end_offset=1, timezone="UTC"
    )


crawl_windows = crawl_windows_def()


def window_of(when: datetime) -> str:
    """The crawl window (UTC day) that contains ``when``."""
    return when.astimezone(UTC).strftime(WINDOW_FORMAT)


def today_window(
    now: datetime | None = None, windows: dg.DailyPartitionsDefinition = crawl_windows
) -> str:
    """Today's crawl window at ``now`` (default: the clock), checked to be in ``windows``."""
    now = now or utc_now()
    key = window_of(now)
    if key not in windows.get_partition_keys(current_time=now):
        raise ValueError(
            f"today's crawl window {key} is outside the crawl partitions (they start at "
            f"{windows.start.strftime(WINDOW_FORMAT)}): set IMAGEGEM_CRAWL_START to a past date"
        )
    return key


def embedding_shards_def(n_shards: int | None = None) -> dg.StaticPartitionsDefinition:
    """The static shards of ``image_embeddings`` (``shard-00`` ...): each a separate run that
    embeds the images whose imageId hashes to it, so shards run in parallel in the ``gpu``
    pool and a rerun redoes only the shards asked for."""
    from warehouse.embeddings import shard_names

    return dg.StaticPartitionsDefinition(shard_names(n_shards or config.embed_shards()))


embedding_shards = embedding_shards_def()
