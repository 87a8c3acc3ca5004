"""Pieces of generated Triton source that the forward and backward kernels share."""
from __future__ import annotations

from textwrap import dedent, indent

from .lower import KernelPlan


def at(code: str, level: int) -> str:
    """``code`` dedented, then indented ``level`` steps; blank input gives ``pass``."""
    code = dedent(code).strip("\n")
    return indent(code if code.strip() else "pass", "    " * level)


def head_param(plan: KernelPlan, name: str, column: int) -> str:
    """A per-head number: a literal when every head shares it, else a load from the head table."""
    value = plan.uniform(name)
    if value is not None:
        return str(value)
    return f"tl.load(HeadTable + h * TABLE_WIDTH + {column})"


def full_predicate(plan: KernelPlan) -> str:
    """Scalar ``full``: is kv block j kept for every query block by a sink or a residue class?"""
    terms = []
    if plan.has_sink:
        terms.append("(j < sink)")
    if plan.max_residues == 1:
        terms.append("(j % period == residue)")
    elif plan.max_residues > 1:
        return dedent("""\
            full = j < sink
            for t in range(0, num_residues):
                full = full | (j % period == tl.load(HeadTable + h * TABLE_WIDTH + 4 + t))""")
    return "full = " + (" | ".join(terms) if terms else "False")


def static_keeps(plan: KernelPlan) -> str:
    """Source of the ``@triton.jit`` helper ``static_keeps(HeadTable, h, i, j, TABLE_WIDTH)``:
    does head ``h`` keep kv block ``j`` for query block ``i`` by its static components (window,
    sink, residue classes, dense; the causal cut included)? ``h``, ``i``, ``j`` broadcast.

    The one place generated code decides static membership: dynamic top-k never selects what
    it keeps, so kernels visit static and selected blocks without overlap.
    """
    residues = ""
    if plan.max_residues:
        residues = f"""
    period = tl.load(HeadTable + h * TABLE_WIDTH + 2)
    count = tl.load(HeadTable + h * TABLE_WIDTH + 3)
    for u in tl.static_range({plan.max_residues}):
        r = tl.load(HeadTable + h * TABLE_WIDTH + 4 + u)
        keep = keep | ((u < count) & (j % period == r))"""
    causal = "\n    keep = keep & (j <= i)" if plan.causal else ""
    return f'''
@triton.jit
def static_keeps(HeadTable, h, i, j, TABLE_WIDTH: tl.constexpr):
    """Is kv block j kept for query block i by head h's static components (j >= 0)?"""
    window = tl.load(HeadTable + h * TABLE_WIDTH + 0)
    sink = tl.load(HeadTable + h * TABLE_WIDTH + 1)
    keep = ((i - j >= 0) & (i - j < window)) | (j < sink){residues}{causal}
    return keep
'''


# ---------------------------------------------------------------- dynamic top-k (issue 11)
# The forward and the dQ kernel walk a tile's selected blocks the same way; only the visit differs.

def selected_blocks(plan: KernelPlan, below: str, diagonal: str, what: str) -> str:
    """Source (level 0) of the loop over this tile's selected kv blocks (dynamic top-k): the
    first K of its query block's row of ``Sel`` (row 0 = the sequence's first query block,
    ``past // BLOCK``; -1 marks an unused slot). ``below`` visits a block under the tile's first
    block (no causal mask), ``diagonal`` one in the tile's own range; ``j`` is the block.

    A selection never holds a static block, so nothing is visited twice. When every topk head
    keeps its diagonal statically (causal, window >= 1) the selected blocks all lie below the
    tile: the loop then runs over the used slots (they come first) with no branch.
    """
    n_sel = head_param(plan, "topk", plan.topk_column)
    row = "sel_row = Sel + b * stride_sb + h * stride_sh + (first_block - past // BLOCK) * stride_si"
    if plan.causal and all(p.window >= 1 for p in plan.params if p.topk):
        k_pad = 1 << (plan.max_topk - 1).bit_length()
        return f"""
# -- dynamic top-k: {what} (all below the tile) --
{row}
slots = tl.arange(0, {k_pad})
n_used = tl.sum((tl.load(sel_row + slots, mask=slots < {n_sel}, other=-1) >= 0).to(tl.int32), 0)
for tk in range(0, n_used):
    j = tl.load(sel_row + tk)
{at(below, 1)}"""
    return f"""
# -- dynamic top-k: {what} --
{row}
for tk in range(0, {n_sel}):
    j = tl.load(sel_row + tk)
    if (j >= 0) & (j < first_block):
{at(below, 2)}
    elif j >= 0:
{at(diagonal, 2)}"""
