"""Dense masked attention in float32: the oracle every kernel is tested against."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .pattern import Pattern


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, *,
                        scale: Optional[float] = None, return_lse: bool = False,
                        dtype: torch.dtype = torch.float32, selection: Optional[torch.Tensor] = None):
    """Attention of ``q`` over ``k, v`` restricted to ``pattern``, computed densely.

    Layout (batch, heads, seq, dim); k and v have ``pattern.kv_heads`` heads and are
    broadcast to the query heads (grouped-query attention). The queries are the last
    ``q.shape[2]`` positions of the ``k.shape[2]`` keys (chunked prefill, decode). A query
    row that the pattern leaves empty gets output 0 and log-sum-exp -inf, as the kernels
    do, rather than softmax's NaN. Returns ``dtype`` (float32 by default; float64 for
    gradient checks). ``selection`` adds the blocks dynamic topk heads selected (``[batch,
    heads, query blocks, K]``, see ``Pattern.block_mask``); without it a topk head attends its
    static part only.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("reference_attention expects (batch, heads, seq, dim) tensors")
    b, h, lq, d = q.shape
    if h != pattern.heads or k.shape[1] != pattern.kv_heads or v.shape[1] != pattern.kv_heads:
        raise ValueError(f"pattern {pattern.name} has {pattern.heads} heads / {pattern.kv_heads} kv heads; "
                         f"got q heads {h}, k heads {k.shape[1]}, v heads {v.shape[1]}")
    lk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf, kf, vf = (t.to(dtype) for t in (q, k, v))
    kf = kf.repeat_interleave(pattern.group_size, dim=1)
    vf = vf.repeat_interleave(pattern.group_size, dim=1)
    mask = pattern.token_mask(lq, lk, selection=selection).to(q.device)
    scores = torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    probs = probs.masked_fill(~mask, 0.0)
    out = torch.einsum("bhqk,bhkd->bhqd", probs, vf)
    return (out, lse) if return_lse else out
