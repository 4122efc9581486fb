"""Figures of the demo and the notebooks. matplotlib is optional (`pip install matplotlib`, or the `dev` extra)."""

from __future__ import annotations

import numpy as np

from ..blocks import cdiv

__all__ = ["MatplotlibMissing", "draw_block_tables", "kv_figure", "require_matplotlib"]

MIB = 2**20
INSTALL_HINT = "pip install matplotlib   (or: pip install 'paged-generate[dev]')"


class MatplotlibMissing(ImportError):
    pass


def require_matplotlib():
    """matplotlib's object-oriented API (no pyplot, no GUI backend); `MatplotlibMissing`, with the fix, if absent."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MatplotlibMissing(f"this needs matplotlib, which is not installed: {INSTALL_HINT}") from error
    return Figure, FigureCanvasAgg


def kv_figure(comparisons: list[dict], title: str = ""):
    """KV memory over decoding steps, stock vs paged, one panel per comparison (`measure.compare` results)."""
    Figure, FigureCanvasAgg = require_matplotlib()
    figure = Figure(figsize=(5.2 * len(comparisons), 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(comparisons), squeeze=False)[0]
    for ax, comparison in zip(axes, comparisons):
        stock, paged = comparison["stock"].trace, comparison["paged"].trace
        ax.plot(range(len(stock)), [s["kv_bytes"] / MIB for s in stock], color="tab:red", lw=2,
                label="stock DynamicCache (K/V tensors)")
        ax.plot(range(len(paged)), [s["kv_bytes"] / MIB for s in paged], color="tab:blue", lw=2,
                label="paged: blocks in use x block bytes")
        ax.plot(range(len(paged)), [s["pool_bytes"] / MIB for s in paged], color="tab:blue", lw=1, ls=":",
                label="paged: pool reserved")
        stats = comparison["paged"].stats
        ax.set_title(f"{comparison['label']} x {comparison['prompts']} prompts ({stats.rows} rows)\n"
                     f"KV saving at the peak: {stats.saving:.0%}",
                     fontsize=10)
        ax.set_xlabel("forward pass (0 = prompt)")
        ax.set_ylabel("KV cache (MiB)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


def draw_block_tables(snapshots: list[dict], steps: list[int] | None = None, block_size: int | None = None,
                      max_panels: int = 6):
    """A grid per recorded step: rows = sequences (beams), columns = block slots, each cell a block id.

    snapshots: dicts with `tables` ([rows, blocks] block ids), `ref_counts` (of those ids, same shape), `copied`
    (block ids created by copy-on-write in that forward) and `seq_len`. Colours: blue = shared (reference count > 1),
    orange = owned by one row, red = a copy-on-write copy made in this step. Returns the Figure.
    """
    Figure, FigureCanvasAgg = require_matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if steps is None:  # the prompt forward, the first decode step (the fork's copies), then evenly spread
        count = min(max_panels, len(snapshots))
        rest = range(2, len(snapshots))
        picks = {round(i * (len(rest) - 1) / max(1, count - 3)) for i in range(count - 2)} if len(rest) else set()
        steps = sorted({0, 1} & set(range(len(snapshots))) | {rest[i] for i in picks if i < len(rest)})
    colours = ListedColormap(["#ffffff", "#4c78a8", "#f58518", "#e45756"])  # empty, shared, own, copied
    widest = max(snapshots[i]["tables"].shape[1] for i in steps)
    rows = max(snapshots[i]["tables"].shape[0] for i in steps)
    ncols = min(3, len(steps))
    nrows = cdiv(len(steps), ncols)
    figure = Figure(figsize=(max(3.6, 0.55 * widest + 1.2) * ncols, (0.42 * rows + 1.5) * nrows + 0.4),
                    layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(nrows, ncols, squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[len(steps):]:
        ax.set_visible(False)
    for ax, index in zip(axes, steps):
        snap = snapshots[index]
        tables, counts = snap["tables"], snap["ref_counts"]
        kind = np.zeros((rows, widest), dtype=int)
        kind[: tables.shape[0], : tables.shape[1]] = np.where(counts > 1, 1, 2)
        copied = np.isin(tables, np.asarray(snap.get("copied", []), dtype=tables.dtype))
        kind[: tables.shape[0], : tables.shape[1]][copied] = 3
        ax.imshow(kind, cmap=colours, vmin=0, vmax=3, aspect="auto", interpolation="nearest")
        for (r, c), block in np.ndenumerate(tables):
            ax.text(c, r, str(block), ha="center", va="center", fontsize=7,
                    color="white" if kind[r, c] in (1, 3) else "black")
        ax.set_xticks(np.arange(widest))
        ax.set_yticks(np.arange(rows))
        ax.set_xticks(np.arange(-0.5, widest), minor=True)
        ax.set_yticks(np.arange(-0.5, rows), minor=True)
        ax.grid(which="minor", color="#999999", lw=0.5)
        ax.tick_params(which="minor", length=0)
        ax.tick_params(labelsize=7)
        unique = len(np.unique(tables))
        ax.set_title(f"{snap.get('label', f'forward {index}')}\n{snap['seq_len']} tokens, {unique} blocks "
                     f"for {tables.size} slots", fontsize=8)
        ax.set_xlabel("block slot" + (f" ({block_size} tokens each)" if block_size else ""), fontsize=8)
    for ax in grid[:, 0]:
        ax.set_ylabel("row (beam)", fontsize=8)
    figure.legend(handles=[Patch(color="#4c78a8", label="shared (ref count > 1)"),
                           Patch(color="#f58518", label="owned by one row"),
                           Patch(color="#e45756", label="copy-on-write copy made this step")],
                  loc="outside lower center", ncols=3, fontsize=8)
    return figure
