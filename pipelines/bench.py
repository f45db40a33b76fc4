"""The full-scale benchmark: ImageGem-size release → raw landing → clean tables → catalog.

``imagegem bench`` generates the full-scale sample once (5,658,107 image rows, 242,889 model
rows, metadata only), then runs the ingest and warehouse assets on it in a child process and
reports wall time, rows/s and the child's peak RSS. Targets on 2 cores: ≤ 45 s, ≤ 4 GiB.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TARGET_SECONDS = 45.0
TARGET_RSS_GIB = 4.0


CORE = [
    "release_files",
    "raw_images",
    "raw_models",
    "images",
    "models",
    "quarantine",
    "warehouse_catalog",
]


def run_benchmark(work: Path, memory_limit: str = "2GB") -> int:
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

    home = work / "home"
    env = {
        **os.environ,
        "IMAGEGEM_HOME": str(home),
        "IMAGEGEM_SOURCE": "release",
        "IMAGEGEM_RELEASE_PATH": str(release),
        "IMAGEGEM_DUCKDB_MEMORY": memory_limit,
    }
    phases = {}
    for phase in ("core", "rest"):
        started = time.monotonic()
        child = subprocess.run(
            [sys.executable, "-m", "pipelines.bench", phase],
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.monotonic() - started
        if child.returncode != 0:
            print(child.stdout, child.stderr, sep="\n")
            return child.returncode
        phases[phase] = (wall, json.loads(child.stdout.strip().splitlines()[-1]))
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2

    core_wall, core = phases["core"]
    rest_wall, rest = phases["rest"]
    rows = core["raw_image_rows"] + core["raw_model_rows"]
    print(f"\nfull-scale benchmark, 2 cores (DuckDB memory limit {memory_limit})")
    print("\n1. ingest + clean + catalog (the issue's measure)")
    for name, seconds in core["steps"].items():
        print(f"  {name:<40} {seconds:7.1f} s")
    print(
        f"  rows in      {rows:,} ({core['raw_image_rows']:,} image + {core['raw_model_rows']:,} model rows)"
    )
    print(f"  clean images {core['clean_image_rows']:,}   quarantined {core['quarantined']:,}")
    print(
        f"  wall time    {core_wall:.1f} s (process start to exit)   target ≤ {TARGET_SECONDS:.0f} s"
    )
    print(f"  throughput   {rows / core_wall:,.0f} rows/s")
    print(
        "\n2. the rest of the warehouse (users, loras, image_loras, prompts, interactions, Table 1, catalog)"
    )
    for name, seconds in rest["steps"].items():
        print(f"  {name:<40} {seconds:7.1f} s")
    print(f"  wall time    {rest_wall:.1f} s")
    print(f"\npeak RSS (largest child)  {peak_gib:.2f} GiB   target ≤ {TARGET_RSS_GIB:.0f} GiB")
    ok = core_wall <= TARGET_SECONDS and peak_gib <= TARGET_RSS_GIB
    print("result: " + ("within targets" if ok else "OUTSIDE targets"))
    return 0


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
            }
        )
    )


if __name__ == "__main__":
    _child(sys.argv[1] if len(sys.argv) > 1 else "core")
