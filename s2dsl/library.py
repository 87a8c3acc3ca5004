"""Ready-made patterns written in the .s2 language itself."""
from __future__ import annotations

from typing import Optional

from .frontend import parse
from .pattern import Pattern


def local_stride(*, block: int, local_blocks: int, vert_stride: int, heads: int,
                 kv_heads: Optional[int] = None, num_dense_heads: int = 0,
                 head_sliding_offset: int = 0, homo_head: bool = False,
                 causal: bool = True, name: str = "local_stride") -> Pattern:
    """DKernel's (S2-Attention's) local-stride family, exactly.

    Head ``h`` keeps block ``j`` for block ``i`` iff ``i - j < local_blocks`` or
    ``(j + h*step + head_sliding_offset) % vert_stride == 0`` with
    ``step = max(1, vert_stride // heads)``; with kv_heads the q heads of a group share
    their kv head's pattern; the last ``num_dense_heads`` heads are dense.
    """
    kv = heads if kv_heads is None else kv_heads
    if kv <= 0 or heads % kv:
        raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
    if not 0 <= num_dense_heads <= heads:
        raise ValueError(f"num_dense_heads={num_dense_heads} must be in 0..{heads}")
    sparse = heads - num_dense_heads
    head = "0" if homo_head else ("h" if kv == heads else f"(h // {heads // kv})")
    body = []
    if sparse:
        body.append(f"heads 0..{sparse - 1} {{ window local_blocks  "
                    f"stride vert_stride offset {head} * step + head_sliding_offset }}")
    if num_dense_heads:
        body.append(f"heads {sparse}..{heads - 1} {{ dense }}")
    mode = "causal" if causal else "bidirectional"
    text = f"""
const local_blocks = {local_blocks}
const vert_stride = {vert_stride}
const step = max(1, vert_stride // {kv})
const head_sliding_offset = {head_sliding_offset}
pattern {name} {{
    block = {block}  heads = {heads}  kv_heads = {kv}  {mode}
    {' '.join(body)}
}}
"""
    return parse(text, f"<local_stride {name}>")[name]
