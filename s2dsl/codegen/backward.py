"""Emit the Triton backward kernels specialised to one pattern.

The generated module holds ``@triton.jit`` kernels and a ``launch`` function. The dQ and
dK/dV work are two program bodies (``_dq_program``, ``_dkdv_program``); ``launch`` runs
them as two kernels (``dq_kernel``, ``dkdv_kernel``), or, with ``one_grid``, as one
``backward_kernel`` whose grid holds the dK/dV programs then the dQ programs (the dQ
programs fill the SMs that the long residue columns of dK/dV leave idle at the end):

* ``preprocess_kernel``: ``delta = rowsum(dO * O)`` in float32, laid out like the lse;
* ``dq_kernel``: one program per (query tile, q head). It visits exactly the kv blocks the
  forward kernel visits, enumerated the same way (see ``forward.py``): the window range
  [lo, last_block] with masked edge and diagonal blocks, the sinks and residue blocks
  below it (unmasked: every row of the tile keeps them), and, bidirectional, the sinks
  and residue blocks after the diagonal. It recomputes ``P = exp(QK^T * scale - lse)``,
  ``dS = P * (dO V^T - delta)`` and accumulates ``dQ += dS K * scale``;
* ``dkdv_kernel``: one program per (kv tile, kv head); a kv tile lies inside one pattern
  block j. It visits the *transposed* pattern: the query blocks i that keep block j.
  For a head with window W, sinks S and residues mod ``period`` that set is always one
  contiguous range, derived arithmetically from j:

  - j is "full" (j < S or j % period in residues): every query block keeps it, so
    i in [j, last] (causal) or [first, last] (bidirectional);
  - otherwise only the window keeps it: i in [j, j + W) clamped to [first, last]
    (the window looks backwards, so this holds for bidirectional patterns too);

  where [first, last] are the query blocks holding the queries (absolute positions
  past .. kv_len - 1). The first and last block of the range are visited with masks
  (causal diagonal, the partial first/last query block), the blocks between without.
  With grouped-query attention the program loops over the q heads of its kv head, each
  with its own parameters (so its own range), and accumulates their dK/dV in registers:
  every output element is written by exactly one program, no atomics, deterministic.

Nothing is a table that grows with the sequence length: the only table is the per-head
parameter table (window, sink, period, residues), present only when heads differ.
"""
from __future__ import annotations

from dataclasses import dataclass
from textwrap import indent

from . import general
from .forward import Specialization
from .lower import KernelPlan
from .snippets import (at as _at, full_predicate as _full_predicate, head_param as _param, pair_keep,
                       per_device, selected_blocks as _selected_blocks, window_bounds as _window_bounds)

BACKWARD_CODEGEN_VERSION = "bwd-2"


@dataclass(frozen=True)
class BackwardSpecialization(Specialization):
    """A ``Specialization`` for the backward kernels.

    ``block_m``/``block_n``/``num_warps``/``num_stages`` are the dQ kernel's (query rows
    per program; kv rows per inner step, dividing the pattern block). The dK/dV kernel's
    own fields fall back to them when 0: ``dkdv_block_n`` kv rows per program and
    ``dkdv_block_m`` query rows per inner step, both dividing the pattern block.
    ``dkdv_unroll_group`` unrolls the dK/dV kernel's loop over the q heads of a kv head.
    """

    dkdv_block_m: int = 0
    dkdv_block_n: int = 0
    dkdv_num_warps: int = 0
    dkdv_num_stages: int = 0
    dkdv_unroll_group: bool = False  # unroll the loop over a kv head's q heads (GQA): longer compile, fewer spills
    flat_steps: bool = False  # dK/dV: loop over BLOCK_M-row query steps, not over query blocks
    two_streams: bool = False  # dQ on a second CUDA stream beside dK/dV (each with its own tiles)
    one_grid: bool = False  # dK/dV and dQ programs in one launch (with the dQ kernel's warps and stages)
    # "pointer" or "tma": the dQ kernel's K/V tiles (dq_load) and the dK/dV kernel's Q/dO tiles
    # (dkdv_load) through tensor descriptors, as the forward's kv_load="tma": the descriptor bounds
    # the rows (zeros past the sequence) and pads the head dim, so no load masks or pointer tensors
    # (sm_90: the default dK/dV body spills at 255 registers; benchmarks/RESULTS.md, issue 14)
    dq_load: str = "pointer"
    dkdv_load: str = "pointer"
    # dK/dV: P and dS computed [query rows, kv rows] (as the forward and the dQ kernel do) and
    # fed to the dV and dK products transposed through shared memory, instead of P^T and dS^T
    # [kv rows, query rows] in registers: a row's lse and delta then take 2 registers a thread
    # instead of 16 each (sm_90: the default body spills at 255 registers, issue 14)
    dkdv_query_major: bool = False


_LOAD_FIELDS = ("dq_load", "dkdv_load")
_NEW_FLAGS = ("dkdv_query_major", "qk_fp8")  # qk_fp8: a forward field, always off here


def _describe(spec) -> str:
    """The specialisation as the generated header shows it: the fields added for issue 14's
    variants only when not at their defaults, so the measured default's source stays as timed."""
    text = repr(spec)
    for name in _LOAD_FIELDS:
        text = text.replace(f", {name}='pointer'", "")
    for name in _NEW_FLAGS:
        text = text.replace(f", {name}=False", "")
    return text


