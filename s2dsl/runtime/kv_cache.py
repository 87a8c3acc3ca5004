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
that the pool has the pages first and raises ``OutOfPagesError`` before changing anything.
``attend`` (``s2dsl.runtime.decode.cached_attention``) appends, attends with the generated
kernels and evicts in one call: prefill, chunked prefill, decoding, speculative decoding.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

import torch

from ..pattern import Pattern

__all__ = ["PagedKVCache", "OutOfPagesError", "dense_pattern", "GroupRule"]

_EFFICIENT: Dict[str, Tuple[bool, ...]] = {}


class OutOfPagesError(RuntimeError):
    """The pool has too few free pages for a write; nothing was changed."""


def dense_pattern(heads: int, kv_heads: int, block: int = 64, name: str = "full_attention") -> Pattern:
    """Full causal attention as a pattern (for dense layers sharing the paged cache)."""
    from ..frontend import parse
    text = f"pattern {name} {{ block = {block} heads = {heads} kv_heads = {kv_heads} causal heads * {{ dense }} }}"
    return parse(text, f"<{name}>")[name]


def _kv_efficient_heads(pattern: Pattern) -> Tuple[bool, ...]:
    """Per q head, the analyzer's KV-efficiency verdict (cached per pattern semantics)."""
    key = pattern.fingerprint()
    if key not in _EFFICIENT:
        from ..analysis import analyze
        _EFFICIENT[key] = tuple(h.kv_efficient for h in analyze(pattern).heads)
    return _EFFICIENT[key]


@dataclass(frozen=True)
class GroupRule:
    """What one kv head keeps: the union of its q heads' static parts, or everything."""

    window: int                      # largest window; -1: keep every block (dense or not KV-efficient)
    sink: int
    residues: Tuple[Tuple[int, int], ...]  # (modulus, residue) classes kept forever

    @property
    def keeps_all(self) -> bool:
        return self.window < 0

    def special(self, j: int) -> bool:
        """Kept by every later query (sink or residue class)."""
        return j < self.sink or any(j % m == r for m, r in self.residues)

    def needed(self, i: int, j: int) -> bool:
        """Is block ``j`` still needed when the next query lies in block ``i``?"""
        return self.keeps_all or j >= i or i - j < self.window or self.special(j)

    def evict_below(self, i: int) -> int:
        """Blocks below this index are needed only if special (``lo`` of the decode kernel)."""
        return i - max(self.window, 1) + 1


def _group_rules(pattern: Pattern, efficient: Sequence[bool]) -> Tuple[GroupRule, ...]:
    rules = []
    g = pattern.group_size
    for kv in range(pattern.kv_heads):
        members = range(kv * g, (kv + 1) * g)
        specs = [pattern.head_specs[h] for h in members]
        # round-2 constructs (token edges, global rows, two-sided windows) have no eviction
        # rule here yet: keep everything rather than drop a block they need
        if not all(efficient[h] for h in members) or any(s.dense or not s.is_classic for s in specs):
            rules.append(GroupRule(-1, 0, ()))
            continue
        residues = tuple(sorted({res for s in specs for res in s.residues}))
        rules.append(GroupRule(max(s.window for s in specs), max(s.sink for s in specs), residues))
    return tuple(rules)


class _Seq:
    __slots__ = ("slot", "length", "pages", "checked")

    def __init__(self, slot: int, kv_heads: int):
        self.slot = slot
        self.length = 0
        self.pages: List[List[int]] = [[] for _ in range(kv_heads)]  # per kv head: block -> page (-1: none)
        self.checked = [0] * kv_heads  # per kv head: blocks below were already considered for eviction


