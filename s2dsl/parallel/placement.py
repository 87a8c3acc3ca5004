"""Head placement for head-parallel attention: which GPU runs which heads.

Attention time per head is known before anything runs: the analyzer's closed forms give
the number of block pairs each head attends at a sequence length, and a kernel's time is
proportional to that (or, when given, per-head times measured on the GPU). Balancing the
per-GPU sums is multiway number partitioning; S-HPLB uses longest-processing-time-first.

The unit of placement is a kv group (the q heads sharing one kv head): splitting a group
would put its K/V on two GPUs. With ``kv_heads == heads`` every head is its own group.

``place`` starts from three assignments -- LPT, Karmarkar-Karp's largest differencing
method, and the contiguous split -- improves each by moves and pairwise swaps out of the
most loaded GPU until none lowers the pair's maximum, and keeps the best. Keeping the
contiguous split among the starts guarantees the result is never worse than it; LPT
among them keeps Graham's bound (makespan <= (4/3 - 1/(3G)) of the optimum).
"""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..pattern import Pattern
from ..printer import format_ranges

__all__ = ["Placement", "PlacementError", "head_costs", "group_costs", "place", "place_weights",
           "place_layers", "lpt", "karmarkar_karp", "contiguous", "refine", "makespan", "imbalance"]


class PlacementError(ValueError):
    """The heads cannot be placed as asked (more GPUs than kv groups, bad measured times)."""


@dataclass(frozen=True)
class Placement:
    """Heads per GPU; ``assignment[g]`` lists GPU g's q heads in ascending order, whole kv groups."""

    pattern: str
    gpus: int
    seq_len: int
    assignment: Tuple[Tuple[int, ...], ...]
    loads: Tuple[float, ...]
    naive_loads: Tuple[float, ...]
    method: str
    cost_unit: str

    @property
    def imbalance(self) -> float:
        return imbalance(self.loads)

    @property
    def naive_imbalance(self) -> float:
        return imbalance(self.naive_loads)

    def table(self) -> List[str]:
        """Human-readable lines: one row per GPU, then the contiguous split for comparison."""
        unit = "ms" if self.cost_unit == "measured" else "blocks"
        total = sum(self.loads)
        rows = [["gpu", "heads", f"load ({unit})", "share"]]
        for g, (heads, load) in enumerate(zip(self.assignment, self.loads)):
            shown = f"{load:,.0f}" if unit == "blocks" else f"{load:.4g}"
            rows.append([str(g), format_ranges(heads), shown, f"{100 * load / total:.1f}%" if total else "-"])
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        lines = [f"pattern {self.pattern}: {self.gpus} GPUs, {self.seq_len} tokens, cost = {unit} per head "
                 f"({self.method})"]
        lines += ["  " + "  ".join(c.rjust(w) if k >= 2 else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths)))
                  for r in rows]
        speedup = max(self.naive_loads) / max(self.loads) if max(self.loads) else 1.0
        lines.append(f"  imbalance (max/mean) {self.imbalance:.4f}; contiguous split {self.naive_imbalance:.4f} "
                     f"(slowest GPU {speedup:.3f}x faster than the contiguous split's)")
        return lines

    def to_json(self) -> dict:
        return {"pattern": self.pattern, "gpus": self.gpus, "seq_len": self.seq_len,
                "assignment": [list(a) for a in self.assignment], "loads": list(self.loads),
                "imbalance": self.imbalance, "naive_loads": list(self.naive_loads),
                "naive_imbalance": self.naive_imbalance, "max_load": max(self.loads),
                "naive_max_load": max(self.naive_loads),
                "speedup_vs_contiguous": max(self.naive_loads) / max(self.loads) if max(self.loads) else 1.0,
                "method": self.method, "cost_unit": self.cost_unit}


