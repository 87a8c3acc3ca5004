"""Emit the Triton prefill (forward) kernel specialised to one pattern.

The generated module holds one ``@triton.jit`` kernel and a ``launch`` function. What
the pattern fixes is written into the source: per-head numbers every head shares become
literals, the others are loaded from a small per-head table; loops for components no
head has are not emitted at all. Tile sizes, head dim and dtype are baked in too, so a
source file is one specialisation and reads top to bottom without indirection.

For a query tile covering query blocks I0..I1 the kernel visits, per head:

* the "window range" [lo, I1], lo = I0 - max(window, 1) + 1: its first blocks (those not
  in every row's window) and the diagonal blocks I0..I1 are masked per row, the rest not;
* below lo, the sinks [0, min(sink, lo)) and the residue blocks j ≡ r (mod period) in
  [sink, lo), which every row of the tile keeps, so they need no mask;
* bidirectional patterns also visit the sinks and residue blocks after I1.

Every kept block is visited once, and no block outside the pattern is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from textwrap import indent

from . import general
from .lower import KernelPlan
from .snippets import (at as _at, full_predicate as _full_predicate, head_param as _param, pair_keep,
                       per_device, selected_blocks as _selected_blocks, window_bounds as _window_bounds)

CODEGEN_VERSION = "fwd-1"


@dataclass(frozen=True)
class Specialization:
    """What, besides the pattern, a generated kernel is specialised to."""

    dtype: str = "float16"       # torch dtype name of q, k, v
    head_dim: int = 64
    layout: str = "bhsd"         # bhsd, bshd or varlen (packed tokens, cu_seqlens)
    capability: tuple = (0, 0)   # device compute capability
    block_m: int = 64            # query rows per program
    block_n: int = 64            # kv rows per inner step (divides the pattern block)
    window_span: int = 1         # blocks per step inside the window, where kept blocks are contiguous
    residue_span: int = 1        # residue blocks per step (1 or 2): two blocks a period apart in one tile
    order: str = "longest_first"  # program order; naive and tile_major are kept for measurements
    num_warps: int = 4
    num_stages: int = 2
    # "pointer" or "tma": K/V tiles through tensor descriptors (Hopper's copy engine; the
    # descriptor bounds the rows to kv_len and pads the head dim with zeros, so no load mask)
    kv_load: str = "pointer"
    window_ws: bool = False      # warp-specialise the unmasked window loop (tl.range(warp_specialize=True))
    fuse_diagonal: bool = False  # one pipelined loop over the window's inner blocks and the diagonal, all masked
    # persistent programs (issue 14): 0 = one program per (tile, head); P = P programs per SM,
    # each taking every P*SMs-th work item of the longest-first order (grid-stride)
    persistent: int = 0
    # QK^T as an FP8 (e4m3) product with float32 accumulation, PV in the input dtype (issue 14;
    # forward only: see ``_qk_fp8`` for the scaling, the runtime for what is refused)
    qk_fp8: bool = False

    @property
    def d_pad(self) -> int:
        return max(16, 1 << (self.head_dim - 1).bit_length())

    def __repr__(self) -> str:
        # the generated source's header and the kernel cache key are this repr: a field that is
        # off by default is left out when off, so that adding it changes no default kernel
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                 if not (f.name in _HIDDEN_WHEN_DEFAULT and getattr(self, f.name) == f.default)]
        return f"{type(self).__qualname__}({', '.join(shown)})"


_HIDDEN_WHEN_DEFAULT = ("qk_fp8",)






def _outside_loops(plan: KernelPlan, lo: str, hi: str, masked: str, span: int = 1) -> str:
    """Loops over the sinks and residue blocks in [lo, hi): every row of the tile keeps them."""
    code = []
    if plan.has_sink:
        code.append(f"""
        for j in range({lo}, tl.minimum({hi}, sink)):
            acc, l_i, m_i = _visit(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, j, 1, rows, row_block,
                                   kv_len, 0, True, qk_scale, {masked}, CAUSAL, BLOCK, BLOCK, BLOCK_N, HEAD_DIM, D_PAD)""")
    if plan.max_residues:
        start = f"tl.maximum({lo}, sink)" if plan.has_sink else lo
        visit = f"""
            acc, l_i, m_i = _visit(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, j, 1, rows, row_block,
                                   kv_len, 0, True, qk_scale, {masked}, CAUSAL, BLOCK, BLOCK, BLOCK_N, HEAD_DIM, D_PAD)"""
        if plan.max_residues == 1 and span == 2:
            code.append(f"""
        start = {start}
        # first j >= start with j % period == residue (operands kept non-negative: C-style %)
        first = start + (residue - start % period + period) % period
        n_res = tl.maximum({hi} - first + period - 1, 0) // period
        paired = first + n_res // 2 * 2 * period
        for j in range(first, paired, 2 * period):  # two residue blocks, a period apart, per step
            acc, l_i, m_i = _visit(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, j, period, rows,
                                   row_block, kv_len, 0, True, qk_scale, {masked}, CAUSAL, BLOCK, 2 * BLOCK,
                                   RES_N, HEAD_DIM, D_PAD)
        for j in tl.range(paired, {hi}, period, num_stages=1):{visit}""")
        elif plan.max_residues == 1:
            code.append(f"""
        start = {start}
        # first j >= start with j % period == residue (operands kept non-negative: C-style %)
        first = start + (residue - start % period + period) % period
        for j in range(first, {hi}, period):{visit}""")
        else:
            code.append(f"""
        start = {start}
        for t in range(0, num_residues):
            residue = tl.load(HeadTable + h * TABLE_WIDTH + 4 + t)
            first = start + (residue - start % period + period) % period
            for j in range(first, {hi}, period):{indent(visit, '    ')}""")
    return "".join(code)




def _topk_loop(plan: KernelPlan) -> str:
    """Visit this query block's selected blocks (dynamic top-k; ``snippets.selected_blocks``)."""
    visit = """
acc, l_i, m_i = _visit(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, j, 1, rows, row_block, kv_len, 0,
                       True, qk_scale, {masked}, CAUSAL, BLOCK, BLOCK, BLOCK_N, HEAD_DIM, D_PAD)"""
    return _selected_blocks(plan, visit.format(masked=False), visit.format(masked=True),
                            "the blocks selected for this tile's query block")


