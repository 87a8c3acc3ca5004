"""A decode step's K/V write as one kernel for both pools.

``PagedKVCache.write`` scatters a step's new rows (one per token and kv head) into the K and
the V pool. Two ``index_copy_`` calls are two launches per layer and step, a fixed cost that
a CUDA-graph decode step pays 2 x layers times for a few kilobytes; this kernel writes both
pools in one launch, one program per row. Long writes (a prefill's) keep ``index_copy_``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_ROWS", "write_kv_rows"]

#: rows (new tokens x kv heads) up to which a write takes the kernel
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
    if m == 0:
        return
    kv_rows_kernel[(m,)](k_rows, v_rows, k_pool, v_pool, dest.contiguous(), k_rows.stride(0), v_rows.stride(0),
                         D=d, BLOCK_D=triton.next_power_of_2(d), num_warps=1)
