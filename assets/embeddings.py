"""Embeddings group: the CLIP encoder, image/prompt/LoRA vectors, the ANN index, prompt
clusters, the embedding map and their evaluation against the sample's planted truth.

Refresh policy (see docs/ARCHITECTURE.md): work that is per item is eager and incremental —
``image_embeddings`` (per shard), ``prompt_embeddings`` and the small tables derived from
them follow their inputs and embed only what their encoder has not embedded yet; retrains are
on a cron — ``clip_encoder`` weekly, ``prompt_clusters`` daily — since refitting them on every
new day of data would cost far more than the data.
"""

import json
import os
import tempfile
import time
from collections.abc import Iterator

import dagster as dg
import numpy as np
import pyarrow as pa

from assets.media import image_files
from assets.ml_common import TINY_NOTE, encoder_of, local_files_dir, plot, publish, tiny_meta
from assets.warehouse import images
from ml.plots import histogram_plot, line_plot, scatter_plot
from pipelines.partitions import embedding_shards
from pipelines.resources import EncoderResource, WarehouseResource
from warehouse import embeddings as emb
from warehouse.artifacts import Artifact, latest_artifact, record_artifact
from warehouse.catalog import build_catalog
from warehouse.preview import markdown_table
from warehouse.quarantine import QuarantineRecord, quarantine_table

GROUP = "embeddings"
WEEKLY = dg.AutomationCondition.on_cron("0 3 * * 0")  # retrains: Sunday 03:00 UTC
DAILY = dg.AutomationCondition.on_cron("0 4 * * *")


