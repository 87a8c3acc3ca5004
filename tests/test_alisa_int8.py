"""INT8 KV pages in the paged cache and the generated decode kernel (ALISA's quantised KV), under
the Triton interpreter: the kernel must compute exactly attention over the dequantised K/V (it
dequantises in registers), and the dequantised K/V must stay within the quantiser's bound."""
from __future__ import annotations

import os

import pytest
import torch

import s2dsl
from s2dsl.runtime.decode import cached_attention, decode_source, choose_decode
from s2dsl.runtime.kv_cache import PagedKVCache, dense_pattern

interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
D = 16
PHI = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=3, heads=4, kv_heads=2)
MHA = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=2, heads=2)  # one row per program: no tl.dot
DENSE = dense_pattern(4, 1, 16)
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def _run(pattern, dtype, lengths, prompt, splits=1, seed=0):
    """Prefill then decode token by token; check every decode step against the reference over the
    cache's dequantised K/V and return the largest deviation from 16-bit attention."""
    g = torch.Generator().manual_seed(seed)
    # lookahead: eviction runs a block behind, so the blocks this step read are still there to compare
    cache = PagedKVCache(pattern, num_pages=64, head_dim=D, dtype=dtype, kv_dtype=torch.int8, lookahead=16)
    ids = [cache.add_sequence() for _ in lengths]
    data = [[torch.randn(1, h, n, D, generator=g).to(dtype) for h in (pattern.heads, pattern.kv_heads,
                                                                      pattern.kv_heads)] for n in lengths]
    for i, s in enumerate(ids):
        q, k, v = (t[:, :, :prompt] for t in data[i])
        cached_attention(cache, [s], q, k, v)
    worst = 0.0
    for pos in range(prompt, min(lengths)):
        q, k, v = (torch.cat([d[j][:, :, pos:pos + 1] for d in data]) for j in range(3))
        out = cached_attention(cache, ids, q, k, v, n_splits=splits)
        assert torch.isfinite(out).all()
        for b, s in enumerate(ids):
            kd, vd = cache.gather(s)
            ref = s2dsl.reference_attention(q[b:b + 1].float(), kd[None].float(), vd[None].float(), pattern)
            torch.testing.assert_close(out[b:b + 1].float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
            exact = s2dsl.reference_attention(q[b:b + 1].float(), data[b][1][:, :, :pos + 1].float(),
                                              data[b][2][:, :, :pos + 1].float(), pattern)
            worst = max(worst, (out[b:b + 1].float() - exact).abs().max().item())
    return cache, data, ids, worst


@interpreter
@pytest.mark.parametrize("pattern,dtype,splits", [(PHI, torch.float32, 1), (PHI, torch.float16, 2),
                                                  (MHA, torch.float32, 1), (DENSE, torch.float16, 1)],
                         ids=["phi-f32", "phi-f16-split", "mha-f32", "dense-f16"])
def test_int8_decode_matches_reference_on_dequantised_kv(pattern, dtype, splits):
    cache, data, ids, worst = _run(pattern, dtype, [40, 37], prompt=21, splits=splits)
    assert cache.k_pages.dtype == torch.int8 and cache.v_pages.dtype == torch.int8
    # quantisation moves the output by a small amount (unit-variance K/V: a step is about 6/255)
    assert 0 < worst < 0.1, worst


@interpreter
def test_int8_pages_stay_within_the_bound():
    """Pages written whole (the prompt's) are within half a step of the 16-bit values; the page
    requantised token by token while decoding picks up at most half a step per widening of its
    range, which stays well under two steps in practice (a few widenings, each of a new scale)."""
    cache, data, ids, _ = _run(PHI, torch.float32, [40], prompt=32)
    s = ids[0]
    kd, vd = cache.gather(s)
    pages = cache.pages_of(s)
    for g in range(PHI.kv_heads):
        for j, p in enumerate(pages[g]):
            if p < 0:
                continue
            sl = slice(j * 16, min((j + 1) * 16, 40))
            bound = 0.5 if j < 2 else 2.0
            for got, orig, sc in ((kd, data[0][1], cache.k_scale), (vd, data[0][2], cache.v_scale)):
                steps = ((got[g, sl] - orig[0, g, sl]).abs() / sc[p]).max().item()
                assert steps <= bound + 1e-4, (g, j, steps)


@interpreter
@pytest.mark.parametrize("dtype,padded", [(torch.float16, False), (torch.float32, True)], ids=["f16", "f32-padded"])
def test_int8_chunked_prefill_reads_the_pages_through_the_kernel(dtype, padded):
    """A second prefill chunk (several queries over the cache: the decode kernel's tiled path, or
    row by row for a padded batch) reads INT8 pages, dequantised in the kernel; checked against
    the reference over the cache's dequantised K/V."""
    g = torch.Generator().manual_seed(1)
    # lookahead: eviction after the chunk stays behind its first query, so gather sees what it read
    cache = PagedKVCache(PHI, num_pages=64, head_dim=D, dtype=dtype, kv_dtype=torch.int8, lookahead=48)
    ids = [cache.add_sequence() for _ in range(2)]
    n0, n1 = 37, 20
    data = [[torch.randn(1, h, n0 + n1, D, generator=g).to(dtype) for h in (PHI.heads, PHI.kv_heads, PHI.kv_heads)]
            for _ in ids]
    for s, (q, k, v) in zip(ids, data):
        cached_attention(cache, [s], q[:, :, :n0], k[:, :, :n0], v[:, :, :n0])
    q, k, v = (torch.cat([d[j][:, :, n0:] for d in data]) for j in range(3))
    lengths = [n1, n1 - 5] if padded else None
    out = cached_attention(cache, ids, q, k, v, lengths=lengths)
    assert torch.isfinite(out).all()
    for b, s in enumerate(ids):
        real = n1 if not padded else lengths[b]
        kd, vd = cache.gather(s)
        ref = s2dsl.reference_attention(q[b:b + 1, :, :real].float(), kd[None].float(), vd[None].float(), PHI)
        torch.testing.assert_close(out[b:b + 1, :, :real].float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_int8_kernel_is_generated_only_for_int8_caches():
    plain = decode_source(PHI, choose_decode(PHI, torch.float16, D, 1, torch.device("cpu")))
    int8 = decode_source(PHI, choose_decode(PHI, torch.float16, D, 1, torch.device("cpu"), kv_int8=True))
    assert "KScale" not in plain and "KScale" in int8
    assert "D_PAD, True)" in int8


def test_int8_cache_refuses_other_kv_dtypes_and_counts_bytes():
    with pytest.raises(ValueError, match="kv_dtype"):
        PagedKVCache(PHI, num_pages=4, head_dim=D, dtype=torch.float16, kv_dtype=torch.int16)
    a = PagedKVCache(PHI, num_pages=4, head_dim=D, dtype=torch.float16)
    b = PagedKVCache(PHI, num_pages=4, head_dim=D, dtype=torch.float16, kv_dtype=torch.int8)
    assert b.page_bytes == a.page_bytes // 2 + 4 * 4 * D


def _decode_writes(monkeypatch, fused: bool, dtype):
    """Prefill (torch quantiser) then 40 one-token writes of two sequences, by the fused kernel
    (``fused``) or by the torch ops it replaces; a channel held constant exercises flat pages."""
    from s2dsl.runtime import kv_cache
    real, used = kv_cache.write_decode_tokens, []
    monkeypatch.setattr(kv_cache, "write_decode_tokens", lambda *a: fused and used.append(real(*a)) is None)
    g = torch.Generator().manual_seed(4)
    cache = PagedKVCache(PHI, num_pages=40, head_dim=D, dtype=dtype, kv_dtype=torch.int8, evict=False)
    ids = [cache.add_sequence() for _ in range(2)]
    k = torch.randn(2, PHI.kv_heads, 60, D, generator=g) * torch.logspace(-3, 2, D)  # channels of all scales
    v = torch.randn(2, PHI.kv_heads, 60, D, generator=g)
    k[..., 3] = 0.25  # a flat channel
    k, v = k.to(dtype), v.to(dtype)
    for b, s in enumerate(ids):
        cache.append([s], k[b:b + 1, :, :13 + b], v[b:b + 1, :, :13 + b])
    for pos in range(14, 54):
        cache.append(ids, k[:, :, pos:pos + 1], v[:, :, pos:pos + 1])
    assert used == ([True] * 40 if fused else [])
    return cache


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_decode_write_kernel_equals_the_torch_quantiser(monkeypatch, dtype):
    """The generated write kernel (one launch for K and V per decode step) produces exactly the
    codes, scales and biases of the torch ops it replaced: same float32 arithmetic, rounding half
    to even, partly filled pages, flat channels and page boundaries included."""
    with monkeypatch.context() as m:
        torch_path = _decode_writes(m, False, dtype)
    fused = _decode_writes(monkeypatch, True, dtype)
    assert torch.equal(fused.table.tables, torch_path.table.tables)
    assert torch.equal(fused._k_all, torch_path._k_all) and torch.equal(fused._v_all, torch_path._v_all)
    assert torch.equal(fused._qparams, torch_path._qparams)


@interpreter
@pytest.mark.parametrize("block,head_dim", [(64, 64), (64, 128), (16, 96)])
def test_int8_decode_write_kernel_compiles_for_sm90(block, head_dim):
    """The write kernel the GPU runs (bf16 K/V) compiles for sm_90 (the interpreter accepts what
    the GPU compiler may refuse; see test_sm90_compile)."""
    from test_sm90_compile import _Capture, _compile_sm90
    from s2dsl.runtime.quant import _write_module
    module = _write_module(block, head_dim)
    space = module.launch.__globals__
    jobs, saved = [], space["write_kernel"]
    space["write_kernel"] = _Capture(saved, jobs, run=False)
    try:
        codes = torch.zeros(9, block, head_dim, dtype=torch.int8)
        new = torch.zeros(4, head_dim, dtype=torch.bfloat16)
        module.launch(codes, codes, torch.zeros(4, 9, head_dim), new, new, torch.arange(4) * block)
    finally:
        space["write_kernel"] = saved
    assert len(jobs) == 1
    for shared in _compile_sm90(jobs):
        assert shared <= 232448
