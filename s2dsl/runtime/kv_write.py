"""A step's K/V write as one kernel for both pools.

``PagedKVCache.write`` scatters a step's new rows (one per token and kv head) into the K and
the V pool. Two ``index_copy_`` calls are two launches per layer and step, a fixed cost that
a CUDA-graph decode step pays 2 x layers times for a few kilobytes; ``write_kv_rows`` writes
both pools in one launch, one program per row.

A first prefill writes only the blocks the pattern keeps: every other token's row aims at the
scratch page after the pool. ``index_copy_`` still copies those rows, all of them onto the
same few addresses (a 32K prompt of a local-stride layer: ~7/8 of 262,144 rows of 128 bytes
onto one), and the stores to one address serialise: ~1 ms per layer on an H200 for ~0.03 ms
of useful traffic. ``write_kv_tokens`` reads the step's K/V in place (any strides: no
reshape copy of a transposed projection), casts on the store, and skips the rows aimed at the
scratch page (masked: neither read nor written), ``BLOCK_R`` rows per program, both pools in
one launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_ROWS", "write_kv_rows", "write_kv_tokens"]

#: rows (new tokens x kv heads) up to which a write takes the one-program-per-row kernel
MAX_ROWS = 4096


@triton.jit
def kv_rows_kernel(K, V, KP, VP, DEST, stride_k, stride_v, D: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    dst = tl.load(DEST + r).to(tl.int64) * D
    offs = tl.arange(0, BLOCK_D)
    m = offs < D
    tl.store(KP + dst + offs, tl.load(K + r * stride_k + offs, mask=m), mask=m)
    tl.store(VP + dst + offs, tl.load(V + r * stride_v + offs, mask=m), mask=m)


def write_kv_rows(k_pool: torch.Tensor, v_pool: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                  dest: torch.Tensor) -> None:
    """``k_pool[dest[i]] = k_rows[i]`` and the same for V, pools viewed as (rows, d), in one launch.
    ``k_rows``/``v_rows``: (m, d) in the pools' dtype with a contiguous last dim; ``dest``: (m,) int."""
    m, d = k_rows.shape
    if v_rows.shape != k_rows.shape or dest.numel() != m or k_pool.shape[-1] != d or v_pool.shape[-1] != d:
        raise ValueError(f"write_kv_rows: k_rows {tuple(k_rows.shape)}, v_rows {tuple(v_rows.shape)} and dest "
                         f"({dest.numel()} rows) must agree, with the pools' row width {k_pool.shape[-1]}")
    if m == 0:
        return
    kv_rows_kernel[(m,)](k_rows, v_rows, k_pool, v_pool, dest.contiguous(), k_rows.stride(0), v_rows.stride(0),
                         D=d, BLOCK_D=triton.next_power_of_2(d), num_warps=1)


@triton.jit
def kv_tokens_kernel(K, V, KP, VP, DEST, n_rows, n_tok, kv_heads, skip,
                     skb, skh, skt, svb, svh, svt, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # row r of the step is (sequence, kv head, token) = (r // (H n), r // n % H, r % n), as ``dest``
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    dst = tl.load(DEST + r, mask=r < n_rows, other=skip).to(tl.int64)
    live = dst != skip
    t = r % n_tok
    bh = r // n_tok
    h = bh % kv_heads
    b = bh // kv_heads
    offs = tl.arange(0, BLOCK_D)
    m = live[:, None] & (offs < D)[None, :]
    to = dst[:, None] * D + offs[None, :]
    kv = tl.load(K + (b * skb + h * skh + t * skt)[:, None] + offs[None, :], mask=m)
    tl.store(KP + to, kv.to(KP.dtype.element_ty), mask=m)
    vv = tl.load(V + (b * svb + h * svh + t * svt)[:, None] + offs[None, :], mask=m)
    tl.store(VP + to, vv.to(VP.dtype.element_ty), mask=m)


def write_kv_tokens(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    dest: torch.Tensor, skip: int, block_rows: int = 64) -> None:
    """``k_pool[dest[r]] = row r of k`` and the same for V, skipping every row whose ``dest`` is
    ``skip``, in one launch. ``k``/``v``: (batch, kv_heads, n, d), any strides but a contiguous
    last dim, any float dtype (cast to the pools'); pools viewed as (rows, d); ``dest``: (batch *
    kv_heads * n,) int, in that row order."""
    b, h, n, d = k.shape
    rows = b * h * n
    if rows == 0:
        return
    if dest.numel() != rows or v.shape != k.shape or k.stride(3) != 1 or v.stride(3) != 1 or k_pool.shape[-1] != d:
        raise ValueError(f"write_kv_tokens: dest has {dest.numel()} rows for k of shape {tuple(k.shape)}, or the "
                         "last dim of k, v is strided")
    grid = (triton.cdiv(rows, block_rows),)
    kv_tokens_kernel[grid](k, v, k_pool, v_pool, dest.contiguous(), rows, n, h, skip,
                           k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                           D=d, BLOCK_R=block_rows, BLOCK_D=triton.next_power_of_2(d), num_warps=4)