# Parameters of the two program bodies; a name starting with '*' is a tl.constexpr. The three
# kernels (dQ alone, dK/dV alone, both in one grid) are generated from these lists.
_COMMON = ("Lse Delta HeadTable CuSeqQ CuSeqK stride_qb stride_qh stride_qm stride_kb stride_kh stride_kn "
           "stride_vb stride_vh stride_vn stride_dob stride_doh stride_dom").split()
DQ_PARAMS = ("Q K V DO DQ".split() + _COMMON + "stride_dqb stride_dqh stride_dqm stride_lb stride_lh".split()
             + "q_len_all kv_len_all n_tiles qk_scale sm_scale".split()
             + "*HEADS *GROUP *BLOCK *CAUSAL *TABLE_WIDTH *BLOCK_M *BLOCK_N *HEAD_DIM *D_PAD".split())
DKDV_PARAMS = ("Q K V DO DK DV".split() + _COMMON
               + "stride_dkb stride_dkh stride_dkn stride_dvb stride_dvh stride_dvn stride_lb stride_lh".split()
               + "q_len_all kv_len_all n_kv_tiles qk_scale sm_scale".split()
               + "*KV_HEADS *GROUP *BLOCK *CAUSAL *TABLE_WIDTH *BLOCK_M *BLOCK_N *HEAD_DIM *D_PAD".split())
# the one-grid kernel: both lists, each body's tile sizes under its own name
_RENAME_DQ = {"*BLOCK_M": "*DQ_BLOCK_M", "*BLOCK_N": "*DQ_BLOCK_N"}
_RENAME_DKDV = {"*BLOCK_M": "*DKDV_BLOCK_M", "*BLOCK_N": "*DKDV_BLOCK_N"}
BOTH_PARAMS = ("Q K V DO DQ DK DV".split() + _COMMON
               + "stride_dqb stride_dqh stride_dqm stride_dkb stride_dkh stride_dkn stride_dvb stride_dvh stride_dvn"
                 " stride_lb stride_lh q_len_all kv_len_all n_tiles n_kv_tiles qk_scale sm_scale".split()
               + "*HEADS *KV_HEADS *GROUP *BLOCK *CAUSAL *TABLE_WIDTH *DQ_BLOCK_M *DQ_BLOCK_N *DKDV_BLOCK_M"
                 " *DKDV_BLOCK_N *HEAD_DIM *D_PAD".split())
assert sorted(BOTH_PARAMS) == sorted(set([_RENAME_DQ.get(n, n) for n in DQ_PARAMS]
                                         + [_RENAME_DKDV.get(n, n) for n in DKDV_PARAMS]))


# extra parameters of the bodies for plans with dynamic top-k heads (before the constexprs)
TOPK_DQ = "Sel stride_sb stride_sh stride_si".split()
TOPK_DKDV = "TOff TList t_blocks".split()


def _with(names, extra):
    """``names`` with ``extra`` inserted before the first constexpr."""
    cut = next(n for n, name in enumerate(names) if name.startswith("*"))
    return list(names[:cut]) + list(extra) + list(names[cut:])


def _params(names) -> str:
    """A jit signature's parameter list."""
    return ", ".join(n[1:] + ": tl.constexpr" if n.startswith("*") else n for n in names)


def _args(names, rename=None) -> str:
    """The arguments passing ``names`` (renamed by ``rename``) on, by position."""
    return ", ".join((rename or {}).get(n, n).lstrip("*") for n in names)


def _dkdv_tiles(plan: KernelPlan, spec: Specialization):
    """(kv rows per program, query rows per step, warps, stages) of the dK/dV kernel."""
    block_n = getattr(spec, "dkdv_block_n", 0) or spec.block_n
    block_m = getattr(spec, "dkdv_block_m", 0) or (spec.block_m if plan.block % spec.block_m == 0 else spec.block_n)
    warps = getattr(spec, "dkdv_num_warps", 0) or spec.num_warps
    stages = getattr(spec, "dkdv_num_stages", 0) or spec.num_stages
    return block_n, block_m, warps, stages


def _dq_call(masked: str, window: str, full: str) -> str:
    return f"""
    dq = _dq_visit(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, j, rows, row_block, kv_len,
                   {window}, {full}, qk_scale, {masked}, CAUSAL, BLOCK, BLOCK_N, HEAD_DIM, D_PAD)"""


def _dq_outside_loops(plan: KernelPlan, lo: str, hi: str, masked: str) -> str:
    """Loops over the sinks and residue blocks in [lo, hi): every row of the tile keeps them."""
    visit = _dq_call(masked, "0", "True")
    code = []
    if plan.has_sink:
        code.append(f"""
for j in range({lo}, tl.minimum({hi}, sink)):{visit}""")
    if plan.max_residues:
        start = f"tl.maximum({lo}, sink)" if plan.has_sink else lo
        if plan.max_residues == 1:
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


def _head_params(plan: KernelPlan) -> str:
    lines = [
        f"window = {_param(plan, 'window', 0)}",
        f"sink = {_param(plan, 'sink', 1)}",
        f"period = {_param(plan, 'period', 2)}",
    ]
    if plan.max_residues == 1:
        lines.append(f"residue = {_param(plan, 'residue', 4)}")
    elif plan.max_residues > 1:
        lines.append("num_residues = tl.load(HeadTable + h * TABLE_WIDTH + 3)")
    return "\n".join(lines)


