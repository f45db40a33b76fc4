"""Preferences group: ImageGem's aggregate preference alignment, up to the pairs.

* ``reward_model`` — a Bradley–Terry head on frozen image + prompt vectors, trained on pairs
  of images of one prompt cluster whose *engagement* (reactions normalised by the uploader's
  audience and the image's age, :mod:`ml.preferences.engagement`) differs by a margin;
* ``image_scores`` — every embedded image scored by every scorer that can run (CLIP score,
  the reward model, HPSv2 from a configured checkpoint);
* ``preference_pairs`` — within each prompt cluster, the best image against the worst by the
  chosen scorer (the paper's min–max pairing), also exported as a Pick-a-Pic-style dataset.

Refresh policy (docs/ARCHITECTURE.md): the reward model is a retrain (weekly cron, like the
encoder); scores and pairs are per item and follow their inputs eagerly.
"""

import os
import tempfile
from collections.abc import Iterator
from datetime import datetime

import dagster as dg
import numpy as np

from assets.embeddings import image_embeddings, prompt_clusters, prompt_embeddings
from assets.ml_common import encoder_of, local_files_dir, plot, publish, tiny_meta
from ml.plots import histogram_plot, line_plot
from pipelines.resources import EncoderResource, PreferencesResource, WarehouseResource
from warehouse import checks
from warehouse import preferences as prefs
from warehouse.artifacts import Artifact, latest_artifact, record_artifact
from warehouse.preview import markdown_table, query_markdown

GROUP = "preferences"
WEEKLY = dg.AutomationCondition.on_cron("0 5 * * 0")  # retrain: Sunday 05:00 UTC
REWARD_MODEL = "reward_model"


def _as_of(inputs: prefs.ScoringInputs) -> datetime:
    """When the reaction counts were read: the newest image's time (the snapshot's edge)."""
    newest = inputs.created_at.max()
    return newest.astype("datetime64[us]").astype(datetime)


def reward_folder(warehouse: WarehouseResource, enc_tag: str) -> str | None:
    """The local folder of the latest reward model trained on ``enc_tag``'s vectors."""
    artifact = latest_artifact(warehouse.lake(), REWARD_MODEL)
    if artifact is None or artifact.encoder != enc_tag:
        return None
    if warehouse.lake().remote:
        local = tempfile.mkdtemp(prefix="imagegem-reward-")
        for name in artifact.files:
            warehouse.lake().fs.get(artifact.file(name), os.path.join(local, name))
        return local
    return artifact.path


