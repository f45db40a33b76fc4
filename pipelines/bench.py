"""The full-scale benchmark: ImageGem-size release → raw landing → clean tables → catalog.

``imagegem bench`` generates the full-scale sample once (5,658,107 image rows, 242,889 model
rows, metadata only) and rewrites it once more as a single-file release (one Parquet file
per table; the images file in 12 row groups, as a user may well download it). It then runs,
each in its own child process so that wall time, CPU time and peak RSS are the child's own:

1. phase 1 (ingest + clean + catalog) on the sharded release and on the single-file release;
2. a pandas baseline on the single file, the way the release notebook cleans it
   (``pd.read_parquet``, drop duplicates, drop rows with null keys, keep browsingLevel ≤ 1);
3. phase 2 (the rest of the warehouse) on the sharded release's lake.

Every phase-1 figure is printed next to the pandas baseline measured in the same run, as a
ratio. Targets on 2 cores: phase 1 ≤ 30 s and ≤ 4 GiB on both shapes, faster than pandas.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TARGET_SECONDS = 30.0
TARGET_RSS_GIB = 4.0
SINGLE_FILE_ROW_GROUPS = 12
SINGLE_FILE_VERSION = 1  # bump when the single-file layout changes

CORE = [
    "release_files",
    "raw_images",
    "raw_models",
    "images",
    "models",
    "quarantine",
    "warehouse_catalog",
]
RUNS = ("sharded", "single", "pandas", "rest")


@dataclass
class ChildRun:
    """One child process: its wall time (measured by the parent) and its JSON summary."""

    wall: float
    summary: dict = field(default_factory=dict)

    @property
    def cpu(self) -> float:
        return float(self.summary.get("cpu_s", 0.0))

    @property
    def rss_gib(self) -> float:
        return float(self.summary.get("peak_rss_gib", 0.0))


# -- inputs -----------------------------------------------------------------------------------


def single_file_release(sample: Path, out: Path, row_groups: int = SINGLE_FILE_ROW_GROUPS) -> Path:
    """The sample rewritten as one Parquet file per table, once (cached by the sample's manifest).

    ``images.parquet`` holds every image row in ``row_groups`` row groups of equal size,
    snappy-compressed (pandas' and pyarrow's default, as a downloaded release would be);
    ``models.parquet`` holds every model row. Files are written atomically and the marker
    ``single-file.json`` last, so an interrupted rewrite is redone on the next run.
    """
    import pyarrow.parquet as pq

    from warehouse.files import atomic_local_path, atomic_write_bytes

    manifest = json.loads((sample / "manifest.json").read_text())
    expected = {
        "version": SINGLE_FILE_VERSION,
        "row_groups": row_groups,
        "sample_manifest_sha256": hashlib.sha256(
            json.dumps(manifest, sort_keys=True).encode()
        ).hexdigest(),
    }
    marker = out / "single-file.json"
    names = ("images", "models")
    if (
        marker.is_file()
        and json.loads(marker.read_text()) == expected
        and all((out / f"{n}.parquet").is_file() for n in names)
    ):
        return out
    print(f"rewriting the sample as one file per table into {out} (once) ...", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for name in names:
        shards = [sample / f for f in manifest["files"][name]]
        total = sum(pq.ParquetFile(s).metadata.num_rows for s in shards)
        per_group = -(-total // row_groups) if name == "images" else max(total, 1)
        schema = pq.ParquetFile(shards[0]).schema_arrow
        with (
            atomic_local_path(str(out / f"{name}.parquet")) as tmp,
            pq.ParquetWriter(tmp, schema, compression="snappy") as writer,
        ):
            pending = []
            pending_rows = 0
            for shard in shards:
                for batch in pq.ParquetFile(shard).iter_batches(batch_size=65_536):
                    pending.append(batch)
                    pending_rows += batch.num_rows
                    while pending_rows >= per_group:
                        pending, pending_rows = _flush_group(writer, pending, per_group)
            if pending_rows:
                _flush_group(writer, pending, pending_rows)
    atomic_write_bytes(str(marker), json.dumps(expected).encode())
    return out


def _flush_group(writer, batches: list, rows: int) -> tuple[list, int]:
    """Write the first ``rows`` rows of ``batches`` as one row group; return what is left."""
    import pyarrow as pa

    table = pa.Table.from_batches(batches)
    writer.write_table(table.slice(0, rows), row_group_size=rows)
    rest = table.slice(rows)
    return rest.to_batches(), rest.num_rows


# -- the parent -------------------------------------------------------------------------------


def run_benchmark(work: Path, memory_limit: str = "2GB", runs: tuple[str, ...] = RUNS) -> int:
    """Run the benchmark under ``work`` and print the report; 0 unless a child failed."""
    from pipelines.sample.generator import SampleSpec, generate_sample, sample_is_current

    work.mkdir(parents=True, exist_ok=True)
    release = work / "full-sample"
    spec = SampleSpec.full()
    if not sample_is_current(release, spec):
        print(f"generating the full-scale sample into {release} (once) ...", flush=True)
        started = time.monotonic()
        generate_sample(release, spec)
        print(f"  generated in {time.monotonic() - started:,.0f}s", flush=True)
    else:
        print(f"reusing the full-scale sample at {release}")
    single = work / "single-file"
    if "single" in runs or "pandas" in runs:
        single_file_release(release, single)

    def env(root: Path, home: Path) -> dict[str, str]:
        return {
            **os.environ,
            "IMAGEGEM_HOME": str(home),
            "IMAGEGEM_SOURCE": "release",
            "IMAGEGEM_RELEASE_PATH": str(root),
            "IMAGEGEM_DUCKDB_MEMORY": memory_limit,
        }

    sharded_env = env(release, work / "home")
    plan = {
        "sharded": (["core"], sharded_env),
        "single": (["core"], env(single, work / "home-single")),
        "pandas": (["pandas", str(single / "images.parquet")], dict(os.environ)),
        "rest": (["rest"], sharded_env),
    }
    results: dict[str, ChildRun] = {}
    for name in RUNS:  # fixed order: phase 2 runs on the sharded run's lake
        if name not in runs:
            continue
        if name == "pandas" and importlib.util.find_spec("pandas") is None:
            print("pandas is not installed: the pandas baseline is skipped (pip install pandas)")
            continue
        args, child_env = plan[name]
        print(f"running {name} ...", flush=True)
        run = _run_child(args, child_env)
        if isinstance(run, int):
            return run
        results[name] = run
    print(format_report(results, memory_limit))
    return 0


def _run_child(args: list[str], env: dict[str, str]) -> ChildRun | int:
    started = time.monotonic()
    child = subprocess.run(
        [sys.executable, "-m", "pipelines.bench", *args],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - started
    if child.returncode != 0:
        print(child.stdout, child.stderr, sep="\n")
        return child.returncode
    return ChildRun(wall, json.loads(child.stdout.strip().splitlines()[-1]))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def format_report(results: dict[str, ChildRun], memory_limit: str = "2GB") -> str:
    """The benchmark report: phase 1 per input shape side by side, ratios to pandas, phase 2."""
    lines = [f"\nfull-scale benchmark, {os.cpu_count()} cores (DuckDB memory limit {memory_limit})"]
    shapes = [s for s in ("sharded", "single") if s in results]
    pandas = results.get("pandas")
    ok = True
    if shapes:
        titles = {"sharded": "sharded release", "single": "single file"}
        lines.append("\n1. ingest + clean + catalog (phase 1)")
        lines.append(f"  {'':<36}" + "".join(f"{titles[s]:>18}" for s in shapes))
        steps: list[str] = []
        for s in shapes:
            steps += [k for k in results[s].summary.get("steps", {}) if k not in steps]
        for step in steps:
            cells = [results[s].summary.get("steps", {}).get(step) for s in shapes]
            lines.append(
                f"  {step:<36}"
                + "".join(f"{c:>16.1f} s" if c is not None else f"{'-':>18}" for c in cells)
            )

        def row(label: str, values: list[str]) -> None:
            lines.append(f"  {label:<36}" + "".join(f"{v:>18}" for v in values))

        first = results[shapes[0]].summary
        rows = first["raw_image_rows"] + first["raw_model_rows"]
        row("wall time (process start to exit)", [f"{results[s].wall:.1f} s" for s in shapes])
        row("CPU time (user + system)", [f"{results[s].cpu:.1f} s" for s in shapes])
        row("peak RSS", [f"{results[s].rss_gib:.2f} GiB" for s in shapes])
        row("throughput", [f"{rows / results[s].wall:,.0f} rows/s" for s in shapes])
        if pandas:
            row("wall time / pandas", [_ratio(results[s].wall, pandas.wall) for s in shapes])
            row("peak RSS / pandas", [_ratio(results[s].rss_gib, pandas.rss_gib) for s in shapes])
        lines.append(
            f"  rows in      {rows:,} ({first['raw_image_rows']:,} image + "
            f"{first['raw_model_rows']:,} model rows)"
        )
        lines.append(
            f"  clean images {first['clean_image_rows']:,}   quarantined {first['quarantined']:,}"
        )
        lines.append(
            f"  targets: wall ≤ {TARGET_SECONDS:.0f} s, peak RSS ≤ {TARGET_RSS_GIB:.0f} GiB, "
            "faster than pandas"
        )
        for s in shapes:
            run = results[s]
            ok = ok and run.wall <= TARGET_SECONDS and run.rss_gib <= TARGET_RSS_GIB
            ok = ok and (pandas is None or run.wall < pandas.wall)
    if pandas:
        p = pandas.summary
        lines.append(
            f"\n   pandas {p.get('pandas_version', '?')} baseline on the single file "
            "(read_parquet, drop_duplicates, dropna on keys, browsingLevel ≤ 1)"
        )
        lines.append(
            f"  wall {pandas.wall:.1f} s   CPU {pandas.cpu:.1f} s   peak RSS "
            f"{pandas.rss_gib:.2f} GiB   rows in {p['rows_in']:,}, kept {p['rows_out']:,}"
        )
        for step, seconds in p.get("steps", {}).items():
            lines.append(f"  {step:<36} {seconds:7.1f} s")
    rest = results.get("rest")
    if rest:
        lines.append(
            "\n2. the rest of the warehouse (users, loras, image_loras, prompts, interactions, "
            "Table 1, catalog)"
        )
        for name, seconds in rest.summary.get("steps", {}).items():
            lines.append(f"  {name:<40} {seconds:7.1f} s")
        lines.append(
            f"  wall time    {rest.wall:.1f} s   CPU {rest.cpu:.1f} s   "
            f"peak RSS {rest.rss_gib:.2f} GiB"
        )
    if shapes:
        lines.append("\nresult (phase 1): " + ("within targets" if ok else "OUTSIDE targets"))
    return "\n".join(lines)


# -- the children -----------------------------------------------------------------------------


def _usage() -> dict[str, float]:
    """CPU seconds and peak RSS of this process (and of any children it waited for)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
        "peak_rss_gib": max(me.ru_maxrss, kids.ru_maxrss) / 1024**2,
    }


