"""Page bookkeeping of the paged KV cache as tensor operations on the cache's device.

A ``PageTable`` owns, for one pattern, everything but the K/V pools: the page tables
(sequence slot, kv head, kv block) -> page, the sequences' lengths, and a stack of free
pages, all device tensors. Several ``PagedKVCache`` (one per layer, each with its own
pools) can share one table when their layers have the same pattern: a step is *planned*
once (``StepPlan``: which pages to free, which to take, where every new token goes) by the
first layer that writes, and every other layer of the step reuses the plan and only
scatters its own K/V (vLLM / FlashInfer's plan-once-per-step).

A plan is a fixed sequence of tensor ops whose shapes depend only on the batch size and
the number of new tokens; the host keeps plain integers per sequence (length, how far
eviction has gone) to size those ops and to check the pool before anything changes. The
host reads the device (one sync) only when a write might not fit in the free pages it
knows of, and once for a first prefill (how many of its blocks the pattern keeps).

What a kv head keeps (``KeepRules``) is the union of its q heads' static parts, from
``HeadSpec``'s arithmetic: its window, its sinks, its residue classes; a kv head with a
dense q head or one the analyzer cannot prove KV-efficient keeps everything. Eviction of a
block is final (the pattern is KV-efficient), so to allow rolling back the last tokens of a
sequence (rejected speculative tokens), eviction runs ``lookahead`` tokens behind the
sequence's end: a crop of up to that many tokens finds every page the new end needs.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from ..pattern import Pattern

__all__ = ["KeepRules", "PageTable", "DecodeBatch", "StepPlan", "OutOfPagesError", "kv_efficient_heads"]

_EFFICIENT: Dict[str, Tuple[bool, ...]] = {}


class OutOfPagesError(RuntimeError):
    """The pool has too few free pages for a write; nothing was written."""


def kv_efficient_heads(pattern: Pattern) -> Tuple[bool, ...]:
    """Per q head, the analyzer's KV-efficiency verdict (cached per pattern semantics)."""
    key = pattern.fingerprint()
    if key not in _EFFICIENT:
        from ..analysis import analyze
        _EFFICIENT[key] = tuple(h.kv_efficient for h in analyze(pattern).heads)
    return _EFFICIENT[key]


