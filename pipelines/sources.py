"""Source preparation: where the release files a run ingests come from.

* ``sample`` — the embedded generator writes an ImageGem-shaped release (plus ``truth/``)
  under ``$IMAGEGEM_HOME/sources/sample``; it is regenerated only when the spec changed.
* ``release`` — the published parquet, read in place from a folder or ``s3://`` prefix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.resources import WarehouseResource
from pipelines.sample.generator import SampleSpec, generate_sample, sample_is_current
from warehouse.release import discover, open_parquet, open_release_fs, validate_schema
from warehouse.schema import RELEASE_TABLES


@dataclass
class ReleaseListing:
    """The files of each release table, with footer row counts and sizes."""

    root: str
    source: str
    files: dict[str, list[str]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    generated: bool = False


def ensure_sample(out: str, spec: SampleSpec, log: logging.Logger) -> bool:
    """Generate the sample into ``out`` unless the same spec is already there. True if generated."""
    if sample_is_current(Path(out), spec):
        log.info(f"sample with the same spec already at {out}; reusing it")
        return False
    log.info(f"generating the sample ({spec}) into {out}")

    def progress(stage: str, done: int, total: int) -> None:
        log.info(f"sample {stage}: {done:,}/{total:,}")

    generate_sample(Path(out), spec, progress=progress)
    return True


def list_release(warehouse: WarehouseResource, log: logging.Logger) -> ReleaseListing:
    """Prepare the configured source and list (and schema-check) its release files."""
    root = warehouse.release_root()
    listing = ReleaseListing(root=root, source=warehouse.source)
    if warehouse.source == "sample":
        spec = SampleSpec(users=warehouse.sample_users, seed=warehouse.sample_seed)
        listing.generated = ensure_sample(root, spec, log)
    options = warehouse.storage_options()
    for name, table in RELEASE_TABLES.items():
        files = discover(root, table, options)
        fs, _ = open_release_fs(files[0], options)
        rows = size = 0
        for path in files:
            parquet: pq.ParquetFile = open_parquet(path, fs)
            validate_schema(path, parquet.schema_arrow, table)
            rows += parquet.metadata.num_rows
            size += fs.size(path)
        listing.files[name], listing.rows[name], listing.bytes[name] = files, rows, size
    return listing
