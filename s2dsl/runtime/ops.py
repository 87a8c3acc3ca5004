"""The kernels as torch custom ops, so torch.compile traces through them and autograd
reaches the generated backward.

Custom ops take only tensors and plain values, so a pattern travels as its serialized
text (a constant in a traced graph) and is rebuilt once per process. No registry: a
registry filled while torch.compile traces would be filled only after the graph first runs.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import torch

from ..pattern import Pattern
from . import attention as _attention

def register(pattern: Pattern) -> str:
    """The op argument that stands for ``pattern``."""
    return pattern.serialize()


@lru_cache(maxsize=256)
def _pattern(key: str) -> Pattern:
    return Pattern.deserialize(key)


def _lse_shape(q: torch.Tensor, layout: str, varlen: bool, heads: int):
    if varlen:
        return (heads, q.shape[0])
    if layout == "bhsd":
        return (q.shape[0], q.shape[1], q.shape[2])
    return (q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op("s2dsl::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern_key: str, scale: float,
                  layout: str, cu_seqlens_q: Optional[torch.Tensor],
                  cu_seqlens_k: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return _attention.forward(q, k, v, _pattern(pattern_key), scale=scale, layout=layout,
                              cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


@attention_fwd.register_fake
def _(q, k, v, pattern_key, scale, layout, cu_seqlens_q, cu_seqlens_k):
    _attention._check(q, k, v, _pattern(pattern_key), layout, cu_seqlens_q, cu_seqlens_k, static_only=True)
    varlen = cu_seqlens_q is not None
    heads = q.shape[1] if (varlen or layout == "bhsd") else q.shape[2]
    return torch.empty_like(q), q.new_empty(_lse_shape(q, layout, varlen, heads), dtype=torch.float32)


@torch.library.custom_op("s2dsl::attention_bwd", mutates_args=())
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, pattern_key: str, scale: float, layout: str,
                  cu_seqlens_q: Optional[torch.Tensor],
                  cu_seqlens_k: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .backward import backward
    return backward(q, k, v, out, lse, dout, _pattern(pattern_key), scale=scale, layout=layout,
                    cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, pattern_key, scale, layout, cu_seqlens_q, cu_seqlens_k):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, pattern_key, scale, layout, cu_seqlens_q, cu_seqlens_k = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.meta = (pattern_key, scale, layout)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    pattern_key, scale, layout = ctx.meta
    dq, dk, dv = attention_bwd(dout.contiguous(), q, k, v, out, lse, pattern_key, scale, layout,
                               cu_seqlens_q, cu_seqlens_k)
    return dq, dk, dv, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- dynamic top-k
# Patterns with topk heads take their own ops: the selection is an input of the forward (made
# by ``topk_select`` unless the caller gives one) and is held fixed through the backward.

@torch.library.custom_op("s2dsl::topk_select", mutates_args=())
def topk_select(q: torch.Tensor, k: torch.Tensor, pattern_key: str, layout: str, estimator: str,
                cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor]) -> torch.Tensor:
    from .topk import select_blocks
    # refuse bad inputs before any work
    _attention._check(q, k, k, _pattern(pattern_key), layout, cu_seqlens_q, cu_seqlens_k)
    return select_blocks(q, k, _pattern(pattern_key), layout=layout, estimator=estimator,
                         cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


@topk_select.register_fake
def _(q, k, pattern_key, layout, estimator, cu_seqlens_q, cu_seqlens_k):
    from .topk import selection_shape
    pattern = _pattern(pattern_key)
    _attention._check(q, k, k, pattern, layout, cu_seqlens_q, cu_seqlens_k, static_only=True)
    if cu_seqlens_q is not None:  # rows: the most query blocks of any sequence, known once it runs
        rows = torch.library.get_ctx().new_dynamic_size()
        return q.new_empty((cu_seqlens_q.shape[0] - 1, pattern.heads, rows, selection_shape(pattern, 1, 1, 1)[0][3]),
                           dtype=torch.int32)
    sd = 2 if layout == "bhsd" else 1
    shape, _ = selection_shape(pattern, q.shape[0], q.shape[sd], k.shape[sd])
    return q.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op("s2dsl::attention_fwd_topk", mutates_args=())
def attention_fwd_topk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: torch.Tensor,
                       pattern_key: str, scale: float, layout: str, cu_seqlens_q: Optional[torch.Tensor],
                       cu_seqlens_k: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return _attention.forward(q, k, v, _pattern(pattern_key), scale=scale, layout=layout, selection=selection,
                              cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


@attention_fwd_topk.register_fake
def _(q, k, v, selection, pattern_key, scale, layout, cu_seqlens_q, cu_seqlens_k):
    _attention._check(q, k, v, _pattern(pattern_key), layout, cu_seqlens_q, cu_seqlens_k, static_only=True)
    varlen = cu_seqlens_q is not None
    heads = q.shape[1] if (varlen or layout == "bhsd") else q.shape[2]
    return torch.empty_like(q), q.new_empty(_lse_shape(q, layout, varlen, heads), dtype=torch.float32)


@torch.library.custom_op("s2dsl::attention_bwd_topk", mutates_args=())
def attention_bwd_topk(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, selection: torch.Tensor, pattern_key: str, scale: float,
                       layout: str, cu_seqlens_q: Optional[torch.Tensor],
                       cu_seqlens_k: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .backward import backward
    return backward(q, k, v, out, lse, dout, _pattern(pattern_key), scale=scale, layout=layout,
                    selection=selection, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


@attention_bwd_topk.register_fake
def _(dout, q, k, v, out, lse, selection, pattern_key, scale, layout, cu_seqlens_q, cu_seqlens_k):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context_topk(ctx, inputs, output):
    q, k, v, selection, pattern_key, scale, layout, cu_seqlens_q, cu_seqlens_k = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, selection, cu_seqlens_q, cu_seqlens_k)
    ctx.meta = (pattern_key, scale, layout)


def _backward_topk(ctx, dout, dlse):
    q, k, v, out, lse, selection, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    pattern_key, scale, layout = ctx.meta
    dq, dk, dv = attention_bwd_topk(dout.contiguous(), q, k, v, out, lse, selection, pattern_key, scale, layout,
                                    cu_seqlens_q, cu_seqlens_k)
    return dq, dk, dv, None, None, None, None, None, None


attention_fwd_topk.register_autograd(_backward_topk, setup_context=_setup_context_topk)
