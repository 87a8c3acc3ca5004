"""Resolved patterns: every head's components as plain integers.

This is what the analyzer, the code generator and the runtime consume. A ``HeadSpec``
is the union of one head's components in canonical form (one window, one sink, a set of
residue classes), so two heads written differently but meaning the same compare equal.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from . import ir


@dataclass(frozen=True)
class TopKSpec:
    k: int
    recent: Optional[int] = None


@dataclass(frozen=True)
class HeadSpec:
    """One head's allowed set: window W, sinks S, residue classes, dense, dynamic topk.

    Keeps kv block j for query block i (before the causal cut) when
    ``0 <= i - j < window`` or ``j < sink`` or ``j % m == r`` for some ``(m, r)`` in
    ``residues`` or ``dense``.
    """

    window: int = 0
    sink: int = 0
    residues: Tuple[Tuple[int, int], ...] = ()
    dense: bool = False
    topk: Tuple[TopKSpec, ...] = ()

    @property
    def period(self) -> int:
        """Smallest period of the residue part: the lcm of the moduli (1 without any)."""
        return math.lcm(*(m for m, _ in self.residues)) if self.residues else 1

    @property
    def residue_set(self) -> Tuple[int, ...]:
        """The residue part as residues modulo ``period``."""
        if not self.residues:
            return ()
        p = self.period
        return tuple(sorted({r for m, r0 in self.residues for r in range(r0, p, m)}))

    @property
    def is_static(self) -> bool:
        return not self.topk

    def keeps(self, i: int, j: int) -> bool:
        return (self.dense or 0 <= i - j < self.window or j < self.sink
                or any(j % m == r for m, r in self.residues))

    def with_(self, **changes) -> "HeadSpec":
        from dataclasses import replace
        return replace(self, **changes)


def combine_components(components) -> HeadSpec:
    """Union of one head's evaluated components, canonicalised."""
    window = sink = 0
    residues = set()
    dense = False
    topk = []
    for kind, *args in components:
        if kind == "window":
            window = max(window, args[0])
        elif kind == "sink":
            sink = max(sink, args[0])
        elif kind == "residue":
            m, r = args
            if m == 1:
                dense = True
            else:
                residues.add((m, r % m))
        elif kind == "dense":
            dense = True
        elif kind == "topk":
            topk.append(TopKSpec(*args))
    if dense:  # everything else is subsumed
        window, sink, residues = 0, 0, set()
    # drop classes implied by a coarser class already present: (m, r) ⊂ (m', r') when m' | m
    kept = sorted(residues)
    residues = {(m, r) for m, r in kept
                if not any((m2, r2) != (m, r) and m % m2 == 0 and r % m2 == r2 for m2, r2 in kept)}
    return HeadSpec(window, sink, tuple(sorted(residues)), dense, tuple(topk))


