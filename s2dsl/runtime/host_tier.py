"""ALISA's host tier: pages a decode step does not read live in (pinned) host memory, and past
the host budget they are dropped and recomputed when read again.

A ``HostTier`` rides along one ``PageTable`` (``table.tier``) and the caches (layers) that share
it. The GPU pool is the table's ``num_pages``; the host pool has ``host_pages`` slots per layer.
Before the table plans a step (``prepare``) the tier

1. forgets host pages (and dropped pages) nobody can read again (past a sequence's end after a
   crop, of a slot whose sequence left, or no longer needed by a KV-efficient kv head's pattern);
2. brings up every host page the step reads: the static blocks of each kv head's q heads at the
   step's query (window, sinks, residue classes) and the current top-k selection of every layer
   sharing the table (``topk_state``: chosen by the previous step for this one);
3. when the GPU pool is short of the pages these copies and the step's new tokens need, moves
   pages the step does not read down to the host, oldest blocks first;
4. when the host pool is short too and the tier was made with ``drop`` (ALISA's phase 3),
   drops the oldest pages the step does not read (host pages or the pages about to move down) —
   past ``host_pages`` (``drop="budget"``), or with ``drop="cost"`` past the host pages the cost
   model keeps (``tiering.DropPolicy``: earlier when recomputing a page costs less than bringing
   it back over the link):
   their bytes are gone, and when a step reads a dropped page again each layer's ``recompute``
   callback (given to ``attach``) makes its K and V again on the device. The tier knows nothing
   of what the callback keeps; ``s2dsl.integrations.hf`` keeps each layer's input hidden states
   and runs the layer's own K/V projections and rotary embedding (see its docstring for why).

Spilling is exact (the same bytes, INT8 codes with their scale and bias included), so decoding
over a tiered cache gives exactly what the all-resident cache gives. Recomputing is as exact as
the callback: the same weights on the same inputs, up to the rounding of a product whose rows
are batched differently (about one unit in the last place; the tests measure it). An INT8 page
is quantised again from the recomputed values, whole (within half a step of them). A page moves
only under pressure: with everything fitting the GPU pool, nothing moves.

On CUDA the copies run on a side stream; a layer waits (``wait``) only for its own copies before
its step writes or reads its pool, so later layers' copies overlap earlier layers' compute.
The bookkeeping reads the device once per step and table: one transfer holds the page tables,
the free-page stack and every layer's top-k selection; everything after is planned on the host
and mirrored onto the device with tensor ops.

CUDA-graph decode steps (``PageTable.enable_static``) tier too: the tier prepares in the host
part before each step (``prepare_static``), where pages move up, down, are dropped or
recomputed in place in the pools and tables the graph reads; the captured step itself moves
nothing. The copies up overlap the replay: each layer's copies end with a record of that
layer's own event, made ``external`` (``torch.cuda.Event(external=True)``), and the layer's
``wait`` inside the captured step becomes a graph node that waits for that event, so a replay
waits for layer L's pages only where layer L reads them (``graph_overlap``, opt-in until a GPU
run has checked it; without it, or before a step was captured that way, ``settle`` makes the whole step wait for every copy).
Pages moving down and pages recomputed are done before the replay starts in either case (a
copy down makes room the step's own pages need; a recompute runs on the compute stream).

Limits: a first prefill writes the prompt's pages at once, so the GPU pool must hold one
batch's prompt (its kept blocks); sequences spill from the next step on.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .paging import KeepRules, OutOfPagesError, PageTable
from .quant import quantize_pages
from .tiering import DropPolicy, drop_mode

__all__ = ["HostTier", "TierGroup", "HostFullError", "Recompute", "StepReads"]

#: ``recompute(slots, kv_heads, blocks)`` (int64 CPU tensors of m entries) -> ``(k, v)``, each
#: ``[m, block, head_dim]`` on the pool's device: the K and V of those pages, made again
Recompute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]


class StepReads:
    """The blocks a one-token step reads per kv head: its q heads' static components at the
    query's block. ``KeepRules`` (every head taken as KV-efficient) gives window, sinks,
    residues and global rows; a relative stride, which ``KeepRules`` must count as "keep
    everything" (its blocks come back as the query moves), reads only the blocks at a multiple
    of its stride beyond the window, ``(i - j - W + 1) % S == 0``: the blocks that move up (or
    are recomputed) when the query crosses into the next block."""

    def __init__(self, pattern):
        self.rules = KeepRules(pattern, (True,) * pattern.heads, torch.device("cpu"))
        self.block = pattern.block
        g = pattern.group_size
        self.relative = {}
        for kv in range(pattern.kv_heads):
            specs = [pattern.head_specs[h] for h in range(kv * g, (kv + 1) * g)]
            if any(s.relative for s in specs) and not any(s.dense for s in specs):
                self.relative[kv] = specs

    def needed(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """``i``: query block (batch, 1, 1); ``j``: (1, 1, width) -> (batch, kv_heads, width)."""
        out = self.rules.needed(i, j)
        if not self.relative:
            return out
        out = out.expand(i.shape[0], out.shape[1], j.shape[-1]).clone()
        d = i - j
        for kv, specs in self.relative.items():
            m = j >= i
            for s in specs:
                w, _, sink = s.blocks_touched(self.block)
                m = m | ((d >= 0) & (d < max(w, 1))) | (j < sink) | (i < s.global_rows)
                for mod, r in s.residues:
                    m = m | (j % mod == r)
                if s.relative:
                    m = m | s.keeps_relative(d)
            out[:, kv] = m[:, 0]
        return out


class HostFullError(OutOfPagesError):
    """The host pool is full too (and this tier does not drop pages)."""


class TierGroup:
    """Tiers of page tables that step together (one per layer of a model, in layer order): the
    first tier, whose table plans each step first, prepares every one from one read of the
    device, so that the copies of later layers start at the step's beginning and overlap the
    earlier layers' compute, and a step reads the device once, not once per layer. Each table
    keeps its own residency: a layer's step reads its own top-k selection, so one layer's choice
    moves none of another's pages."""

    def __init__(self):
        self.tiers: List["HostTier"] = []
        self.pending: set = set()  # tiers prepared for the current step, not yet planned


