"""``s2dsl.attention``: checks its inputs, then runs the generated kernel."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..codegen.lower import lower
from ..pattern import Pattern
from .kernels import choose_forward, forward_module, kv_tma_ready
from .validate import (LAYOUTS, InputError, check_attention_inputs, check_qk_fp8, check_scale,
                       interpreter_compute_dtype)

# the checks live in validate.py, shared by every entry point; these names stay for importers
_check = check_attention_inputs


def _strides(t: torch.Tensor, layout: str) -> Tuple[int, int, int]:
    """(batch, head, token) strides in elements."""
    if layout == "varlen":
        return 0, t.stride(1), t.stride(0)
    if layout == "bhsd":
        return t.stride(0), t.stride(1), t.stride(2)
    return t.stride(0), t.stride(2), t.stride(1)


def forward(q, k, v, pattern: Pattern, *, scale: Optional[float] = None, layout: str = "bhsd",
            cu_seqlens_q=None, cu_seqlens_k=None, tuning: Optional[dict] = None,
            out: Optional[torch.Tensor] = None, selection: Optional[torch.Tensor] = None):
    """Output and log-sum-exp (float32, (batch, heads, q_len) or (heads, total_q) when packed).

    ``out``, if given, receives the output (same shape, dtype and layout as q). For a pattern
    with dynamic topk heads, ``selection`` (``s2dsl.runtime.topk``) gives the selected blocks;
    without it they are selected here.

    ``tuning={"qk_fp8": True}`` computes QK^T in FP8 (e4m3, per-row Q and per-block K scales,
    float32 scores; ``codegen/forward.py`` says how) and PV in the input dtype: float16/bfloat16
    inputs on a GPU of compute capability >= 8.9, padded layouts, and no gradients (it is refused
    where autograd would want them: its output is not what ``backward`` differentiates)."""
    varlen, head_dim = _check(q, k, v, pattern, layout, cu_seqlens_q, cu_seqlens_k)
    fp8 = bool((tuning or {}).get("qk_fp8"))
    if fp8:  # on the caller's dtype, before the interpreter's upcast below
        check_qk_fp8(q.dtype, q.device.type,
                     torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else None, varlen,
                     torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    scale = check_scale(scale, head_dim)
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device or out.stride(-1) != 1):
        raise InputError(f"out must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}, contiguous last dim)")
    compute = interpreter_compute_dtype(q.dtype)
    if compute is not None:  # see interpreter_compute_dtype: run on upcast copies, cast back
        # (the checks above hold for the copies; qk_fp8's dtype check was on the caller's dtype)
        out32, lse = _forward(*(t.to(compute) for t in (q, k, v)), pattern, varlen, head_dim, scale, layout,
                              cu_seqlens_q, cu_seqlens_k, tuning, None, selection, fp8)
        return (out32.to(q.dtype) if out is None else out.copy_(out32)), lse
    return _forward(q, k, v, pattern, varlen, head_dim, scale, layout, cu_seqlens_q, cu_seqlens_k, tuning, out,
                    selection, fp8)


def _forward(q, k, v, pattern: Pattern, varlen: bool, head_dim: int, scale: float, layout: str, cu_seqlens_q,
             cu_seqlens_k, tuning: Optional[dict], out: Optional[torch.Tensor], selection, fp8: bool):
    """``forward`` after its checks."""
    layout = "varlen" if varlen else layout
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    seq_len = None if varlen else k.shape[2 if layout == "bhsd" else 1]
    # FP8: the kernel reads its own e4m3 copy of K (16-byte rows), so only V must suit descriptors
    spec = choose_forward(pattern, q.dtype, head_dim, layout, q.device, tuning, seq_len=seq_len,
                          kv_tma=q.device.type == "cuda" and kv_tma_ready(*((v,) if fp8 else (k, v))))
    module = forward_module(pattern, spec)
    if out is None:
        out = torch.empty_like(q)
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        lse = torch.empty(pattern.heads, q.shape[0], dtype=torch.float32, device=q.device)
        lse_strides = (0, lse.stride(0))
        q_len = kv_len = 0
    else:
        batch = q.shape[0]
        sd = 2 if layout == "bhsd" else 1
        q_len, kv_len = q.shape[sd], k.shape[sd]
        lse = torch.empty(batch, pattern.heads, q_len, dtype=torch.float32, device=q.device)
        lse_strides = (lse.stride(0), lse.stride(1))
    extra = {}
    if lower(pattern).has_topk:
        from .topk import check_selection, select_blocks
        packed = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
        if selection is None:
            selection = select_blocks(q, k, pattern, layout="bhsd" if varlen else layout, **packed)
        else:
            selection = check_selection(selection, pattern, batch, q_len, kv_len, q.device, values=False, **packed)
        extra = dict(sel=selection, sel_strides=selection.stride()[:3])
    if out.numel():
        module.launch(q, k, v, out, lse, _strides(q, layout), _strides(k, layout), _strides(v, layout),
                      _strides(out, layout), lse_strides, batch, q_len, kv_len, q_len, cu_seqlens_q, cu_seqlens_k,
                      scale, **extra)
    return out, lse
