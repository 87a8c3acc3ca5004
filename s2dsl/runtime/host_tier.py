"""ALISA's host tier: pages a decode step does not read live in (pinned) host memory.

A ``HostTier`` rides along one ``PageTable`` (``table.tier``) and the caches (layers) that share
it. The GPU pool is the table's ``num_pages``; the host pool has ``host_pages`` slots per layer.
Before the table plans a step (``prepare``) the tier

1. forgets host pages nobody can read again (past a sequence's end after a crop, of a slot whose
   sequence left, or no longer needed by a KV-efficient kv head's pattern);
2. brings up every host page the step reads: the static blocks of each kv head's q heads at the
   step's query (window, sinks, residue classes) and the current top-k selection of every layer
   sharing the table (``topk_state``: chosen by the previous step for this one);
3. when the GPU pool is short of the pages these copies and the step's new tokens need, moves
   pages the step does not read down to the host, oldest blocks first.

Spilling is exact (the same bytes, INT8 codes with their scale and bias included), so decoding
over a tiered cache gives exactly what the all-resident cache gives. A page moves only under
pressure: with everything fitting the GPU pool, nothing moves.

On CUDA the copies run on a side stream; a layer waits (``wait``) only for its own copies before
its step writes or reads its pool, so later layers' copies overlap earlier layers' compute.
The bookkeeping reads the page tables on the host once per step (one sync per step and table).

Limits: a first prefill writes the prompt's pages at once, so the GPU pool must hold one
batch's prompt (its kept blocks); sequences spill from the next step on. CUDA-graph decode
steps (static tables) do not tier.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .paging import KeepRules, OutOfPagesError, PageTable

__all__ = ["HostTier", "HostFullError"]


class HostFullError(OutOfPagesError):
    """The host pool is full too (and this tier does not drop pages)."""


class HostTier:
    """Host pages for the caches sharing ``table`` (see the module docstring).

    ``host_pages``: host slots per layer. ``poison``: write NaN into GPU pages as they move down
    (tests: a kernel reading a page that is not resident would produce NaN)."""

    def __init__(self, table: PageTable, host_pages: int, *, poison: bool = False):
        if host_pages < 0:
            raise ValueError(f"host_pages must be >= 0, got {host_pages}")
        if getattr(table, "tier", None) is not None:
            raise ValueError("this page table already has a host tier")
        self.table = table
        self.host_pages = host_pages
        self.poison = poison
        self.members: List = []
        self._host: Dict[int, List[torch.Tensor]] = {}
        self._events: Dict[int, object] = {}
        self._free: List[int] = list(range(host_pages - 1, -1, -1))
        self.host_table = torch.full((0, table.kv_heads, 0), -1, dtype=torch.int32)
        # what each kv head's step reads besides the top-k: its q heads' static components, as if
        # every head were KV-efficient (a top-k kv head keeps every page, but reads only these)
        self.reads_rules = KeepRules(table.pattern, (True,) * table.pattern.heads, torch.device("cpu"))
        self.evict_rules = KeepRules(table.pattern, table.efficient, torch.device("cpu"))
        self.moved_up = self.moved_down = 0  # pages, since creation
        self.cuda = table.device.type == "cuda"
        self._stream = torch.cuda.Stream(table.device) if self.cuda else None
        table.tier = self

    # ------------------------------------------------------------------ members
    def attach(self, cache) -> None:
        """A cache (layer) of this table: give it host slots of its page shape."""
        if cache.table is not self.table:
            raise ValueError("the cache does not use this tier's page table")
        pin = self.cuda
        shape = (self.host_pages,) + tuple(cache._k_all.shape[1:])
        bufs = [torch.empty(shape, dtype=cache.kv_dtype, pin_memory=pin),
                torch.empty(shape, dtype=cache.kv_dtype, pin_memory=pin)]
        if cache.quantized:
            bufs.append(torch.empty((4, self.host_pages, cache.head_dim), dtype=torch.float32, pin_memory=pin))
        self.members.append(cache)
        self._host[id(cache)] = bufs

    @property
    def host_pages_in_use(self) -> int:
        return self.host_pages - len(self._free)

    def wait(self, cache) -> None:
        """Make the current stream wait for this layer's copies (CUDA); nothing on the CPU."""
        ev = self._events.pop(id(cache), None)
        if ev is not None:
            torch.cuda.current_stream(self.table.device).wait_event(ev)

    # ------------------------------------------------------------------ a step
    def prepare(self, seq_ids: Sequence, n: int, only_needed: bool) -> None:
        """Before the table plans writing ``n`` tokens to ``seq_ids``: make room, bring up reads."""
        t = self.table
        seqs = t.seqs(seq_ids)
        tables = t.tables.cpu()
        self._fit(tables.shape)
        self._release(tables)
        b, kvh = t.block, t.kv_heads
        width = tables.shape[2]
        j = torch.arange(width).view(1, 1, -1)
        # blocks each sequence of the step reads (all blocks: a chunk of several queries)
        reads = torch.zeros(tables.shape, dtype=torch.bool)
        step_slots = torch.tensor([s.slot for s in seqs], dtype=torch.long)
        for s in seqs:
            n_blocks = -(-s.length // b)
            if n == 1:
                i = torch.full((1, 1, 1), s.length // b, dtype=torch.long)
                r = self.reads_rules.needed(i, j)[0]
            else:
                r = torch.ones(kvh, width, dtype=torch.bool)
            reads[s.slot] = r & (j[0] < n_blocks)
        if n == 1:
            for cache in self.members:
                state = getattr(cache, "_topk_state", None)
                if state is None:
                    continue
                sel = state.selection[step_slots.to(state.selection.device)].long().cpu()  # (batch, kvh, K)
                for row, slot in enumerate(step_slots.tolist()):
                    cols = sel[row].clamp(min=0, max=width - 1)
                    chosen = torch.zeros(kvh, width, dtype=torch.long).scatter_reduce_(
                        1, cols, (sel[row] >= 0).long(), reduce="amax")
                    reads[slot] |= chosen.bool()
        up = reads & (tables < 0) & (self.host_table >= 0)
        n_up = int(up.sum())
        new_pages = 0 if only_needed and n > 1 else kvh * sum(-(-(s.length + n) // b) - -(-s.length // b)
                                                              for s in seqs)
        if only_needed and n > 1:  # a first prefill: the blocks the pattern keeps afterwards (and the
            # lookahead's, which eviction keeps behind)
            back = -(-t.lookahead // b)
            new_pages = sum(min(t.rules.count_needed(s.length + n)[g] + back, -(-(s.length + n) // b))
                            for s in seqs for g in range(kvh))
        short = n_up + new_pages - int(t.n_free)
        if short > 0:
            self._spill(tables, reads, short)
        if n_up:
            self._fetch(tables, up)
        t._free_known = int(t.n_free)

    # ------------------------------------------------------------------ internals
    def _fit(self, shape) -> None:
        if tuple(self.host_table.shape) == tuple(shape):
            return
        grown = torch.full(shape, -1, dtype=torch.int32)
        old = self.host_table
        grown[:old.shape[0], :, :old.shape[2]] = old
        self.host_table = grown

    def _release(self, tables: torch.Tensor) -> None:
        """Free the host slots of blocks no query can read again."""
        ht = self.host_table
        held = ht >= 0
        if not bool(held.any()):
            return
        t = self.table
        lens = torch.zeros(ht.shape[0], dtype=torch.long)
        live = torch.zeros(ht.shape[0], dtype=torch.bool)
        for s in t._seqs.values():
            lens[s.slot] = s.length
            live[s.slot] = True
        j = torch.arange(ht.shape[2]).view(1, 1, -1)
        i = ((lens - t.lookahead).clamp(min=0) // t.block).view(-1, 1, 1)  # eviction's own lag (crop)
        gone = ~live.view(-1, 1, 1) | (j * t.block >= lens.view(-1, 1, 1)) | ~self.evict_rules.needed(i, j)
        gone = gone & held
        if bool(gone.any()):
            self._free.extend(ht[gone].tolist())
            ht[gone] = -1

    def _spill(self, tables: torch.Tensor, reads: torch.Tensor, count: int) -> None:
        """Move ``count`` GPU pages the step does not read to the host, oldest blocks first."""
        cand = (tables >= 0) & ~reads
        idx = torch.nonzero(cand)  # (m, 3): slot, kv head, block
        if idx.shape[0] < count:
            raise OutOfPagesError(
                f"the step needs {count} more GPU pages but only {idx.shape[0]} held pages are not read by it: "
                f"raise gpu_pages (now {self.table.num_pages}) or lower the batch")
        if len(self._free) < count:
            raise HostFullError(f"the host tier is full ({self.host_pages} pages per layer): moving {count} pages "
                                "down needs more; raise host_pages")
        idx = idx[torch.argsort(idx[:, 2], stable=True)][:count]
        slot, g, j = idx.unbind(1)
        pages = tables[slot, g, j].long()
        hslots = torch.tensor([self._free.pop() for _ in range(count)], dtype=torch.long)
        self._copy(None, hslots, pages, down=True)
        dev_pages = pages.to(self.table.device)
        self.table._push_free(dev_pages.to(torch.int32), torch.ones_like(dev_pages, dtype=torch.bool))
        self.table.tables[slot.to(self.table.device), g.to(self.table.device), j.to(self.table.device)] = -1
        tables[slot, g, j] = -1
        self.host_table[slot, g, j] = hslots.to(torch.int32)
        self.moved_down += count

    def _fetch(self, tables: torch.Tensor, up: torch.Tensor) -> None:
        idx = torch.nonzero(up)
        slot, g, j = idx.unbind(1)
        hslots = self.host_table[slot, g, j].long()
        dev_mask = torch.ones(idx.shape[0], dtype=torch.bool, device=self.table.device)
        pages = self.table._pop_free(dev_mask).long()
        self._copy(lambda host, dev, h, p: dev.index_copy_(0, p, host[h].to(dev.device, non_blocking=True)),
                   hslots, pages, down=False)
        d = self.table.device
        self.table.tables[slot.to(d), g.to(d), j.to(d)] = pages.to(torch.int32)
        tables[slot, g, j] = pages.cpu().to(torch.int32)
        self.host_table[slot, g, j] = -1
        self._free.extend(hslots.tolist())
        self.moved_up += idx.shape[0]

    def _copy(self, fn, hslots: torch.Tensor, pages: torch.Tensor, *, down: bool) -> None:
        """Run ``fn(host, device, host_slots, device_pages)`` for K, V (and scale/bias) of every layer."""
        dev_pages = pages.to(self.table.device)
        ctx = torch.cuda.stream(self._stream) if self.cuda else None
        if self.cuda:
            self._stream.wait_stream(torch.cuda.current_stream(self.table.device))
            ctx.__enter__()
        try:
            for cache in self.members:
                host = self._host[id(cache)]
                pools = [cache._k_all, cache._v_all]
                if down:
                    for h_buf, pool in zip(host, pools):
                        h_buf[hslots] = pool[dev_pages].to("cpu", non_blocking=False)
                    if cache.quantized:
                        host[2][:, hslots] = cache._qparams[:, dev_pages].cpu()
                    if self.poison and pools[0].is_floating_point():
                        for pool in pools:
                            pool[dev_pages] = float("nan")
                else:
                    for h_buf, pool in zip(host, pools):
                        fn(h_buf, pool, hslots, dev_pages)
                    if cache.quantized:
                        cache._qparams[:, dev_pages] = host[2][:, hslots].to(cache._qparams.device, non_blocking=True)
                if self.cuda:
                    ev = torch.cuda.Event()
                    ev.record(self._stream)
                    self._events[id(cache)] = ev
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)

    def report(self) -> str:
        return (f"host tier: {self.host_pages_in_use}/{self.host_pages} host pages per layer in use, "
                f"{self.table.num_pages - int(self.table.n_free)}/{self.table.num_pages} GPU pages; moved up "
                f"{self.moved_up}, down {self.moved_down} pages per layer")
