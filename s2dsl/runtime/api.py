"""What users call: ``attention``, the ``SparseAttention`` module and ``@sparse_attention``."""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional, Union

import torch

from ..frontend import load
from ..pattern import Pattern
from . import ops, validate


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, *,
              scale: Optional[float] = None, layout: str = "bhsd",
              cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
              return_lse: bool = False, selection: Optional[torch.Tensor] = None,
              return_selection: bool = False, topk_estimator: str = "pooled"):
    """Sparse attention of ``q`` over ``k, v`` restricted to ``pattern``, by the generated kernels.

    Layouts: ``"bhsd"`` (batch, heads, seq, dim), ``"bshd"`` (batch, seq, heads, dim), or
    packed (total_tokens, heads, dim) when ``cu_seqlens_q``/``cu_seqlens_k`` are given
    (int32 offsets of each sequence). ``k, v`` carry ``pattern.kv_heads`` heads. When q is
    shorter than k, the queries are the last positions (chunked prefill). ``scale``
    defaults to 1/sqrt(dim). Differentiable; traceable by ``torch.compile``.

    Dynamic ``topk`` heads select their blocks per query block from the inputs
    (``s2dsl.runtime.topk``); ``selection=`` gives them instead (checked: in range, outside the
    static set, causal, no repeats, at most K per row) and ``return_selection=True`` appends the
    selection used to the result; ``topk_estimator`` is ``"pooled"``, ``"last_row"`` or ``"bound"``
    (``s2dsl.runtime.topk.select_blocks``). Gradients hold the selection fixed.
    """
    validate.check_pattern(pattern)
    # the tensors are checked inside the op (and by its fake implementation while tracing);
    # the scale here, where it is still a Python value
    scale = validate.check_scale(scale, validate.check_tensor("q", q).shape[-1])
    if pattern.is_static:
        if selection is not None or return_selection:
            raise ValueError(f"pattern {pattern.name} has no topk heads: it takes no selection")
        out, lse = ops.attention_fwd(q, k, v, ops.register(pattern), scale, layout, cu_seqlens_q, cu_seqlens_k)
        return (out, lse) if return_lse else out
    validate.check_runnable(pattern)
    key = ops.register(pattern)
    if selection is None:
        from .topk import ESTIMATORS
        if topk_estimator not in ESTIMATORS:
            raise ValueError(f"topk_estimator must be one of {ESTIMATORS}, got {topk_estimator!r}")
        selection = ops.topk_select(q, k, key, layout, topk_estimator, cu_seqlens_q, cu_seqlens_k)
    elif not torch.compiler.is_compiling():
        from .attention import _check
        from .topk import check_selection
        _check(q, k, v, pattern, layout, cu_seqlens_q, cu_seqlens_k)
        sd = 2 if layout == "bhsd" else 1
        selection = check_selection(selection, pattern, q.shape[0], q.shape[sd], k.shape[sd], q.device,
                                    cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    out, lse = ops.attention_fwd_topk(q, k, v, selection, key, scale, layout, cu_seqlens_q, cu_seqlens_k)
    result = (out, lse) if return_lse else (out,)
    if return_selection:
        result += (selection,)
    return result if len(result) > 1 else result[0]


class SparseAttention(torch.nn.Module):
    """``attention`` as a module holding its pattern."""

    def __init__(self, pattern: Pattern, *, scale: Optional[float] = None, layout: str = "bhsd"):
        super().__init__()
        self.pattern, self.scale, self.layout = pattern, scale, layout

    def forward(self, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None):
        return attention(q, k, v, self.pattern, scale=self.scale, layout=self.layout,
                         cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern.name}, heads={self.pattern.heads}, kv_heads={self.pattern.kv_heads}, " \
               f"block={self.pattern.block}, layout={self.layout}"


def _resolve(pattern_or_path: Union[Pattern, str, os.PathLike], name: Optional[str]) -> Pattern:
    if isinstance(pattern_or_path, Pattern):
        return pattern_or_path
    patterns = load(pattern_or_path)
    if name is not None:
        return patterns[name]
    if len(patterns) != 1:
        raise ValueError(f"{pattern_or_path} defines {len(patterns)} patterns ({', '.join(patterns)}); "
                         "pass name=... to choose one")
    return next(iter(patterns.values()))


def sparse_attention(pattern_or_path: Union[Pattern, str, os.PathLike], *, name: Optional[str] = None,
                     layout: str = "bhsd") -> Callable:
    """Decorate a dense attention definition ``fn(q, k, v, scale=None)``.

    Calls go to the generated kernel for the pattern; the dense definition stays
    reachable as ``.reference`` (for tests and debugging), the pattern as ``.pattern``.
    """
    pattern = _resolve(pattern_or_path, name)

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(q, k, v, *, scale=None, cu_seqlens_q=None, cu_seqlens_k=None):
            return attention(q, k, v, pattern, scale=scale, layout=layout,
                             cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)

        call.reference = fn
        call.pattern = pattern
        return call

    return wrap
