"""Checks every kernel entry point runs before it launches anything.

A generated kernel trusts its arguments: a wrong shape reads out of bounds, an offset past
the tensor corrupts memory, a NaN scale poisons every row. So the prefill forward, the
backward and the decode path call these first, and refuse with ``InputError`` (a
``ValueError``) or ``TypeError`` saying what was expected. Nothing here launches a kernel
or changes state.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional, Tuple

import torch

from ..codegen.lower import UnsupportedPattern, lower
from ..pattern import Pattern
from .kernels import _DTYPES, interpreting

LAYOUTS = ("bhsd", "bshd")
INT32_MAX = 2 ** 31 - 1


class InputError(ValueError):
    """A tensor or value does not fit the pattern or the kernels (shape, dtype, device, range)."""


def check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_pattern(pattern) -> Pattern:
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be an s2dsl.Pattern, got {type(pattern).__name__}; "
                        "load one with s2dsl.load(path)[name]")
    return pattern


def check_runnable(pattern: Pattern):
    """The pattern's kernel plan; refused when the kernels cannot run it (e.g. periods beyond
    their limit)."""
    try:
        return lower(pattern)
    except UnsupportedPattern as exc:
        raise InputError(str(exc)) from None


def check_device(t: torch.Tensor) -> None:
    if interpreting():
        problem = _interpreter_problem()
        if problem:
            raise InputError(problem)
    elif t.device.type != "cuda":
        raise InputError(f"s2dsl kernels run on CUDA devices; got tensors on {t.device}. "
                         "Set TRITON_INTERPRET=1 to run them (slowly) on the CPU, or use s2dsl.reference_attention")


@functools.lru_cache(maxsize=1)
def _interpreter_problem() -> Optional[str]:
    """Why the Triton interpreter cannot run here, or None. It holds every scalar as a
    1-element numpy array and int()s it at loop bounds, which numpy 2.4 refuses; probing
    that conversion says so up front instead of failing inside a kernel."""
    import warnings

    import numpy
    try:
        with warnings.catch_warnings():  # numpy 1.25..2.3 deprecate what the interpreter does
            warnings.simplefilter("ignore", DeprecationWarning)
            int(numpy.ones(1, dtype=numpy.int32))
    except TypeError:
        return (f"the Triton interpreter (TRITON_INTERPRET=1) cannot run with numpy {numpy.__version__}: it "
                "converts 1-element arrays to loop bounds, which numpy 2.4 refuses; install 'numpy<2.4'")
    return None


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale as a finite float; ``None`` means 1/sqrt(head_dim)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise InputError(f"scale must be one number, got a tensor of shape {tuple(scale.shape)}")
        scale = scale.item()
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}")
    value = float(scale)
    if not math.isfinite(value):
        raise InputError(f"scale is {value}: it multiplies every score, so it must be finite "
                         "(leave it None for 1/sqrt(head dim))")
    return value


def check_cu_seqlens(name: str, c, device: torch.device, total: int) -> list:
    """Offsets of packed sequences: 1-D int32 on ``device``, starting at 0, non-decreasing,
    ending at ``total`` (the packed tokens). Returns them as a list (one device sync)."""
    check_tensor(name, c)
    if c.dim() != 1 or c.dtype != torch.int32 or c.device != device or c.numel() < 2:
        raise InputError(f"{name} must be a 1-D int32 tensor on {device} of length batch+1; "
                         f"got {c.dtype} of shape {tuple(c.shape)} on {c.device}")
    offsets = c.tolist()
    if offsets[0] != 0:
        raise InputError(f"{name} must start at 0 (the first sequence's first token); it starts at {offsets[0]}")
    for n, (a, b) in enumerate(zip(offsets, offsets[1:])):
        if b < a:
            raise InputError(f"{name} must be non-decreasing: offset {n + 1} is {b}, below offset {n} = {a} "
                             "(sequence lengths cannot be negative)")
    if offsets[-1] != total:
        raise InputError(f"{name} ends at {offsets[-1]} but the packed tensor has {total} tokens")
    return offsets


def check_attention_inputs(q, k, v, pattern: Pattern, layout: str, cu_seqlens_q, cu_seqlens_k,
                           static_only: bool = False) -> Tuple[bool, int]:
    """Refuse what the prefill forward/backward kernels cannot run; returns ``(varlen, head_dim)``.

    ``static_only`` skips checks that read tensor data or need a real device (for fake
    tensors while torch.compile traces)."""
    check_pattern(pattern)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if not static_only:
        check_device(q)
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
            check_tensor(name, c)
            if c.dim() != 1 or c.dtype != torch.int32 or c.device != q.device or c.numel() < 2:
                raise InputError(f"{name} must be a 1-D int32 tensor on {q.device} of length batch+1")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise InputError("cu_seqlens_q and cu_seqlens_k describe different numbers of sequences")
        if k.shape[0] != v.shape[0]:
            raise InputError(f"k and v hold different numbers of packed tokens: {k.shape[0]} and {v.shape[0]}")
        heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
        if not static_only:
            starts_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, q.shape[0])
            starts_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, k.shape[0])
            for n in range(len(starts_q) - 1):
                lq, lk = starts_q[n + 1] - starts_q[n], starts_k[n + 1] - starts_k[n]
                if lq > lk:
                    raise InputError(f"sequence {n} has {lq} queries but only {lk} keys: each sequence's query "
                                     "length must be <= its key length (queries are the last positions)")
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
        if k.shape[sd] > INT32_MAX:
            raise InputError(f"k has {k.shape[sd]} positions; the kernels index tokens with int32")
    if heads != pattern.heads:
        raise InputError(f"q has {heads} heads but pattern '{pattern.name}' has {pattern.heads}")
    if kv_heads != pattern.kv_heads:
        raise InputError(f"k/v have {kv_heads} heads but pattern '{pattern.name}' has kv_heads = {pattern.kv_heads}")
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise InputError(f"head dims differ: q {head_dim}, k {k.shape[-1]}, v {v.shape[-1]}")
    if not 16 <= head_dim <= 256:
        raise InputError(f"head dim {head_dim} is not supported: use 16..256")
    check_runnable(pattern)
    return varlen, head_dim


# ------------------------------------------------------------------ the interpreter
def interpreter_compute_dtype(dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype to compute in instead of ``dtype`` under the Triton interpreter, or None.

    Triton 3.6's interpreter computes ``tl.dot`` on bfloat16 wrongly (errors ~1e8, no
    warning), so every entry point runs bf16 inputs as float32 copies there and casts the
    results back: correct, only slower, and only on the CPU path that is slow anyway.
    """
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else None


