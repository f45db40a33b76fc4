"""How good the embeddings stage's outputs are on the sample, measured against its truth.

The evaluation the ``embedding_eval`` asset runs (and the figures a closing note quotes):

* **image vectors** — k-NN (k = 10, cosine) planted-style accuracy on the held-out images
  (those the encoder did not train on), for the trained encoder and for the same
  architecture at random initialisation, embedded the same way;
* **prompt vectors** — k-NN planted-style accuracy of the prompts (a prompt's style: the
  majority style of the images that used it);
* **prompt clusters** — adjusted Rand index of the clusters (noise excluded) against the
  prompts' planted recipe and against their style, and the noise share.

Only this package reads ``truth/``; the vectors and clusters come from the warehouse tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import duckdb
import numpy as np
import pyarrow as pa

from ml.evaluation.embeddings import adjusted_rand, knn_label_accuracy, read_truth
from warehouse.embeddings import PROMPT_EMBEDDINGS, image_embeddings_sql, read_vectors
from warehouse.lake import Lake
from warehouse.sqlfiles import install_macros

K = 10


@dataclass(frozen=True)
class EmbeddingQuality:
    """The figures of one evaluation (NaN where an input was missing)."""

    encoder: str
    images: int
    holdout_images: int
    image_style_knn: float
    image_style_knn_init: float
    prompts: int
    prompt_style_knn: float
    cluster_ari_recipe: float
    cluster_ari_style: float
    cluster_noise_share: float
    n_clusters: int

    def as_dict(self) -> dict[str, float | int | str]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _label_lookup(keys: np.ndarray, table: pa.Table, key: str, label: str) -> np.ndarray:
    mapping = dict(zip(table.column(key).to_pylist(), table.column(label).to_pylist(), strict=True))
    return np.array([mapping.get(k) for k in keys.tolist()], dtype=object)


def prompt_truth(con: duckdb.DuckDBPyConnection, lake: Lake, sample_root: str) -> pa.Table:
    """(prompt_id, style, recipe_id): per distinct normalised prompt, the majority planted
    style and recipe of the images that used it."""
    install_macros(con)
    truth = read_truth(sample_root, "image_truth", ["imageId", "style", "recipe_id"])
    con.register("_image_truth", truth)
    try:
        return con.sql(
            f"""SELECT prompt_id(normalize_prompt(i.prompt)) AS prompt_id,
                   mode(t.style) AS style, mode(t.recipe_id) AS recipe_id
            FROM (SELECT DISTINCT imageId, prompt FROM {lake.scan("images")}) i
            JOIN _image_truth t USING (imageId)
            WHERE normalize_prompt(i.prompt) IS NOT NULL
            GROUP BY 1"""
        ).to_arrow_table()
    finally:
        con.unregister("_image_truth")


def evaluate_embeddings(
    con: duckdb.DuckDBPyConnection,
    lake: Lake,
    sample_root: str,
    encoder: str,
    holdout: Callable[[np.ndarray], np.ndarray],
    init_image_vectors: Callable[[np.ndarray], np.ndarray] | None = None,
) -> EmbeddingQuality:
    """Measure the stage's tables of ``encoder`` against the sample's truth.

    ``holdout`` marks the image ids the encoder did not train on (the trainer's split);
    ``init_image_vectors`` embeds image ids with the random-init encoder (the baseline)."""
    nan = float("nan")
    styles = read_truth(sample_root, "image_media", ["imageId", "style"])
    image_sql = image_embeddings_sql(lake)
    image_acc = init_acc = nan
    n_images = n_holdout = 0
    if image_sql is not None:
        ids, vectors = read_vectors(con, image_sql, "imageId", encoder)
        labels = _label_lookup(ids, styles, "imageId", "style")
        known = labels != None  # noqa: E711 (elementwise on an object array)
        ids, vectors, labels = ids[known], vectors[known], labels[known]
        mask = holdout(ids)
        n_images, n_holdout = len(ids), int(mask.sum())
        if n_holdout and len(ids) > K:
            image_acc = knn_label_accuracy(vectors, labels.astype(str), k=K, query_mask=mask)
            if init_image_vectors is not None:
                init = init_image_vectors(ids)
                init_acc = knn_label_accuracy(init, labels.astype(str), k=K, query_mask=mask)
    prompt_acc = ari_recipe = ari_style = noise = nan
    n_prompts = n_clusters = 0
    if lake.current(PROMPT_EMBEDDINGS) is not None:
        truth = prompt_truth(con, lake, sample_root)
        pids, pvectors = read_vectors(con, lake.scan(PROMPT_EMBEDDINGS), "prompt_id", encoder)
        pstyles = _label_lookup(pids, truth, "prompt_id", "style")
        known = pstyles != None  # noqa: E711
        n_prompts = int(known.sum())
        if n_prompts > K:
            prompt_acc = knn_label_accuracy(pvectors[known], pstyles[known].astype(str), k=K)
        if lake.current("prompt_clusters") is not None:
            clusters = lake.read_table("prompt_clusters")
            cids = clusters.column("prompt_id").to_numpy(zero_copy_only=False)
            labels = clusters.column("cluster_id").to_numpy()
            recipes = _label_lookup(cids, truth, "prompt_id", "recipe_id")
            cstyles = _label_lookup(cids, truth, "prompt_id", "style")
            known = recipes != None  # noqa: E711
            n_clusters = int(len(set(labels.tolist()) - {-1}))
            if known.any():
                ari_recipe, noise = adjusted_rand(labels[known], recipes[known].astype(str))
                ari_style, _ = adjusted_rand(labels[known], cstyles[known].astype(str))
    return EmbeddingQuality(
        encoder=encoder,
        images=n_images,
        holdout_images=n_holdout,
        image_style_knn=image_acc,
        image_style_knn_init=init_acc,
        prompts=n_prompts,
        prompt_style_knn=prompt_acc,
        cluster_ari_recipe=ari_recipe,
        cluster_ari_style=ari_style,
        cluster_noise_share=noise,
        n_clusters=n_clusters,
    )


def style_map(
    con: duckdb.DuckDBPyConnection, lake: Lake, sample_root: str, encoder: str
) -> bytes | None:
    """The embedding map (2-D PCA of the image vectors) coloured by each image's planted
    style — what the encoder learnt, seen against the truth (ImageGem's Figure 2 on the
    sample). None when there are no image vectors."""
    from ml.plots import scatter_plot
    from ml.projection import project_2d

    source = image_embeddings_sql(lake)
    if source is None:
        return None
    ids, vectors = read_vectors(con, source, "imageId", encoder)
    styles = _label_lookup(
        ids, read_truth(sample_root, "image_media", ["imageId", "style"]), "imageId", "style"
    )
    known = styles != None  # noqa: E711
    if known.sum() < 3:
        return None
    projection = project_2d(vectors[known])
    return scatter_plot(
        projection.xy, styles[known].astype(str), f"image embeddings by planted style, {encoder}"
    )
