"""Decode attention over the paged KV cache with the generated, pattern-specialised kernels.

``paged_attention`` runs the decode kernel for queries whose tokens are already in the
cache; ``cached_attention`` (also ``PagedKVCache.attend``) writes new tokens, attends and
frees the pages the pattern no longer needs, in one call, for every phase of generation:

* a first prefill (empty sequences): the prefill kernel on the contiguous tensors, then only
  the blocks the pattern still needs are written to the cache;
* chunked prefill, decoding (one query per sequence), speculative decoding (a few): the
  tokens are appended, then the decode kernel reads the queries' kept blocks from the pages.

Padded batches (``lengths``: real tokens per row, right padding; ``left_padding``: pad
tokens before them) write only the real tokens, each at its own sequence's positions; pad
rows of the output are zero. A padded first prefill packs the real tokens into one
variable-length prefill call (``s2dsl.runtime.padding``); a padded later step runs the decode
kernel once, each row's real queries moved to its last rows.
Layers sharing a page table (``PagedKVCache(table=...)``) share one plan per step.
"""
from __future__ import annotations

import math
from dataclasses import replace
from functools import lru_cache
from types import ModuleType
from typing import Hashable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..codegen.decode import DECODE_CODEGEN_VERSION, DecodeSpecialization, generate_decode, group_params
from ..codegen.lower import UnsupportedPattern, lower
from ..memo import per_object
from ..pattern import Pattern
from .attention import InputError
from .validate import check_device, check_scale, interpreter_compute_dtype
from .cache import KernelCache, cache_key, codegen_fingerprint, default_cache
from .kernels import _DTYPES
from .kv_cache import PagedKVCache, padding_counts
from .paging import DecodeBatch, StepPlan
from .padding import padded_attention, right_align
from .timing import event_ms
from .topk_state import state_for

__all__ = ["paged_attention", "cached_attention", "choose_decode", "decode_module", "decode_source",
           "kept_blocks_for_query", "enable_split_tuning", "split_choices", "split_candidates", "pick_splits"]