_BLOCK_MASK = """\
            # per row: is block j in this row's window, or kept for every row (sink, residue)?
            keep = ((row_block - j >= 0) & (row_block - j < window)) | full
            keep = keep[:, None] & (cols[None, :] < kv_len)
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])"""
_PAIR_MASK = """\
            # the head's exact verdict per token pair (extended plans), within the length
            keep = pair_keep(HeadTable, h, rows[:, None], cols[None, :]) & (cols[None, :] < kv_len)"""


def generate_forward(plan: KernelPlan, spec: Specialization, *, name: str = "pattern", fingerprint: str = "") -> str:
    """Source of a Python module with ``kernel`` (Triton) and ``launch`` for ``plan``."""
    if plan.block % spec.block_n:
        raise ValueError(f"block_n={spec.block_n} must divide the pattern block {plan.block}")
    table_width = plan.table_width
    head_params = [
        f"window = {_param(plan, 'window', 0)}",
        f"sink = {_param(plan, 'sink', 1)}",
        f"period = {_param(plan, 'period', 2)}",
    ]
    if plan.max_residues == 1:
        head_params.append(f"residue = {_param(plan, 'residue', 4)}")
    elif plan.max_residues > 1:
        head_params.append("num_residues = tl.load(HeadTable + h * TABLE_WIDTH + 3)")
    if plan.extended:
        if spec.block_m > plan.block or plan.block % spec.block_m:
            raise ValueError(f"block_m={spec.block_m} must divide the pattern block {plan.block} for two-sided "
                             "windows, relative strides, token edges, global rows and prefixes: a query tile "
                             "stays inside one query block")
        if plan.causal and plan.has_ahead and not plan.prefix:
            raise ValueError("a causal plan keeps blocks ahead of the diagonal only inside a prefix")
        head_params = [general.head_params(plan)]
    varlen = spec.layout == "varlen"
    # inner width of a wide step (window or residue pair): as wide as the span, at most 128 rows
    wide_n = min(plan.block * spec.window_span, max(128, spec.block_n))
    res_n = min(plan.block * 2, max(128, spec.block_n))  # a residue pair spans 2 blocks
    if spec.residue_span not in (1, 2):
        raise ValueError(f"residue_span must be 1 or 2, got {spec.residue_span}")
    heads_by_cost = sorted(range(plan.heads), key=lambda h: -plan.cost(h, 1 << 12))
    if spec.order == "naive":
        order = """
        # naive order, kept to measure the scheduling: head-major, tiles ascending
        pid = tl.program_id(0)
        h = pid // n_tiles
        tile = pid % n_tiles"""
    elif spec.order == "tile_major":
        order = """
        # tile-major, last tiles first, kept to measure the scheduling
        pid = tl.program_id(0)
        tile = n_tiles - 1 - pid // HEADS
        h = pid % HEADS"""
    else:
        if heads_by_cost == list(range(plan.heads)):
            pick = "h = pid // n_tiles"
        else:
            pick = f"h = tl.load(HeadTable + HEADS * TABLE_WIDTH + pid // n_tiles)  # by cost: {heads_by_cost}"
        order = f"""
        # Longest work first, and L2-friendly: heads with the most blocks first, each head's tiles
        # from the last (most kv blocks under a causal mask) down. Programs running together then
        # share one head's K/V (the same window and residue blocks), which stays in L2.
        pid = tl.program_id(0)
        {pick}
        tile = n_tiles - 1 - pid % n_tiles"""
        if plan.has_global:
            order = general.tile_order(plan, pick.replace("pid // n_tiles", "hh"))
    full = _full_predicate(plan)
    # short loops (at most a tile's worth of blocks) are not software-pipelined: their
    # buffers would only add shared memory to the long loops'
    short = "tl.range({}, {}, num_stages=1)"
    window_masked = f"""
        for j in {short.format("lo", "edge")}:  # first blocks of the window range: not in every row's window
{indent(full, ' ' * 12)}
            acc, l_i, m_i = _visit(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, j, 1, rows, row_block,
                                   kv_len, window, full, qk_scale, True, CAUSAL, BLOCK, BLOCK, BLOCK_N, HEAD_DIM, D_PAD)"""
    # the long loop; warp specialisation (a producer warp feeding the matmul warps) is opt-in
    window_range = "tl.range({}, warp_specialize=True)" if spec.window_ws else "range({})"
    if spec.fuse_diagonal and (spec.window_span != 1 or plan.has_ahead or plan.extended):
        raise ValueError("fuse_diagonal needs window_span=1, and a plan without blocks ahead of the diagonal, "
                         "token edges, relative strides, global rows or prefixes")
    if spec.fuse_diagonal:
        window_masked += f"""
        # the window's inner blocks and the diagonal blocks in one software-pipelined loop, each
        # visit masked per row: the diagonal's tiles load while the window's are computed
        for j in {window_range.format("edge, last_block + 1")}:
{indent(full, ' ' * 12)}
            acc, l_i, m_i = _visit(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, j, 1, rows, row_block,
                                   kv_len, window, full, qk_scale, True, CAUSAL, BLOCK, BLOCK, BLOCK_N, HEAD_DIM, D_PAD)"""
    elif spec.window_span == 1:
        window_masked += f"""
        for j in {window_range.format("edge, first_block")}:  # inside every row's window: no mask
            acc, l_i, m_i = _visit(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, j, 1, rows, row_block,
                                   kv_len, window, True, qk_scale, False, CAUSAL, BLOCK, BLOCK, BLOCK_N, HEAD_DIM, D_PAD)"""
    else:
        window_masked += f"""
        # inside every row's window: no mask; kept blocks are contiguous, so take WINDOW_SPAN at a time
        whole = edge + (first_block - edge) // WINDOW_SPAN * WINDOW_SPAN
        for j in {window_range.format("edge, whole, WINDOW_SPAN")}:
            acc, l_i, m_i = _visit(acc, l_i, m_i, q, k_wide, v_wide, stride_kn, stride_vn, j, 1, rows, row_block,
                                   kv_len, window, True, qk_scale, False, CAUSAL, BLOCK, BLOCK * WINDOW_SPAN,
                                   WIDE_N, HEAD_DIM, D_PAD)
        for j in {short.format("whole", "first_block")}:
            acc, l_i, m_i = _visit(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, j, 1, rows, row_block,
                                   kv_len, window, True, qk_scale, False, CAUSAL, BLOCK, BLOCK, BLOCK_N, HEAD_DIM, D_PAD)"""
    diagonal_end, ahead_full = "last_block + 1", ""
    if plan.has_ahead:  # the tile is one query block: its window goes on to ahead blocks after it
        diagonal_end = "tl.minimum(last_block + ahead, n_kv_blocks - 1) + 1"
        ahead_full = "\nfull = full | ((j - row_block > 0) & (j - row_block <= ahead))  # per row"
    diagonal = f"""
        for j in {short.format("first_block", diagonal_end)}:  # the diagonal blocks{" and those ahead" if ahead_full else ""}
{indent(full + ahead_full, ' ' * 12)}
            acc, l_i, m_i = _visit(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, j, 1, rows, row_block,
                                   kv_len, window, full, qk_scale, True, CAUSAL, BLOCK, BLOCK, BLOCK_N, HEAD_DIM, D_PAD)"""
    window_bounds = _window_bounds(plan)
    if "edge" not in window_bounds:  # the window range is the diagonal blocks
        window_masked = diagonal
    elif not spec.fuse_diagonal:
        window_masked += diagonal
    topk_params, topk_args, topk_loop, topk_launch = "", "", "", ""
    if plan.has_topk:
        if spec.block_m > plan.block or plan.block % spec.block_m:
            raise ValueError(f"block_m={spec.block_m} must divide the pattern block {plan.block} for topk heads: "
                             "a query tile takes the selection of its one query block")
        # row 0 of a sequence's selection is its first query's block (past // BLOCK): per sequence
        # when packed
        topk_params = "Sel, stride_sb, stride_sh, stride_si, "
        topk_args = "sel, *sel_strides, "
        topk_loop = _topk_loop(plan)
        topk_launch = ", sel=None, sel_strides=(0, 0, 0)"
    below = _outside_loops(plan, "0", "lo", "False", spec.residue_span)
    above = "" if plan.causal else _outside_loops(plan, "last_block + 1", "n_kv_blocks", "True")
    enumeration = f"""\
        # the window range [lo, last_block]; blocks >= edge are in every row's window
{_at(window_bounds, 2)}
        # -- sinks and residue blocks below the window range --
{_at(below, 2)}
        # -- the window range --
{_at(window_masked, 2)}
        # -- sinks and residue blocks after the diagonal (bidirectional only) --
{_at(above, 2)}"""
    visit_params, mask, helpers = "window, full", _BLOCK_MASK, ""
    if plan.extended:
        def visit(masked, wide=False):
            span, n = ("BLOCK * WINDOW_SPAN", "WIDE_N") if wide else ("BLOCK", "BLOCK_N")
            kv = "k_wide, v_wide" if wide else "k_base, v_base"
            return (f"acc, l_i, m_i = _visit(acc, l_i, m_i, q, {kv}, stride_kn, stride_vn, j, 1, rows, "
                    f"row_block,\n                       kv_len, HeadTable, h, qk_scale, {masked}, CAUSAL, BLOCK, "
                    f"{span}, {n}, HEAD_DIM, D_PAD)")
        enumeration = f"""\
        # -- the kept blocks of the tile's one query block i (see codegen/general.py) --
        i = first_block
{_at(general.query_side_loops(plan, visit, spec.window_span), 2)}"""
        visit_params, mask, helpers = "HeadTable, h", _PAIR_MASK, pair_keep(plan) + "\n"
    if varlen:
        locate = """
        q_start = tl.load(CuSeqQ + b)
        q_len = tl.load(CuSeqQ + b + 1) - q_start
        k_start = tl.load(CuSeqK + b)
        kv_len = tl.load(CuSeqK + b + 1) - k_start
        q_base = Q + q_start * stride_qm + h * stride_qh
        o_base = Out + q_start * stride_om + h * stride_oh
        k_base = K + k_start * stride_kn + kv_h * stride_kh
        v_base = V + k_start * stride_vn + kv_h * stride_vh
        lse_base = Lse + h * stride_lh + q_start"""
    else:
        locate = """
        q_len = q_len_all
        kv_len = kv_len_all
        q_base = Q + b * stride_qb + h * stride_qh
        o_base = Out + b * stride_ob + h * stride_oh
        k_base = K + b * stride_kb + kv_h * stride_kh
        v_base = V + b * stride_vb + kv_h * stride_vh
        lse_base = Lse + b * stride_lb + h * stride_lh"""
    k_load, v_load, launch_alloc, scratch = _POINTER_LOADS + ("", "")
    if spec.kv_load == "tma":
        if spec.residue_span != 1:
            raise ValueError("kv_load='tma' loads rows a tile's blocks apart only with residue_span=1")
        k_load, v_load = _TMA_LOADS
        locate += _tma_descriptors(spec.window_span > 1)
        launch_alloc = """
    # device-side tensor descriptors take a little global scratch per program
    triton.set_allocator(_scratch)"""
        scratch = """

def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")
"""
    elif spec.kv_load != "pointer":
        raise ValueError(f"kv_load must be 'pointer' or 'tma', got {spec.kv_load!r}")
    else:
        enumeration = enumeration.replace("k_wide, v_wide", "k_base, v_base")

    tables = per_device(("head_table", "The per-head table, then the head order, on ``device``.",
                         "torch.tensor([x for row in HEAD_TABLE for x in row] + HEAD_ORDER, dtype=torch.int32, "
                         "device=device)"))
    source = f'''\
# Generated by s2dsl codegen {CODEGEN_VERSION}: forward (prefill) kernel. Do not edit.
# pattern: {name}  fingerprint: {fingerprint}
# block {plan.block}, heads {plan.heads}, kv_heads {plan.kv_heads}, {"causal" if plan.causal else "bidirectional"}
# specialisation: {spec}
import torch
import triton
import triton.language as tl

HEADS = {plan.heads}
GROUP = {plan.group_size}
BLOCK = {plan.block}
CAUSAL = {plan.causal}
TABLE_WIDTH = {table_width}
# per head: window, sink, period, number of residues, residues...
HEAD_TABLE = {list(map(list, plan.table()))}
# heads in the order programs take them, most work first (appended after the table)
HEAD_ORDER = {heads_by_cost}
BLOCK_M = {spec.block_m}
BLOCK_N = {spec.block_n}
WINDOW_SPAN = {spec.window_span}
WIDE_N = {wide_n}
RES_N = {res_n}
HEAD_DIM = {spec.head_dim}
D_PAD = {spec.d_pad}
NUM_WARPS = {spec.num_warps}
NUM_STAGES = {spec.num_stages}
VARLEN = {varlen}


{helpers}@triton.jit
def _visit(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, j, step, rows, row_block, kv_len,
           {visit_params}, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
           SPAN: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Online-softmax update of one tile of queries with SPAN kv rows: the blocks j, j + step, ..."""
    offs_d = tl.arange(0, D_PAD)
    for s in tl.static_range(SPAN // BLOCK_N):
        rel = s * BLOCK_N + tl.arange(0, BLOCK_N)
        # the rel-th row of the span lies in its (rel // BLOCK)-th block, step blocks apart
        cols = j * BLOCK + rel + (rel // BLOCK) * (step - 1) * BLOCK
{k_load}
        qk = tl.dot(q, k)
        if MASKED:
{mask}
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # a row with nothing kept so far keeps m = -inf; subtract 0 instead to avoid NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
{v_load}
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def kernel(Q, K, V, Out, Lse, HeadTable, CuSeqQ, CuSeqK, {topk_params}
           stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
           stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
           q_len_all, kv_len_all, n_tiles, qk_scale,
           HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
           TABLE_WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           WINDOW_SPAN: tl.constexpr, WIDE_N: tl.constexpr, RES_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
{_at(order, 1)}
    b = tl.program_id(1)
    kv_h = h // GROUP
{_at(locate, 1)}
    past = kv_len - q_len  # the queries are the last q_len of kv_len positions
    # absolute positions of this tile's rows; rows outside [past, kv_len) are computed but not stored
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    first_row = tl.maximum(tile * BLOCK_M, past)
    last_row = tl.minimum(tile * BLOCK_M + BLOCK_M, kv_len) - 1
    if first_row <= last_row:
        row_block = rows // BLOCK
        first_block = first_row // BLOCK
        last_block = last_row // BLOCK
        n_kv_blocks = (kv_len + BLOCK - 1) // BLOCK
        # ---- this head's pattern (generated) ----
{_at(chr(10).join(head_params), 2)}
        valid = (rows >= past) & (rows < kv_len)
        offs_d = tl.arange(0, D_PAD)
        q_ptrs = q_base + (rows - past)[:, None] * stride_qm + offs_d[None, :]
        q = tl.load(q_ptrs, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
{enumeration}{chr(10) + _at(topk_loop, 2) if topk_loop else ""}
        # rows that kept nothing (an empty pattern row) give 0 and lse -inf, not NaN
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        o_ptrs = o_base + (rows - past)[:, None] * stride_om + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM))
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(lse_base + (rows - past), lse, mask=valid)


{tables}{scratch}

def launch(q, k, v, out, lse, q_strides, k_strides, v_strides, o_strides, lse_strides,
           batch, q_len, kv_len, max_q_len, cu_seqlens_q, cu_seqlens_k, sm_scale{topk_launch}):
    """Run the kernel. Strides are (batch, head, token) in elements; the last dim is contiguous."""
    max_kv_len = kv_len if cu_seqlens_k is None else int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    n_tiles = triton.cdiv(max_kv_len, BLOCK_M)  # tiles are aligned to absolute positions
    table = head_table(q.device)
    dummy = table  # stands in for the cu_seqlens pointers when they are unused
    grid = (n_tiles * HEADS, batch){launch_alloc}
    kernel[grid](q, k, v, out, lse, table,
                 cu_seqlens_q if cu_seqlens_q is not None else dummy,
                 cu_seqlens_k if cu_seqlens_k is not None else dummy, {topk_args}
                 *q_strides, *k_strides, *v_strides, *o_strides, *lse_strides,
                 q_len, kv_len, n_tiles, sm_scale * 1.4426950408889634,
                 HEADS=HEADS, GROUP=GROUP, BLOCK=BLOCK, CAUSAL=CAUSAL, TABLE_WIDTH=TABLE_WIDTH,
                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, WINDOW_SPAN=WINDOW_SPAN, WIDE_N=WIDE_N, RES_N=RES_N,
                 HEAD_DIM=HEAD_DIM, D_PAD=D_PAD,
                 num_warps=NUM_WARPS, num_stages=NUM_STAGES)
'''
    if spec.qk_fp8:
        if varlen:
            raise ValueError("qk_fp8 takes padded batches (layout bhsd or bshd); packed sequences are not supported")
        source = _qk_fp8(source, plan)
    if spec.persistent:
        source = _persistent(source, spec.persistent)
    return source


