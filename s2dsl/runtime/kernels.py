"""Choosing a specialisation and fetching the generated kernel module for it."""
from __future__ import annotations

import os
from dataclasses import replace
from types import ModuleType
from typing import Optional

import torch

from ..codegen import Specialization, generate_forward, lower
from ..codegen.forward import CODEGEN_VERSION
from ..memo import per_object
from ..pattern import Pattern
from .cache import KernelCache, cache_key, codegen_fingerprint, default_cache

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kv_tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether K/V can be read through tensor descriptors: 16-byte aligned base and row strides
    (every (batch, head) base is then aligned too)."""
    return all(t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
               for t in tensors)


def choose_forward(pattern: Pattern, dtype: torch.dtype, head_dim: int, layout: str,
                   device: torch.device, tuning: Optional[dict] = None, seq_len: Optional[int] = None,
                   kv_tma: bool = False) -> Specialization:
    """Tile sizes for the forward kernel; ``tuning`` overrides any field.

    ``seq_len`` (the kv length, when one length holds for the launch) picks among the GPU
    variants measured per length; ``kv_tma`` says the K/V tensors suit tensor descriptors
    (``kv_tma_ready``); without it ``kv_load="tma"`` is refused.
    """
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    block = pattern.block
    if device.type != "cuda":  # the interpreter: small tiles run fastest
        spec = Specialization(block_m=min(block, 32), block_n=min(block, 32), num_warps=4, num_stages=1)
    else:
        spec = choose_forward_for_gpu(pattern, head_dim, seq_len, kv_tma and capability >= (9, 0))
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
    spec = replace(spec, **(tuning or {}))
    if spec.kv_load == "tma" and spec.residue_span != 1 and "residue_span" not in (tuning or {}):
        spec = replace(spec, residue_span=1)  # descriptors load contiguous rows only
    if spec.kv_load == "tma" and not (kv_tma or device.type != "cuda"):
        from .validate import InputError  # validate imports this module
        raise InputError("kv_load='tma' needs K and V with 16-byte aligned data and row strides "
                         "(and a Hopper GPU): use kv_load='pointer' for these tensors")
    return spec


#: at most this many kv tokens: the short-sequence forward (see choose_forward_for_gpu)
SHORT_SEQ = 32768
#: more than this many kv tokens: residue blocks two at a time (one 128-row tile)
LONG_SEQ = 65536
#: the short-sequence tiles with the window's inner blocks and the diagonal in one masked,
#: pipelined loop (benchmarks/sweep_kernels.py "m64_tma_fused" times it beside the default;
#: flipping the default is this one line, issue 14)
SHORT_FUSE_DIAGONAL = False
#: top-k plans (window/sink/stride heads plus topk) up to SHORT_SEQ take the short-sequence
#: tiles too (block a multiple of 64, K/V fit for descriptors) (one block per window step, K/V by tensor descriptors: two programs per SM on sm_90
#: where their old tiles, 255 registers and 208 KB of shared memory, hold one); bench_topk's
#: "m64_tma" times it beside the old tiles with the same selection, and flipping the default is
#: this one line (issue 11)
TOPK_SHORT_TILES = False
#: the same for plans with round-2 constructs (token edges, relative strides, two-sided windows,
#: global rows, prefixes): their old tiles compile to 253 registers / 208 KB (a StreamingLLM-style
#: plan), the short ones to 156 / 113 KB; bench_language's "m64_tma" row times it (flip: this line)
EXTENDED_SHORT_TILES = False
#: persistent programs per SM by tile rows (0: one program per tile), for the plans the
#: length rules apply to; the sweep's "persist2" / "persist1" time 2 and 1 (issue 14), and
#: flipping the default is this one line, e.g. {64: 2, 128: 1}
FORWARD_PERSISTENT = {64: 0, 128: 0}


def choose_forward_for_gpu(pattern: Pattern, head_dim: int, seq_len: Optional[int] = None,
                           kv_tma: bool = False) -> Specialization:
    """Measured on an H100 and an H200 (benchmarks/RESULTS.md), head dim 128, block 64.

    By default 128-row tiles, 8 warps, 3 stages and two blocks at a time inside the window.
    Up to SHORT_SEQ tokens, where windows and masked blocks weigh most, 64-row tiles (one query
    block: no masked window blocks, no rows outside the window) with 4 warps and K/V through
    TMA (which frees the registers that 64-row pointer tiles spill with): 4-17% faster on the
    H200 at 8K and 32K. Beyond LONG_SEQ, where residue blocks dominate, two residue blocks a
    period apart per 128-row step: 1-4% faster at 128K (H100 and H200), slower at 32K.
    Plans with other constructs (token edges, relative strides, global rows, prefixes, top-k)
    keep the default tiles: the rules were not measured on them.
    """
    big = head_dim > 128
    block_m = 64 if big else 128
    plan = lower(pattern)
    if plan.one_block_tiles:  # a tile stays inside one query block
        block_m = min(block_m, pattern.block)
    spec = Specialization(head_dim=head_dim, capability=(9, 0), block_m=block_m,
                          block_n=min(pattern.block, 32 if big else 64),
                          window_span=2 if pattern.block <= 64 and not big else 1,
                          num_warps=4 if block_m == 64 else 8, num_stages=2 if big else 3)
    if (seq_len is None or big or (plan.extended and not EXTENDED_SHORT_TILES)
            or (plan.has_topk and not TOPK_SHORT_TILES)):
        return spec  # the length rules were measured on window/sink/stride heads only
    # top-k and round-2 plans (switched on above) take the short tiles alone: no fused diagonal,
    # residue pairs or persistent programs, which were timed on window/sink/stride heads only
    static = not (plan.extended or plan.has_topk)
    if seq_len <= SHORT_SEQ and kv_tma and pattern.block >= 64 and pattern.block % 64 == 0:
        spec = replace(spec, block_m=64, window_span=1, num_warps=4, kv_load="tma",
                       fuse_diagonal=SHORT_FUSE_DIAGONAL and static)
    elif seq_len > LONG_SEQ and plan.max_residues == 1 and static:
        spec = replace(spec, residue_span=2)
    return replace(spec, persistent=FORWARD_PERSISTENT.get(spec.block_m, 0) if static else 0)


def forward_module(pattern: Pattern, spec: Specialization, cache: Optional[KernelCache] = None) -> ModuleType:
    if cache is None:  # the default cache's module, memoised per pattern object (its key costs ~75 us)
        cache = default_cache()
        return per_object(pattern, ("fwd", spec, id(cache)), lambda: forward_module(pattern, spec, cache))
    plan = lower(pattern)
    key = cache_key(CODEGEN_VERSION, codegen_fingerprint(), "fwd", plan, spec)
    return cache.get(key, lambda: generate_forward(plan, spec, name=pattern.name, fingerprint=pattern.fingerprint()))


def forward_source(pattern: Pattern, spec: Specialization) -> str:
    return generate_forward(lower(pattern), spec, name=pattern.name, fingerprint=pattern.fingerprint())
