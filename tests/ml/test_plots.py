"""PNG plots for asset metadata: valid PNGs of the documented size, deterministic, sad paths."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from ml import plots


def _decode(png: bytes) -> Image.Image:
    assert png.startswith(plots.PNG_SIGNATURE)
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def test_documented_size_is_600_by_400() -> None:
    assert plots.PIXELS == (600, 400)


def test_line_plot_is_a_png_of_the_documented_size() -> None:
    steps = np.arange(50)
    png = plots.line_plot(
        {"trained": (steps, np.exp(-steps / 10)), "init": (steps, np.ones(50))},
        title="training loss",
        xlabel="step",
        ylabel="loss",
    )
    image = _decode(png)
    assert image.format == "PNG"
    assert image.size == plots.PIXELS


def test_line_plot_is_deterministic_and_depends_on_the_data() -> None:
    xs = [0, 1, 2, 3]
    first = plots.line_plot({"loss": (xs, [3, 2, 1.5, 1])}, "t", "x", "y")
    again = plots.line_plot({"loss": (xs, [3, 2, 1.5, 1])}, "t", "x", "y")
    other = plots.line_plot({"loss": (xs, [1, 2, 3, 4])}, "t", "x", "y")
    assert first == again
    assert first != other


def test_line_plot_rejects_bad_series() -> None:
    with pytest.raises(ValueError, match="at least one series"):
        plots.line_plot({}, "t", "x", "y")
    with pytest.raises(ValueError, match="3 xs but 2 ys"):
        plots.line_plot({"loss": ([0, 1, 2], [1.0, 2.0])}, "t", "x", "y")
    with pytest.raises(ValueError, match="NaN"):
        plots.line_plot({"loss": ([0, 1], [1.0, float("nan")])}, "t", "x", "y")
    with pytest.raises(ValueError, match="empty"):
        plots.line_plot({"loss": ([], [])}, "t", "x", "y")


def test_histogram_plot_linear_and_log() -> None:
    counts, edges = np.histogram(np.random.default_rng(0).pareto(1.5, 1000) + 1, bins=20)
    for log_y in (False, True):
        image = _decode(plots.histogram_plot(edges, counts, "sizes", "size", "clusters", log_y))
        assert image.size == plots.PIXELS
    linear = plots.histogram_plot(edges, counts, "sizes", "size", "clusters")
    log = plots.histogram_plot(edges, counts, "sizes", "size", "clusters", log_y=True)
    assert linear != log


def test_histogram_plot_log_of_all_zero_counts_still_draws() -> None:
    png = plots.histogram_plot([0, 1, 2], [0, 0], "empty", "size", "clusters", log_y=True)
    assert _decode(png).size == plots.PIXELS


def test_histogram_plot_rejects_bad_bins() -> None:
    with pytest.raises(ValueError, match=r"len\(counts\) \+ 1"):
        plots.histogram_plot([0, 1, 2], [1, 2, 3], "t", "x", "y")
    with pytest.raises(ValueError, match="increase strictly"):
        plots.histogram_plot([0, 2, 1], [1, 2], "t", "x", "y")
    with pytest.raises(ValueError, match="non-negative"):
        plots.histogram_plot([0, 1, 2], [1, -2], "t", "x", "y")
    with pytest.raises(ValueError, match="log_x needs positive"):
        plots.histogram_plot([0, 1, 2], [1, 2], "t", "x", "y", log_x=True)


def test_histogram_plot_log_x_for_log_spaced_edges() -> None:
    edges = np.logspace(0, 4, 9)
    counts = np.array([40, 30, 20, 10, 5, 3, 2, 1])
    log_x = plots.histogram_plot(edges, counts, "sizes", "size", "clusters", log_x=True)
    assert _decode(log_x).size == plots.PIXELS
    assert log_x != plots.histogram_plot(edges, counts, "sizes", "size", "clusters")


def test_subsample_keeps_at_most_max_points_deterministically() -> None:
    picked = plots.subsample_indices(10_000, 500, seed=3)
    assert picked.size == 500
    assert np.unique(picked).size == 500
    assert (np.diff(picked) > 0).all()
    assert picked.min() >= 0
    assert picked.max() < 10_000
    np.testing.assert_array_equal(picked, plots.subsample_indices(10_000, 500, seed=3))
    assert not np.array_equal(picked, plots.subsample_indices(10_000, 500, seed=4))


def test_subsample_keeps_everything_at_or_below_max_points() -> None:
    np.testing.assert_array_equal(plots.subsample_indices(7, 7), np.arange(7))
    np.testing.assert_array_equal(plots.subsample_indices(3, 100), np.arange(3))
    with pytest.raises(ValueError, match="max_points"):
        plots.subsample_indices(10, 0)


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(["anime", "photo", "oil"], size=n)
    centres = {"anime": (0.0, 0.0), "photo": (5.0, 0.0), "oil": (0.0, 5.0)}
    xy = np.array([centres[label] for label in labels]) + rng.normal(size=(n, 2))
    return xy.astype(np.float32), labels


def test_scatter_plot_subsamples_deterministically() -> None:
    xy, labels = _blobs(3000, seed=1)
    first = plots.scatter_plot(xy, labels, "map", max_points=500, seed=0)
    assert _decode(first).size == plots.PIXELS
    assert plots.scatter_plot(xy, labels, "map", max_points=500, seed=0) == first
    # Another seed draws other points, so another picture.
    assert plots.scatter_plot(xy, labels, "map", max_points=500, seed=1) != first
    # Rows past the sample do not reach the picture: changing one that seed 0 leaves out
    # changes nothing.
    kept = plots.subsample_indices(3000, 500, seed=0)
    left_out = np.setdiff1d(np.arange(3000), kept)
    assert left_out.size == 2500
    moved = xy.copy()
    moved[left_out[0]] = (100.0, 100.0)
    assert plots.scatter_plot(moved, labels, "map", max_points=500, seed=0) == first


def test_scatter_plot_with_many_labels_groups_the_rare_ones() -> None:
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(600, 2))
    labels = np.array([f"cluster {i % 60}" for i in range(600)])
    assert np.unique(labels).size > plots.MAX_LEGEND_LABELS
    assert _decode(plots.scatter_plot(xy, labels, "clusters")).size == plots.PIXELS


def test_scatter_plot_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        plots.scatter_plot(np.zeros((5, 3)), ["a"] * 5, "t")
    with pytest.raises(ValueError, match="labels must have shape"):
        plots.scatter_plot(np.zeros((5, 2)), ["a"] * 4, "t")
    with pytest.raises(ValueError, match="no rows"):
        plots.scatter_plot(np.zeros((0, 2)), [], "t")
    with pytest.raises(ValueError, match="NaN"):
        plots.scatter_plot(np.array([[0.0, np.inf]]), ["a"], "t")


def test_png_markdown_round_trips() -> None:
    png = plots.line_plot({"loss": ([0, 1], [1.0, 0.5])}, "t", "x", "y")
    markdown = plots.png_markdown(png, "training loss")
    prefix = "![training loss](data:image/png;base64,"
    assert markdown.startswith(prefix)
    assert markdown.endswith(")")
    assert base64.b64decode(markdown[len(prefix) : -1], validate=True) == png


def test_png_markdown_escapes_alt_and_refuses_non_png() -> None:
    png = plots.histogram_plot([0, 1], [1], "t", "x", "y")
    markdown = plots.png_markdown(png, "sizes [log]\nsecond line")
    assert markdown.startswith(r"![sizes \[log\] second line](data:image/png;base64,")
    with pytest.raises(ValueError, match="PNG signature"):
        plots.png_markdown(b"GIF89a...", "not a png")
