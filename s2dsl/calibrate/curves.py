"""Recovery curves: the share of a head's attention mass that a budget of k blocks captures.

For each query block ``i`` (one row of the block mass matrix), with budget ``k`` blocks:

* ``topk``: the diagonal block plus the ``k - 1`` heaviest other blocks of the row -- what
  a pattern ``window 1  topk k-1`` keeps when its scores pick the best blocks (an oracle:
  the run-time estimate can only do worse);
* ``static``: the first block (a sink) plus the ``k - 1`` most recent blocks -- what
  ``sink 1  window k-1`` keeps.

A head's curve is the sum over rows of the captured mass divided by the number of query
tokens (each token's attention sums to 1), so ``curve[k]`` is in [0, 1], non-decreasing,
and 1 once k reaches the number of blocks. Rows are summed over every input of a length.
"""
from __future__ import annotations

from typing import Dict, List

import torch

__all__ = ["RecoveryAccumulator", "row_recovery"]


def row_recovery(mass: torch.Tensor, first_row: int) -> Dict[str, torch.Tensor]:
    """Captured mass per budget for a chunk of rows.

    ``mass``: (b, h, rows, nb) block masses of query blocks ``first_row ..``. Returns, per
    mode, (h, nb + 1) sums over the chunk's rows of the mass captured with budget k = 0..nb.
    """
    b, h, rows, nb = mass.shape
    idx = torch.arange(rows, device=mass.device) + first_row          # query block of each row
    cols = torch.arange(nb, device=mass.device)
    diag = mass.gather(3, idx.view(1, 1, rows, 1).expand(b, h, rows, 1)).squeeze(3)
    zero = mass.new_zeros(b, h, rows, 1)

    others = mass.masked_fill(cols.view(1, 1, 1, nb) == idx.view(1, 1, rows, 1), 0.0)
    best = torch.sort(others, dim=3, descending=True).values[..., :nb - 1]
    topk = torch.cat([zero, diag.unsqueeze(3) + torch.cat([zero, best.cumsum(3)], dim=3)], dim=3)

    # static: block 0, then distances 0, 1, 2, ... back from the diagonal (skipping block 0)
    sink = mass[..., 0]
    dist = idx.view(-1, 1) - cols.view(1, -1)                        # (rows, nb)
    valid = (dist >= 0) & (cols.view(1, -1) >= 1)
    by_dist = mass.new_zeros(b, h, rows, nb)
    by_dist.scatter_add_(3, dist.clamp(0, nb - 1).expand(b, h, rows, nb),
                         mass * valid.to(mass.dtype))
    static = torch.cat([zero, sink.unsqueeze(3) + torch.cat([zero, by_dist.cumsum(3)[..., :nb - 1]], dim=3)], dim=3)
    return {"topk": topk.sum(dim=(0, 2)), "static": static.sum(dim=(0, 2))}


class RecoveryAccumulator:
    """Collects per-layer captured-mass sums during forward passes (see ``capture``)."""

    def __init__(self, block: int, max_elements: int = 1 << 26):
        self.block, self.max_elements = block, max_elements
        self.sums: Dict[int, Dict[str, torch.Tensor]] = {}
        self.tokens: Dict[int, float] = {}

    def add(self, layer: int, first_row: int, mass: torch.Tensor) -> None:
        rec = row_recovery(mass, first_row)
        store = self.sums.setdefault(layer, {})
        for mode, v in rec.items():
            store[mode] = store[mode] + v if mode in store else v
        self.tokens[layer] = self.tokens.get(layer, 0.0) + float(mass[:, 0].sum())

    def curves(self) -> Dict[str, List[torch.Tensor]]:
        """Per mode, one (h, nb + 1) curve per layer (layers in index order), on the CPU."""
        layers = sorted(self.sums)
        # dividing by the full budget's capture (= the query tokens, up to rounding) makes
        # curve[nb] exactly 1
        return {mode: [(self.sums[l][mode].double() / self.sums[l][mode][:, -1:].double()).clamp(max=1.0).cpu()
                       for l in layers]
                for mode in ("topk", "static")}
