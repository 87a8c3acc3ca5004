"""Lower a resolved pattern to the few integers per head a kernel needs.

Every head becomes (window, sink, period, residues): it keeps kv block j for query block
i when ``0 <= i - j < window`` or ``j < sink`` or ``j % period in residues``. A dense head
is an unbounded window (causal) plus the residue class 0 mod 1 (bidirectional, for the
blocks after the diagonal). The kernels enumerate kept blocks arithmetically from these
numbers, so nothing grows with the sequence length.

A dynamic ``topk K [recent R]`` head adds, at run time, K blocks outside its static set
(selected per query block in prefill, per decode step from the attention mass of the last R
steps in decode). Its K and R ride in the plan (``HeadParams.topk``/``recent``) and, only
for plans that have topk heads, as two extra columns at the end of the head table, so the
generated code of static patterns does not change.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

from ..memo import per_object
from ..pattern import Pattern

# An "unbounded" window; small enough that i - UNBOUNDED + 1 never overflows int32.
UNBOUNDED = 1 << 30
# A head without residue classes, in a kernel whose other heads have one, gets this period
# and residue NO_PERIOD - 1: its residue loop starts past every block and its residue test
# never holds, so the kernel needs no branch for it.
NO_PERIOD = 1 << 30
MAX_PERIOD = 1 << 16
MAX_TOPK = 1 << 12


@dataclass(frozen=True)
class HeadParams:
    window: int
    sink: int
    period: int
    residues: Tuple[int, ...]
    topk: int = 0     # dynamic blocks added per query block / decode step (0: a static head)
    recent: int = 0   # decode: steps the selection score sums over (0: every step so far)
    ahead: int = 0    # blocks kept after the diagonal (two-sided window)
    relative: int = NO_PERIOD  # relative stride S beyond the block window (NO_PERIOD: none)
    # a token window (q - k < tokens): ``window`` is then the blocks it touches, ``block_window``
    # the head's own block window and ``inner`` the distances every token pair of which is kept
    tokens: int = 0
    block_window: int = 0
    inner: int = 0
    # a token sink (k < sink_tokens): ``sink`` is then the blocks it touches, ``block_sink`` the
    # head's own block sink
    sink_tokens: int = 0
    block_sink: int = 0
    # a token window ahead (k - q <= ahead_tokens): ``ahead`` is then the blocks it touches,
    # ``block_ahead`` the head's own block window ahead
    ahead_tokens: int = 0
    block_ahead: int = 0
    global_rows: int = 0  # the first global_rows query blocks keep every kv block
    bound: bool = False   # decode scores its topk candidates by a q.k upper bound (Quest), not by mass


@dataclass(frozen=True)
class KernelPlan:
    block: int
    heads: int
    kv_heads: int
    causal: bool
    params: Tuple[HeadParams, ...]
    prefix: int = 0  # prefix-LM (causal): positions below it also see later positions below it

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @property
    def max_residues(self) -> int:
        return max(len(p.residues) for p in self.params)

    @property
    def has_topk(self) -> bool:
        return any(p.topk for p in self.params)

    @property
    def max_topk(self) -> int:
        return max(p.topk for p in self.params)

    @property
    def has_ahead(self) -> bool:
        return any(p.ahead for p in self.params)

    @property
    def has_relative(self) -> bool:
        return any(p.relative != NO_PERIOD for p in self.params)

    @property
    def has_tokens(self) -> bool:
        return any(p.tokens or p.sink_tokens or p.ahead_tokens for p in self.params)

    @property
    def has_global(self) -> bool:
        return any(p.global_rows for p in self.params)

    @property
    def extended(self) -> bool:
        """Beyond round 1: kernels enumerate per query block and mask with ``pair_keep``."""
        return self.has_distance or self.has_tokens or self.has_global or bool(self.prefix)

    @property
    def extended_columns(self) -> Tuple[str, ...]:
        """Names (``HeadParams`` fields) of the columns extended plans append to the head table."""
        return EXTENDED_COLUMNS if self.extended else ()

    def column(self, name: str) -> int:
        """Column of ``name`` in the head table (extended plans' columns by field name)."""
        base = {"window": 0, "sink": 1, "period": 2, "residue": 4}
        if name in base:
            return base[name]
        return self.topk_column + (2 if self.has_topk else 0) + self.extended_columns.index(name)

    @property
    def has_distance(self) -> bool:
        """Two-sided windows or relative strides: a query tile must stay inside one query block."""
        return self.has_ahead or self.has_relative

    @property
    def table_width(self) -> int:
        """Columns of ``table()``: window, sink, period, count, residues (padded), then K and R
        for plans with topk heads, then ``extended_columns`` for extended plans."""
        return 4 + max(self.max_residues, 1) + (2 if self.has_topk else 0) + len(self.extended_columns)

    @property
    def one_block_tiles(self) -> bool:
        """Must a query tile stay inside one query block (its rows share the block distances)?"""
        return self.has_topk or self.extended

    @property
    def topk_column(self) -> int:
        """Column of K in the head table (R follows it); only for plans with topk heads."""
        return 4 + max(self.max_residues, 1)

    @property
    def has_sink(self) -> bool:
        return any(p.sink for p in self.params)

    def uniform(self, name: str) -> Optional[int]:
        """The value every head shares for ``name`` (window, sink, period, residue), else None."""
        if name == "residue":
            values = {p.residues[0] if p.residues else None for p in self.params}
            if self.max_residues != 1 or None in values:  # some head has none: padded in the table
                return None
        else:
            values = {getattr(p, name) for p in self.params}
        return values.pop() if len(values) == 1 else None

    def table(self) -> Tuple[Tuple[int, ...], ...]:
        """One row per head: window, sink, period, number of residues, residues (padded); then
        topk K and recent R when the plan has topk heads."""
        width = max(self.max_residues, 1)
        extra = (lambda p: (p.topk, p.recent)) if self.has_topk else (lambda p: ())
        names = self.extended_columns
        return tuple((p.window, p.sink, p.period, len(p.residues), *p.residues,
                      *([p.period - 1] * (width - len(p.residues))), *extra(p), *(getattr(p, n) for n in names))
                     for p in self.params)

    def cost(self, head: int, n_blocks: int) -> int:
        """Blocks the head attends to for the last query block of ``n_blocks``: a work estimate."""
        p = self.params[head]
        i = n_blocks - 1
        window = min(p.window, i + 1)
        rest = max(i + 1 - window, 0)
        return window + min(p.sink, rest) + (rest * len(p.residues)) // p.period + min(p.topk, rest)


# Per head, what extended kernels read beyond round 1's columns (``window``/``sink``/``ahead``
# are then the blocks the head touches, token edges rounded out; the ``block_*`` columns its
# block components alone; ``inner`` the distances d >= 1 at which every token pair is kept).
# A head without a relative stride has NO_PERIOD there: its stride loops start past every block.
EXTENDED_COLUMNS = ("ahead", "relative", "block_window", "inner", "block_sink", "block_ahead", "tokens",
                    "sink_tokens", "ahead_tokens", "global_rows")


class UnsupportedPattern(NotImplementedError):
    pass


def lower(pattern: Pattern) -> KernelPlan:
    """The kernel plan of ``pattern`` (memoised per pattern object: every launch lowers its pattern)."""
    return per_object(pattern, "plan", lambda: _lower(pattern))


@lru_cache(maxsize=1024)  # equal patterns made apart share one plan
def _lower(pattern: Pattern) -> KernelPlan:
    params = []
    for h, spec in enumerate(pattern.head_specs):
        topk = recent = 0
        if len(spec.topk) > 1:
            raise UnsupportedPattern(f"pattern {pattern.name}: head {h} has {len(spec.topk)} topk components; "
                                     "give each head one 'topk K [by mass|bound] [recent R]'")
        if spec.topk and not spec.dense:  # a dense head already sees every block
            topk, recent = spec.topk[0].k, spec.topk[0].recent or 0
            if topk > MAX_TOPK:
                raise UnsupportedPattern(f"pattern {pattern.name}: head {h} has topk {topk}, above the kernels' "
                                         f"limit {MAX_TOPK} blocks")
        what = [name for name, used in (("more than one relative stride (give the head one)", len(spec.relative) > 1),
                                        ("topk beside a two-sided window, relative stride, token edge or global "
                                         "rows", spec.topk and not spec.is_classic),
                                        ("topk in a prefix-LM pattern", spec.topk and pattern.prefix)) if used]
        if what:
            raise UnsupportedPattern(f"pattern {pattern.name}: head {h} uses {', '.join(what)}, which the generated "
                                     "kernels do not run yet; use the reference implementation")
        if spec.relative and spec.relative[0] > MAX_PERIOD:
            raise UnsupportedPattern(f"pattern {pattern.name}: head {h} has relative stride {spec.relative[0]}, above "
                                     f"the kernels' limit {MAX_PERIOD}")
        if spec.dense:
            # inside a prefix a dense head also sees later positions: the bidirectional form, cut by the kernels
            params.append(_dense_head(pattern.causal and not pattern.prefix))
            continue
        period = spec.period
        if period > MAX_PERIOD:
            raise UnsupportedPattern(f"pattern {pattern.name}: head {h} has residue period {period} (lcm of its "
                                     f"strides), above the kernels' limit {MAX_PERIOD}")
        residues = spec.residue_set
        if not residues:
            period = NO_PERIOD
        window, ahead, sink = spec.blocks_touched(pattern.block)
        # distances d >= 1 whose token pairs (q - k in [(d-1)B+1, (d+1)B-1]) are all kept
        inner = max(spec.window, spec.window_tokens // pattern.block) if spec.window_tokens else spec.window
        params.append(HeadParams(window, sink, period, residues, topk, recent, ahead,
                                 spec.relative[0] if spec.relative else NO_PERIOD, spec.window_tokens, spec.window,
                                 inner, spec.sink_tokens, spec.sink, spec.ahead_tokens, spec.ahead, spec.global_rows,
                                 bool(topk) and spec.topk[0].by == "bound"))
    group = pattern.group_size
    for g in range(pattern.kv_heads):  # decode selects once per kv head: one way of scoring per group
        if len({p.bound for p in params[g * group:(g + 1) * group] if p.topk}) > 1:
            raise UnsupportedPattern(f"pattern {pattern.name}: kv head {g}'s q heads mix 'topk ... by bound' and "
                                     "'by mass'; decode selects once per kv head, so its topk heads must score alike")
    return KernelPlan(pattern.block, pattern.heads, pattern.kv_heads, pattern.causal, tuple(params), pattern.prefix)


def _dense_head(causal: bool) -> HeadParams:
    """A dense head: an unbounded window (causal), plus the residue class 0 mod 1 (bidirectional,
    for the blocks after the diagonal)."""
    if causal:
        return HeadParams(UNBOUNDED, 0, NO_PERIOD, (), relative=NO_PERIOD, block_window=UNBOUNDED, inner=UNBOUNDED)
    return HeadParams(UNBOUNDED, 0, 1, (0,), relative=NO_PERIOD, block_window=UNBOUNDED, inner=UNBOUNDED)
