"""Alignment group: the Diffusion-DPO fine-tune of a LoRA on the preference pairs.

``diffusion_base`` registers the base model, a local diffusers folder (IMAGEGEM_DPO_BASE: SD 1.5
in production). Without one it builds a tiny SD-1.5-shaped pipeline from config with a fixed
seed (once, under ``$IMAGEGEM_HOME/models/tiny-sd15``) and trains it briefly on the
warehouse's images, the tiny stand-in for a pretrained base; ``dpo_lora`` aligns it on the
preference pairs. Everything a tiny model produces says ``tiny_model``.
"""

import io
import os
import shutil
import tempfile

import dagster as dg
import numpy as np

from assets.ml_common import encoder_of, local_files_dir, plot, publish, tiny_meta
from assets.preferences import (
    image_scores,
    preference_pairs,
    reward_folder,
    reward_model,
)
from ml.plots import line_plot
from pipelines.resources import EncoderResource, PreferencesResource, WarehouseResource
from warehouse import preferences as prefs
from warehouse.artifacts import Artifact, latest_artifact, record_artifact
from warehouse.catalog import build_catalog
from warehouse.preview import markdown_table

GROUP = "alignment"
DPO_LORA = "dpo_lora"
DIFFUSION_BASE = "diffusion_base"
TINY_BASE_NOTE = (
    "tiny development pipeline trained for a minute on the sample: figures show the alignment "
    "runs end to end, not what SD 1.5 would gain"
)
WEEKLY = dg.AutomationCondition.on_cron("0 6 * * 0")  # retrain: Sunday 06:00 UTC
HELDOUT_FRACTION = 0.2  # of the pairs (by a hash of the winner; no image is in two pairs)
GENERATED_PROMPTS = 8  # held-out prompts generated before and after


def _tiny_init_folder(warehouse: WarehouseResource) -> str:
    """Where the tiny base is built from config (once; its weights depend only on the seed)."""
    if warehouse.lake().remote:
        return os.path.join(tempfile.gettempdir(), "imagegem-models", "tiny-sd15")
    return os.path.join(warehouse.home_root(), "models", "tiny-sd15")


def base_folder(warehouse: WarehouseResource, preferences: PreferencesResource) -> str:
    """The diffusers folder DPO fine-tunes: the configured base, else the latest
    ``diffusion_base`` artifact (the tiny base trained on the warehouse's images)."""
    if preferences.dpo_base:
        return preferences.dpo_base
    artifact = latest_artifact(warehouse.lake(), DIFFUSION_BASE)
    if artifact is None:
        raise ValueError(
            "no diffusion base: materialize diffusion_base first (or set IMAGEGEM_DPO_BASE)"
        )
    if warehouse.lake().remote:
        local = os.path.join(tempfile.gettempdir(), "imagegem-models", artifact.tag)
        if not os.path.isdir(local):
            warehouse.lake().fs.get(artifact.path, local, recursive=True)
        return local
    return artifact.path


