"""Dynamic top-k in decode: running block scores and the next step's selection, on the device.

One ``TopKDecodeState`` rides along each ``PagedKVCache`` whose pattern has topk heads
(``state_for(cache)``). Per (sequence slot, kv head) it holds

* ``selection``: int32 ``[slots, kv_heads, K]``, the kv blocks the next step adds to the
  static set, best first (-1 where unused); q head ``h`` of the group takes the first ``K_h``.
  A block in the static set of *any* q head of the group, or beyond the next query's block,
  is never selected;
* the attention mass each block received over the last ``R`` steps (ALISA's accumulated
  attention): a ring of the last ``R`` steps' masses (``R`` = the largest ``recent`` of the
  group's q heads; a group without ``recent`` sums every step so far).

Each decode step: the decode kernel reads ``selection`` and writes, as a by-product, the
log-sum-exp of every block it visited for each q head's last query (``block_lse``); then
``after_step`` turns that into masses (``exp(block_lse - lse)`` summed over the group's q
heads), updates the ring and selects the next step's blocks with the generated exclusion
kernel and ``torch.topk``. No host sync, nothing in Python per block. A first prefill
(``seed``) starts the scores from the dense attention of the prompt's last rows (SnapKV's
observation window), so the first decode step already has a meaningful selection.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..codegen.lower import lower
from .topk import exclusion_module

__all__ = ["TopKDecodeState", "state_for", "OBSERVATION_ROWS"]

#: prompt rows whose dense attention seeds the decode scores after a first prefill
OBSERVATION_ROWS = 16


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
        self._exclude = exclusion_module(pattern).exclude  # looked up once, not per step
        self.block = pattern.block
        self.kv_heads = pattern.kv_heads
        self.group = pattern.group_size
        self.device = cache.device
        self.k_max = plan.max_topk
        members = [plan.params[g * self.group:(g + 1) * self.group] for g in range(self.kv_heads)]
        recent = [max(p.recent for p in ps) if all(p.recent for p in ps if p.topk) else 0 for ps in members]
        self.ring_size = max(max(recent), 1)
        # per kv head: steps its score sums over (0: every step); blocks its q heads take at most
        self.recent = torch.tensor(recent, dtype=torch.long, device=self.device)
        self.group_k = torch.tensor([max(p.topk for p in ps) for ps in members], device=self.device)
        self.heads = torch.arange(pattern.heads, dtype=torch.int32, device=self.device).view(self.kv_heads, self.group)
        self.slots = self.width = 0
        self.selection = torch.empty(0, self.kv_heads, self.k_max, dtype=torch.int32, device=self.device)
        self.ring = torch.empty(self.ring_size, 0, self.kv_heads, 0, dtype=torch.float32, device=self.device)
        self.total = torch.empty(0, self.kv_heads, 0, dtype=torch.float32, device=self.device)
        self.steps = torch.empty(0, dtype=torch.long, device=self.device)
        self._fit(cache.block_tables)

    # ------------------------------------------------------------------ sizes
    def _fit(self, block_tables: torch.Tensor):
        """Grow with the cache's slots and block-table width (sizes known on the host)."""
        slots, width = block_tables.shape[0], block_tables.shape[2]
        if slots <= self.slots and width <= self.width:
            return
        slots, width = max(slots, self.slots), max(width, self.width)
        sel = torch.full((slots, self.kv_heads, self.k_max), -1, dtype=torch.int32, device=self.device)
        sel[:self.slots] = self.selection
        ring = torch.zeros(self.ring_size, slots, self.kv_heads, width, device=self.device)
        ring[:, :self.slots, :, :self.width] = self.ring
        total = torch.zeros(slots, self.kv_heads, width, device=self.device)
        total[:self.slots, :, :self.width] = self.total
        steps = torch.zeros(slots, dtype=torch.long, device=self.device)
        steps[:self.slots] = self.steps
        self.selection, self.ring, self.total, self.steps = sel, ring, total, steps
        self.slots, self.width = slots, width

    # ------------------------------------------------------------------ steps
    def kernel_args(self, batch: int, heads: int) -> dict:
        """The decode kernel's extra arguments: the selection and a fresh block log-mass buffer."""
        block_lse = torch.full((batch, heads, self.width), float("-inf"), device=self.device)
        return dict(sel=self.selection, block_lse=block_lse)

    def reset(self, slots: torch.Tensor, fresh: torch.Tensor):
        """Forget the scores of the slots where ``fresh`` (a new sequence took the slot)."""
        s = slots.long()
        keep = (~fresh).float()
        self.ring[:, s] = self.ring[:, s] * keep.view(1, -1, 1, 1)
        self.total[s] = self.total[s] * keep.view(-1, 1, 1)
        self.steps[s] = self.steps[s] * (~fresh).long()
        self.selection[s] = torch.where(fresh.view(-1, 1, 1), -1, self.selection[s])

    def after_step(self, slots: torch.Tensor, seq_lens: torch.Tensor, block_lse: torch.Tensor, lse: torch.Tensor):
        """Record this step's masses (``block_lse`` from the kernel, ``lse`` (batch, heads, q_len)) and
        select the blocks for each sequence's next query (position ``seq_lens``)."""
        last = lse[:, :, -1:]
        mass = torch.exp(block_lse - torch.where(torch.isinf(last), 0.0, last))
        mass = torch.nan_to_num(mass, nan=0.0).view(mass.shape[0], self.kv_heads, self.group, -1).sum(2)
        self.record(slots, mass)
        self.select(slots, seq_lens)

    def record(self, slots: torch.Tensor, mass: torch.Tensor):
        """Add one step's mass (batch, kv_heads, blocks) for these slots to the running scores."""
        s = slots.long()
        width = mass.shape[-1]
        idx = self.steps[s] % self.ring_size
        self.ring[idx, s, :, :width] = mass
        self.ring[idx, s, :, width:] = 0.0
        self.total[s, :, :width] += mass
        self.steps[s] += 1

    def scores(self, slots: torch.Tensor) -> torch.Tensor:
        """Running score (batch, kv_heads, width): the mass of the last R steps (or all steps)."""
        s = slots.long()
        age = (self.steps[s].view(1, -1) - 1 - torch.arange(self.ring_size, device=self.device).view(-1, 1))
        age = age % self.ring_size                                                    # (ring, batch)
        live = age.view(self.ring_size, -1, 1) < self.recent.view(1, 1, -1)           # (ring, batch, kv)
        recent = (self.ring[:, s] * live.unsqueeze(-1)).sum(0)
        return torch.where((self.recent == 0).view(1, -1, 1), self.total[s], recent)

    def select(self, slots: torch.Tensor, seq_lens: torch.Tensor):
        """The top K blocks by score outside each kv head's static set, for the query at ``seq_lens``."""
        s = slots.long()
        scores = self.scores(slots).unsqueeze(2).contiguous()                         # (batch, kv, 1, width)
        i_next = (seq_lens // self.block).to(torch.int32)
        self._exclude(scores, self.heads, i_next, i_next + 1)
        take = min(self.k_max, self.width)
        values, index = torch.topk(scores[:, :, 0], take, dim=-1)
        # slots no q head of the kv head takes stay -1, so the kernel loads no page for them
        used = torch.arange(take, device=self.device).view(1, 1, -1) < self.group_k.view(1, -1, 1)
        sel = torch.where((values > float("-inf")) & used, index, -1).to(torch.int32)
        if take < self.k_max:
            sel = torch.cat([sel, sel.new_full((*sel.shape[:2], self.k_max - take), -1)], -1)
        self.selection[s] = sel

    @torch.no_grad()
    def seed(self, slots: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float):
        """After a first prefill of ``q, k`` (batch, heads / kv_heads, n, dim): start each slot's scores
        from the dense attention of its last rows, and select for its next query."""
        self.reset(slots, torch.ones(slots.shape[0], dtype=torch.bool, device=self.device))
        batch, n = k.shape[0], k.shape[2]
        rows = min(OBSERVATION_ROWS, q.shape[2])
        n_blocks = -(-n // self.block)
        future = torch.arange(n, device=q.device).view(1, -1) > torch.arange(n - rows, n, device=q.device).view(-1, 1)
        masses = []
        for b in range(batch):  # one sequence at a time: the logits are (heads, rows, n)
            ql = q[b, :, -rows:].reshape(self.kv_heads, self.group * rows, -1)
            logits = (ql @ k[b].transpose(-1, -2)).float().view(self.kv_heads, self.group, rows, n) * scale
            probs = torch.softmax(logits.masked_fill(future, float("-inf")), -1).sum((1, 2))  # (kv_heads, n)
            probs = torch.nn.functional.pad(probs, (0, n_blocks * self.block - n))
            masses.append(probs.view(self.kv_heads, n_blocks, self.block).sum(-1))
        self.record(slots, torch.stack(masses))
        self.select(slots, torch.full_like(slots, n))
