"""Emit the Triton decode kernel (paged KV cache, split-KV) specialised to one pattern.

The generated module holds two ``@triton.jit`` kernels and a ``launch`` function:

* ``kernel``: one program per (sequence, kv head, query tile, split). Its rows are every q
  head of the kv head times the tile's queries (one query per sequence for plain decoding,
  a few for speculative decoding, a tile of a chunk for chunked prefill), so each kv page
  is loaded once per GQA group and each q head applies its own mask to it.
* ``combine_kernel``: merges the splits' partial (output, log-sum-exp) pairs.

Which kv blocks a program visits is arithmetic, as in the forward kernel, but for the
*union* of the group's q heads (largest window ``W``, largest sink ``S``, union of the
residue classes modulo the lcm ``P`` of the periods). For a tile whose queries lie in query
blocks ``i0..i1`` the kept blocks, in the order the kernel numbers them, are

* the sinks ``[0, min(S, lo))``, ``lo = max(i0 - max(W, 1) + 1, 0)``;
* the residue blocks ``j`` in ``[S, lo)`` with ``j mod P`` in the union's residues;
* the window range ``[lo, i1]`` (masked per row: window edges, the diagonal, the causal cut).

Their number ``T`` and the ``k``-th of them are closed forms, so a split takes the kept
blocks ``[s*T/n, (s+1)*T/n)`` and long contexts spread evenly over the GPU; nothing
grows with the sequence length but the page table. Each kept block is mapped through the
(sequence, kv head) page table to its page; pages the pattern no longer needs were freed
by the cache (``s2dsl.runtime.kv_cache``), and the kernel never asks for them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from textwrap import dedent, indent
from typing import Tuple

from .lower import NO_PERIOD, KernelPlan, MAX_PERIOD, UNBOUNDED, UnsupportedPattern
from .snippets import pair_keep, per_device, static_keeps

DECODE_CODEGEN_VERSION = "dec-2"


@dataclass(frozen=True)
class DecodeSpecialization:
    """What, besides the pattern, a generated decode kernel is specialised to."""

    dtype: str = "float16"      # torch dtype name of q and the kv pages
    head_dim: int = 64
    capability: tuple = (0, 0)  # device compute capability
    block_q: int = 1            # queries per program (times the group's q heads = rows)
    block_n: int = 64           # kv rows per inner step (divides the pattern block = page)
    num_warps: int = 4
    num_stages: int = 2
    kv_int8: bool = False       # pages hold INT8 codes with a float32 scale and bias per page and channel
    # issue 14: one loop over the split's kept blocks (sink, residue or window block by its
    # number), every visit masked, instead of four short loops; with ``pages_per_step`` > 1 that
    # many pages are gathered into one tile per step (more bytes in flight per program)
    flat: bool = False
    pages_per_step: int = 1
    # one row (MHA, one query) through tl.dot too, padded to 16 rows: Triton 3.6 pipelines
    # (cp.async) only loads that feed a dot, so the one-row path loads each page synchronously
    force_dot: bool = False
    # flat loop, one page (or pages_per_step pages) per step: the next step's K/V are loaded into
    # registers before this step's math, so two steps' pages are in flight (needs block_n == block)
    prefetch: bool = False
    # one page per step (the default and flat loops): V's load issued with K's, before the
    # scores are computed, so both are in flight at once (V held in registers meanwhile)
    early_v: bool = False
    # with splits: the last program of a (sequence, kv head, tile) to finish merges the splits'
    # partials (an arrival count per group, reset by that program), instead of a combine launch
    fused_combine: bool = False

    @property
    def d_pad(self) -> int:
        return max(16, 1 << (self.head_dim - 1).bit_length())


@dataclass(frozen=True)
class GroupParams:
    """The union of one kv head's q heads: what its cache must hold and its programs visit."""

    window: int
    sink: int
    period: int
    residues: Tuple[int, ...]
    min_window: int = 0  # the smallest window of its q heads: blocks this close are kept by every row
    # extended plans: the relative stride its q heads share (NO_PERIOD: none) and the block window it
    # starts after, and the most global rows of its q heads
    relative: int = NO_PERIOD
    rel_window: int = 0
    global_rows: int = 0

    def keeps(self, i: int, j: int) -> bool:
        """Causal block verdict of the union (``j <= i`` assumed by the caller's range)."""
        return 0 <= i - j < self.window or j < self.sink or (j % self.period) in self.residues


def group_params(plan: KernelPlan) -> Tuple[GroupParams, ...]:
    """Per kv head, the union of its q heads' (window, sink, residues) in kernel form."""
    groups = _group_params(plan)
    if not plan.extended:
        return groups
    g = plan.group_size
    out = []
    for kv, gp in enumerate(groups):
        members = plan.params[kv * g:(kv + 1) * g]
        strides = {(p.relative, p.block_window) for p in members if p.relative != NO_PERIOD}
        if len(strides) > 1:
            raise UnsupportedPattern(f"kv head {kv}: its q heads have different relative strides or windows "
                                     f"{sorted(strides)}; decoding needs one per kv head (give the heads of a kv "
                                     "head the same 'window W' and 'stride S relative')")
        rel, rel_window = strides.pop() if strides else (NO_PERIOD, 0)
        # blocks in [i - inner + 1, i) hold only pairs every row keeps (token windows end further out)
        out.append(replace(gp, min_window=min(p.inner for p in members), relative=rel, rel_window=rel_window,
                           global_rows=max(p.global_rows for p in members)))
    return tuple(out)


