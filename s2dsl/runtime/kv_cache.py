"""A paged KV cache whose page is the pattern's block, evicting per kv head.

One ``PagedKVCache`` serves one attention layer. Its pool holds ``num_pages`` pages; a page
is one kv head's block of ``pattern.block`` tokens (``k_pages``/``v_pages`` of shape
``(num_pages, block, head_dim)``), so the kv heads of a sequence keep and free pages
independently. Per (sequence, kv head) a page table maps kv block ``j`` to its page, or -1
where the block is not held.

What a kv head keeps is the union of its q heads' patterns at the next query position
``L`` (the sequence length): with ``i = L // block``, block ``j`` stays while some q head
keeps ``(i, j)`` (its window ``i - j < W``, a sink ``j < S``, a residue class) or ``j >= i``.
Dropping the others is safe because the analyzer proves the heads KV-efficient: once a head
drops a block it never needs it again. A kv head with a q head the analyzer cannot prove
KV-efficient (a dynamic ``topk`` head) keeps every page, and the cache says so once, when it
is made. So the pages a sequence holds are what the pattern needs: the analyzer's
``GroupCoverage.kv_bytes`` per kv head.

Sequences come and go between steps (continuous batching): ``add_sequence``,
``remove_sequence`` (its pages return to the pool). ``append`` writes new tokens; it checks
that the pool has the pages first and raises ``OutOfPagesError`` before writing anything.
``s2dsl.runtime.decode.cached_attention`` appends, attends with the generated kernels and
evicts in one call: prefill, chunked prefill, decoding, speculative decoding. ``crop``
rolls a sequence back (rejected speculative tokens) within the cache's ``lookahead``.

The bookkeeping (page tables, lengths, free pages, what to keep) lives in a
``s2dsl.runtime.paging.PageTable`` as device tensors; layers with the same pattern can share
one (``table=``), so a step is planned once and each layer only scatters its K/V.
"""
from __future__ import annotations

import os
import warnings
from typing import Hashable, List, Optional, Sequence, Tuple

import torch

from ..pattern import Pattern
from .paging import DecodeBatch, OutOfPagesError, PageTable, StepPlan, kv_efficient_heads
from .quant import QuantizedPages, dequantize_pages, quantize_pages, write_decode_tokens

__all__ = ["PagedKVCache", "OutOfPagesError", "dense_pattern", "DecodeBatch", "StepPlan", "PageTable"]


def dense_pattern(heads: int, kv_heads: int, block: int = 64, name: str = "full_attention") -> Pattern:
    """Full causal attention as a pattern (for dense layers sharing the paged cache)."""
    from ..frontend import parse
    text = f"pattern {name} {{ block = {block} heads = {heads} kv_heads = {kv_heads} causal heads * {{ dense }} }}"
    return parse(text, f"<{name}>")[name]


def _kv_write():
    """runtime.kv_write, imported on first use (it imports Triton)."""
    from . import kv_write
    return kv_write