def _child(phase: str) -> None:
    """Materialize one phase of the warehouse in-process; print a JSON summary."""
    import dagster as dg

    from pipelines.definitions import defs

    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    every = [*defs.assets, *defs.asset_checks]  # the crawl is not part of this benchmark
    keys = [a.key for a in defs.assets if a.key.to_user_string() in CORE]
    if phase == "rest":
        skip = {*CORE[:-1], "civitai_pages", "civitai_release"}
        keys = [a.key for a in defs.assets if a.key.to_user_string() not in skip]
    result = dg.materialize(
        every,
        selection=dg.AssetSelection.assets(*keys),
        resources=defs.resources,
        instance=dg.DagsterInstance.ephemeral(),
    )
    seconds = time.monotonic() - started
    steps = {
        event.step_key: event.event_specific_data.duration_ms / 1000
        for event in result.all_events
        if event.event_type_value == "STEP_SUCCESS"
    }

    def meta(key: str, name: str) -> int:
        mats = result.asset_materializations_for_node(key) if key in steps else []
        return int(mats[-1].metadata[name].value) if mats else -1

    print(
        json.dumps(
            {
                "seconds": seconds,
                "steps": steps,
                "raw_image_rows": meta("raw_images", "dagster/row_count"),
                "raw_model_rows": meta("raw_models", "dagster/row_count"),
                "clean_image_rows": meta("images", "dagster/row_count"),
                "quarantined": meta("quarantine", "dagster/row_count"),
                **_usage(),
            }
        )
    )


def pandas_clean(path: str) -> dict:
    """The release notebook's cleaning of the images file in pandas; row counts and step times.

    Read the whole file, drop exact duplicate rows, drop rows with a null key, user or
    timestamp, keep the safe rows (browsingLevel ≤ 1).
    """
    import pandas as pd

    steps = {}
    started = time.monotonic()
    df = pd.read_parquet(path)
    steps["read_parquet"] = time.monotonic() - started
    rows_in = len(df)
    mark = time.monotonic()
    df = df.drop_duplicates()
    steps["drop_duplicates"] = time.monotonic() - mark
    mark = time.monotonic()
    df = df.dropna(subset=["imageId", "modelVersionId", "userHash", "createdAt", "browsingLevel"])
    df = df[df["browsingLevel"] <= 1]
    steps["filter"] = time.monotonic() - mark
    return {
        "pandas_version": pd.__version__,
        "rows_in": rows_in,
        "rows_out": len(df),
        "seconds": time.monotonic() - started,
        "steps": steps,
    }


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "core"
    if command == "pandas":
        print(json.dumps({**pandas_clean(sys.argv[2]), **_usage()}))
    else:
        _child(command)