# ------------------------------------------------------------------ FP8 QK^T
FP8_DTYPES = (torch.float16, torch.bfloat16)
FP8_CAPABILITY = (8, 9)


def check_qk_fp8(dtype: torch.dtype, device_type: str, capability: Optional[Tuple[int, int]], varlen: bool,
                 needs_grad: bool) -> None:
    """Refuse the FP8 QK^T forward (``tuning={"qk_fp8": True}``) where it cannot be right.

    ``capability`` is the GPU's (None off the GPU: the interpreter, which ``check_device`` has
    already required). ``needs_grad``: autograd would want gradients of this output, and the
    backward recomputes the scores in 16-bit, which would disagree with the FP8 ones."""
    if dtype not in FP8_DTYPES:
        raise InputError(f"qk_fp8 takes float16 or bfloat16 q, k, v (PV runs in the input dtype); got {dtype}")
    if device_type == "cuda" and (capability is None or tuple(capability) < FP8_CAPABILITY):
        raise InputError(f"qk_fp8 needs a GPU with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper or "
                         f"newer); this one is {capability}: leave qk_fp8 off")
    if varlen:
        raise InputError("qk_fp8 takes padded batches (layout bhsd or bshd); packed sequences (cu_seqlens) are not "
                         "supported: leave qk_fp8 off for them")
    if needs_grad:
        raise InputError("qk_fp8 is forward-only (inference / prefill): the backward recomputes the attention "
                         "scores in 16-bit, which would not match this FP8 output. Call it under torch.no_grad() "
                         "or torch.inference_mode(), on tensors that do not require grad, or leave qk_fp8 off")