def _group_params(plan: KernelPlan) -> Tuple[GroupParams, ...]:
    out = []
    g = plan.group_size
    for kv in range(plan.kv_heads):
        members = plan.params[kv * g:(kv + 1) * g]
        min_window = min(p.window for p in members)
        if any(p.window >= UNBOUNDED for p in members):  # a dense (causal) head: keep everything
            out.append(GroupParams(UNBOUNDED, 0, NO_PERIOD, (), min_window))
            continue
        window = max(p.window for p in members)
        sink = max(p.sink for p in members)
        with_res = [p for p in members if p.residues]
        if not with_res:
            out.append(GroupParams(window, sink, NO_PERIOD, (), min_window))
            continue
        period = math.lcm(*(p.period for p in with_res))
        if period > MAX_PERIOD:
            raise UnsupportedPattern(f"kv head {kv}: the lcm {period} of its q heads' periods is above the "
                                     f"decode kernel's limit {MAX_PERIOD}")
        residues = sorted({r + k * p.period for p in with_res for r in p.residues
                           for k in range(period // p.period)})
        if len(residues) == period:  # the residues reach every block: dense
            out.append(GroupParams(UNBOUNDED, 0, NO_PERIOD, (), min_window))
            continue
        out.append(GroupParams(window, sink, period, tuple(residues), min_window))
    return tuple(out)


def _group_table(groups: Tuple[GroupParams, ...], extended: bool = False) -> Tuple[Tuple[int, ...], ...]:
    """Per kv head: window, sink, period, count, smallest window, residues (padded), then for
    extended plans the relative stride, its window and the global rows."""
    width = max(max((len(gp.residues) for gp in groups), default=0), 1)
    more = (lambda gp: (gp.relative, gp.rel_window, gp.global_rows)) if extended else (lambda gp: ())
    return tuple((gp.window, gp.sink, gp.period, len(gp.residues), gp.min_window, *gp.residues,
                  *([gp.period - 1] * (width - len(gp.residues))), *more(gp)) for gp in groups)


def _uniform(groups, name):
    if name == "residue":
        values = {gp.residues[0] if len(gp.residues) == 1 else None for gp in groups}
        if None in values:
            return None
    else:
        values = {getattr(gp, name) for gp in groups}
    return values.pop() if len(values) == 1 else None


def _at(code: str, level: int) -> str:
    code = dedent(code).strip("\n")
    return indent(code if code.strip() else "pass", "    " * level)


_VISIT_MASS = '''

@triton.jit
def _visit_mass(mass_base, mass_rows, acc, l_i, m_i, q, KPages, VPages, page, j, keep, pos, kv_len, stride_page,
                stride_tok, qk_scale, MASKED: tl.constexpr, USE_DOT: tl.constexpr, BLOCK: tl.constexpr,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, KV_INT8: tl.constexpr = False):
    """``_visit``, and for ``mass_rows`` the log-sum-exp of block j's scores, stored at mass_base + j:
    the block's attention mass is exp(that - the row's final lse). It is what the running sum l
    grew by, measured against the new running max (the rescaling is exact, so only a block far
    below the rows' total rounds away, to a mass near 0)."""
    l_old = l_i
    m_old = m_i
    acc, l_i, m_i = _visit(acc, l_i, m_i, q, KPages, VPages, page, j, keep, pos, kv_len, stride_page, stride_tok,
                           qk_scale, MASKED, USE_DOT, BLOCK, BLOCK_N, HEAD_DIM, D_PAD, KV_INT8)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    grown = l_i - l_old * tl.math.exp2(m_old - m_safe)
    blk = (m_safe + tl.math.log2(tl.maximum(grown, 1e-30))) * 0.6931471805599453
    # only rows that kept something here: a block can also be visited with every row masked (the
    # diagonal of a head without a window, then selected), maybe by another split, in any order
    tl.store(mass_base + j, blk, mask=mass_rows & (grown > 0.0))
    return acc, l_i, m_i
'''


def _decode_topk_loop(plan: KernelPlan) -> str:
    """The kv head's selected pages (dynamic top-k): row r keeps the first K of its q head, where
    its own static set and the causal cut do not already decide (so no block is counted twice)."""
    return f"""
        # -- dynamic top-k: this kv head's selected blocks, best first; q head h takes its first K --
        rK = tl.load(HeadTable + h * H_WIDTH + {plan.topk_column}, mask=hq < GROUP, other=0)
        sel_row = Sel + slot.to(tl.int64) * stride_sel_slot + g * stride_sel_head
        for tk in range(split, {plan.max_topk}, n_splits):
            j = tl.load(sel_row + tk)
            if j >= 0:
                raw = tl.load(table_row + j)
                page = tl.maximum(raw, 0)
                keep = row_valid & (tk < rK) & (j <= row_block) & (raw >= 0)
                keep = keep & (static_keeps(HeadTable, h, row_block, j, H_WIDTH) == 0)
                acc, l_i, m_i = _visit_mass(mass_base, mass_rows, acc, l_i, m_i, q, KPages, VPages, page, j, keep,
                                            pos, kv_len, stride_page, stride_tok, qk_scale, True, USE_DOT, BLOCK,
                                            BLOCK_N, HEAD_DIM, D_PAD)"""


_PREFETCH_HELPERS = '''

@triton.jit
def _load_pages(KPages, VPages, base, j, live, kv_len, stride_tok, USE_DOT: tl.constexpr, BLOCK: tl.constexpr,
                BLOCK_N: tl.constexpr, PAGES: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """K (transposed for tl.dot) and V of the PAGES blocks j (pages at offset base), one page each."""
    offs_d = tl.arange(0, D_PAD)
    offs_c = tl.arange(0, PAGES * BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    tok = offs_c % BLOCK_N
    if USE_DOT:
        k = tl.load(KPages + base[None, :] + tok[None, :] * stride_tok + offs_d[:, None],
                    mask=live[None, :] & d_ok[:, None], other=0.0)
    else:
        k = tl.load(KPages + base[:, None] + tok[:, None] * stride_tok + offs_d[None, :],
                    mask=live[:, None] & d_ok[None, :], other=0.0)
    # rows past the length may hold anything (a reused page): p is 0 there, v must be too
    v = tl.load(VPages + base[:, None] + tok[:, None] * stride_tok + offs_d[None, :],
                mask=(live & (j * BLOCK + tok < kv_len))[:, None] & d_ok[None, :], other=0.0)
    return k, v


@triton.jit
def _update_pages(acc, l_i, m_i, q, k, v, j, keep, pos, qk_scale, USE_DOT: tl.constexpr, BLOCK: tl.constexpr,
                  BLOCK_N: tl.constexpr, PAGES: tl.constexpr):
    """Online-softmax update of the rows with loaded K/V of the blocks j; keep: (rows, columns)."""
    cols = j * BLOCK + tl.arange(0, PAGES * BLOCK_N) % BLOCK_N
    if USE_DOT:
        qk = tl.dot(q, k)
    else:
        qk = tl.sum(k.to(tl.float32) * q, 1)[None, :]
    ok = keep & (cols[None, :] <= pos[:, None])
    qk = tl.where(ok, qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if USE_DOT:
        acc = tl.dot(p.to(v.dtype), v, acc)
    else:
        acc += tl.sum(tl.sum(p, 0)[:, None] * v.to(tl.float32), 0)[None, :]
    return acc, l_i, m_new
'''


def _kth_block(res_mode: str, k: str) -> str:
    """The kept block numbered ``k`` (scalar or vector): a sink, a residue block or a window block."""
    if res_mode == "none":
        return f"j = tl.where({k} < n_s, {k}, lo + ({k} - n_s - n_r))"
    if res_mode == "one":
        return f"j = tl.where({k} < n_s, {k}, tl.where({k} < n_s + n_r, first_r + ({k} - n_s) * P, lo + ({k} - n_s - n_r)))"
    # idx clamped at 0: numbers outside the residues must still index the group's residue list
    # NR is 0 for a group without residues (n_r = 0 there, j_r unused but computed: no division by 0)
    return f"""idx = tl.maximum({k} - n_s, 0) + below_s
nr = tl.maximum(NR, 1)
j_r = base_r + (idx // nr) * P + tl.load(GroupTable + g * G_WIDTH + 5 + idx % nr)
j = tl.where({k} < n_s, {k}, tl.where({k} < n_s + n_r, j_r, lo + ({k} - n_s - n_r)))"""


def _flat_loops(res_mode: str, homo: bool, pages: int, max_residues: int, load_page: str, visit_masked: str,
                prefetch: bool = False) -> str:
    """The split's kept blocks [k_begin, k_end) in one loop, ``pages`` blocks per step."""
    if pages == 1 and not prefetch:
        return f"""
        # -- every kept block of the split in one loop, by its number k (sinks, residue blocks, the
        # window range), each visit masked per row: one loop for the pipeliner, not four short ones --
        for k in range(k_begin, k_end):
{_at(_kth_block(res_mode, "k"), 3)}
            {load_page}
{_at(visit_masked, 3)}"""
    if homo:
        special = {"none": "special = (j < S)[None, :]",
                   "one": "special = ((j < S) | (j % P == R))[None, :]",
                   "many": "sp = j < S\nfor t in range(0, NR):\n"
                           "    sp = sp | (j % P == tl.load(GroupTable + g * G_WIDTH + 5 + t))\n"
                           "special = sp[None, :]"}[res_mode]
        width = "W"
    else:
        special = "special = j[None, :] < rS[:, None]"
        if max_residues:
            special += f"""
for u in tl.static_range({max_residues}):  # u, not t: t is a run-time loop variable elsewhere
    r_u = tl.load(HeadTable + h * H_WIDTH + 4 + u, mask=hq < GROUP, other=0)
    special = special | ((u < rNR)[:, None] & (j[None, :] % rP[:, None] == r_u[:, None]))"""
        width = "rW[:, None]"
    if prefetch:
        return f"""
        # -- every kept block of the split in one loop, PAGES blocks per step gathered into one tile;
        # the next step's K/V are asked for before this step's math (registers, two steps in flight) --
        offs_c = tl.arange(0, PAGES * BLOCK_N)
        kk = k_begin + offs_c // BLOCK_N
        live = kk < k_end
{_at(_kth_block(res_mode, "kk"), 2)}
        page = tl.maximum(tl.load(table_row + j, mask=live, other=0), 0)  # -1 (freed) only where no row keeps j
        k_t, v_t = _load_pages(KPages, VPages, page.to(tl.int64) * stride_page, j, live, kv_len, stride_tok, USE_DOT,
                               BLOCK, BLOCK_N, PAGES, HEAD_DIM, D_PAD)
        for k0 in range(k_begin, k_end, PAGES):
{_at(special, 3)}
            dist = row_block[:, None] - j[None, :]
            keep = (((dist >= 0) & (dist < {width})) | special) & row_valid[:, None] & live[None, :]
            j_cur = j
            k_cur = k_t
            v_cur = v_t
            kk = k0 + PAGES + offs_c // BLOCK_N
            live = kk < k_end
{_at(_kth_block(res_mode, "kk"), 3)}
            page = tl.maximum(tl.load(table_row + j, mask=live, other=0), 0)
            k_t, v_t = _load_pages(KPages, VPages, page.to(tl.int64) * stride_page, j, live, kv_len, stride_tok,
                                   USE_DOT, BLOCK, BLOCK_N, PAGES, HEAD_DIM, D_PAD)
            acc, l_i, m_i = _update_pages(acc, l_i, m_i, q, k_cur, v_cur, j_cur, keep, pos, qk_scale, USE_DOT, BLOCK,
                                          BLOCK_N, PAGES)"""
    return f"""
        # -- every kept block of the split in one loop, PAGES blocks per step gathered into one tile
        # (column c of the tile is token c % BLOCK_N of the split's block number k0 + c // BLOCK_N) --
        offs_c = tl.arange(0, PAGES * BLOCK_N)
        for k0 in range(k_begin, k_end, PAGES):
            kk = k0 + offs_c // BLOCK_N
            live = kk < k_end
{_at(_kth_block(res_mode, "kk"), 3)}
            # -1 (freed) only where no row keeps j
            page = tl.maximum(tl.load(table_row + j, mask=live, other=0), 0)
{_at(special, 3)}
            dist = row_block[:, None] - j[None, :]
            keep = (((dist >= 0) & (dist < {width})) | special) & row_valid[:, None] & live[None, :]
            acc, l_i, m_i = _visit_pages(acc, l_i, m_i, q, KPages, VPages, page.to(tl.int64) * stride_page, j, keep,
                                         live, pos, kv_len, stride_tok, qk_scale, USE_DOT, BLOCK, BLOCK_N, PAGES,
                                         HEAD_DIM, D_PAD)"""


_VISIT_PAGES = '''

@triton.jit
def _visit_pages(acc, l_i, m_i, q, KPages, VPages, base, j, keep, live, pos, kv_len, stride_tok, qk_scale,
                 USE_DOT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, PAGES: tl.constexpr,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Online-softmax update of the rows with PAGES kept blocks at once: column c of the tile
    reads block j[c] (its page at offset base[c]); keep: (rows, columns) block verdict."""
    offs_d = tl.arange(0, D_PAD)
    offs_c = tl.arange(0, PAGES * BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for s in tl.static_range(BLOCK // BLOCK_N):
        tok = s * BLOCK_N + offs_c % BLOCK_N
        cols = j * BLOCK + tok
        if USE_DOT:
            k = tl.load(KPages + base[None, :] + tok[None, :] * stride_tok + offs_d[:, None],
                        mask=live[None, :] & d_ok[:, None], other=0.0)
            qk = tl.dot(q, k)
        else:
            k = tl.load(KPages + base[:, None] + tok[:, None] * stride_tok + offs_d[None, :],
                        mask=live[:, None] & d_ok[None, :], other=0.0)
            qk = tl.sum(k.to(tl.float32) * q, 1)[None, :]
        # rows past the length may hold anything (a reused page): p is 0 there, v must be too
        v = tl.load(VPages + base[:, None] + tok[:, None] * stride_tok + offs_d[None, :],
                    mask=(live & (cols < kv_len))[:, None] & d_ok[None, :], other=0.0)
        ok = keep & (cols[None, :] <= pos[:, None])
        qk = tl.where(ok, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_DOT:
            acc = tl.dot(p.to(v.dtype), v, acc)
        else:
            acc += tl.sum(tl.sum(p, 0)[:, None] * v.to(tl.float32), 0)[None, :]
        m_i = m_new
    return acc, l_i, m_i
'''


_BLOCK_OK = """\
            # the row's own pattern keeps block j, and the causal cut (which bounds the length too)
            ok = keep[:, None] & (cols[None, :] <= pos[:, None])"""
_PAIR_OK = """\
            # the row's own head decides per token pair (the causal cut and prefix included), within the length
            ok = keep[:, None] & pair_keep(HeadTable, h[:, None], pos[:, None], cols[None, :]) & (cols[None, :] < kv_len)"""


def generate_decode(plan: KernelPlan, spec: DecodeSpecialization, *, name: str = "pattern",
                    fingerprint: str = "") -> str:
    """Source of a Python module with ``kernel``, ``combine_kernel`` and ``launch`` for ``plan``."""
    if not plan.causal:
        raise UnsupportedPattern(f"pattern {name} is bidirectional (an encoder pattern): decoding generates one "
                                 "token after another, so it runs causal patterns only; declare the pattern "
                                 "'causal' (or 'causal prefix P' for a prefix-LM) to decode with it")
    if plan.block % spec.block_n:
        raise ValueError(f"block_n={spec.block_n} must divide the pattern block {plan.block}")
    groups = group_params(plan)
    group = plan.group_size
    rows = group * spec.block_q
    use_dot = rows > 1 or spec.force_dot
    rows_pad = max(16, 1 << (rows - 1).bit_length()) if use_dot else 1
    # q heads of one kv head that differ need per-row masks on every block, not only in the window range
    homo = all(len(set(plan.params[kv * group:(kv + 1) * group])) == 1 for kv in range(plan.kv_heads))
    extended = plan.extended
    gtable = _group_table(groups, extended)
    g_width = len(gtable[0])
    g_max_res = max(len(gp.residues) for gp in groups)
    h_width = plan.table_width

    def gparam(field, column):
        value = _uniform(groups, field)
        return str(value) if value is not None else f"tl.load(GroupTable + g * G_WIDTH + {column})"

    union = [f"W = {gparam('window', 0)}", f"S = {gparam('sink', 1)}", f"P = {gparam('period', 2)}",
             f"WMIN = {gparam('min_window', 4)}"]
    if g_max_res == 1 and _uniform(groups, "residue") is not None:
        res_mode = "one"
        union.append(f"R = {_uniform(groups, 'residue')}")
    elif g_max_res <= 1 and all(len(gp.residues) == 1 for gp in groups):
        res_mode = "one"
        union.append("R = tl.load(GroupTable + g * G_WIDTH + 5)")
    elif g_max_res == 0:
        res_mode = "none"
    else:
        res_mode = "many"
        union.append("NR = tl.load(GroupTable + g * G_WIDTH + 3)")

    # kept residue blocks in [S, lo) and the k-th of them
    if res_mode == "none":
        count = "n_r = 0"
        kth = "j = 0"
    elif res_mode == "one":
        count = """
        # residue blocks in [S, lo): count(x) = #{j < x : j % P == R} = (x - R + P - 1) // P
        n_r = tl.where(lo > S, (lo - R + P - 1) // P - (S - R + P - 1) // P, 0)
        first_r = S + (R - S % P + P) % P"""
        kth = "j = first_r + (k - n_s) * P"
    else:
        count = """
        # residue blocks in [S, lo): count(x) = (x // P) * NR + #{t : R[t] < x % P}
        below_lo = lo * 0  # int32 tensors: loop-carried
        below_s = lo * 0
        for t in range(0, NR):
            r_t = tl.load(GroupTable + g * G_WIDTH + 5 + t)
            below_lo += (r_t < lo % P).to(tl.int32)
            below_s += (r_t < S % P).to(tl.int32)
        n_r = tl.where(lo > S, (lo // P) * NR + below_lo - (S // P) * NR - below_s, 0)
        base_r = S - S % P"""
        kth = """
        idx = k - n_s + below_s
        j = base_r + (idx // NR) * P + tl.load(GroupTable + g * G_WIDTH + 5 + idx % NR)"""

    # per-row parameters of the rows' q heads (heterogeneous groups) or the group's own
    if homo:
        row_params = """
        # the group's q heads share one pattern: the union is each row's own
        rW = W
        rS = S"""
        if res_mode == "one":
            row_special = "special = (j < rS) | (j % P == R)"
        elif res_mode == "many":
            row_special = """
            special = j < rS
            for t in range(0, NR):
                special = special | (j % P == tl.load(GroupTable + g * G_WIDTH + 5 + t))"""
        else:
            row_special = "special = j < rS"
        row_special_vec = dedent(row_special).strip()
    else:
        row_params = """
        # per-row parameters of each row's own q head
        rW = tl.load(HeadTable + h * H_WIDTH + 0, mask=hq < GROUP, other=0)
        rS = tl.load(HeadTable + h * H_WIDTH + 1, mask=hq < GROUP, other=0)
        rP = tl.load(HeadTable + h * H_WIDTH + 2, mask=hq < GROUP, other=1)
        rNR = tl.load(HeadTable + h * H_WIDTH + 3, mask=hq < GROUP, other=0)"""
        row_special_vec = "special = j < rS"
        if plan.max_residues:
            row_special_vec += f"""
for u in tl.static_range({plan.max_residues}):  # u, not t: t is a run-time loop variable elsewhere
    r_u = tl.load(HeadTable + h * H_WIDTH + 4 + u, mask=hq < GROUP, other=0)
    special = special | ((u < rNR) & (j % rP == r_u))"""

    visit_masked = f"""
{row_special_vec}
keep = (((row_block - j >= 0) & (row_block - j < rW)) | special) & row_valid
acc, l_i, m_i = _visit(acc, l_i, m_i, q, KPages, VPages, page, j, keep, pos, kv_len, stride_page, stride_tok,
                       qk_scale, True, USE_DOT, BLOCK, BLOCK_N, HEAD_DIM, D_PAD)"""
    visit_full = """
acc, l_i, m_i = _visit(acc, l_i, m_i, q, KPages, VPages, page, j, row_valid, pos, kv_len, stride_page, stride_tok,
                       qk_scale, False, USE_DOT, BLOCK, BLOCK_N, HEAD_DIM, D_PAD)"""
    if homo:
        visit_special = """
acc, l_i, m_i = _visit(acc, l_i, m_i, q, KPages, VPages, page, j, row_valid, pos, kv_len, stride_page, stride_tok,
                       qk_scale, False, USE_DOT, BLOCK, BLOCK_N, HEAD_DIM, D_PAD)"""
    else:
        visit_special = f"""
{row_special_vec}
keep = special & row_valid
acc, l_i, m_i = _visit(acc, l_i, m_i, q, KPages, VPages, page, j, keep, pos, kv_len, stride_page, stride_tok,
                       qk_scale, True, USE_DOT, BLOCK, BLOCK_N, HEAD_DIM, D_PAD)"""
    load_page = "page = tl.maximum(tl.load(table_row + j), 0)  # -1 (freed) only where no row keeps j"
    visit_sink, xargs, ok_mask, bounds, rel_loop = visit_special, "", _BLOCK_OK, "", ""
    if extended:
        # every masked visit asks pair_keep, per row's own head and token pair; sinks are masked
        # (a token sink ends inside a block), residue blocks only where the group's heads differ
        xargs, ok_mask = " HeadTable, h,", _PAIR_OK

        def call(masked):
            return (f"acc, l_i, m_i = _visit(acc, l_i, m_i, q, KPages, VPages, page, j, row_valid, pos, kv_len,{xargs} "
                    f"stride_page,\n                       stride_tok, qk_scale, {masked}, USE_DOT, BLOCK, BLOCK_N, "
                    "HEAD_DIM, D_PAD)")
        visit_masked, visit_full, visit_sink = call("True"), call("False"), call("True")
        visit_special = call("False" if homo else "True")
        col = 5 + max(g_max_res, 1)
        union += [f"REL = {gparam('relative', col)}", f"RBW = {gparam('rel_window', col + 1)}",
                  f"GG = {gparam('global_rows', col + 2)}"]
        bounds = "i_hi = i1"
        if plan.has_global:
            bounds += "\nlo = tl.where(i0 < GG, 0, lo)  # a global row: every block up to the diagonal"
        if plan.prefix:
            pb = -(-plan.prefix // plan.block)
            bounds += (f"\ndense = first_pos < {plan.prefix}  # rows inside the prefix see all of it, also after them"
                       f"\nlo = tl.where(dense, 0, lo)"
                       f"\ni_hi = tl.where(dense, tl.maximum(i1, tl.minimum({pb}, (kv_len + BLOCK - 1) // BLOCK) - 1), i1)")
        if any(gp.relative != NO_PERIOD for gp in groups):
            special = {"none": "gsp = j < S", "one": "gsp = (j < S) | (j % P == R)",
                       "many": "gsp = j < S\nfor t in range(0, NR):\n"
                               "    gsp = gsp | (j % P == tl.load(GroupTable + g * G_WIDTH + 5 + t))"}[res_mode]
            rel_loop = f"""
        # -- relative strides below lo: block i keeps j = i - RBW + 1 - k * REL (k >= 1); the tile's
        # query blocks i0..i1 give n_cls consecutive classes mod REL. Not numbered with the rest (a
        # relative head is not KV-efficient: its pages stay); the splits take every n_splits-th.
        # Sinks and residue blocks were visited above. --
        if REL < {NO_PERIOD}:
            n_cls = tl.minimum(i1 - i0 + 1, REL)
            base = ((i0 - RBW + 1) % REL + REL) % REL - REL
            n_cand = n_cls * ((lo - base + REL - 1) // REL)
            for k in range(split, n_cand, n_splits):
                j = base + (k // n_cls) * REL + k % n_cls
{_at(special, 4)}
                if (j >= 0) & (j < lo) & (gsp == 0):
                    {load_page}
{_at(visit_masked, 5)}"""

    loops = f"""
        # -- sinks [0, n_s) --
        for k in range(k_begin, tl.minimum(k_end, n_s)):
            j = k
            {load_page}
{_at(visit_sink, 3)}
        # -- residue blocks in [S, lo) --
        for k in range(tl.maximum(k_begin, n_s), tl.minimum(k_end, n_s + n_r)):
{_at(kth, 3)}
            {load_page}
{_at(visit_special, 3)}
        # -- the window range [lo, i1]: masked per row at its start and on the diagonal blocks
        # [i0, i1]; blocks in [edge, i0) are in every row's window --
        w_begin = lo + tl.maximum(k_begin - n_s - n_r, 0)
        w_end = lo + (k_end - n_s - n_r)
        edge = tl.minimum(tl.maximum(i1 - WMIN + 1, lo), i0)
        for j in range(w_begin, tl.minimum(w_end, edge)):
            {load_page}
{_at(visit_masked, 3)}
        for j in range(tl.maximum(w_begin, edge), tl.minimum(w_end, i0)):
            {load_page}
{_at(visit_full, 3)}
        for j in range(tl.maximum(w_begin, i0), w_end):
            {load_page}
{_at(visit_masked, 3)}"""
    if max(gp.window for gp in groups) <= 1 and not (plan.has_global or plan.prefix):
        # window <= 1 for every kv head: lo = i0, so the window range is the diagonal blocks and
        # the two loops before them could never run; not emitted (as in forward.py, issue 16)
        loops = loops[:loops.index("        edge = ")] + f"""\
        for j in range(tl.maximum(w_begin, i0), w_end):
            {load_page}
{_at(visit_masked, 3)}"""
    # after the cut above: the relative strides' loop visits blocks below lo whatever the window
    loops += rel_loop

    pages = spec.pages_per_step
    if pages < 1 or pages & (pages - 1):
        raise ValueError(f"pages_per_step={pages} must be a power of two")
    if (pages > 1 or spec.prefetch) and not spec.flat:
        raise ValueError("pages_per_step > 1 and prefetch need flat=True (pages are gathered by their kept-block "
                         "number)")
    if (pages > 1 or spec.prefetch) and spec.kv_int8:
        raise ValueError("pages_per_step > 1 and prefetch do not dequantise INT8 pages; use the default loops")
    if spec.prefetch and spec.block_n != plan.block:
        raise ValueError(f"prefetch loads whole pages: block_n={spec.block_n} must be the block {plan.block}")
    # flat loops cover windows, sinks and strides; extended and top-k plans keep their own loops
    flat = spec.flat and not extended and not plan.has_topk
    pages_helper = ""
    if flat:
        loops = _flat_loops(res_mode, homo, pages, plan.max_residues, load_page, visit_masked, spec.prefetch)
        pages_helper = _PREFETCH_HELPERS if spec.prefetch else _VISIT_PAGES if pages > 1 else ""

    topk_params = topk_launch = topk_args = topk_helpers = topk_loop = ""
    mass_setup = """
    # the attention mass of each visited window / selected block, for each q head's last query
    # (top-k scores; per slot: the state's update kernel reads it and puts -inf back)
    mass_base = BlockLse + slot.to(tl.int64) * stride_bl_b + h * stride_bl_h
    mass_rows = row_valid & (qi == q_len - 1)"""
    if plan.has_topk:
        # window visits record, for the last query of each row, the log of the attention mass the block
        # got (sinks and residue blocks are static for good: never selected, so their mass is not kept)
        static_part, window_part = loops.split("        # -- the window range", 1)
        loops = static_part + "        # -- the window range" + window_part.replace(
            "acc, l_i, m_i = _visit(acc,", "acc, l_i, m_i = _visit_mass(mass_base, mass_rows, acc,")
        topk_params = "Sel, BlockLse, stride_sel_slot, stride_sel_head, stride_bl_b, stride_bl_h, "
        topk_args = "sel, block_lse, sel.stride(0), sel.stride(1), block_lse.stride(0), block_lse.stride(1), "
        topk_launch = ", sel=None, block_lse=None"
        topk_helpers = static_keeps(plan) + _VISIT_MASS
        topk_loop = _decode_topk_loop(plan)

    tables = per_device(("tables", "The per-q-head and per-kv-head tables on ``device``.",
                         "(torch.tensor([x for row in HEAD_TABLE for x in row], dtype=torch.int32, device=device),\n"
                         "                    torch.tensor([x for row in GROUP_TABLE for x in row], dtype=torch.int32, "
                         "device=device))"))
    source = f'''\
# Generated by s2dsl codegen {DECODE_CODEGEN_VERSION}: decode kernel over a paged KV cache. Do not edit.
# pattern: {name}  fingerprint: {fingerprint}
# block {plan.block}, heads {plan.heads}, kv_heads {plan.kv_heads}, causal
# specialisation: {spec}
import torch
import triton
import triton.language as tl

HEADS = {plan.heads}
KV_HEADS = {plan.kv_heads}
GROUP = {group}
BLOCK = {plan.block}
H_WIDTH = {h_width}
# per q head: window, sink, period, number of residues, residues...
HEAD_TABLE = {list(map(list, plan.table()))}
G_WIDTH = {g_width}
# per kv head, the union of its q heads: window, sink, period, number of residues, smallest window, residues...
GROUP_TABLE = {list(map(list, gtable))}
BLOCK_Q = {spec.block_q}
ROWS = {rows_pad}
USE_DOT = {use_dot}
BLOCK_N = {spec.block_n}
HEAD_DIM = {spec.head_dim}
D_PAD = {spec.d_pad}
NUM_WARPS = {spec.num_warps}
NUM_STAGES = {spec.num_stages}
PAGES = {pages if flat else 1}


@triton.jit
def _visit(acc, l_i, m_i, q, KPages, VPages, page, j, keep, pos, kv_len,{xargs} stride_page, stride_tok, qk_scale,
           MASKED: tl.constexpr, USE_DOT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
           HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, KV_INT8: tl.constexpr = False):
    """Online-softmax update of the rows with kv block j (one page). ``keep``: per-row verdict."""
    offs_d = tl.arange(0, D_PAD)
    base = page.to(tl.int64) * stride_page
    if KV_INT8:  # one scale and bias per page and channel: x = code * scale + bias, one FMA
        qp = page.to(tl.int64) * HEAD_DIM + offs_d
        dm = offs_d < HEAD_DIM
        k_sc = tl.load(KScale + qp, mask=dm, other=0.0)
        k_bi = tl.load(KBias + qp, mask=dm, other=0.0)
        v_sc = tl.load(VScale + qp, mask=dm, other=0.0)
        v_bi = tl.load(VBias + qp, mask=dm, other=0.0)
    for s in tl.static_range(BLOCK // BLOCK_N):
        offs_n = s * BLOCK_N + tl.arange(0, BLOCK_N)
        if USE_DOT:
            k_ptrs = KPages + base + offs_n[None, :] * stride_tok + offs_d[:, None]
            if HEAD_DIM != D_PAD:
                k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            else:
                k = tl.load(k_ptrs)
            if KV_INT8:
                k = (k.to(tl.float32) * k_sc[:, None] + k_bi[:, None]).to(q.dtype)
            qk = tl.dot(q, k)
        else:
            k_ptrs = KPages + base + offs_n[:, None] * stride_tok + offs_d[None, :]
            if HEAD_DIM != D_PAD:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            else:
                k = tl.load(k_ptrs)
            if KV_INT8:
                k = k.to(tl.float32) * k_sc[None, :] + k_bi[None, :]
            qk = tl.sum(k.to(tl.float32) * q, 1)[None, :]
        if MASKED:
            cols = j * BLOCK + offs_n
{ok_mask}
            qk = tl.where(ok, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v_ptrs = VPages + base + offs_n[:, None] * stride_tok + offs_d[None, :]
        if MASKED:  # rows past the length may hold anything (a reused page): p is 0 there, v must be too
            v = tl.load(v_ptrs, mask=(j * BLOCK + offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif HEAD_DIM != D_PAD:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            v = tl.load(v_ptrs)
        if KV_INT8:  # masked lanes load code 0: finite after the FMA, and p is 0 there
            v = (v.to(tl.float32) * v_sc[None, :] + v_bi[None, :]).to(q.dtype)
        if USE_DOT:
            acc = tl.dot(p.to(v.dtype), v, acc)
        else:
            acc += tl.sum(tl.sum(p, 0)[:, None] * v.to(tl.float32), 0)[None, :]
        m_i = m_new
    return acc, l_i, m_i


{topk_helpers}{pages_helper}{pair_keep(plan) if extended else ""}
@triton.jit
def kernel(Q, KPages, VPages, BlockTable, Slots, SeqLens, Out, Lse, OutPart, LsePart, HeadTable, GroupTable,
           {topk_params}stride_qb, stride_qh, stride_qm, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
           stride_page, stride_tok, stride_bt_slot, stride_bt_head, q_len, n_tiles, n_splits, qk_scale,
           KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr, H_WIDTH: tl.constexpr,
           G_WIDTH: tl.constexpr, BLOCK_Q: tl.constexpr, ROWS: tl.constexpr, USE_DOT: tl.constexpr,
           BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLIT: tl.constexpr,
           PAGES: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tile = pid % n_tiles
    g = (pid // n_tiles) % KV_HEADS
    b = pid // (n_tiles * KV_HEADS)
    kv_len = tl.load(SeqLens + b)
    slot = tl.load(Slots + b)
    past = kv_len - q_len  # the queries are the last q_len positions
    # rows: (q head of the group, query of the tile), padded to ROWS
    r = tl.arange(0, ROWS)
    hq = r // BLOCK_Q
    qi = tile * BLOCK_Q + r % BLOCK_Q
    row_valid = (hq < GROUP) & (qi < q_len)
    h = g * GROUP + tl.minimum(hq, GROUP - 1)
    pos = past + qi
    row_block = pos // BLOCK
    first_pos = past + tile * BLOCK_Q
    last_pos = tl.minimum(first_pos + BLOCK_Q, kv_len) - 1
    i0 = first_pos // BLOCK
    i1 = last_pos // BLOCK
    # ---- the union of this kv head's q heads (generated) ----
{_at(chr(10).join(union), 1)}
{_at(row_params, 1)}
    # ---- the kept blocks, numbered: sinks, residue blocks, window range ----
    lo = tl.maximum(i0 - tl.maximum(W, 1) + 1, 0){chr(10) + _at(bounds, 1) if bounds else ""}
    n_s = tl.minimum(S, lo)
{_at(count, 1)}
    n_total = n_s + n_r + ({"i_hi" if bounds else "i1"} - lo + 1)
    k_begin = (n_total * split) // n_splits
    k_end = (n_total * (split + 1)) // n_splits
    table_row = BlockTable + slot.to(tl.int64) * stride_bt_slot + g * stride_bt_head

    offs_d = tl.arange(0, D_PAD)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :]
    q_mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    if USE_DOT:
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    else:
        q = tl.load(q_ptrs, mask=q_mask, other=0.0).to(tl.float32)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32){mass_setup if plan.has_topk else ""}
    if first_pos <= last_pos:
{loops}{topk_loop}
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    if SPLIT:
        # partials laid out (batch, head, query, split, dim) and (batch, head, query, split)
        part = ((b.to(tl.int64) * KV_HEADS * GROUP + h) * q_len + qi) * n_splits + split  # int64: large chunks
        tl.store(OutPart + part[:, None] * D_PAD + offs_d[None, :], out, mask=row_valid[:, None])
        tl.store(LsePart + part, lse, mask=row_valid)
    else:
        o_ptrs = Out + b.to(tl.int64) * stride_ob + h[:, None] * stride_oh + qi[:, None] * stride_om + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)
        tl.store(Lse + b * stride_lb + h * stride_lh + qi, lse, mask=row_valid)


@triton.jit
def combine_kernel(OutPart, LsePart, Out, Lse, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                   heads, q_len, n_splits, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """out = sum_s exp(lse_s - lse) * out_s with lse = logsumexp_s lse_s; empty rows give 0, -inf."""
    row = tl.program_id(0).to(tl.int64)  # (batch, head, query); int64 offsets
    qi = row % q_len
    h = (row // q_len) % heads
    b = row // (q_len * heads)
    s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, D_PAD)
    lse_s = tl.load(LsePart + row * n_splits + s, mask=s < n_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)
    total = tl.sum(w, 0)
    parts = tl.load(OutPart + (row * n_splits + s[:, None]) * D_PAD + offs_d[None, :],
                    mask=(s[:, None] < n_splits), other=0.0)
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(parts * (w / total_safe)[:, None], 0)
    lse = tl.where(total == 0.0, float("-inf"), m_safe + tl.log(total_safe))
    tl.store(Out + b * stride_ob + h * stride_oh + qi * stride_om + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    tl.store(Lse + b * stride_lb + h * stride_lh + qi, lse)


{tables}

def launch(q, out, lse, k_pages, v_pages, block_table, slots, seq_lens, q_len, n_splits, sm_scale{topk_launch}):
    """Run the decode kernel (and the combine step when ``n_splits > 1``).

    q, out: (batch, heads, q_len, dim), last dim contiguous; lse: float32 (batch, heads, q_len);
    k_pages, v_pages: (num_pages, BLOCK, dim) contiguous; block_table: int32 (slots, kv_heads,
    max_blocks), last dim contiguous; slots, seq_lens: int32 (batch,), seq_lens counting the
    queries' own tokens, already in the cache.
    """
    batch = q.shape[0]
    n_tiles = triton.cdiv(q_len, BLOCK_Q)
    head_table, group_table = tables(q.device)
    split = n_splits > 1
    if split:
        out_part = torch.empty(batch * HEADS * q_len * n_splits * D_PAD, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(batch * HEADS * q_len * n_splits, dtype=torch.float32, device=q.device)
    else:
        out_part = lse_part = lse  # unused
    grid = (batch * KV_HEADS * n_tiles, n_splits)
    kernel[grid](q, k_pages, v_pages, block_table, slots, seq_lens, out, lse, out_part, lse_part,
                 head_table, group_table, {topk_args}
                 q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
                 lse.stride(0), lse.stride(1), k_pages.stride(0), k_pages.stride(1),
                 block_table.stride(0), block_table.stride(1), q_len, n_tiles, n_splits,
                 sm_scale * 1.4426950408889634,
                 KV_HEADS=KV_HEADS, GROUP=GROUP, BLOCK=BLOCK, H_WIDTH=H_WIDTH, G_WIDTH=G_WIDTH,
                 BLOCK_Q=BLOCK_Q, ROWS=ROWS, USE_DOT=USE_DOT, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
                 D_PAD=D_PAD, SPLIT=split, PAGES=PAGES, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if split:
        combine_kernel[(batch * HEADS * q_len,)](
            out_part, lse_part, out, lse, out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1), HEADS, q_len, n_splits,
            SPLITS=triton.next_power_of_2(n_splits), HEAD_DIM=HEAD_DIM, D_PAD=D_PAD, num_warps=4)
'''
    if spec.early_v:
        source = _early_v(source)
    if spec.fused_combine:
        source = _fused_combine(source)
    return _int8(source) if spec.kv_int8 else _without_int8(source)


_MERGE = """\
        # the last of the group's n_splits programs to arrive merges every split's partials: each
        # program's stores come before its arrival (barrier, then a release at gpu scope), and the
        # last one reads them after its acquire, past L1 (.cg)
        tl.debug_barrier()
        arrived = tl.atomic_add(Count + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == n_splits - 1:
            tl.atomic_xchg(Count + pid, 0)  # ready for the next launch
            first = ((b.to(tl.int64) * KV_HEADS * GROUP + h) * q_len + qi) * n_splits
            m_all = tl.full([ROWS], float("-inf"), tl.float32)
            den = tl.zeros([ROWS], tl.float32)
            o_all = tl.zeros([ROWS, D_PAD], tl.float32)
            for s2 in range(0, n_splits):
                lse_s = tl.load(LsePart + first + s2, mask=row_valid, other=float("-inf"), cache_modifier=".cg")
                o_s = tl.load(OutPart + (first + s2)[:, None] * D_PAD + offs_d[None, :], mask=row_valid[:, None],
                              other=0.0, cache_modifier=".cg")
                m_new = tl.maximum(m_all, lse_s)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                scale_old = tl.exp(m_all - m_safe)
                w = tl.exp(lse_s - m_safe)
                den = den * scale_old + w
                o_all = o_all * scale_old[:, None] + o_s * w[:, None]
                m_all = m_new
            den_safe = tl.where(den == 0.0, 1.0, den)
            m_fin = tl.where(m_all == float("-inf"), 0.0, m_all)
            o_ptrs = Out + b.to(tl.int64) * stride_ob + h[:, None] * stride_oh + qi[:, None] * stride_om + offs_d[None, :]
            tl.store(o_ptrs, (o_all / den_safe[:, None]).to(Out.dtype.element_ty), mask=q_mask)
            tl.store(Lse + b * stride_lb + h * stride_lh + qi, tl.where(den == 0.0, float("-inf"), m_fin + tl.log(den_safe)),
                     mask=row_valid)
"""


def _fused_combine(source: str) -> str:
    """The merge moved into the kernel (see ``_MERGE``) and the combine launch dropped."""
    edits = [("        tl.store(LsePart + part, lse, mask=row_valid)\n",
              "        tl.store(LsePart + part, lse, mask=row_valid)\n" + _MERGE),
             ("OutPart, LsePart, HeadTable, GroupTable,", "OutPart, LsePart, Count, HeadTable, GroupTable,"),
             ("out_part, lse_part,\n                 head_table,", "out_part, lse_part, count,\n                 head_table,"),
             ("    grid = (batch * KV_HEADS * n_tiles, n_splits)\n",
              "    grid = (batch * KV_HEADS * n_tiles, n_splits)\n"
              "    count = _arrivals(q.device, grid[0]) if split else lse  # unused without splits\n"),
             ("    if split:\n        combine_kernel[", "    if False:  # merged inside the kernel\n        combine_kernel["),
             ("\ndef launch(", _ARRIVALS + "\ndef launch(")]
    for old, new in edits:
        assert source.count(old) == 1, f"fused_combine: {old!r} moved"
        source = source.replace(old, new)
    return source


_ARRIVALS = '''
_counts = {}


def _arrivals(device, n):
    """Per-device arrival counts, zero between launches (the last program of a group resets its
    own); grown, never shrunk. Launches of this module on one stream only, one after another."""
    have = _counts.get(str(device))
    if have is None or have.numel() < n:
        have = _counts[str(device)] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return have

'''


_V_LOAD = """\
        v_ptrs = VPages + base + offs_n[:, None] * stride_tok + offs_d[None, :]
        if MASKED:  # rows past the length may hold anything (a reused page): p is 0 there, v must be too
            v = tl.load(v_ptrs, mask=(j * BLOCK + offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif HEAD_DIM != D_PAD:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            v = tl.load(v_ptrs)
        if KV_INT8:  # masked lanes load code 0: finite after the FMA, and p is 0 there
            v = (v.to(tl.float32) * v_sc[None, :] + v_bi[None, :]).to(q.dtype)
"""
_STEP = "        offs_n = s * BLOCK_N + tl.arange(0, BLOCK_N)\n"


def _early_v(source: str) -> str:
    """``_visit`` with V's load moved up to just after the step's offsets, before K's."""
    assert source.count(_V_LOAD) == 1 and source.count(_STEP) == 1, "the visit's loads moved: update _early_v"
    source = source.replace(_V_LOAD, "")
    return source.replace(_STEP, _STEP + "        # V asked for with K: both pages in flight at once\n" + _V_LOAD)


def _without_int8(source: str) -> str:
    """Drop the INT8 branches and parameters: a 16-bit module is the kernel it was before INT8."""
    out, skip_deeper = [], None
    for line in source.split("\n"):
        indent_now = len(line) - len(line.lstrip())
        if skip_deeper is not None:
            if line.strip() and indent_now <= skip_deeper:
                skip_deeper = None
            else:
                continue
        if line.lstrip().startswith("if KV_INT8:"):
            skip_deeper = indent_now
            continue
        out.append(line)
    source = "\n".join(out)
    source = source.replace(", KV_INT8: tl.constexpr = False)", ")").replace(", KV_INT8)", ")")
    assert "KV_INT8" not in source
    return source


def _int8(source: str) -> str:
    """Thread the pages' scale and bias through the kernels and turn the dequantising branch on;
    only INT8 modules carry them, so 16-bit kernels compile exactly as before."""
    n_calls = source.count("BLOCK_N, HEAD_DIM, D_PAD)")
    source = source.replace("KPages, VPages,", "KPages, VPages, KScale, KBias, VScale, VBias,")
    source = source.replace("BLOCK_N, HEAD_DIM, D_PAD)", "BLOCK_N, HEAD_DIM, D_PAD, True)")
    source = source.replace("def launch(q, out, lse, k_pages, v_pages,",
                            "def launch(q, out, lse, k_pages, v_pages, k_scale, k_bias, v_scale, v_bias,")
    source = source.replace("kernel[grid](q, k_pages, v_pages,", "kernel[grid](q, k_pages, v_pages, k_scale, k_bias, "
                            "v_scale, v_bias,")
    assert n_calls and "KV_INT8" in source
    return source