class HostTier:
    """Host pages for the caches sharing ``table`` (see the module docstring).

    ``graph_overlap`` (class-wide; off by default until a GPU run has checked it — the external
    event waits it captures cannot run on the CPU; bench_alisa times it on and off): captured
    steps wait per layer for that layer's copies up instead of waiting for all before a replay.

    ``host_pages``: host slots per layer. ``drop``: drop the oldest pages instead of moving them
    down and recompute them when read (every member then needs a ``recompute`` callback):
    ``"budget"`` (or ``True``) only past ``host_pages``; ``"cost"`` past the host pages the cost
    model keeps (``policy``: a ``tiering.DropPolicy``, asked only when the GPU pool is short; see
    ``drop_limit``), never past ``host_pages``. Without it (``False``) a full host raises
    ``HostFullError``. ``poison``: write NaN into GPU pages as they move down or are dropped
    (tests: a kernel reading a page that is not resident would produce NaN)."""

    graph_overlap = False

    def __init__(self, table: PageTable, host_pages: int, *, drop=False, poison: bool = False,
                 group: Optional["TierGroup"] = None, policy=None):
        self._graph_waits = False  # a captured step waits per layer (see settle)
        if host_pages < 0:
            raise ValueError(f"host_pages must be >= 0, got {host_pages}")
        drop = drop_mode(drop) or False
        if drop == "cost" and not isinstance(policy, DropPolicy):
            raise ValueError("drop='cost' needs policy=tiering.DropPolicy(costs, ...): the cost model that "
                             "chooses the drop point")
        if policy is not None and drop != "cost":
            raise ValueError(f"a policy chooses the drop point of drop='cost' only (got drop={drop!r})")
        if getattr(table, "tier", None) is not None:
            raise ValueError("this page table already has a host tier")
        self.table = table
        self.host_pages = host_pages
        self.drop = drop is not False
        self.drop_mode = drop if self.drop else None
        self.policy = policy
        self.decision = None  # the last tiering.DropDecision applied (drop="cost")
        self.poison = poison
        self.members: List = []
        self._host: Dict[int, List[torch.Tensor]] = {}
        self._recompute: Dict[int, Recompute] = {}
        self._events: Dict[int, object] = {}  # per layer: its copies' event, until it waits
        self._layer_events: Dict[int, object] = {}  # per layer, CUDA: one external event, reused
        self._free: List[int] = list(range(host_pages - 1, -1, -1))
        self.host_table = torch.full((0, table.kv_heads, 0), -1, dtype=torch.int32)
        self.dropped = torch.zeros((0, table.kv_heads, 0), dtype=torch.bool)
        # what each kv head's step reads besides the top-k: its q heads' static components, as if
        # every head were KV-efficient (a top-k kv head keeps every page, but reads only these)
        self.reads_rules = StepReads(table.pattern)
        self.evict_rules = KeepRules(table.pattern, table.efficient, torch.device("cpu"))
        self.moved_up = self.moved_down = 0  # pages, since creation
        self.dropped_pages = self.recomputed = 0
        self.syncs = 0  # device reads by the bookkeeping (one per step)
        # the fast path's host caches (see _step_reads_absent), invalidated by _version
        self._version = 0
        self._absent_at = -1
        self._absent_any = False
        self._static_key = None
        self._release_key = None
        self._slots_memo = (None, None)
        self._sel_shapes: List[tuple] = []
        self.cuda = table.device.type == "cuda"
        self._stream = torch.cuda.Stream(table.device) if self.cuda else None
        self.group = group if group is not None else TierGroup()
        self.group.tiers.append(self)
        table.tier = self

    # ------------------------------------------------------------------ members
    def attach(self, cache, recompute: Optional[Recompute] = None) -> None:
        """A cache (layer) of this table: give it host slots of its page shape. ``recompute``:
        how this layer makes a dropped page's K/V again (required with ``drop=True``)."""
        if cache.table is not self.table:
            raise ValueError("the cache does not use this tier's page table")
        if self.drop and recompute is None:
            raise ValueError("a tier that drops pages needs each layer's recompute callback (attach(cache, recompute))")
        pin = self.cuda
        shape = (self.host_pages,) + tuple(cache._k_all.shape[1:])
        bufs = [torch.empty(shape, dtype=cache.kv_dtype, pin_memory=pin),
                torch.empty(shape, dtype=cache.kv_dtype, pin_memory=pin)]
        if cache.quantized:
            bufs.append(torch.empty((4, self.host_pages, cache.head_dim), dtype=torch.float32, pin_memory=pin))
        self.members.append(cache)
        self._host[id(cache)] = bufs
        if self.cuda:
            try:  # external: captured, a wait on it is a graph node waiting for the record before each replay
                ev = torch.cuda.Event(external=True)
            except TypeError:  # a torch without external events: graph steps wait for every copy (settle)
                ev = None
            if ev is not None:
                ev.record(self._stream)  # created now: a wait on a never-recorded event captures nothing
            self._layer_events[id(cache)] = ev
        if recompute is not None:
            self._recompute[id(cache)] = recompute

    @property
    def host_pages_in_use(self) -> int:
        return self.host_pages - len(self._free)

    def drop_limit(self) -> int:
        """Host pages per layer past which the oldest pages are dropped: ``host_pages``, or with
        ``drop="cost"`` the policy's decision for the tier's batch and length bucket (planned
        once per bucket; ``host_pages=0`` needs no plan)."""
        if self.drop_mode != "cost" or self.host_pages == 0:
            return self.host_pages
        try:
            self.decision = self.policy.decide(self)
        except Exception as exc:  # noqa: BLE001 - a failed plan must not break the step half-way
            # deciding may measure the machine and fit the recompute path (first plan): if that
            # fails mid-step (out of memory, an error in the recompute callback), the step goes on
            # with the user's budget, as drop="budget" would, instead of leaving layers half-stepped
            if not getattr(self, "_decide_warned", False):
                warnings.warn(f"s2dsl host tier: the cost model could not plan ({type(exc).__name__}: {exc}); "
                              f"dropping past host_pages={self.host_pages} instead", RuntimeWarning, stacklevel=2)
                self._decide_warned = True
            return self.host_pages
        return self.decision.host_limit

    @property
    def pages_dropped_now(self) -> int:
        return int(self.dropped.sum())

    def wait(self, cache) -> None:
        """Make the current stream wait for this layer's copies (CUDA); nothing on the CPU.
        While a step is being captured the wait is on the layer's external event: the graph
        then waits, at every replay, for the copies recorded before it (``settle``)."""
        if not self.cuda:
            return
        stream = torch.cuda.current_stream(self.table.device)
        ev = self._layer_events.get(id(cache))
        if ev is not None and self.graph_overlap and torch.cuda.is_current_stream_capturing():
            stream.wait_event(ev)
            self._graph_waits = True
            return
        ev = self._events.pop(id(cache), None)
        if ev is not None:
            stream.wait_event(ev)

    def settle(self) -> None:
        """Before a static (CUDA-graph) step. Once a captured step waits per layer (``wait``),
        nothing: the replay's layers wait for their own copies. Else the current stream waits
        for every copy now (an eager static step, or the step that is about to be captured)."""
        if not self.cuda:
            self._events.clear()
            return
        if self._graph_waits and self.graph_overlap:
            return  # the pending events stay for an eager static step's own waits
        torch.cuda.current_stream(self.table.device).wait_stream(self._stream)
        self._events.clear()

    # ------------------------------------------------------------------ a step
    def prepare(self, seq_ids: Sequence, n: int, only_needed: bool) -> None:
        """Before the table plans writing ``n`` tokens to ``seq_ids``: make room, bring up reads
        (for every tier of the group whose table holds the same sequences, at the first of them)."""
        group = self.group
        if self in group.pending:
            group.pending.discard(self)
            return
        # the group's first tier (the first layer) begins a step; a later one prepares alone only
        # when it was not prepared with the first (it joined the group during this step)
        tiers = [self]
        if self is group.tiers[0]:
            tiers += [t for t in group.tiers[1:] if t.members and t._holds(seq_ids)]
        reads = [t._device_state() for t in tiers]
        # the step's one read of the device: every table, free stack and top-k selection together,
        # all int32 (the free count's int64 as its two words), so the read is one cat and one copy
        flat = torch.cat([x for parts in reads for x in parts]).cpu()
        self.syncs += 1
        at = 0
        for t, parts in zip(tiers, reads):
            size = sum(x.numel() for x in parts)
            t._prepare(flat[at:at + size], seq_ids, n, only_needed)
            at += size
        group.pending = set(tiers[1:])

    def _holds(self, seq_ids) -> bool:
        return all(s in self.table._seqs for s in seq_ids)

    def _device_state(self) -> List[torch.Tensor]:
        """What the step's read takes from the device: views, no device op. The selections are
        read whole (every slot): indexing the step's slots on the device would copy the slot
        list there first."""
        t = self.table
        states = []
        for cache in self.members:
            state = getattr(cache, "_topk_state", None)
            if state is not None and state.selection.shape[0] > 0:
                states.append(state.selection)
        self._sel_shapes = [tuple(x.shape) for x in states]
        return ([t.tables.reshape(-1), t.free_stack, t.n_free.view(1).view(torch.int32)]
                + [x.reshape(-1) for x in states])

    def _prepare(self, flat: torch.Tensor, seq_ids: Sequence, n: int, only_needed: bool) -> None:
        t = self.table
        seqs = t.seqs(seq_ids)
        shape = t.tables.shape
        n_tab, n_stack = t.tables.numel(), t.free_stack.numel()
        tables = flat[:n_tab].view(shape)
        self._stack_raw = flat[n_tab:n_tab + n_stack]
        self._stack = None  # made from the raw words when the slow path needs it
        self._n_free = int(flat[n_tab + n_stack])  # the low word of the int64 count (< 2**31)
        at = n_tab + n_stack + 2
        sels_all = []
        for shp in self._sel_shapes:
            size = shp[0] * shp[1] * shp[2]
            sels_all.append(flat[at:at + size].view(shp))
            at += size
        self._fit(shape)
        self._release_if_moved(seqs)
        b, kvh = t.block, t.kv_heads
        if n == 1:
            new_pages = kvh * sum(1 for s in seqs if s.length % b == 0)
        elif only_needed:  # a first prefill: the blocks the pattern keeps afterwards
            new_pages = sum(sum(t.rules.count_needed(s.length + n, t.lookahead)) for s in seqs)
        else:
            new_pages = kvh * sum(-(-(s.length + n) // b) - -(-s.length // b) for s in seqs)
        if n == 1 and new_pages <= self._n_free and not self._step_reads_absent(seqs, sels_all):
            # the usual decode step: nothing it reads is off the GPU and its new pages fit
            t._free_known = self._n_free
            return
        self._stack = self._stack_raw.long()
        step_slots = self._slots_of(seqs)
        sels = [x[step_slots] for x in sels_all] if n == 1 else []
        width = shape[2]
        j = torch.arange(width).view(1, 1, -1)
        n_blocks = torch.tensor([-(-s.length // b) for s in seqs], dtype=torch.long).view(-1, 1, 1)
        if n == 1:  # the blocks each kv head's static components read at the step's query
            i = torch.tensor([s.length // b for s in seqs], dtype=torch.long).view(-1, 1, 1)
            step_reads = self.reads_rules.needed(i, j)
        else:  # a chunk of several queries: every block
            step_reads = torch.ones(len(seqs), kvh, width, dtype=torch.bool)
        for sel in sels:  # and every layer's top-k selection
            hit = torch.zeros(len(seqs), kvh, width, dtype=torch.long)
            hit.scatter_reduce_(2, sel.long().clamp(0, width - 1), (sel >= 0).long(), reduce="amax")
            step_reads |= hit.bool()
        reads = torch.zeros(shape, dtype=torch.bool)
        reads[step_slots] = step_reads & (j < n_blocks)
        up = reads & (tables < 0) & (self.host_table >= 0)
        rec = reads & self.dropped
        n_up, n_rec = int(up.sum()), int(rec.sum())
        short = n_up + n_rec + new_pages - self._n_free
        if short > 0:
            self._spill(tables, reads, short)
        if n_up:
            self._fetch(tables, up)
        if n_rec:
            self._rebuild(tables, rec)
        self._version += 1  # residency changed (or may have): the fast path's caches start again
        t._free_known = self._n_free

    def _slots_of(self, seqs) -> torch.Tensor:
        key = tuple(s.slot for s in seqs)
        if self._slots_memo[0] != key:
            self._slots_memo = (key, torch.tensor(key, dtype=torch.long))
        return self._slots_memo[1]

    def _step_reads_absent(self, seqs, sels_all) -> bool:
        """Does a one-token step of ``seqs`` read a block that is not on the GPU (on the host or
        dropped)? The fast path's question, on host tensors cached per residency version and per
        query block: most steps pay a gather and an ``any`` per top-k selection."""
        if self._absent_at != self._version:
            self._absent = (self.host_table >= 0) | self.dropped
            self._absent_any = bool(self._absent.any())
            self._absent_at = self._version
            self._static_key = None
        if not self._absent_any:
            return False
        b = self.table.block
        key = (self._version, tuple((s.slot, s.length // b, -(-s.length // b)) for s in seqs))
        if self._static_key != key:
            slots = self._slots_of(seqs)
            width = self._absent.shape[2]
            j = torch.arange(width).view(1, 1, -1)
            i = torch.tensor([s.length // b for s in seqs], dtype=torch.long).view(-1, 1, 1)
            n_blocks = torch.tensor([-(-s.length // b) for s in seqs], dtype=torch.long).view(-1, 1, 1)
            absent = self._absent[slots]
            self._static_hit = bool((absent & self.reads_rules.needed(i, j) & (j < n_blocks)).any())
            # one column more, never absent, where a selection's -1 (no block) lands
            self._absent_steps = torch.cat([absent, torch.zeros_like(absent[:, :, :1])], 2)
            self._static_key = key
        if self._static_hit:
            return True
        cols = self._absent_steps.shape[2]
        slots = self._slots_of(seqs)
        for sel in sels_all:
            idx = sel[slots].long().remainder_(cols)  # -1 -> the spare column
            if bool(self._absent_steps.gather(2, idx).any()):
                return True
        return False

    def _release_if_moved(self, seqs) -> None:
        """``_release`` when a block could have become unreadable since it last ran: a sequence
        left, was cropped or crossed a block (its end or its eviction bound); else nothing."""
        t = self.table
        b, la = t.block, t.lookahead
        key = tuple((s.slot, max(s.length - la, 0) // b, -(-s.length // b)) for s in t._seqs.values())
        if key == self._release_key:
            return
        self._release_key = key
        if self._absent_at == self._version and not self._absent_any:
            return  # nothing on the host or dropped: nothing to release
        self._release()

    # ------------------------------------------------------------------ internals
    def _fit(self, shape) -> None:
        if tuple(self.host_table.shape) == tuple(shape):
            return
        for name, fill, dtype in (("host_table", -1, torch.int32), ("dropped", False, torch.bool)):
            old = getattr(self, name)
            grown = torch.full(shape, fill, dtype=dtype)
            grown[:old.shape[0], :, :old.shape[2]] = old
            setattr(self, name, grown)
        self._version += 1

    def _release(self) -> None:
        """Free the host slots (and forget the dropped pages) of blocks no query can read again."""
        ht = self.host_table
        held = ht >= 0
        if not bool((held | self.dropped).any()):
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
        self.dropped &= ~gone
        gone = gone & held
        if bool(gone.any()):
            self._free.extend(ht[gone].tolist())
            ht[gone] = -1
        self._version += 1

    def _push(self, pages: torch.Tensor) -> None:
        """Return GPU pages to the pool: on the device, and on the host's mirror of the stack."""
        t = self.table
        t._push_free(pages.to(t.device, torch.int32), torch.ones(pages.shape, dtype=torch.bool, device=t.device))
        self._stack[self._n_free:self._n_free + pages.numel()] = pages
        self._n_free += pages.numel()

    def _pop(self, count: int) -> torch.Tensor:
        """Take ``count`` GPU pages off the pool; the host knows which from its mirror (no read)."""
        t = self.table
        t._pop_free(torch.ones(count, dtype=torch.bool, device=t.device))
        pages = self._stack[self._n_free - count:self._n_free].flip(0).clone()
        self._n_free -= count
        return pages

    def _unmap(self, tables: torch.Tensor, slot, g, j) -> None:
        d = self.table.device
        self.table.tables[slot.to(d), g.to(d), j.to(d)] = -1
        tables[slot, g, j] = -1

    def _spill(self, tables: torch.Tensor, reads: torch.Tensor, count: int) -> None:
        """Make ``count`` GPU pages free: move pages the step does not read to the host, oldest
        blocks first; past the host budget drop the oldest unread pages instead (``drop``)."""
        cand = (tables >= 0) & ~reads
        idx = torch.nonzero(cand)  # (m, 3): slot, kv head, block
        if idx.shape[0] < count:
            raise OutOfPagesError(
                f"the step needs {count} more GPU pages but only {idx.shape[0]} held pages are not read by it: "
                f"raise gpu_pages (now {self.table.num_pages}) or lower the batch")
        idx = idx[torch.argsort(idx[:, 2], stable=True)][:count]
        # a dropping tier's host room ends at its drop limit (below host_pages when the cost model
        # drops early; a lowered limit drops the host's excess here too, oldest first)
        room = self.drop_limit() - self.host_pages_in_use if self.drop else len(self._free)
        short = count - room
        if short > 0:
            if not self.drop:
                raise HostFullError(f"the host tier is full ({self.host_pages} pages per layer): moving {count} "
                                    "pages down needs more; raise host_pages, or drop and recompute the oldest "
                                    "pages (S2Cache(recompute='hidden'), HostTier(drop=True))")
            idx = self._drop_oldest(tables, reads, idx, short)
        if idx.shape[0]:
            slot, g, j = idx.unbind(1)
            pages = tables[slot, g, j].long()
            hslots = torch.tensor([self._free.pop() for _ in range(idx.shape[0])], dtype=torch.long)
            self._copy(None, hslots, pages, down=True)
            self._push(pages)
            self._unmap(tables, slot, g, j)
            self.host_table[slot, g, j] = hslots.to(torch.int32)
            self.moved_down += idx.shape[0]

    def _drop_oldest(self, tables, reads, spill: torch.Tensor, count: int) -> torch.Tensor:
        """Drop the ``count`` oldest pages among the host's unread pages and the pages about to
        move down (``spill``); returns the spill pages still to move."""
        host = torch.nonzero((self.host_table >= 0) & ~reads)
        both = torch.cat([host, spill])
        on_host = torch.arange(both.shape[0]) < host.shape[0]
        order = torch.argsort(both[:, 2], stable=True)[:count]
        gone = torch.zeros(both.shape[0], dtype=torch.bool)
        gone[order] = True
        h = both[gone & on_host]
        if h.shape[0]:
            slot, g, j = h.unbind(1)
            self._free.extend(self.host_table[slot, g, j].tolist())
            self.host_table[slot, g, j] = -1
            self.dropped[slot, g, j] = True
        dev = both[gone & ~on_host]
        if dev.shape[0]:
            slot, g, j = dev.unbind(1)
            pages = tables[slot, g, j].long()
            if self.poison:
                self._poison(pages)
            self._push(pages)
            self._unmap(tables, slot, g, j)
            self.dropped[slot, g, j] = True
        self.dropped_pages += int(gone.sum())
        return both[~gone & ~on_host]

    def _poison(self, pages: torch.Tensor) -> None:
        dev_pages = pages.to(self.table.device)
        for cache in self.members:
            for pool in (cache._k_all, cache._v_all):
                if pool.is_floating_point():
                    pool[dev_pages] = float("nan")

    def _fetch(self, tables: torch.Tensor, up: torch.Tensor) -> None:
        idx = torch.nonzero(up)
        slot, g, j = idx.unbind(1)
        hslots = self.host_table[slot, g, j].long()
        pages = self._pop(idx.shape[0])
        self._copy(lambda host, dev, h, p: dev.index_copy_(0, p, self._gathered(host, 0, h).to(
            dev.device, non_blocking=True)), hslots, pages, down=False)
        d = self.table.device
        self.table.tables[slot.to(d), g.to(d), j.to(d)] = pages.to(d, torch.int32)
        tables[slot, g, j] = pages.to(torch.int32)
        self.host_table[slot, g, j] = -1
        self._free.extend(hslots.tolist())
        self.moved_up += idx.shape[0]

    def _gathered(self, host: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
        """``host``'s slots ``idx`` (along ``dim``) gathered on the host: into pinned memory on
        CUDA, so that the copy up is asynchronous. From pageable memory a "non-blocking" copy
        makes the host wait for the copy stream first, and that stream waits for the compute
        stream (the step before): the host would stall there and the copies would not overlap
        anything. torch's pinned allocator keeps the buffer until the copy that reads it is done."""
        if not self.cuda:
            return host.index_select(dim, idx)
        shape = list(host.shape)
        shape[dim] = idx.numel()
        staging = torch.empty(shape, dtype=host.dtype, pin_memory=True)
        return torch.index_select(host, dim, idx, out=staging)

    def _rebuild(self, tables: torch.Tensor, rec: torch.Tensor) -> None:
        """Recompute the dropped pages ``rec`` the step reads, every layer, into fresh GPU pages."""
        idx = torch.nonzero(rec)
        slot, g, j = idx.unbind(1)
        pages = self._pop(idx.shape[0])
        d = self.table.device
        dev_pages = pages.to(d)
        lens = {s.slot: s.length for s in self.table._seqs.values()}
        b = self.table.block
        valid = torch.tensor([min(max(lens.get(int(s), 0) - int(x) * b, 0), b) for s, x in zip(slot, j)],
                             dtype=torch.long)
        for cache in self.members:
            k, v = self._recompute[id(cache)](slot, g, j)
            with torch.no_grad():
                if cache.quantized:
                    for new, (ci, si, bi) in ((k, (cache._k_all, 0, 1)), (v, (cache._v_all, 2, 3))):
                        qp = quantize_pages(new, valid.to(new.device))
                        ci[dev_pages] = qp.codes
                        cache._qparams[si, dev_pages] = qp.scale
                        cache._qparams[bi, dev_pages] = qp.bias
                else:
                    cache._k_all[dev_pages] = k.to(cache.kv_dtype)
                    cache._v_all[dev_pages] = v.to(cache.kv_dtype)
        self.table.tables[slot.to(d), g.to(d), j.to(d)] = dev_pages.to(torch.int32)
        tables[slot, g, j] = pages.to(torch.int32)
        self.dropped[slot, g, j] = False
        self.recomputed += idx.shape[0]

    def _copy(self, fn, hslots: torch.Tensor, pages: torch.Tensor, *, down: bool) -> None:
        """Run ``fn(host, device, host_slots, device_pages)`` for K, V (and scale/bias) of every layer."""
        dev_pages = pages.to(self.table.device)
        ctx = torch.cuda.stream(self._stream) if self.cuda else None
        if self.cuda:
            self._stream.wait_stream(torch.cuda.current_stream(self.table.device))
            # dev_pages was allocated on the compute stream and is read by the side stream's
            # copies, which may run after this returns: without this its memory goes back to the
            # compute stream's pool at once and the next allocation there overwrites the indices
            # (the H200's "index_copy_(): index out of bounds" in _fetch; never on the CPU)
            dev_pages.record_stream(self._stream)
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
                        cache._qparams[:, dev_pages] = self._gathered(host[2], 1, hslots).to(
                            cache._qparams.device, non_blocking=True)
                if self.cuda:
                    ev = self._layer_events.get(id(cache))
                    if ev is None:
                        ev = torch.cuda.Event()
                    ev.record(self._stream)
                    self._events[id(cache)] = ev
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)

    def report(self) -> str:
        t = self.table
        drop = ""
        if self.drop:
            if self.drop_mode == "cost" and self.host_pages and self.decision is None:
                at = "the cost model's point (not planned yet: no step was short of GPU pages)"
            else:
                at = f"{self.decision.host_limit if self.decision is not None else self.host_pages} host pages"
            drop = (f"; drops past {at} ({self.drop_mode}); dropped {self.dropped_pages} pages per "
                    f"layer ({self.pages_dropped_now} now), recomputed {self.recomputed}")
        return (f"host tier: {self.host_pages_in_use}/{self.host_pages} host pages per layer in use, "
                f"{t.num_pages - int(t.n_free)}/{t.num_pages} GPU pages; moved up "
                f"{self.moved_up}, down {self.moved_down} pages per layer{drop}")
