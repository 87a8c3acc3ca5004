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


def pair_keep(plan: KernelPlan) -> str:
    """Source of the ``@triton.jit`` helper ``pair_keep(HeadTable, h, q_pos, k_pos)`` of extended
    plans: does head ``h`` keep query position ``q_pos`` and key position ``k_pos``? The exact,
    token-level verdict (``Pattern.keeps_token``, the causal cut and the prefix included); the
    three arguments broadcast (``h`` per row in decode). Kernels call it on the blocks they
    visit masked; it is the one place their generated code decides membership per token pair.
    """
    def p(name):
        value = plan.uniform(name) if name != "residue" else None
        return str(value) if value is not None else f"tl.load(HeadTable + h * {plan.table_width} + {plan.column(name)})"

    lines = [f"qb = q_pos // {plan.block}", f"kb = k_pos // {plan.block}", "d = qb - kb",
             f"bwin = {p('block_window')}", f"bahead = {p('block_ahead')}", f"bsink = {p('block_sink')}",
             "keep = ((d >= -bahead) & (d < bwin)) | (kb < bsink)"]
    if plan.max_residues:
        lines += [f"period = {p('period')}", f"count = tl.load(HeadTable + h * {plan.table_width} + 3)",
                  f"for u in tl.static_range({plan.max_residues}):",
                  f"    r = tl.load(HeadTable + h * {plan.table_width} + 4 + u)",
                  "    keep = keep | ((u < count) & (kb % period == r))"]
    if plan.has_relative:
        lines += [f"rel = {p('relative')}",
                  "keep = keep | ((d >= bwin) & ((d - bwin + 1) % rel == 0))"]
        if not plan.causal or plan.prefix:  # ahead of the diagonal: bidirectional, or inside a prefix
            lines.append("keep = keep | ((d < -bahead) & ((-d - bahead) % rel == 0))")
    if plan.has_global:
        lines.append(f"keep = keep | (qb < {p('global_rows')})")
    if plan.has_tokens:
        lines += ["t = q_pos - k_pos",
                  f"keep = keep | ((t >= -{p('ahead_tokens')}) & (t < {p('tokens')})) | (k_pos < {p('sink_tokens')})"]
    if plan.causal:
        cut = "k_pos <= q_pos"
        if plan.prefix:
            cut += f") | ((q_pos < {plan.prefix}) & (k_pos < {plan.prefix})"
        lines.append(f"keep = keep & (({cut}))")
    body = indent("\n".join(lines), "    ")
    return f'''
@triton.jit
def pair_keep(HeadTable, h, q_pos, k_pos):
    """Does head h keep query position q_pos and key position k_pos (they broadcast)?"""
{body}
    return keep
'''


def per_device(*functions) -> str:
    """Module-level source of functions ``name(device)`` that build a tensor (or a tuple of them)
    from the module's constants once per device and keep it: the head tables every generated
    module uploads. ``functions``: (name, docstring, expression using ``device``)."""
    defs = "".join(f'''

def {name}(device):
    """{doc}"""
    return _once_per_device("{name}", device, lambda: {expr})
''' for name, doc, expr in functions)
    return '''_per_device = {}


def _once_per_device(what, device, make):
    """``make()``, built once per (what, device) and kept."""
    key = (what, str(device))
    if key not in _per_device:
        _per_device[key] = make()
    return _per_device[key]
''' + defs


def window_bounds(plan: KernelPlan) -> str:
    """The window range [lo, last_block] of a query tile covering blocks first_block..last_block,
    and ``edge``: blocks in [edge, first_block) are in every row's window. When every head's
    window is at most one block the range is the diagonal blocks and no ``edge`` is emitted
    (loops before the diagonal could never run; zero-trip loops of window 1 crashed ptxas on
    sm_90, issue 16)."""
    if max(p.window for p in plan.params) <= 1:
        return """
lo = first_block  # window <= 1 for every head: the window range is the diagonal blocks"""
    return """
lo = tl.maximum(first_block - tl.maximum(window, 1) + 1, 0)
edge = tl.minimum(tl.maximum(last_block - tl.maximum(window, 1) + 1, lo), first_block)"""
