"""Dynamic top-k in decode: running block scores and the next step's selection, on the device.

One ``TopKDecodeState`` rides along each ``PagedKVCache`` whose pattern has topk heads
(``state_for(cache)``). Per (sequence slot, kv head) it holds

* ``selection``: int32 ``[slots, kv_heads, K]``, the kv blocks the next step adds to the
  static set, best first (-1 where unused); q head ``h`` of the group takes the first ``K_h``.
  A block in the static set of *any* q head of the group, or beyond the next query's block,
  is never selected;
* the attention mass each block received over the last ``R`` steps (ALISA's accumulated
  attention; ``R`` = the largest ``recent`` of the group's q heads): a ring of the last ``R``
  steps, each row the blocks the step touched and their masses. A group without ``recent``
  sums every step so far in a running total per block instead.

Each decode step the decode kernel reads ``selection`` and writes, as a by-product, the
log-sum-exp of the window and selected blocks it visited for each q head's last query
(``block_lse``, kept ``-inf`` between steps); then one generated kernel per step
(``codegen.select``'s ``update_kernel``, one program per (sequence, kv head)) turns that
into masses (``exp(block_lse - lse)`` summed over the group), records them and selects the
next step's blocks. The step touches O(window + K) blocks per (sequence, kv head) — the
ring's blocks and those that newly became selectable — never the whole context: a block
outside the ring scores 0, and without ``recent`` a block neither selected nor in the window
gains nothing, so the previous selection and the blocks leaving the window are the only
candidates. No host sync, nothing in Python per block, static shapes: a step is CUDA-graph
capturable. Only the window's and the selection's masses are kept (sinks and residue blocks
are static for good: never selected).

A kv head whose topk heads score ``by bound`` (Quest) keeps no history: before each step
(``before_step``) the generated ``bound_kernel`` scores every selectable page by the largest
``q.k`` its keys' channel-wise min / max allow (``PagedKVCache.key_bounds``, kept at each
write) for this step's queries, and one ``torch.topk`` picks the step's K pages. The update
kernel then selects nothing for such a kv head (its K is 0 there). Measured on a recall task
(``examples/topk_quality.py``), this query-aware score keeps what the next query needs where
the accumulated mass (which reflects what the *previous* queries needed) cannot.

A first prefill (``seed``) starts the scores from the dense attention of the prompt's last
rows (SnapKV's observation window), so the first decode step already has a meaningful
selection; with ``recent`` the seed is a ring row like a step's: the window's blocks and the
K best others. A sequence new to its slot (its first tokens decoded, no prefill) starts afresh.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..codegen.lower import UNBOUNDED, lower
from .topk import exclusion_module

__all__ = ["TopKDecodeState", "state_for", "OBSERVATION_ROWS", "MAX_STEP_QUERIES"]

#: prompt rows whose dense attention seeds the decode scores after a first prefill
OBSERVATION_ROWS = 16
#: queries per decode-kernel tile at most (runtime.decode.MAX_BLOCK_Q): the last tile's window
#: range reaches this many positions before the last query
MAX_STEP_QUERIES = 16


def state_for(cache) -> Optional["TopKDecodeState"]:
    """The cache's top-k state (made on first use), or None for a pattern without topk heads."""
    state = getattr(cache, "_topk_state", None)
    if state is None:
        if not lower(cache.pattern).has_topk:  # lower is memoised: this runs for every layer of every step
            return None
        state = TopKDecodeState(cache)
        cache._topk_state = state
    state._fit(cache.block_tables)
    return state