class PagedKVCache:
    """Paged K/V for one attention layer under ``pattern`` (see the module docstring).

    ``num_pages`` pages of ``pattern.block`` tokens of one kv head each. ``evict=False``
    keeps every page (a dense cache, for comparison). Sequence ids are any hashable
    values; ``add_sequence()`` makes a fresh integer id when none is given.
    """

    def __init__(self, pattern: Pattern, *, num_pages: int, head_dim: int, dtype: torch.dtype = torch.float16,
                 device="cpu", max_seqs: int = 8, evict: bool = True):
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be an s2dsl.Pattern, got {type(pattern).__name__}")
        if not pattern.causal:
            raise ValueError(f"pattern {pattern.name} is bidirectional: a KV cache serves causal (autoregressive) "
                             "attention")
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.pattern = pattern
        self.block = pattern.block
        self.kv_heads = pattern.kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        # the pools' own device, index included ("cuda" becomes "cuda:0"), so it compares
        # equal to the device of tensors on it
        self.device = torch.empty(0, device=device).device
        self.num_pages = num_pages
        efficient = _kv_efficient_heads(pattern)
        self.rules = _group_rules(pattern, efficient if evict else [False] * pattern.heads)
        if evict and not all(efficient):
            keep_all = [kv for kv, r in enumerate(self.rules) if r.keeps_all
                        and not all(pattern.head_specs[h].dense for h in range(kv * pattern.group_size,
                                                                                  (kv + 1) * pattern.group_size))]
            bad = [h for h, e in enumerate(efficient) if not e]
            warnings.warn(f"pattern {pattern.name}: q heads {bad} are not KV-efficient (the analyzer cannot prove a "
                          f"dropped block is never needed again), so kv heads {keep_all} keep every page",
                          stacklevel=2)
        # zero pages: masked lanes of the kernels multiply stale page contents by 0, which must be finite
        self.k_pages = torch.zeros(num_pages, self.block, head_dim, dtype=dtype, device=self.device)
        self.v_pages = torch.zeros(num_pages, self.block, head_dim, dtype=dtype, device=self.device)
        self.block_tables = torch.full((max(max_seqs, 1), self.kv_heads, 16), -1, dtype=torch.int32,
                                       device=self.device)
        self._free: List[int] = list(range(num_pages - 1, -1, -1))  # a stack: low pages first
        self._free_slots: List[int] = list(range(self.block_tables.shape[0] - 1, -1, -1))
        self._seqs: Dict[Hashable, _Seq] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ sequences
    def add_sequence(self, seq_id: Optional[Hashable] = None) -> Hashable:
        """Start an empty sequence; returns its id."""
        if seq_id is None:
            seq_id = next(self._ids)
            while seq_id in self._seqs:
                seq_id = next(self._ids)
        elif seq_id in self._seqs:
            raise KeyError(f"sequence {seq_id!r} is already in the cache")
        if not self._free_slots:
            self._grow_slots()
        self._seqs[seq_id] = _Seq(self._free_slots.pop(), self.kv_heads)
        return seq_id

    def remove_sequence(self, seq_id: Hashable) -> None:
        """Drop a finished sequence; its pages return to the pool."""
        seq = self._get(seq_id)
        for pages in seq.pages:
            self._free.extend(p for p in pages if p >= 0)
        self.block_tables[seq.slot].fill_(-1)
        self._free_slots.append(seq.slot)
        del self._seqs[seq_id]

    @property
    def sequences(self) -> Tuple[Hashable, ...]:
        return tuple(self._seqs)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def seq_len(self, seq_id: Hashable) -> int:
        return self._get(seq_id).length

    def slot(self, seq_id: Hashable) -> int:
        return self._get(seq_id).slot

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def free_pages(self) -> Tuple[int, ...]:
        """Ids of the pages in the pool (not held by any sequence)."""
        return tuple(self._free)

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of K plus its page of V."""
        return 2 * self.block * self.head_dim * self.k_pages.element_size()

    def memory_bytes(self) -> int:
        """K/V bytes of the pages in use."""
        return self.pages_in_use * self.page_bytes

    def kept_blocks(self, seq_id: Hashable, kv_head: Optional[int] = None):
        """Kv block indices held for ``seq_id`` (for one kv head, or a list per kv head)."""
        seq = self._get(seq_id)
        per = [[j for j, p in enumerate(pages) if p >= 0] for pages in seq.pages]
        return per if kv_head is None else per[kv_head]

    def needed_blocks(self, seq_id: Hashable, kv_head: int, length: Optional[int] = None) -> List[int]:
        """The blocks the pattern still needs after ``length`` tokens (default: the current length)."""
        n = self._get(seq_id).length if length is None else length
        i = n // self.block
        rule = self.rules[kv_head]
        return [j for j in range(-(-n // self.block)) if rule.needed(i, j)]

    # ------------------------------------------------------------------ writing
    def append(self, seq_ids: Sequence[Hashable], k: torch.Tensor, v: torch.Tensor, *,
               only_needed: bool = False) -> None:
        """Write ``k, v`` (batch, kv_heads, n, head_dim) as the next ``n`` tokens of each sequence.

        Raises ``OutOfPagesError`` before changing anything when the pool lacks the pages.
        ``only_needed`` skips the blocks the pattern will not need after these tokens (use it
        when the attention over them was computed from the contiguous tensors, e.g. a first
        prefill): a long prompt then never holds more than the pattern needs.
        """
        seqs = self._check_write(seq_ids, k, v)
        n = k.shape[2]
        if n == 0:
            return
        b = self.block
        plan = []  # per sequence: (first touched block, [per kv head: blocks to allocate])
        total = 0
        for seq in seqs:
            first, last = seq.length // b, (seq.length + n - 1) // b
            i_next = (seq.length + n) // b
            alloc = []
            for g, pages in enumerate(seq.pages):
                rule = self.rules[g]
                want = [j for j in range(first, last + 1)
                        if (j >= len(pages) or pages[j] < 0) and (not only_needed or rule.needed(i_next, j))]
                alloc.append(want)
                total += len(want)
            plan.append((first, last, alloc))
        if total > len(self._free):
            raise OutOfPagesError(
                f"writing {n} token(s) to {len(seqs)} sequence(s) needs {total} free pages but the pool has "
                f"{len(self._free)} of {self.num_pages} (pages of {b} tokens of one kv head); nothing was written. "
                "Finish or remove sequences, or make the cache with more num_pages")
        width = max(last for _, last, _ in plan) + 1
        if width > self.block_tables.shape[2]:
            self._grow_blocks(width)
        # ---- from here on the state changes ----
        upd_slot, upd_head, upd_block, upd_page = [], [], [], []
        touched = []  # (batch, kv_heads, blocks touched) page ids
        span = max(last - first for first, last, _ in plan) + 1
        for seq, (first, last, alloc) in zip(seqs, plan):
            rows = []
            for g, pages in enumerate(seq.pages):
                if len(pages) <= last:
                    pages.extend([-1] * (last + 1 - len(pages)))
                for j in alloc[g]:
                    page = self._free.pop()
                    pages[j] = page
                    upd_slot.append(seq.slot)
                    upd_head.append(g)
                    upd_block.append(j)
                    upd_page.append(page)
                rows.append(pages[first:last + 1] + [-1] * (span - (last + 1 - first)))
            touched.append(rows)
        if upd_page:
            idx = torch.tensor([upd_slot, upd_head, upd_block], dtype=torch.long).to(self.device)
            self.block_tables[idx[0], idx[1], idx[2]] = torch.tensor(upd_page, dtype=torch.int32).to(self.device)
        # token writes: page of (sequence, kv head, token) and offset in the page
        starts = [seq.length for seq in seqs]
        pos = torch.tensor(starts, dtype=torch.long).view(-1, 1) + torch.arange(n).view(1, -1)   # (batch, n)
        rel = pos // b - torch.tensor([s // b for s in starts], dtype=torch.long).view(-1, 1)
        table = torch.tensor(touched, dtype=torch.long)                                           # (batch, kvh, span)
        page_ids = table.gather(2, rel.unsqueeze(1).expand(-1, self.kv_heads, -1))               # (batch, kvh, n)
        offs = (pos % b).unsqueeze(1).expand(-1, self.kv_heads, -1)
        kk, vv = k.to(self.dtype), v.to(self.dtype)
        if bool((page_ids < 0).any()):  # only_needed skipped some blocks
            keep = page_ids >= 0
            page_ids, offs = page_ids[keep], offs[keep]
            kk, vv = kk[keep.to(k.device)], vv[keep.to(k.device)]
        else:
            page_ids, offs = page_ids.reshape(-1), offs.reshape(-1)
            kk, vv = kk.reshape(-1, self.head_dim), vv.reshape(-1, self.head_dim)
        page_ids, offs = page_ids.to(self.device), offs.to(self.device)
        self.k_pages[page_ids, offs] = kk
        self.v_pages[page_ids, offs] = vv
        for seq in seqs:
            seq.length += n

    def evict(self, seq_ids: Optional[Iterable[Hashable]] = None) -> int:
        """Free the pages the pattern no longer needs (for the next query); returns how many."""
        seqs = [self._get(s) for s in (self._seqs if seq_ids is None else seq_ids)]
        upd_slot, upd_head, upd_block = [], [], []
        freed = 0
        for seq in seqs:
            i = seq.length // self.block
            for g, pages in enumerate(seq.pages):
                rule = self.rules[g]
                if rule.keeps_all:
                    continue
                stop = min(rule.evict_below(i), len(pages))
                for j in range(seq.checked[g], stop):
                    if pages[j] >= 0 and not rule.special(j):
                        self._free.append(pages[j])
                        pages[j] = -1
                        upd_slot.append(seq.slot)
                        upd_head.append(g)
                        upd_block.append(j)
                        freed += 1
                seq.checked[g] = max(seq.checked[g], stop)
        if upd_slot:
            idx = torch.tensor([upd_slot, upd_head, upd_block], dtype=torch.long).to(self.device)
            self.block_tables[idx[0], idx[1], idx[2]] = -1
        return freed

    # ------------------------------------------------------------------ reading
    def batch(self, seq_ids: Sequence[Hashable]) -> "DecodeBatch":
        """Device tensors (slots, lengths) of these sequences for the decode kernel."""
        seqs = [self._get(s) for s in seq_ids]
        return DecodeBatch(tuple(seq_ids),
                           torch.tensor([s.slot for s in seqs], dtype=torch.int32).to(self.device),
                           torch.tensor([s.length for s in seqs], dtype=torch.int32).to(self.device),
                           max((s.length for s in seqs), default=0), min((s.length for s in seqs), default=0))

    def gather(self, seq_id: Hashable) -> Tuple[torch.Tensor, torch.Tensor]:
        """K and V of a sequence as (kv_heads, length, head_dim); blocks not held read as zeros."""
        seq = self._get(seq_id)
        n = seq.length
        k = torch.zeros(self.kv_heads, n, self.head_dim, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        for g, pages in enumerate(seq.pages):
            for j, p in enumerate(pages):
                if p >= 0:
                    lo, hi = j * self.block, min((j + 1) * self.block, n)
                    k[g, lo:hi] = self.k_pages[p, :hi - lo]
                    v[g, lo:hi] = self.v_pages[p, :hi - lo]
        return k, v

    def attend(self, seq_ids: Sequence[Hashable], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: Optional[float] = None, **kwargs) -> torch.Tensor:
        """Append ``k, v`` and attend with ``q`` (batch, heads, n, dim); see ``cached_attention``."""
        from .decode import cached_attention
        return cached_attention(self, seq_ids, q, k, v, scale=scale, **kwargs)

    # ------------------------------------------------------------------ internals
    def _get(self, seq_id) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"no sequence {seq_id!r} in the cache (add it with add_sequence)") from None

    def _check_write(self, seq_ids, k, v) -> List[_Seq]:
        seq_ids = list(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"sequence ids repeat in {seq_ids}")
        seqs = [self._get(s) for s in seq_ids]
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor (batch, kv_heads, n, head_dim)")
        if k.shape != v.shape:
            raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
        if k.shape[0] != len(seqs) or k.shape[1] != self.kv_heads or k.shape[3] != self.head_dim:
            raise ValueError(f"k must be ({len(seqs)}, {self.kv_heads}, n, {self.head_dim}) for these sequences; "
                             f"got {tuple(k.shape)}")
        return seqs

    def _grow_slots(self):
        old = self.block_tables
        new = torch.full((old.shape[0] * 2, *old.shape[1:]), -1, dtype=torch.int32, device=self.device)
        new[:old.shape[0]] = old
        self._free_slots.extend(range(new.shape[0] - 1, old.shape[0] - 1, -1))
        self.block_tables = new

    def _grow_blocks(self, width: int):
        old = self.block_tables
        cap = old.shape[2]
        while cap < width:
            cap *= 2
        new = torch.full((old.shape[0], old.shape[1], cap), -1, dtype=torch.int32, device=self.device)
        new[:, :, :old.shape[2]] = old
        self.block_tables = new

    def __repr__(self) -> str:
        return (f"PagedKVCache(pattern={self.pattern.name}, pages {self.pages_in_use}/{self.num_pages} in use, "
                f"{len(self._seqs)} sequences, block {self.block}, head_dim {self.head_dim}, {self.dtype})")


@dataclass(frozen=True)
class DecodeBatch:
    """Which sequences a decode step runs, as the kernel reads them."""

    seq_ids: Tuple[Hashable, ...]
    slots: torch.Tensor      # int32 (batch,)
    seq_lens: torch.Tensor   # int32 (batch,): lengths including this step's tokens
    max_len: int
    min_len: int
