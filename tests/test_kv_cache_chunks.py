"""Chunked prefill over the pages: long chunks gather the sequences' K/V and run the prefill
kernel (``decode.GATHER_PREFILL_MIN``; SDPA for a dense pattern), short ones the decode kernel; both equal the dense
reference, with freed pages poisoned and sequences of different lengths in one batch."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import s2dsl
from s2dsl.runtime import decode
from s2dsl.runtime.decode import cached_attention
from s2dsl.runtime.kv_cache import PagedKVCache, dense_pattern

D = 16
PHI = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=3, heads=4, kv_heads=2)
HETERO = s2dsl.parse("pattern p { block = 16 heads = 4 kv_heads = 2 causal "
                     "heads 0..0 { window 1 sink 1 stride 3 offset 1 } heads 1..1 { window 2 stride 2 } "
                     "heads 2..3 { window 3 stride 5 offset h } }")["p"]
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@interpreter
@pytest.mark.parametrize("pattern", [PHI, HETERO, dense_pattern(4, 2, 16)], ids=["phi", "hetero", "dense"])
def test_long_chunks_gather_and_equal_the_reference(pattern, monkeypatch):
    monkeypatch.setattr(decode, "GATHER_PREFILL_MIN", 8)
    gathered = []
    real = decode._gathered_prefill
    monkeypatch.setattr(decode, "_gathered_prefill", lambda *a: gathered.append(1) or real(*a))
    sdpa = []
    real_sdpa = decode._sdpa_chunk
    monkeypatch.setattr(decode, "_sdpa_chunk", lambda *a: sdpa.append(1) or real_sdpa(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = PagedKVCache(pattern, num_pages=64, head_dim=D, dtype=torch.float32, lookahead=5)
    ids = [cache.add_sequence(), cache.add_sequence()]
    g = torch.Generator().manual_seed(0)
    total = 140
    data = [(torch.randn(1, pattern.heads, total, D, generator=g), torch.randn(1, pattern.kv_heads, total, D, generator=g),
             torch.randn(1, pattern.kv_heads, total, D, generator=g)) for _ in ids]
    pos = [0, 0]
    # first prefills of different lengths, then chunks (long: gathered; short: decode kernel)
    schedule = [([0], 37), ([1], 20), ([0, 1], 24), ([0, 1], 3), ([0, 1], 33), ([1], 9), ([0, 1], 1)]
    for rows, n in schedule:
        q, k, v = (torch.cat([data[r][t][:, :, pos[r]:pos[r] + n] for r in rows]) for t in range(3))
        out = cached_attention(cache, [ids[r] for r in rows], q, k, v)
        for i, r in enumerate(rows):
            end = pos[r] + n
            qs, ks, vs = data[r]
            ref = s2dsl.reference_attention(qs[:, :, pos[r]:end], ks[:, :, :end], vs[:, :, :end], pattern)
            torch.testing.assert_close(out[i:i + 1], ref, atol=2e-5, rtol=2e-5)
            pos[r] = end
        free = list(cache.free_pages)
        if free:  # pages no query needs may hold anything: the kernels must not read them
            cache.k_pages[free] = float("nan")
            cache.v_pages[free] = float("nan")
    assert len(gathered) == 3  # the 24-, 33- and 9-token chunks
    # a dense layer's chunk of one length per row runs SDPA (lower-right causal): the 9-token one
    assert len(sdpa) == (1 if decode._dense(pattern) else 0)