@dg.asset(
    group_name=GROUP,
    deps=[image_embeddings, prompt_embeddings, prompt_clusters, dg.AssetKey("images")],
    kinds={"pytorch", "safetensors"},
    pool="gpu",
    automation_condition=WEEKLY,
)
def reward_model(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    encoder: EncoderResource,
    preferences: PreferencesResource,
) -> dg.MaterializeResult:
    """A Bradley–Terry preference head on the frozen image and prompt vectors, trained on
    reactions (beyond the paper). Pairs: two images of one prompt cluster whose engagement —
    reactions normalised by the uploader's audience (leave-one-out median, shrunk) and the
    image's age (1 − exp(−age/30 d)) — differs by a margin; images are split into training
    and held-out sets first, so no held-out pair shares an image with training. Metadata:
    held-out pairwise accuracy and its learning curve; on the sample also the accuracy of
    the planted quality on the same held-out pairs (the ceiling) and of raw reaction counts
    (the naive baseline). Saved as safetensors + JSON, recorded in `artifacts`."""
    from ml.evaluation.preferences import planted_quality, quality_of
    from ml.preferences.engagement import EngagementConfig, build_pairs, engagement_details
    from ml.preferences.reward import (
        RewardConfig,
        pairwise_accuracy,
        save_reward_model,
        train_reward_model,
    )

    lake, con = warehouse.lake(), warehouse.duck()
    enc = encoder_of(warehouse, encoder)
    inputs = prefs.scoring_inputs(con, lake, enc.tag)
    if len(inputs) < 10:
        raise ValueError(
            f"reward_model: {len(inputs)} embedded images with a prompt vector; need at least 10"
        )
    margin, cap = RewardConfig.margin, RewardConfig.max_pairs_per_cluster
    heldout_fraction = RewardConfig.heldout_fraction_for(len(inputs))
    columns = {c: inputs.reactions[c] for c in prefs.REACTIONS}
    columns["userHash"] = np.array(inputs.user_hashes, dtype=object)
    columns["createdAt"] = inputs.created_at
    as_of = _as_of(inputs)
    scored = engagement_details(columns, as_of, EngagementConfig())
    split = build_pairs(
        inputs.image_ids,
        inputs.cluster_ids,
        scored.values,
        margin=margin,
        max_pairs_per_cluster=cap,
        heldout_fraction=heldout_fraction,
    )
    config = RewardConfig.for_pairs(
        split.n_train,
        time_budget_s=float(preferences.reward_seconds),
        device=encoder.device,
        heldout_fraction=heldout_fraction,
    )
    context.log.info(
        f"reward_model: {len(inputs):,} images, {scored.n_valid:,} with an engagement, "
        f"{split.n_train:,} training / {split.n_heldout:,} held-out pairs"
    )
    if split.n_train == 0 or split.n_heldout == 0:
        raise ValueError(
            f"reward_model: {split.n_train} training and {split.n_heldout} held-out pairs "
            f"(margin {margin}); need both — more embedded images per prompt cluster"
        )
    result = train_reward_model(
        inputs.image_vectors,
        inputs.prompt_vectors,
        split.train,
        split.heldout,
        config,
        log=context.log,
    )
    held_w, held_l = split.heldout
    raw = sum(inputs.reactions[c].astype(np.float64) for c in ("likeCount", "heartCount"))
    baselines = {"raw_reactions": pairwise_accuracy(raw, held_w, held_l)}
    truth = warehouse.truth_root()
    evaluation: dict[str, float] = {}
    if truth is not None:
        quality = quality_of(inputs.image_ids, planted_quality(truth))
        ceiling = pairwise_accuracy(quality, held_w, held_l)
        evaluation = {
            "planted_quality_ceiling": round(ceiling, 4),
            "share_of_ceiling": round(result.heldout_accuracy / ceiling, 4) if ceiling else None,
        }
    metrics = {
        "heldout_accuracy": round(result.heldout_accuracy, 4),
        "init_heldout_accuracy": round(result.init_heldout_accuracy, 4),
        "raw_reactions_accuracy": round(baselines["raw_reactions"], 4),
        **evaluation,
        "train_pairs": result.n_train_pairs,
        "heldout_pairs": result.n_heldout_pairs,
        "heldout_fraction": round(heldout_fraction, 3),
        "images_with_engagement": scored.n_valid,
        "images_without_engagement": dict(scored.excluded),
        "engagement_shrinkage": round(scored.shrinkage, 3),
        "as_of": str(as_of),
        "steps": result.steps,
        "stop_reason": result.stop_reason,
        "seconds": round(result.seconds, 1),
    }
    with tempfile.TemporaryDirectory(prefix="imagegem-reward-") as scratch:
        checkpoint, sidecar, digest = save_reward_model(
            result, scratch, encoder=enc.tag, tiny_model=enc.is_tiny, extra={"metrics": metrics}
        )
        tag = f"reward@{digest[:16]}"
        local, target = local_files_dir(warehouse, REWARD_MODEL, tag)
        for path in (checkpoint, sidecar):
            os.replace(path, os.path.join(local, os.path.basename(path)))
        publish(warehouse, local, target)
    record_artifact(
        lake,
        Artifact(
            name=REWARD_MODEL,
            kind="Bradley-Terry reward head on frozen CLIP vectors",
            tag=tag,
            path=target,
            files={os.path.basename(checkpoint): digest, os.path.basename(sidecar): ""},
            base_model=enc.name,
            encoder=enc.tag,
            config={k: v for k, v in vars(config).items() if not k.startswith("_")},
            metrics=metrics,
            tiny_model=enc.is_tiny,
        ),
    )
    epochs = [p.epoch for p in result.curve]
    accuracy = [p.heldout_accuracy for p in result.curve]
    curves = {"held-out accuracy (reward model)": (epochs, accuracy)}
    if evaluation:
        curves["planted quality (ceiling)"] = (epochs, [ceiling] * len(epochs))
    curves["raw reactions (baseline)"] = (epochs, [baselines["raw_reactions"]] * len(epochs))
    return dg.MaterializeResult(
        metadata={
            **tiny_meta(enc),
            **{k: v for k, v in metrics.items() if isinstance(v, int | float | str)},
            "report": dg.MetadataValue.md(
                markdown_table(
                    ["held-out pairwise accuracy", "value"],
                    [
                        ["reward model", f"{result.heldout_accuracy:.3f}"],
                        ["random init", f"{result.init_heldout_accuracy:.3f}"],
                        ["raw reaction counts (baseline)", f"{baselines['raw_reactions']:.3f}"],
                        *([["planted quality (ceiling)", f"{ceiling:.3f}"]] if evaluation else []),
                    ],
                )
            ),
            "learning_curve": plot(
                line_plot(curves, "reward model: held-out pairwise accuracy", "epoch", "accuracy"),
                "learning curve",
            ),
            "artifact": dg.MetadataValue.path(target),
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[reward_model, image_embeddings, prompt_embeddings, dg.AssetKey("image_files")],
    kinds={"pytorch", "parquet"},
    pool="gpu",
    automation_condition=dg.AutomationCondition.eager(),
)
def image_scores(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    encoder: EncoderResource,
    preferences: PreferencesResource,
) -> dg.MaterializeResult:
    """Every embedded image scored by every scorer that can run: `clip_score` (cosine of the
    image and prompt vectors), `reward_model` (the latest one trained on this encoder) and
    `hpsv2` (open_clip ViT-H-14 with the HPSv2 checkpoint, when IMAGEGEM_HPSV2_CHECKPOINT is
    set). Table `image_scores(imageId, encoder, scorer, score, tiny_model, scored_at)`, one
    row per image and scorer; the metadata says which ran and which were skipped, and why."""
    from ml.evaluation.preferences import planted_quality, quality_of
    from ml.preferences.scorers import ScoringBatch, make_scorers, score_batches

    lake, con = warehouse.lake(), warehouse.duck()
    enc = encoder_of(warehouse, encoder)
    inputs = prefs.scoring_inputs(con, lake, enc.tag)
    selection = make_scorers(
        preferences.hpsv2_checkpoint,
        reward_folder(warehouse, enc.tag),
        hpsv2_model=preferences.hpsv2_model,
        device=encoder.device,
        precision=encoder.precision,
        log=context.log,
    )
    batch_rows = 8192

    def batches() -> Iterator[ScoringBatch]:
        for start in range(0, len(inputs), batch_rows):
            stop = start + batch_rows
            yield ScoringBatch(
                image_ids=inputs.image_ids[start:stop],
                images=inputs.paths[start:stop],
                prompts=inputs.prompts[start:stop],
                image_embeddings=inputs.image_vectors[start:stop],
                prompt_embeddings=inputs.prompt_vectors[start:stop],
                encoder=enc.tag,
            )

    runs = [score_batches(scorer, batches(), log=context.log) for scorer in selection.scorers]
    tiny = {"clip_score": enc.is_tiny, "reward_model": enc.is_tiny, "hpsv2": False}
    table = prefs.image_scores_table(
        inputs.image_ids, enc.tag, {run.name: run.scores for run in runs}, tiny
    )
    lake.write_table(prefs.IMAGE_SCORES, table)
    rows = [
        [
            run.name,
            f"{run.metrics()['mean']:.4f}" if run.metrics()["mean"] is not None else "—",
            run.n_nan,
        ]
        for run in runs
    ]
    headers = ["scorer", "mean", "not scored"]
    truth = warehouse.truth_root()
    if truth is not None:
        quality = quality_of(inputs.image_ids, planted_quality(truth))
        headers.append("Spearman vs planted quality")
        for row, run in zip(rows, runs, strict=True):
            ok = np.isfinite(run.scores) & np.isfinite(quality)
            rho = _spearman(run.scores[ok], quality[ok]) if ok.sum() > 2 else float("nan")
            row.append(f"{rho:.3f}")
    first = runs[0] if runs else None
    return dg.MaterializeResult(
        metadata={
            **tiny_meta(enc),
            "dagster/row_count": table.num_rows,
            "images": len(inputs),
            "images_without_prompt_vector": inputs.without_prompt_vector,
            "embedded_images_no_longer_in_images": inputs.no_longer_in_images,
            "scorers": ", ".join(selection.names),
            "skipped": dg.MetadataValue.json(selection.skipped),
            "scores": dg.MetadataValue.md(markdown_table(headers, rows)),
            **(
                {
                    "distribution": plot(
                        histogram_plot(
                            *_histogram(first.scores),
                            f"{first.name} scores",
                            "score",
                            "images",
                        ),
                        "score distribution",
                    )
                }
                if first is not None and np.isfinite(first.scores).any()
                else {}
            ),
        }
    )


def _histogram(scores: np.ndarray, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(bin edges, counts) of the finite scores, as ``histogram_plot`` takes them."""
    counts, edges = np.histogram(scores[np.isfinite(scores)], bins=bins)
    return edges, counts


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a))
    rb = np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


PAIR_CHECKS = {
    "distinct_images_and_scores": (
        "No pair has the same image twice or two equal scores (nothing to prefer)."
    ),
    "pairs_inside_one_cluster": (
        "Winner and loser of every pair share one prompt cluster, and it is not noise (−1)."
    ),
    "pairs_per_cluster_bounded": "No cluster has more pairs than IMAGEGEM_PAIRS_TOP_K.",
}


@dg.asset(
    group_name=GROUP,
    deps=[image_scores, prompt_clusters],
    kinds={"duckdb", "parquet"},
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        dg.AssetCheckSpec(name, asset="preference_pairs", description=text)
        for name, text in PAIR_CHECKS.items()
    ],
)
def preference_pairs(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    encoder: EncoderResource,
    preferences: PreferencesResource,
) -> dg.MaterializeResult:
    """The paper's min–max pairing: within each prompt cluster (HDBSCAN, noise excluded) the
    image the chosen scorer rates highest against the one it rates lowest (IMAGEGEM_PAIRS_TOP_K
    > 1: the k best against the k worst). Table `preference_pairs`; also exported with the
    images as a Pick-a-Pic-style dataset (`caption`, `jpg_0`, `jpg_1`, `label_0`, `label_1`)
    that `datasets.load_dataset("parquet", data_files=...)` and diffusers' DPO example read.
    On the sample, the metadata has the share of pairs whose winner has the higher planted
    quality, for the chosen scorer and for CLIP score."""
    import pyarrow as pa

    from ml.evaluation.preferences import pair_agreement, planted_quality
    from ml.preferences.pairs import PairingConfig, min_max_pairs

    lake, con = warehouse.lake(), warehouse.duck()
    enc = encoder_of(warehouse, encoder)
    scorer = preferences.scorer_for_pairs()
    available = prefs.scorers_in(con, lake, enc.tag)
    if scorer not in available:
        raise ValueError(
            f"preference_pairs: no {scorer!r} scores for encoder {enc.tag} in image_scores "
            f"(it holds {', '.join(available) or 'none'}); materialize image_scores (and "
            f"reward_model) first"
        )
    inputs = prefs.scoring_inputs(con, lake, enc.tag)
    config = PairingConfig(top_k=preferences.pairs_top_k)
    truth = warehouse.truth_root()
    quality = planted_quality(truth) if truth is not None else None

    def pairs_by(name: str):
        scores_of = prefs.read_scores(con, lake, name, enc.tag)
        scores = np.array([scores_of.get(int(i), np.nan) for i in inputs.image_ids])
        return min_max_pairs(inputs.cluster_ids, inputs.image_ids, scores, config), scores

    found, scores = pairs_by(scorer)
    w, lo = found.winner, found.loser
    table = pa.table(
        {
            "cluster_id": pa.array(inputs.cluster_ids[w], pa.int64()),
            "prompt_id": pa.array([inputs.prompt_ids[i] for i in w], pa.string()),
            "winner_imageId": pa.array(inputs.image_ids[w], pa.int64()),
            "loser_imageId": pa.array(inputs.image_ids[lo], pa.int64()),
            "winner_score": pa.array(scores[w], pa.float64()),
            "loser_score": pa.array(scores[lo], pa.float64()),
            "margin": pa.array(scores[w] - scores[lo], pa.float64()),
            "scorer": pa.array([scorer] * len(w), pa.string()),
            "loser_prompt_id": pa.array([inputs.prompt_ids[i] for i in lo], pa.string()),
            "encoder": pa.array([enc.tag] * len(w), pa.string()),
        },
        schema=prefs.PREFERENCE_PAIRS_SCHEMA,
    )
    lake.write_table(prefs.PREFERENCE_PAIRS, table)
    captions = dict(zip(inputs.prompt_ids, inputs.prompts, strict=True))
    paths = dict(zip(inputs.image_ids.tolist(), inputs.paths, strict=True))

    def image_bytes(image_id: int) -> bytes | None:
        path = paths.get(int(image_id))
        if not path:
            return None
        with lake.fs.open(path, "rb") if lake.remote else open(path, "rb") as f:
            return f.read()

    export_path, exported, missing = prefs.write_pickapic(lake, table, captions, image_bytes)
    agreement: dict[str, float] = {}
    if quality is not None:
        for name in dict.fromkeys([scorer, "clip_score", "reward_model", "hpsv2"]):
            if name not in available:
                continue
            other = found if name == scorer else pairs_by(name)[0]
            share, judged = pair_agreement(
                inputs.image_ids[other.winner], inputs.image_ids[other.loser], quality
            )
            agreement[f"winner_has_higher_planted_quality/{name}"] = round(share, 4)
    check = checks.preference_pairs_check(con, lake, enc.tag, config.top_k)
    return dg.MaterializeResult(
        metadata={
            **tiny_meta(enc),
            "dagster/row_count": table.num_rows,
            "scorer": scorer,
            "top_k": config.top_k,
            "clusters": found.clusters,
            "clusters_paired": found.clusters_paired,
            "single_image_clusters": found.single_image_clusters,
            "all_equal_clusters": found.all_equal_clusters,
            "noise_images": found.noise_images,
            "unscored_images": found.unscored_images,
            "dropped_pairs": dg.MetadataValue.json(found.dropped_pairs),
            **agreement,
            "export": dg.MetadataValue.path(export_path),
            "exported_pairs": exported,
            "export_pairs_without_image_file": missing,
            "preview": dg.MetadataValue.md(
                query_markdown(
                    con,
                    f"SELECT cluster_id, winner_imageId, loser_imageId, round(winner_score, 4) "
                    f"AS winner_score, round(loser_score, 4) AS loser_score FROM "
                    f"{lake.scan(prefs.PREFERENCE_PAIRS)} ORDER BY margin DESC",
                    5,
                )
            ),
        },
        check_results=_pair_check_results(check),
    )


def _pair_check_results(result: checks.PairsCheck) -> list[dg.AssetCheckResult]:
    return [
        dg.AssetCheckResult(
            check_name="distinct_images_and_scores",
            passed=result.same_image == 0 and result.equal_scores == 0,
            metadata={"same_image": result.same_image, "equal_scores": result.equal_scores},
        ),
        dg.AssetCheckResult(
            check_name="pairs_inside_one_cluster",
            passed=result.outside_one_cluster == 0,
            metadata={"pairs_across_clusters_or_in_noise": result.outside_one_cluster},
        ),
        dg.AssetCheckResult(
            check_name="pairs_per_cluster_bounded",
            passed=result.most_per_cluster <= result.top_k,
            metadata={"most_pairs_in_a_cluster": result.most_per_cluster, "top_k": result.top_k},
        ),
    ]


ALL_ASSETS = [reward_model, image_scores, preference_pairs]
