"""Media assets against the local fake Civitai: images and LoRA files downloaded, checked,
stored content-addressed, pickles refused, and a second run downloads nothing new."""

from __future__ import annotations

import hashlib

import pytest

from pipelines.civitai.fake_server import serve_sample
from pipelines.resources import ImageGemSettings
from pipelines.runner import materialize_all
from pipelines.sample.generator import SampleSpec, generate_sample
from warehouse.catalog import connect_readonly
from warehouse.media import MediaStore


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    sample = tmp_path_factory.mktemp("sample")
    generate_sample(sample, SampleSpec(users=60))
    home = tmp_path_factory.mktemp("home")
    with serve_sample(sample) as server:
        settings = ImageGemSettings(
            home=str(home),
            source="release",
            release_path=str(sample),
            civitai_base_url=server.url,
            civitai_rate_limit=0,
            media_max_images=400,
        )
        first = materialize_all(settings)
        second = materialize_all(settings)
    return settings, first, second


def meta(result, asset, key):
    return result.asset_materializations_for_node(asset)[-1].metadata[key].value


def test_images_downloaded_verified_and_stored_by_content(run):
    settings, first, _ = run
    assert first.success
    con = connect_readonly(settings.catalog_path())
    ok = con.execute("SELECT count(*) FROM image_files WHERE status = 'ok'").fetchone()[0]
    assert 0 < ok <= 400
    assert con.execute("SELECT count(*) FROM image_files WHERE status <> 'ok'").fetchone()[0] == 0
    store = MediaStore(settings.lake())
    for sha, path, width, height in con.execute(
        "SELECT sha256, path, width, height FROM image_files LIMIT 20"
    ).fetchall():
        data = store.read_bytes(path)
        assert (
            hashlib.sha256(data).hexdigest() == sha
            and max(width, height) <= settings.media_max_side
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


def test_second_run_downloads_nothing_new(run):
    _, first, second = run
    assert second.success
    assert meta(first, "image_files", "downloaded") > 0
    assert meta(second, "image_files", "downloaded") == 0
    assert meta(second, "lora_files", "downloaded") == 0
    assert meta(second, "image_files", "carried_over") == meta(first, "image_files", "downloaded")


def test_media_skipped_without_a_site(tmp_path, tiny_release):
    settings = ImageGemSettings(
        home=str(tmp_path), source="release", release_path=str(tiny_release)
    )
    result = materialize_all(settings)
    assert result.success
    assert meta(result, "image_files", "skipped") is True