def _persistent(source: str, per_sm: int) -> str:
    """The kernel's body in a grid-stride loop over the work items (the program ids of the
    one-program-per-tile launch, in the same longest-first order), and a launch of
    ``per_sm`` programs per SM: no program start per tile, no tail of short last programs."""
    if per_sm < 0:
        raise ValueError(f"persistent={per_sm} must be >= 0 (programs per SM)")
    lines = source.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("def kernel("))
    body = next(i for i in range(start, len(lines)) if lines[i].endswith("tl.constexpr):")) + 1
    end = next(i for i in range(body, len(lines)) if lines[i] and not lines[i].startswith(" "))
    while not lines[end - 1].strip():
        end -= 1
    pid = [i for i in range(body, end) if lines[i].strip() == "pid = tl.program_id(0)"]
    assert len(pid) == 1, "the program order names pid once"
    lines[pid[0]] = lines[pid[0]].replace("tl.program_id(0)", "work")
    wrapped = ["    # persistent: this program takes every num_programs-th work item, longest first",
               "    for work in range(tl.program_id(0), n_tiles * HEADS, tl.num_programs(0)):"]
    wrapped += ["    " + line if line.strip() else line for line in lines[body:end]]
    lines[body:end] = wrapped
    source = "\n".join(lines)
    old = "    grid = (n_tiles * HEADS, batch)"
    assert old in source
    return source.replace(old, f"""\
    sms = _sm_count(q.device)
    grid = (max(1, min(n_tiles * HEADS, {per_sm} * sms // batch)), batch)""") + '''

_sms = {}


def _sm_count(device):
    """SMs of ``device`` (the interpreter: 2, so that programs take several work items)."""
    if device.type != "cuda":
        return 2
    if device.index not in _sms:
        _sms[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sms[device.index]
'''


