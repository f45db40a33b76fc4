"""Small PNG plots for Dagster asset metadata (loss curves, cluster sizes, 2-D embedding maps).

Every function returns the bytes of one PNG; `png_markdown` wraps them in a Markdown image with
a base64 data URI, which is how the Dagster UI shows a plot inside ``MetadataValue.md`` (the run
storage keeps the string, so nothing has to be served from disk).

Size: every figure is ``FIGSIZE`` = 6 x 4 inches at ``DPI`` = 100, i.e. exactly 600 x 400 pixels
(no ``bbox_inches="tight"``, which would change the size with the labels). A line plot or a
histogram is ~15-40 KB, a 20 000-point scatter ~50-150 KB; base64 adds a third. That keeps the
metadata of one materialization well under a megabyte; `scatter_plot` subsamples above
``max_points`` for the same reason.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas directly, never through
``pyplot``: no global figure registry, no backend switch, safe in Dagster's threads and
subprocesses, nothing to close. Output is deterministic for the same inputs (the PNG carries no
timestamp and no "Software" text).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FIGSIZE: tuple[float, float] = (6.0, 4.0)
DPI = 100
# Width and height in pixels of every PNG this module writes.
PIXELS: tuple[int, int] = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A legend with hundreds of entries covers the map: beyond this many labels, the most frequent
# ones keep a colour and the rest are drawn together in grey as "other". 18 = the colours of
# tab20 that are not grey (grey is kept for "other").
MAX_LEGEND_LABELS = 18
_OTHER_COLOUR = (0.6, 0.6, 0.6, 0.5)


def _new_figure() -> Figure:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # metadata={"Software": None}: no version string, so the bytes depend on the data only.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _finite_1d(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return arr


def line_plot(
    series: Mapping[str, tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]],
    title: str,
    xlabel: str,
    ylabel: str,
) -> bytes:
    """One line per named series (e.g. ``{"trained": (steps, loss), "init": (steps, loss0)}``).

    Several series share the axes so a training curve can be read against its baseline; a
    legend appears when there is more than one. Raises ValueError on no series, on a series
    whose xs and ys differ in length, or on empty or non-finite values (a NaN loss should fail
    loudly upstream, not draw a broken line).
    """
    if not series:
        raise ValueError("line_plot needs at least one series")
    fig = _new_figure()
    ax = fig.add_subplot()
    for name, pair in series.items():
        if len(pair) != 2:
            raise ValueError(f"series {name!r} must be an (xs, ys) pair")
        xs = _finite_1d(pair[0], f"xs of series {name!r}")
        ys = _finite_1d(pair[1], f"ys of series {name!r}")
        if xs.shape != ys.shape:
            raise ValueError(
                f"series {name!r}: {xs.size} xs but {ys.size} ys (they must pair up one to one)"
            )
        ax.plot(xs, ys, label=str(name), linewidth=1.2, marker="o" if xs.size == 1 else None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        # "best" avoids covering the curves; its cost grows with the points, fine for curves.
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return _to_png(fig)


def histogram_plot(
    bin_edges: Sequence[float] | np.ndarray,
    counts: Sequence[float] | np.ndarray,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
    log_x: bool = False,
) -> bytes:
    """Bars of already-binned ``counts`` between ``bin_edges`` (len(counts) + 1, increasing).

    Takes bins rather than raw values so the caller bins once (e.g. ``np.histogram`` over
    cluster sizes, often with log-spaced edges) and the plot stays independent of n. ``log_y``
    suits long-tailed cluster sizes; it is ignored when no count is positive (a log axis of
    nothing has no range). ``log_x`` suits log-spaced edges. Raises ValueError on mismatched
    lengths, edges that do not increase strictly, negative or non-finite counts, or ``log_x``
    with an edge <= 0.
    """
    edges = _finite_1d(bin_edges, "bin_edges")
    heights = _finite_1d(counts, "counts")
    if edges.size != heights.size + 1:
        raise ValueError(
            f"bin_edges must have len(counts) + 1 = {heights.size + 1} values, got {edges.size}"
        )
    if not (np.diff(edges) > 0).all():
        raise ValueError("bin_edges must increase strictly")
    if (heights < 0).any():
        raise ValueError("counts must be non-negative")
    if log_x and edges[0] <= 0:
        raise ValueError("log_x needs positive bin_edges")
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.bar(
        edges[:-1], heights, width=np.diff(edges), align="edge", edgecolor="white", linewidth=0.5
    )
    if log_y and (heights > 0).any():
        ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _to_png(fig)


def subsample_indices(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of at most ``max_points`` of ``n`` rows, the same for the same seed.

    All rows when ``n <= max_points``; otherwise a uniform sample without replacement, so the
    map keeps the label proportions of the full set. Sorted so the drawing order (which
    decides what overlaps what) follows the input order.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_points, replace=False)).astype(np.int64)


def scatter_plot(
    xy: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    title: str,
    max_points: int = 20000,
    seed: int = 0,
) -> bytes:
    """A 2-D embedding map (e.g. `ml.projection.project_2d` output), coloured by label.

    Above ``max_points`` rows a deterministic sample (`subsample_indices`) is drawn: the PNG
    has a fixed pixel count anyway, and drawing millions of points costs seconds for nothing.
    Markers are small and translucent so dense regions read as density. Labels are coloured
    by frequency (ties by name); beyond ``MAX_LEGEND_LABELS`` the rest share one grey "other"
    entry. Raises ValueError if ``xy`` is not (n, 2), is empty or non-finite, or ``labels``
    does not have n entries.
    """
    points = np.asarray(xy, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"xy must have shape (n, 2), got {points.shape}")
    n = points.shape[0]
    if n == 0:
        raise ValueError("xy has no rows")
    if not np.isfinite(points).all():
        raise ValueError("xy contains NaN or infinite values")
    names = np.asarray(labels).astype(str)
    if names.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match xy, got {names.shape}")

    keep = subsample_indices(n, max_points, seed)
    points, names = points[keep], names[keep]

    uniques, codes, freq = np.unique(names, return_inverse=True, return_counts=True)
    # Most frequent first, ties by name (np.unique sorts by name; the sort is stable).
    order = np.argsort(-freq, kind="stable")
    shown = order[:MAX_LEGEND_LABELS]
    rest = order[MAX_LEGEND_LABELS:]

    fig = _new_figure()
    ax = fig.add_subplot()
    marker = {"s": 3.0, "linewidths": 0, "alpha": 0.6}
    if rest.size:
        mask = np.isin(codes, rest)
        ax.scatter(
            points[mask, 0],
            points[mask, 1],
            color=_OTHER_COLOUR,
            label=f"other ({rest.size} labels)",
            **marker,
        )
    if shown.size <= 10:
        colours = list(colormaps["tab10"].colors)
    else:
        # tab20 comes in dark/light pairs of one hue (pair 7 is grey, left to "other"): all
        # dark ones first, so the most frequent labels get hues that differ.
        pairs = [c for i, c in enumerate(colormaps["tab20"].colors) if i // 2 != 7]
        colours = list(pairs[0::2]) + list(pairs[1::2])
    for rank, code in enumerate(shown):
        mask = codes == code
        ax.scatter(
            points[mask, 0],
            points[mask, 1],
            color=colours[rank],
            label=str(uniques[code]),
            **marker,
        )
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    # Legend outside the axes on the right: loc="best" scans every point (slow at 20 000), and
    # an inside legend hides part of the map. The axes shrink to make room; the PNG size stays.
    fig.subplots_adjust(left=0.03, right=0.70, top=0.92, bottom=0.03)
    # "other" is drawn first (underneath) but listed last.
    handles, names_shown = ax.get_legend_handles_labels()
    if rest.size:
        handles, names_shown = handles[1:] + handles[:1], names_shown[1:] + names_shown[:1]
    ax.legend(
        handles,
        names_shown,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize="x-small",
        markerscale=3,
        frameon=False,
        borderaxespad=0.0,
    )
    return _to_png(fig)


def png_markdown(png: bytes, alt: str) -> str:
    """``![alt](data:image/png;base64,...)``: a PNG inline in Markdown, for ``MetadataValue.md``.

    Raises ValueError when ``png`` does not start with the PNG signature (the data URI would
    otherwise show a broken image with no error anywhere). Square brackets and newlines in
    ``alt`` are escaped or replaced so they cannot end the alt text early.
    """
    if not isinstance(png, bytes | bytearray) or not bytes(png).startswith(PNG_SIGNATURE):
        raise ValueError("png_markdown needs PNG bytes (they must start with the PNG signature)")
    safe_alt = (
        alt.replace("\\", "\\\\")
        .replace("[", "\\[")
        .replace("]", "\\]")
        .replace("\r", " ")
        .replace("\n", " ")
    )
    encoded = base64.b64encode(bytes(png)).decode("ascii")
    return f"![{safe_alt}](data:image/png;base64,{encoded})"