class PagedKVCache:
    """Paged K/V for one attention layer under ``pattern`` (see the module docstring).

    ``num_pages`` pages of ``pattern.block`` tokens of one kv head each. ``evict=False``
    keeps every page (a dense cache, for comparison). ``lookahead``: tokens a sequence can
    be rolled back by (``crop``); eviction runs that far behind. ``table``: share the page
    bookkeeping of another cache of the same pattern and pool size (another layer). Sequence
    ids are any hashable values; ``add_sequence()`` makes a fresh integer id when none is given.
    """

    def __init__(self, pattern: Pattern, *, num_pages: int, head_dim: int, dtype: torch.dtype = torch.float16,
                 device="cpu", max_seqs: int = 8, evict: bool = True, lookahead: int = 0,
                 table: Optional[PageTable] = None, kv_dtype: Optional[torch.dtype] = None):
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be an s2dsl.Pattern, got {type(pattern).__name__}")
        if not pattern.causal:
            raise ValueError(f"pattern {pattern.name} is bidirectional: a KV cache serves causal (autoregressive) "
                             "attention")
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        if kv_dtype not in (None, dtype, torch.int8):
            raise ValueError(f"kv_dtype must be torch.int8 or the compute dtype {dtype} (None); got {kv_dtype}")
        if table is None:
            table = PageTable(pattern, num_pages=num_pages, device=device, max_seqs=max_seqs, evict=evict,
                              lookahead=lookahead)
            efficient = kv_efficient_heads(pattern)
            if evict and not all(efficient):
                rules = table.rules
                g = pattern.group_size
                keep_all = [kv for kv in range(pattern.kv_heads) if rules.keep_all_list[kv]
                            and not all(pattern.head_specs[h].dense for h in range(kv * g, (kv + 1) * g))]
                bad = [h for h, e in enumerate(efficient) if not e]
                warnings.warn(f"pattern {pattern.name}: q heads {bad} are not KV-efficient (the analyzer cannot prove "
                              f"a dropped block is never needed again), so kv heads {keep_all} keep every page",
                              stacklevel=2)
        elif table.pattern.fingerprint() != pattern.fingerprint() or table.num_pages != num_pages:
            raise ValueError(f"a shared page table serves one pattern and pool size: it has {table.pattern.name} "
                             f"with {table.num_pages} pages, this cache {pattern.name} with {num_pages}")
        self.table = table
        table.members += 1
        self._decode_memo = {}  # the decode path's per-call-shape lookups (s2dsl.runtime.decode)
        self.pattern = pattern
        self.block = pattern.block
        self.kv_heads = pattern.kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        # the pools' own device, index included ("cuda" becomes "cuda:0"), so it compares
        # equal to the device of tensors on it
        self.device = table.device
        self.num_pages = num_pages
        # zero pages: masked lanes of the kernels multiply stale page contents by 0, which must
        # be finite. One spare page after the pool takes the writes of padding and skipped tokens.
        # INT8: codes in the pages, a float32 scale and bias per page and channel beside them
        # (``s2dsl.runtime.quant``); zeros dequantise to 0, so unwritten pages stay finite too.
        self.quantized = kv_dtype == torch.int8
        self.kv_dtype = torch.int8 if self.quantized else dtype
        self._k_all = torch.zeros(num_pages + 1, self.block, head_dim, dtype=self.kv_dtype, device=self.device)
        self._v_all = torch.zeros(num_pages + 1, self.block, head_dim, dtype=self.kv_dtype, device=self.device)
        self.k_pages = self._k_all[:num_pages]
        self.v_pages = self._v_all[:num_pages]
        # rows up to which a write is one Triton kernel for both pools (runtime.kv_write): a decode
        # step's; under the interpreter (CPU tests) only small steps, whose programs it runs one by one
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        self._fused_rows = _kv_write().MAX_ROWS if self.device.type == "cuda" else 32 if interp else 0
        # rows up to which a longer write (a prefill's) is the masked token kernel, which skips the
        # rows aimed at the scratch page (runtime.kv_write); under the interpreter small ones only
        self._token_rows = 1 << 62 if self.device.type == "cuda" else 8192 if interp else 0
        if self.quantized:
            self._qparams = torch.zeros(4, num_pages + 1, head_dim, dtype=torch.float32, device=self.device)
            self.k_scale, self.k_bias, self.v_scale, self.v_bias = self._qparams
        # 'topk ... by bound' heads: per page, the channel-wise min ([0]) and max ([1]) of its keys
        # (float32, from the keys as written, before any INT8 rounding), kept at each write; decode
        # scores a page by the q.k upper bound they give (s2dsl.runtime.topk_state)
        self.key_bounds = None
        if any(t.by == "bound" for s in pattern.head_specs if not s.dense for t in s.topk):
            self.key_bounds = torch.zeros(2, num_pages + 1, head_dim, dtype=torch.float32, device=self.device)

    @property
    def shared(self) -> bool:
        """Whether other caches (layers) plan their steps with this cache's page table."""
        return self.table.members > 1

    @property
    def evicts_after_step(self) -> bool:
        """Does ``cached_attention`` evict right after a step (else the next step's plan does)?"""
        t = self.table
        return not (t.members > 1 or t.defer_eviction or t.in_static_step)

    @property
    def block_tables(self) -> torch.Tensor:
        """int32 (slots, kv_heads, max_blocks): page of each kv block, -1 where none."""
        return self.table.tables

    @property
    def lookahead(self) -> int:
        return self.table.lookahead

    # ------------------------------------------------------------------ sequences
    def add_sequence(self, seq_id: Optional[Hashable] = None) -> Hashable:
        """Start an empty sequence; returns its id."""
        return self.table.add_sequence(seq_id)

    def remove_sequence(self, seq_id: Hashable) -> None:
        """Drop a finished sequence; its pages return to the pool."""
        self.table.remove_sequence(seq_id)

    @property
    def sequences(self) -> Tuple[Hashable, ...]:
        return tuple(self.table._seqs)

    def __contains__(self, seq_id) -> bool:
        try:
            return seq_id in self.table._seqs
        except TypeError:
            return False

    def seq_len(self, seq_id: Hashable) -> int:
        return self.table.get(seq_id).length

    def slot(self, seq_id: Hashable) -> int:
        return self.table.get(seq_id).slot

    # ------------------------------------------------------------------ accounting (reads the device)
    @property
    def num_free_pages(self) -> int:
        return int(self.table.n_free)

    @property
    def free_pages(self) -> Tuple[int, ...]:
        """Ids of the pages in the pool (not held by any sequence)."""
        return tuple(self.table.free_stack[:int(self.table.n_free)].tolist())

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - self.num_free_pages

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of K plus its page of V (with their scales and biases when INT8)."""
        qbytes = 2 * 2 * self.head_dim * 4 if self.quantized else 0
        return 2 * self.block * self.head_dim * self.k_pages.element_size() + qbytes

    def memory_bytes(self) -> int:
        """K/V bytes of the pages in use."""
        return self.pages_in_use * self.page_bytes

    def kept_blocks(self, seq_id: Hashable, kv_head: Optional[int] = None):
        """Kv block indices held for ``seq_id`` (for one kv head, or a list per kv head)."""
        seq = self.table.get(seq_id)
        rows = self.table.tables[seq.slot].tolist()
        per = [[j for j, p in enumerate(row) if p >= 0] for row in rows]
        return per if kv_head is None else per[kv_head]

    def pages_of(self, seq_id: Hashable) -> List[List[int]]:
        """Per kv head, the page of each block of ``seq_id`` (-1: not held)."""
        seq = self.table.get(seq_id)
        n = -(-seq.length // self.block)
        return [row[:n] for row in self.table.tables[seq.slot].tolist()]

    def needed_blocks(self, seq_id: Hashable, kv_head: int, length: Optional[int] = None) -> List[int]:
        """The blocks the pattern still needs after ``length`` tokens (default: the current length)."""
        n = self.table.get(seq_id).length if length is None else length
        j = torch.arange(-(-n // self.block), device=self.device).view(1, 1, -1)
        i = torch.full((1, 1, 1), n // self.block, dtype=torch.long, device=self.device)
        keep = self.table.rules.needed(i, j)[0, kv_head]
        return [int(x) for x in torch.nonzero(keep).view(-1).tolist()]

    # ------------------------------------------------------------------ writing
    def append(self, seq_ids: Sequence[Hashable], k: torch.Tensor, v: torch.Tensor, *,
               only_needed: bool = False, lengths=None, left_padding=None) -> StepPlan:
        """Write ``k, v`` (batch, kv_heads, n, head_dim) as the next tokens of each sequence.

        Raises ``OutOfPagesError`` before writing anything when the pool lacks the pages.
        ``only_needed`` skips the blocks the pattern will not need after these tokens (use it
        when the attention over them was computed from the contiguous tensors, e.g. a first
        prefill): a long prompt then never holds more than the pattern needs. Padded rows:
        ``lengths`` real tokens per row (right padding), starting at ``left_padding``.
        Returns the step's plan.
        """
        self._check_write(seq_ids, k, v)
        counts, offsets = padding_counts(k.shape[0], k.shape[2], lengths, left_padding)
        plan = self.table.plan_step(seq_ids, k.shape[2], consumer=self, counts=counts, offsets=offsets,
                                    only_needed=only_needed)
        self.write(plan, k, v)
        return plan

    def write(self, plan: StepPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter this layer's ``k, v`` for a planned step: one indexed copy per pool, no
        autograd history (the pools never join the graph of the tensors written)."""
        if plan.n == 0 or plan.dest.numel() == 0:
            return
        d = self.head_dim
        dest = plan.dest
        if self.key_bounds is not None:  # detaches its own keys
            self._write_bounds(dest, k)
        if self.quantized:
            with torch.no_grad():
                self._write_int8(plan, dest, k, v)
            return
        if (self._fused_rows < dest.numel() <= self._token_rows and k.stride(3) == 1 and v.stride(3) == 1
                and k.is_floating_point() and v.is_floating_point()):
            # a prefill's rows: one launch for both pools, read in place, the skipped blocks' rows
            # (aimed at the scratch page) neither read nor written
            _kv_write().write_kv_tokens(self._k_all.view(-1, d), self._v_all.view(-1, d), k.detach(), v.detach(),
                                        dest, self.num_pages * self.block)
            return
        if k.dtype != self.dtype:  # k, v are on the cache's device (checked)
            k, v = k.to(self.dtype), v.to(self.dtype)
        # detached sources keep the pools out of autograd (cheaper per layer than a no_grad scope)
        k_rows, v_rows = k.detach().reshape(-1, d), v.detach().reshape(-1, d)
        if dest.numel() <= self._fused_rows and k_rows.stride(1) == 1 \
                and v_rows.stride(1) == 1:  # a decode step's few rows: one launch for both pools
            _kv_write().write_kv_rows(self._k_all.view(-1, d), self._v_all.view(-1, d), k_rows, v_rows, dest)
            return
        self._k_all.view(-1, d).index_copy_(0, dest, k_rows)
        self._v_all.view(-1, d).index_copy_(0, dest, v_rows)

    def _write_bounds(self, dest: torch.Tensor, k: torch.Tensor) -> None:
        """Widen each written page's key min / max by its new keys; a page whose first row is written
        starts afresh (its earlier contents were another block's). Device ops only, no sync. A crop
        leaves a page's bounds as wide as before: still bounds, maybe looser."""
        d = self.head_dim
        page = torch.div(dest.to(torch.long), self.block, rounding_mode="floor")
        # pages whose first row is written; the others aim at the spare page (a fixed size: no sync)
        starts = torch.where(dest % self.block == 0, page, self.num_pages)
        kf = k.detach().reshape(-1, d).to(device=self.device, dtype=torch.float32)
        lo, hi = self.key_bounds
        lo.index_fill_(0, starts, float("inf"))
        hi.index_fill_(0, starts, float("-inf"))
        at = page.view(-1, 1).expand(-1, d)
        lo.scatter_reduce_(0, at, kf, reduce="amin")
        hi.scatter_reduce_(0, at, kf, reduce="amax")

    def _write_int8(self, plan: StepPlan, dest: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantise on write, a whole page at a time: each page a write touches is dequantised,
        takes the new tokens at full precision, and is quantised again over the tokens it holds
        (a page's tokens are a prefix, so that is up to the last offset written). A page that
        is written whole (prefill) is quantised once, from the 16-bit values; the last page of
        a decoding sequence is requantised at each token until full. Re-rounding is exact while
        the page's range holds (the old codes come back); when a new token widens a channel's
        range the older tokens of that page and channel pick up at most half a new step more.
        (Chosen over a 16-bit copy of each sequence's last page: no second store to keep in step
        through crops, padding and CUDA graphs; the price is an error bound that grows with the
        widenings of a decoded page, about one step in tests, against half a step.)"""
        d, blk = self.head_dim, self.block
        dest = dest.to(torch.long)
        if plan.n == 1 and write_decode_tokens(self._k_all, self._v_all, self._qparams, k.detach(), v.detach(), dest):
            return  # a decode step: one generated kernel for both pools (the torch ops below, fused)
        page, off = dest // blk, dest % blk
        if plan.n == 1:  # decoding: one token per (sequence, kv head), each in its own page; no sync
            pages, inv = page, torch.arange(page.numel(), device=page.device)
        else:
            pages, inv = torch.unique(page, return_inverse=True)
        valid = torch.zeros(pages.numel(), dtype=torch.long, device=page.device).scatter_reduce_(
            0, inv, off + 1, reduce="amax")
        for codes, sc, bi, new in ((self._k_all, self._qparams[0], self._qparams[1], k),
                                   (self._v_all, self._qparams[2], self._qparams[3], v)):
            cur = dequantize_pages(QuantizedPages(codes[pages], sc[pages], bi[pages]))
            cur[inv, off] = new.detach().to(device=self.device, dtype=torch.float32).reshape(-1, d)
            qp = quantize_pages(cur, valid, check=False)
            codes[pages] = qp.codes
            sc[pages] = qp.scale
            bi[pages] = qp.bias

    def evict(self, seq_ids: Optional[Sequence[Hashable]] = None) -> None:
        """Free the pages the pattern no longer needs (for the next query, ``lookahead`` tokens back)."""
        self.table.evict(self.sequences if seq_ids is None else seq_ids)

    def crop(self, seq_id: Hashable, length: int) -> None:
        """Roll ``seq_id`` back to its first ``length`` tokens (see ``PageTable.crop``)."""
        self.table.crop(seq_id, length)

    # ------------------------------------------------------------------ reading
    def batch(self, seq_ids: Sequence[Hashable]) -> DecodeBatch:
        """Device tensors (slots, lengths) of these sequences for the decode kernel."""
        return self.table.batch(seq_ids)

    def gather(self, seq_id: Hashable) -> Tuple[torch.Tensor, torch.Tensor]:
        """K and V of a sequence as (kv_heads, length, head_dim); blocks not held read as zeros."""
        seq = self.table.get(seq_id)
        n, b = seq.length, self.block
        n_blocks = -(-n // b)
        pages = self.table.tables[seq.slot, :, :n_blocks].to(torch.long)      # (kvh, n_blocks)
        held = (pages >= 0).view(self.kv_heads, n_blocks, 1, 1)
        k, v = self.k_pages[pages.clamp(min=0)], self.v_pages[pages.clamp(min=0)]
        if self.quantized:  # the values the kernel computes with
            p = pages.clamp(min=0)
            k = dequantize_pages(QuantizedPages(k.flatten(0, 1), self.k_scale[p].flatten(0, 1),
                                                self.k_bias[p].flatten(0, 1))).view(k.shape)
            v = dequantize_pages(QuantizedPages(v.flatten(0, 1), self.v_scale[p].flatten(0, 1),
                                                self.v_bias[p].flatten(0, 1))).view(v.shape)
        k = torch.where(held, k, 0).reshape(self.kv_heads, n_blocks * b, self.head_dim)
        v = torch.where(held, v, 0).reshape(self.kv_heads, n_blocks * b, self.head_dim)
        return k[:, :n].to(self.dtype), v[:, :n].to(self.dtype)

    def gather_rows(self, slots: torch.Tensor, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """K and V of the sequences in ``slots`` (int32, batch) as (batch, kv_heads, length,
        head_dim) in the cache's dtype, one gather per pool: blocks not held read as page 0
        (whatever it holds), positions past a sequence's end as whatever its pages hold. For a
        kernel that visits only held blocks (16-bit caches)."""
        if self.quantized:
            raise ValueError("gather_rows reads 16-bit pages; use gather() for an INT8 cache")
        n_blocks = -(-length // self.block)
        pages = self.table.tables[slots.to(torch.long), :, :n_blocks].clamp(min=0).to(torch.long)
        shape = (slots.shape[0], self.kv_heads, n_blocks * self.block, self.head_dim)
        k = self.k_pages[pages].view(shape)[:, :, :length]
        v = self.v_pages[pages].view(shape)[:, :, :length]
        return k, v

    # ------------------------------------------------------------------ internals
    def _check_write(self, seq_ids, k, v) -> None:
        self._check_tensors(len(self.table.seqs(seq_ids)), k, v)

    def _check_tensors(self, n_seqs: int, k, v) -> None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor (batch, kv_heads, n, head_dim)")
        if k.shape != v.shape:
            raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
        if k.shape[0] != n_seqs or k.shape[1] != self.kv_heads or k.shape[3] != self.head_dim:
            raise ValueError(f"k must be ({n_seqs}, {self.kv_heads}, n, {self.head_dim}) for these sequences; "
                             f"got {tuple(k.shape)}")
        if k.device != self.device or v.device != self.device:
            raise ValueError(f"k, v are on {k.device}, {v.device} but the cache is on {self.device}")

    def __repr__(self) -> str:
        return (f"PagedKVCache(pattern={self.pattern.name}, {self.num_pages} pages, "
                f"{len(self.sequences)} sequences, block {self.block}, head_dim {self.head_dim}, {self.dtype})")


def padding_counts(batch: int, n: int, lengths=None, left_padding=None):
    """Real tokens per row and their first row index, as host tuples (None, None: no padding).

    ``lengths``: real tokens of each row (right padding); ``left_padding``: pad tokens before
    them. Either may be an int sequence or a tensor (read once)."""
    if lengths is None and left_padding is None:
        return None, None

    def as_tuple(x, name):
        if isinstance(x, torch.Tensor):
            x = x.tolist()
        x = tuple(int(v) for v in x)
        if len(x) != batch:
            raise ValueError(f"{name} has {len(x)} entries for a batch of {batch}")
        if any(v < 0 or v > n for v in x):
            raise ValueError(f"{name} must lie in [0, {n}] (the step's tokens per row), got {list(x)}")
        return x

    offsets = as_tuple(left_padding, "left_padding") if left_padding is not None else (0,) * batch
    if lengths is None:
        counts = tuple(n - o for o in offsets)
    else:
        counts = as_tuple(lengths, "lengths")
        if any(o + c > n for o, c in zip(offsets, counts)):
            raise ValueError(f"left_padding + lengths exceed the {n} tokens of a row")
    return counts, offsets