_POINTER_LOADS = ("""\
        # K is read transposed, [D_PAD, BLOCK_N]: column n is key row cols[n]
        k_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols[None, :] < kv_len) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        elif HEAD_DIM != D_PAD:
            k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        else:
            k = tl.load(k_ptrs)""", """\
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif HEAD_DIM != D_PAD:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            v = tl.load(v_ptrs)""")

# k_base / v_base are tensor descriptors here; a chunk of BLOCK_N rows is contiguous (one
# block, or a window span with step 1: residue pairs are refused), so it starts at cols[0]
_TMA_LOADS = ("""\
        row0 = j * BLOCK + s * BLOCK_N + (s * BLOCK_N // BLOCK) * (step - 1) * BLOCK
        k = k_base.load([row0, 0]).T""", """\
        v = v_base.load([row0, 0])""")


def _tma_descriptors(wide: bool) -> str:
    """K/V descriptors over this sequence's rows of its kv head: rows past kv_len and head-dim
    columns past HEAD_DIM read as zeros."""
    code = """
        k_base = tl.make_tensor_descriptor(k_base, shape=[kv_len, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, D_PAD])
        v_base = tl.make_tensor_descriptor(v_base, shape=[kv_len, HEAD_DIM], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, D_PAD])"""
    if wide:
        code = """
        k_wide = tl.make_tensor_descriptor(k_base, shape=[kv_len, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[WIDE_N, D_PAD])
        v_wide = tl.make_tensor_descriptor(v_base, shape=[kv_len, HEAD_DIM], strides=[stride_vn, 1],
                                           block_shape=[WIDE_N, D_PAD])""" + code
    return code


