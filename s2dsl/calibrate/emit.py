"""Per-head budgets -> .s2 text: one pattern per layer, heads grouped into ranges by budget."""
from __future__ import annotations

import re
from typing import List, Optional, Sequence

__all__ = ["head_body", "emit_plan"]


def head_body(budget: int, n_blocks: int, mode: str, heads: int, cover: bool) -> str:
    """The components of a head with ``budget`` blocks per query block.

    ``topk``: the diagonal plus ``budget - 1`` dynamic blocks; ``static``: a sink and a window
    of ``budget - 1`` blocks. A budget of the whole context is ``dense``. ``cover`` adds
    ``stride heads offset h`` so that the heads' union provably covers every block pair.
    """
    if budget >= n_blocks:
        return "dense"
    if mode == "topk":
        parts = ["window 1"] + ([f"topk {budget - 1}"] if budget > 1 else [])
    elif mode == "static":
        parts = ["sink 1", f"window {max(1, budget - 1)}"]
    else:
        raise ValueError(f"mode must be 'topk' or 'static', got {mode!r}")
    if cover and heads > 1:
        parts.append(f"stride {heads} offset h")
    return "  ".join(parts)


def _name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", text) or "calibrated"
    return name if not name[0].isdigit() else "m_" + name


def emit_plan(budgets: Sequence[Sequence[int]], *, n_blocks: int, block: int, heads: int, kv_heads: int,
              mode: str, model_name: str = "calibrated", cover: bool = False,
              header: Optional[List[str]] = None) -> str:
    """A .s2 file: one pattern per distinct layer plan, and a model plan naming them per layer."""
    model_name = _name(model_name)
    lines = [f"# {h}" for h in (header or [])]
    names: dict = {}
    layer_names = []
    for layer, bs in enumerate(budgets):
        bodies = [head_body(int(b), n_blocks, mode, heads, cover) for b in bs]
        key = tuple(bodies)
        if key not in names:
            name = f"{model_name}_layer{layer}"
            names[key] = name
            lines += ["", f"pattern {name} {{", f"    block = {block}  heads = {heads}  kv_heads = {kv_heads}  causal"]
            start = 0
            for h in range(1, heads + 1):
                if h == heads or bodies[h] != bodies[start]:
                    label = f"budget {bs[start]} blocks" if bodies[start] != "dense" else "needs the whole context"
                    lines.append(f"    heads {start}..{h - 1} {{ {bodies[start]} }}  # {label}")
                    start = h
            lines.append("}")
        layer_names.append(names[key])
    lines += ["", f"model {model_name} {{", f"    layers = {len(budgets)}"]
    start = 0
    for layer in range(1, len(layer_names) + 1):
        if layer == len(layer_names) or layer_names[layer] != layer_names[start]:
            lines.append(f"    {start}..{layer - 1} -> {layer_names[start]}")
            start = layer
    lines.append("}")
    from ..parser import parse_module
    from ..printer import format_module
    return format_module(parse_module("\n".join(lines) + "\n", "<calibrated>"))  # canonical, as `s2dsl fmt` writes
