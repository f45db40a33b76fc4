"""The jobs' selections: what each one runs, and what the warehouse-and-media selection must
never pull in (any training)."""

from __future__ import annotations

from pipelines.definitions import defs
from pipelines.jobs import CRAWL, SHARDS, WAREHOUSE_AND_MEDIA, all_assets_job, warehouse_job

ML_KINDS = {"pytorch", "diffusers", "open_clip"}


def _keys(selection) -> set[str]:
    return {k.to_user_string() for k in selection.resolve(defs.resolve_asset_graph())}


def _kinds(key: str) -> set[str]:
    graph = defs.resolve_asset_graph()
    [node] = [graph.get(k) for k in graph.get_all_asset_keys() if k.to_user_string() == key]
    return set(node.kinds)


def test_warehouse_and_media_holds_no_ml_stage():
    keys = _keys(WAREHOUSE_AND_MEDIA)
    assert {"raw_images", "images", "warehouse_catalog", "image_files", "lora_files"} <= keys
    trained = {k for k in keys if _kinds(k) & ML_KINDS}
    assert not trained, trained
    ml = {"clip_encoder", "reward_model", "diffusion_base", "dpo_lora", "image_scores"}
    assert not keys & ml


def test_the_all_job_holds_everything_but_the_shards_and_the_warehouse_job_no_crawl():
    graph = defs.resolve_asset_graph()
    every = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert _keys(all_assets_job.selection) == every - _keys(SHARDS)
    assert _keys(warehouse_job.selection) == every - _keys(SHARDS) - _keys(CRAWL)
    assert {"dpo_lora", "preference_pairs", "image_index"} <= _keys(warehouse_job.selection)
