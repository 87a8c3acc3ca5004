"""INT8 KV pages: ALISA's channel-wise asymmetric quantisation, ``x_q = round(λ·x + z)``.

A page holds one kv head's block of tokens, ``(block, head_dim)``. Each channel (column) of a
page gets its own ``λ`` and ``z`` from the page's range in that channel, so one outlier token
costs resolution only in its own page and channel, and keys (whose channels differ in scale by
orders of magnitude) keep their small channels exact to within half a step.

What is stored per page and channel is not ``λ, z`` but the two numbers the kernels need to
dequantise with one fused multiply-add, ``x ≈ x_q · scale + bias`` (``scale = 1/λ``,
``bias = -z/λ``). Codes use the whole signed range [-128, 127]: the page's minimum maps to
-128 and its maximum to 127 (to within rounding), so the error of every element is at most
``scale / 2``.

Tokens past a sequence's end in its last page (``valid``) take no part in the range: the page
is quantised again, whole, when it is filled further (the cache decides when; rewriting one
page is 2·block·head_dim bytes).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["QuantizedPages", "quantize_pages", "dequantize_pages", "write_decode_tokens", "QMIN", "QMAX"]

QMIN, QMAX = -128, 127
_LEVELS = QMAX - QMIN  # 255 steps between the page's minimum and maximum
# a channel whose range is below this is constant for the purpose of storage: its codes are all
# QMIN and its bias is the value itself (exact), instead of dividing by a vanishing range
_TINY = 1e-12


class QuantizedPages(NamedTuple):
    codes: torch.Tensor  # int8 [pages, block, head_dim]
    scale: torch.Tensor  # float32 [pages, head_dim]: 1/λ
    bias: torch.Tensor   # float32 [pages, head_dim]: -z/λ

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


def quantize_pages(x: torch.Tensor, valid: Optional[torch.Tensor] = None, *, check: bool = True) -> QuantizedPages:
    """Quantise ``x`` ``[pages, block, head_dim]`` (any float dtype) channel-wise per page.

    ``valid`` (int ``[pages]``, optional): the number of leading tokens of each page that hold
    data; the others are ignored for the range and get code QMIN. ``check=False`` skips the
    value checks that read the device (a cache writing inside a CUDA graph; its callers
    validated the counts)."""
    if x.dim() != 3:
        raise ValueError(f"x must be [pages, block, head_dim]; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor; got {x.dtype}")
    xf = x.detach().float()
    pages, block, _ = xf.shape
    if valid is not None:
        valid = torch.as_tensor(valid, device=x.device).long()
        if valid.shape != (pages,):
            raise ValueError(f"valid must have one count per page ({pages}); got shape {tuple(valid.shape)}")
        if check and bool(((valid < 0) | (valid > block)).any()):
            raise ValueError(f"valid counts must lie in [0, {block}]")
        live = (torch.arange(block, device=x.device).view(1, -1, 1) < valid.view(-1, 1, 1))
        lo = torch.where(live, xf, torch.inf).amin(1)
        hi = torch.where(live, xf, -torch.inf).amax(1)
        empty = valid == 0
        lo = torch.where(empty.view(-1, 1), 0.0, lo)
        hi = torch.where(empty.view(-1, 1), 0.0, hi)
    else:
        live = None
        lo, hi = xf.amin(1), xf.amax(1)
    if check and not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("cannot quantise K/V holding NaN or infinity")
    span = hi - lo
    flat = span <= _TINY * torch.maximum(lo.abs(), hi.abs()).clamp_min(1.0)
    scale = torch.where(flat, 1.0, span / _LEVELS)
    # bias is the value of code QMIN: the page's minimum (a flat channel's only value)
    bias = lo - QMIN * scale
    codes = torch.round((xf - bias.unsqueeze(1)) / scale.unsqueeze(1))
    codes = codes.clamp_(QMIN, QMAX)
    if live is not None:
        codes = torch.where(live, codes, float(QMIN))
    codes = torch.where(flat.unsqueeze(1), float(QMIN), codes)
    return QuantizedPages(codes.to(torch.int8), scale, bias)


def dequantize_pages(q: QuantizedPages, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x_q · scale + bias``: the reference for what the kernels compute in registers."""
    codes, scale, bias = q
    return (codes.float() * scale.unsqueeze(1) + bias.unsqueeze(1)).to(dtype)


def write_decode_tokens(k_codes: torch.Tensor, v_codes: torch.Tensor, qparams: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, dest: torch.Tensor) -> bool:
    """One new token per page into INT8 pools, each page requantised whole over the rows up to
    the new one, in one generated kernel (``s2dsl.codegen.quant``) for K and V: what
    ``quantize_pages`` does to the dequantised page with the row put in, without the forty
    torch launches. ``k``/``v``: ``[m, head_dim]``; ``dest``: int64 ``[m]``, each token's row in
    the pools viewed as ``(pages * block, head_dim)``; two tokens of one page are not allowed
    (except in the scratch page of padding, whose contents nobody reads). Returns False, doing
    nothing, where no kernel runs (CPU tensors without ``TRITON_INTERPRET=1``)."""
    from .kernels import interpreting
    if k_codes.device.type != "cuda" and not interpreting():
        return False
    block, head_dim = k_codes.shape[1], k_codes.shape[2]
    if interpreting() and k.dtype == torch.bfloat16:  # the interpreter's numpy has no bfloat16
        k, v = k.float(), v.float()
    k = k.reshape(-1, head_dim)
    v = v.reshape(-1, head_dim)
    if k.stride(0) != head_dim or k.stride(1) != 1:
        k = k.contiguous()
    if v.stride(0) != head_dim or v.stride(1) != 1:
        v = v.contiguous()
    _write_module(block, head_dim).launch(k_codes, v_codes, qparams, k, v, dest)
    return True


def _write_module(block: int, head_dim: int):
    key = (block, head_dim)
    module = _WRITE_MODULES.get(key)
    if module is None:
        from ..codegen.quant import QUANT_CODEGEN_VERSION, generate_quant_write
        from .cache import cache_key, codegen_fingerprint, default_cache
        ck = cache_key(QUANT_CODEGEN_VERSION, codegen_fingerprint(), "quant_write", block, head_dim)
        module = _WRITE_MODULES[key] = default_cache().get(ck, lambda: generate_quant_write(block, head_dim))
    return module


_WRITE_MODULES: dict = {}
