"""Dynamic top-k in prefill: which kv blocks each (head, query block) adds to its static set.

A selection is an int32 tensor ``[batch, heads, n_rows, K]``: row ``r`` is absolute query
block ``first_block + r`` with ``first_block = (kv_len - q_len) // block`` (the queries are the
last ``q_len`` positions), ``K`` is the largest ``topk K`` of the pattern, and a row of head
``h`` holds at most that head's own K kv block indices first, then ``-1``. A selection never holds a
block the head keeps statically, a block the causal cut forbids, or the same block twice, so
the kernels visit static and selected blocks exactly once each. Heads without ``topk`` have
rows of ``-1``. Nothing here is N x N: the scores are per (query block, kv block), the index
per (query block, K).

Estimator (``select_blocks``): the block-pooled score of MInference's block-sparse heads. Per
head, the mean query of each query block dotted with the mean key of each kv block (the kv
head's, under grouped-query attention); the K best candidates outside the static set win, the
later block among equal scores (``order_keys``). It runs as two generated launches
(``codegen/select.py``): the keys pooled per kv block, then one program per (head, tile of 16
query blocks) pools its queries, scores them against the pooled keys tile by tile up to the
causal cut and keeps a running top K in registers; nothing of size query blocks x kv blocks is
written, and there is no host sync. (K above the kernel's register limit takes the torch path:
score chunks, the generated exclusion, a top-k of the same keys.)
``estimator="last_row"`` scores instead with
the attention of each query block's last query over every key, summed per kv block (ALISA /
SnapKV's observation row): exact for that row, ``block`` times the work of the pooled score.

``estimator="bound"`` scores each kv block by Quest's upper bound of q·k from its keys'
channel-wise min / max, the largest over the query block's rows (the prefill counterpart of a
decode ``topk ... by bound``).

Packed batches (``cu_seqlens_q`` / ``cu_seqlens_k``): each sequence selects by itself, row ``r``
of sequence ``b`` being its own query block ``past_b // block + r`` (``past_b`` = its keys
minus its queries); the selection is ``[sequences, heads, most rows of any sequence, K]``,
shorter sequences' extra rows unused (-1).
"""
from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Tuple, Union

import torch

from ..codegen.lower import lower
from ..codegen.select import SELECT_CODEGEN_VERSION, generate_select
from ..pattern import Pattern
from .cache import cache_key, codegen_fingerprint, default_cache
from .validate import check_attention_inputs

__all__ = ["ESTIMATORS", "selection_shape", "select_blocks", "check_selection", "topk_heads", "exclusion_module",
           "pooled_blocks", "SCORE_CHUNK_ELEMENTS", "packed_lengths", "first_blocks", "order_keys", "NONE_KEY"]

#: float32 scores held at once while selecting (the query blocks are taken in chunks)
SCORE_CHUNK_ELEMENTS = 1 << 26


def topk_heads(pattern: Pattern) -> Tuple[int, ...]:
    """Per q head, its ``topk K`` (0 for a static head)."""
    return tuple(p.topk for p in lower(pattern).params)


def selection_shape(pattern: Pattern, batch: int, q_len: int, kv_len: int) -> Tuple[Tuple[int, int, int, int], int]:
    """``((batch, heads, n_rows, K), first_block)`` of the selection for these lengths."""
    block = pattern.block
    first = (kv_len - q_len) // block
    n_rows = 0 if q_len == 0 else (kv_len - 1) // block - first + 1
    return (batch, pattern.heads, n_rows, lower(pattern).max_topk), first