# ---------------------------------------------------------------- FP8 QK^T (Specialization.qk_fp8)
#
# Scores come from e4m3 operands (``tl.float8e4nv``: 3 mantissa bits, largest finite 448) with a
# float32 accumulator; P·V stays in the input dtype. Each operand is scaled so that its absolute
# maximum maps to 448 and the two dequantisation factors multiply the softmax scale, so the
# online softmax (max, exp2, sums) runs on float32 scores as before.
#
# * Q: one factor per query row, from the tile the program has loaded anyway (an absmax across
#   the head dim): no pass over Q, and a row vector in place of the scalar softmax scale, which
#   costs nothing per score (``qk * scale - m`` is one FMA whether ``scale`` is a scalar or a row).
# * K: one factor per (sequence, kv head, pattern block), written with the e4m3 copy of K by one
#   pass before the launch (``_quantize_k``: reads K once, writes 1 byte per element). A kv head
#   wide factor would need a second pass over K for its absmax (2.5x K's bytes instead of 1.5x:
#   ~56 against ~34 us at 8K, d 128, 32 heads, on ~3 TB/s), and the error is the same: e4m3's
#   relative rounding (2^-4) does not depend on the scale as long as values stay out of the
#   subnormals, and a block's range rarely spans 2^15. Where a kv step is one block (every step of
#   the 64-row tiles, the short-sequence default) the block's factor joins the row factor: no cost
#   per score; a step over two blocks (the 128-row tiles' window spans and residue pairs) scales
#   its columns, one multiply per score.
#
# Under the Triton 3.6 interpreter the float32 -> e4m3 cast is wrong: it rounds half up and adds
# the rounding carry into the exponent with an OR (1.99 -> 1.0, 7.84 -> 4.0); the dot on e4m3
# operands and the e4m3 -> float16 conversion it uses are exact. With FP8_EXACT (set at launch
# when the tensors are not on a GPU) ``_to_e4m3`` rounds to nearest even in float32 arithmetic
# first, so the cast only meets e4m3 values; on a GPU the cast (cvt.rn.satfinite) is used alone.

