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

from . import covering
from .errors import S2Error
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
    block past the widest window.  At most ``MAX_LISTED`` (the smallest) are listed.
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
    #: False when the forms are upper bounds (pairs kept by both special columns and a
    #: relative stride are counted twice); the density limit is exact either way
    exact: bool = True

    def to_json(self) -> dict:
        return {"head": self.head, "exact": self.exact, "row_blocks": str(self.row_blocks),
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
    costs_exact: bool = True

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
            "costs_exact": self.costs_exact,
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


def _union(specs: Sequence[HeadSpec], block: int = 64) -> HeadSpec:
    """The union of static heads as one head (windows and sinks are monotone, so max them).

    Token edges keep their largest reach.  Relative strides are measured from each head's
    own window, so the union's forms take them as distance classes (``_union_rel``).
    """
    specs = [_static(s) for s in specs]
    if any(s.dense for s in specs):
        return HeadSpec(dense=True)
    window = max((s.window for s in specs), default=0)
    ahead = max((s.ahead for s in specs), default=0)
    sink = max((s.sink for s in specs), default=0)
    classes = covering.canonical(c for s in specs for c in s.residues)
    if classes and covering.uncovered(classes) is None:
        return HeadSpec(dense=True)
    listed = covering.missing_residues(classes, limit=1 << 16) if classes else None
    if listed is not None and listed[0] - len(listed[1]) <= len(classes):  # as few classes at the smallest period
        d, missing = listed
        gone = set(missing)
        classes = tuple((d, r) for r in range(d) if r not in gone)
    strides = sorted({x for s in specs for x in s.relative})
    relative = tuple(x for x in strides if not any(y != x and x % y == 0 for y in strides))
    return HeadSpec(window, sink, tuple(classes), ahead=ahead, relative=relative,
                    global_rows=max((s.global_rows for s in specs), default=0),
                    window_tokens=max((s.window_tokens for s in specs), default=0),
                    ahead_tokens=max((s.ahead_tokens for s in specs), default=0),
                    sink_tokens=max((s.sink_tokens for s in specs), default=0))


def _union_rel(specs: Sequence[HeadSpec]):
    """The heads' relative strides as distance classes (see ``_rel_classes``), canonical."""
    left, right = set(), set()
    for s in specs:
        l, r = _rel_classes(_static(s))
        left.update(l)
        right.update(r)
    return covering.canonical(left), covering.canonical(right)


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


class AnalysisLimit(S2Error):
    """A pattern whose closed forms would be too large to derive (the message says why)."""


#: Most terms one head's residue part may contribute to a closed form (sympy builds a few
#: hundred quickly; thousands take minutes): covering's inclusion-exclusion stops there too.
MAX_TERMS = covering.MAX_TERMS


@lru_cache(maxsize=4096)
def _terms(classes: Tuple[Tuple[int, int], ...]) -> Tuple[Tuple[int, int, int], ...]:
    """The residue part as signed classes (sign, p, r) whose indicators sum to its indicator:
    one per residue at the smallest period when that is short, else inclusion-exclusion
    over the classes (a stride 1000 and a stride 1001 give 3 terms, not 2000 residues)."""
    if not classes:
        return ()
    listed = covering.missing_residues(classes, limit=1 << 16)
    per_residue = None
    if listed is not None:
        d, missing = listed
        gone = set(missing)
        per_residue = tuple((1, d, r) for r in range(d) if r not in gone)
        if len(per_residue) <= 64:
            return per_residue
    signed = covering.inclusion_exclusion(classes)
    if signed is not None and (per_residue is None or len(signed) < len(per_residue)):
        return tuple(signed)
    if per_residue is not None and len(per_residue) <= MAX_TERMS:
        return per_residue
    raise AnalysisLimit(f"the residue classes {list(classes)[:6]}{'...' if len(classes) > 6 else ''} need more "
                        f"than {MAX_TERMS} terms in a closed form; use strides with a smaller common multiple")


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
        self.terms = _terms(spec.residues)
        # per term (sign, modulus p, residue r, k0 = ceil((S - r)/p))
        self.k0 = [-((r - self.s) // p) for _, p, r in self.terms]
        self.big = big

    def _n(self, p: int, r: int, k0: int, xs):
        if self.big:  # x >> S; ceiling(a) ~ a
            (x,) = xs
            return (x - r) / sympy.Integer(p) - k0
        return _ceil((_max(*xs, self.s) - r) / sympy.Integer(p)) - k0

    def _low(self, xs):
        """min(S, x): the sinks below x."""
        return sympy.Integer(self.s) if self.big else _min(self.s, _max(*xs))

    def cnt(self, *xs):
        out = self._low(xs)
        for (sign, p, r), k0 in zip(self.terms, self.k0):
            out += sign * self._n(p, r, k0, xs)
        return out

    def ssum(self, *xs):
        m = self._low(xs)
        out = m * (m - 1) / 2
        for (sign, p, r), k0 in zip(self.terms, self.k0):
            n = self._n(p, r, k0, xs)
            out += sign * (n * (r + p * k0) + p * n * (n - 1) / 2)
        return out

    def density(self) -> sympy.Rational:
        """Share of the columns far out that are special."""
        return sum((sympy.Rational(sign, p) for sign, p, _ in self.terms), sympy.Integer(0))

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


def _hull(spec: HeadSpec, block: int) -> Tuple[HeadSpec, bool]:
    """The head with token edges rounded out to the blocks they touch (what kernels visit),
    and whether its relative strides still measure from the same window."""
    if not spec.has_token_edges:
        return spec, True
    w, a, s = spec.blocks_touched(block)
    same = not spec.relative or (w == spec.window and a == spec.ahead)
    return spec.with_(window=w, ahead=a, sink=s, window_tokens=0, ahead_tokens=0, sink_tokens=0), same


def _rel_classes(spec: HeadSpec) -> Tuple[Tuple[Tuple[int, int], ...], Tuple[Tuple[int, int], ...]]:
    """A head's relative strides as classes of the distance: left d = i - j with
    d = window - 1 (mod S), right e = j - i with e = ahead (mod S); each holds beyond the
    head's own window, hence beyond any wider (rounded-out or union) window too."""
    left = tuple(sorted({(S, (spec.window - 1) % S) for S in spec.relative}))
    right = tuple(sorted({(S, spec.ahead % S) for S in spec.relative}))
    return left, right


def _sum_cnt(c: "_Counts", x):
    """sum_{y=0..x} cnt(y) = sum over members d < x of (x - d), for x >= 0."""
    return x * c.cnt(x) - c.ssum(x)


@lru_cache(maxsize=4096)
def _extended_forms(spec: HeadSpec, causal: bool, prefix_blocks: int, block: int, rel=None):
    """(row, total, kv, limit, exact) for a head or pattern beyond round 1.

    Counted in visited blocks (token edges rounded out).  A row is its left part (j <= i:
    window, special columns below it, relative distances) and, for bidirectional patterns or
    inside a prefix of ``P`` blocks, its right part up to ``M = N`` or ``min(P, N)`` (ahead
    window, special columns after it, relative distances).  Relative strides are classes of
    the distance beyond the window (``rel``: left and right classes, a union's included) and
    count like special columns.  A head with both special columns and relative strides
    counts pairs kept by both twice: its forms are then upper bounds (``exact`` False); the
    density limit stays exact (far out, columns and distances are independent:
    1 - (1 - dJ)(1 - dR)).
    """
    rel_left, rel_right = rel if rel is not None else _rel_classes(spec)
    spec, _ = _hull(spec, block)
    exact = True
    grid = N * (N + 1) / 2 if causal else N ** 2
    if spec.dense:
        row = (_max(I + 1, _min(prefix_blocks, N)) if prefix_blocks else I + 1) if causal else N
        total = grid + (_prefix_square(prefix_blocks) if causal and prefix_blocks else 0)
        return row, total, N, sympy.Integer(1), True
    c = _Counts(spec)
    w, a = spec.window, spec.ahead
    has_cols = bool(spec.sink or spec.residues)
    if (rel_left or rel_right) and has_cols:
        exact = False
    row = _min(w, I + 1) + c.cnt(0, I + 1 - w)
    total = c.total(True)
    cl = _Counts(HeadSpec(residues=rel_left)) if rel_left else None
    cr = _Counts(HeadSpec(residues=rel_right)) if rel_right else None
    if cl:
        # distances d in [w, i] in a class: cnt(max(w, i+1)) - cnt(w)
        row += cl.cnt(w, I + 1) - cl.cnt(w)
        x = _max(N, w)
        total += _sum_cnt(cl, x) - _sum_cnt(cl, sympy.Integer(w)) - (x - w) * cl.cnt(w)

    def right(m):
        """(row part, total part) of the pairs above the diagonal below bound m."""
        r_row = (_min(a, _max(0, m - 1 - I)) if a else 0) + c.cnt(m) - c.cnt(sympy.Min(m, I + a + 1))
        ma = _min(a, m) if a else sympy.Integer(0)
        r_tot = ma * (ma - 1) / 2 + a * (m - ma)
        r_tot += (c.ssum(m) - c.ssum(ma)) - a * (c.cnt(m) - c.cnt(ma))
        if cr:
            # distances e = j - i in (a, m - 1 - i] in a class
            r_row += cr.cnt(a + 1, m - I) - cr.cnt(a + 1)
            x = _max(m, a + 1)
            r_tot += _sum_cnt(cr, x) - _sum_cnt(cr, sympy.Integer(a + 1)) - (x - a - 1) * cr.cnt(a + 1)
        return r_row, r_tot

    if not causal:
        r_row, r_tot = right(N)
        row, total = row + r_row, total + r_tot
    elif prefix_blocks:
        r_row, r_tot = right(sympy.Min(prefix_blocks, N))
        row, total = row + r_row, total + r_tot
    kv = N if (rel_left or rel_right) else _min(w, N) + c.cnt(0, N - w)  # relative: not KV-efficient
    g = spec.global_rows
    if g:
        full = (N if not causal else (_max(I + 1, _min(prefix_blocks, N)) if prefix_blocks else I + 1))
        ind = lambda x: sympy.Min(1, _max(0, x), evaluate=False)  # noqa: E731 - [x >= 1] for integers
        if g > 1024:
            raise AnalysisLimit(f"{g} global rows: at most 1024 have closed-form costs")
        extra = sympy.Integer(0)
        for i0 in range(g):
            extra += ind(N - i0) * (full - row).subs(I, i0)
        row = row + ind(g - I) * (full - row)
        total = total + extra
        kv = _max(kv, ind(g - N + 1) * N)
    d_cols = c.density()
    d_left = cl.density() if cl else 0
    d_right = cr.density() if cr else 0
    limit = 1 - (1 - d_cols) * (1 - d_left)
    if not causal:
        limit = (limit + 1 - (1 - d_cols) * (1 - d_right)) / 2
    return row, total, kv, sympy.Rational(limit), exact


def _prefix_square(p: int):
    m = _min(p, N)
    return m * (m - 1) / 2


# -------------------------------------------------------------------------- coverage
#: Most missing residues a counterexample lists (a stride 1000 and a stride 1001 miss 998,000).
MAX_LISTED = 256


def _j_missing(specs: Sequence[HeadSpec]) -> Tuple[Optional[int], int, Tuple[int, ...]]:
    """Columns no head keeps through a residue class: (witness x or None, modulus L,
    missing residues mod L).  Listed at the smallest period when it is small, else only
    the witness (residues x + k*L are all missed)."""
    classes = covering.canonical(c for s in specs for c in s.residues)
    if not classes:
        return 0, 1, (0,)
    listed = covering.missing_residues(classes)
    if listed is not None:
        d, missing = listed
        return (missing[0] if missing else None), d, missing[:MAX_LISTED]
    x = covering.uncovered(classes)
    return x, covering.period(classes), (() if x is None else (x,))


def _d_kept(specs: Sequence[HeadSpec], d: int) -> bool:
    """Does some head keep every block pair at distance d = i - j by a window or relative stride?"""
    for s in specs:
        if -s.ahead <= d < s.window or (s.relative and s.keeps_relative(d)):
            return True
    return False


def _bad_distance(specs: Sequence[HeadSpec], sign: int, start: int, token_reach: int, block: int) -> Optional[int]:
    """A block distance ``d = sign * e`` (e >= start) no window or relative stride keeps, and
    whose block pairs hold a token pair beyond the token windows (reach ``token_reach``):
    the smallest such e, or None when there is none at any distance."""
    rel = [s for s in specs if s.relative]
    # distances at which every relative stride is periodic, and their classes there
    if sign > 0:
        active = max([s.window for s in rel], default=0)
        classes = [(S, (s.window - 1) % S) for s in rel for S in s.relative]
    else:
        active = max([s.ahead + 1 for s in rel], default=0)
        classes = [(S, s.ahead % S) for s in rel for S in s.relative]
    # the farthest token pair of the block pairs at distance e is e*block + block - 1 apart
    need = max(start, -(-(token_reach - block + 1) // block) if token_reach > 0 else start)
    reach = max(s.window for s in specs) if sign > 0 else max(s.ahead for s in specs) + 1
    scan_end = max(active, need, reach) + 1024
    # prefer a distance whose block pairs lie wholly beyond the token windows (a whole
    # block pair missed), else one that holds some token pair beyond them
    full = max(start, -(-(token_reach - 1) // block) + 1 if token_reach > 0 else start)
    for lo in (full, need):
        for e in range(lo, scan_end):
            if not _d_kept(specs, sign * e):
                return e
    x = covering.uncovered(classes) if classes else 0
    if x is None:
        return None
    period = covering.period(classes) if classes else 1
    return scan_end + (x - scan_end) % period  # past every window: only the classes decide


def _coverage(pattern: Pattern, heads: Sequence[int]) -> Tuple[bool, Optional[Counterexample], str]:
    """Prove coverage of every required token pair by ``heads``' static parts, or produce a hole.

    A head keeps (i, j) through its columns (sinks, residues of j), its distances (windows,
    relative strides of d = i - j), its rows (global rows) or per token (token windows and
    sinks).  The union of heads is the union of each kind, and the kinds depend on j, d and
    i separately, so a hole exists iff some column j and some distance d are both missed
    (beyond the token edges) — then ``j`` can be moved by the columns' period until the row
    ``j + d`` is past every global row.  The prefix of a prefix-LM is a finite square,
    checked pair by pair.
    """
    specs = [_static(pattern.head_specs[h]) for h in heads]
    dense = [h for h, s in zip(heads, specs) if s.dense]
    if dense:
        return True, None, f"head {dense[0]} is dense, so it keeps every block pair"
    b = pattern.block
    wmax = max(s.window for s in specs)
    smax = max(s.sink for s in specs)
    st_max = max(s.sink_tokens for s in specs)
    wt_max = max(s.window_tokens for s in specs)
    at_max = max(s.ahead_tokens for s in specs)
    g_max = max(s.global_rows for s in specs)
    x, modulus, missing = _j_missing(specs)
    if x is None:
        periods = sorted({s.period for s in specs if s.residues})
        lcm = math.lcm(*periods)
        lcm_of = f" (lcm of the heads' periods {', '.join(map(str, periods))})" if len(periods) > 1 else ""
        return True, None, (f"together the heads' residue classes reach every residue of j modulo "
                            f"{lcm}{lcm_of}, so every kv block is kept by some head for every later "
                            f"query block")
    # the first missed column past the block and token sinks
    j_lo = max(smax, -(-st_max // b))
    j = j_lo + (x - j_lo) % modulus

    def hole(i, j, what):
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        cols = ("no head has a stride or shard" if not any(s.residues for s in specs)
                else f"no head keeps kv blocks j with j mod {modulus} in {{{shown}}}")
        reason = (f"{cols} beyond the sinks ({smax} blocks), and {what}, so query block {i} never sees "
                  f"kv block {j}")
        return False, Counterexample(i, j, missing, modulus), reason

    # below the diagonal (every pattern): distances d >= 0
    e = _bad_distance(specs, 1, 0, wt_max, b)
    if e is not None:
        if not pattern.causal and pattern.is_classic and j > 0:
            # the round-1 witness: row 0 sees a later column only through its residue class
            return hole(0, j, "no window reaches above the diagonal")
        while j + e < g_max:
            j += modulus
        what = (f"no window or relative stride keeps block distance {e}" if any(s.relative for s in specs)
                else f"the widest window is {wmax} blocks" + (f" / {wt_max} tokens" if wt_max else ""))
        return hole(j + e, j, what)
    # above the diagonal: bidirectional patterns everywhere, prefix-LM inside its prefix
    if not pattern.causal:
        above = _above_hole(pattern, specs, j, modulus, at_max, g_max)
        if above is not None:
            return hole(*above, what="no ahead window or relative stride keeps it")
    elif pattern.prefix:
        found = _prefix_hole(pattern, heads)
        if found is not None:
            i, jj = found
            return False, Counterexample(i, jj, missing, modulus), (
                f"inside the prefix ({pattern.prefix} tokens) query block {i} never sees kv block {jj} "
                "of the prefix")
    what = "relative strides" if any(s.relative for s in specs) else "token windows"
    return True, None, (f"the windows and {what} keep every block distance (the prefix checked pair by pair), "
                        "so every kv block is kept for every query block")


def _above_hole(pattern, specs, j, modulus, at_max, g_max):
    """A missed pair above the diagonal (i < j), or None."""
    e = _bad_distance(specs, -1, 1, at_max + 1 if at_max else 0, pattern.block)
    if e is None:
        return None
    while j - e < g_max:
        j += modulus
    return j - e, j


def _prefix_hole(pattern: Pattern, heads) -> Optional[Tuple[int, int]]:
    """A block pair (i < j) inside the prefix square with a token pair no head keeps."""
    import torch
    n = -(-pattern.prefix // pattern.block)
    if n > 4096:
        raise AnalysisLimit(f"pattern {pattern.name}: a prefix of {n} blocks is too long to check pair by pair "
                            "(at most 4096 blocks)")
    blocks = pattern.block_mask(n)[list(heads)].any(0)
    for i, j in (~blocks).triu(1).nonzero().tolist():
        return i, j
    # block pairs the heads only touch: look at their tokens
    if any(pattern.head_specs[h].has_token_edges for h in heads):
        hi = min(pattern.prefix, n * pattern.block)
        mask = pattern.token_mask(hi)[list(heads)].any(0)
        q = torch.arange(hi).view(-1, 1)
        k = torch.arange(hi).view(1, -1)
        bad = (~mask) & (k > q)
        if bad.any():
            qq, kk = bad.nonzero()[0].tolist()
            return qq // pattern.block, kk // pattern.block
    return None


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


def _empty_rows_extended(spec: HeadSpec, causal: bool, block: int, prefix: int = 0) -> Optional[str]:
    """Empty rows of a head beyond round 1, by checking rows up to the point past which the
    head's left part (columns j <= i) always keeps something."""
    if (spec.topk or spec.dense or spec.window or spec.window_tokens or spec.sink or spec.sink_tokens):
        return None
    guarantees = []
    if spec.residues:
        guarantees.append(min(r for _, r in spec.residues))
    if spec.relative:
        guarantees.append(spec.window - 1 + min(spec.relative))
    if not guarantees and spec.global_rows and causal:
        return f"query blocks {spec.global_rows} and later (only the first {spec.global_rows} are global)"
    bound = max(min(guarantees) if guarantees else 0, -(-prefix // block)) + 1
    lengths = [bound] if causal else range(1, bound + spec.ahead + max(spec.relative, default=0)
                                           + max((r for _, r in spec.residues), default=0)
                                           + spec.global_rows + 3)
    if max(lengths, default=0) > 4096:
        raise AnalysisLimit(f"deciding which rows are empty needs sequences of {max(lengths)} blocks (the head's "
                            "first kept column is that far); give the head a window or a sink")
    empty, where = set(), 0
    p = Pattern("_", block, 1, 1, causal, (spec,), prefix=prefix)
    for n in lengths:
        rows = (~p.block_mask(n)[0].any(-1)).nonzero().flatten().tolist()
        if rows:
            empty.update(rows)
            where = n
    if not empty:
        return None
    rows = sorted(empty)
    shown = f"query block {rows[0]}" if len(rows) == 1 else f"query blocks {rows[0]}..{rows[-1]}"
    if causal:
        return f"{shown} (rows before the head's first kept block)"
    return f"{shown} in sequences of up to {where} blocks (the last row of a sequence sees nothing ahead)"


# ------------------------------------------------------------------------ kv efficiency
def _kv_efficient(spec: HeadSpec) -> bool:
    """Is the set of queries i >= j keeping block j an interval starting at j, for all j?

    Column j of a static head is the union of ``[j, j+W)`` (window) and, for a special
    column, ``[j, oo)`` (sink / residue / dense): intervals that all start at j, hence an
    interval starting at j — a block once dropped is never needed again.  A topk head may
    pick any past block at any step, so it cannot evict.
    """
    if spec.topk or spec.relative:  # a relative stride keeps j again every S query blocks
        return False
    starts = [0] if spec.window else []
    if spec.dense or spec.sink or spec.residues:
        starts.append(0)
    return all(s == 0 for s in starts)


# --------------------------------------------------------------------------- analyze
def _group_and_union_forms(pattern, forms, bytes_per_block, bound_bytes_per_block=0):
    b = pattern.block
    groups = []
    g = pattern.group_size
    for kv_head in range(pattern.kv_heads):
        members = tuple(range(kv_head * g, (kv_head + 1) * g))
        gc, gce, _ = _coverage(pattern, members)
        specs = [pattern.head_specs[h] for h in members]
        if any(s.topk or s.relative for s in specs):
            gkv = N
        else:
            gkv = forms(_union(specs, b))[2]
        kv_bytes = bytes_per_block * gkv
        if any(t.by == "bound" for s in specs if not s.dense for t in s.topk):  # the pages' key min / max
            kv_bytes = kv_bytes + bound_bytes_per_block * N
        groups.append(GroupCoverage(kv_head, members, gc, gce, kv_bytes))

    union = _union(pattern.head_specs, b)
    _, union_total, _, union_lim, union_exact = forms(union, _union_rel(pattern.head_specs))
    return groups, union_total, union_lim, union_exact


def analyze(pattern: Pattern, *, head_dim: int = 128, dtype_bytes: int = 2) -> PatternReport:
    """Prove coverage, non-empty rows and KV-efficiency of ``pattern``; derive its costs.

    Never builds a mask: every verdict comes from the heads' integers, every cost is a
    sympy closed form in ``N`` (blocks) or ``i`` (query block).
    """
    b = pattern.block
    bytes_per_block = 2 * b * head_dim * dtype_bytes  # K and V
    flops_per_block = 4 * b * b * head_dim            # QK^T and PV

    covered, ce, reason = _coverage(pattern, range(pattern.heads))
    reason = f"covered for every sequence length: {reason}" if covered else f"not covered: {reason}"
    costs: List[HeadCost] = []
    empty: List[Tuple[int, str]] = []
    prefix_blocks = -(-pattern.prefix // b)

    def forms(spec, rel=None):
        if spec.is_classic and not prefix_blocks and not (rel and any(rel)):
            return (*_head_forms(spec, pattern.causal), True)
        return _extended_forms(spec, pattern.causal, prefix_blocks, b, rel)

    for h, spec in enumerate(pattern.head_specs):
        try:
            row, total, kv, lim, exact = forms(_static(spec))
        except AnalysisLimit as exc:
            raise AnalysisLimit(f"pattern {pattern.name}: {reason}; but head {h} has no short closed form for "
                                f"its costs ({exc})") from None
        eff = _kv_efficient(spec)
        kv_blocks = N if spec.topk else kv
        kv_bytes = bytes_per_block * kv_blocks
        if any(t.by == "bound" for t in spec.topk) and not spec.dense:  # + each page's float32 key min / max
            kv_bytes = kv_bytes + 2 * head_dim * 4 * N
        costs.append(HeadCost(h, row, total, flops_per_block * total, kv_bytes, lim, eff, exact))
        desc = (_empty_rows(spec, pattern.causal) if spec.is_classic and not pattern.prefix
                else _empty_rows_extended(spec, pattern.causal, b, pattern.prefix))
        if desc is not None:
            empty.append((h, desc))


    try:
        groups, union_total, union_lim, union_exact = _group_and_union_forms(pattern, forms, bytes_per_block,
                                                                             2 * head_dim * 4)
    except AnalysisLimit as exc:
        raise AnalysisLimit(f"pattern {pattern.name}: {reason}; but the union of its heads has no short closed "
                            f"form for its costs ({exc})") from None
    return PatternReport(
        pattern=pattern.name, covered=covered, reason=reason, counterexample=ce,
        groups=tuple(groups), rows_nonempty=not empty, empty_rows=tuple(empty),
        kv_efficient=all(c.kv_efficient for c in costs), heads=tuple(costs),
        dynamic_heads=tuple(h for h, s in enumerate(pattern.head_specs) if s.topk),
        block=b, causal=pattern.causal, union_total_blocks=union_total, union_density_limit=union_lim,
        costs_exact=union_exact and all(c.exact for c in costs))