def packed_lengths(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> Tuple[List[int], List[int]]:
    """Each packed sequence's (queries, keys), read on the host (one sync, as the launch makes)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [b - a for a, b in zip(cq, cq[1:])], [b - a for a, b in zip(ck, ck[1:])]


def packed_selection_shape(pattern: Pattern, q_lens: List[int], kv_lens: List[int]):
    """``((sequences, heads, rows, K), [first block of each sequence])`` for a packed batch."""
    shapes = [selection_shape(pattern, 1, lq, lk) for lq, lk in zip(q_lens, kv_lens)]
    rows = max((s[0][2] for s in shapes), default=0)
    return (len(q_lens), pattern.heads, rows, lower(pattern).max_topk), [s[1] for s in shapes]


def first_blocks(pattern: Pattern, batch: int, q_len: int, kv_len: int, cu_seqlens_q=None, cu_seqlens_k=None,
                 device=None) -> Union[int, torch.Tensor]:
    """Row 0's absolute query block: one int, or an int32 tensor per sequence of a packed batch."""
    if cu_seqlens_q is None:
        return selection_shape(pattern, batch, q_len, kv_len)[1]
    return torch.tensor(packed_selection_shape(pattern, *packed_lengths(cu_seqlens_q, cu_seqlens_k))[1],
                        dtype=torch.int32, device=device)


def exclusion_module(pattern: Pattern):
    """The generated module whose ``exclude`` drops static and causally forbidden candidates."""
    plan = lower(pattern)
    key = cache_key(SELECT_CODEGEN_VERSION, codegen_fingerprint(), "select", plan)
    return default_cache().get(key, lambda: generate_select(plan, name=pattern.name,
                                                            fingerprint=pattern.fingerprint()))


def pooled_blocks(x: torch.Tensor, block: int, offset: int = 0) -> torch.Tensor:
    """Mean over each block of rows of ``x`` (batch, heads, n, d), float32; the first row sits at
    position ``offset`` of its block (partial first and last blocks average what they hold)."""
    b, h, n, d = x.shape
    lead = offset % block
    total = lead + n
    n_blocks = -(-total // block)
    if lead == 0 and total % block == 0 and x.is_contiguous():  # aligned: no padded float32 copy
        sums = x.view(b, h, n_blocks, block, d).sum(3, dtype=torch.float32)
    else:
        padded = x.new_zeros(b, h, n_blocks * block, d, dtype=torch.float32)
        padded[:, :, lead:lead + n] = x
        sums = padded.view(b, h, n_blocks, block, d).sum(3)
    starts = torch.arange(n_blocks, device=x.device) * block
    counts = (torch.clamp(starts + block, max=total) - torch.clamp(starts, min=lead)).clamp(min=1)
    return sums / counts.view(1, 1, -1, 1).to(torch.float32)


ESTIMATORS = ("pooled", "last_row", "bound")


def key_block_bounds(k: torch.Tensor, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per kv block of ``k`` (batch, kv_heads, n, d): the centre and half-range of its keys'
    channel-wise min / max, float32 ``(batch, kv_heads, blocks, d)`` each (a partial last block
    over the keys it holds). ``q.centre + |q|.radius`` is the largest ``q.k`` any key of the
    block can give (Quest's bound, the decode path's ``by bound``)."""
    b, h, n, d = k.shape
    n_blocks = -(-n // block)
    kf = k.float()
    pad = n_blocks * block - n
    if pad:  # repeat the last key: min / max over the real ones
        kf = torch.cat([kf, kf[:, :, -1:].expand(b, h, pad, d)], 2)
    kf = kf.view(b, h, n_blocks, block, d)
    lo, hi = kf.amin(3), kf.amax(3)
    return (lo + hi) * 0.5, (hi - lo) * 0.5


def _bound_scores(q, centre_t, radius_t, block: int, lead: int, r0: int, r1: int):
    """Per query block r0..r1 (rows of ``q`` from position ``lead`` of the first block) and kv
    block: the largest upper bound of q.k over the query block's rows, ``(b, T, r1 - r0, n_cols)``."""
    b, t, q_len, d = q.shape
    lo_row = max(r0 * block - lead, 0)
    hi_row = min(r1 * block - lead, q_len)
    rows = q[:, :, lo_row:hi_row]
    if rows.dtype not in (torch.float16, torch.bfloat16):
        rows = rows.float()
    # 16-bit queries multiply in their own dtype (tensor cores; the bound only ranks candidates)
    ub = (rows @ centre_t.to(rows.dtype)).float() + (rows.abs() @ radius_t.to(rows.dtype)).float()
    front = lo_row + lead - r0 * block                                                # rows before q's first
    back = (r1 - r0) * block - front - ub.shape[2]
    ub = torch.nn.functional.pad(ub, (0, 0, front, back), value=float("-inf"))
    return ub.view(b, t, r1 - r0, block, -1).amax(3)


def _last_row_scores(q, k, pattern: Pattern, rows: torch.Tensor, heads_t: torch.Tensor, causal: bool):
    """Attention of each query block's last query over every key, summed per kv block:
    ``(b, T, len(rows), n_cols)`` for the heads ``heads_t``; ``rows`` are absolute query blocks."""
    b, heads, q_len, d = q.shape
    kv_len, block, group = k.shape[2], pattern.block, pattern.group_size
    past = kv_len - q_len
    pos = torch.clamp((rows + 1) * block, max=kv_len) - 1                               # last query of each block
    ql = q[:, :, pos - past].reshape(b, pattern.kv_heads, group * len(rows), d)
    logits = (ql @ k.transpose(-1, -2)).float() * d ** -0.5                           # (b, kv, G * rows, kv_len)
    logits = logits.view(b, pattern.kv_heads, group, len(rows), kv_len)
    if causal:
        logits = logits.masked_fill(torch.arange(kv_len, device=q.device) > pos.view(-1, 1), float("-inf"))
    probs = torch.softmax(logits, -1).view(b, heads, len(rows), kv_len)
    n_cols = -(-kv_len // block)
    probs = torch.nn.functional.pad(probs, (0, n_cols * block - kv_len))
    return probs.view(b, heads, len(rows), n_cols, block).sum(-1).index_select(1, heads_t).contiguous()


#: the int64 key of an excluded candidate, below every real one (see ``order_keys``)
NONE_KEY = -(1 << 63)


def order_keys(scores: torch.Tensor, n_valid: Optional[int] = None) -> torch.Tensor:
    """int64 keys ranking float32 ``scores`` (..., kv blocks) as the generated selection does: by
    score, then by kv block, the later block first among equal scores (ties are decided, not left
    to the sort); ``-inf`` and NaN scores, and blocks at or past ``n_valid``, are ``NONE_KEY``."""
    s = scores.float()
    bits = torch.where(s == 0, torch.zeros_like(s), s).view(torch.int32).long()   # -0.0 ties with 0.0
    cols = torch.arange(s.shape[-1], device=s.device)
    key = (torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) << 32) | cols
    drop = torch.isnan(s) | (s == float("-inf"))
    if n_valid is not None:
        drop = drop | (cols >= n_valid)
    return torch.where(drop, NONE_KEY, key)


@lru_cache(maxsize=256)
def _prefill_info(pattern: Pattern):
    """Per pattern, looked up once: the generated module, each head's K, the top-k heads, the largest K."""
    ks = topk_heads(pattern)
    return exclusion_module(pattern), ks, tuple(h for h, kk in enumerate(ks) if kk), max(ks)


def _heads_tensor(module, dyn, device):
    """The top-k heads as an int32 device tensor, made once per (module, device): no host copy per call."""
    memo = module.__dict__.setdefault("_dyn_heads", {})
    key = (dyn, str(device))
    if key not in memo:
        memo[key] = torch.tensor(dyn, dtype=torch.int32, device=device)
    return memo[key]


def _fused(module, k_max: int) -> bool:
    return 1 << max(k_max - 1, 0).bit_length() <= module.FUSED_K


@torch.no_grad()
def select_blocks(q: torch.Tensor, k: torch.Tensor, pattern: Pattern, *, layout: str = "bhsd",
                  estimator: str = "pooled", cu_seqlens_q: Optional[torch.Tensor] = None,
                  cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The prefill selection for ``q`` over ``k`` (see the module docstring for its layout).

    ``estimator``: ``"pooled"`` (default; mean query of the query block . mean key of the kv
    block), ``"last_row"`` (ALISA / SnapKV: the attention of the query block's last query
    over every key, summed per kv block; exact for that row, O(query blocks * keys) work) or
    ``"bound"`` (Quest's upper bound of q.k from the kv block's key min / max, the largest over
    the query block's rows: a block some row could attend strongly wins; O(queries * kv blocks)
    work, a ``block``-th of the attention's).
    ``cu_seqlens_q`` / ``cu_seqlens_k``: packed (total, heads, dim) inputs, one selection per sequence.

    Each row holds its head's K selectable blocks of highest score, best first; among equal scores
    the later block wins (``order_keys``). The pooled estimator is two generated launches (keys
    pooled per kv block; then per (head, query-block tile) the queries pooled, scored against the
    pooled keys and the K best kept while walking the kv blocks), with no block score matrix in
    memory; the other estimators compute their scores in chunks of query blocks and pick from them
    with the same generated kernel.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    # the generated kernels take heads, kv heads and head dim from the pattern and the tensors'
    # shapes unchecked: a mismatch is refused here (shapes, dtypes, devices only: no device read)
    check_attention_inputs(q, k, k, pattern, layout, cu_seqlens_q, cu_seqlens_k, static_only=True)
    module, _, dyn, k_max = _prefill_info(pattern)
    if cu_seqlens_q is not None:
        q_lens, kv_lens = packed_lengths(cu_seqlens_q, cu_seqlens_k)
        shape, _ = packed_selection_shape(pattern, q_lens, kv_lens)
        if estimator == "pooled" and _fused(module, k_max) and dyn and shape[2]:  # every sequence in one launch
            sel = torch.empty(shape, dtype=torch.int32, device=q.device)
            cq, ck = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
            packed = (cq[:-1], cq[1:] - cq[:-1], ck[:-1], ck[1:] - ck[:-1])
            return module.select_pooled(_last_dim_unit(q), _last_dim_unit(k), sel, 0, max(kv_lens), packed)
        sel = torch.full(shape, -1, dtype=torch.int32, device=q.device)
        q0 = k0 = 0
        for b, (lq, lk) in enumerate(zip(q_lens, kv_lens)):  # sequences select by themselves
            part = select_blocks(q[q0:q0 + lq].transpose(0, 1).unsqueeze(0), k[k0:k0 + lk].transpose(0, 1).unsqueeze(0),
                                 pattern, estimator=estimator)
            sel[b, :, :part.shape[2]] = part[0]
            q0, k0 = q0 + lq, k0 + lk
        return sel
    if layout == "bshd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    shape, first = selection_shape(pattern, batch, q_len, kv_len)
    n_rows = shape[2]
    if not dyn or n_rows == 0 or k_max == 0:
        return torch.full(shape, -1, dtype=torch.int32, device=q.device)
    fused = _fused(module, k_max)
    if estimator == "pooled" and fused:
        sel = torch.empty(shape, dtype=torch.int32, device=q.device)
        return module.select_pooled(_last_dim_unit(q), _last_dim_unit(k), sel, q_len, kv_len)
    sel = torch.full(shape, -1, dtype=torch.int32, device=q.device)
    block = pattern.block
    n_cols = -(-kv_len // block)
    heads_i32 = _heads_tensor(module, dyn, q.device)
    heads_t = heads_i32.long()
    if estimator == "pooled":
        q_dyn = q if len(dyn) == heads else q.index_select(1, heads_t)
        q_pool = pooled_blocks(q_dyn, block, kv_len - q_len)                             # (b, T, n_rows, d)
        k_pool = pooled_blocks(k, block).index_select(1, heads_t // pattern.group_size)  # (b, T, n_cols, d)
        k_t = k_pool.transpose(-1, -2).contiguous()
        chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, batch * len(dyn) * n_cols))
    elif estimator == "bound":
        q_dyn = q if len(dyn) == heads else q.index_select(1, heads_t)
        centre, radius = key_block_bounds(k, block)
        kv_of = heads_t // pattern.group_size
        centre_t = centre.index_select(1, kv_of).transpose(-1, -2).contiguous()      # (b, T, d, n_cols)
        radius_t = radius.index_select(1, kv_of).transpose(-1, -2).contiguous()
        chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, batch * len(dyn) * n_cols * block))
    else:
        chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, batch * heads * kv_len))
    for r0 in range(0, n_rows, chunk):
        r1 = min(n_rows, r0 + chunk)
        if estimator == "pooled":
            scores = torch.matmul(q_pool[:, :, r0:r1], k_t).contiguous()           # (b, T, rows, n_cols)
        elif estimator == "bound":
            scores = _bound_scores(q_dyn, centre_t, radius_t, block, (kv_len - q_len) % block, r0, r1).contiguous()
        else:
            rows = torch.arange(first + r0, first + r1, device=q.device)
            scores = _last_row_scores(q, k, pattern, rows, heads_t, pattern.causal)
        scores = scores.float().contiguous()
        if fused:
            module.select_scores(scores, sel, heads_i32, r0, q_len, kv_len)
        else:
            _pick_by_keys(module, scores, sel, heads_i32, first + r0, r0)
    return sel


def _last_dim_unit(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _pick_by_keys(module, scores, sel, heads_i32, row_block: int, r0: int):
    """The same picks as the generated kernel, in torch ops (for K beyond what it keeps in registers):
    the static and causally forbidden blocks excluded by the generated ``exclude``, then a top-k of
    ``order_keys``."""
    batch, n_head_rows, rows, n_cols = scores.shape
    dev = scores.device
    module.exclude(scores, heads_i32.view(-1, 1).contiguous(), torch.full((batch,), row_block, dtype=torch.int32,
                   device=dev), torch.full((batch,), n_cols, dtype=torch.int32, device=dev))
    take = min(sel.shape[-1], n_cols)
    top = torch.topk(order_keys(scores), take, dim=-1).values
    per_head_k = module.prefill_tables(dev)[1].index_select(0, heads_i32).view(1, -1, 1, 1)  # no host read
    slot = torch.arange(take, device=dev).view(1, 1, 1, -1)
    picked = torch.where((top != NONE_KEY) & (slot < per_head_k), top & 0xFFFFFFFF, -1).to(torch.int32)
    sel[:, heads_i32.long(), r0:r0 + rows, :take] = picked


def check_selection(sel, pattern: Pattern, batch: int, q_len: int, kv_len: int, device: torch.device,
                    *, values: bool = True, cu_seqlens_q: Optional[torch.Tensor] = None,
                    cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A user-given selection, checked; returns it as a contiguous int32 tensor.

    Shape, dtype and device always; with ``values`` (reads the tensor: one host sync) also that
    every entry is -1 or a kv block the head may select (inside the context, allowed by the
    causal cut, not static), that no row repeats a block, and that no row of head ``h`` holds
    more than its K blocks. ``cu_seqlens_q`` / ``cu_seqlens_k``: a packed batch's, each
    sequence's rows checked against its own lengths (rows past its own are unused: -1).
    """
    from .attention import InputError

    if cu_seqlens_q is not None:
        q_lens, kv_lens = packed_lengths(cu_seqlens_q, cu_seqlens_k)
        shape, _ = packed_selection_shape(pattern, q_lens, kv_lens)
        if not isinstance(sel, torch.Tensor) or tuple(sel.shape) != shape:
            raise InputError(f"selection must have shape (sequences, heads, most query blocks, K) = {shape} for this "
                             f"packed batch; got {tuple(getattr(sel, 'shape', ()))}")
        if sel.dtype not in (torch.int32, torch.int64) or sel.device != device:
            raise InputError(f"selection must be int32 (or int64) on {device}; got {sel.dtype} on {sel.device}")
        sel = sel.to(torch.int32).contiguous()
        if values:
            for b, (lq, lk) in enumerate(zip(q_lens, kv_lens)):
                rows = selection_shape(pattern, 1, lq, lk)[0][2]
                check_selection(sel[b:b + 1, :, :rows], pattern, 1, lq, lk, device)
                if bool((sel[b, :, rows:] != -1).any()):
                    raise InputError(f"selection rows past sequence {b}'s {rows} query blocks must be unused (-1)")
        return sel
    shape, first = selection_shape(pattern, batch, q_len, kv_len)
    if not isinstance(sel, torch.Tensor):
        raise TypeError(f"selection must be a torch.Tensor, got {type(sel).__name__}")
    if tuple(sel.shape) != shape:
        raise InputError(f"selection must have shape (batch, heads, query blocks, K) = {shape} for q_len {q_len}, "
                         f"kv_len {kv_len}; got {tuple(sel.shape)}")
    if sel.dtype not in (torch.int32, torch.int64) or sel.device != device:
        raise InputError(f"selection must be int32 (or int64) on {device}; got {sel.dtype} on {sel.device}")
    sel = sel.to(torch.int32).contiguous()
    if not values or sel.numel() == 0:
        return sel
    n_cols = -(-kv_len // pattern.block)
    if bool(((sel < -1) | (sel >= n_cols)).any()):
        raise InputError(f"selection holds a block outside -1..{n_cols - 1} (-1 marks an unused slot)")
    if bool(((sel[..., 1:] >= 0) & (sel[..., :-1] < 0)).any()):
        raise InputError("a selection row has a used slot after an unused one (-1): put the blocks first")
    ks = torch.tensor(topk_heads(pattern), device=device).view(1, -1, 1)
    if bool(((sel >= 0).sum(-1) > ks).any()):
        raise InputError(f"a selection row holds more blocks than its head's topk K {topk_heads(pattern)}")
    ordered = sel.sort(-1).values
    if bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()):
        raise InputError("a selection row repeats a block")
    # static or causally forbidden entries: the generated exclusion marks them on a block grid
    grid = torch.zeros(batch, pattern.heads, shape[2], n_cols, dtype=torch.float32, device=device)
    heads_arg = torch.arange(pattern.heads, dtype=torch.int32, device=device).view(-1, 1)
    exclusion_module(pattern).exclude(grid, heads_arg, torch.full((batch,), first, dtype=torch.int32, device=device),
                                      torch.full((batch,), n_cols, dtype=torch.int32, device=device))
    picked = grid.gather(-1, sel.clamp(min=0).long())
    if bool(((picked == float("-inf")) & (sel >= 0)).any()):
        raise InputError("a selection holds a block the head keeps statically or the causal cut forbids; "
                         "select only blocks outside the static set (s2dsl.runtime.topk.select_blocks does)")
    return sel


def transpose_selection(sel: torch.Tensor, n_kv_blocks: int,
                        first_block: Union[int, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The selection read per kv block, for the dK/dV kernel: ``(offsets, query_blocks)``.

    For key ``(b * heads + h) * n_kv_blocks + j``, ``query_blocks[offsets[key]:offsets[key + 1]]``
    are the absolute query blocks whose row of head ``h`` selected kv block ``j``, ascending
    (``first_block``: row 0's block, or one per sequence of a packed batch).
    Built on the device by a stable sort of the O(heads * query blocks * K) entries: no atomics
    in the kernel, no host sync, the same order (so the same sums) on every run.
    """
    batch, heads, n_rows, k = sel.shape
    n_keys = batch * heads * n_kv_blocks
    device = sel.device
    bh = torch.arange(batch * heads, device=device).view(batch, heads, 1, 1) * n_kv_blocks
    key = torch.where(sel >= 0, bh + sel.long(), n_keys).reshape(-1)  # unused slots sort last
    order = torch.argsort(key, stable=True)
    first = first_block.view(-1, 1, 1, 1).to(device) if isinstance(first_block, torch.Tensor) else first_block
    rows = (torch.arange(n_rows, device=device).view(1, 1, -1, 1) + first).expand(batch, heads, n_rows, k)
    query_blocks = rows.reshape(-1)[order].to(torch.int32).contiguous()
    counts = torch.zeros(n_keys + 1, dtype=torch.long, device=device).scatter_add_(0, key, torch.ones_like(key))
    offsets = torch.zeros(n_keys + 1, dtype=torch.int32, device=device)
    offsets[1:] = torch.cumsum(counts[:-1], 0).to(torch.int32)
    return offsets, query_blocks
