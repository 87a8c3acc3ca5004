"""The generated backward: gradients of ``forward`` with respect to q, k and v."""
from __future__ import annotations

from dataclasses import fields, replace
from types import ModuleType
from typing import Optional

import torch

from ..codegen import lower
from ..codegen.backward import BACKWARD_CODEGEN_VERSION, BackwardSpecialization, generate_backward
from ..codegen.forward import Specialization
from ..pattern import Pattern
from .attention import InputError, _check, _strides
from ..memo import per_object
from .cache import KernelCache, cache_key, codegen_fingerprint, default_cache
from .kernels import _DTYPES, kv_tma_ready
from .validate import check_scale, interpreter_compute_dtype

_TILE_FIELDS = ("block_n", "dkdv_block_n", "dkdv_block_m")


def _divisor(block: int, target: int) -> int:
    """The largest power of two <= target dividing ``block`` (tiles must not straddle pattern blocks)."""
    n = 1
    while n * 2 <= target and block % (n * 2) == 0:
        n *= 2
    if n < 16:
        raise InputError(f"pattern block {block} has no power-of-two divisor >= 16: the kernels' tiles "
                         "(at least 16 rows for tl.dot) must not straddle pattern blocks")
    return n


#: forward-only fields of Specialization (the backward's loads and loops have no such variants)
_FORWARD_ONLY = {"kv_load": "pointer", "window_ws": False, "fuse_diagonal": False, "persistent": 0,
                 "qk_fp8": False}


def _as_backward(spec: Specialization) -> BackwardSpecialization:
    if isinstance(spec, BackwardSpecialization):
        return spec
    return BackwardSpecialization(**{f.name: getattr(spec, f.name) for f in fields(Specialization)
                                     if f.name not in _FORWARD_ONLY})


def choose_backward(pattern: Pattern, dtype: torch.dtype, head_dim: int, layout: str,
                    device: torch.device, tuning: Optional[dict] = None) -> BackwardSpecialization:
    """Tile sizes for the backward kernels; ``tuning`` overrides any field.

    Fields: ``block_m``/``block_n``/``num_warps``/``num_stages`` for the dQ kernel (query
    rows per program, kv rows per step), ``dkdv_block_n``/``dkdv_block_m``/
    ``dkdv_num_warps``/``dkdv_num_stages`` for the dK/dV kernel (kv rows per program,
    query rows per step), ``dkdv_unroll_group`` (unroll the dK/dV kernel's loop over the q
    heads of a kv head), ``dq_load``/``dkdv_load`` ("tma": the dQ kernel's K/V, the dK/dV
    kernel's Q/dO through tensor descriptors; needs 16-byte aligned tensors, see ``backward``),
    ``dkdv_query_major`` (the dK/dV product computed [query, kv] and transposed for dV/dK).
    ``block_n``, ``dkdv_block_n`` and ``dkdv_block_m`` must divide the pattern block.
    """
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    block = pattern.block
    if device.type != "cuda":  # the interpreter: few, small tiles run fastest
        t = _divisor(block, 32)
        spec = BackwardSpecialization(dtype=_DTYPES[dtype], head_dim=head_dim, layout=layout,
                                      capability=tuple(capability), block_m=32, block_n=t, num_warps=4,
                                      num_stages=1, dkdv_block_m=t, dkdv_block_n=t, dkdv_num_warps=4,
                                      dkdv_num_stages=1)
    else:
        spec = replace(choose_backward_for_gpu(pattern, head_dim), dtype=_DTYPES[dtype], layout=layout,
                       capability=tuple(capability))
    if spec.block_m > block and lower(pattern).one_block_tiles:  # a dQ tile stays inside one query block
        spec = replace(spec, block_m=block)
    spec = replace(spec, **(tuning or {}))
    changed = [name for name, default in _FORWARD_ONLY.items() if getattr(spec, name) != default]
    if changed:
        raise InputError(f"{', '.join(changed)}: forward-only variants; the backward has none (tune it with "
                         "block_m/block_n/dkdv_*/num_warps/num_stages/one_grid/two_streams/flat_steps/dq_load/dkdv_load/"
                         "dkdv_query_major)")
    return spec


def choose_backward_for_gpu(pattern: Pattern, head_dim: int) -> BackwardSpecialization:
    """The backward's tiles on a Hopper GPU (also what ``s2dsl compile --target gpu`` shows).

    d <= 128: the fastest of the tilings and launch shapes timed on an H100
    (benchmarks/RESULTS.md): dK/dV and dQ programs in one grid with 4 warps and 2 stages,
    64x64 tiles in both, dK/dV looping over query steps (not blocks). d > 128: narrower tiles
    so the accumulators fit (compile-time spill counts only), two launches.
    """
    block = pattern.block
    big = head_dim > 128
    tile = _divisor(block, 32 if big else 64)
    # with topk heads (or extended components) a dQ tile stays inside one query block
    block_m = min(64, block) if lower(pattern).one_block_tiles else 64
    return BackwardSpecialization(
        head_dim=head_dim, capability=(9, 0), block_m=block_m, block_n=tile, num_warps=4, num_stages=2,
        one_grid=not big, flat_steps=True, dkdv_block_m=tile, dkdv_block_n=tile,
        dkdv_num_warps=8 if big else 4, dkdv_num_stages=2,
        # sm_90 compiles of the GQA dK/dV kernel spill ~10x less with the group loop unrolled
        dkdv_unroll_group=pattern.group_size <= 8)