def _query_range(plan: KernelPlan) -> str:
    """The contiguous range [i_lo, i_hi] of query blocks that keep kv block j (this head)."""
    has_full = plan.has_sink or plan.max_residues > 0
    code = []
    if has_full:
        code.append(_full_predicate(plan))
    window_hi = "tl.minimum(j + window - 1, last_qblock)"
    if plan.causal:
        code.append("i_lo = tl.maximum(j, first_qblock)")
    elif has_full:
        code.append("i_lo = tl.where(full, first_qblock, tl.maximum(j, first_qblock))")
    else:
        code.append("i_lo = tl.maximum(j, first_qblock)")
    if has_full:
        code.append(f"i_hi = tl.where(full, last_qblock, {window_hi})")
    else:
        code.append(f"i_hi = {window_hi}")
    return "\n".join(code)


def _dq_topk_loop(plan: KernelPlan) -> str:
    """dQ from this query block's selected blocks (dynamic top-k), as the forward visits them."""
    return _selected_blocks(plan, _dq_call("False", "0", "True"), _dq_call("True", "0", "True"),
                            "the blocks selected for this tile's query block (held fixed from the forward)")


# dK/dV of the selection: the query blocks that selected kv block j, listed per (batch, q head,
# kv block) in TList[TOff[key] : TOff[key + 1]] (the transposed selection, built by a stable sort
# on the device: ascending query blocks, so the sum's order and the result are reproducible)
_DKDV_TOPK_LOOP = """
# -- dynamic top-k: the query blocks whose selection holds kv block j --
t_key = (b * (GROUP * KV_HEADS) + h) * t_blocks + j
for tk in range(tl.load(TOff + t_key), tl.load(TOff + t_key + 1)):
    i = tl.load(TList + tk)
    dk, dv = _dkdv_visit(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, i * BLOCK,
                         cols, past, kv_len, qk_scale, True, BLOCK // BLOCK_M, CAUSAL, BLOCK_M, HEAD_DIM, D_PAD)"""


_DQ_BLOCK_MASK = """\
            keep = ((row_block - j >= 0) & (row_block - j < window)) | full
            keep = keep[:, None] & (cols[None, :] < kv_len)
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])"""
_DKDV_MASK = """\
            keep = valid[None, :]
            if CAUSAL:
                keep = keep & (cols[:, None] <= rows[None, :])"""
# extended plans: the head's exact verdict per token pair (snippets.pair_keep)
_DQ_PAIR_MASK = """\
            keep = pair_keep(HeadTable, h, rows[:, None], cols[None, :]) & (cols[None, :] < kv_len)"""
_DKDV_PAIR_MASK = """\
            keep = valid[None, :] & pair_keep(HeadTable, h, rows[None, :], cols[:, None])"""
# dkdv_query_major: the same, [query rows, kv rows]
_DKDV_MASK_QM = """\
            keep = valid[:, None]
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])"""
_DKDV_PAIR_MASK_QM = """\
            keep = valid[:, None] & pair_keep(HeadTable, h, rows[:, None], cols[None, :])"""


_DKDV_KV_MAJOR = """\
        qkt = tl.dot(k, qt)  # [BLOCK_N, BLOCK_M]
        pt = tl.math.exp2(qkt * qk_scale - lse2[None, :])
        if MASKED:
{mask}
            pt = tl.where(keep, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk)"""
# dkdv_query_major: P and dS [BLOCK_M, BLOCK_N] (lse2 and delta per row), transposed for the
# dV and dK products
_DKDV_QUERY_MAJOR = """\
        qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
{mask}
            p = tl.where(keep, p, 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk)"""


# ---- the tiles' loads: pointers (the default) or tensor descriptors (dq_load / dkdv_load "tma")
_DQ_POINTER_LOADS = """\
        # K and V read transposed, [D_PAD, BLOCK_N]: column n is key row cols[n]
        kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]
        vt_ptrs = v_base + cols[None, :] * stride_vn + offs_d[:, None]
        if MASKED:
            kv_mask = (cols[None, :] < kv_len) & (offs_d[:, None] < HEAD_DIM)
            kt = tl.load(kt_ptrs, mask=kv_mask, other=0.0)
            vt = tl.load(vt_ptrs, mask=kv_mask, other=0.0)
        elif HEAD_DIM != D_PAD:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            vt = tl.load(vt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)"""
# k_base / v_base are descriptors over this sequence's kv rows: rows past kv_len read as zeros
_DQ_TMA_LOADS = """\
        # K and V rows cols[0] .. cols[0] + BLOCK_N - 1, read [BLOCK_N, D_PAD] and used transposed
        kt = k_base.load([j * BLOCK + s * BLOCK_N, 0]).T
        vt = v_base.load([j * BLOCK + s * BLOCK_N, 0]).T"""
# the dK/dV loads; {q} names Q's tile: "qt" [D_PAD, BLOCK_M] (kv-major), "q" [BLOCK_M, D_PAD]
_DKDV_POINTER_LOADS = """\
{note}        {q}_ptrs = q_base + {q_offsets} * stride_qm + {d_offsets}
        do_ptrs = do_base + t[:, None] * stride_dom + offs_d[None, :]
        if MASKED:
            valid = (rows >= past) & (rows < kv_len)
            {q} = tl.load({q}_ptrs, mask={q_valid} & ({d_offsets} < HEAD_DIM), other=0.0)
            do = tl.load(do_ptrs, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            lse = tl.load(lse_base + t, mask=valid, other=float("inf"))
            delta = tl.load(delta_base + t, mask=valid, other=0.0)
            # an empty row (lse -inf) keeps nothing: +inf makes its p exactly 0
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        else:
            if HEAD_DIM != D_PAD:
                {q} = tl.load({q}_ptrs, mask={d_offsets} < HEAD_DIM, other=0.0)
                do = tl.load(do_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            else:
                {q} = tl.load({q}_ptrs)
                do = tl.load(do_ptrs)
            lse2 = tl.load(lse_base + t) * 1.4426950408889634
            delta = tl.load(delta_base + t)"""
