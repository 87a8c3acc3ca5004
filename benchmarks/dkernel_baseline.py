"""DKernel (S2-Attention's kernel library) as a same-run baseline for the benchmarks.

DKernel is not a dependency: it lies in ``shared/anchors`` (inside the checkout on the GPU
machine) or ``../shared/anchors`` (beside a developer's checkout). ``available()`` says whether
it could be imported and why not; every benchmark records that instead of failing.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional, Tuple

_ROOT = Path(__file__).resolve().parent.parent
_ERROR: Optional[str] = None


def _import():
    global _ERROR
    for candidate in (_ROOT / "shared" / "anchors", _ROOT.parent / "shared" / "anchors"):
        if (candidate / "dkernel").is_dir() and str(candidate) not in sys.path:
            sys.path.append(str(candidate))
    try:
        import dkernel  # noqa: F401
        return dkernel
    except Exception as exc:  # noqa: BLE001 - a missing baseline is recorded, not fatal
        _ERROR = f"{type(exc).__name__}: {exc}"
        return None


def available() -> Tuple[bool, str]:
    ok = _import() is not None
    return ok, "" if ok else (_ERROR or "dkernel not found in shared/anchors")


def local_stride(heads: int, n: int, *, block: int = 64, local_blocks: int = 16, vert_stride: int = 8,
                 kv_heads: Optional[int] = None, causal: bool = True) -> Callable:
    """DKernel's LocalStrideSparseAttention for (batch, heads, seq, dim) tensors; returns fn(q, k, v)."""
    dkernel = _import()
    if dkernel is None:
        raise RuntimeError(f"DKernel is not available: {_ERROR}")
    attn = dkernel.LocalStrideSparseAttention(heads, n, block, local_blocks, vert_stride,
                                              num_kv_heads=kv_heads, seq_dim=2, causal=causal)
    import torch
    attn = attn.to(torch.cuda.current_device())
    return lambda q, k, v: attn(q, k, v)
