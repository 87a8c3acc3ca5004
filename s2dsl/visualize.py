"""Pictures of patterns: one panel per distinct head's block mask, plus the union.

The default grid is 64 blocks. Longer sequences are drawn at most ``MAX_DRAWN_BLOCKS``
wide: every k-th query and kv block, evaluated from the heads' arithmetic at those blocks
only, so memory does not grow with the sequence. Uses matplotlib's Agg backend, so it runs
without a display.
"""
from __future__ import annotations

import math
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

from .pattern import HeadSpec, Pattern
from .printer import format_ranges

DEFAULT_BLOCKS = 64
MAX_DRAWN_BLOCKS = 512
MAX_HEAD_PANELS = 47  # plus the union panel: at most 6 rows of 8

# cell codes -> colours
OUTSIDE, DROPPED, KEPT, UNCOVERED = 0, 1, 2, 3
COLOURS = ["#ffffff", "#e4e4e4", "#1f3a93", "#ff1a1a"]


def distinct_heads(pattern: Pattern) -> List[Tuple[HeadSpec, List[int]]]:
    """Heads grouped by identical spec, in order of first appearance."""
    groups: Dict[HeadSpec, List[int]] = {}
    for h, spec in enumerate(pattern.head_specs):
        groups.setdefault(spec, []).append(h)
    return list(groups.items())


def _heads_label(heads: Sequence[int], limit: int = 28) -> str:
    text = format_ranges(heads)
    if len(text) > limit:
        text = text[: limit - 3].rsplit(",", 1)[0] + ", ..."
    return ("h " if len(heads) == 1 else "heads ") + text


def figure(pattern: Pattern, seq_len: Optional[int] = None, report=None):
    """A matplotlib Figure for ``pattern`` at ``seq_len`` tokens (default 64 blocks)."""
    import sys
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:  # headless by default; keep a notebook's backend
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    import torch

    if report is None:
        from .analysis import analyze
        report = analyze(pattern)
    blocks = DEFAULT_BLOCKS if seq_len is None else max(1, -(-seq_len // pattern.block))
    step = -(-blocks // MAX_DRAWN_BLOCKS)  # draw every step-th block
    drawn = torch.arange(0, blocks, step)
    n = len(drawn)
    masks = sampled_block_mask(pattern, drawn)  # static part: topk heads contribute nothing here
    i = drawn.view(-1, 1)
    j = drawn.view(1, -1)
    region = (j <= i) if pattern.causal else torch.ones(n, n, dtype=torch.bool)

    def codes(keep):
        out = torch.full((n, n), OUTSIDE, dtype=torch.int8)
        out[region] = DROPPED
        out[keep & region] = KEPT
        return out

    union = masks.any(dim=0)
    union_codes = codes(union)
    holes = region & ~union
    union_codes[holes] = UNCOVERED
    n_holes = int(holes.sum())

    groups = distinct_heads(pattern)
    shown = groups[:MAX_HEAD_PANELS]
    panels = 1 + len(shown)
    cols = min(8, math.ceil(math.sqrt(panels * 1.6)))
    rows = math.ceil(panels / cols)
    size = 1.9 if panels > 4 else 3.0
    width = max(7.5, cols * size)
    height = rows * (size + 0.25) + 1.6
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    cmap = ListedColormap(COLOURS)

    def draw(ax, data, title, colour="black"):
        ax.imshow(data.numpy(), cmap=cmap, vmin=0, vmax=len(COLOURS) - 1, interpolation="nearest")
        ax.set_title(title, fontsize=8, color=colour)
        ax.set_xticks([0, n - 1], [0, int(drawn[-1])])
        ax.set_yticks([0, n - 1], [0, int(drawn[-1])])
        ax.tick_params(labelsize=6, length=2, pad=1)

    drawn_cells = "cells" if step == 1 else "drawn cells"
    union_title = "union: no holes" if not n_holes else f"union: {n_holes} {drawn_cells} uncovered"
    draw(axes[0][0], union_codes, union_title, "black" if not n_holes else "#d00000")
    for k, (spec, heads) in enumerate(shown, start=1):
        ax = axes[k // cols][k % cols]
        draw(ax, codes(masks[heads[0]]), _heads_label(heads) + (" (topk: static part)" if spec.topk else ""))
    for k in range(panels, rows * cols):
        axes[k // cols][k % cols].axis("off")

    mode = "causal" if pattern.causal else "bidirectional"
    if report.covered:
        verdict = "COVERED for every sequence length"
        colour = "#006400"
    else:
        verdict = "NOT COVERED"
        ce = report.counterexample
        if ce is not None:
            verdict += f": e.g. query block {ce.i} never sees kv block {ce.j}"
        colour = "#d00000"
    if not report.rows_nonempty:
        verdict += "; some rows are EMPTY"
        colour = "#d00000"
    more = "" if len(groups) <= MAX_HEAD_PANELS else f"; {len(groups) - MAX_HEAD_PANELS} more not drawn"
    wrap = max(60, int(width * 12))
    plural = "" if len(groups) == 1 else "s"
    title = (f"{pattern.name}: block {pattern.block}, {pattern.heads} heads / {pattern.kv_heads} kv heads, "
             f"{mode}; {blocks} x {blocks} blocks = {blocks * pattern.block} tokens"
             + ("" if step == 1 else f" (1 block in {step} drawn)"))
    fig.suptitle("\n".join(textwrap.wrap(title, wrap) + textwrap.wrap(verdict, wrap)), fontsize=10, color=colour)
    fig.legend(handles=[Patch(color=COLOURS[KEPT], label="kept"), Patch(color=COLOURS[DROPPED], label="not kept"),
                        Patch(color=COLOURS[UNCOVERED], label="kept by no head (uncovered)")],
               loc="lower center", fontsize=7, frameon=False, ncol=3,
               title=f"{len(groups)} distinct head{plural}{more}; row i = query block, column j = kv block",
               title_fontsize=7)
    fig.tight_layout(rect=(0, 0.7 / height, 1, 1 - 0.8 / height), h_pad=1.2)
    return fig


def sampled_block_mask(pattern: Pattern, blocks):
    """Bool ``[heads, len(blocks), len(blocks)]``: ``Pattern.block_mask`` restricted to the
    query and kv blocks ``blocks`` (a 1-D tensor), computed at those blocks only."""
    return pattern.blocks_at(blocks, blocks)


def render_pattern(pattern: Pattern, out: str, seq_len: Optional[int] = None, report=None, dpi: int = 110) -> str:
    """Draw ``pattern`` to the PNG file ``out``; returns ``out``."""
    import matplotlib.pyplot as plt
    fig = figure(pattern, seq_len, report)
    try:
        fig.savefig(out, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return out
