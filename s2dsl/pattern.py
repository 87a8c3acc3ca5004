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
from typing import TYPE_CHECKING, Optional, Tuple

from . import ir

if TYPE_CHECKING:  # torch is imported where masks are built, so the front end starts without it
    import torch


@dataclass(frozen=True)
class TopKSpec:
    k: int
    recent: Optional[int] = None
    by: str = "mass"  # decode scoring: "mass" (ALISA) or "bound" (Quest)


@dataclass(frozen=True)
class HeadSpec:
    """One head's allowed set, in canonical form.

    Block-level components keep kv block j for query block i (before the causal cut) when
    ``-ahead <= i - j < window`` or ``j < sink`` or ``j % m == r`` for some ``(m, r)`` in
    ``residues`` or ``i < global_rows`` or ``dense``, or through a relative stride S in
    ``relative``: beyond the block window, ``(i - j - window + 1) % S == 0`` on the left
    (``i - j >= window``) and ``(j - i - ahead) % S == 0`` on the right (``j - i > ahead``).
    Token-level components keep query position q and key position k when
    ``-ahead_tokens <= q - k < window_tokens`` or ``k < sink_tokens``; their edges fall inside
    blocks.  ``topk`` heads add run-time choices on top of all this.
    """

    window: int = 0
    sink: int = 0
    residues: Tuple[Tuple[int, int], ...] = ()
    dense: bool = False
    topk: Tuple[TopKSpec, ...] = ()
    ahead: int = 0
    relative: Tuple[int, ...] = ()
    window_tokens: int = 0
    ahead_tokens: int = 0
    sink_tokens: int = 0
    global_rows: int = 0

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

    @property
    def has_token_edges(self) -> bool:
        """Does some component end inside a block (so kernels must mask per token)?"""
        return bool(self.window_tokens or self.ahead_tokens or self.sink_tokens)

    @property
    def is_classic(self) -> bool:
        """Only the round-1 components (left block window, block sink, absolute residues)."""
        return not (self.ahead or self.relative or self.has_token_edges or self.global_rows)

    def keeps_relative(self, d):
        """Relative-stride verdict at block distance ``d = i - j`` (ints or tensors)."""
        if not self.relative:
            return False
        left = d - self.window + 1
        right = -d - self.ahead
        out = None
        for s in self.relative:
            hit = ((d >= self.window) & (left % s == 0)) | ((d < -self.ahead) & (right % s == 0))
            out = hit if out is None else out | hit
        return out

    def keeps(self, i: int, j: int) -> bool:
        """Block-level verdict of the block components (token edges: see ``keeps_token``)."""
        return bool(self.dense or -self.ahead <= i - j < self.window or j < self.sink
                    or i < self.global_rows or any(j % m == r for m, r in self.residues)
                    or self.keeps_relative(i - j))

    def keeps_token(self, q: int, k: int, block: int) -> bool:
        """Token-level verdict (before the causal cut): block components or token edges."""
        return (self.keeps(q // block, k // block) or -self.ahead_tokens <= q - k < self.window_tokens
                or k < self.sink_tokens)

    def touches(self, i: int, j: int, block: int) -> bool:
        """Does the head keep some token pair of block pair (i, j)? (What a kernel visits.)"""
        return self.keeps(i, j) or self._token_touches(i - j, j, block)

    def _token_touches(self, d, j, block):
        # q - k ranges over (d-1)*block+1 .. (d+1)*block-1 inside the block pair
        lo, hi = d * block - block + 1, d * block + block - 1
        win = (self.window_tokens > 0) & (hi >= 0) & (lo < self.window_tokens)
        ahead = (self.ahead_tokens > 0) & (lo <= -1) & (hi >= -self.ahead_tokens)
        return win | ahead | (j * block < self.sink_tokens)

    def blocks_touched(self, block: int) -> Tuple[int, int, int]:
        """(window, ahead, sink) in blocks, token edges rounded out: the block-level hull."""
        w_tok = (self.window_tokens + 2 * block - 2) // block if self.window_tokens else 0
        a_tok = (self.ahead_tokens + block - 1) // block if self.ahead_tokens else 0
        s_tok = -(-self.sink_tokens // block)
        if self.ahead_tokens:  # the diagonal block holds key positions just ahead of the queries
            w_tok = max(w_tok, 1)
        return max(self.window, w_tok), max(self.ahead, a_tok), max(self.sink, s_tok)

    def with_(self, **changes) -> "HeadSpec":
        from dataclasses import replace
        return replace(self, **changes)

    def extras(self) -> dict:
        """The fields beyond round 1 that differ from their defaults (for serialisation)."""
        out = {}
        for name in ("ahead", "window_tokens", "ahead_tokens", "sink_tokens", "global_rows"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.relative:
            out["relative"] = list(self.relative)
        return out


def combine_components(components, block: Optional[int] = None) -> HeadSpec:
    """Union of one head's evaluated components, canonicalised.

    ``block`` (the pattern's) lets token edges that fall on block boundaries, or inside a
    block component, fold into the block components.
    """
    window = sink = ahead = 0
    window_tokens = ahead_tokens = sink_tokens = global_rows = 0
    residues = set()
    relative = set()
    dense = False
    topk = []
    for kind, *args in components:
        if kind == "window":
            window = max(window, args[0])
            if len(args) > 1:
                ahead = max(ahead, args[1])
        elif kind == "window_tokens":
            window_tokens = max(window_tokens, args[0])
            if len(args) > 1:
                ahead_tokens = max(ahead_tokens, args[1])
        elif kind == "sink":
            sink = max(sink, args[0])
        elif kind == "sink_tokens":
            sink_tokens = max(sink_tokens, args[0])
        elif kind == "residue":
            m, r = args
            if m == 1:
                dense = True
            else:
                residues.add((m, r % m))
        elif kind == "relative":
            if args[0] == 1:
                dense = True
            relative.add(args[0])
        elif kind == "global":
            global_rows = max(global_rows, args[0])
        elif kind == "dense":
            dense = True
        elif kind == "topk":
            topk.append(TopKSpec(*args))
    if block:
        if sink_tokens and sink_tokens % block == 0:  # a whole number of blocks
            sink, sink_tokens = max(sink, sink_tokens // block), 0
        if sink_tokens <= sink * block:
            sink_tokens = 0
        # a token window inside the block window: every q - k < window_tokens lies within
        # ceil((window_tokens - 1) / block) blocks of the diagonal
        if window_tokens <= max(window - 1, 0) * block + 1 and window >= 1:
            window_tokens = 0
        if ahead_tokens <= ahead * block:  # k - q <= ahead_tokens means j - i <= ahead
            ahead_tokens = 0
    if dense:  # everything else is subsumed
        return HeadSpec(dense=True, topk=tuple(topk))
    # drop classes implied by a coarser class already present: (m, r) ⊂ (m', r') when m' | m
    kept = sorted(residues)
    residues = {(m, r) for m, r in kept
                if not any((m2, r2) != (m, r) and m % m2 == 0 and r % m2 == r2 for m2, r2 in kept)}
    # a relative stride S' that is a multiple of S keeps a subset of S's distances
    rel = sorted(relative)
    relative = tuple(s for s in rel if not any(t != s and s % t == 0 for t in rel))
    return HeadSpec(window, sink, tuple(sorted(residues)), dense, tuple(topk), ahead, relative,
                    window_tokens, ahead_tokens, sink_tokens, global_rows)


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
    #: prefix-LM: with ``causal``, positions below ``prefix`` (tokens) also see later ones below it
    prefix: int = 0

    def __post_init__(self):
        if len(self.head_specs) != self.heads:
            raise ValueError(f"pattern {self.name}: {len(self.head_specs)} head specs for {self.heads} heads")
        if self.heads % self.kv_heads:
            raise ValueError(f"pattern {self.name}: kv_heads={self.kv_heads} does not divide heads={self.heads}")
        # computed once: the runtime reads these on every call, also inside torch.compile'd code
        if self.prefix and not self.causal:
            raise ValueError(f"pattern {self.name}: a prefix only makes sense for a causal pattern")
        # 'by mass' (the default) adds nothing: the fingerprints of earlier patterns stay
        topks = [[[t.k, t.recent] + ([t.by] if t.by != "mass" else []) for t in s.topk] for s in self.head_specs]
        specs = [[s.window, s.sink, [list(r) for r in s.residues], s.dense, tk] + ([s.extras()] if s.extras() else [])
                 for s, tk in zip(self.head_specs, topks)]
        fields = [self.block, self.heads, self.kv_heads, self.causal, specs] + ([self.prefix] if self.prefix else [])
        object.__setattr__(self, "_static", all(s.is_static for s in self.head_specs))  # read inside compiled code
        object.__setattr__(self, "_fingerprint", hashlib.sha256(
            json.dumps(fields, separators=(",", ":")).encode()).hexdigest()[:16])
        object.__setattr__(self, "_serialized", json.dumps([self.name, *fields], separators=(",", ":")))

    @property
    def group_size(self) -> int:
        """Query heads per kv head (grouped-query attention)."""
        return self.heads // self.kv_heads

    @property
    def is_static(self) -> bool:
        return self._static

    def kv_head_of(self, h: int) -> int:
        return h // self.group_size

    @property
    def is_classic(self) -> bool:
        """Only round-1 constructs (what the generated kernels run)."""
        return not self.prefix and all(s.is_classic for s in self.head_specs)

    def keeps(self, h: int, i: int, j: int) -> bool:
        """Block-level verdict (``block_mask``'s): does head h keep some token pair of block
        pair (i, j)? Above the diagonal a causal pattern keeps only pairs touching its prefix."""
        if self.causal and j > i and not (j * self.block < self.prefix):  # j > i: i is inside too
            return False
        return self.head_specs[h].touches(i, j, self.block)

    def keeps_token(self, h: int, q: int, k: int) -> bool:
        """Token-level verdict: the head's components, the causal cut and the prefix."""
        if self.causal and k > q and not (q < self.prefix and k < self.prefix):
            return False
        return self.head_specs[h].keeps_token(q, k, self.block)

    def serialize(self) -> str:
        """The pattern's semantics as compact JSON; ``Pattern.deserialize`` reads it back."""
        return self._serialized

    @staticmethod
    def deserialize(text: str) -> "Pattern":
        name, block, heads, kv_heads, causal, specs, *rest = json.loads(text)
        heads_out = []
        for w, s, res, dense, topk, *extra in specs:
            extra = dict(extra[0]) if extra else {}
            if "relative" in extra:
                extra["relative"] = tuple(extra["relative"])
            heads_out.append(HeadSpec(w, s, tuple(tuple(r) for r in res), dense,
                                      tuple(TopKSpec(*t) for t in topk), **extra))
        return Pattern(name, block, heads, kv_heads, causal, tuple(heads_out), prefix=rest[0] if rest else 0)

    def fingerprint(self) -> str:
        """Identity of the semantics (not the name): equal for patterns that attend alike."""
        return self._fingerprint

    # ------------------------------------------------------------ dense masks
    def _selected_blocks(self, selection, n_q_blocks: int, n_kv_blocks: int, past_blocks: int):
        """Bool ``[batch, heads, n_q_blocks, n_kv_blocks]``: the blocks a top-k selection adds (causal cut)."""
        import torch
        sel = selection.detach().to("cpu", torch.long)
        if sel.dim() != 4 or tuple(sel.shape[1:3]) != (self.heads, n_q_blocks):
            raise ValueError(f"selection must be [batch, {self.heads}, {n_q_blocks}, K]; got {tuple(sel.shape)}")
        if bool((sel >= n_kv_blocks).any()):
            raise ValueError(f"selection holds a block >= {n_kv_blocks}")
        dyn = torch.zeros(sel.shape[0], self.heads, n_q_blocks, n_kv_blocks + 1, dtype=torch.bool)
        dyn.scatter_(3, torch.where(sel < 0, n_kv_blocks, sel), True)  # unused slots land in a dropped column
        dyn = dyn[..., :n_kv_blocks]
        if self.causal:
            i = torch.arange(n_q_blocks).view(-1, 1) + past_blocks
            dyn = dyn & (torch.arange(n_kv_blocks).view(1, -1) <= i)
        return dyn

    def _block_keep(self, spec: HeadSpec, i, j):
        """Block components of one head over index tensors ``i`` (column) and ``j`` (row)."""
        import torch
        d = i - j
        if spec.dense:
            return torch.ones(d.shape, dtype=torch.bool)
        keep = ((d >= -spec.ahead) & (d < spec.window)) | (j < spec.sink) | (i < spec.global_rows)
        for m, r in spec.residues:
            keep = keep | (j % m == r)
        if spec.relative:
            keep = keep | spec.keeps_relative(d)
        return keep

    def block_mask(self, n_q_blocks: int, n_kv_blocks: Optional[int] = None, past_blocks: int = 0,
                   selection: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Bool ``[heads, n_q_blocks, n_kv_blocks]``; row ``i`` is absolute query block ``i + past_blocks``.

        A block pair is set when the head keeps some token pair in it: exactly the block
        components for round-1 heads; token edges and the prefix set the blocks they touch
        (``token_mask`` is the exact, token-level semantics).

        ``selection`` (int32 ``[batch, heads, n_q_blocks, K]``, -1 for unused slots; what the
        kernels select for topk heads, see ``s2dsl.runtime.topk``) adds each row's selected
        blocks (still under the causal cut); the mask is then ``[batch, heads, ...]``.
        """
        import torch
        if selection is not None:
            return self.block_mask(n_q_blocks, n_kv_blocks, past_blocks).unsqueeze(0) | self._selected_blocks(
                selection, n_q_blocks, n_kv_blocks if n_kv_blocks is not None else n_q_blocks + past_blocks,
                past_blocks)
        if n_kv_blocks is None:
            n_kv_blocks = n_q_blocks + past_blocks
        return self.blocks_at(torch.arange(n_q_blocks) + past_blocks, torch.arange(n_kv_blocks))

    def blocks_at(self, rows, cols) -> torch.Tensor:
        """``block_mask`` at the query blocks ``rows`` and kv blocks ``cols`` only (1-D index
        tensors): bool ``[heads, len(rows), len(cols)]``."""
        import torch
        i, j = rows.view(-1, 1), cols.view(1, -1)
        b = self.block
        masks = []
        for spec in self.head_specs:
            keep = self._block_keep(spec, i, j)
            if spec.has_token_edges:
                keep = keep | spec._token_touches(i - j, j, b)
            if self.causal:
                cut = j <= i
                if self.prefix:
                    cut = cut | ((i * b < self.prefix) & (j * b < self.prefix))
                keep = keep & cut
            masks.append(keep.expand(len(rows), len(cols)))
        return torch.stack(masks)

    def token_mask(self, q_len: int, kv_len: Optional[int] = None,
                   selection: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Bool ``[heads, q_len, kv_len]``: the queries are the last ``q_len`` of ``kv_len`` positions.

        With ``selection`` (``[batch, heads, query blocks, K]``, row 0 = the block of the first
        query; see ``block_mask``) the selected blocks are added: ``[batch, heads, q_len, kv_len]``.
        """
        import torch
        if selection is not None:
            static = self.token_mask(q_len, kv_len)
            kv_len = q_len if kv_len is None else kv_len
            first = (kv_len - q_len) // self.block
            n_blocks = -(-kv_len // self.block)
            dyn = self._selected_blocks(selection, n_blocks - first, n_blocks, first)
            q_pos = (torch.arange(q_len) + kv_len - q_len).view(-1, 1)
            k_pos = torch.arange(kv_len).view(1, -1)
            dyn = dyn[:, :, q_pos // self.block - first, k_pos // self.block]
            if self.causal:
                dyn = dyn & (k_pos <= q_pos)
            return static.unsqueeze(0) | dyn
        if kv_len is None:
            kv_len = q_len
        if kv_len < q_len:
            raise ValueError(f"kv_len={kv_len} is shorter than q_len={q_len}: queries are the last kv_len positions")
        past = kv_len - q_len
        q_pos = (torch.arange(q_len) + past).view(-1, 1)
        k_pos = torch.arange(kv_len).view(1, -1)
        if self.is_classic:  # block granularity: expand the block mask (cheap)
            n_blocks = -(-kv_len // self.block)
            blocks = self.block_mask(n_blocks, n_blocks)
            mask = blocks[:, q_pos // self.block, k_pos // self.block]
        else:
            i, j = q_pos // self.block, k_pos // self.block
            masks = []
            for spec in self.head_specs:
                keep = self._block_keep(spec, i, j)
                if spec.has_token_edges:
                    t = q_pos - k_pos
                    keep = keep | ((t >= -spec.ahead_tokens) & (t < spec.window_tokens)) | (k_pos < spec.sink_tokens)
                masks.append(keep.expand(q_len, kv_len))
            mask = torch.stack(masks)
        if self.causal:
            cut = k_pos <= q_pos
            if self.prefix:
                cut = cut | ((q_pos < self.prefix) & (k_pos < self.prefix))
            mask = mask & cut
        return mask

    def to_source(self) -> str:
        """This pattern as canonical .s2 text (with the constants it uses)."""
        from .printer import format_pattern
        return format_pattern(self)
