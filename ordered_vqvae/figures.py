"""PNG figures: image grids and curves (matplotlib, headless)."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from ordered_vqvae.atomic import atomic_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _atomic_savefig(fig, path: str) -> None:
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")


def tile(images: np.ndarray, columns: int) -> np.ndarray:
    """Tiles images [N,H,W,C] in [0,1] into one [rows*H, columns*W, C] array (1px gaps)."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    out = np.ones((rows * (h + 1) - 1, columns * (w + 1) - 1, c), np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        out[r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = image
    return out


def save_image_rows(rows: Sequence[np.ndarray], labels: Sequence[str], path: str,
                    title: str = "") -> str:
    """One labelled row of images per entry of `rows` (each [N,H,W,C] in [0,1]); writes a PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(4, len(rows[0]) * 0.6), 0.75 * len(rows) + 0.6),
                             squeeze=False)
    for ax, images, label in zip(axes[:, 0], rows, labels):
        grid = tile(np.clip(images, 0, 1), len(images))
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    _atomic_savefig(fig, path)
    plt.close(fig)
    return path


def curves_figure(curves: Dict[str, Dict[float, float]], xlabel: str, ylabel: str,
                  title: str = "", logy: bool = False):
    """A matplotlib figure plotting {name: {x: y}}. Past ten curves the colours repeat with
    another line style and marker, and past five the legend stands beside the axes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, points) in enumerate(curves.items()):
        xs = sorted(points)
        turn = i // len(colours)
        ax.plot(xs, [points[x] for x in xs], color=colours[i % len(colours)],
                linestyle=("-", "--", ":")[turn % 3], marker="osD"[turn % 3], label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(curves) > 5:
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    else:
        ax.legend()
    return fig


# Where a point's label may go, tried in turn (offset in points, alignment): beside the
# point first, then further up or down, so that a cluster's labels do not cover each other.
_LABEL_PLACES = [((4, dy), ha) for dy in (2, -10, 10, -18, 18, -26, 26, -34, 34)
                 for ha in ("left", "right")]


def _overlaps(box, boxes):
    return any(box.x0 < b.x1 and b.x0 < box.x1 and box.y0 < b.y1 and b.y0 < box.y1
               for b in boxes)


def _place_labels(ax, labelled):
    """Annotates each (name, x, y) at the first place in `_LABEL_PLACES` whose box overlaps
    no label already placed and stays inside the axes (else at the first place)."""
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    inside, placed = ax.get_window_extent(renderer), []

    def annotate(name, x, y, place):
        (dx, dy), ha = place
        text = ax.annotate(name, (x, y), textcoords="offset points", fontsize=6, ha=ha,
                           va="center", xytext=(dx if ha == "left" else -dx, dy),
                           arrowprops=dict(arrowstyle="-", lw=0.6, color="0.35", shrinkB=3)
                           if abs(dy) >= 10 else None)
        # The text's own box (an annotation's would include its leader line).
        text.update_positions(renderer)
        return text, Text.get_window_extent(text, renderer)

    for name, x, y in labelled:
        for place in _LABEL_PLACES:
            text, box = annotate(name, x, y, place)
            if (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0
                    and box.y1 <= inside.y1 and not _overlaps(box, placed)):
                break
            text.remove()
        else:  # Nowhere free: the first place, overlapping.
            text, box = annotate(name, x, y, _LABEL_PLACES[0])
        placed.append(box)


def scatter_figure(points: Dict[str, Sequence[float]], xlabel: str, ylabels: Sequence[str],
                   title: str = ""):
    """A matplotlib figure of named points {name: (x, y_1, ..., y_n)}: one panel per y, each
    point labelled with its name where the label covers no other label, so that variants
    can be told apart without a legend."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ylabels), figsize=(4.5 * len(ylabels), 3.8), squeeze=False)
    for j, (ax, ylabel) in enumerate(zip(axes[0], ylabels)):
        for values in points.values():
            ax.plot(values[0], values[j + 1], "o", color="C0", markersize=4)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.margins(x=0.25, y=0.1)  # Room for labels beside the outermost points.
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.canvas.draw()  # Settles the limits and layout that the labels' boxes depend on.
    for j, ax in enumerate(axes[0]):
        _place_labels(ax, [(name, values[0], values[j + 1]) for name, values in points.items()])
    return fig


def save_figure(fig, path: str) -> str:
    """Writes a matplotlib figure to a PNG at `path` (atomically) and closes it."""
    _atomic_savefig(fig, path)
    _pyplot().close(fig)
    return path


def save_curves(curves: Dict[str, Dict[float, float]], path: str, xlabel: str, ylabel: str,
                title: str = "", logy: bool = False) -> str:
    """`curves_figure` written to a PNG at `path`."""
    return save_figure(curves_figure(curves, xlabel, ylabel, title, logy), path)