_FP8_HELPERS = '''@triton.jit
def _to_e4m3(x, EXACT: tl.constexpr):
    """float32 x (|x| <= 448) as e4m3, rounded to nearest even."""
    if EXACT:  # the interpreter (see codegen/forward.py): round in float32, then cast exact values
        bits = x.to(tl.int32, bitcast=True)
        # keep 3 mantissa bits, to nearest even; a carry moves into the exponent as it should
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
        mag = tl.abs(x)
        # below 2^-6 e4m3 is subnormal, steps of 2^-9: adding 2^14 rounds there (float32 ulp 2^-9)
        sub = (mag + 16384.0) - 16384.0
        x = tl.where(mag < 0.015625, tl.where(x < 0, -sub, sub), bits.to(tl.float32, bitcast=True))
    return x.to(tl.float8e4nv)


@triton.jit
def _quantize_k(K, K8, KScale, stride_kb, stride_kh, stride_kn, stride_8b, stride_8h, stride_8n,
                stride_ksb, stride_ksh, kv_len, BLOCK: tl.constexpr, B_PAD: tl.constexpr,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, FP8_EXACT: tl.constexpr):
    """K's block jb of one (sequence, kv head) as e4m3 with its dequantisation factor."""
    jb = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # b * stride_kb passes 2^31 at 128K tokens x 8 kv heads x d 128 x batch 16
    b = tl.program_id(2).to(tl.int64)
    rel = tl.arange(0, B_PAD)
    rows = jb * BLOCK + rel
    offs_d = tl.arange(0, D_PAD)
    inside = ((rel < BLOCK) & (rows < kv_len))[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_kn + offs_d[None, :], mask=inside,
                other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(k), 1), 0)
    live = amax > 0.0
    # an all-zero block: zeros, factor 0; a subnormal maximum (bf16 holds ~1e-40) is raised so that 448 / amax
    # stays finite (its values then use a few of e4m3's codes; the factor below is the same amax)
    amax = tl.where(live, tl.maximum(amax, 1e-30), 1.0)
    mul = tl.math.div_rn(tl.full([B_PAD], 448.0, tl.float32), tl.full([B_PAD], 1.0, tl.float32) * amax)
    k8 = _to_e4m3(k * mul[:, None], FP8_EXACT)
    tl.store(K8 + b * stride_8b + h * stride_8h + rows[:, None] * stride_8n + offs_d[None, :], k8, mask=inside)
    tl.store(KScale + b * stride_ksb + h * stride_ksh + jb, tl.where(live, amax / 448.0, 0.0))


'''