@dg.asset(
    group_name=GROUP,
    deps=[dg.AssetKey("image_files"), dg.AssetKey("images")],
    kinds={"pytorch", "diffusers"},
    pool="gpu",
    automation_condition=WEEKLY,
)
def diffusion_base(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    encoder: EncoderResource,
    preferences: PreferencesResource,
) -> dg.MaterializeResult:
    """The base diffusion model `dpo_lora` aligns, recorded in `artifacts`. With
    IMAGEGEM_DPO_BASE set, that local diffusers folder (SD 1.5 in production) is checked
    (layout, safetensors weights, no pickles) and registered. Otherwise a tiny
    SD-1.5-shaped pipeline is built from config with a fixed seed and given a short ordinary
    denoising training on the warehouse's (image, prompt) pairs (at most
    IMAGEGEM_BASE_TRAIN_SECONDS), the tiny stand-in for a pretrained base: DPO on a random
    UNet only memorises its pairs."""
    from ml.base_train import BaseTrainConfig, train_base
    from ml.diffusion import build_tiny_pipeline, check_pipeline_folder, is_tiny
    from warehouse.embeddings import training_pairs

    lake, con = warehouse.lake(), warehouse.duck()
    if preferences.dpo_base:
        described = check_pipeline_folder(preferences.dpo_base)
        record_artifact(
            lake,
            Artifact(
                name=DIFFUSION_BASE,
                kind="diffusers pipeline (configured base)",
                tag=f"configured@{os.path.basename(os.path.normpath(preferences.dpo_base))}",
                path=os.path.abspath(preferences.dpo_base),
                base_model=preferences.dpo_base,
                config={"components": described},
                tiny_model=is_tiny(preferences.dpo_base),
            ),
        )
        return dg.MaterializeResult(
            metadata={
                "registered": dg.MetadataValue.path(preferences.dpo_base),
                "tiny_model": is_tiny(preferences.dpo_base),
            }
        )
    init = str(build_tiny_pipeline(_tiny_init_folder(warehouse), seed=0))
    pairs = training_pairs(con, lake)
    examples = list(
        zip(pairs.column("path").to_pylist(), pairs.column("prompt").to_pylist(), strict=True)
    )
    config = BaseTrainConfig(
        resolution=preferences.dpo_resolution,
        time_budget_s=float(preferences.base_train_seconds),
        device=encoder.device,
    )
    context.log.info(
        f"diffusion_base: training the tiny base on {len(examples):,} image–prompt pairs for "
        f"at most {config.time_budget_s:.0f} s"
    )
    with tempfile.TemporaryDirectory(prefix="imagegem-base-") as scratch:
        result = train_base(init, examples, os.path.join(scratch, "base"), config, context.log)
        digest = _sha256(os.path.join(result.folder, "unet"))
        tag = f"tiny-sd15@{digest[:16]}"
        local, target = local_files_dir(warehouse, DIFFUSION_BASE, tag)
        shutil.rmtree(local, ignore_errors=True)
        shutil.copytree(result.folder, local)
        if lake.remote:
            lake.fs.put(local, target, recursive=True)
    metrics = result.metrics()
    record_artifact(
        lake,
        Artifact(
            name=DIFFUSION_BASE,
            kind="diffusers pipeline (tiny, trained by diffusion_base)",
            tag=tag,
            path=target,
            files={"unet": digest},
            base_model=init,
            config={k: v for k, v in vars(config).items() if isinstance(v, int | float | str)},
            metrics=metrics,
            tiny_model=True,
        ),
    )
    steps, losses = zip(*result.loss_curve, strict=True) if result.loss_curve else ((), ())
    return dg.MaterializeResult(
        metadata={
            "tiny_model": True,
            "note": TINY_BASE_NOTE,
            "folder": dg.MetadataValue.path(target),
            **{k: v for k, v in metrics.items() if isinstance(v, int | float | str)},
            "loss_curve": plot(
                line_plot(
                    {"denoising loss": (steps, losses)}, "tiny base training", "step", "loss"
                ),
                "loss curve",
            ),
        }
    )


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dg.asset(
    group_name=GROUP,
    deps=[preference_pairs, reward_model, diffusion_base],
    kinds={"pytorch", "diffusers", "safetensors"},
    pool="gpu",
    automation_condition=WEEKLY,
)
def dpo_lora(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    encoder: EncoderResource,
    preferences: PreferencesResource,
) -> dg.MaterializeResult:
    """Diffusion-DPO (Wallace et al.) of a LoRA on the preference pairs, with diffusers + peft:
    the reference is the base with the adapters disabled; the loss
    −log σ(−β/2·((‖ε_w−ε_θ(x_w)‖²−‖ε_w−ε_ref(x_w)‖²)−(‖ε_l−ε_θ(x_l)‖²−‖ε_l−ε_ref(x_l)‖²)))
    uses the same noise and timestep for both images of a pair. A fifth of the pairs (by a
    hash of the winner's imageId; min–max pairs never share an image) is held out. Output: a LoRA safetensors file diffusers'
    `load_lora_weights` loads into the base, recorded in `artifacts`; the loss and implicit
    accuracy curves; and images generated from held-out prompts before and after, scored
    with the reward model and CLIP score (reported even when the tiny model shows no gain)."""
    from ml.dpo import DPOConfig, PreferencePair, generate, save_dpo_lora, train_dpo_lora
    from ml.embed import embed_images, embed_texts
    from ml.preferences.engagement import heldout_growing
    from ml.preferences.reward import load_reward_model, score_embeddings

    lake, con = warehouse.lake(), warehouse.duck()
    enc = encoder_of(warehouse, encoder)
    pairs = lake.read_table(prefs.PREFERENCE_PAIRS).to_pylist()
    paths = dict(
        con.execute(
            f"SELECT imageId, any_value(path) FROM {lake.scan('image_files')} "
            "WHERE status = 'ok' GROUP BY imageId"
        ).fetchall()
    )
    captions = dict(con.execute(f"SELECT prompt_id, prompt FROM {lake.scan('prompts')}").fetchall())
    winners = np.array([p["winner_imageId"] for p in pairs], dtype=np.int64)
    held = heldout_growing(winners, HELDOUT_FRACTION) if len(pairs) else np.zeros(0, bool)

    def as_pair(p: dict) -> PreferencePair | None:
        winner, loser = paths.get(p["winner_imageId"]), paths.get(p["loser_imageId"])
        if winner is None or loser is None:
            return None
        return PreferencePair(captions.get(p["prompt_id"], ""), winner, loser)

    chosen = [as_pair(p) for p in pairs]
    train = [c for c, h in zip(chosen, held, strict=True) if c is not None and not h]
    heldout = [c for c, h in zip(chosen, held, strict=True) if c is not None and h]
    missing = sum(c is None for c in chosen)
    if len(train) < 2 or not heldout:
        raise ValueError(
            f"dpo_lora: {len(train)} training and {len(heldout)} held-out pairs with both "
            f"image files ({len(pairs)} pairs, {missing} without a file); need at least 2 and "
            "1 — raise IMAGEGEM_PAIRS_TOP_K or embed more images"
        )
    base = base_folder(warehouse, preferences)
    tiny = _is_tiny_base(base)
    recipe = DPOConfig.tiny_base if tiny else DPOConfig.sd15  # lr, batch size, evaluations
    config = recipe(
        beta=float(preferences.dpo_beta),
        rank=preferences.dpo_rank,
        steps=preferences.dpo_steps,
        resolution=preferences.dpo_resolution,
        time_budget_s=float(preferences.dpo_seconds),
        device=encoder.device,
        precision=encoder.precision,
        gradient_checkpointing=not tiny,
    )
    context.log.info(
        f"dpo_lora: base {base}, {len(train)} training / {len(heldout)} held-out pairs, "
        f"at most {config.steps} steps or {config.time_budget_s:.0f} s"
    )
    result = train_dpo_lora(base, train, config, heldout=heldout, log=context.log)
    with tempfile.TemporaryDirectory(prefix="imagegem-dpo-") as scratch:
        saved = save_dpo_lora(result, os.path.join(scratch, "lora"))
        digest = _sha256(saved)
        tag = f"dpo@{digest[:16]}"
        local, target = local_files_dir(warehouse, DPO_LORA, tag)
        files = {}
        for name in sorted(os.listdir(saved)):
            os.replace(os.path.join(saved, name), os.path.join(local, name))
            files[name] = (
                _sha256(os.path.join(local, name)) if name.endswith(".safetensors") else ""
            )
        publish(warehouse, local, target)

    # before/after on held-out prompts, scored by the reward model and CLIP score
    prompts = list(dict.fromkeys(p.caption for p in heldout if p.caption))[:GENERATED_PROMPTS]
    before = generate(base, prompts, steps=10, seed=0)
    after = generate(base, prompts, lora_folder=local, steps=10, seed=0)
    generated = {i: _png(im) for i, im in enumerate([*before, *after])}
    vectors: dict[int, np.ndarray] = {}
    for batch in embed_images(
        enc, [(i, str(i)) for i in generated], batch_size=64, read=lambda key: generated[int(key)]
    ):
        vectors.update(zip(batch.ids.tolist(), batch.vectors, strict=True))
    text = embed_texts(enc, prompts).vectors
    n = len(prompts)
    image_vecs = np.stack([vectors[i] for i in range(2 * n)])
    prompt_vecs = np.concatenate([text, text])
    clip = (image_vecs * prompt_vecs).sum(axis=1)
    reward_dir = reward_folder(warehouse, enc.tag)
    reward = (
        score_embeddings(load_reward_model(reward_dir).model, image_vecs, prompt_vecs)
        if reward_dir
        else np.full(2 * n, np.nan)
    )
    generation = {
        "clip_score_before": round(float(clip[:n].mean()), 4),
        "clip_score_after": round(float(clip[n:].mean()), 4),
        "reward_before": round(float(np.nanmean(reward[:n])), 4) if reward_dir else None,
        "reward_after": round(float(np.nanmean(reward[n:])), 4) if reward_dir else None,
        "generated_prompts": n,
    }
    metrics = {**result.metrics(), **generation}
    metrics.pop("curve", None)
    record_artifact(
        lake,
        Artifact(
            name=DPO_LORA,
            kind="diffusers LoRA (Diffusion-DPO)",
            tag=tag,
            path=target,
            files=files,
            base_model=base,
            encoder=enc.tag,
            config={
                k: v for k, v in vars(config).items() if isinstance(v, int | float | str | bool)
            },
            metrics={k: v for k, v in metrics.items() if isinstance(v, int | float | str | None)},
            tiny_model=result.tiny_model,
        ),
    )
    steps, losses = zip(*result.loss_curve, strict=True) if result.loss_curve else ((), ())
    acc_steps, acc = zip(*result.accuracy_curve, strict=True) if result.accuracy_curve else ((), ())
    h_steps, h_acc = zip(*result.heldout_curve, strict=True) if result.heldout_curve else ((), ())
    note = TINY_BASE_NOTE if result.tiny_model else None
    return dg.MaterializeResult(
        metadata={
            **tiny_meta(enc),
            "tiny_model": result.tiny_model,
            **({"note": note} if note else {}),
            "base_model": dg.MetadataValue.path(base),
            "lora": dg.MetadataValue.path(target),
            "train_pairs": len(train),
            "heldout_pairs": len(heldout),
            "pairs_without_image_file": missing,
            "steps": result.steps,
            "stop_reason": result.stop_reason,
            "seconds": round(result.seconds, 1),
            "heldout_implicit_accuracy_start": round(result.heldout_curve[0][1], 4)
            if result.heldout_curve
            else None,
            "heldout_implicit_accuracy_end": round(result.heldout_accuracy, 4)
            if result.heldout_accuracy is not None
            else None,
            **{k: v for k, v in generation.items() if v is not None},
            "generation": dg.MetadataValue.md(
                markdown_table(
                    ["held-out prompts", "before (base)", "after (base + DPO LoRA)"],
                    [
                        [
                            "CLIP score",
                            generation["clip_score_before"],
                            generation["clip_score_after"],
                        ],
                        ["reward model", generation["reward_before"], generation["reward_after"]],
                    ],
                )
            ),
            "loss_curve": plot(
                line_plot({"DPO loss": (steps, losses)}, "Diffusion-DPO loss", "step", "loss"),
                "loss curve",
            ),
            "implicit_accuracy": plot(
                line_plot(
                    {"training": (acc_steps, acc), "held-out": (h_steps, h_acc)},
                    "implicit accuracy (share of pairs the LoRA prefers as labelled)",
                    "step",
                    "accuracy",
                ),
                "implicit accuracy",
            ),
        }
    )