def backward_module(pattern: Pattern, spec: Specialization, cache: Optional[KernelCache] = None) -> ModuleType:
    if cache is None:  # the default cache's module, memoised per pattern object (its key costs ~75 us)
        cache = default_cache()
        return per_object(pattern, ("bwd", spec, id(cache)), lambda: backward_module(pattern, spec, cache))
    plan = lower(pattern)
    spec = _as_backward(spec)
    key = cache_key(BACKWARD_CODEGEN_VERSION, codegen_fingerprint(), "bwd", plan, spec)
    return cache.get(key, lambda: generate_backward(plan, spec, name=pattern.name, fingerprint=pattern.fingerprint()))


def backward_source(pattern: Pattern, spec: Optional[Specialization] = None) -> str:
    """The generated backward module's source for ``pattern`` (for ``s2dsl`` CLI printing).

    ``spec`` may be a forward ``Specialization`` (its tiles are fitted to the pattern
    block) or a ``BackwardSpecialization``; by default, the H100 tiles for head dim 64.
    """
    if spec is None:
        spec = choose_backward_for_gpu(pattern, 64)
    spec = _as_backward(spec)
    fitted = {name: _divisor(pattern.block, getattr(spec, name)) for name in _TILE_FIELDS if getattr(spec, name)}
    spec = replace(spec, **fitted)
    return generate_backward(lower(pattern), spec, name=pattern.name, fingerprint=pattern.fingerprint())


def _same_shape(name: str, t, ref: torch.Tensor):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != ref.shape or t.device != ref.device:
        raise InputError(f"{name} must match q: shape {tuple(ref.shape)} on {ref.device}; "
                         f"got {tuple(t.shape)} on {t.device}")


def backward(q, k, v, out, lse, dout, pattern: Pattern, *, scale: Optional[float] = None, layout: str = "bhsd",
             cu_seqlens_q=None, cu_seqlens_k=None, tuning: Optional[dict] = None,
             selection: Optional[torch.Tensor] = None):
    """Gradients ``(dq, dk, dv)`` of ``forward(q, k, v, pattern, ...)`` given ``dout``.

    ``out`` and ``lse`` are what ``forward`` returned (lse: natural log, float32,
    (batch, heads, q_len), or (heads, total_q) when packed). dk and dv come in k's and v's
    shapes (kv heads), all three in the input dtype; accumulation is float32. Query rows
    the pattern leaves empty get zero gradient. For a pattern with dynamic topk heads,
    ``selection`` is the one the forward used (held fixed: no gradient flows into the choice).
    """
    varlen, head_dim = _check(q, k, v, pattern, layout, cu_seqlens_q, cu_seqlens_k)
    scale = check_scale(scale, head_dim)
    _same_shape("out", out, q)
    _same_shape("dout", dout, q)
    compute = interpreter_compute_dtype(q.dtype)
    if compute is not None:  # see interpreter_compute_dtype: run on upcast copies, cast back
        grads = backward(*(t.to(compute) for t in (q, k, v, out)), lse, dout.to(compute), pattern, scale=scale,
                         layout=layout, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, tuning=tuning,
                         selection=selection)
        return tuple(g.to(q.dtype) for g in grads)
    layout = "varlen" if varlen else layout
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        lse_shape = (pattern.heads, q.shape[0])
        q_len = kv_len = 0
    else:
        batch = q.shape[0]
        sd = 2 if layout == "bhsd" else 1
        q_len, kv_len = q.shape[sd], k.shape[sd]
        lse_shape = (batch, pattern.heads, q_len)
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != lse_shape or lse.device != q.device:
        raise InputError(f"lse must be float32 of shape {lse_shape} on {q.device} (as forward returns it); "
                         f"got {tuple(getattr(lse, 'shape', ()))}")
    q, k, v, out, dout = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, out, dout))
    if out.dtype != q.dtype:
        out = out.to(q.dtype)
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    lse = lse.to(torch.float32).contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if k.numel() == 0:
        return dq, dk, dv
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    spec = choose_backward(pattern, q.dtype, head_dim, layout, q.device, tuning)
    # descriptors: the dQ kernel reads K/V through them, the dK/dV kernel Q/dO
    described = {"dq_load": ("k and v", (k, v)), "dkdv_load": ("q and dout", (q, dout))}
    for name, (what, tensors) in described.items():
        if getattr(spec, name) == "tma" and q.is_cuda and not kv_tma_ready(*tensors):
            raise InputError(f"{name}='tma' needs 16-byte aligned data and row strides in {what}: "
                             f"use {name}='pointer' for these tensors")
    module = backward_module(pattern, spec)
    lse_strides = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    extra = {}
    if lower(pattern).has_topk:
        from .topk import check_selection, first_blocks, packed_lengths, transpose_selection
        if selection is None:
            raise InputError(f"pattern '{pattern.name}' has dynamic topk heads: pass the selection the forward used")
        packed = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
        selection = check_selection(selection, pattern, batch, q_len, kv_len, q.device, values=False, **packed)
        first = first_blocks(pattern, batch, q_len, kv_len, device=q.device, **packed)
        longest = max(packed_lengths(cu_seqlens_q, cu_seqlens_k)[1], default=0) if varlen else kv_len
        t_blocks = -(-longest // pattern.block)  # the transposed selection's kv blocks per (sequence, head)
        t_off, t_list = transpose_selection(selection, t_blocks, first)
        extra = dict(sel=selection, sel_strides=selection.stride()[:3], t_off=t_off, t_list=t_list, t_blocks=t_blocks)
    module.launch(q, k, v, out, dout, lse, dq, dk, dv,
                  _strides(q, layout), _strides(k, layout), _strides(v, layout), _strides(out, layout),
                  _strides(dout, layout), _strides(dq, layout), _strides(dk, layout), _strides(dv, layout),
                  lse_strides, batch, q_len, kv_len, cu_seqlens_q, cu_seqlens_k, scale, **extra)
    return dq, dk, dv