@dataclass(frozen=True)
class Pattern:
    """A named sparse-attention pattern, resolved to one ``HeadSpec`` per head.

    ``block_mask`` and ``token_mask`` are the reference semantics every kernel is tested
    against; they build dense masks and are meant for tests and small sizes only.
    """

    name: str
    block: int
    heads: int
    kv_heads: int
    causal: bool
    head_specs: Tuple[HeadSpec, ...]
    definition: Optional[ir.PatternDef] = field(default=None, compare=False, repr=False)
    constants: Tuple[Tuple[str, int], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        if len(self.head_specs) != self.heads:
            raise ValueError(f"pattern {self.name}: {len(self.head_specs)} head specs for {self.heads} heads")
        if self.heads % self.kv_heads:
            raise ValueError(f"pattern {self.name}: kv_heads={self.kv_heads} does not divide heads={self.heads}")
        # computed once: the runtime reads these on every call, also inside torch.compile'd code
        text = repr((self.block, self.heads, self.kv_heads, self.causal, self.head_specs))
        object.__setattr__(self, "_fingerprint", hashlib.sha256(text.encode()).hexdigest()[:16])
        specs = [[s.window, s.sink, [list(r) for r in s.residues], s.dense, [[t.k, t.recent] for t in s.topk]]
                 for s in self.head_specs]
        object.__setattr__(self, "_serialized", json.dumps(
            [self.name, self.block, self.heads, self.kv_heads, self.causal, specs], separators=(",", ":")))

    @property
    def group_size(self) -> int:
        """Query heads per kv head (grouped-query attention)."""
        return self.heads // self.kv_heads

    @property
    def is_static(self) -> bool:
        return all(s.is_static for s in self.head_specs)

    def kv_head_of(self, h: int) -> int:
        return h // self.group_size

    def keeps(self, h: int, i: int, j: int) -> bool:
        """Block-level verdict, the causal cut included."""
        if self.causal and j > i:
            return False
        return self.head_specs[h].keeps(i, j)

    def serialize(self) -> str:
        """The pattern's semantics as compact JSON; ``Pattern.deserialize`` reads it back."""
        return self._serialized

    @staticmethod
    def deserialize(text: str) -> "Pattern":
        name, block, heads, kv_heads, causal, specs = json.loads(text)
        return Pattern(name, block, heads, kv_heads, causal, tuple(
            HeadSpec(w, s, tuple(tuple(r) for r in res), dense, tuple(TopKSpec(*t) for t in topk))
            for w, s, res, dense, topk in specs))

    def fingerprint(self) -> str:
        """Identity of the semantics (not the name): equal for patterns that attend alike."""
        return self._fingerprint

    # ------------------------------------------------------------ dense masks
    def block_mask(self, n_q_blocks: int, n_kv_blocks: Optional[int] = None, past_blocks: int = 0,
                   selection: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Bool ``[heads, n_q_blocks, n_kv_blocks]``; row ``i`` is absolute query block ``i + past_blocks``.

        ``selection`` (int32 ``[batch, heads, n_q_blocks, K]``, -1 for unused slots; what the
        kernels select for topk heads, see ``s2dsl.runtime.topk``) adds each row's selected
        blocks (still under the causal cut); the mask is then ``[batch, heads, ...]``.
        """
        if selection is not None:
            static = self.block_mask(n_q_blocks, n_kv_blocks, past_blocks)
            sel = selection.detach().to("cpu", torch.long)
            if sel.dim() != 4 or sel.shape[1:3] != (self.heads, n_q_blocks):
                raise ValueError(f"selection must be [batch, {self.heads}, {n_q_blocks}, K]; got {tuple(sel.shape)}")
            n_kv = static.shape[2]
            if bool((sel >= n_kv).any()):
                raise ValueError(f"selection holds a block >= {n_kv}")
            dyn = torch.zeros(sel.shape[0], self.heads, n_q_blocks, n_kv + 1, dtype=torch.bool)
            dyn.scatter_(3, torch.where(sel < 0, n_kv, sel), True)  # unused slots land in a dropped column
            dyn = dyn[..., :n_kv]
            if self.causal:
                i = torch.arange(n_q_blocks).view(-1, 1) + past_blocks
                dyn = dyn & (torch.arange(n_kv).view(1, -1) <= i)
            return static.unsqueeze(0) | dyn
        if n_kv_blocks is None:
            n_kv_blocks = n_q_blocks + past_blocks
        i = torch.arange(n_q_blocks).view(-1, 1) + past_blocks
        j = torch.arange(n_kv_blocks).view(1, -1)
        masks = []
        for spec in self.head_specs:
            if spec.dense:
                keep = torch.ones(n_q_blocks, n_kv_blocks, dtype=torch.bool)
            else:
                keep = ((i - j >= 0) & (i - j < spec.window)) | (j < spec.sink)
                for m, r in spec.residues:
                    keep = keep | (j % m == r)
            if self.causal:
                keep = keep & (j <= i)
            masks.append(keep.expand(n_q_blocks, n_kv_blocks))
        return torch.stack(masks)

    def token_mask(self, q_len: int, kv_len: Optional[int] = None,
                   selection: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Bool ``[heads, q_len, kv_len]``: the queries are the last ``q_len`` of ``kv_len`` positions.

        With ``selection`` (``[batch, heads, query blocks, K]``, row 0 = the block of the first
        query; see ``block_mask``) the selected blocks are added: ``[batch, heads, q_len, kv_len]``.
        """
        if kv_len is None:
            kv_len = q_len
        if kv_len < q_len:
            raise ValueError(f"kv_len={kv_len} is shorter than q_len={q_len}: queries are the last kv_len positions")
        past = kv_len - q_len
        n_blocks = -(-kv_len // self.block)
        q_pos = torch.arange(q_len) + past
        k_pos = torch.arange(kv_len)
        if selection is not None:
            first = past // self.block
            blocks = self.block_mask(n_blocks - first, n_blocks, first, selection=selection)
            mask = blocks[:, :, (q_pos // self.block - first).view(-1, 1), (k_pos // self.block).view(1, -1)]
            if self.causal:
                mask = mask & (k_pos.view(1, -1) <= q_pos.view(-1, 1))
            return mask
        blocks = self.block_mask(n_blocks, n_blocks)
        mask = blocks[:, (q_pos // self.block).view(-1, 1), (k_pos // self.block).view(1, -1)]
        if self.causal:
            mask = mask & (k_pos.view(1, -1) <= q_pos.view(-1, 1))
        return mask

    def to_source(self) -> str:
        """This pattern as canonical .s2 text (with the constants it uses)."""
        from .printer import format_pattern
        return format_pattern(self)