@dg.asset(
    group_name=GROUP,
    deps=[images, image_files],
    kinds={"pytorch", "safetensors"},
    pool="gpu",
    automation_condition=WEEKLY,
)
def clip_encoder(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, encoder: EncoderResource
) -> dg.MaterializeResult:
    """The CLIP encoder every vector of the pipeline comes from, recorded in `artifacts`.

    With IMAGEGEM_ENCODER_CHECKPOINT set, that checkpoint is validated against the config and
    registered. Otherwise the config (default: the tiny `imagegem-tiny`) is trained with
    open_clip's contrastive loss on the warehouse's (downloaded image, prompt) pairs for at
    most IMAGEGEM_CLIP_TRAIN_SECONDS, and saved as safetensors + JSON config; the metadata
    shows the loss curve and held-out image→prompt Recall@10 against the same architecture at
    random initialisation."""
    from ml.encoders import load_encoder
    from ml.train_clip import TrainConfig, save_trained, train_clip

    lake, con = warehouse.lake(), warehouse.duck()
    if encoder.checkpoint:
        enc = load_encoder(encoder.encoder, encoder.checkpoint, "cpu")
        name = os.path.basename(encoder.checkpoint)
        record_artifact(
            lake,
            Artifact(
                name="clip_encoder",
                kind="open_clip encoder (configured checkpoint)",
                tag=enc.tag,
                path=os.path.dirname(os.path.abspath(encoder.checkpoint)),
                files={name: enc.checkpoint_sha256 or ""},
                base_model=enc.name,
                encoder=enc.tag,
                config={"model": enc.name, "checkpoint_file": name, **enc.config},
                tiny_model=enc.is_tiny,
            ),
        )
        return dg.MaterializeResult(
            metadata={**tiny_meta(enc), "registered": dg.MetadataValue.path(encoder.checkpoint)}
        )

    pairs = emb.training_pairs(con, lake)
    if pairs.num_rows == 0:
        raise ValueError(
            "no (image, prompt) pairs to train the encoder on: image_files has no downloaded "
            "image (serve a Civitai site, e.g. `make demo`, or set IMAGEGEM_ENCODER_CHECKPOINT)"
        )
    # a small warehouse (a test, a first day) still trains: at least four batches per epoch
    batch = min(TrainConfig.batch_size, max(8, pairs.num_rows // 4))
    config = TrainConfig(
        model=encoder.encoder, time_budget_s=float(encoder.train_seconds), batch_size=batch
    )
    context.log.info(
        f"training {config.model} on {pairs.num_rows:,} image–prompt pairs for at most "
        f"{encoder.train_seconds} s"
    )
    result = train_clip(
        list(
            zip(
                pairs.column("imageId").to_pylist(),
                pairs.column("path").to_pylist(),
                pairs.column("prompt").to_pylist(),
                strict=True,
            )
        ),
        config,
        log=context.log,
    )
    with tempfile.TemporaryDirectory(prefix="imagegem-clip-") as scratch:
        checkpoint, config_path, digest = save_trained(result, scratch)
        tag = f"{config.model}@{digest[:16]}"
        local, target = local_files_dir(warehouse, "clip_encoder", tag)
        for path in (checkpoint, config_path):
            os.replace(path, os.path.join(local, os.path.basename(path)))
        publish(warehouse, local, target)
    metrics = {
        "recall_at_10_trained": round(result.recall_at_10, 4),
        "recall_at_10_init": round(result.init_recall_at_10, 4),
        "chance_recall_at_10": round(min(1.0, 10 / max(result.n_holdout_prompts, 1)), 4),
        "final_loss": round(result.loss_curve[-1][1], 4) if result.loss_curve else None,
        "steps": result.steps,
        "steps_per_second": round(result.steps_per_s, 2),
        "stop_reason": result.stop_reason,
        "seconds": round(result.seconds, 1),
        "pairs_train": result.n_train,
        "pairs_holdout": result.n_holdout,
        "pairs_skipped": sum(result.skipped.values()),
        "holdout_fraction": config.holdout_fraction,
    }
    record_artifact(
        lake,
        Artifact(
            name="clip_encoder",
            kind="open_clip encoder (trained by clip_encoder)",
            tag=tag,
            path=target,
            files={os.path.basename(checkpoint): digest},
            base_model=config.model,
            encoder=tag,
            config={
                "model": config.model,
                "checkpoint_file": os.path.basename(checkpoint),
                "holdout_fraction": config.holdout_fraction,
                "seed": config.seed,
            },
            metrics=metrics,
            tiny_model=True,
        ),
    )
    steps, losses = zip(*result.loss_curve, strict=True) if result.loss_curve else ((), ())
    eval_steps, recalls = zip(*result.eval_curve, strict=True) if result.eval_curve else ((), ())
    return dg.MaterializeResult(
        metadata={
            "encoder": dg.MetadataValue.text(tag),
            "tiny_model": True,
            "note": dg.MetadataValue.text(TINY_NOTE),
            **{k: v for k, v in metrics.items() if v is not None},
            "checkpoint": dg.MetadataValue.path(f"{target}/{os.path.basename(checkpoint)}"),
            "loss_curve": plot(
                line_plot({"train loss": (steps, losses)}, "CLIP contrastive loss", "step", "loss"),
                "loss curve",
            ),
            "holdout_recall_curve": plot(
                line_plot(
                    {"held-out image→prompt Recall@10": (eval_steps, recalls)},
                    "held-out Recall@10 (step 0 = random init)",
                    "step",
                    "Recall@10",
                ),
                "recall curve",
            ),
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[clip_encoder, image_files],
    partitions_def=embedding_shards,
    kinds={"pytorch", "parquet"},
    pool="gpu",
    automation_condition=dg.AutomationCondition.eager(),
    output_required=False,
)
def image_embeddings(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, encoder: EncoderResource
) -> Iterator[dg.MaterializeResult]:
    """One L2-normalised vector per downloaded image of this shard, keyed (imageId, encoder).
    Incremental: only images the current encoder has not embedded are encoded; earlier
    vectors are carried over. Images that cannot be decoded (empty, truncated, too large, too
    small, not an image) are quarantined with the reason; the shard still finishes. A shard
    with nothing new records no materialization."""
    from ml.embed import embed_images

    shard = emb.shard_index(context.partition_key)
    n_shards = len(embedding_shards.get_partition_keys())
    lake, con = warehouse.lake(), warehouse.duck()
    enc = encoder_of(warehouse, encoder)
    todo = emb.images_to_embed(con, lake, shard, n_shards, enc.tag)
    table = emb.shard_table(shard)
    if todo.num_rows == 0 and lake.current(table) is not None:
        context.log.info(f"{context.partition_key}: nothing new for {enc.tag}; no materialization")
        return
    schema = emb.image_embeddings_schema(enc.embed_dim)
    digests = dict(
        zip(todo.column("imageId").to_pylist(), todo.column("sha256").to_pylist(), strict=True)
    )
    items = list(
        zip(todo.column("imageId").to_pylist(), todo.column("path").to_pylist(), strict=True)
    )
    rejected: list[tuple[int, str]] = []
    started = time.monotonic()
    read = None if not lake.remote else lake.fs.cat_file
    with lake.writing(table) as version:
        writer = emb.start_vector_version(con, lake, table, version, schema, enc.tag)
        for batch in embed_images(
            enc,
            items,
            batch_size=encoder.batch_size,
            num_workers=encoder.workers,
            read=read,
            log=context.log,
        ):
            rejected.extend(batch.rejected)
            if len(batch.ids):
                writer.write(
                    emb.vectors_table(
                        schema,
                        batch.ids.tolist(),
                        enc.tag,
                        batch.vectors,
                        sha256=[digests[i] for i in batch.ids.tolist()],
                    )
                )
    seconds = time.monotonic() - started
    records = [
        QuarantineRecord(
            "media",
            "image_embeddings",
            "image_files",
            f"imageId={i}",
            reason,
            payload=json.dumps({"imageId": i, "sha256": digests[i]}),
        )
        for i, reason in rejected
    ]
    standing = emb.rejected_images(lake, shard, retried=set(digests))
    new_rows = quarantine_table(records)
    if standing:
        new_rows = pa.concat_tables(
            [pa.Table.from_pylist(standing, schema=new_rows.schema), new_rows]
        )
    lake.write_table(emb.shard_quarantine_table(shard), new_rows)
    reasons: dict[str, int] = {}
    for _, reason in rejected:
        key = reason.split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    yield dg.MaterializeResult(
        metadata={
            **tiny_meta(enc),
            "dagster/row_count": writer.carried_rows + writer.rows,
            "embedded": writer.rows,
            "carried_over": writer.carried_rows,
            "quarantined": len(rejected),
            "quarantine_reasons": dg.MetadataValue.json(reasons),
            "images_per_second": round(writer.rows / seconds, 1) if seconds > 0 else 0.0,
            "seconds": round(seconds, 1),
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[clip_encoder, dg.AssetKey("prompts")],
    kinds={"pytorch", "parquet"},
    pool="gpu",
    automation_condition=dg.AutomationCondition.eager(),
)
def prompt_embeddings(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, encoder: EncoderResource
) -> dg.MaterializeResult:
    """One L2-normalised text vector per distinct normalised prompt (`prompts`), keyed
    (prompt_id, encoder); incremental like image_embeddings. Texts are deduplicated before
    encoding; prompts longer than the encoder's context are truncated and counted; empty and
    non-Latin prompts are embedded."""
    from ml.embed import embed_texts

    lake, con = warehouse.lake(), warehouse.duck()
    enc = encoder_of(warehouse, encoder)
    todo = emb.prompts_to_embed(con, lake, enc.tag)
    schema = emb.prompt_embeddings_schema(enc.embed_dim)
    started = time.monotonic()
    with lake.writing(emb.PROMPT_EMBEDDINGS) as version:
        writer = emb.start_vector_version(
            con, lake, emb.PROMPT_EMBEDDINGS, version, schema, enc.tag
        )
        texts = todo.column("prompt").to_pylist()
        result = embed_texts(enc, texts, batch_size=max(encoder.batch_size, 256), log=context.log)
        if todo.num_rows:
            writer.write(
                emb.vectors_table(
                    schema,
                    todo.column("prompt_id").to_pylist(),
                    enc.tag,
                    result.vectors,
                    truncated=result.truncated.tolist(),
                )
            )
    seconds = time.monotonic() - started
    return dg.MaterializeResult(
        metadata={
            **tiny_meta(enc),
            "dagster/row_count": writer.carried_rows + writer.rows,
            "embedded": writer.rows,
            "carried_over": writer.carried_rows,
            "distinct_texts_encoded": result.n_distinct,
            "truncated_to_context": result.n_truncated,
            "seconds": round(seconds, 1),
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[image_embeddings, dg.AssetKey("image_loras"), dg.AssetKey("loras")],
    kinds={"parquet"},
    automation_condition=dg.AutomationCondition.eager(),
)
def lora_embeddings(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, encoder: EncoderResource
) -> dg.MaterializeResult:
    """One vector per LoRA version: the re-normalised mean of the normalised vectors of the
    images that used it (as ImageGem does), with how many images went in. LoRAs none of whose
    images was embedded get no vector; they are counted, not invented."""
    lake, con = warehouse.lake(), warehouse.duck()
    enc = encoder_of(warehouse, encoder)
    means = emb.lora_means(con, lake, enc.tag)
    schema = emb.lora_embeddings_schema(enc.embed_dim)
    lake.write_table(
        emb.LORA_EMBEDDINGS,
        emb.vectors_table(
            schema,
            means.model_version_ids.tolist(),
            enc.tag,
            means.vectors,
            n_images=means.n_images,
        ),
    )
    counts = means.n_images
    edges = np.unique(np.geomspace(1, max(int(counts.max(initial=1)), 2), 12).astype(int))
    hist, edges = np.histogram(counts, bins=np.append(edges, edges[-1] + 1))
    return dg.MaterializeResult(
        metadata={
            **tiny_meta(enc),
            "dagster/row_count": len(means.model_version_ids),
            "loras_without_images": means.loras_without_images,
            "median_images_per_lora": float(np.median(counts)) if len(counts) else 0.0,
            "images_per_lora": plot(
                histogram_plot(
                    edges, hist, "images per LoRA vector", "images", "LoRAs", log_x=True
                ),
                "images per LoRA",
            ),
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[image_embeddings],
    kinds={"usearch"},
    automation_condition=dg.AutomationCondition.eager(),
)
def image_index(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, encoder: EncoderResource
) -> dg.MaterializeResult:
    """An approximate nearest-neighbour index (usearch HNSW, cosine) over every image vector
    of the current encoder, saved with a checksum and recorded in `artifacts`; its
    recall@10 against exact search is measured on held-in queries. Query it with
    `imagegem similar --image-id ID` or `--text "..."`."""
    from ml.index import IndexConfig, build_index, recall_at_k

    lake, con = warehouse.lake(), warehouse.duck()
    enc = encoder_of(warehouse, encoder)
    ids, vectors = emb.all_image_vectors(con, lake, enc.tag)
    config = IndexConfig()
    started = time.monotonic()
    index = build_index(ids, vectors, config)
    build_seconds = time.monotonic() - started
    recall = recall_at_k(index, ids, vectors, k=10, n_queries=min(1000, len(ids)))
    local, target = local_files_dir(warehouse, "image_index", enc.tag)
    index.save(os.path.join(local, "image_index.usearch"))
    publish(warehouse, local, target)
    from ml.encoders.checkpoint import file_sha256

    digest = file_sha256(os.path.join(local, "image_index.usearch"))  # type: ignore[arg-type]
    record_artifact(
        lake,
        Artifact(
            name="image_index",
            kind="usearch HNSW index",
            tag=f"{enc.tag}/{digest[:16]}",
            path=target,
            files={"image_index.usearch": digest},
            base_model=enc.name,
            encoder=enc.tag,
            config={**config.__dict__, "n_vectors": int(len(ids)), "dim": int(vectors.shape[1])},
            metrics={"recall_at_10": recall, "build_seconds": round(build_seconds, 2)},
            tiny_model=enc.is_tiny,
        ),
    )
    return dg.MaterializeResult(
        metadata={
            **tiny_meta(enc),
            "dagster/row_count": int(len(ids)),
            "recall_at_10_vs_exact": round(recall, 4),
            "build_seconds": round(build_seconds, 2),
            "index": dg.MetadataValue.path(f"{target}/image_index.usearch"),
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[prompt_embeddings],
    kinds={"scikit-learn", "parquet"},
    automation_condition=DAILY,
)
def prompt_clusters(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, encoder: EncoderResource
) -> dg.MaterializeResult:
    """HDBSCAN (scikit-learn) over the prompt vectors, as ImageGem groups prompts: one cluster
    id per prompt (−1 = noise). Large inputs take the scaling path (PCA, then a coarse k-means
    into buckets clustered one by one); the metadata says which path ran."""
    from ml.clustering import ClusterConfig, cluster_embeddings, size_histogram

    lake, con = warehouse.lake(), warehouse.duck()
    enc = encoder_of(warehouse, encoder)
    ids, vectors = emb.read_vectors(con, lake.scan(emb.PROMPT_EMBEDDINGS), "prompt_id", enc.tag)
    result = cluster_embeddings(vectors, ClusterConfig(), log=context.log)
    lake.write_table(
        "prompt_clusters",
        pa.table(
            {
                "prompt_id": pa.array(ids.tolist(), pa.string()),
                "encoder": pa.array([enc.tag] * len(ids), pa.string()),
                "cluster_id": pa.array(result.labels, pa.int64()),
            }
        ),
    )
    edges, counts = size_histogram(result)
    return dg.MaterializeResult(
        metadata={
            **tiny_meta(enc),
            "dagster/row_count": int(len(ids)),
            "clusters": int(result.n_clusters),
            "noise_share": round(float(result.noise_share), 4),
            "path": result.path,
            "cluster_sizes": plot(
                histogram_plot(
                    edges,
                    counts,
                    "prompt cluster sizes",
                    "prompts in cluster",
                    "clusters",
                    log_y=True,
                ),
                "cluster sizes",
            ),
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[image_embeddings, dg.AssetKey("image_loras"), dg.AssetKey("loras")],
    kinds={"scikit-learn"},
    automation_condition=dg.AutomationCondition.eager(),
)
def embedding_map(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, encoder: EncoderResource
) -> dg.MaterializeResult:
    """A 2-D PCA projection of the image vectors (ImageGem's Figure 2): a PNG coloured by the
    base model of the image's LoRA, and the coordinates as the table `embedding_map`."""
    from ml.projection import project_2d

    lake, con = warehouse.lake(), warehouse.duck()
    enc = encoder_of(warehouse, encoder)
    ids, vectors = emb.all_image_vectors(con, lake, enc.tag)
    projection = project_2d(vectors)
    labels = emb.image_base_models(con, lake, ids)
    lake.write_table(
        "embedding_map",
        pa.table(
            {
                "imageId": pa.array(ids, pa.int64()),
                "encoder": pa.array([enc.tag] * len(ids), pa.string()),
                "x": pa.array(projection.xy[:, 0]),
                "y": pa.array(projection.xy[:, 1]),
                "base_model": pa.array(labels.tolist(), pa.string()),
            }
        ),
    )
    ratio = projection.explained_variance_ratio
    return dg.MaterializeResult(
        metadata={
            **tiny_meta(enc),
            "dagster/row_count": int(len(ids)),
            "explained_variance": dg.MetadataValue.json([round(float(r), 4) for r in ratio])
            if ratio is not None
            else None,
            "map": plot(
                scatter_plot(projection.xy, labels, f"image embeddings (PCA), {enc.tag}"),
                "embedding map",
            ),
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[image_embeddings, prompt_embeddings, prompt_clusters],
    kinds={"python"},
    automation_condition=dg.AutomationCondition.eager(),
    output_required=False,
)
def embedding_eval(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, encoder: EncoderResource
) -> Iterator[dg.MaterializeResult]:
    """Quality of the stage against the sample's planted truth (evaluation code only; no
    model reads it): k-NN (k = 10) planted-style accuracy of held-out image vectors, trained
    vs the same architecture at random init; k-NN style accuracy of prompt vectors; adjusted
    Rand index of the prompt clusters against planted recipes and styles, and the noise
    share. Records nothing on data without truth (a release, the live crawl)."""
    from ml.embed import embed_images
    from ml.encoders import load_encoder
    from ml.evaluation.embedding_quality import evaluate_embeddings, style_map
    from ml.train_clip import holdout_mask

    sample_root = warehouse.truth_root()
    if sample_root is None:
        context.log.info("no planted truth: nothing to evaluate, no materialization")
        return
    lake, con = warehouse.lake(), warehouse.duck()
    enc = encoder_of(warehouse, encoder)
    trained = latest_artifact(lake, "clip_encoder", tag=enc.tag)
    fraction = float((trained.config if trained else {}).get("holdout_fraction", 0.1))
    paths = dict(
        con.execute(
            f"SELECT imageId, path FROM {lake.scan('image_files')} WHERE status = 'ok'"
        ).fetchall()
    )

    def init_vectors(ids: np.ndarray) -> np.ndarray:
        init = load_encoder(
            enc.name, None, "cpu", seed=int((trained.config if trained else {}).get("seed", 0))
        )
        out = {}
        items = [(int(i), paths[int(i)]) for i in ids]
        for batch in embed_images(init, items, batch_size=encoder.batch_size):
            out.update(zip(batch.ids.tolist(), batch.vectors, strict=True))
        return np.stack([out[int(i)] for i in ids])

    quality = evaluate_embeddings(
        con,
        lake,
        sample_root,
        enc.tag,
        holdout=lambda ids: holdout_mask(ids.tolist(), fraction),
        init_image_vectors=init_vectors,
    )
    figures = {
        k: v for k, v in quality.as_dict().items() if not (isinstance(v, float) and np.isnan(v))
    }
    by_style = style_map(con, lake, sample_root, enc.tag)
    yield dg.MaterializeResult(
        metadata={
            **tiny_meta(enc),
            **{k: v for k, v in figures.items() if k != "encoder"},
            **({"map_by_planted_style": plot(by_style, "map by style")} if by_style else {}),
            "report": dg.MetadataValue.md(
                markdown_table(["measure", "value"], [[k, v] for k, v in figures.items()])
            ),
        }
    )


EMBEDDING_ASSETS = [
    clip_encoder,
    image_embeddings,
    prompt_embeddings,
    lora_embeddings,
    image_index,
    prompt_clusters,
    embedding_map,
    embedding_eval,
]


@dg.asset(
    group_name=GROUP,
    # not embedding_eval: it records nothing on data without truth, which would skip this
    deps=[a for a in EMBEDDING_ASSETS if a is not embedding_eval],
    kinds={"duckdb"},
    pool="warehouse",
    automation_condition=dg.AutomationCondition.eager(),
)
def embeddings_catalog(warehouse: WarehouseResource) -> dg.MaterializeResult:
    """The warehouse catalog rebuilt with the embeddings stage's views (`image_embeddings`,
    `prompt_embeddings`, `lora_embeddings` with FLOAT[d] vectors, `prompt_clusters`,
    `embedding_map`, `artifacts`), so SQL can join vectors to images, prompts and LoRAs."""
    report = build_catalog(warehouse.lake(), warehouse.catalog_path())
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(report.path),
            "views": dg.MetadataValue.md(markdown_table(["view"], [[v] for v in report.views])),
        }
    )


ALL_ASSETS = [*EMBEDDING_ASSETS, embeddings_catalog]