class KeepRules:
    """Per kv head, which kv blocks a sequence must still hold, evaluated on tensors.

    Block ``j`` is still needed when the next query lies in block ``i`` iff the kv head keeps
    everything, or ``j >= i``, or ``i - j < window``, or ``j`` is special (a sink or in a
    residue class: kept by every later query). Built from the q heads' ``HeadSpec`` in
    ``_union`` alone, so a new pattern component adds its term there.
    """

    def __init__(self, pattern: Pattern, efficient: Sequence[bool], device):
        self.block = pattern.block
        window, sink, global_rows, keep_all, residues = self._union(pattern, efficient)
        width = max(max((len(r) for r in residues), default=0), 1)
        # (modulus, residue) pairs padded with (1, 1), which no block satisfies
        mods = [[m for m, _ in r] + [1] * (width - len(r)) for r in residues]
        rems = [[x for _, x in r] + [1] * (width - len(r)) for r in residues]
        self.keep_all_list = keep_all
        self.global_rows_list = global_rows
        self.window = torch.tensor(window, dtype=torch.long, device=device).view(1, -1, 1)
        self.sink = torch.tensor(sink, dtype=torch.long, device=device).view(1, -1, 1)
        self.keep_all = torch.tensor(keep_all, dtype=torch.bool, device=device).view(1, -1, 1)
        self.global_rows = torch.tensor(global_rows, dtype=torch.long, device=device).view(1, -1, 1)
        self.mods = torch.tensor(mods, dtype=torch.long, device=device).view(1, len(mods), 1, width)
        self.rems = torch.tensor(rems, dtype=torch.long, device=device).view(1, len(mods), 1, width)

    @staticmethod
    def _union(pattern: Pattern, efficient: Sequence[bool]):
        """Per kv head: (window, sink, global rows) in blocks, keeps everything, residue classes.
        Token-granular edges count as the blocks they touch; a relative stride keeps a block on
        and off as the query moves, so its kv head keeps everything."""
        g = pattern.group_size
        window, sink, global_rows, keep_all, residues = [], [], [], [], []
        for kv in range(pattern.kv_heads):
            specs = [pattern.head_specs[h] for h in range(kv * g, (kv + 1) * g)]
            hulls = [s.blocks_touched(pattern.block) if hasattr(s, "blocks_touched") else (s.window, 0, s.sink)
                     for s in specs]
            if (not all(efficient[h] for h in range(kv * g, (kv + 1) * g)) or any(s.dense for s in specs)
                    or any(getattr(s, "relative", ()) for s in specs)):
                window.append(0), sink.append(0), global_rows.append(0), keep_all.append(True), residues.append(())
                continue
            window.append(max(w for w, _, _ in hulls))
            sink.append(max(snk for _, _, snk in hulls))
            # a query block holding prefix positions sees the whole prefix (prefix-LM): a global row
            global_rows.append(max([getattr(s, "global_rows", 0) for s in specs] + [-(-pattern.prefix // pattern.block)]))
            keep_all.append(False)
            residues.append(tuple(sorted({r for s in specs for r in s.residues})))
        return window, sink, global_rows, keep_all, residues

    def special(self, j: torch.Tensor) -> torch.Tensor:
        """``j``: (batch, kv_heads or 1, n) block indices -> kept by every later query."""
        res = ((j.unsqueeze(-1) % self.mods) == self.rems).any(-1)
        return (j < self.sink) | res

    def needed(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """``i``: query block (batch, 1, 1); ``j``: (batch, kv_heads or 1, n) -> still needed."""
        return self.keep_all | (j >= i) | (i - j < self.window) | (i < self.global_rows) | self.special(j)

    def evict_below(self, i: torch.Tensor) -> torch.Tensor:
        """Blocks below this (per kv head) are needed only if special (nothing below the global rows)."""
        return torch.where(i < self.global_rows, 0, i - self.window.clamp(min=1) + 1)

    def count_needed(self, length: int, lookahead: int = 0) -> List[int]:
        """Per kv head, the blocks a sequence of ``length`` tokens holds once eviction has run
        ``lookahead`` tokens behind its end: exactly what a first prefill of ``length`` tokens
        keeps (``PageTable._plan`` with ``only_needed``). The one count every pool sizing uses
        (host tier, ``hf.pages_needed``); host-side, no device read."""
        n_blocks = -(-length // self.block)
        j = torch.arange(n_blocks, device=self.window.device).view(1, 1, -1)
        i = torch.full((1, 1, 1), max(length - lookahead, 0) // self.block, dtype=torch.long,
                       device=self.window.device)
        return self.needed(i, j).sum(-1).view(-1).tolist()


@dataclass
class DecodeBatch:
    """Which sequences a decode step runs, as the kernel reads them."""

    seq_ids: Tuple[Hashable, ...]
    slots: torch.Tensor      # int32 (batch,)
    seq_lens: torch.Tensor   # int32 (batch,): lengths including this step's tokens
    max_len: int
    min_len: int


@dataclass
class StepPlan(DecodeBatch):
    """One step of a set of sequences, planned once and shared by every layer of a pattern.

    ``dest``: per new token and kv head, its row in the pools viewed as (pages * block, dim),
    (batch * kv_heads * n,) int64, padding and skipped tokens going to a scratch page.
    ``starts``/``counts``: host lengths before the step and real new tokens per sequence;
    ``offsets``: first real token of each row of the step's tensors (left padding).
    """

    n: int = 0
    dest: Optional[torch.Tensor] = None
    starts: Tuple[int, ...] = ()
    counts: Tuple[int, ...] = ()
    offsets: Tuple[int, ...] = ()
    only_needed: bool = False
    consumers: set = field(default_factory=set)

    @property
    def padded(self) -> bool:
        return any(c != self.n for c in self.counts)

    @property
    def ragged(self) -> bool:
        """Some row's real tokens are fewer than the step's or start after left padding."""
        return self.padded or any(self.offsets)


class _Seq:
    __slots__ = ("slot", "length", "evicted_at")

    def __init__(self, slot: int):
        self.slot = slot
        self.length = 0
        self.evicted_at = 0  # eviction ran for queries from this position on


class PageTable:
    """Page tables, lengths and free pages of the sequences of one pattern (see the module docstring)."""

    def __init__(self, pattern: Pattern, *, num_pages: int, device, max_seqs: int = 8, evict: bool = True,
                 lookahead: int = 0):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        if num_pages >= 2 ** 31 - 1:
            raise ValueError(f"num_pages={num_pages} does not fit the int32 page tables")
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0 tokens, got {lookahead}")
        self.pattern = pattern
        self.block = pattern.block
        self.kv_heads = pattern.kv_heads
        self.device = torch.empty(0, device=device).device
        self.num_pages = num_pages
        self.lookahead = lookahead
        self.efficient = kv_efficient_heads(pattern) if evict else (False,) * pattern.heads
        self.rules = KeepRules(pattern, self.efficient, self.device)
        self._host_rules = KeepRules(pattern, self.efficient, "cpu")  # sizes a first write without a sync
        self.can_evict = not all(self.rules.keep_all_list)
        self._global_blocks = max(self.rules.global_rows_list, default=0)
        # free pages: a stack, its top at n_free - 1; one spare entry takes the writes of no page
        self.free_stack = torch.arange(num_pages, -1, -1, dtype=torch.int32, device=self.device)
        self.free_stack[:num_pages] = torch.arange(num_pages - 1, -1, -1, dtype=torch.int32, device=self.device)
        self.n_free = torch.full((), num_pages, dtype=torch.long, device=self.device)
        self._free_known = num_pages  # a lower bound of n_free the host knows without reading it
        self._alloc_tables(max(max_seqs, 1), 16)
        self.lens = torch.zeros(self.tables.shape[0], dtype=torch.int32, device=self.device)
        self._free_slots: List[int] = list(range(self.tables.shape[0] - 1, -1, -1))
        self._seqs: Dict[Hashable, _Seq] = {}
        self._seqs_memo = None  # (tuple of ids, their _Seq): see seqs()
        self._ids = itertools.count()
        self._slot_cache: Dict[Tuple[int, ...], torch.Tensor] = {}
        self.plan: Optional[StepPlan] = None
        self.members = 0  # caches (layers) sharing this table
        # evict in the next step's plan, not right after a step: set when layers share the
        # table (a later layer of the step still reads the pages), and by callers that may crop
        # the last step back (assisted decoding)
        self.defer_eviction = False
        self.static_max_len = 0  # > 0: tables fixed, for static steps (CUDA graphs hold them)
        self.in_static_step = False  # between prepare_static and commit_static: plan by device ops alone
        self._static_fn = None  # compile_static: the static plan's device ops compiled
        self.tier = None  # an ALISA host tier (s2dsl.runtime.host_tier): readies the pages before each plan

    # ------------------------------------------------------------------ storage
    def _alloc_tables(self, slots: int, width: int):
        # a multiple of 16 blocks: the decode kernel's table strides stay divisible by 16, which
        # Triton specialises integer arguments on, so growing the tables never recompiles it (a
        # lone layer's call at 32K measured 104x its kernel: a recompile when the width doubled)
        width = -(-width // 16) * 16
        # one spare element after the tables takes the writes of masked-out lanes
        self._tables_flat = torch.full((slots * self.kv_heads * width + 1,), -1, dtype=torch.int32,
                                       device=self.device)
        self.tables = self._tables_flat[:-1].view(slots, self.kv_heads, width)

    def _resize(self, slots: int, width: int):
        if self.static_max_len:
            raise RuntimeError(f"the page tables are fixed while static decode steps are enabled (a CUDA graph holds "
                               f"them; max_length={self.static_max_len}): close the DecodeGraph first, or enable "
                               "static steps with a larger max_length")
        old = self.tables
        self._alloc_tables(slots, width)
        self.tables[:old.shape[0], :, :old.shape[2]] = old
        if slots > self.lens.shape[0]:
            lens = torch.zeros(slots, dtype=torch.int32, device=self.device)
            lens[:self.lens.shape[0]] = self.lens
            self.lens = lens
        self._slot_cache.clear()

    def reserve(self, slots: int = 0, max_length: int = 0) -> None:
        """Make room for ``slots`` sequences of ``max_length`` tokens now (no growth later:
        static shapes for CUDA graphs)."""
        width = max(-(-max_length // self.block) + 1, self.tables.shape[2])
        slots = max(slots, self.tables.shape[0])
        if (slots, width) != (self.tables.shape[0], self.tables.shape[2]):
            grown = slots - self.tables.shape[0]
            self._resize(slots, width)
            if grown:
                self._free_slots = list(range(slots - 1, slots - grown - 1, -1)) + self._free_slots

    # ------------------------------------------------------------------ sequences
    def add_sequence(self, seq_id: Optional[Hashable] = None) -> Hashable:
        if seq_id is None:
            seq_id = next(self._ids)
            while seq_id in self._seqs:
                seq_id = next(self._ids)
        elif seq_id in self._seqs:
            raise KeyError(f"sequence {seq_id!r} is already in the cache")
        if not self._free_slots:
            self.reserve(slots=2 * self.tables.shape[0])
        slot = self._free_slots.pop()
        self.lens[slot] = 0
        self._seqs[seq_id] = _Seq(slot)
        self.plan = None
        self._seqs_memo = None
        return seq_id

    def remove_sequence(self, seq_id: Hashable) -> None:
        seq = self.get(seq_id)
        if self.static_max_len:
            raise RuntimeError("sequences cannot leave while static decode steps are enabled (a CUDA graph still "
                               "steps them): close the DecodeGraph first")
        row = self.tables[seq.slot].reshape(-1)
        self._push_free(row, row >= 0)
        self.tables[seq.slot] = -1
        self.lens[seq.slot] = 0
        self._free_slots.append(seq.slot)
        del self._seqs[seq_id]
        self.plan = None
        self._seqs_memo = None

    def get(self, seq_id) -> _Seq:
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise KeyError(f"no sequence {seq_id!r} in the cache (add it with add_sequence)") from None

    def seqs(self, seq_ids) -> List[_Seq]:
        """The sequences of ``seq_ids``, checked (a tuple that was asked for last is not checked
        again: every layer of every step asks for the batch's; the answer is read-only)."""
        memo = self._seqs_memo
        if memo is not None and memo[0] is seq_ids:
            return memo[1]
        if isinstance(seq_ids, (str, bytes)) or not isinstance(seq_ids, Sequence) and not hasattr(seq_ids, "__iter__"):
            raise TypeError(f"seq_ids must be a list of sequence ids (one per batch row), got "
                            f"{type(seq_ids).__name__} {seq_ids!r}; for one sequence pass [{seq_ids!r}]")
        orig, seq_ids = seq_ids, list(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"sequence ids repeat in {seq_ids}")
        seqs = [self.get(s) for s in seq_ids]
        if type(orig) is tuple:  # immutable: the same object names the same sequences until one leaves
            self._seqs_memo = (orig, seqs)
        return seqs

    def slots_tensor(self, seqs: Sequence[_Seq]) -> torch.Tensor:
        return self._slots(seqs)[0]

    def _slots(self, seqs: Sequence[_Seq]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sequences' slots as int32 (what the kernels read) and int64 (to index with), and
        the flat table index of each (sequence, kv head)'s block 0, (batch, kv_heads, 1): made
        once per set of slots and table width."""
        key = tuple(s.slot for s in seqs)
        t = self._slot_cache.get(key)
        if t is None:
            if len(self._slot_cache) > 256:
                self._slot_cache.clear()
            t32 = self.to_device(key, torch.int32)
            t64 = t32.to(torch.long)
            _, kvh, width = self.tables.shape
            base = (t64.view(-1, 1, 1) * kvh + torch.arange(kvh, device=self.device).view(1, -1, 1)) * width
            t = self._slot_cache[key] = (t32, t64, base)
        return t

    def to_device(self, values: Sequence[int], dtype=torch.long) -> torch.Tensor:
        """Host integers as a device tensor without a host sync: on CUDA through pinned memory
        with an asynchronous copy (a copy from pageable memory waits for the stream)."""
        t = torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    # ------------------------------------------------------------------ free pages
    def _push_free(self, pages: torch.Tensor, mask: torch.Tensor) -> None:
        """Push ``pages[mask]`` on the free stack (static shapes: masked lanes write the spare entry)."""
        pages, mask = pages.reshape(-1), mask.reshape(-1)
        rank = torch.cumsum(mask.to(torch.long), 0) - 1
        where = torch.where(mask, self.n_free + rank, self.num_pages)
        self.free_stack.scatter_(0, where, pages.to(torch.int32))
        self.n_free += mask.sum()

    def _pop_free(self, mask: torch.Tensor) -> torch.Tensor:
        """One free page per true lane of ``mask`` (any value elsewhere)."""
        flat = mask.reshape(-1)
        rank = torch.cumsum(flat.to(torch.long), 0) - 1
        pages = self.free_stack[(self.n_free - 1 - rank).clamp(min=0)]
        self.n_free -= flat.sum()
        return pages.view(mask.shape)

    def _ensure_free(self, need: int, what: str, freeing=None) -> None:
        """Raise ``OutOfPagesError`` unless ``need`` pages are free, counting the pages the
        pending eviction ``freeing`` (candidates, not applied yet) will return."""
        if need <= self._free_known:
            return
        # the host reads the device only here, when the pool may be short
        self._free_known = int(self.n_free) + (int(freeing[2].sum()) if freeing is not None else 0)
        if need > self._free_known:
            raise OutOfPagesError(
                f"{what} needs {need} free pages but the pool has {self._free_known} of {self.num_pages} (pages of "
                f"{self.block} tokens of one kv head); nothing was changed. Finish or remove sequences, or make the "
                "cache with more num_pages")

    def _table_index(self, slots: torch.Tensor, j: torch.Tensor, ok: Optional[torch.Tensor]) -> torch.Tensor:
        """Flat index of (slot, kv head, block j) in the tables, or the spare entry where not ``ok`` (None: all ok)."""
        _, kvh, width = self.tables.shape
        g = torch.arange(kvh, device=self.device).view(1, -1, 1)
        idx = (slots.view(-1, 1, 1).to(torch.long) * kvh + g) * width + j.clamp(0, width - 1)
        return idx if ok is None else torch.where(ok, idx, self._tables_flat.numel() - 1)

    # ------------------------------------------------------------------ eviction
    def _evict(self, seqs: Sequence[_Seq], slots: torch.Tensor, shift: int) -> None:
        """Free, per (sequence, kv head), the pages not needed by queries from ``shift`` tokens
        before the sequence's end on."""
        at = [max(s.length - shift, 0) for s in seqs]
        self._evict_apply(seqs, at, self._evict_candidates(seqs, slots, at, shift))

    def _evict_candidates(self, seqs, slots, at, shift: int):
        """What eviction at ``at`` (host integers: the lengths less ``shift``) would free, as
        device tensors; nothing changes yet. The host only sizes the scan; the positions come
        from the device lengths, so nothing is copied to the device."""
        # a sequence within a block of its global query rows has evicted nothing yet: scan from block 0
        g_rows = self._global_blocks
        width = max((a // self.block - (s.evicted_at // self.block if s.evicted_at // self.block > g_rows else 0)
                     for s, a in zip(seqs, at)), default=0)
        if not (self.can_evict and width > 0):
            return None
        return self._candidates(slots, self._device_lens(seqs, shift), width)

    def _device_lens(self, seqs, shift: int = 0) -> torch.Tensor:
        """The sequences' lengths less ``shift`` (at least 0), int64 on the device, read from ``lens``."""
        lens = self.lens[self._slots(seqs)[1]].to(torch.long)
        return (lens - shift).clamp(min=0) if shift else lens

    def _evict_apply(self, seqs, at, cand) -> None:
        if cand is not None:
            self._free(cand)
        for s, a in zip(seqs, at):
            s.evicted_at = max(s.evicted_at, a)

    def _candidates(self, slots: torch.Tensor, at: torch.Tensor, width: int):
        """The ``width`` blocks below each kv head's eviction bound at query position ``at``
        (batch,): (table index, page, held and not special). No host sync."""
        rules = self.rules
        stop = rules.evict_below((at // self.block).view(-1, 1, 1))                  # (b, kvh, 1)
        j = stop - width + torch.arange(width, device=self.device).view(1, 1, -1)   # (b, kvh, width)
        cand = (j >= 0) & ~rules.keep_all & ~rules.special(j)
        idx = self._table_index(slots, j, cand)
        cur = self._tables_flat[idx]
        return idx, cur, cand & (cur >= 0)

    def _free(self, cand) -> None:
        """Return the held candidate pages (``_candidates``) to the pool and unmap them."""
        idx, cur, held = cand
        self._push_free(cur, held)
        self._clear(torch.where(held, idx, self._tables_flat.numel() - 1))

    def _clear(self, idx: torch.Tensor) -> None:
        """Unmap the table entries ``idx`` (the spare entry absorbs the lanes that unmap nothing).
        A fill with a scalar argument, not an indexed store of ``-1``: the store would copy a host
        scalar to the device, which a CUDA graph capture refuses."""
        self._tables_flat.index_fill_(0, idx.reshape(-1), -1)

    def evict_tensors(self, slots: torch.Tensor, at: torch.Tensor, width: int) -> None:
        """The device side of eviction at query positions ``at`` (batch,): no host sync."""
        self._free(self._candidates(slots, at, width))

    def evict(self, seq_ids) -> None:
        seqs = self.seqs(seq_ids)
        if seqs:
            self._evict(seqs, self.slots_tensor(seqs), self.lookahead)

    # ------------------------------------------------------------------ planning a step
    def plan_step(self, seq_ids, n: int, *, consumer=None, counts: Optional[Sequence[int]] = None,
                  offsets: Optional[Sequence[int]] = None, only_needed: Optional[bool] = None) -> StepPlan:
        """The plan of writing ``n`` new tokens (rows of the step's tensors) to each sequence.

        Reuses the current plan when ``consumer`` (a layer) has not used it yet and the step is
        the same; otherwise plans (and commits) the next step. ``counts``/``offsets``: real
        tokens per row and where they start (padding); default all ``n`` from 0.
        ``only_needed``: write only the blocks the pattern keeps after the step; None: do so
        for a first prefill (every sequence empty, several tokens).
        """
        if isinstance(seq_ids, (str, bytes)) or not hasattr(seq_ids, "__iter__"):
            self.seqs(seq_ids)  # the error for a bare id
        seq_ids = tuple(seq_ids)
        counts = tuple(int(c) for c in counts) if counts is not None else None
        offsets = tuple(int(o) for o in offsets) if offsets is not None else None
        p = self.plan
        if (p is not None and consumer is not None and consumer not in p.consumers and p.seq_ids == seq_ids
                and p.n == n and (only_needed is None or p.only_needed == only_needed)
                and (counts is None or counts == p.counts) and (offsets is None or offsets == p.offsets)):
            p.consumers.add(consumer)
            return p
        if only_needed is None:
            only_needed = n > 1 and all(self.get(s).length == 0 for s in seq_ids)
        if self.in_static_step and n == 1 and counts is None and offsets is None and not only_needed:
            p = self._plan_static(seq_ids)
        else:
            if self.tier is not None:
                self.tier.prepare(seq_ids, n, only_needed)
            p = self._plan(seq_ids, n, counts, offsets, only_needed)
        self.plan = p
        if consumer is not None:
            p.consumers.add(consumer)
        return p

    def _plan(self, seq_ids, n, counts, offsets, only_needed) -> StepPlan:
        seqs = self.seqs(seq_ids)
        batch = len(seqs)
        counts = counts if counts is not None else (n,) * batch
        offsets = offsets if offsets is not None else (0,) * batch
        if len(counts) != batch or len(offsets) != batch:
            raise ValueError(f"{len(counts)} counts and {len(offsets)} offsets for {batch} sequences")
        for c, o in zip(counts, offsets):
            if c < 0 or o < 0 or o + c > n:
                raise ValueError(f"a row's real tokens [{o}, {o + c}) lie outside its {n} new tokens")
        b = self.block
        starts = tuple(s.length for s in seqs)
        ends = [s + c for s, c in zip(starts, counts)]
        if seqs and max(ends) // b + 2 > self.tables.shape[2]:
            self.reserve(max_length=max(2 * self.tables.shape[2] * b, max(ends) + b))
        slots, slots_l, _ = self._slots(seqs)
        if n == 1 and counts == (1,) * batch and not only_needed:
            return self._plan_one(seq_ids, seqs, slots, starts)
        # pages the pattern no longer needs are freed first (the step's queries start at `starts`),
        # after the check below: an OutOfPagesError leaves everything as it was
        evict_at = [max(s - self.lookahead, 0) for s in starts]
        freeing = self._evict_candidates(seqs, slots, evict_at, self.lookahead)
        dev = self.device
        # positions from the device lengths (equal to the host's): only padding crosses to the device
        start_t = self.lens[slots_l].to(torch.long).view(-1, 1, 1)
        count_t = self.to_device(counts).view(-1, 1, 1) if counts != (n,) * batch else n
        span = (n + b - 1) // b + 1
        first = start_t // b
        j = first + torch.arange(span, device=dev).view(1, 1, -1)                     # (b, 1, span)
        j = j.expand(batch, self.kv_heads, span)
        in_range = (j * b < start_t + count_t)
        idx = self._table_index(slots, j, in_range)
        cur = self._tables_flat[idx]
        want = in_range & (cur < 0)
        if only_needed:
            keep_from = ((start_t + count_t - self.lookahead).clamp(min=0)) // b
            want = want & self.rules.needed(keep_from, j)
            need = self._count_first_write(starts, ends, want)
        else:
            # every touched block not yet held: all but a partly filled first block
            need = self.kv_heads * sum(-(-e // b) - -(-s // b) for s, e in zip(starts, ends))
        self._ensure_free(need, f"writing {n} token(s) to {batch} sequence(s)", freeing)
        # ---- from here on the state changes ----
        self._evict_apply(seqs, evict_at, freeing)
        pages = torch.where(want, self._pop_free(want), cur)
        self._tables_flat[torch.where(want, idx, self._tables_flat.numel() - 1)] = pages
        self._free_known -= need
        # each new token's row in the pools: (batch, kv_heads, n)
        t = torch.arange(n, device=dev).view(1, 1, -1)
        off_t = self.to_device(offsets).view(-1, 1, 1) if any(offsets) else 0
        real = (t >= off_t) & (t < off_t + count_t)
        pos = start_t + t - off_t
        rel = (pos // b - first).clamp(0, span - 1).expand(batch, self.kv_heads, n)
        page = pages.gather(2, rel).to(torch.long)
        real = real & (page >= 0)
        dest = torch.where(real, page * b + pos % b, self.num_pages * b)
        self.lens[slots_l] = (start_t.view(-1) + (count_t.view(-1) if isinstance(count_t, torch.Tensor)
                                                   else count_t)).to(torch.int32)
        for s, e in zip(seqs, ends):
            s.length = e
        if only_needed:
            for s, e in zip(seqs, ends):
                s.evicted_at = max(s.evicted_at, e - self.lookahead)
        return StepPlan(tuple(seq_ids), slots, self.lens[slots_l], max(ends, default=0),
                        min(ends, default=0), n=n, dest=dest.reshape(-1), starts=starts, counts=counts,
                        offsets=offsets, only_needed=only_needed)

    def _count_first_write(self, starts, ends, want: torch.Tensor) -> int:
        """Pages a write of only the needed blocks takes. Into empty sequences (a first prefill)
        it is the keep rules' count at each end, computed on the host; otherwise read from
        ``want`` (one sync)."""
        if any(starts):
            return int(want.sum())
        b, rules = self.block, self._host_rules
        total = 0
        for e in ends:
            j = torch.arange(-(-e // b)).view(1, 1, -1)
            i = torch.full((1, 1, 1), max(e - self.lookahead, 0) // b)
            total += int(rules.needed(i, j).sum())
        return total

    def _place_one(self, seqs, start: torch.Tensor, new_pages: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """Map the block of each sequence's next token, count the token in ``lens``; returns each
        token's row in the pools, (batch * kv_heads,), and the new lengths (int32, batch).
        ``start``: the device lengths before the token, int64 (batch,). ``new_pages``: some
        sequence may start a block (else no page is taken: the host knows). Device ops only."""
        _, slots_l, base = self._slots(seqs)
        return self._place_tensors(slots_l, base, start, new_pages)

    def _place_tensors(self, slots_l: torch.Tensor, base: torch.Tensor, start: torch.Tensor,
                       new_pages: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """``_place_one`` on the slots' tensors (``_slots``): device ops only."""
        b = self.block
        blk = (start // b).view(-1, 1, 1)
        idx = base + blk                                        # (batch, kv_heads, 1); blk < width (reserve)
        cur = self._tables_flat[idx]
        if new_pages:
            want = cur < 0
            cur = torch.where(want, self._pop_free(want), cur)
            self._tables_flat[torch.where(want, idx, self._tables_flat.numel() - 1)] = cur
        dest = cur.to(torch.long) * b + (start % b).view(-1, 1, 1)
        lens = (start + 1).to(torch.int32)
        self.lens[slots_l] = lens
        return dest.view(-1), lens

    def _plan_one(self, seq_ids, seqs, slots, starts) -> StepPlan:
        """A decode step (one token per sequence, no padding): positions from the device
        lengths, eviction only when a bound crosses a block, pages taken only when a sequence
        starts a block (the host knows both); nothing crosses to the device, nothing is read."""
        b = self.block
        evict_at = [max(s - self.lookahead, 0) for s in starts]
        freeing = self._evict_candidates(seqs, slots, evict_at, self.lookahead)
        need = self.kv_heads * sum(1 for s in starts if s % b == 0)
        self._ensure_free(need, f"writing 1 token to {len(seqs)} sequence(s)", freeing)
        # ---- from here on the state changes ----
        self._evict_apply(seqs, evict_at, freeing)
        start = self.lens[self._slots(seqs)[1]].to(torch.long)
        dest, lens = self._place_one(seqs, start, need > 0)
        self._free_known -= need
        for s in seqs:
            s.length += 1
        ends = [s + 1 for s in starts]
        return StepPlan(tuple(seq_ids), slots, lens, max(ends, default=0), min(ends, default=0),
                        n=1, dest=dest, starts=tuple(starts), counts=(1,) * len(seqs), offsets=(0,) * len(seqs))

    def batch(self, seq_ids) -> DecodeBatch:
        seqs = self.seqs(seq_ids)
        slots, slots_l, _ = self._slots(seqs)
        lengths = [s.length for s in seqs]
        return DecodeBatch(tuple(seq_ids), slots, self.lens[slots_l], max(lengths, default=0),
                           min(lengths, default=0))

    # ------------------------------------------------------------------ rollback
    def crop(self, seq_id, length: int) -> None:
        """Roll ``seq_id`` back to its first ``length`` tokens (drop rejected speculative tokens).

        Allowed down to the position eviction has reached (``lookahead`` tokens behind the
        longest length since); the pages of blocks past the new end return to the pool.
        """
        seq = self.get(seq_id)
        if not 0 <= length <= seq.length:
            raise ValueError(f"cannot crop sequence {seq_id!r} of {seq.length} tokens to {length}")
        if length < seq.evicted_at and self.can_evict:
            raise ValueError(
                f"cannot crop sequence {seq_id!r} to {length} tokens: pages its queries from position {seq.evicted_at} "
                f"on no longer needed are already freed (rollback reaches {self.lookahead} tokens back: make the "
                "cache with a larger lookahead)")
        if length == seq.length:
            return
        keep = -(-length // self.block)
        row = self.tables[seq.slot, :, keep:]
        self._push_free(row, row >= 0)
        row.fill_(-1)
        self.lens[seq.slot] = length
        seq.length = length
        seq.evicted_at = min(seq.evicted_at, length)
        self.plan = None

    # ------------------------------------------------------------------ static decode steps (CUDA graphs)
    def enable_static(self, max_length: int, slots: int = 0) -> None:
        """Plan one-token steps with device ops alone, for sequences of up to ``max_length``
        tokens: the tables are made that wide now, and the host learns of each step only through
        ``prepare_static`` (before) and ``commit_static`` (after). ``disable_static`` ends it."""
        self.reserve(slots=slots, max_length=max_length)
        self.static_max_len = max_length

    def _static_device(self, slots: torch.Tensor, slots_l: torch.Tensor, base: torch.Tensor):
        """A static step's device ops: the positions from the device lengths, eviction of the one
        block each kv head's bound may have passed, the new token's page and row. Returns (each
        token's row in the pools, the new lengths)."""
        start = self.lens[slots_l].to(torch.long)
        if self.can_evict:
            self.evict_tensors(slots, (start - self.lookahead).clamp(min=0), 1)
        return self._place_tensors(slots_l, base, start, True)

    def disable_static(self) -> None:
        self._static_fn = None
        self.static_max_len = 0
        self.in_static_step = False
        self.plan = None

    def prepare_static(self, seq_ids) -> None:
        """Host side before a static step: eviction caught up to one block behind (the step
        evicts the last one), and the pages it may take checked against the pool (``OutOfPagesError``)."""
        seqs = self.seqs(seq_ids)
        for s in seqs:
            if s.length + 1 > self.static_max_len:
                raise ValueError(f"a static step past max_length={self.static_max_len} tokens: enable_static with "
                                 "a larger max_length")
        slots = self.slots_tensor(seqs)  # made here, outside the step
        if self.tier is not None:  # pages move (and are recomputed) here, before the step, not inside it
            self.tier.prepare(seq_ids, 1, False)
            self.tier.settle()
        at = [max(s.length - self.lookahead - self.block, 0) for s in seqs]
        g_rows = self._global_blocks
        if any(a // self.block > (s.evicted_at // self.block if s.evicted_at // self.block > g_rows else -1)
               for s, a in zip(seqs, at)):
            self._evict(seqs, slots, self.lookahead + self.block)
        need = self.kv_heads * sum(1 for s in seqs if s.length % self.block == 0)
        self._ensure_free(need, f"a decode step of {len(seqs)} sequence(s)")
        self._free_known -= need
        self.in_static_step = True

    def commit_static(self, seq_ids) -> None:
        """Host side after a static step ran (eagerly or replayed): each sequence one token longer."""
        for s in self.seqs(seq_ids):
            s.evicted_at = max(s.evicted_at, s.length - self.lookahead)
            s.length += 1
        self.plan = None
        self.in_static_step = False

    def compile_static(self, backend: str = "inductor") -> None:
        """Run the device ops of each static step's plan (``_static_device``: a few dozen small
        ops, eviction included) as one function compiled by ``torch.compile`` (a handful of
        fused kernels), until ``disable_static``. The eager ops remain the reference."""
        self._static_fn = torch.compile(self._static_device, dynamic=False, fullgraph=True, backend=backend)

    def _plan_static(self, seq_ids) -> StepPlan:
        """One new token per sequence, from the device lengths: no host value, no host read."""
        seqs = self.seqs(seq_ids)
        slots, slots_l, base = self._slots(seqs)
        dest, lens = (self._static_fn or self._static_device)(slots, slots_l, base)
        return StepPlan(tuple(seq_ids), slots, lens, self.static_max_len, 1, n=1, dest=dest,
                        starts=(), counts=(1,) * len(seqs), offsets=(0,) * len(seqs))