class TopKDecodeState:
    def __init__(self, cache):
        pattern = cache.pattern
        plan = lower(pattern)
        self.pattern = pattern
        module = exclusion_module(pattern)  # looked up once, not per step
        self._exclude, self._update, self._bound_scores = module.exclude, module.update, module.bound_scores
        self.block = pattern.block
        self.heads = pattern.heads
        self.kv_heads = pattern.kv_heads
        self.group = pattern.group_size
        self.device = cache.device
        self.k_max = plan.max_topk
        members = [plan.params[g * self.group:(g + 1) * self.group] for g in range(self.kv_heads)]
        recent = [max(p.recent for p in ps) if all(p.recent for p in ps if p.topk) else 0 for ps in members]
        group_k = [max(p.topk for p in ps) for ps in members]
        window = [max(p.window for p in ps) for ps in members]
        # a group with a dense q head keeps every block: nothing to select, no window to track
        group_k = [0 if w >= UNBOUNDED else k for w, k in zip(window, group_k)]
        window = [1 if w >= UNBOUNDED else w for w in window]
        # 'by bound' kv heads select before each step from its queries; the update selects for the others
        self.bound_groups = [bool(k) and any(p.bound for p in ps if p.topk) for k, ps in zip(group_k, members)]
        self.has_bound = any(self.bound_groups)
        self.has_mass = any(k and not b for k, b in zip(group_k, self.bound_groups))
        if self.has_bound and cache.table.tier is not None:
            raise ValueError(f"pattern {pattern.name}: 'topk ... by bound' heads select their pages just before the "
                             "step reads them, which a host tier cannot fetch in time; score 'by mass' with a tier")
        self.is_bound = torch.tensor(self.bound_groups, dtype=torch.int32, device=self.device)
        self.ring_size = max(max(recent), 1)
        # the window-range blocks a step's masses land on: the group's window, reached from the
        # first query of the decode kernel's last tile
        self.wcap = max(max(window), 1) + -(-(MAX_STEP_QUERIES - 1) // self.block)
        self.row_width = self.wcap + self.k_max
        self.recent = torch.tensor(recent, dtype=torch.long, device=self.device)
        self.group_k = torch.tensor(group_k, device=self.device)
        self.group_info = torch.tensor([[r, 0 if bd else k, w] for r, k, w, bd in
                                        zip(recent, group_k, window, self.bound_groups)], dtype=torch.int32,
                                       device=self.device)
        self.head_ids = torch.arange(pattern.heads, dtype=torch.int32, device=self.device).view(self.kv_heads,
                                                                                               self.group)
        self.slots = self.width = 0
        self.selection = torch.empty(0, self.kv_heads, self.k_max, dtype=torch.int32, device=self.device)
        self.score = torch.empty(0, self.kv_heads, 0, dtype=torch.float32, device=self.device)
        self.block_lse = torch.empty(0, self.heads, 0, dtype=torch.float32, device=self.device)
        self.ring_idx = torch.empty(self.ring_size, 0, self.kv_heads, self.row_width, dtype=torch.int32,
                                    device=self.device)
        self.ring_mass = torch.empty(self.ring_size, 0, self.kv_heads, self.row_width, device=self.device)
        self.steps = torch.empty(0, self.kv_heads, dtype=torch.int32, device=self.device)
        self._fit(cache.block_tables)

    # ------------------------------------------------------------------ sizes
    def _fit(self, block_tables: torch.Tensor):
        """Grow with the cache's slots and block-table width (sizes known on the host)."""
        slots, width = block_tables.shape[0], block_tables.shape[2]
        if slots <= self.slots and width <= self.width:
            return
        slots, width = max(slots, self.slots), max(width, self.width)
        s0, w0 = self.slots, self.width

        def grown(old, shape, fill, dtype, region):
            new = torch.full(shape, fill, dtype=dtype, device=self.device)
            new[region] = old
            return new

        self.selection = grown(self.selection, (slots, self.kv_heads, self.k_max), -1, torch.int32, slice(0, s0))
        self.score = grown(self.score, (slots, self.kv_heads, width), 0.0, torch.float32,
                           (slice(0, s0), slice(None), slice(0, w0)))
        self.block_lse = grown(self.block_lse, (slots, self.heads, width), float("-inf"), torch.float32,
                               (slice(0, s0), slice(None), slice(0, w0)))
        ring = (self.ring_size, slots, self.kv_heads, self.row_width)
        self.ring_idx = grown(self.ring_idx, ring, -1, torch.int32, (slice(None), slice(0, s0)))
        self.ring_mass = grown(self.ring_mass, ring, 0.0, torch.float32, (slice(None), slice(0, s0)))
        self.steps = grown(self.steps, (slots, self.kv_heads), 0, torch.int32, slice(0, s0))
        self.slots, self.width = slots, width

    # ------------------------------------------------------------------ steps
    def kernel_args(self) -> dict:
        """The decode kernel's extra arguments: the selection, and where it writes each visited
        block's log-mass (``[slots, heads, width]``, ``-inf`` where nothing was written)."""
        return dict(sel=self.selection, block_lse=self.block_lse)

    def reset(self, slots: torch.Tensor, fresh: torch.Tensor):
        """Before a step: a sequence new to its slot (``fresh``) reads no selection (the slot's is its
        predecessor's). O(batch x kv heads x K); ``after_step`` forgets the rest of their state."""
        s = slots.long()
        self.selection.index_copy_(0, s, self.selection.index_select(0, s).masked_fill(fresh.view(-1, 1, 1), -1))

    def before_step(self, cache, q: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor):
        """For 'by bound' kv heads: this step's selection, the top K pages by the q.k upper bound
        of ``q`` (batch, heads, q_len, dim; the step's queries, already appended) over each page's
        key bounds. Device ops only (one generated kernel, one topk): capturable, no host sync."""
        if not self.has_bound:
            return
        scores = self._bound_scores(q, cache.key_bounds, cache.block_tables, slots, seq_lens, self.is_bound,
                                    self.width)
        take = min(self.k_max, self.width)
        values, index = torch.topk(scores, take, dim=-1)
        used = torch.arange(take, device=self.device).view(1, 1, -1) < self.group_k.view(1, -1, 1)
        sel = torch.where((values > float("-inf")) & used, index, -1).to(torch.int32)
        if take < self.k_max:
            sel = torch.cat([sel, sel.new_full((*sel.shape[:2], self.k_max - take), -1)], -1)
        s = slots.long()
        mine = self.is_bound.view(1, -1, 1) != 0
        self.selection.index_copy_(0, s, torch.where(mine, sel, self.selection.index_select(0, s)))

    def after_step(self, slots: torch.Tensor, seq_lens: torch.Tensor, lse: torch.Tensor, q_len: int,
                   fresh: torch.Tensor):
        """Record this step's masses (the decode kernel's ``block_lse``; ``lse`` (batch, heads,
        q_len)) and select the blocks for each sequence's next query (position ``seq_lens``);
        ``fresh`` rows start their slot's scores afresh."""
        if not self.has_mass:  # every topk kv head scores by bound: no history to keep
            return
        if lse.stride(-1) != 1:
            lse = lse.contiguous()
        self._update(lse, self.block_lse, self.selection, self.score, self.ring_idx, self.ring_mass, self.steps,
                     slots, seq_lens, fresh.view(torch.int8), self.group_info, q_len, self.wcap)

    # ------------------------------------------------------------------ introspection (host-side, O(context))
    def running_scores(self, slots: torch.Tensor) -> torch.Tensor:
        """The score each block has now, ``(len(slots), kv_heads, width)``: for debugging and tests."""
        s = slots.long()
        out = self.score[s].clone()
        steps = self.steps[s].long()                                                    # (batch, kv)
        for g in range(self.kv_heads):
            r = int(self.recent[g])
            if r == 0:
                continue
            out[:, g] = 0
            for row in range(r):
                live = (row < steps[:, g]).view(-1, 1)
                idx = self.ring_idx[row, s, g].long()
                ok = live & (idx >= 0)
                out[:, g].scatter_add_(1, idx.clamp(min=0), torch.where(ok, self.ring_mass[row, s, g], 0.0))
        return out

    # ------------------------------------------------------------------ a first prefill
    def _select_dense(self, slots: torch.Tensor, scores: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Top K of dense ``scores`` (batch, kv_heads, width) outside the static set, for the query
        at ``seq_lens``; written to the selection and returned."""
        scores = scores.unsqueeze(2).contiguous()                                      # (batch, kv, 1, width)
        i_next = (seq_lens // self.block).to(torch.int32)
        self._exclude(scores, self.head_ids, i_next, torch.full_like(i_next, self.width))
        take = min(self.k_max, self.width)
        values, index = torch.topk(scores[:, :, 0], take, dim=-1)
        # slots no q head of the kv head takes stay -1, so the kernel loads no page for them
        used = torch.arange(take, device=self.device).view(1, 1, -1) < self.group_k.view(1, -1, 1)
        sel = torch.where((values > float("-inf")) & used, index, -1).to(torch.int32)
        if take < self.k_max:
            sel = torch.cat([sel, sel.new_full((*sel.shape[:2], self.k_max - take), -1)], -1)
        self.selection[slots.long()] = sel
        return sel

    @torch.no_grad()
    def seed(self, slots: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float,
             counts: Optional[Sequence[int]] = None, offsets: Optional[Sequence[int]] = None):
        """After a first prefill of ``q, k`` (batch, heads / kv_heads, n, dim): start each slot's scores
        from the dense attention of its last rows, and select for its next query. ``counts`` /
        ``offsets``: each row's real tokens (padded batches; default all ``n``)."""
        batch, n = k.shape[0], k.shape[2]
        counts = [n] * batch if counts is None else list(counts)
        offsets = [0] * batch if offsets is None else list(offsets)
        width = self.width
        masses = torch.zeros(batch, self.kv_heads, width, device=self.device)
        for b in range(batch):  # one sequence at a time: the logits are (heads, rows, n)
            c, o = counts[b], offsets[b]
            if c == 0:
                continue
            rows = min(OBSERVATION_ROWS, c)
            ql = q[b, :, o + c - rows:o + c].reshape(self.kv_heads, self.group * rows, -1)
            kb = k[b, :, o:o + c]
            logits = (ql @ kb.transpose(-1, -2)).float().view(self.kv_heads, self.group, rows, c) * scale
            pos = torch.arange(c, device=q.device)
            future = pos.view(1, -1) > pos[c - rows:].view(-1, 1)
            probs = torch.softmax(logits.masked_fill(future, float("-inf")), -1).sum((1, 2))  # (kv_heads, c)
            n_blocks = -(-c // self.block)
            probs = torch.nn.functional.pad(probs, (0, n_blocks * self.block - c))
            masses[b, :, :n_blocks] = probs.view(self.kv_heads, n_blocks, self.block).sum(-1)
        s = slots.long()
        lens = torch.tensor(counts, device=self.device)
        sel = self._select_dense(slots, masses.clone(), lens)
        # running totals: the seed; rings: one row, the window range and the selection
        self.score[s] = masses
        i_last = ((lens - 1).clamp(min=0) // self.block).view(-1, 1, 1)
        t = torch.arange(self.wcap, device=self.device).view(1, 1, -1)
        win = i_last - self.wcap + 1 + t
        win = torch.where((win >= 0) & (lens.view(-1, 1, 1) > 0), win, -1).expand(-1, self.kv_heads, -1)
        # a selected block inside the window range is counted there (a ring row lists a block once)
        lo = (i_last - self.wcap + 1).expand(-1, self.kv_heads, 1)
        picked = torch.where((sel >= lo) & (sel <= i_last), -1, sel).long()
        idx = torch.cat([win, picked], -1)
        self.ring_idx[:, s] = -1
        self.ring_mass[:, s] = 0.0
        self.ring_idx[0, s] = idx.to(torch.int32)
        self.ring_mass[0, s] = torch.where(idx >= 0, masses.gather(-1, idx.clamp(min=0)), 0.0)
        self.steps[s] = torch.where(lens > 0, 1, 0).to(torch.int32).view(-1, 1).expand(-1, self.kv_heads)
