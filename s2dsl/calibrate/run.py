"""``calibrate``: run a causal LM on calibration tokens, measure every head's recovery curve,
choose per-head budgets, and write a .s2 model plan, a JSON report and a PNG of the curves.

The token stream is cut into non-overlapping sequences of each calibration length (up to
``samples`` per length); each runs through the model once with the chunked capture
attention (``capture``). Budgets are chosen on the longest length's curves, averaged over
its samples; the other samples and lengths measure how stable the budgets are.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from . import budgets as B
from .capture import MAX_CHUNK_ELEMENTS, capturing
from .curves import RecoveryAccumulator
from .emit import emit_plan

__all__ = ["Calibration", "calibrate", "write_outputs", "CalibrationError"]

MODES = ("topk", "static")


class CalibrationError(ValueError):
    """The calibration cannot run as asked (too little text, bad lengths or budgets)."""


@dataclass
class Calibration:
    model: str
    block: int
    heads: int
    kv_heads: int
    layers: int
    lengths: List[int]
    samples: Dict[int, int]
    target: float
    mode: str
    #: per length, per sample, per mode: one (heads, nb + 1) curve per layer
    sample_curves: Dict[int, List[Dict[str, List[torch.Tensor]]]] = field(repr=False)
    target_budgets: List[List[int]] = field(default_factory=list)
    budgets: List[List[int]] = field(default_factory=list)
    totals: List[int] = field(default_factory=list)
    _mean_curves: Dict[tuple, List[torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def budget_length(self) -> int:
        return max(self.lengths)

    def n_blocks(self, length: int) -> int:
        return -(-length // self.block)

    def curves(self, length: int, mode: Optional[str] = None) -> List[torch.Tensor]:
        """Per layer, the (heads, nb + 1) curve averaged over the length's samples (averaged
        once: the per-layer statistics ask for them layer after layer)."""
        mode = mode or self.mode
        key = (length, mode)
        if key not in self._mean_curves:
            runs = self.sample_curves[length]
            self._mean_curves[key] = [torch.stack([r[mode][l] for r in runs]).mean(0) for l in range(self.layers)]
        return self._mean_curves[key]

    @property
    def k_min(self) -> int:
        return 1 if self.mode == "topk" else 2

    # -------------------------------------------------------------------- statistics
    def layer_stats(self, layer: int) -> dict:
        lb = self.budget_length
        nb = self.n_blocks(lb)
        curve = self.curves(lb)[layer]
        chosen, tb = self.budgets[layer], self.target_budgets[layer]
        rec_chosen, rec_target = B.recovery_at(curve, chosen), B.recovery_at(curve, tb)
        out = {"layer": layer, "total_budget": self.totals[layer], "target_budgets": tb, "budgets": chosen,
               "recovery_at_target_budgets": rec_target, "recovery_at_budgets": rec_chosen,
               "min_recovery_target_budgets": min(rec_target), "min_recovery_budgets": min(rec_chosen),
               "heterogeneity": B.heterogeneity(tb, nb)}
        # across inputs: each sample's own target budgets vs the mean's
        runs = self.sample_curves[lb]
        if len(runs) > 1:
            per_sample = [B.target_budgets(r[self.mode][layer], self.target, self.k_min) for r in runs]
            rec = torch.tensor([B.recovery_at(r[self.mode][layer], chosen) for r in runs], dtype=torch.float64)
            rhos = [B.spearman(a, b) for i, a in enumerate(per_sample) for b in per_sample[i + 1:]]
            rhos = [r for r in rhos if not math.isnan(r)]
            out["across_inputs"] = {
                "samples": len(runs),
                "budget_mean_abs_deviation_fraction": float(torch.tensor(per_sample, dtype=torch.float64)
                                                             .sub(torch.tensor(tb, dtype=torch.float64))
                                                             .abs().mean()) / nb,
                "recovery_std_at_budgets_mean": float(rec.std(0).mean()),
                "recovery_std_at_budgets_max": float(rec.std(0).max()),
                "budget_rank_correlation_mean": sum(rhos) / len(rhos) if rhos else None}
        # across lengths: target budgets as fractions of the context, and what the chosen
        # budgets (in blocks) recover at the other lengths
        lengths = {}
        for length in self.lengths:
            if length == lb:
                continue
            c = self.curves(length)[layer]
            nl = self.n_blocks(length)
            tl = B.target_budgets(c, self.target, self.k_min)
            rho = B.spearman(tl, tb)
            rec_l = B.recovery_at(c, chosen)
            lengths[str(length)] = {"target_budget_fractions": [b / nl for b in tl],
                                    "budget_rank_correlation": None if math.isnan(rho) else rho,
                                    "recovery_at_budgets_min": min(rec_l),
                                    "recovery_at_budgets_mean": sum(rec_l) / len(rec_l)}
        out["across_lengths"] = lengths
        return out

    def report(self) -> dict:
        layers = [self.layer_stats(l) for l in range(self.layers)]

        def mean_of(path):
            vals = []
            for s in layers:
                v = s
                for p in path:
                    v = v.get(p) if isinstance(v, dict) else None
                if isinstance(v, (int, float)) and not math.isnan(v):
                    vals.append(float(v))
            return sum(vals) / len(vals) if vals else None

        summary = {
            "min_recovery_target_budgets": min(s["min_recovery_target_budgets"] for s in layers),
            "min_recovery_budgets": min(s["min_recovery_budgets"] for s in layers),
            "budget_coefficient_of_variation_mean": mean_of(["heterogeneity", "coefficient_of_variation"]),
            "budget_max_over_min_mean": mean_of(["heterogeneity", "max_over_min"]),
            "across_inputs_budget_rank_correlation_mean": mean_of(["across_inputs", "budget_rank_correlation_mean"]),
            "across_inputs_recovery_std_mean": mean_of(["across_inputs", "recovery_std_at_budgets_mean"]),
            "mean_budget_fraction": sum(sum(b) for b in self.budgets)
            / (self.layers * self.heads * self.n_blocks(self.budget_length)),
        }
        for length in self.lengths:
            if length != self.budget_length:
                summary[f"across_lengths_{length}_rank_correlation_mean"] = mean_of(
                    ["across_lengths", str(length), "budget_rank_correlation"])
                summary[f"across_lengths_{length}_recovery_min"] = min(
                    s["across_lengths"][str(length)]["recovery_at_budgets_min"] for s in layers)
        nb = self.n_blocks(self.budget_length)
        grid = _grid(nb)
        curves = {str(length): {mode: [[[float(c[h, min(k, c.shape[1] - 1)]) for k in _grid(c.shape[1] - 1)]
                                        for h in range(self.heads)] for c in self.curves(length, mode)]
                                for mode in MODES}
                  for length in self.lengths}
        return {"model": self.model, "block": self.block, "heads": self.heads, "kv_heads": self.kv_heads,
                "layers": self.layers, "lengths": self.lengths, "samples": {str(k): v for k, v in self.samples.items()},
                "target": self.target, "mode": self.mode, "budget_length": self.budget_length,
                "budget_unit": "kv blocks per query block", "n_blocks": nb, "summary": summary,
                "per_layer": layers,
                "curve_grid": {str(length): _grid(self.n_blocks(length)) for length in self.lengths},
                "curves": curves, "_grid_note": f"curves[length][mode][layer][head][g] is the recovery at budget "
                                                f"curve_grid[length][g] (budget grid of {len(grid)} points at "
                                                f"{self.budget_length} tokens)"}

    def s2_text(self, *, cover: bool = False, model_name: str = "calibrated") -> str:
        header = [f"calibrated by s2dsl calibrate from {self.model}",
                  f"target recovery {self.target} at {self.budget_length} tokens ({self.mode} budgets, "
                  f"block {self.block}); lengths {', '.join(map(str, self.lengths))}",
                  f"budgets: max-min at a total of {', '.join(map(str, sorted(set(self.totals))))} blocks per layer"]
        return emit_plan(self.budgets, n_blocks=self.n_blocks(self.budget_length), block=self.block,
                         heads=self.heads, kv_heads=self.kv_heads, mode=self.mode, model_name=model_name,
                         cover=cover, header=header)

    def plot(self, path: str) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        lb = self.budget_length
        nb = self.n_blocks(lb)
        cols = min(4, self.layers)
        rows = -(-self.layers // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
        x = torch.arange(nb + 1).double() / nb
        for layer, curve in enumerate(self.curves(lb)):
            ax = axes[layer // cols][layer % cols]
            colours = plt.cm.viridis(torch.linspace(0, 1, self.heads).numpy())
            for h in range(self.heads):
                ax.plot(x.numpy(), curve[h].numpy(), color=colours[h], lw=0.8)
                k = self.budgets[layer][h]
                ax.plot([k / nb], [float(curve[h, k])], "o", color=colours[h], ms=2.5)
            ax.axhline(self.target, color="red", lw=0.6, ls="--")
            ax.set_xscale("symlog", linthresh=1 / nb)
            ax.set_ylim(0, 1.02)
            ax.set_xlim(0, 1.05)
            ax.set_title(f"layer {layer}", fontsize=9)
            ax.set_xlabel("budget (fraction of kv blocks)", fontsize=8)
            ax.set_ylabel("recovery", fontsize=8)
        for extra in range(self.layers, rows * cols):
            axes[extra // cols][extra % cols].axis("off")
        fig.suptitle(f"{self.mode} recovery per head at {lb} tokens (dots: chosen budgets; dashed: target "
                     f"{self.target})", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _grid(nb: int, points: int = 64) -> List[int]:
    """Budgets 0..nb: all of them when few, else about ``points`` spread geometrically."""
    if nb + 1 <= points:
        return list(range(nb + 1))
    ks = {0, 1, nb}
    for t in range(points):
        ks.add(int(round(nb ** (t / (points - 1)))))
    return sorted(ks)


def _model_shape(model):
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, config.num_hidden_layers


def calibrate(model, ids: torch.Tensor, *, lengths: Sequence[int], samples: int = 4, block: int = 64,
              target: float = 0.95, total_budget: Optional[float] = None, mode: str = "topk",
              max_elements: int = MAX_CHUNK_ELEMENTS, name: Optional[str] = None,
              progress=None) -> Calibration:
    """Measure recovery curves of every head of ``model`` on ``ids`` and choose budgets.

    ``ids``: a 1-D stream of token ids. ``lengths``: calibration lengths in tokens (budgets
    come from the longest). ``total_budget``: per layer, the sum over heads of the budgets
    in kv blocks per query block (> 1), or a fraction of the dense total (<= 1); default: the
    sum of the target budgets.
    """
    if mode not in MODES:
        raise CalibrationError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0 < target <= 1:
        raise CalibrationError(f"--target {target} must be in (0, 1]")
    if block < 1 or block & (block - 1) or block < 16:
        raise CalibrationError(f"--block {block} must be a power of two >= 16")
    if samples < 1:
        raise CalibrationError(f"--samples {samples} must be >= 1")
    ids = torch.as_tensor(ids).flatten().long()
    lengths = sorted({int(x) for x in lengths})
    if not lengths or lengths[0] < 2 * block:
        raise CalibrationError(f"calibration lengths must be at least two blocks ({2 * block} tokens); got {lengths}")
    if len(ids) < lengths[-1]:
        raise CalibrationError(f"the calibration text has {len(ids)} tokens, fewer than the longest length "
                               f"{lengths[-1]}: give more text or shorter --lengths")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise CalibrationError(f"token ids must be in 0..{vocab - 1} for this model; got {int(ids.min())}.."
                               f"{int(ids.max())}")
    heads, kv_heads, layers = _model_shape(model)
    device = next(model.parameters()).device
    sample_curves: Dict[int, List[Dict[str, List[torch.Tensor]]]] = {}
    counts = {}
    model.eval()
    for length in lengths:
        n = min(samples, len(ids) // length)
        counts[length] = n
        runs = []
        for s in range(n):
            acc = RecoveryAccumulator(block, max_elements)
            with capturing(model, acc), torch.no_grad():
                model(input_ids=ids[s * length:(s + 1) * length].view(1, -1).to(device), use_cache=False)
            curves = acc.curves()
            if len(curves["topk"]) != layers:
                raise CalibrationError(f"captured attention in {len(curves['topk'])} layers of {layers}: the model "
                                       "must run its attention through transformers' attention interface")
            runs.append(curves)
            if progress:
                progress(f"length {length}: sample {s + 1}/{n}")
        sample_curves[length] = runs
    cal = Calibration(name or type(model).__name__, block, heads, kv_heads, layers, lengths, counts, target, mode,
                      sample_curves)
    nb = cal.n_blocks(cal.budget_length)
    for curve in cal.curves(cal.budget_length):
        tb = B.target_budgets(curve, target, cal.k_min)
        if total_budget is None:
            total = sum(tb)
        elif total_budget <= 1:
            total = int(round(total_budget * nb * heads))
        else:
            total = int(round(total_budget))
        try:
            chosen = B.max_min_budgets(curve, total, cal.k_min)
        except ValueError as exc:
            raise CalibrationError(f"--total-budget: {exc}") from None
        cal.target_budgets.append(tb)
        cal.budgets.append(chosen)
        cal.totals.append(total)
    return cal


def write_outputs(cal: Calibration, prefix: str, *, cover: bool = False) -> Dict[str, str]:
    """PREFIX.s2, PREFIX.json, PREFIX.png; the .s2 is parsed back before it is written."""
    from ..frontend import parse
    directory = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(directory, exist_ok=True)
    text = cal.s2_text(cover=cover)
    parse(text, prefix + ".s2")  # an emitter bug must not leave a file `s2dsl check` refuses
    paths = {"s2": prefix + ".s2", "json": prefix + ".json", "png": prefix + ".png"}
    with open(paths["s2"], "w", encoding="utf-8") as f:
        f.write(text)
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(cal.report(), f, indent=1)
    cal.plot(paths["png"])
    return paths
