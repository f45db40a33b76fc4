"""The worlds the asset tests share: ``stage``, a small sample served by the fake Civitai and
run end to end twice (a first day, then a refresh with more images), every stage included."""

from __future__ import annotations

import dagster as dg
import pytest

from pipelines.civitai.fake_server import serve_sample
from pipelines.resources import (
    CivitaiResource,
    EncoderResource,
    MediaResource,
    PipelineResources,
    PreferencesResource,
    WarehouseResource,
)
from pipelines.runner import materialize_runs
from pipelines.sample.generator import SampleSpec, generate_sample

# whole users in userHash order: 376 images, then two more users (396) on the "next day"
FIRST_IMAGES, MORE_IMAGES = 380, 400
# the retrains (weekly crons) the next day's automation does not run
RETRAINS = ("clip_encoder", "reward_model", "diffusion_base", "dpo_lora")
# the ML stages bounded to seconds: these tests prove the wiring, the unit tests the maths
PREFERENCES = PreferencesResource(
    reward_seconds=10, base_train_seconds=3, dpo_seconds=6, dpo_steps=12, pairs_top_k=8
)


def mats(results, asset):
    return [m for r in results for m in r.asset_materializations_for_node(asset)]


@pytest.fixture(scope="session")
def stage(tmp_path_factory):
    sample = tmp_path_factory.mktemp("sample")
    generate_sample(sample, SampleSpec(users=60))
    home = tmp_path_factory.mktemp("home")
    settings = WarehouseResource(home=str(home), source="release", release_path=str(sample))
    encoder = EncoderResource(device="cpu", train_seconds=8, workers=0, batch_size=64)

    def resources(civitai, max_images):
        return PipelineResources(
            settings, civitai, MediaResource(max_images=max_images), encoder, PREFERENCES
        )

    with serve_sample(sample) as server:
        civitai = CivitaiResource(base_url=server.url, rate_limit=0)
        first = materialize_runs(resources(civitai, FIRST_IMAGES))
        # the next day, as the automation runs it: more images downloaded, everything
        # refreshed except the retrains (weekly crons, not due)
        second = materialize_runs(
            resources(civitai, MORE_IMAGES),
            selection=dg.AssetSelection.all() - dg.AssetSelection.assets(*RETRAINS),
        )
    return settings, first, second