_KV_MAJOR_Q = dict(q="qt", q_offsets="t[None, :]", d_offsets="offs_d[:, None]", q_valid="valid[None, :]",
                   note="        # Q read transposed, [D_PAD, BLOCK_M]: column m is query row t[m]\n")
_QUERY_MAJOR_Q = dict(q="q", q_offsets="t[:, None]", d_offsets="offs_d[None, :]", q_valid="valid[:, None]", note="")
# q_base / do_base are descriptors over this sequence's query rows: rows outside it (before
# ``past`` or from kv_len on) read as zeros, and the mask zeroes their p anyway
_DKDV_TMA_LOADS = """\
        {q} = q_base.load([row0 + s * BLOCK_M - past, 0]){transpose}
        do = do_base.load([row0 + s * BLOCK_M - past, 0])
        if MASKED:
            valid = (rows >= past) & (rows < kv_len)
            lse = tl.load(lse_base + t, mask=valid, other=float("inf"))
            delta = tl.load(delta_base + t, mask=valid, other=0.0)
            # an empty row (lse -inf) keeps nothing: +inf makes its p exactly 0
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        else:
            lse2 = tl.load(lse_base + t) * 1.4426950408889634
            delta = tl.load(delta_base + t)"""
_DQ_DESCRIPTORS = """
k_base = tl.make_tensor_descriptor(k_base, shape=[kv_len, HEAD_DIM], strides=[stride_kn, 1],
                                   block_shape=[BLOCK_N, D_PAD])
v_base = tl.make_tensor_descriptor(v_base, shape=[kv_len, HEAD_DIM], strides=[stride_vn, 1],
                                   block_shape=[BLOCK_N, D_PAD])"""
_DKDV_DESCRIPTORS = """
q_base = tl.make_tensor_descriptor(q_base, shape=[q_len, HEAD_DIM], strides=[stride_qm, 1],
                                   block_shape=[BLOCK_M, D_PAD])
do_base = tl.make_tensor_descriptor(do_base, shape=[q_len, HEAD_DIM], strides=[stride_dom, 1],
                                    block_shape=[BLOCK_M, D_PAD])"""
_SCRATCH = """

def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")
"""


