"""Unions of residue classes ``{x : x % m == r}``: do they cover the integers, which
residues do they miss, and their inclusion-exclusion terms.

Deciding whether congruence classes cover Z is hard in general (the lcm of the moduli can
be astronomically large: moduli 2..33 have lcm 1.4e14), so nothing here enumerates a full
period unless it is small.  Instead:

* a period up to ``SIEVE_LIMIT`` is sieved with bytearray slices (C speed, exact);
* otherwise, if the densities ``sum 1/m`` add up to less than 1 the classes cannot cover,
  and a short sieve from 0 finds a witness;
* otherwise the integers are split by the residue of a prime ``p`` dividing some modulus:
  on ``x = a + p*y`` a class with ``p | m`` survives only for ``a == r (mod p)`` and becomes
  ``(m/p, (r-a)/p)``; one with ``p`` coprime to ``m`` becomes ``(m, (r-a) * p^-1 mod m)``.
  Z is covered iff every branch is; a branch with a modulus-1 class is covered, one
  without classes is a witness.  The search is exact and bounded by ``SEARCH_BUDGET``
  branches; past that it refuses (``CoveringUndecided``) rather than hang.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

import sympy

from .errors import S2Error

Class = Tuple[int, int]

SIEVE_LIMIT = 1 << 22
WITNESS_WINDOW = 1 << 20
SEARCH_BUDGET = 200_000


class CoveringUndecided(S2Error):
    """The union of residue classes is too large to decide within the analyzer's budget."""


def canonical(classes: Iterable[Class]) -> Tuple[Class, ...]:
    """Distinct classes ``(m, r % m)`` without those implied by a coarser one (m' | m)."""
    cs = sorted({(m, r % m) for m, r in classes})
    return tuple((m, r) for m, r in cs
                 if not any((m2, r2) != (m, r) and m % m2 == 0 and r % m2 == r2 for m2, r2 in cs))


def period(classes: Sequence[Class]) -> int:
    return math.lcm(*(m for m, _ in classes)) if classes else 1


def sieve(classes: Sequence[Class], length: int) -> bytearray:
    """``out[x] == 1`` iff some class holds x, for 0 <= x < length."""
    out = bytearray(length)
    for m, r in classes:
        if r < length:
            out[r::m] = b"\x01" * len(range(r, length, m))
    return out


def uncovered(classes: Sequence[Class]) -> Optional[int]:
    """The least x >= 0 in no class, or None when the classes cover Z."""
    classes = canonical(classes)
    if any(m == 1 for m, _ in classes):
        return None
    if not classes:
        return 0
    big = period(classes)
    if big <= SIEVE_LIMIT:
        hit = sieve(classes, big)
        x = hit.find(0)
        return None if x < 0 else x
    window = sieve(classes, WITNESS_WINDOW)
    x = window.find(0)
    if x >= 0:
        return x
    return _search(classes)


def _search(classes: Sequence[Class]) -> Optional[int]:
    """Exact split-by-prime search (see the module docstring); a witness or None."""
    budget = [SEARCH_BUDGET]
    seen = {}

    def go(cs: Tuple[Class, ...]) -> Optional[Tuple[int, int]]:
        """None if ``cs`` covers Z, else (a, mod) describing witnesses y == a (mod mod)."""
        if any(m == 1 for m, _ in cs):
            return None
        if not cs:
            return (0, 1)
        if cs in seen:
            return seen[cs]
        budget[0] -= 1
        if budget[0] < 0:
            raise CoveringUndecided(
                f"deciding whether {len(classes)} residue classes (lcm {period(classes)}) cover every block "
                f"needs more than {SEARCH_BUDGET} case splits; use strides with a smaller common multiple")
        big = period(cs)
        if big <= 1 << 16:
            hit = sieve(cs, big)
            x = hit.find(0)
            out = None if x < 0 else (x, big)
            seen[cs] = out
            return out
        if sum(1.0 / m for m, _ in cs) < 1 - 1e-12:
            hit = sieve(cs, min(big, WITNESS_WINDOW))
            x = hit.find(0)
            if x >= 0:
                seen[cs] = (x, big)
                return (x, big)
        # split by the prime dividing the most moduli
        counts = {}
        for m, _ in cs:
            for p in sympy.primefactors(m):
                counts[p] = counts.get(p, 0) + 1
        p = max(counts, key=lambda q: (counts[q], q))
        out = None
        for a in range(p):
            sub = []
            for m, r in cs:
                if m % p == 0:
                    if r % p == a:
                        sub.append((m // p, (r - a) // p))
                else:
                    sub.append((m, ((r - a) * pow(p, -1, m)) % m))
            res = go(canonical(sub))
            if res is not None:
                y, mod = res
                out = (a + p * y, p * mod)
                break
        seen[cs] = out
        return out

    res = go(canonical(classes))
    return None if res is None else res[0] % res[1]


def missing_residues(classes: Sequence[Class], limit: int = SIEVE_LIMIT) -> Optional[Tuple[int, Tuple[int, ...]]]:
    """(smallest period d, residues mod d in no class) when the period is small enough to
    list them, else None.  Residue sets are rotation-invariant by their smallest period."""
    classes = canonical(classes)
    big = period(classes)
    if big > limit:
        return None
    hit = sieve(classes, big)
    for d in sympy.divisors(big):
        if hit[d:] + hit[:d] == hit:
            return d, tuple(x for x in range(d) if not hit[x])
    raise AssertionError("unreachable: the full period is a period")


def crt(a: Class, b: Class) -> Optional[Class]:
    """The intersection of two classes (a class, or None when empty)."""
    (m1, r1), (m2, r2) = a, b
    g = math.gcd(m1, m2)
    if (r2 - r1) % g:
        return None
    l = m1 // g * m2
    t = ((r2 - r1) // g * pow(m1 // g, -1, m2 // g)) % (m2 // g) if m2 // g > 1 else 0
    return l, (r1 + m1 * t) % l


MAX_TERMS = 256


def inclusion_exclusion(classes: Sequence[Class]) -> Optional[List[Tuple[int, int, int]]]:
    """Signed classes ``(sign, m, r)`` whose signed indicator sums to the union's indicator,
    or None when there would be more than ``MAX_TERMS`` (empty intersections are pruned)."""
    classes = canonical(classes)
    terms: List[Tuple[int, int, int]] = []
    # depth-first over subsets in index order; an empty intersection prunes its supersets
    stack = [(i, 1, classes[i]) for i in range(len(classes) - 1, -1, -1)]
    while stack:
        i, size, cls = stack.pop()
        terms.append((1 if size % 2 else -1, cls[0], cls[1]))
        if len(terms) > MAX_TERMS:
            return None
        for k in range(len(classes) - 1, i, -1):
            both = crt(cls, classes[k])
            if both is not None:
                stack.append((k, size + 1, both))
    return _merge(terms)


def _merge(terms):
    acc = {}
    for s, m, r in terms:
        acc[(m, r)] = acc.get((m, r), 0) + s
    return [(s, m, r) for (m, r), s in sorted(acc.items()) if s]
