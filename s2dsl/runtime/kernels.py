"""Choosing a specialisation and fetching the generated kernel module for it."""
from __future__ import annotations

import os
from dataclasses import replace
from types import ModuleType
from typing import Optional

import torch

from ..codegen import Specialization, generate_forward, lower
from ..codegen.forward import CODEGEN_VERSION
from .cache import codegen_fingerprint
from ..pattern import Pattern
from .cache import KernelCache, cache_key, default_cache

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_forward(pattern: Pattern, dtype: torch.dtype, head_dim: int, layout: str,
                   device: torch.device, tuning: Optional[dict] = None) -> Specialization:
    """Tile sizes for the forward kernel; ``tuning`` overrides any field."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    block = pattern.block
    if device.type != "cuda":  # the interpreter: small tiles run fastest
        spec = Specialization(block_m=min(block, 32), block_n=min(block, 32), num_warps=4, num_stages=1)
    else:
        spec = choose_forward_for_gpu(pattern, head_dim)
    spec = replace(spec, dtype=_DTYPES[dtype], head_dim=head_dim, layout=layout, capability=tuple(capability))
    plan = lower(pattern)
    # a tile takes the selection of its one query block; relative strides and two-sided windows
    # are enumerated per query block too
    if spec.block_m > block and plan.one_block_tiles:
        spec = replace(spec, block_m=block, num_warps=min(spec.num_warps, 4))
    if device.type == "cuda" and plan.extended and not pattern.causal and head_dim >= 128:
        # bidirectional plans pipeline a second window loop (ahead of the diagonal): at head dim
        # 128 three stages of two-block spans need 240 KB of shared memory (sm_90 holds 227)
        spec = replace(spec, num_stages=min(spec.num_stages, 2))
    return replace(spec, **(tuning or {}))


def choose_forward_for_gpu(pattern: Pattern, head_dim: int) -> Specialization:
    """Measured on an H100 (benchmarks/RESULTS.md): 128-row tiles, 8 warps, 3 stages and two
    blocks at a time inside the window beat the other shapes tried at head dim 128."""
    big = head_dim > 128
    block_m = 64 if big else 128
    plan = lower(pattern)
    if plan.one_block_tiles:  # a tile stays inside one query block
        block_m = min(block_m, pattern.block)
    return Specialization(head_dim=head_dim, capability=(9, 0), block_m=block_m,
                          block_n=min(pattern.block, 32 if big else 64),
                          window_span=2 if pattern.block <= 64 and not big else 1,
                          num_warps=4 if block_m == 64 else 8, num_stages=2 if big else 3)


def forward_module(pattern: Pattern, spec: Specialization, cache: Optional[KernelCache] = None) -> ModuleType:
    cache = cache or default_cache()
    plan = lower(pattern)
    key = cache_key(CODEGEN_VERSION, codegen_fingerprint(), "fwd", plan, spec)
    return cache.get(key, lambda: generate_forward(plan, spec, name=pattern.name, fingerprint=pattern.fingerprint()))


def forward_source(pattern: Pattern, spec: Specialization) -> str:
    return generate_forward(lower(pattern), spec, name=pattern.name, fingerprint=pattern.fingerprint())