def _is_tiny_base(folder: str) -> bool:
    from ml.diffusion import is_tiny

    return is_tiny(folder)


def _sha256(path: str) -> str:
    from ml.encoders.checkpoint import file_sha256

    if os.path.isdir(path):
        import hashlib

        digest = hashlib.sha256()
        for name in sorted(os.listdir(path)):
            digest.update(name.encode())
            digest.update(file_sha256(os.path.join(path, name)).encode())
        return digest.hexdigest()
    return file_sha256(path)


@dg.asset(
    group_name=GROUP,
    deps=[reward_model, image_scores, preference_pairs, diffusion_base, dpo_lora],
    kinds={"duckdb"},
    pool="warehouse",
    automation_condition=dg.AutomationCondition.eager(),
)
def preference_catalog(warehouse: WarehouseResource) -> dg.MaterializeResult:
    """The warehouse catalog rebuilt with the preference and alignment stages' views
    (`image_scores`, `preference_pairs`, and `artifacts` with the reward model and the DPO
    LoRA), so SQL finds the latest model: `SELECT * FROM artifacts WHERE name = 'dpo_lora'
    ORDER BY created_at DESC LIMIT 1`."""
    report = build_catalog(warehouse.lake(), warehouse.catalog_path())
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(report.path),
            "views": dg.MetadataValue.md(markdown_table(["view"], [[v] for v in report.views])),
        }
    )


ALL_ASSETS = [diffusion_base, dpo_lora, preference_catalog]
