"""ALISA on the GPU (bf16): the INT8 decode kernel against the float32 reference over the
dequantised K/V, and the host tier (pinned memory, side-stream copies) against the all-resident
cache. Outputs are poisoned with NaN before each call."""
from __future__ import annotations

import pytest
import torch

import s2dsl
from s2dsl.runtime.decode import cached_attention, paged_attention
from s2dsl.runtime.host_tier import HostTier
from s2dsl.runtime.kv_cache import PagedKVCache, dense_pattern

from serving_helpers import decode_steps

pytestmark = pytest.mark.gpu
SWA = s2dsl.parse("pattern p { block = 64 heads = 32 kv_heads = 8 heads * { window 4 sink 1 topk 4 recent 8 } }")["p"]
STATIC = s2dsl.local_stride(block=64, local_blocks=4, vert_stride=8, heads=32, kv_heads=8)
DENSE = dense_pattern(32, 8, 64)
D = 128


def _data(pattern, n, batch):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [[torch.randn(1, h, n, D, device="cuda", generator=g, dtype=torch.bfloat16)
             for h in (pattern.heads, pattern.kv_heads, pattern.kv_heads)] for _ in range(batch)]


@pytest.mark.parametrize("pattern", [STATIC, DENSE], ids=["static", "dense"])
def test_gpu_int8_decode_matches_float32_reference(pattern):
    n = 2000
    data = _data(pattern, n, 2)
    cache = PagedKVCache(pattern, num_pages=640, head_dim=D, dtype=torch.bfloat16, device="cuda",
                         kv_dtype=torch.int8)
    ids = [cache.add_sequence() for _ in data]
    for s, (q, k, v) in zip(ids, data):
        cached_attention(cache, [s], q[:, :, :n - 1], k[:, :, :n - 1], v[:, :, :n - 1])
    q, k, v = (torch.cat([d[j][:, :, n - 1:] for d in data]) for j in range(3))
    cache.append(ids, k, v)
    for splits in (1, 4):
        out = torch.full_like(q, float("nan"))
        paged_attention(q, cache, ids, out=out, n_splits=splits)
        for b, s in enumerate(ids):
            kd, vd = cache.gather(s)
            ref = s2dsl.reference_attention(q[b:b + 1].float(), kd[None].float(), vd[None].float(), pattern)
            err = ((out[b:b + 1].float() - ref).norm() / ref.norm()).item()
            assert err < 2e-2, (splits, err)
            exact = s2dsl.reference_attention(q[b:b + 1].float(), data[b][1].float(), data[b][2].float(), pattern)
            print(f"{pattern.name}: INT8 output vs 16-bit K/V, relative {((ref - exact).norm() / exact.norm()).item():.2e}")


@pytest.mark.parametrize("kv_dtype", [None, torch.int8], ids=["bf16", "int8"])
def test_gpu_host_tier_is_lossless(kv_dtype):
    data = _data(SWA, 1600, 2)
    resident = PagedKVCache(SWA, num_pages=512, head_dim=D, dtype=torch.bfloat16, device="cuda", kv_dtype=kv_dtype)
    ref, _ = decode_steps(resident, data, 1100, 500, alternate=True)
    # the prompt's 18 blocks per (sequence, kv head) fit, the rest moves
    tiered = PagedKVCache(SWA, num_pages=2 * 8 * 19, head_dim=D, dtype=torch.bfloat16, device="cuda",
                          kv_dtype=kv_dtype)
    tier = HostTier(tiered.table, host_pages=2 * 8 * 26)
    tier.attach(tiered)
    out, _ = decode_steps(tiered, data, 1100, 500, alternate=True)
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all()
    assert torch.equal(out, ref)
    assert tier.moved_up > 0 and tier.moved_down > 0
