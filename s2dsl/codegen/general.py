"""Which blocks the kernels visit for extended plans (beyond round 1), in both directions.

Extended plans (two-sided windows, relative strides, token-granular windows and sinks, global
rows, prefix-LM; ``KernelPlan.extended``) keep a query tile inside one query block ``i``, so
every row of a tile shares its block distances. The kept kv blocks of ``i`` are enumerated
arithmetically from the head's numbers (nothing grows with the sequence length):

* a *dense row* (``i`` is a global row, or holds positions of the prefix) visits
  ``[0, dense_hi)``, unmasked where every pair is kept;
* otherwise: below the window range, the sinks, the residue blocks and the relative-stride
  blocks ``j = i - W + 1 - kS``; the window range ``[lo, hi]`` (``hi = i + ahead``), masked at
  its far edge (where a token window ends inside a block), on the diagonal and where a token
  window ahead ends; after it (bidirectional) the sinks, residue blocks and relative blocks
  ``j = i + A + kS`` before the last kv block, and the last kv block (maybe partial) once.

The dK/dV side enumerates the transpose: the query blocks ``i`` whose rows keep kv block ``j``
(``kv_side_loops``). Masked visits decide per token pair with ``snippets.pair_keep``; every
kept block is visited exactly once, so a block that is not kept may be visited masked (it adds
nothing) but a kept one never twice.
"""
from __future__ import annotations

from typing import Callable

from .lower import NO_PERIOD, KernelPlan
from .snippets import at, full_predicate, head_param

# visit(masked, wide) -> the source of one visit of kv block j (query side) or query block i
Visit = Callable[..., str]


def head_params(plan: KernelPlan) -> str:
    """The per-head numbers the extended loops read (literals where every head shares one)."""
    lines = [f"window = {head_param(plan, 'window', 0)}",
             f"sink = {head_param(plan, 'sink', 1)}",
             f"period = {head_param(plan, 'period', 2)}"]
    if plan.max_residues == 1:
        lines.append(f"residue = {head_param(plan, 'residue', 4)}")
    elif plan.max_residues > 1:
        lines.append("num_residues = tl.load(HeadTable + h * TABLE_WIDTH + 3)")
    for var, name in (("ahead", "ahead"), ("rel", "relative"), ("bwin", "block_window"), ("w_in", "inner"),
                      ("bsink", "block_sink"), ("bahead", "block_ahead"), ("n_global", "global_rows")):
        lines.append(f"{var} = {head_param(plan, name, plan.column(name))}")
    return "\n".join(lines)


def _nest(code: str, level: int) -> str:
    return at(code, level)


def _residue_loop(plan: KernelPlan, start: str, hi: str, visit: str) -> str:
    """The residue blocks j in [start, hi) (``visit`` at indentation 0 inside the loop)."""
    if plan.max_residues == 1:
        return f"""
first = {start} + (residue - {start} % period + period) % period
for j in range(first, {hi}, period):
{_nest(visit, 1)}"""
    return f"""
for t in range(0, num_residues):
    residue = tl.load(HeadTable + h * TABLE_WIDTH + 4 + t)
    first = {start} + (residue - {start} % period + period) % period
    for j in range(first, {hi}, period):
{_nest(visit, 2)}"""


def _outside(plan: KernelPlan, lo: str, hi: str, visit: Visit) -> str:
    """Sinks and residue blocks in [lo, hi): block sinks and residues are kept by every row; the
    blocks only a token sink touches are masked."""
    code = ""
    if plan.has_sink:
        code += f"""
for j in range({lo}, tl.minimum({hi}, bsink)):
{_nest(visit(False), 1)}"""
        if plan.has_tokens:
            code += f"""
for j in range(tl.maximum({lo}, bsink), tl.minimum({hi}, sink)):
{_nest(visit(True), 1)}"""
    if plan.max_residues:
        code += "\nres_start = " + (f"tl.maximum({lo}, sink)" if plan.has_sink else lo)
        code += _residue_loop(plan, "res_start", hi, visit(False))
    return code


def _contiguous(lo: str, hi: str, visit: Visit, window_span: int) -> str:
    """Unmasked visits of the blocks [lo, hi), WINDOW_SPAN at a time where the span allows."""
    if window_span == 1:
        return f"""
for j in range({lo}, {hi}):
{_nest(visit(False), 1)}"""
    return f"""
whole = {lo} + ({hi} - ({lo})) // WINDOW_SPAN * WINDOW_SPAN
for j in range({lo}, whole, WINDOW_SPAN):
{_nest(visit(False, wide=True), 1)}
for j in tl.range(whole, {hi}, num_stages=1):
{_nest(visit(False), 1)}"""


