"""Media assets against the local fake Civitai: images and LoRA files downloaded, checked,
stored content-addressed, pickles refused, and a refresh downloads only what is new (on the
shared staged world of conftest.py)."""

from __future__ import annotations

import hashlib

import pytest

from pipelines.resources import MediaResource, PipelineResources, WarehouseResource
from pipelines.runner import materialize_all
from tests.assets.conftest import FIRST_IMAGES, MORE_IMAGES, mats
from warehouse.catalog import connect_readonly
from warehouse.media import MediaStore


@pytest.fixture(scope="module")
def run(stage):
    """The shared staged world (tests/assets/conftest.py): a first day downloading up to
    FIRST_IMAGES images, then a refresh allowed MORE_IMAGES."""
    settings, first, second = stage
    return settings, first, second


def meta(results, asset, key):
    return mats(results, asset)[-1].metadata[key].value


def test_images_downloaded_verified_and_stored_by_content(run):
    settings, first, _ = run
    assert first and all(r.success for r in first)
    con = connect_readonly(settings.catalog_path())
    ok = con.execute("SELECT count(*) FROM image_files WHERE status = 'ok'").fetchone()[0]
    assert FIRST_IMAGES < ok <= MORE_IMAGES
    assert con.execute("SELECT count(*) FROM image_files WHERE status <> 'ok'").fetchone()[0] == 0
    store = MediaStore(settings.lake())
    for sha, path, width, height in con.execute(
        "SELECT sha256, path, width, height FROM image_files LIMIT 20"
    ).fetchall():
        data = store.read_bytes(path)
        assert (
            hashlib.sha256(data).hexdigest() == sha
            and max(width, height) <= MediaResource().max_side
        )


def test_loras_checked_and_pickles_refused_never_loaded(run):
    settings, _, _ = run
    con = connect_readonly(settings.catalog_path())
    declared_pickles = con.execute(
        "SELECT count(*) FROM loras WHERE has_primary_file AND format = 'PickleTensor'"
    ).fetchone()[0]
    refused = con.execute("SELECT count(*) FROM lora_files WHERE status = 'refused'").fetchone()[0]
    assert declared_pickles > 0 and refused == declared_pickles
    mismatched = con.execute(
        "SELECT count(*) FROM lora_files f JOIN loras l USING (modelVersionId, fileId) "
        "WHERE f.status = 'ok' AND f.sha256 <> lower(l.hashSHA256)"
    ).fetchone()[0]
    assert mismatched == 0
    assert (
        con.execute(
            "SELECT count(*) FROM quarantine WHERE step = 'lora_files' AND reason LIKE 'refused%'"
        ).fetchone()[0]
        == refused
    )
    # every release row of the sample has a hash: every stored file was verified against it
    verified = con.execute(
        "SELECT count(*) FILTER (sha256_verified), count(*) FROM lora_files WHERE status = 'ok'"
    ).fetchone()
    assert verified[1] > 0 and verified[0] == verified[1]
    # the downloaders write the one quarantine shape directly, keyed and with the source url
    keys = con.execute(
        "SELECT DISTINCT source, table_name, regexp_matches(record_key, "
        "'^modelVersionId=[0-9]+/fileId=[0-9]+$'), detail LIKE 'http%' "
        "FROM quarantine WHERE step = 'lora_files'"
    ).fetchall()
    assert keys == [("media", "models", True, True)]


def test_the_refresh_downloads_only_what_is_new(run):
    settings, first, second = run
    assert second and all(r.success for r in second)
    before = meta(first, "image_files", "downloaded")
    assert 0 < before <= FIRST_IMAGES
    assert meta(second, "image_files", "carried_over") == before
    con = connect_readonly(settings.catalog_path())
    ok = con.execute("SELECT count(*) FROM image_files WHERE status = 'ok'").fetchone()[0]
    assert meta(second, "image_files", "downloaded") == ok - before > 0
    # the LoRAs do not depend on the image budget: the refresh finds them all stored
    assert meta(second, "lora_files", "downloaded") == 0
    assert meta(second, "lora_files", "carried_over") == meta(first, "lora_files", "downloaded")


def test_media_records_nothing_without_a_site(tmp_path, tiny_release):
    settings = WarehouseResource(
        home=str(tmp_path), source="release", release_path=str(tiny_release)
    )
    result = materialize_all(PipelineResources(settings))
    assert result.success
    succeeded = {e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS"}
    assert {"image_files", "lora_files", "images"} <= succeeded  # the steps ran ...
    assert result.asset_materializations_for_node("images")
    assert result.asset_materializations_for_node("image_files") == []  # ... and recorded nothing
    assert result.asset_materializations_for_node("lora_files") == []
    assert settings.lake().current("image_files") is None