def generate_backward(plan: KernelPlan, spec: Specialization, *, name: str = "pattern", fingerprint: str = "") -> str:
    """Source of a Python module with the backward kernels and ``launch`` for ``plan``."""
    dkdv_n, dkdv_m, dkdv_warps, dkdv_stages = _dkdv_tiles(plan, spec)
    for label, value in (("block_n", spec.block_n), ("dkdv_block_n", dkdv_n), ("dkdv_block_m", dkdv_m)):
        if value < 16 or value & (value - 1) or plan.block % value:
            raise ValueError(f"{label}={value} must be a power of two >= 16 dividing the pattern block {plan.block}")
    if spec.block_m < 16 or spec.block_m & (spec.block_m - 1):
        raise ValueError(f"block_m={spec.block_m} must be a power of two >= 16")
    for label in _LOAD_FIELDS:
        if getattr(spec, label, "pointer") not in ("pointer", "tma"):
            raise ValueError(f"{label} must be 'pointer' or 'tma', got {getattr(spec, label)!r}")
    dq_tma = getattr(spec, "dq_load", "pointer") == "tma"
    dkdv_tma = getattr(spec, "dkdv_load", "pointer") == "tma"
    dq_loads = _DQ_TMA_LOADS if dq_tma else _DQ_POINTER_LOADS
    query_major = getattr(spec, "dkdv_query_major", False)
    if dkdv_tma:
        dkdv_loads = _DKDV_TMA_LOADS.format(q="q" if query_major else "qt",
                                            transpose="" if query_major else ".T  # [D_PAD, BLOCK_M]")
    else:
        dkdv_loads = _DKDV_POINTER_LOADS.format(**(_QUERY_MAJOR_Q if query_major else _KV_MAJOR_Q))
    dq_descriptors = _DQ_DESCRIPTORS if dq_tma else ""
    dkdv_descriptors = _DKDV_DESCRIPTORS if dkdv_tma else ""
    scratch = _SCRATCH if dq_tma or dkdv_tma else ""
    launch_alloc = """
    triton.set_allocator(_scratch)  # device-side descriptors take a little global scratch per program""" \
        if dq_tma or dkdv_tma else ""
    table_width = plan.table_width
    unroll = getattr(spec, "dkdv_unroll_group", False) and plan.group_size > 1
    group_loop = "tl.static_range(GROUP)" if unroll else "range(0, GROUP)"
    varlen = spec.layout == "varlen"
    full = _full_predicate(plan)
    if spec.order == "tile_major":  # kept to measure the scheduling
        dq_order = """
        # tile-major: the last query tiles of every head first
        tile = n_tiles - 1 - pid // HEADS
        h = pid % HEADS"""
        dkdv_order = """
        # tile-major: the first kv tiles of every kv head first
        tile = pid // KV_HEADS
        kv_h = pid % KV_HEADS"""
    else:
        dq_order = """
        # Head-major, longest first: each head's last query tiles (most kv blocks under a causal
        # mask) first; programs running together share one head's K/V in L2.
        h = pid // n_tiles
        tile = n_tiles - 1 - pid % n_tiles"""
        dkdv_order = """
        # Head-major, longest first: each kv head's first kv tiles (their sinks and residue blocks
        # are kept by the most queries) first; programs running together share its Q and dO in L2.
        kv_h = pid // n_kv_tiles
        tile = pid % n_kv_tiles"""

    # ---------------------------------------------------------------- dynamic top-k
    dq_params, dkdv_params, both_params = DQ_PARAMS, DKDV_PARAMS, BOTH_PARAMS
    dq_topk = dkdv_topk = topk_launch = topk_dq_args = topk_dkdv_args = topk_both_args = ""
    if plan.has_topk:
        if spec.block_m > plan.block or plan.block % spec.block_m:
            raise ValueError(f"block_m={spec.block_m} must divide the pattern block {plan.block} for topk heads: "
                             "a dQ tile takes the selection of its one query block")
        dq_params, dkdv_params = _with(DQ_PARAMS, TOPK_DQ), _with(DKDV_PARAMS, TOPK_DKDV)
        both_params = _with(BOTH_PARAMS, TOPK_DQ + TOPK_DKDV)
        dq_topk = chr(10) + _at(_dq_topk_loop(plan), 2)
        dkdv_topk = chr(10) + _at(_DKDV_TOPK_LOOP, 3)
        topk_launch = ", sel=None, sel_strides=(0, 0, 0), t_off=None, t_list=None, t_blocks=0"
        topk_dq_args = " sel, *sel_strides,"
        topk_dkdv_args = " t_off, t_list, t_blocks,"
        topk_both_args = " sel, *sel_strides, t_off, t_list, t_blocks,"

    # ---------------------------------------------------------------- dQ enumeration
    diagonal = f"""
for j in range(first_block, last_block + 1):  # the diagonal blocks
{indent(full, '    ')}{_dq_call("True", "window", "full")}"""
    window_loops = f"""
for j in range(lo, edge):  # first blocks of the window range: not every row's window reaches them
{indent(full, '    ')}{_dq_call("True", "window", "full")}
for j in range(edge, first_block):  # inside every row's window: no mask{_dq_call("False", "window", "True")}""" + diagonal
    window_bounds = _window_bounds(plan)
    if "edge" not in window_bounds:  # the window range is the diagonal blocks
        window_loops = diagonal
    below = _dq_outside_loops(plan, "0", "lo", "False")
    above = "" if plan.causal else _dq_outside_loops(plan, "last_block + 1", "n_kv_blocks", "True")

    dq_enumeration = f"""\
        # the window range [lo, last_block]; blocks >= edge are in every row's window
{_at(window_bounds, 2)}
        # -- sinks and residue blocks below the window range --
{_at(below, 2)}
        # -- the window range --
{_at(window_loops, 2)}
        # -- sinks and residue blocks after the diagonal (bidirectional only) --
{_at(above, 2)}"""
    head_params = _head_params(plan)
    dq_mask_params, dq_mask, dkdv_mask_params, dkdv_mask, helpers = "window, full", _DQ_BLOCK_MASK, "", _DKDV_MASK, ""
    if plan.extended:
        if spec.block_m > plan.block or plan.block % spec.block_m:
            raise ValueError(f"block_m={spec.block_m} must divide the pattern block {plan.block} for two-sided "
                             "windows, relative strides, token edges, global rows and prefixes: a dQ tile stays "
                             "inside one query block")
        head_params = general.head_params(plan)

        def dq_visit(masked, wide=False):
            return (f"dq = _dq_visit(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, j, rows, row_block, "
                    f"kv_len,\n               HeadTable, h, qk_scale, {masked}, CAUSAL, BLOCK, BLOCK_N, HEAD_DIM, D_PAD)")
        dq_enumeration = f"""\
        # -- the kept blocks of the tile's one query block i (see codegen/general.py) --
        i = first_block
{_at(general.query_side_loops(plan, dq_visit), 2)}"""
        dq_mask_params, dq_mask = "HeadTable, h", _DQ_PAIR_MASK
        dkdv_mask_params, dkdv_mask, helpers = " HeadTable, h,", _DKDV_PAIR_MASK, pair_keep(plan) + "\n"
        if plan.has_global and spec.order != "tile_major":
            dq_order = general.tile_order(plan, "h = hh", pid="# global tiles first")

    if query_major:
        dkdv_mask = _DKDV_PAIR_MASK_QM if plan.extended else _DKDV_MASK_QM
        dkdv_math = _DKDV_QUERY_MAJOR.format(mask=dkdv_mask)
    else:
        dkdv_math = _DKDV_KV_MAJOR.format(mask=dkdv_mask)

    # ---------------------------------------------------------------- dK/dV enumeration
    dkdv_call = """
    dk, dv = _dkdv_visit(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, {row0}, cols,
                         past, kv_len,{mask_args} qk_scale, {masked}, {steps}, CAUSAL, BLOCK_M, HEAD_DIM, D_PAD)"""
    block_call = dict(row0="i * BLOCK", steps="BLOCK // BLOCK_M", mask_args=dkdv_mask_params)
    query_range = _query_range(plan)
    if plan.extended:
        def dkdv_visit(masked):
            return dkdv_call.format(masked=masked, **block_call).strip("\n")[4:]
        query_range, query_loops = "", general.kv_side_loops(plan, dkdv_visit)
        range_note = " (see codegen/general.py)"
    else:
        range_note = ": one contiguous range"
        if getattr(spec, "flat_steps", False):  # one loop step per BLOCK_M query rows
            inside = f"""
for r in range((i_lo + 1) * BLOCK, i_hi * BLOCK, BLOCK_M):{dkdv_call.format(masked="False", row0="r", steps="1",
                                                                            mask_args="")}"""
        else:  # one loop step per query block, its BLOCK_M-row steps unrolled
            inside = f"""
for i in range(i_lo + 1, i_hi):{dkdv_call.format(masked="False", **block_call)}"""
        query_loops = f"""
# the first block of the range: the causal diagonal, or the partial first query block
for i in range(i_lo, tl.minimum(i_lo + 1, i_hi + 1)):{dkdv_call.format(masked="True", **block_call)}
# strictly inside: every row is a query, every row is after every key of the tile{inside}
# the last block of the range: maybe the partial last query block
for i in range(tl.maximum(i_hi, i_lo + 1), i_hi + 1):{dkdv_call.format(masked="True", **block_call)}"""

    if varlen:
        locate_q = """
q_start = tl.load(CuSeqQ + b)
q_len = tl.load(CuSeqQ + b + 1) - q_start
k_start = tl.load(CuSeqK + b)
kv_len = tl.load(CuSeqK + b + 1) - k_start"""
        q_bases = """
q_base = Q + q_start * stride_qm + h * stride_qh
do_base = DO + q_start * stride_dom + h * stride_doh
lse_base = Lse + h * stride_lh + q_start
delta_base = Delta + h * stride_lh + q_start"""
        dq_base = "dq_base = DQ + q_start * stride_dqm + h * stride_dqh"
        kv_bases = """
k_base = K + k_start * stride_kn + kv_h * stride_kh
v_base = V + k_start * stride_vn + kv_h * stride_vh"""
        dkv_bases = """
dk_base = DK + k_start * stride_dkn + kv_h * stride_dkh
dv_base = DV + k_start * stride_dvn + kv_h * stride_dvh"""
        pre_locate = """
q_start = tl.load(CuSeqQ + b)
q_len = tl.load(CuSeqQ + b + 1) - q_start
o_base = Out + q_start * stride_om + h * stride_oh
do_base = DO + q_start * stride_dom + h * stride_doh
delta_base = Delta + h * stride_lh + q_start"""
    else:
        locate_q = """
q_len = q_len_all
kv_len = kv_len_all"""
        q_bases = """
q_base = Q + b * stride_qb + h * stride_qh
do_base = DO + b * stride_dob + h * stride_doh
lse_base = Lse + b * stride_lb + h * stride_lh
delta_base = Delta + b * stride_lb + h * stride_lh"""
        dq_base = "dq_base = DQ + b * stride_dqb + h * stride_dqh"
        kv_bases = """
k_base = K + b * stride_kb + kv_h * stride_kh
v_base = V + b * stride_vb + kv_h * stride_vh"""
        dkv_bases = """
dk_base = DK + b * stride_dkb + kv_h * stride_dkh
dv_base = DV + b * stride_dvb + kv_h * stride_dvh"""
        pre_locate = """
q_len = q_len_all
o_base = Out + b * stride_ob + h * stride_oh
do_base = DO + b * stride_dob + h * stride_doh
delta_base = Delta + b * stride_lb + h * stride_lh"""

    tables = per_device(("head_table", "The per-head table on ``device``.",
                         "torch.tensor(HEAD_TABLE, dtype=torch.int32, device=device)"))
    source = f'''\
# Generated by s2dsl codegen {BACKWARD_CODEGEN_VERSION}: backward kernels (delta, dQ, dK/dV). Do not edit.
# pattern: {name}  fingerprint: {fingerprint}
# block {plan.block}, heads {plan.heads}, kv_heads {plan.kv_heads}, {"causal" if plan.causal else "bidirectional"}
# specialisation: {_describe(spec)}
import contextlib

import torch
import triton
import triton.language as tl

HEADS = {plan.heads}
KV_HEADS = {plan.kv_heads}
GROUP = {plan.group_size}
BLOCK = {plan.block}
CAUSAL = {plan.causal}
TABLE_WIDTH = {table_width}
# per head: window, sink, period, number of residues, residues...
HEAD_TABLE = {list(map(list, plan.table()))}
HEAD_DIM = {spec.head_dim}
D_PAD = {spec.d_pad}
VARLEN = {varlen}
# dQ kernel: query rows per program, kv rows per inner step
DQ_BLOCK_M = {spec.block_m}
DQ_BLOCK_N = {spec.block_n}
DQ_NUM_WARPS = {spec.num_warps}
DQ_NUM_STAGES = {spec.num_stages}
# dK/dV kernel: kv rows per program (inside one pattern block), query rows per inner step
DKDV_BLOCK_N = {dkdv_n}
DKDV_BLOCK_M = {dkdv_m}
DKDV_NUM_WARPS = {dkdv_warps}
DKDV_NUM_STAGES = {dkdv_stages}
# one grid for dK/dV and dQ (then with the dQ kernel's warps and stages), or two launches
ONE_GRID = {bool(getattr(spec, "one_grid", False))}
TWO_STREAMS = {bool(getattr(spec, "two_streams", False))}
PRE_BLOCK = {min(spec.block_m, 64)}
LOG2E = 1.4426950408889634


@triton.jit
def preprocess_kernel(Out, DO, Delta, CuSeqQ, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                      stride_lb, stride_lh, q_len_all,
                      PRE_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """delta = rowsum(dO * O), float32, one row per query."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
{_at(pre_locate, 1)}
    t = pid * PRE_BLOCK + tl.arange(0, PRE_BLOCK)
    if pid * PRE_BLOCK < q_len:
        offs_d = tl.arange(0, D_PAD)
        mask = (t[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
        o = tl.load(o_base + t[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(do_base + t[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(delta_base + t, delta, mask=t < q_len)


{helpers}@triton.jit
def _dq_visit(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, j, rows, row_block, kv_len,
              {dq_mask_params}, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """dQ of one tile of queries from kv block j: dq += (P * (dO V^T - delta)) K (scaled later)."""
    offs_d = tl.arange(0, D_PAD)
    for s in tl.static_range(BLOCK // BLOCK_N):
        cols = j * BLOCK + s * BLOCK_N + tl.arange(0, BLOCK_N)
{dq_loads}
        qk = tl.dot(q, kt)
        # lse2 is +inf on rows that are not queries or kept nothing: p = 0 there, never NaN
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
{dq_mask}
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, vt)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq)
    return dq


@triton.jit
def _dq_program(pid, b, {_params(dq_params)}):
    """dQ of query tile ``pid`` (ordered as below) of batch entry / sequence ``b``."""
{_at(dq_order, 1)}
    kv_h = h // GROUP
{_at(locate_q, 1)}
{_at(q_bases, 1)}
{_at(dq_base, 1)}
{_at(kv_bases + dq_descriptors, 1)}
    past = kv_len - q_len  # the queries are the last q_len of kv_len positions
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    first_row = tl.maximum(tile * BLOCK_M, past)
    last_row = tl.minimum(tile * BLOCK_M + BLOCK_M, kv_len) - 1
    if first_row <= last_row:
        row_block = rows // BLOCK
        first_block = first_row // BLOCK
        last_block = last_row // BLOCK
        n_kv_blocks = (kv_len + BLOCK - 1) // BLOCK
        # ---- this head's pattern (generated) ----
{_at(head_params, 2)}
        valid = (rows >= past) & (rows < kv_len)
        offs_d = tl.arange(0, D_PAD)
        io_mask = valid[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_base + (rows - past)[:, None] * stride_qm + offs_d[None, :], mask=io_mask, other=0.0)
        do = tl.load(do_base + (rows - past)[:, None] * stride_dom + offs_d[None, :], mask=io_mask, other=0.0)
        lse = tl.load(lse_base + (rows - past), mask=valid, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(delta_base + (rows - past), mask=valid, other=0.0)
        dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
{dq_enumeration}{dq_topk}
        dq_ptrs = dq_base + (rows - past)[:, None] * stride_dqm + offs_d[None, :]
        tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=io_mask)


@triton.jit
def _dkdv_visit(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, row0, cols, past,
                kv_len,{dkdv_mask_params} qk_scale, MASKED: tl.constexpr, STEPS: tl.constexpr, CAUSAL: tl.constexpr,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """dK, dV of one kv tile from the STEPS * BLOCK_M queries from absolute position row0 on
    (all in query blocks that keep the tile's block)."""
    offs_d = tl.arange(0, D_PAD)
    for s in tl.static_range(STEPS):
        rows = row0 + s * BLOCK_M + tl.arange(0, BLOCK_M)  # absolute positions
        t = rows - past                                        # query index
{dkdv_loads}
{dkdv_math}
    return dk, dv


@triton.jit
def _dkdv_program(pid, b, {_params(dkdv_params)}):
    """dK and dV of kv tile ``pid`` (ordered as below) of batch entry / sequence ``b``."""
{_at(dkdv_order, 1)}
{_at(locate_q, 1)}
{_at(kv_bases, 1)}
{_at(dkv_bases, 1)}
    past = kv_len - q_len  # the queries are the last q_len of kv_len positions
    if tile * BLOCK_N < kv_len:
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # kv rows of this tile, all in pattern block j
        j = (tile * BLOCK_N) // BLOCK
        offs_d = tl.arange(0, D_PAD)
        kv_mask = (cols[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        first_qblock = past // BLOCK          # query blocks holding positions past .. kv_len - 1
        last_qblock = (kv_len - 1) // BLOCK
        for g in {group_loop}:  # the q heads sharing this kv head; each has its own pattern
            h = kv_h * GROUP + g
            # ---- this head's pattern (generated) ----
{_at(head_params, 3)}
{_at(q_bases + dkdv_descriptors, 3)}
            # ---- the query blocks keeping kv block j{range_note} (generated) ----
{_at(query_range, 3) + chr(10) if query_range else ""}{_at(query_loops, 3)}{dkdv_topk}
        dk_ptrs = dk_base + cols[:, None] * stride_dkn + offs_d[None, :]
        dv_ptrs = dv_base + cols[:, None] * stride_dvn + offs_d[None, :]
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def dq_kernel({_params(dq_params)}):
    _dq_program(tl.program_id(0), tl.program_id(1), {_args(dq_params)})


@triton.jit
def dkdv_kernel({_params(dkdv_params)}):
    _dkdv_program(tl.program_id(0), tl.program_id(1), {_args(dkdv_params)})


@triton.jit
def backward_kernel({_params(both_params)}):
    """dK/dV and dQ in one grid: the dK/dV programs first (a residue column's program runs
    the longest), then the dQ programs, which fill the SMs the dK/dV tail leaves idle."""
    pid = tl.program_id(0)
    n_kv_programs = n_kv_tiles * KV_HEADS
    if pid < n_kv_programs:
        _dkdv_program(pid, tl.program_id(1), {_args(dkdv_params, _RENAME_DKDV)})
    else:
        _dq_program(pid - n_kv_programs, tl.program_id(1), {_args(dq_params, _RENAME_DQ)})


{tables}{scratch}

def _side_stream(device):
    """The second stream the dQ kernel runs on."""
    return _once_per_device("stream", device, lambda: torch.cuda.Stream(device))


def launch(q, k, v, out, dout, lse, dq, dk, dv, q_strides, k_strides, v_strides, o_strides, do_strides,
           dq_strides, dk_strides, dv_strides, lse_strides, batch, q_len, kv_len, cu_seqlens_q, cu_seqlens_k,
           sm_scale{topk_launch}):
    """Run delta, dQ and dK/dV. Strides are (batch, head, token) in elements, the last dim contiguous;
    ``lse`` (and the delta made like it) has token stride 1 and (batch, head) strides ``lse_strides``."""
    if cu_seqlens_k is not None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        max_kv_len = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    else:
        max_q_len, max_kv_len = q_len, kv_len
    table = head_table(q.device)
    dummy = table  # stands in for the cu_seqlens pointers when they are unused
    cu_q = cu_seqlens_q if cu_seqlens_q is not None else dummy
    cu_k = cu_seqlens_k if cu_seqlens_k is not None else dummy
    qk_scale = sm_scale * LOG2E{launch_alloc}
    delta = torch.empty_like(lse)
    if max_q_len > 0:
        preprocess_kernel[(triton.cdiv(max_q_len, PRE_BLOCK), HEADS, batch)](
            out, dout, delta, cu_q, *o_strides, *do_strides, *lse_strides, q_len,
            PRE_BLOCK=PRE_BLOCK, HEAD_DIM=HEAD_DIM, D_PAD=D_PAD)
    n_tiles = triton.cdiv(max_kv_len, DQ_BLOCK_M)  # dQ tiles are aligned to absolute positions
    n_kv_tiles = triton.cdiv(max_kv_len, DKDV_BLOCK_N)
    if ONE_GRID:
        if max_kv_len > 0:
            backward_kernel[(n_kv_tiles * KV_HEADS + n_tiles * HEADS, batch)](
                q, k, v, dout, dq, dk, dv, lse, delta, table, cu_q, cu_k,
                *q_strides, *k_strides, *v_strides, *do_strides, *dq_strides, *dk_strides, *dv_strides,
                *lse_strides, q_len, kv_len, n_tiles, n_kv_tiles, qk_scale, sm_scale,{topk_both_args}
                HEADS=HEADS, KV_HEADS=KV_HEADS, GROUP=GROUP, BLOCK=BLOCK, CAUSAL=CAUSAL, TABLE_WIDTH=TABLE_WIDTH,
                DQ_BLOCK_M=DQ_BLOCK_M, DQ_BLOCK_N=DQ_BLOCK_N, DKDV_BLOCK_M=DKDV_BLOCK_M,
                DKDV_BLOCK_N=DKDV_BLOCK_N, HEAD_DIM=HEAD_DIM, D_PAD=D_PAD,
                num_warps=DQ_NUM_WARPS, num_stages=DQ_NUM_STAGES)
        return delta
    # TWO_STREAMS: the dK/dV kernel first on the caller's stream, dQ beside it on a second
    # stream (each with its own tiles), joined before returning: the dQ programs fill the SMs
    # the dK/dV kernel's long residue columns leave idle at its end
    two = TWO_STREAMS and q.is_cuda and max_q_len > 0 and max_kv_len > 0
    if two:
        main = torch.cuda.current_stream(q.device)
        side = _side_stream(q.device)
        side.wait_stream(main)
    if max_kv_len > 0:
        dkdv_kernel[(n_kv_tiles * KV_HEADS, batch)](
            q, k, v, dout, dk, dv, lse, delta, table, cu_q, cu_k,
            *q_strides, *k_strides, *v_strides, *do_strides, *dk_strides, *dv_strides, *lse_strides,
            q_len, kv_len, n_kv_tiles, qk_scale, sm_scale,{topk_dkdv_args}
            KV_HEADS=KV_HEADS, GROUP=GROUP, BLOCK=BLOCK, CAUSAL=CAUSAL, TABLE_WIDTH=TABLE_WIDTH,
            BLOCK_M=DKDV_BLOCK_M, BLOCK_N=DKDV_BLOCK_N, HEAD_DIM=HEAD_DIM, D_PAD=D_PAD,
            num_warps=DKDV_NUM_WARPS, num_stages=DKDV_NUM_STAGES)
    with torch.cuda.stream(side) if two else contextlib.nullcontext():
        if max_q_len > 0:
            dq_kernel[(n_tiles * HEADS, batch)](
                q, k, v, dout, dq, lse, delta, table, cu_q, cu_k,
                *q_strides, *k_strides, *v_strides, *do_strides, *dq_strides, *lse_strides,
                q_len, kv_len, n_tiles, qk_scale, sm_scale,{topk_dq_args}
                HEADS=HEADS, GROUP=GROUP, BLOCK=BLOCK, CAUSAL=CAUSAL, TABLE_WIDTH=TABLE_WIDTH,
                BLOCK_M=DQ_BLOCK_M, BLOCK_N=DQ_BLOCK_N, HEAD_DIM=HEAD_DIM, D_PAD=D_PAD,
                num_warps=DQ_NUM_WARPS, num_stages=DQ_NUM_STAGES)
    if two:
        main.wait_stream(side)
    return delta
'''
    return source