#: queries per program at most (chunked prefill is tiled by this many queries)
MAX_BLOCK_Q = 16


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def choose_decode(pattern: Pattern, dtype: torch.dtype, head_dim: int, q_len: int, device: torch.device,
                  tuning: Optional[dict] = None, kv_int8: bool = False) -> DecodeSpecialization:
    """Tile sizes for the decode kernel; ``tuning`` overrides any field. ``kv_int8``: the pages
    hold INT8 codes (``s2dsl.runtime.quant``), dequantised in registers."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    block_q = min(_pow2(max(q_len, 1)), MAX_BLOCK_Q)
    if device.type != "cuda":  # the interpreter: small tiles
        block_n = min(pattern.block, 32)
        spec = DecodeSpecialization(block_n=block_n, num_warps=4, num_stages=1)
    else:  # one page per step; bandwidth-bound, so enough loads in flight
        block_n = min(pattern.block, 64 if head_dim <= 128 else 32)
        spec = DecodeSpecialization(block_n=block_n, num_warps=4, num_stages=3 if head_dim <= 128 else 2,
                                    **GPU_DECODE_LOOPS)
        if kv_int8:  # INT8 pages are dequantised one page per step, in _visit
            spec = replace(spec, pages_per_step=1, prefetch=False)
        if spec.block_n != pattern.block:  # prefetch loads whole pages
            spec = replace(spec, prefetch=False)
    spec = replace(spec, dtype=_DTYPES[dtype], head_dim=head_dim, capability=tuple(capability), block_q=block_q,
                   kv_int8=bool(kv_int8))
    return replace(spec, **(tuning or {}))


#: the decode kernel's loops on a GPU: {} = one loop per kind of kept block (sinks, residue
#: blocks, window), one page per step, V loaded after K's scores; benchmarks/sweep_kernels.py
#: times the alternatives (DecodeSpecialization's early_v, flat, pages_per_step, prefetch,
#: force_dot) in the same run, and flipping the default is this one line (issue 14)
GPU_DECODE_LOOPS: dict = {}


def decode_module(pattern: Pattern, spec: DecodeSpecialization, cache: Optional[KernelCache] = None) -> ModuleType:
    if cache is None:  # the default cache's module, memoised per pattern object (its key costs ~75 us)
        cache = default_cache()
        return per_object(pattern, ("decode", spec, id(cache)), lambda: decode_module(pattern, spec, cache))
    plan = lower(pattern)
    key = cache_key(DECODE_CODEGEN_VERSION, codegen_fingerprint(), "decode", plan, spec)
    return cache.get(key, lambda: generate_decode(plan, spec, name=pattern.name, fingerprint=pattern.fingerprint()))


def decode_source(pattern: Pattern, spec: DecodeSpecialization) -> str:
    return generate_decode(lower(pattern), spec, name=pattern.name, fingerprint=pattern.fingerprint())


def kept_blocks_for_query(pattern: Pattern, kv_head: int, first_pos: int, last_pos: int) -> int:
    """How many kv blocks the decode kernel visits for queries at ``first_pos..last_pos`` of
    ``kv_head`` (the union of its q heads), by the kernel's own closed form."""
    gp = group_params(lower(pattern))[kv_head]
    i0, i1 = first_pos // pattern.block, last_pos // pattern.block
    lo = max(i0 - max(gp.window, 1) + 1, 0)
    n_s = min(gp.sink, lo)
    n_r = 0
    if lo > gp.sink and gp.residues:
        def count(x):
            return (x // gp.period) * len(gp.residues) + sum(r < x % gp.period for r in gp.residues)
        n_r = count(lo) - count(gp.sink)
    return n_s + n_r + (i1 - lo + 1)


@lru_cache(maxsize=256)
def _module(pattern: Pattern, dtype: torch.dtype, head_dim: int, q_len: int, device: torch.device,
            kv_int8: bool = False):
    """Specialisation and module per call shape, memoised: a decode step pays no codegen lookups."""
    spec = choose_decode(pattern, dtype, head_dim, q_len, device, kv_int8=kv_int8)
    return spec, decode_module(pattern, spec)


@lru_cache(maxsize=4096)
def _splits_for(pattern: Pattern, batch: int, n_tiles: int, max_blocks: int, q_len: int, sms: int,
                policy: str = "") -> int:
    # the longest sequence's kept blocks, at the start of its last block (within one block of exact)
    max_len = max_blocks * pattern.block
    kept = max(kept_blocks_for_query(pattern, g, max_len - q_len, max_len - 1) for g in range(pattern.kv_heads))
    programs = batch * pattern.kv_heads * n_tiles
    target, min_blocks = SPLIT_POLICIES[policy or SPLIT_POLICY]
    want = math.ceil(target * sms / programs)
    splits = max(1, min(want, math.ceil(kept / min_blocks), MAX_SPLITS))
    return 1 << (splits - 1).bit_length()  # a power of two: 3 splits read 15-20% slower than 2 or 4


#: per policy: programs per SM the split count aims for (before rounding up to a power of two)
#: and kept blocks per split at least; splits at most. On an H100 (batch 8, 32 kv heads,
#: 32K-128K) 2, 4 and 8 splits read equally fast, 3 was 15-20% slower (benchmarks/RESULTS.md).
#: "fine" (issue 14) splits few sequences (batch 1: 32 programs before splitting) down to two
#: blocks per program; the split count stays batch x kv heads x pages against the SM count.
SPLIT_POLICIES = {"occupancy": (4, 8), "fine": (8, 2)}
SPLIT_POLICY = "occupancy"  # the default policy: flipping it is this one line
MAX_SPLITS = 64


def _splits(pattern: Pattern, batch: int, n_tiles: int, max_len: int, q_len: int, device: torch.device,
            policy: str = "") -> int:
    """Split the kept blocks of long contexts so that the programs fill the GPU."""
    if device.type != "cuda" or max_len == 0:
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _splits_for(pattern, batch, n_tiles, -(-max_len // pattern.block), q_len, sms, policy)


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check_q(q, cache: PagedKVCache, n_seqs: int):
    """Refuse queries the decode kernel cannot run against ``cache``, before anything changes."""
    pattern = cache.pattern
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise InputError("q must be a 4-D tensor (batch, heads, q_len, dim)")
    b, heads, q_len, d = q.shape
    if b != n_seqs:
        raise InputError(f"q has batch {b} but {n_seqs} sequences were given")
    if heads != pattern.heads:
        raise InputError(f"q has {heads} heads but pattern '{pattern.name}' has {pattern.heads}")
    if d != cache.head_dim:
        raise InputError(f"q has head dim {d} but the cache holds {cache.head_dim}")
    if q.dtype != cache.dtype:
        raise InputError(f"q is {q.dtype} but the cache holds {cache.dtype}")
    if q.device != cache.device:
        raise InputError(f"q is on {q.device} but the cache is on {cache.device}")
    check_device(q)
    memo = cache._decode_memo
    if "lowered" not in memo:  # once per cache: hashing a pattern costs more than a launch
        try:
            lower(pattern)
        except UnsupportedPattern as exc:
            raise InputError(str(exc)) from None
        memo["lowered"] = True


def _kernel_for(cache: PagedKVCache, compute: torch.dtype, d: int, q_len: int, device: torch.device):
    """(spec, module) for this cache and call shape, memoised on the cache (no pattern hashing per call)."""
    key = (compute, d, q_len, device)
    hit = cache._decode_memo.get(key)
    if hit is None:
        hit = cache._decode_memo[key] = _module(cache.pattern, compute, d, q_len, device, cache.quantized)
    return hit


def _splits_memo(cache: PagedKVCache, b: int, n_tiles: int, max_len: int, q_len: int, device: torch.device,
                 launch=None) -> int:
    """The split count for this call shape, memoised on the cache. With split tuning on
    (``enable_split_tuning``) and ``launch(n_splits, out, lse)`` given, the policy's count is
    replaced by the fastest measured candidate, once per key."""
    if device.type != "cuda" or max_len == 0:
        return 1
    key = ("splits", b, n_tiles, -(-max_len // cache.block), q_len)
    memo = cache._decode_memo
    hit = memo.get(key)
    if hit is None:
        hit = memo[key] = _splits(cache.pattern, b, n_tiles, max_len, q_len, device)
    if launch is None or not memo.get(_TUNE):
        return hit
    return _tuned_choice(memo, key, hit, lambda cands: _time_launches(launch, cands))


#: memo flag: measure the split count per call shape (``enable_split_tuning``)
_TUNE = "tune_splits"
#: timed launches per candidate (after one untimed launch that compiles and warms it)
TUNE_REPS = 8
#: a candidate replaces the policy's count only when this much faster (timing noise)
TUNE_MARGIN = 0.03


def enable_split_tuning(cache: PagedKVCache, on: bool = True) -> None:
    """Let the decode calls on ``cache`` pick their split count by timing, on CUDA: at the first
    call of each shape (batch, query tiles, blocks of the longest sequence, queries) outside
    a CUDA-graph capture, the kernel (+ combine) runs on scratch outputs for the candidates of
    ``split_candidates`` and the fastest is memoised on the cache; a capture reuses it (a shape
    first seen during a capture keeps the policy's count). Off CUDA, and for dynamic top-k
    patterns (whose kernel updates the selection state), the policy decides: tuning is ignored."""
    memo = cache._decode_memo
    memo[_TUNE] = bool(on)


def split_choices(cache: PagedKVCache) -> dict:
    """{(batch, n_tiles, max_blocks bucket, q_len): (policy's splits, measured splits)} for the shapes
    tuned so far (``_tuned_choice`` buckets the longest sequence's blocks by powers of two)."""
    memo = cache._decode_memo
    return {k[1:5]: (k[5], v) for k, v in memo.items() if isinstance(k, tuple) and k and k[0] == "tuned"}


def split_candidates(policy: int) -> Tuple[int, ...]:
    """Powers of two from a quarter to double the policy's count, within [1, MAX_SPLITS]."""
    base = _pow2(max(1, policy))
    return tuple(s for s in (base // 4, base // 2, base, base * 2) if 1 <= s <= MAX_SPLITS)


def pick_splits(policy: int, timer) -> int:
    """The fastest of ``split_candidates(policy)`` by ``timer(candidates) -> {splits: seconds}``;
    the policy's own count unless another beats it by ``TUNE_MARGIN``."""
    cands = split_candidates(policy)
    if len(cands) < 2:
        return policy
    times = timer(cands)
    best = min(cands, key=lambda s: times[s])
    base = _pow2(max(1, policy))
    if base in times and times[best] > (1 - TUNE_MARGIN) * times[base]:
        return policy
    return best


def _capturing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _tuned_choice(memo: dict, key: tuple, policy: int, timer) -> int:
    # one measurement per power-of-two bucket of the longest sequence's blocks (and per policy
    # count): keyed by the exact block count, an eager decode re-timed every block's worth of tokens
    _, b, n_tiles, max_blocks, q_len = key
    tkey = ("tuned", b, n_tiles, _pow2(max(1, max_blocks)), q_len, policy)
    hit = memo.get(tkey)
    if hit is None:
        if _capturing():  # launches can't be timed (or synced) inside a capture: the policy's count
            return policy
        hit = memo[tkey] = pick_splits(policy, timer)
    return hit


def _time_launches(launch, cands) -> dict:
    """Seconds per launch of each candidate split count, by CUDA events (back to back: a launch
    costs the host more than a short kernel runs)."""
    for s in cands:  # compiles each variant, outside the timing
        launch(s)
    return {s: event_ms(lambda s=s: launch(s), reps=1, per_call=TUNE_REPS) / 1e3 for s in cands}


def paged_attention(q: torch.Tensor, cache: PagedKVCache, seqs: Union[Sequence[Hashable], DecodeBatch], *,
                    scale: Optional[float] = None, n_splits: Optional[int] = None, tuning: Optional[dict] = None,
                    return_lse: bool = False, out: Optional[torch.Tensor] = None):
    """Attention of ``q`` (batch, heads, q_len, dim) over the cached tokens of ``seqs``.

    The queries are the last ``q_len`` tokens of each sequence and must already be in the
    cache (``cache.append``). Reads only the pages the pattern keeps for them. ``n_splits``
    (default: chosen from the context length and the GPU) splits each (sequence, kv head)'s
    kept blocks across programs, merged by a combine step. ``out``: where to write (q's
    shape, last dim contiguous; any other strides). Returns the output in q's dtype (and the
    float32 log-sum-exp, (batch, heads, q_len), with ``return_lse``).
    """
    batch = seqs if isinstance(seqs, DecodeBatch) else cache.batch(seqs)
    _check_q(q, cache, len(batch.seq_ids))
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or out.stride(-1) != 1):
        raise InputError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with a contiguous last dim")
    if q.shape[2] > batch.min_len:
        raise InputError(f"q has {q.shape[2]} queries but a sequence holds only {batch.min_len} tokens: append the "
                         "queries' own keys and values first")
    return _attend(q, cache, batch, check_scale(scale, q.shape[-1]), n_splits, tuning, return_lse, out)


def _attend(q, cache: PagedKVCache, batch: DecodeBatch, scale: float, n_splits, tuning, return_lse, out=None,
            fresh: Optional[torch.Tensor] = None):
    """The decode kernel over the pages, for checked inputs (``paged_attention`` checks them).
    ``fresh``: per row, whether all its tokens are this step's (default: length == q_len)."""
    pattern = cache.pattern
    b, heads, q_len, d = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    # bf16 under the interpreter runs on float32 copies (see validate.interpreter_compute_dtype)
    compute = interpreter_compute_dtype(q.dtype) or q.dtype
    kq = q.to(compute)
    int8 = cache.quantized
    if tuning:
        spec = choose_decode(pattern, compute, d, q_len, q.device, tuning, kv_int8=int8)
        module = decode_module(pattern, spec)
    else:
        spec, module = _kernel_for(cache, compute, d, q_len, q.device)
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(b, heads, q_len, dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return (out, lse) if return_lse else out
    # dynamic top-k: the kernel reads the selection, writes each block's mass (static patterns have none)
    topk = None if pattern.is_static else state_for(cache)
    extra = {}
    if topk is not None:
        # sequences new to their slot start afresh
        fresh = batch.seq_lens == q_len if fresh is None else fresh
        topk.reset(batch.slots, fresh)
        topk.before_step(cache, kq, batch.slots, batch.seq_lens)
        extra = topk.kernel_args()
    kout = out if compute == q.dtype else torch.empty_like(kq)
    if int8:  # int8 pages are dequantised inside the kernel, to the compute dtype
        pages = (cache.k_pages, cache.v_pages, cache.k_scale, cache.k_bias, cache.v_scale, cache.v_bias)
    elif compute == cache.k_pages.dtype:
        pages = (cache.k_pages, cache.v_pages)
    else:
        pages = (cache.k_pages.to(compute), cache.v_pages.to(compute))
    if n_splits is None:
        launch = None
        if topk is None and cache._decode_memo.get(_TUNE):  # timed on scratch outputs: the step's are untouched
            def launch(s):
                module.launch(kq, torch.empty_like(kout), torch.empty_like(lse), *pages, cache.block_tables,
                              batch.slots, batch.seq_lens, q_len, s, scale)
        n_splits = _splits_memo(cache, b, -(-q_len // spec.block_q), batch.max_len, q_len, q.device, launch)
    module.launch(kq, kout, lse, *pages, cache.block_tables, batch.slots, batch.seq_lens,
                  q_len, int(n_splits), scale, **extra)
    if kout is not out:
        out.copy_(kout)
    if topk is not None:
        topk.after_step(batch.slots, batch.seq_lens, lse, q_len, fresh)
    return (out, lse) if return_lse else out


def cached_attention(cache: PagedKVCache, seq_ids: Sequence[Hashable], q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, *, scale: Optional[float] = None, n_splits: Optional[int] = None,
                     tuning: Optional[dict] = None, return_lse: bool = False, lengths=None, left_padding=None,
                     out: Optional[torch.Tensor] = None):
    """Write ``k, v`` (batch, kv_heads, n, dim) into the cache and attend with ``q`` (batch, heads, n, dim).

    Sequences that are all empty take the prefill kernel on the contiguous tensors and keep
    only what the pattern needs afterwards; otherwise the tokens are appended and the decode
    kernel reads the pages. Either way the pages the next query no longer needs are freed
    (by this call for a cache of its own, by the next step's plan for a shared page table).
    ``lengths`` / ``left_padding``: padded rows (see the module docstring). ``out``: where
    the decode kernel writes (see ``paged_attention``; a prefill returns its own tensor).
    Raises ``OutOfPagesError`` (nothing written) when the pool is too small.

    A step of layers sharing a page table costs the first layer the plan (a few dozen small
    device ops, no host sync unless the pool may be short) and every layer two indexed copies
    and the kernel launches: the host never waits for the device on this path.
    """
    table = cache.table
    seqs = table.seqs(seq_ids)  # a clear error for a bare id
    # the checks below depend only on this signature: a decode loop repeats it every step, so
    # each layer checks it once (host time per layer is what an eager step is made of)
    sig = (len(seqs), q.shape, q.dtype, q.device, q.stride(-1), k.shape, k.dtype, k.device, v.shape, v.dtype,
           v.device, scale, None if out is None else (out.shape, out.dtype, out.device, out.stride(-1)))
    memo = cache._decode_memo
    checked = memo.get("checked")
    plain = scale is None or type(scale) is float  # a tensor scale is checked every call, never memoised
    if plain and checked is not None and checked[0] == sig:
        scale = checked[1]
    else:
        _check_q(q, cache, len(seqs))
        scale = check_scale(scale, q.shape[-1])  # before anything is written
        if q.shape[2] != k.shape[2]:
            raise InputError(f"q has {q.shape[2]} queries but k, v carry {k.shape[2]} new tokens: the queries are "
                             "the new tokens")
        cache._check_tensors(len(seqs), k, v)
        if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                                or out.stride(-1) != 1):
            raise InputError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with a contiguous last dim")
        if plain:
            memo["checked"] = (sig, scale)
    n = q.shape[2]
    counts, offsets = padding_counts(len(seqs), n, lengths, left_padding)
    plan = table.plan_step(seq_ids, n, consumer=cache, counts=counts, offsets=offsets)
    if table.tier is not None:  # this layer's pages moving between tiers land before it writes or reads
        table.tier.wait(cache)
    cache.write(plan, k, v)
    if plan.only_needed:
        result = _prefill(q, k, v, cache.pattern, plan, scale, return_lse)
        topk = state_for(cache)
        if topk is not None:  # decode's top-k scores start from the prompt's last rows
            topk.seed(plan.slots, q, k, scale, plan.counts if plan.ragged else None,
                      plan.offsets if plan.ragged else None)
    elif plan.ragged:
        result = _rows(q, cache, plan, scale, n_splits, tuning, return_lse)
    elif (n >= GATHER_PREFILL_MIN and n_splits is None and not tuning and cache.pattern.is_static
          and not cache.quantized and table.tier is None):
        result = _gathered_prefill(q, cache, plan, scale, return_lse)
    else:
        result = _attend(q, cache, plan, scale, n_splits, tuning, return_lse, out)
    if cache.evicts_after_step:  # else the next step's plan evicts
        table.evict(seq_ids)
    return result


#: new tokens per sequence from which a step over the pages (chunked prefill) gathers the
#: sequences' K/V and runs the prefill kernel: the decode kernel's tiles hold at most 16
#: queries (times the group's q heads) and re-read every kept page per tile, so long chunks
#: are better served by the prefill kernel's tiles at the price of one gather of the K/V
GATHER_PREFILL_MIN = 256


def _gathered_prefill(q, cache: PagedKVCache, plan: StepPlan, scale, return_lse):
    """A chunk of ``n`` tokens per sequence (already written) attending everything before it:
    the sequences' K/V gathered from the pages into contiguous tensors, then the prefill
    kernel with the queries as the last positions. Blocks the cache no longer holds read as
    page 0; no query of the chunk keeps them (they were freed for queries from the chunk's
    start, less the lookahead, on), so the kernel never visits them."""
    from .api import attention
    b, _, n, _ = q.shape
    ends = [s + n for s in plan.starts]
    k, v = cache.gather_rows(plan.slots, max(ends))
    if len(set(ends)) == 1:
        if not return_lse and _dense(cache.pattern):  # as a first prefill's dense layers: SDPA's flash
            return _sdpa_chunk(q, k, v, scale, cache.pattern)
        return attention(q, k, v, cache.pattern, scale=scale, return_lse=return_lse)
    return padded_attention(q, k, v, cache.pattern, q_counts=[n] * b, q_offsets=[0] * b, k_counts=ends,
                            k_offsets=[0] * b, scale=scale, return_lse=return_lse)


def _prefill(q, k, v, pattern, plan: StepPlan, scale, return_lse):
    """A first prefill on the contiguous tensors; padded rows packed into one variable-length
    call. A layer whose pattern is dense is run by torch's SDPA (the pattern proves the layer
    dense; SDPA's flash kernel is the best dense prefill there is), unless the lse is wanted."""
    from .api import attention
    if plan.ragged:
        return padded_attention(q, k, v, pattern, q_counts=plan.counts, q_offsets=plan.offsets,
                                k_counts=plan.counts, k_offsets=plan.offsets, scale=scale, return_lse=return_lse)
    if not return_lse and _dense(pattern):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=pattern.kv_heads != pattern.heads)
    return attention(q, k, v, pattern, scale=scale, return_lse=return_lse)


def _sdpa_chunk(q, k, v, scale, pattern):
    """Dense causal attention of the last ``n`` positions of ``k, v`` (a chunk after the first):
    SDPA with the causal diagonal aligned to the keys' end (torch's lower-right causal bias,
    which its flash kernel serves with grouped kv heads)."""
    from torch.nn.attention.bias import causal_lower_right
    mask = causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=pattern.kv_heads != pattern.heads)


@lru_cache(maxsize=256)
def _dense(pattern: Pattern) -> bool:
    return pattern.causal and not pattern.prefix and all(s.dense for s in pattern.head_specs)


def _rows(q, cache, plan: StepPlan, scale, n_splits, tuning, return_lse):
    """A padded step over the pages, in one launch: each row's real queries are moved to its
    last rows (the kernel places query ``r`` at ``length - n + r``); the rows before them are
    computed over whatever blocks their positions name (freed pages read as page 0, never out
    of bounds) and dropped. Rows without real tokens are left out of the launch (their
    sequences attend nothing this step, and a top-k state sees no step for them)."""
    b, heads, n, d = q.shape
    out = q.new_zeros(b, heads, n, d)
    lse = torch.full((b, heads, n), float("-inf"), dtype=torch.float32, device=q.device)
    live = [i for i, c in enumerate(plan.counts) if c]
    if not live:
        return (out, lse) if return_lse else out
    counts = [plan.counts[i] for i in live]
    src, back, real = right_align(counts, [plan.offsets[i] for i in live], n, q.device)    # (r, n) each
    rows = None if len(live) == b else cache.table.to_device(live)
    sub = q if rows is None else q.index_select(0, rows)
    r = len(live)
    aligned = sub.gather(2, src.view(r, 1, n, 1).expand(r, heads, n, d))
    ends = [plan.starts[i] + plan.counts[i] for i in live]
    slots, seq_lens = (plan.slots, plan.seq_lens) if rows is None else \
        (plan.slots.index_select(0, rows), plan.seq_lens.index_select(0, rows))
    batch = DecodeBatch(tuple(plan.seq_ids[i] for i in live), slots, seq_lens, max(ends), min(ends))
    fresh = real.sum(1) == seq_lens  # rows whose every token is this step's
    o_al, l_al = _attend(aligned, cache, batch, scale, n_splits, tuning, True, fresh=fresh)
    o_sub = torch.where(real.view(r, 1, n, 1), o_al.gather(2, back.view(r, 1, n, 1).expand(r, heads, n, d)), 0)
    l_sub = torch.where(real.view(r, 1, n), l_al.gather(2, back.view(r, 1, n).expand(r, heads, n)), float("-inf"))
    if rows is None:
        out, lse = o_sub.to(q.dtype), l_sub
    else:
        out.index_copy_(0, rows, o_sub.to(q.dtype))
        lse.index_copy_(0, rows, l_sub)
    return (out, lse) if return_lse else out