# ------------------------------------------------------------------------------ costs
def head_costs(pattern: Pattern, seq_len: int) -> List[float]:
    """Block pairs each head attends at ``seq_len`` tokens (proportional to its FLOPs).

    Static parts come from the analyzer's closed form ``total_blocks(N)``. A ``topk K``
    head adds up to ``K`` blocks per query block, never more than the causal row holds;
    the row-by-row minimum is summed from the closed form of its static row, so this is
    exact when the top-k blocks never repeat a static one (the kernels' contract).
    """
    from ..analysis import analyze, evaluate
    if seq_len < 1:
        raise PlacementError(f"sequence length {seq_len} must be >= 1 token")
    n = -(-seq_len // pattern.block)
    report = analyze(pattern)
    out = []
    for h, (spec, cost) in enumerate(zip(pattern.head_specs, report.heads)):
        total = evaluate(cost.total_blocks, N=n)
        extra = sum(t.k for t in spec.topk)
        if extra and pattern.causal:
            total = _causal_topk_total(cost, n, extra)
        elif extra:
            total = sum(min(n, evaluate(cost.row_blocks, i=i, N=n) + extra) for i in range(n))
        out.append(float(total))
    return out


def _causal_topk_total(cost, n: int, k: int) -> int:
    """sum over rows i < n of min(i + 1, r(i) + k), r = the static row count.

    A causal row gains at most one static block per step (the window grows by one, or one
    special column leaves it), so ``i + 1 - r(i)`` never decreases: the rows where the top-k
    fill the whole causal row are a prefix ``i < t``, found by bisection. The rest sum from
    the closed form of the total, ``total(N) = sum_{i<N} r(i)``: O(log n) evaluations.
    """
    from ..analysis import evaluate

    def full(i):  # does row i see everything?
        return i + 1 <= evaluate(cost.row_blocks, i=i) + k

    lo, hi = 0, n  # t = first row that does not see everything (n if none)
    while lo < hi:
        mid = (lo + hi) // 2
        if full(mid):
            lo = mid + 1
        else:
            hi = mid
    t = lo
    rest = evaluate(cost.total_blocks, N=n) - (evaluate(cost.total_blocks, N=t) if t else 0)
    return t * (t + 1) // 2 + rest + k * (n - t)


def group_costs(pattern: Pattern, per_head: Sequence[float]) -> List[float]:
    g = pattern.group_size
    return [float(sum(per_head[k * g:(k + 1) * g])) for k in range(pattern.kv_heads)]


# ------------------------------------------------------------------------- partitioning
Bins = List[List[int]]


def makespan(weights: Sequence[float], bins: Bins) -> float:
    return max(sum(weights[i] for i in b) for b in bins)


def imbalance(loads: Sequence[float]) -> float:
    """max / mean of the per-GPU loads (1.0 is perfect balance)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def lpt(weights: Sequence[float], bins: int) -> Bins:
    """Longest processing time first: heaviest item to the least loaded bin."""
    out: Bins = [[] for _ in range(bins)]
    heap = [(0.0, b) for b in range(bins)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, b = heapq.heappop(heap)
        out[b].append(i)
        heapq.heappush(heap, (load + weights[i], b))
    return out


def karmarkar_karp(weights: Sequence[float], bins: int) -> Bins:
    """The largest differencing method for ``bins``-way partitioning.

    Every item starts as a partial partition (the item alone in one subset); the two
    partitions with the largest spread are merged, largest subset with smallest, until one
    is left.
    """
    heap = []
    counter = itertools.count()
    for i, w in enumerate(weights):
        subsets = [(float(w), [i])] + [(0.0, []) for _ in range(bins - 1)]
        heapq.heappush(heap, (-float(w), next(counter), subsets))
    if not heap:
        return [[] for _ in range(bins)]
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        a = sorted(a, key=lambda s: -s[0])
        b = sorted(b, key=lambda s: s[0])
        merged = sorted(((sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, b)), key=lambda s: -s[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), next(counter), merged))
    return [sorted(items) for _, items in heap[0][2]]


def contiguous(n_items: int, bins: int) -> Bins:
    """Items 0.. in order, split into ``bins`` runs whose sizes differ by at most one."""
    base, extra = divmod(n_items, bins)
    out, start = [], 0
    for b in range(bins):
        size = base + (b < extra)
        out.append(list(range(start, start + size)))
        start += size
    return out


def refine(weights: Sequence[float], bins: Bins) -> Bins:
    """Moves and pairwise swaps out of the most loaded bin while they lower the maximum.

    A move or swap between the heaviest bin and another is taken when the larger of the two
    new loads is below the heaviest load; each step lowers the multiset of loads, so it ends.
    """
    bins = [list(b) for b in bins]
    loads = [sum(weights[i] for i in b) for b in bins]
    eps = 1e-12 * max(1.0, sum(weights))
    while True:
        top = max(range(len(bins)), key=lambda b: loads[b])
        best: Optional[Tuple[float, int, Optional[int], int]] = None  # (new max of pair, item, other item, bin)
        for o in range(len(bins)):
            if o == top:
                continue
            for x in bins[top]:
                new = max(loads[top] - weights[x], loads[o] + weights[x])
                if new < loads[top] - eps and (best is None or new < best[0]):
                    best = (new, x, None, o)
                for y in bins[o]:
                    d = weights[x] - weights[y]
                    if d <= 0:
                        continue
                    new = max(loads[top] - d, loads[o] + d)
                    if new < loads[top] - eps and (best is None or new < best[0]):
                        best = (new, x, y, o)
        if best is None:
            return [sorted(b) for b in bins]
        _, x, y, o = best
        bins[top].remove(x)
        bins[o].append(x)
        loads[top] -= weights[x]
        loads[o] += weights[x]
        if y is not None:
            bins[o].remove(y)
            bins[top].append(y)
            loads[o] -= weights[y]
            loads[top] += weights[y]


def place_weights(weights: Sequence[float], bins: int) -> Tuple[Bins, str]:
    """Best of LPT, Karmarkar-Karp and the contiguous split, each refined; ties prefer LPT."""
    if bins < 1:
        raise PlacementError(f"--gpus must be >= 1, got {bins}")
    if bins > len(weights):
        raise PlacementError(f"cannot place {len(weights)} kv groups on {bins} GPUs with every GPU busy: "
                             f"use at most {len(weights)} GPUs (GQA groups are kept whole)")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise PlacementError("head costs must be finite and >= 0")
    starts = [("lpt", lpt(weights, bins)), ("karmarkar-karp", karmarkar_karp(weights, bins)),
              ("contiguous", contiguous(len(weights), bins))]
    best = None
    for name, start in starts:
        result = refine(weights, start)
        key = makespan(weights, result)
        if best is None or key < best[0]:
            best = (key, result, name)
    return best[1], best[2] + "+swaps"


def place(pattern: Pattern, gpus: int, seq_len: int, *,
          measured: Optional[Sequence[float]] = None) -> Placement:
    """Place ``pattern``'s heads on ``gpus`` GPUs for prefill at ``seq_len`` tokens.

    ``measured``: per q head times (e.g. ms from a benchmark) to balance instead of the
    analyzer's block counts.
    """
    if measured is not None:
        measured = [float(x) for x in measured]
        if len(measured) != pattern.heads:
            raise PlacementError(f"{len(measured)} measured head times for {pattern.heads} heads")
        per_head, unit = measured, "measured"
    else:
        per_head, unit = head_costs(pattern, seq_len), "blocks"
    weights = group_costs(pattern, per_head)
    bins, method = place_weights(weights, gpus)
    g = pattern.group_size

    def heads_of(groups):
        return tuple(h for k in sorted(groups) for h in range(k * g, (k + 1) * g))

    def loads_of(b):
        return tuple(float(sum(weights[k] for k in groups)) for groups in b)

    # GPUs listed by their first head, so a balanced contiguous split maps to itself
    bins = sorted(bins, key=lambda b: min(b) if b else math.inf)
    naive = contiguous(len(weights), gpus)
    return Placement(pattern.name, gpus, seq_len, tuple(heads_of(b) for b in bins), loads_of(bins),
                     loads_of(naive), method, unit)


def place_layers(patterns: Sequence[Pattern], gpus: int, seq_len: int) -> List[Placement]:
    """One placement per layer: each layer's weights can be split its own way."""
    memo: Dict[str, Placement] = {}
    out = []
    for p in patterns:
        key = p.fingerprint()
        if key not in memo:
            memo[key] = place(p, gpus, seq_len)
        out.append(memo[key])
    return out


def brute_force_makespan(weights: Sequence[float], bins: int) -> float:
    """The optimum by enumeration (for tests on small instances)."""
    best = math.inf
    for labels in itertools.product(range(bins), repeat=len(weights)):
        loads = [0.0] * bins
        for w, b in zip(weights, labels):
            loads[b] += w
        best = min(best, max(loads))
    return best
