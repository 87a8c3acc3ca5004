"""Static analysis of resolved patterns: coverage proofs, empty rows, KV-efficiency, costs.

Everything here is proved for *every* sequence length from the arithmetic structure of the
heads, never by sampling a mask: a pattern is a union of windows, sinks and residue classes,
so the questions reduce to modular arithmetic and to sums with closed forms.

Coverage.  Take the heads under consideration and let ``Wmax``/``Smax`` be their largest
window/sink and ``U`` the union of their residue sets lifted modulo ``L`` (the lcm of
their periods).  A pair with ``i - j < Wmax`` or ``j < Smax`` is kept by the head owning
that window/sink.  Any other pair is kept only through a residue class, and whether ``j``
lies in one does not depend on ``i``; since every class mod ``L`` has members ``j >= Smax``
(with ``i = j + Wmax`` beyond every window), the heads cover every length iff ``U`` is all
of ``Z/L`` (or some head is dense).  The same argument holds for bidirectional patterns:
pairs with ``i < j`` are outside every window, so again only sinks and residues matter.

Counting.  Column ``j`` of a head is kept either by every later query ("special" columns:
``j < sink`` or ``j`` in a residue class) or by the ``window`` queries ``j .. j+W-1``.
Counting by columns turns every total into sums over special columns, which close in
terms of ``ceiling`` and ``Min``/``Max`` (see ``_Counts``); sympy's ``summation`` does not
close such floor sums, so they are derived by hand and tested against brute force.

The union of heads is again a head: ``Wmax``, ``Smax``, residues ``U`` (dense when ``U`` is
everything), because windows and sinks are monotone.  Union densities and the kv set of a
kv-head group therefore reuse the same closed forms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import sympy

from .pattern import HeadSpec, Pattern

__all__ = ["Counterexample", "HeadCost", "GroupCoverage", "PatternReport", "analyze",
           "evaluate", "N", "I"]

#: Number of kv blocks in the sequence (the variable of every total).
N = sympy.Symbol("N", integer=True, positive=True)
#: Query block index (the variable of every per-row count).
I = sympy.Symbol("i", integer=True, nonnegative=True)


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Counterexample:
    """An uncovered block pair, and every residue class whose blocks share its fate.

    ``missing_residues`` are the classes of ``j`` modulo ``modulus`` that no head reaches
    through a residue class; each such ``j`` beyond the sinks is uncovered for every query
    block past the widest window.
    """

    i: int
    j: int
    missing_residues: Tuple[int, ...]
    modulus: int

    def to_json(self) -> dict:
        return {"i": self.i, "j": self.j, "missing_residues": list(self.missing_residues),
                "modulus": self.modulus}


@dataclass(frozen=True)
class HeadCost:
    """One head's costs as closed forms.

    For a dynamic (topk) head these count its static part only: the top-k blocks come on
    top at run time, and since any past block may be chosen, ``kv_bytes`` is the full cache.
    For a bidirectional pattern ``row_blocks`` depends on ``N`` as well as ``i``.
    """

    head: int
    row_blocks: sympy.Expr
    total_blocks: sympy.Expr
    flops: sympy.Expr
    kv_bytes: sympy.Expr
    density_limit: sympy.Expr
    kv_efficient: bool

    def to_json(self) -> dict:
        return {"head": self.head, "row_blocks": str(self.row_blocks),
                "total_blocks": str(self.total_blocks), "flops": str(self.flops),
                "kv_bytes": str(self.kv_bytes), "density_limit": str(self.density_limit),
                "density_limit_float": float(self.density_limit), "kv_efficient": self.kv_efficient}


@dataclass(frozen=True)
class GroupCoverage:
    """Coverage of the q heads sharing one kv head, and what that kv head must cache.

    ``kv_bytes`` (an addition to the minimal contract) is the decode cache of the kv head:
    the union of its q heads' needs after ``N`` blocks, or the whole cache if one is dynamic.
    """

    kv_head: int
    heads: Tuple[int, ...]
    covered: bool
    counterexample: Optional[Counterexample]
    kv_bytes: Optional[sympy.Expr] = None

    def to_json(self) -> dict:
        return {"kv_head": self.kv_head, "heads": list(self.heads), "covered": self.covered,
                "counterexample": self.counterexample.to_json() if self.counterexample else None,
                "kv_bytes": None if self.kv_bytes is None else str(self.kv_bytes)}


@dataclass(frozen=True)
class PatternReport:
    """Everything the analyzer proves about one pattern.

    Fields after ``dynamic_heads`` are additions to the minimal contract; they let the
    report evaluate densities without keeping the pattern around.
    """

    pattern: str
    covered: bool
    reason: str
    counterexample: Optional[Counterexample]
    groups: Tuple[GroupCoverage, ...]
    rows_nonempty: bool
    empty_rows: Tuple[Tuple[int, str], ...]
    kv_efficient: bool
    heads: Tuple[HeadCost, ...]
    dynamic_heads: Tuple[int, ...]
    block: int = 64
    causal: bool = True
    union_total_blocks: Optional[sympy.Expr] = None
    union_density_limit: Optional[sympy.Expr] = None

    def grid_blocks(self, n_blocks: int) -> int:
        """Size of the block grid a dense head would attend at ``n_blocks`` blocks."""
        return n_blocks * (n_blocks + 1) // 2 if self.causal else n_blocks * n_blocks

    def density(self, seq_len: int, exact: bool = False) -> dict:
        """Attended fraction of the block grid at ``seq_len`` tokens, from the closed forms.

        ``exact=True`` returns sympy Rationals instead of floats (tests compare exactly).
        """
        n = max(1, -(-seq_len // self.block))
        grid = self.grid_blocks(n)
        conv = (lambda x: x) if exact else float
        per_head = [conv(sympy.Rational(evaluate(h.total_blocks, N=n), grid)) for h in self.heads]
        union = conv(sympy.Rational(evaluate(self.union_total_blocks, N=n), grid))
        return {"union": union, "per_head": per_head}

    def to_json(self, seq_lens: Sequence[int] = (8192, 32768, 131072)) -> dict:
        densities = {str(s): self.density(s) for s in seq_lens}
        return {
            "pattern": self.pattern,
            "covered": self.covered,
            "reason": self.reason,
            "counterexample": self.counterexample.to_json() if self.counterexample else None,
            "groups": [g.to_json() for g in self.groups],
            "rows_nonempty": self.rows_nonempty,
            "empty_rows": [{"head": h, "rows": d} for h, d in self.empty_rows],
            "kv_efficient": self.kv_efficient,
            "dynamic_heads": list(self.dynamic_heads),
            "density": {s: d["union"] for s, d in densities.items()},
            "density_per_head": {s: d["per_head"] for s, d in densities.items()},
            "density_limit": float(self.union_density_limit),
            "heads": [h.to_json() for h in self.heads],
        }


# ------------------------------------------------------------------------ evaluation
def evaluate(expr: sympy.Expr, **values: int):
    """Exact value of one of the analyzer's closed forms, e.g. ``evaluate(total, N=512)``.

    ``expr.subs`` is exact too but costs milliseconds per call (it re-simplifies the whole
    tree); this walks a compiled copy of the tree with ``Fraction`` arithmetic, so it is
    exact and cheap enough to evaluate every row of every head.  Returns an int when the
    value is integral (it always is for the counts), else a ``Fraction``.
    """
    out = _compile(sympy.sympify(expr))({sympy.Symbol(k, **_ASSUME.get(k, {})): v for k, v in values.items()})
    return int(out) if isinstance(out, Fraction) and out.denominator == 1 else out


_ASSUME = {"N": {"integer": True, "positive": True}, "i": {"integer": True, "nonnegative": True}}


@lru_cache(maxsize=8192)
def _compile(expr: sympy.Expr):
    if expr.is_Integer:
        v = int(expr)
        return lambda env: v
    if expr.is_Rational:
        v = Fraction(int(expr.p), int(expr.q))
        return lambda env: v
    if expr.is_Symbol:
        return lambda env: env[expr]
    fs = [_compile(a) for a in expr.args]
    if expr.is_Add:
        return lambda env: sum(f(env) for f in fs)
    if expr.is_Mul:
        def mul(env):
            out = 1
            for f in fs:
                out *= f(env)
            return out
        return mul
    if expr.is_Pow and expr.exp.is_Integer and expr.exp >= 0:
        base, e = fs[0], int(expr.exp)
        return lambda env: base(env) ** e
    if isinstance(expr, sympy.Max):
        return lambda env: max(f(env) for f in fs)
    if isinstance(expr, sympy.Min):
        return lambda env: min(f(env) for f in fs)
    if isinstance(expr, sympy.ceiling):
        return lambda env: math.ceil(fs[0](env))
    if isinstance(expr, sympy.floor):
        return lambda env: math.floor(fs[0](env))
    raise TypeError(f"cannot evaluate {type(expr).__name__} in {expr}")


# ------------------------------------------------------------------ head arithmetic
def _static(spec: HeadSpec) -> HeadSpec:
    """The part of a head known before run time (topk covers nothing statically)."""
    return spec.with_(topk=()) if spec.topk else spec


def _union(specs: Sequence[HeadSpec]) -> HeadSpec:
    """The union of static heads as one head (windows and sinks are monotone, so max them)."""
    specs = [_static(s) for s in specs]
    if any(s.dense for s in specs):
        return HeadSpec(dense=True)
    window = max((s.window for s in specs), default=0)
    sink = max((s.sink for s in specs), default=0)
    modulus, residues = _residue_union(specs)
    if modulus and len(residues) == modulus:
        return HeadSpec(dense=True)
    return HeadSpec(window, sink, tuple((modulus, r) for r in residues))


#: Largest lcm of periods for which the union of residue classes is enumerated.  Deciding
#: whether congruence classes cover Z is hard in general; real patterns have small periods.
MAX_PERIOD = 1 << 24


def _residue_union(specs: Sequence[HeadSpec]) -> Tuple[int, Tuple[int, ...]]:
    """Union of the heads' residue sets at its smallest period (0, () when there are none).

    Enumerated over one period ``L`` (lcm of the heads' periods) with bytearray slices,
    which is exact and runs at C speed; the smallest period is the least divisor ``d`` of
    ``L`` by which the set is invariant under rotation.
    """
    with_res = [s for s in specs if s.residues]
    if not with_res:
        return 0, ()
    big = math.lcm(*(s.period for s in with_res))
    if big > MAX_PERIOD:
        raise ValueError(f"the heads' strides have lcm {big} > {MAX_PERIOD}: too large to decide "
                         f"coverage exactly; use strides with a smaller common multiple")
    union = bytearray(big)
    for s in with_res:
        p = s.period
        for r in s.residue_set:
            union[r::p] = b"\x01" * len(range(r, big, p))
    for d in sympy.divisors(big):
        if union[d:] + union[:d] == union:
            return d, tuple(x for x in range(d) if union[x])
    raise AssertionError("unreachable: big itself is a period")


def _max(*args):
    """Max with nesting flattened and the numeric arguments folded first.

    sympy's own Max simplification costs milliseconds per call and leaves nested forms
    like Max(0, Max(0, N - 16)); folding by hand keeps analyze fast and the forms
    readable.  A constant is dropped when sympy's assumptions show some symbolic argument
    dominates it (e.g. i + 1 >= 0).  Substituting numbers still evaluates the result.
    """
    flat = []
    for a in args:
        a = sympy.sympify(a)
        flat.extend(a.args if isinstance(a, sympy.Max) else [a])
    nums = [a for a in flat if a.is_Number]
    syms = list(dict.fromkeys(a for a in flat if not a.is_Number))
    if nums:
        c = max(nums)
        if not any((s - c).is_nonnegative for s in syms):
            syms.append(c)
    return sympy.Max(*syms, evaluate=False) if len(syms) > 1 else syms[0]


def _min(c: int, x):
    """min(c, x) for a constant c >= 0 and x >= 0, unevaluated (see ``_max``)."""
    if c == 0:
        return sympy.Integer(0)
    return sympy.Min(c, x, evaluate=False)


def _ceil(a):
    return sympy.ceiling(a, evaluate=False)


class _Counts:
    """Closed forms for one static, non-dense head: how many / which columns are special.

    Special columns are ``[0, S)`` plus ``{j >= S : j mod p in R}``.  For ``x >= 0``:
    ``cnt(x)`` is their number below ``x`` and ``ssum(x)`` the sum of their indices.
    Per residue ``r`` the members ``>= S`` are ``r + p*k`` for ``k >= k0 = ceil((S-r)/p)``
    (``k0 >= 0`` because ``r < p``), and ``n_r(x) = ceil((max(x,S) - r)/p) - k0`` of them
    lie below ``x``.  Arguments are passed as the alternatives of a Max (``x = max(*xs)``)
    so that the max with ``S`` folds into one Max instead of nesting.

    With ``big=True`` the forms are those for ``N`` past every threshold, with
    ``ceiling(a)`` read as ``a``: off by O(N) in the totals, the same N^2 coefficient,
    hence the same density limit, and a plain polynomial (see ``_limit``).  In that mode
    every argument must be the single, growing one (``N`` or ``N - W``).
    """

    def __init__(self, spec: HeadSpec, big: bool = False):
        self.w, self.s = spec.window, spec.sink
        self.p = spec.period
        self.res = spec.residue_set
        self.k0 = [-((r - self.s) // self.p) for r in self.res]  # ceil((S - r)/p)
        self.big = big

    def _n(self, r: int, k0: int, xs):
        if self.big:  # x >> S; ceiling(a) ~ a
            (x,) = xs
            return (x - r) / sympy.Integer(self.p) - k0
        return _ceil((_max(*xs, self.s) - r) / sympy.Integer(self.p)) - k0

    def _low(self, xs):
        """min(S, x): the sinks below x."""
        return sympy.Integer(self.s) if self.big else _min(self.s, _max(*xs))

    def cnt(self, *xs):
        out = self._low(xs)
        for r, k0 in zip(self.res, self.k0):
            out += self._n(r, k0, xs)
        return out

    def ssum(self, *xs):
        m = self._low(xs)
        out = m * (m - 1) / 2
        for r, k0 in zip(self.res, self.k0):
            n = self._n(r, k0, xs)
            out += n * (r + self.p * k0) + self.p * n * (n - 1) / 2
        return out

    def window_total(self):
        """sum_{t=1..N} min(W, t): the window's share of a causal or bidirectional grid."""
        t = sympy.Integer(self.w) if self.big else _min(self.w, N)
        return t * (t + 1) / 2 + self.w * (N - t)

    def total(self, causal: bool):
        """Attended pairs: a special column j adds max(0, N-W-j) (causal) or max(N-W, j)
        (bidirectional) rows on top of the window's min(W, N-j)."""
        m = (N - self.w) if self.big else _max(N - self.w, 0)
        out = self.window_total() + m * self.cnt(m)
        return out - self.ssum(m) if causal else out + self.ssum(N) - self.ssum(m)


def _limit(big_total: sympy.Expr, grid: sympy.Expr) -> sympy.Rational:
    """lim total/grid for N -> oo, from the large-N polynomial form of the total.

    Both are polynomials of degree <= 2 in N, so the limit is the ratio of the N^2
    coefficients (what ``sympy.limit`` returns too, at a tenth of the cost).
    """
    top, bottom = sympy.Poly(big_total, N), sympy.Poly(grid, N)
    if top.degree() > 2:
        raise AssertionError(f"total grows faster than the grid: {big_total}")
    return sympy.Rational(top.coeff_monomial(N ** 2)) / bottom.coeff_monomial(N ** 2)


@lru_cache(maxsize=4096)
def _head_forms(spec: HeadSpec, causal: bool) -> Tuple[sympy.Expr, sympy.Expr, sympy.Expr, sympy.Expr]:
    """(row_blocks(i[, N]), total_blocks(N), kv_blocks(N), density_limit) of a static head.

    Rows count the window ``min(i+1, W)`` plus the special columns outside it (below
    ``i+1-W``, and for bidirectional also after ``i``).  ``kv_blocks`` = what the newest
    query block still reads, which for a KV-efficient head is everything any later query
    reads among existing blocks (window ``min(N, W)`` plus special columns below ``N-W``).
    """
    grid = N * (N + 1) / 2 if causal else N ** 2
    if spec.dense:
        row = I + 1 if causal else N
        return row, grid, N, sympy.Integer(1)
    c = _Counts(spec)
    w = spec.window
    row = _min(w, I + 1) + c.cnt(0, I + 1 - w)
    if not causal:
        row += c.cnt(N) - c.cnt(I + 1)
    kv = _min(w, N) + c.cnt(0, N - w)
    total = c.total(causal)
    limit = _limit(_Counts(spec, big=True).total(causal), grid)
    return row, total, kv, limit


# -------------------------------------------------------------------------- coverage
def _coverage(pattern: Pattern, heads: Sequence[int]) -> Tuple[bool, Optional[Counterexample], str]:
    """Prove coverage of every (i, j) by ``heads``' static parts, or produce a hole."""
    specs = [_static(pattern.head_specs[h]) for h in heads]
    dense = [h for h, s in zip(heads, specs) if s.dense]
    if dense:
        return True, None, f"head {dense[0]} is dense, so it keeps every block pair"
    wmax = max(s.window for s in specs)
    smax = max(s.sink for s in specs)
    modulus, residues = _residue_union(specs)
    if modulus and len(residues) == modulus:
        periods = sorted({s.period for s in specs if s.residues})
        lcm = math.lcm(*periods)
        lcm_of = f" (lcm of the heads' periods {', '.join(map(str, periods))})" if len(periods) > 1 else ""
        return True, None, (f"together the heads' residue classes reach every residue of j modulo "
                            f"{lcm}{lcm_of}, so every kv block is kept by some head for every later "
                            f"query block")
    modulus = modulus or 1
    present = set(residues)
    missing = tuple(r for r in range(modulus) if r not in present)
    j = smax + (missing[0] - smax) % modulus  # smallest j >= smax with a missing residue
    i = j + wmax if (pattern.causal or j == 0) else 0
    ce = Counterexample(i, j, missing, modulus)
    if not residues:
        what = "no head has a stride or shard, so"
    else:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        what = f"no head keeps kv blocks j with j mod {modulus} in {{{shown}}}, so"
    reason = (f"{what} beyond the widest window ({wmax} blocks) and the sinks ({smax} blocks) "
              f"query block {i} never sees kv block {j}")
    return False, ce, reason


# ------------------------------------------------------------------------ empty rows
def _empty_rows(spec: HeadSpec, causal: bool) -> Optional[str]:
    """Describe the rows of a head that keep no block (None when there are none, ever).

    A dynamic head picks k >= 1 blocks among j <= i, which always exist, so it has none.
    Otherwise only a head without a window can have empty rows: causal row i is empty iff
    no special column is <= i; a bidirectional row sees every special column < N.
    """
    if spec.topk or spec.dense or spec.window > 0:
        return None
    if spec.sink > 0:
        return None
    if not spec.residues:
        return "every query block (the head keeps nothing: no window, sink, stride or dense)"
    first = spec.residue_set[0]
    if first == 0:
        return None
    rows = "query block 0" if first == 1 else f"query blocks 0..{first - 1}"
    if causal:
        return f"{rows} (rows before the first kept residue, block {first})"
    return (f"every query block of a sequence of at most {first} blocks "
            f"(the first kept residue is block {first})")


# ------------------------------------------------------------------------ kv efficiency
def _kv_efficient(spec: HeadSpec) -> bool:
    """Is the set of queries i >= j keeping block j an interval starting at j, for all j?

    Column j of a static head is the union of ``[j, j+W)`` (window) and, for a special
    column, ``[j, oo)`` (sink / residue / dense): intervals that all start at j, hence an
    interval starting at j — a block once dropped is never needed again.  A topk head may
    pick any past block at any step, so it cannot evict.
    """
    if spec.topk:
        return False
    starts = [0] if spec.window else []
    if spec.dense or spec.sink or spec.residues:
        starts.append(0)
    return all(s == 0 for s in starts)


# --------------------------------------------------------------------------- analyze
def analyze(pattern: Pattern, *, head_dim: int = 128, dtype_bytes: int = 2) -> PatternReport:
    """Prove coverage, non-empty rows and KV-efficiency of ``pattern``; derive its costs.

    Never builds a mask: every verdict comes from the heads' integers, every cost is a
    sympy closed form in ``N`` (blocks) or ``i`` (query block).
    """
    b = pattern.block
    bytes_per_block = 2 * b * head_dim * dtype_bytes  # K and V
    flops_per_block = 4 * b * b * head_dim            # QK^T and PV

    costs: List[HeadCost] = []
    empty: List[Tuple[int, str]] = []
    for h, spec in enumerate(pattern.head_specs):
        row, total, kv, lim = _head_forms(_static(spec), pattern.causal)
        eff = _kv_efficient(spec)
        kv_blocks = N if spec.topk else kv
        costs.append(HeadCost(h, row, total, flops_per_block * total, bytes_per_block * kv_blocks, lim, eff))
        desc = _empty_rows(spec, pattern.causal)
        if desc is not None:
            empty.append((h, desc))

    covered, ce, reason = _coverage(pattern, range(pattern.heads))
    reason = f"covered for every sequence length: {reason}" if covered else f"not covered: {reason}"

    groups = []
    g = pattern.group_size
    for kv_head in range(pattern.kv_heads):
        members = tuple(range(kv_head * g, (kv_head + 1) * g))
        gc, gce, _ = _coverage(pattern, members)
        specs = [pattern.head_specs[h] for h in members]
        if any(s.topk for s in specs):
            gkv = N
        else:
            gkv = _head_forms(_union(specs), pattern.causal)[2]
        groups.append(GroupCoverage(kv_head, members, gc, gce, bytes_per_block * gkv))

    union = _union(pattern.head_specs)
    _, union_total, _, union_lim = _head_forms(union, pattern.causal)
    return PatternReport(
        pattern=pattern.name, covered=covered, reason=reason, counterexample=ce,
        groups=tuple(groups), rows_nonempty=not empty, empty_rows=tuple(empty),
        kv_efficient=all(c.kv_efficient for c in costs), heads=tuple(costs),
        dynamic_heads=tuple(h for h, s in enumerate(pattern.head_specs) if s.topk),
        block=b, causal=pattern.causal, union_total_blocks=union_total, union_density_limit=union_lim)
