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
    env = {**os.environ, "IMAGEGEM_HOME": str(home), "IMAGEGEM_SOURCE": "release",
           "IMAGEGEM_RELEASE_PATH": str(release), "IMAGEGEM_DUCKDB_MEMORY": memory_limit}
    started = time.monotonic()
    child = subprocess.run([sys.executable, "-m", "pipelines.bench"], env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    if child.returncode != 0:
        print(child.stdout, child.stderr, sep="\n")
        return child.returncode
    result = json.loads(child.stdout.strip().splitlines()[-1])
    rows = result["raw_image_rows"] + result["raw_model_rows"]
    print("\nfull-scale ingest + clean + catalog (2 cores)")
    for name, seconds in result["steps"].items():
        print(f"  {name:<22} {seconds:7.1f} s")
    print(f"  rows in      {rows:,} ({result['raw_image_rows']:,} image + {result['raw_model_rows']:,} model)")
    print(f"  clean images {result['clean_image_rows']:,}   quarantined {result['quarantined']:,}")
    print(f"  wall time    {wall:.1f} s (in-process materialize: {result['seconds']:.1f} s)  target ≤ {TARGET_SECONDS:.0f} s")
    print(f"  throughput   {rows / wall:,.0f} rows/s")
    print(f"  peak RSS     {peak_gib:.2f} GiB  target ≤ {TARGET_RSS_GIB:.0f} GiB")
    ok = wall <= TARGET_SECONDS and peak_gib <= TARGET_RSS_GIB
    print("  result       " + ("within targets" if ok else "OUTSIDE targets"))
    return 0


def _child() -> None:
    """Materialize the ingest and warehouse assets once, in-process; print a JSON summary."""
    import dagster as dg

    from pipelines.definitions import defs

    logging.basicConfig(level=logging.WARNING)
    steps: dict[str, float] = {}
    started = time.monotonic()
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([*defs.assets, *defs.asset_checks], resources=defs.resources, instance=instance)
    seconds = time.monotonic() - started
    for event in result.all_events:
        if event.event_type_value == "STEP_SUCCESS":
            steps[event.step_key] = event.event_specific_data.duration_ms / 1000

    def meta(key: str, name: str) -> int:
        mats = result.asset_materializations_for_node(key)
        return int(mats[-1].metadata[name].value) if mats else -1

    print(json.dumps({
        "seconds": seconds,
        "steps": steps,
        "raw_image_rows": meta("raw_images", "dagster/row_count"),
        "raw_model_rows": meta("raw_models", "dagster/row_count"),
        "clean_image_rows": meta("images", "dagster/row_count"),
        "quarantined": meta("quarantine", "dagster/row_count"),
    }))


if __name__ == "__main__":
    _child()
