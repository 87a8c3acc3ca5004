"""Per-head budgets from recovery curves, and the statistics S-HPLB's premise rests on.

* ``target_budgets``: per head, the smallest budget whose recovery reaches the target.
* ``max_min_budgets``: at a fixed total (blocks per query block, summed over the heads),
  the budgets that maximise the smallest recovery of any head; blocks left over go, one at
  a time, to the head whose recovery is then lowest. Starting from the target budgets'
  total, this is S-HPLB's max-min shift: heads far above the floor give up blocks to the
  ones at it, and the floor rises.
* ``heterogeneity`` / ``stability`` / ``spearman``: numbers, not assumptions.
"""
from __future__ import annotations

import heapq
import math
from typing import Dict, List, Sequence

import torch

__all__ = ["target_budgets", "max_min_budgets", "recovery_at", "heterogeneity", "spearman"]

TOL = 1e-9


def _first_reaching(curve: torch.Tensor, level: float, k_min: int) -> int:
    hit = (curve[k_min:] >= level - TOL).nonzero()
    return k_min + int(hit[0]) if len(hit) else len(curve) - 1


def target_budgets(curves: torch.Tensor, target: float, k_min: int = 1) -> List[int]:
    """Smallest k >= k_min with curve[k] >= target, per head (curves: (h, nb + 1))."""
    if not 0 < target <= 1:
        raise ValueError(f"target recovery {target} must be in (0, 1]")
    return [_first_reaching(c, target, k_min) for c in curves]


def recovery_at(curves: torch.Tensor, budgets: Sequence[int]) -> List[float]:
    nb = curves.shape[1] - 1
    return [float(c[min(int(k), nb)]) for c, k in zip(curves, budgets)]


def max_min_budgets(curves: torch.Tensor, total: int, k_min: int = 1) -> List[int]:
    """Budgets summing to ``total`` that maximise min over heads of curve_h(k_h).

    The best floor is the largest curve value ``t`` for which the smallest budgets reaching
    ``t`` fit in ``total`` (binary search over the sorted curve values; feasibility is
    monotone in t). Leftover blocks go to the lowest head one at a time, never past the
    number of blocks.
    """
    h, width = curves.shape
    nb = width - 1
    lo_total, hi_total = h * k_min, h * nb
    if not lo_total <= total <= hi_total:
        raise ValueError(f"a total budget of {total} blocks cannot be split over {h} heads with "
                         f"{k_min}..{nb} blocks each: use {lo_total}..{hi_total}")
    values = torch.unique(curves[:, k_min:].flatten()).tolist()

    def need(t: float) -> List[int]:
        return [_first_reaching(c, t, k_min) for c in curves]

    lo, hi = 0, len(values) - 1  # values[lo] is feasible (every head reaches its own minimum... )
    best = [k_min] * h
    while lo <= hi:
        mid = (lo + hi) // 2
        budgets = need(values[mid])
        if sum(budgets) <= total and all(float(c[k]) >= values[mid] - TOL for c, k in zip(curves, budgets)):
            best, lo = budgets, mid + 1
        else:
            hi = mid - 1
    left = total - sum(best)
    heap = [(float(curves[i, best[i]]), i) for i in range(h) if best[i] < nb]
    heapq.heapify(heap)
    while left > 0 and heap:
        _, i = heapq.heappop(heap)
        best[i] += 1
        left -= 1
        if best[i] < nb:
            heapq.heappush(heap, (float(curves[i, best[i]]), i))
    return best


def heterogeneity(budgets: Sequence[int], n_blocks: int) -> Dict[str, float]:
    """Spread of per-head budgets at one length (as fractions of the context)."""
    x = torch.tensor([float(b) for b in budgets], dtype=torch.float64)
    mean = float(x.mean())
    return {"min_fraction": float(x.min()) / n_blocks, "median_fraction": float(x.median()) / n_blocks,
            "max_fraction": float(x.max()) / n_blocks, "max_over_min": float(x.max() / x.min()) if x.min() > 0 else math.inf,
            "coefficient_of_variation": float(x.std(unbiased=False)) / mean if mean else 0.0}


def _ranks(x: Sequence[float]) -> torch.Tensor:
    """Ranks with ties averaged."""
    t = torch.tensor([float(v) for v in x], dtype=torch.float64)
    order = torch.argsort(t)
    ranks = torch.empty_like(t)
    ranks[order] = torch.arange(len(t), dtype=torch.float64)
    for v in torch.unique(t):
        sel = t == v
        ranks[sel] = ranks[sel].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (nan when either side is constant)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")