_FP8_QUANTIZE_Q = '''
        # e4m3 Q, per row: its absmax maps to 448; the row's factor joins the softmax scale
        q_amax = tl.max(tl.abs(q.to(tl.float32)), 1)
        q_live = q_amax > 0.0
        # an all-zero row (or one not stored): zeros, factor 0; a subnormal maximum raised as K's is
        q_amax = tl.where(q_live, tl.maximum(q_amax, 1e-30), 1.0)
        q = _to_e4m3(q.to(tl.float32) * tl.math.div_rn(tl.full([BLOCK_M], 448.0, tl.float32), q_amax)[:, None],
                     FP8_EXACT)
        qk_row = tl.where(q_live, qk_scale * (q_amax / 448.0), 0.0)
        ks_base = KScale + b * stride_ksb + kv_h * stride_ksh  # this (sequence, kv head)'s K block factors'''

_FP8_SCALE_SCORES = '''
        if BLOCK_N <= BLOCK:  # the chunk is inside one block: its K factor joins the row factors
            rs = qk_scale * tl.load(ks_base + j + (s * BLOCK_N // BLOCK) * step)
        else:  # a chunk over blocks step apart (window span, residue pair): a factor per column
            qk = qk * tl.load(ks_base + cols // BLOCK, mask=cols < kv_len, other=0.0)[None, :]
            rs = qk_scale'''

