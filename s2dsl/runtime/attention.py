"""``s2dsl.attention``: checks its inputs, then runs the generated kernel."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..codegen.lower import UnsupportedPattern, lower
from ..pattern import Pattern
from .kernels import _DTYPES, choose_forward, forward_module, interpreting

LAYOUTS = ("bhsd", "bshd")


class InputError(ValueError):
    """A tensor does not fit the pattern or the kernels (shape, dtype, device)."""


def _check(q, k, v, pattern: Pattern, layout: str, cu_seqlens_q, cu_seqlens_k, static_only: bool = False):
    """Refuse what the kernels cannot run; ``static_only`` skips checks that read tensor data
    or need a real device (for fake tensors while torch.compile traces)."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be an s2dsl.Pattern, got {type(pattern).__name__}; "
                        "load one with s2dsl.load(path)[name]")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if not static_only and q.device.type != "cuda" and not interpreting():
        raise InputError(f"s2dsl kernels run on CUDA devices; got tensors on {q.device}. "
                         "Set TRITON_INTERPRET=1 to run them (slowly) on the CPU, or use s2dsl.reference_attention")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise InputError(f"dtype {q.dtype} is not supported: use float16, bfloat16 or float32")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise InputError("give both cu_seqlens_q and cu_seqlens_k (equal tensors for plain self-attention)")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 3:
                raise InputError(f"with cu_seqlens, {name} must be packed (total_tokens, heads, dim); got {tuple(t.shape)}")
        for name, c in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if c.dim() != 1 or c.dtype != torch.int32 or c.device != q.device or c.numel() < 2:
                raise InputError(f"{name} must be a 1-D int32 tensor on {q.device} of length batch+1")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise InputError("cu_seqlens_q and cu_seqlens_k describe different numbers of sequences")
        heads, kv_heads = q.shape[1], k.shape[1]
        head_dim = q.shape[2]
    if varlen and not static_only:
        lens_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        lens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
        if any(a > b for a, b in zip(lens_q, lens_k)) or min(lens_q) < 0:
            raise InputError("each sequence's query length must be <= its key length (queries are the last positions)")
        if int(cu_seqlens_q[-1]) != q.shape[0] or int(cu_seqlens_k[-1]) != k.shape[0] or k.shape[0] != v.shape[0]:
            raise InputError("cu_seqlens do not end at the number of packed tokens in q / k, v")
    else:
        if layout not in LAYOUTS:
            raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                raise InputError(f"{name} must be 4-D ({'batch, heads, seq, dim' if layout == 'bhsd' else 'batch, seq, heads, dim'}); "
                                 f"got shape {tuple(t.shape)}")
        hd = 1 if layout == "bhsd" else 2
        sd = 2 if layout == "bhsd" else 1
        heads, kv_heads, head_dim = q.shape[hd], k.shape[hd], q.shape[3]
        if not (q.shape[0] == k.shape[0] == v.shape[0]):
            raise InputError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
        if k.shape != v.shape:
            raise InputError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
        if q.shape[sd] > k.shape[sd]:
            raise InputError(f"q has {q.shape[sd]} positions but k only {k.shape[sd]}: the queries must be the last "
                             "positions of the keys")
    if heads != pattern.heads:
        raise InputError(f"q has {heads} heads but pattern '{pattern.name}' has {pattern.heads}")
    if kv_heads != pattern.kv_heads:
        raise InputError(f"k/v have {kv_heads} heads but pattern '{pattern.name}' has kv_heads = {pattern.kv_heads}")
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise InputError(f"head dims differ: q {head_dim}, k {k.shape[-1]}, v {v.shape[-1]}")
    if not 16 <= head_dim <= 256:
        raise InputError(f"head dim {head_dim} is not supported: use 16..256")
    try:
        plan = lower(pattern)
    except UnsupportedPattern as exc:
        raise InputError(str(exc)) from None
    if plan.has_topk and varlen:
        raise InputError(f"pattern '{pattern.name}' has dynamic topk heads, which run on (batch, heads, seq, dim) "
                         "or (batch, seq, heads, dim) tensors, not packed cu_seqlens batches")
    return varlen, head_dim


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
    without it they are selected here."""
    varlen, head_dim = _check(q, k, v, pattern, layout, cu_seqlens_q, cu_seqlens_k)
    layout = "varlen" if varlen else layout
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    spec = choose_forward(pattern, q.dtype, head_dim, layout, q.device, tuning)
    module = forward_module(pattern, spec)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise InputError(f"out must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}, contiguous last dim)")
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
        from .topk import check_selection, select_blocks, selection_shape
        if selection is None:
            selection = select_blocks(q, k, pattern, layout=layout)
        else:
            selection = check_selection(selection, pattern, batch, q_len, kv_len, q.device, values=False)
        extra = dict(sel=selection, sel_strides=selection.stride()[:3],
                     sel_first_block=selection_shape(pattern, batch, q_len, kv_len)[1])
    if out.numel():
        module.launch(q, k, v, out, lse, _strides(q, layout), _strides(k, layout), _strides(v, layout),
                      _strides(out, layout), lse_strides, batch, q_len, kv_len, q_len, cu_seqlens_q, cu_seqlens_k,
                      scale, **extra)
    return out, lse
