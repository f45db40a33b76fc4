"""Helpers the ML asset groups share: the stage encoder, "tiny model" metadata, plots, and
the folders trained artefacts' files are written to (locally, or copied to an S3 lake)."""

import os
import tempfile

import dagster as dg

from ml.plots import png_markdown
from pipelines.resources import EncoderResource, WarehouseResource
from warehouse.artifacts import files_dir

TINY_NOTE = (
    "made by a tiny development encoder trained on the sample, not a production model: "
    "figures show the pipeline works, not what ViT-H-14 would give"
)


def encoder_of(warehouse: WarehouseResource, encoder: EncoderResource):
    cache = os.path.join(tempfile.gettempdir(), "imagegem-encoder-cache")
    return encoder.load(warehouse.lake(), cache)


def tiny_meta(enc) -> dict[str, dg.MetadataValue]:
    meta: dict[str, dg.MetadataValue] = {
        "encoder": dg.MetadataValue.text(enc.tag),
        "tiny_model": dg.MetadataValue.bool(enc.is_tiny),
    }
    if enc.is_tiny:
        meta["note"] = dg.MetadataValue.text(TINY_NOTE)
    return meta


def plot(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(png_markdown(png, alt))


def local_files_dir(warehouse: WarehouseResource, name: str, tag: str) -> tuple[str, str]:
    """(local folder to write an artefact's files in, where they are kept on the lake)."""
    lake = warehouse.lake()
    target = files_dir(lake, name, tag)
    if lake.remote:
        return tempfile.mkdtemp(prefix=f"imagegem-{name}-"), target
    os.makedirs(target, exist_ok=True)
    return target, target


def publish(warehouse: WarehouseResource, local: str, target: str) -> None:
    """Copy an artefact's files to the lake when the lake is remote (local: already there)."""
    lake = warehouse.lake()
    if lake.remote:
        for name in sorted(os.listdir(local)):
            lake.fs.put(os.path.join(local, name), f"{target}/{name}")
