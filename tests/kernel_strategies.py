"""Hypothesis strategies for kernel tests: small random patterns written as .s2 text."""
from __future__ import annotations

from hypothesis import strategies as st

import s2dsl


@st.composite
def head_body(draw, heads: int):
    """A component list for one head range; parameters may depend on h."""
    parts = []
    if draw(st.booleans()):
        parts.append(f"window {draw(st.integers(0, 3))}")
    if draw(st.integers(0, 3)) == 0:
        parts.append(f"sink {draw(st.integers(1, 2))}")
    for _ in range(draw(st.integers(0, 2))):
        m = draw(st.integers(1, 5))
        parts.append(f"stride {m} offset h + {draw(st.integers(0, 4))}")
    if draw(st.integers(0, 5)) == 0:
        parts = ["dense"]
    return " ".join(parts) or "window 1"


@st.composite
def patterns(draw, max_heads: int = 4, block: int = 16, causal=None):
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.integers(1, max_heads // kv_heads))
    split = draw(st.integers(0, heads - 1))
    bodies = [f"heads 0..{split} {{ {draw(head_body(heads))} }}"]
    if split + 1 < heads:
        bodies.append(f"heads {split + 1}..{heads - 1} {{ {draw(head_body(heads))} }}")
    is_causal = draw(st.booleans()) if causal is None else causal
    mode = "causal" if is_causal else "bidirectional"
    text = f"pattern p {{ block = {block} heads = {heads} kv_heads = {kv_heads} {mode} {' '.join(bodies)} }}"
    return s2dsl.parse(text)["p"]


def random_inputs(b, heads, kv_heads, lq, lk, d, dtype, layout="bhsd", seed=0, *, grad_out=False):
    """Random q, k, v (and dO with ``grad_out``) on the CPU, in ``layout``, never zeros."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (lambda h, n: (b, h, n, d)) if layout == "bhsd" else (lambda h, n: (b, n, h, d))
    q = torch.randn(shape(heads, lq), generator=g).to(dtype=dtype)
    k = torch.randn(shape(kv_heads, lk), generator=g).to(dtype=dtype)
    v = torch.randn(shape(kv_heads, lk), generator=g).to(dtype=dtype)
    if not grad_out:
        return q, k, v
    return q, k, v, torch.randn(shape(heads, lq), generator=g).to(dtype=dtype)