def _unless_full(plan: KernelPlan, full: str, visit: str, extra: str = "") -> str:
    """``visit`` unless kv block j is a sink or residue block (visited by those loops), and ``extra``."""
    if full == "full = False":
        return visit if not extra else f"if {extra}:\n{_nest(visit, 1)}"
    cond = "not full" if not extra else f"(not full) & ({extra})"
    return f"{full}\nif {cond}:\n{_nest(visit, 1)}"


def query_side_loops(plan: KernelPlan, visit: Visit, window_span: int = 1) -> str:
    """The kv blocks of the tile's query block ``i`` (forward and dQ), at indentation 0.

    ``visit(masked, wide=False)`` gives the source visiting kv block ``j``; ``wide`` visits
    ``WINDOW_SPAN`` contiguous blocks at once (used inside the window when ``window_span > 1``).
    """
    full = full_predicate(plan)
    last = "n_kv_blocks - 1"
    normal = f"""
lo = tl.maximum(i - tl.maximum(window, 1) + 1, 0)
hi = {"i" if plan.causal else f"tl.minimum(i + ahead, {last})"}
# -- sinks and residue blocks below the window range --{_outside(plan, "0", "lo", visit)}"""
    if plan.has_relative:
        normal += f"""
if rel < {NO_PERIOD}:  # relative strides below the window range: j = i - bwin + 1 - k * rel, k >= 1
    lo_raw = i - bwin + 1
    for j in range((lo_raw % rel + rel) % rel, tl.minimum(lo_raw - rel + 1, lo), rel):
{_nest(_unless_full(plan, full, visit(False)), 2)}"""
    if max(p.window for p in plan.params) > 1:
        normal += f"""
# -- the window range [lo, hi]: blocks in [edge, i) keep every pair --
edge = tl.minimum(tl.maximum(i - w_in + 1, lo), i)
for j in tl.range(lo, edge, num_stages=1):
{_nest(visit(True), 1)}""" + _contiguous("edge", "i", visit, window_span)
    else:  # every head's window range starts at the diagonal: no loops that could never run (issue 16)
        normal += "\n# -- the window range [i, hi] --"
    normal += f"""
j = i  # the diagonal
{visit(True)}"""
    if not plan.causal:
        if plan.has_ahead:
            normal += f"""
# blocks ahead of the diagonal: kept whole up to the block window's ahead (not the last block)
a_full = tl.minimum(i + bahead, {last} - 1)""" + _contiguous("i + 1", "a_full + 1", visit, window_span) + f"""
for j in tl.range(tl.maximum(a_full + 1, i + 1), hi + 1, num_stages=1):
{_nest(visit(True), 1)}"""
        normal += f"""
# -- after the window range, before the last kv block --{_outside(plan, "hi + 1", last, visit)}"""
        if plan.has_relative:
            normal += f"""
if rel < {NO_PERIOD}:  # relative strides: j = i + bahead + k * rel
    for j in range(i + bahead + rel, {last}, rel):
{_nest(_unless_full(plan, full, visit(False), "j > hi" if plan.has_tokens else ""), 2)}"""
        normal += f"""
if {last} > hi:  # the last kv block (maybe partial), once
    j = {last}
{_nest(visit(True), 1)}"""
    if not (plan.has_global or plan.prefix):
        return normal
    dense = ["dense_hi = i * 0", "full_hi = i * 0"]
    if plan.has_global:
        dense += [f"dense_hi = tl.where(i < n_global, {'i + 1' if plan.causal else 'n_kv_blocks'}, 0)",
                  f"full_hi = tl.where(i < n_global, {'i' if plan.causal else last}, 0)"]
    if plan.prefix:
        pb = -(-plan.prefix // plan.block)
        dense.append(f"dense_hi = tl.where(i * BLOCK < {plan.prefix}, tl.maximum(dense_hi, tl.maximum(i + 1, "
                     f"tl.minimum({pb}, n_kv_blocks))), dense_hi)")
    return "\n".join(["# a dense row: a global row, or rows inside the prefix (prefix-LM)", *dense]) + f"""
if dense_hi > 0:
    for j in range(0, full_hi):
{_nest(visit(False), 2)}
    for j in range(full_hi, dense_hi):
{_nest(visit(True), 2)}
else:
{_nest(normal, 1)}"""


def tile_order(plan: KernelPlan, pick_head: str, pid: str = "pid = tl.program_id(0)") -> str:
    """Program order for extended plans with global rows: every head's global tiles (its longest
    rows) first, so they do not run last and alone; then each head's tiles from the last down.
    ``pick_head`` turns the head index ``hh`` into ``h`` (a literal or a HEAD_ORDER lookup)."""
    g_blocks = max(p.global_rows for p in plan.params)
    return f"""
{pid}
n_g = tl.minimum(({g_blocks} * BLOCK + BLOCK_M - 1) // BLOCK_M, n_tiles)  # tiles holding global rows
n_first = HEADS * n_g
rest = tl.maximum(n_tiles - n_g, 1)
in_first = pid < n_first
hh = tl.where(in_first, pid // tl.maximum(n_g, 1), (pid - n_first) // rest)
{pick_head}
tile = tl.where(in_first, pid % tl.maximum(n_g, 1), n_tiles - 1 - (pid - n_first) % rest)"""


def kv_side_loops(plan: KernelPlan, visit: Visit) -> str:
    """The query blocks i whose rows keep kv block ``j`` (dK/dV), at indentation 0.

    ``visit(masked)`` gives the source visiting query block ``i``. A query block is visited
    unmasked only where every pair is kept and every row is a query (not the first or last
    query block, which may be partial)."""
    full = full_predicate(plan)
    inner_full = "(d >= 1) & (d < w_in)"
    if not plan.causal and plan.has_ahead:
        inner_full = f"(({inner_full}) | ((d < 0) & (d >= -bahead)))"
    edges = "(i != first_qblock) & (i != last_qblock)"
    lines = [full if full != "full = False" else "full = j < 0",
             "start = first_qblock"]
    dense = ""
    if plan.has_global or plan.prefix:
        lines.append("d_hi = first_qblock")
        d_lo = "first_qblock"
        if plan.has_global:
            lines.append("d_hi = tl.maximum(d_hi, tl.minimum(n_global, last_qblock + 1))")
        if plan.prefix:
            pb = -(-plan.prefix // plan.block)
            lines.append(f"in_prefix = j < {pb}")
            lines.append(f"d_hi = tl.where(in_prefix, tl.maximum(d_hi, tl.minimum({pb}, last_qblock + 1)), d_hi)")
            if plan.causal:
                d_lo = "tl.where(in_prefix, first_qblock, tl.maximum(j, first_qblock))"
        elif plan.causal:
            d_lo = "tl.maximum(j, first_qblock)"
        lines.append("start = tl.maximum(start, d_hi)")
        dense = f"""
# -- dense rows: global rows, and the prefix's rows for a kv block inside the prefix --
for i in range({d_lo}, d_hi):
{_nest(visit(True), 1)}"""
    if plan.causal:
        lines.append("start = tl.maximum(start, j)")
    code = "\n".join(lines) + dense
    token_sink = "(j >= bsink) | " if plan.has_sink and plan.has_tokens else ""
    code += f"""
if full:  # a sink or residue block: every query block from start on keeps (part of) it
    for i in range(start, last_qblock + 1):
        if {token_sink}(i == j) | (i == first_qblock) | (i == last_qblock):
{_nest(visit(True), 3)}
        else:
{_nest(visit(False), 3)}
else:
    i_lo = tl.maximum(start, j - ahead)
    i_hi = tl.minimum(j + window - 1, last_qblock)
    for i in range(i_lo, i_hi + 1):
        d = i - j
        if {inner_full} & {edges}:
{_nest(visit(False), 3)}
        else:
{_nest(visit(True), 3)}"""
    if plan.has_relative:
        code += f"""
    # relative strides beyond the window range: i = j + bwin - 1 + k * rel (and, bidirectional,
    # i = j - bahead - k * rel), k >= 1; heads without one have rel = NO_PERIOD
    rel_c = tl.minimum(rel, {1 << 20})  # keeps the bounds below in int32; the loops then run past every block
    r_lo = tl.maximum(tl.maximum(j + tl.minimum(bwin, last_qblock + 1) - 1 + rel_c, start), i_hi + 1)
    r_lo = r_lo + ((j + bwin - 1 - r_lo) % rel_c + rel_c) % rel_c
    for i in range(r_lo, last_qblock + 1, rel_c):
        if {edges}:
{_nest(visit(False), 3)}
        else:
{_nest(visit(True), 3)}"""
        if not plan.causal:
            code += f"""
    l_lo = start + ((j - bahead - start) % rel_c + rel_c) % rel_c
    for i in range(l_lo, tl.minimum(j - bahead - rel_c + 1, i_lo), rel_c):
        if {edges}:
{_nest(visit(False), 3)}
        else:
{_nest(visit(True), 3)}"""
    return code