_FP8_HOST = '''

def quantize_k(k, k_strides, batch, kv_len):
    """K as e4m3, (batch, kv heads, kv_len, head dim rounded up to 16: 16-byte rows for tensor
    descriptors), with float32 factors (batch, kv heads, blocks); one pass over K."""
    d16 = -(-HEAD_DIM // 16) * 16
    n_blocks = max(1, triton.cdiv(kv_len, BLOCK))
    k8 = torch.empty(batch, KV_HEADS, kv_len, d16, dtype=torch.float8_e4m3fn, device=k.device)
    scale = torch.empty(batch, KV_HEADS, n_blocks, dtype=torch.float32, device=k.device)
    if k8.numel():
        _quantize_k[(n_blocks, KV_HEADS, batch)](k, k8, scale, *k_strides, k8.stride(0), k8.stride(1), k8.stride(2),
                                                 scale.stride(0), scale.stride(1), kv_len, BLOCK=BLOCK,
                                                 B_PAD=triton.next_power_of_2(BLOCK), HEAD_DIM=HEAD_DIM, D_PAD=D_PAD,
                                                 FP8_EXACT=k.device.type != "cuda")
    return k8, scale
'''


def _replace(source: str, old: str, new: str, count: int = 1) -> str:
    found = source.count(old)
    assert found == count, f"qk_fp8: expected {count} of {old!r} in the generated source, found {found}"
    return source.replace(old, new)


def _qk_fp8(source: str, plan: KernelPlan) -> str:
    """The generated module with QK^T in e4m3 (see the notes above): K quantised by ``quantize_k``
    in ``launch``, Q in the kernel, the factors folded into the softmax scale."""
    import re
    visits = source.count("_visit(") - 1  # calls, not the definition
    s = _replace(source, "@triton.jit\ndef _visit(", _FP8_HELPERS + "@triton.jit\ndef _visit(")
    s = _replace(s, "qk_scale, MASKED: tl.constexpr", "qk_scale, ks_base, MASKED: tl.constexpr")
    s = _replace(s, "        qk = tl.dot(q, k)\n", "        qk = tl.dot(q, k)" + _FP8_SCALE_SCORES + "\n")
    s = _replace(s, 'qk = tl.where(keep, qk * qk_scale, float("-inf"))', 'qk = tl.where(keep, qk * rs[:, None], float("-inf"))')
    s = _replace(s, "tl.max(qk, 1) * qk_scale)", "tl.max(qk, 1) * rs)")
    s = _replace(s, "tl.math.exp2(qk * qk_scale - m_new[:, None])", "tl.math.exp2(qk * rs[:, None] - m_new[:, None])")
    s, calls = re.subn(r"\bqk_scale, (True|False), CAUSAL", r"qk_row, ks_base, \1, CAUSAL", s)
    assert calls == visits, f"qk_fp8: {visits} _visit calls but {calls} took the row scale"
    s = _replace(s, "def kernel(Q, K, V, Out, Lse, HeadTable, CuSeqQ, CuSeqK, ",
                 "def kernel(Q, K, V, Out, Lse, HeadTable, CuSeqQ, CuSeqK, KScale, stride_ksb, stride_ksh, ")
    s = _replace(s, "RES_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):",
                 "RES_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,\n"
                 "           FP8_EXACT: tl.constexpr):")
    s = _replace(s, "        q = tl.load(q_ptrs, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)\n",
                 "        q = tl.load(q_ptrs, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)"
                 + _FP8_QUANTIZE_Q + "\n")
    s = _replace(s, "VARLEN = False\n", f"VARLEN = False\nKV_HEADS = {plan.kv_heads}\n")
    s = _replace(s, '    """Run the kernel. Strides are (batch, head, token) in elements; the last dim is contiguous."""\n',
                 '    """Run the kernel. Strides are (batch, head, token) in elements; the last dim is contiguous.\n'
                 '    K (16-bit) is quantised to e4m3 first (``quantize_k``)."""\n'
                 "    k, k_scale = quantize_k(k, k_strides, batch, kv_len)\n"
                 "    k_strides = k.stride()[:3]\n")
    s = _replace(s, "cu_seqlens_k if cu_seqlens_k is not None else dummy, ",
                 "cu_seqlens_k if cu_seqlens_k is not None else dummy, k_scale, k_scale.stride(0), k_scale.stride(1), ")
    # the interpreter's e4m3 cast needs the rounding of _to_e4m3 (see above); a GPU's does not
    s = _replace(s, "HEAD_DIM=HEAD_DIM, D_PAD=D_PAD,\n",
                 'HEAD_DIM=HEAD_DIM, D_PAD=D_PAD, FP8_EXACT=q.device.type != "cuda",\n')
    return s + _FP8_HOST
