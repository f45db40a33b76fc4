"""Crawl benchmark: how close the crawler gets to the API's rate limit.

For each rate R: generate a small sample (once), serve it with the fake Civitai server at
``rate_limit=R`` (beyond it: 429), crawl it with a client paced at R requests/s, build the
release from the landing and report achieved requests/s and items/s, the share of R, the
server's 429 answers and duplicates (keys repeated in the built release, and items landed
twice). Target: ≥ 95 % of R at R = 20 and R = 100, no duplicates.

    python -m pipelines.civitai.bench [--rates 20,100] [--users 60]
"""

from __future__ import annotations

import argparse
import logging
import posixpath
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb

from pipelines.civitai.client import CivitaiClient, RetryPolicy
from pipelines.civitai.crawler import CrawlOptions, crawl
from pipelines.civitai.fake_server import serve_sample
from pipelines.sample.generator import SampleSpec, generate_sample, sample_is_current
from warehouse.civitai_release import build_release
from warehouse.duck import quote
from warehouse.lake import Lake
from warehouse.schema import IMAGES, MODELS

TARGET_SHARE = 0.95


@dataclass(frozen=True)
class CrawlBenchRow:
    """One rate's result."""

    rate: float
    requests: int
    seconds: float
    requests_per_second: float
    share: float  # achieved requests/s ÷ rate
    items: int
    items_per_second: float
    rate_limited: int  # 429 answers of the server's rate limiter
    duplicate_keys: int  # keys repeated in the built release (must be 0)
    duplicate_items: int  # items landed more than once (must be 0 without faults)
    complete: bool

    @property
    def ok(self) -> bool:
        return (
            self.complete
            and self.share >= TARGET_SHARE
            and self.duplicate_keys == 0
            and self.duplicate_items == 0
        )


def _metadata_spec(users: int) -> SampleSpec:
    """A sample without truth or media files (only the release metadata is served)."""
    return SampleSpec(users=users, with_truth=False, with_media=False)


def _duplicate_keys(folder: str) -> int:
    con = duckdb.connect()
    try:
        total = 0
        for table in (IMAGES, MODELS):
            key = ", ".join(table.key)
            files = quote(posixpath.join(folder, table.name, "*.parquet"))
            rows = con.execute(
                f"SELECT count(*) - count(DISTINCT ({key})) FROM read_parquet({files})"
            ).fetchall()
            total += int(rows[0][0])
        return total
    finally:
        con.close()


def run_crawl_benchmark(
    rates: Sequence[float] = (20, 100),
    *,
    users: int = 60,
    work: Path | None = None,
    concurrency: int = 8,
    images_limit: int = 50,
    logger: logging.Logger | None = None,
) -> list[CrawlBenchRow]:
    """Crawl the fake server once per rate in ``rates``; return one row per rate."""
    log = logger or logging.getLogger(__name__)
    with tempfile.TemporaryDirectory(prefix="crawl-bench-") as tmp:
        root = Path(work) if work is not None else Path(tmp)
        sample = root / "sample"
        spec = _metadata_spec(users)
        if not sample_is_current(sample, spec):
            generate_sample(sample, spec)
        results: list[CrawlBenchRow] = []
        for rate in rates:
            lake_root = Path(tempfile.mkdtemp(prefix=f"lake-r{rate:g}-", dir=root))
            with serve_sample(sample, rate_limit=rate) as server:
                client = CivitaiClient(server.url, rate_limit=rate, retry=RetryPolicy())
                report = crawl(
                    Lake(str(lake_root)),
                    "bench",
                    client,
                    CrawlOptions(
                        user_salt="bench-salt", concurrency=concurrency, images_limit=images_limit
                    ),
                    logger=log,
                )
                limited = server.stats["rate_limited"]
            out = lake_root / "release"
            build = build_release(Lake(str(lake_root)), out, logger=log)
            items = sum(report.items.values())
            seconds = report.seconds
            results.append(
                CrawlBenchRow(
                    rate=float(rate),
                    requests=report.requests,
                    seconds=seconds,
                    requests_per_second=report.requests / seconds if seconds else 0.0,
                    share=(report.requests / seconds) / rate if seconds else 0.0,
                    items=items,
                    items_per_second=items / seconds if seconds else 0.0,
                    rate_limited=limited,
                    duplicate_keys=_duplicate_keys(str(out)),
                    duplicate_items=sum(build.duplicates_dropped.values()),
                    complete=report.complete,
                )
            )
        return results


def format_table(rows: Sequence[CrawlBenchRow]) -> str:
    """The results as a small text table."""
    header = (
        f"{'R req/s':>8} {'requests':>9} {'seconds':>8} {'req/s':>7} {'share':>7} "
        f"{'items':>7} {'items/s':>8} {'429s':>5} {'dup keys':>8} {'dup items':>9} {'ok':>3}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.rate:>8g} {r.requests:>9,} {r.seconds:>8.2f} {r.requests_per_second:>7.2f} "
            f"{r.share:>7.1%} {r.items:>7,} {r.items_per_second:>8.0f} {r.rate_limited:>5} "
            f"{r.duplicate_keys:>8} {r.duplicate_items:>9} {'yes' if r.ok else 'NO':>3}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table; exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(prog="crawl-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="20,100", help="comma-separated rates (req/s)")
    parser.add_argument("--users", type=int, default=60, help="sample size (users)")
    parser.add_argument("--work", type=Path, default=None, help="keep the sample and lakes here")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    started = time.monotonic()
    rows = run_crawl_benchmark(rates, users=args.users, work=args.work)
    print(format_table(rows))
    print(f"target: >= {TARGET_SHARE:.0%} of R, no duplicates; {time.monotonic() - started:.0f}s")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
