"""The forward's selectable variants (issue 14): K/V through tensor descriptors, the
length-aware choice of tiles, and what is refused. Kernel checks run under the Triton
interpreter (fp32/fp16) and, marked ``gpu``, in bf16 on a GPU."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import s2dsl
from s2dsl.codegen import generate_forward, lower
from s2dsl.runtime.attention import InputError, forward
from s2dsl.runtime.kernels import LONG_SEQ, SHORT_SEQ, choose_forward_for_gpu, kv_tma_ready

from kernel_strategies import patterns, random_inputs

interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
STRIDE32 = s2dsl.local_stride(block=64, local_blocks=16, vert_stride=32, heads=32)


def _check(out, lse, q, k, v, pattern, layout, tol):
    to_bhsd = (lambda t: t) if layout == "bhsd" else (lambda t: t.transpose(1, 2))
    ref, ref_lse = s2dsl.reference_attention(to_bhsd(q), to_bhsd(k), to_bhsd(v), pattern, return_lse=True)
    assert torch.isfinite(out).all(), "kernel left NaN/inf"
    torch.testing.assert_close(to_bhsd(out).float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)


@interpreter
@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=patterns(), data=st.data())
def test_variants_match_reference(pattern, data):
    """kv_load='tma': rows past kv_len and head-dim columns past HEAD_DIM come back as zeros
    from the descriptor, so ragged lengths and padded head dims need no load masks;
    fuse_diagonal: the window's inner blocks visited masked, in one loop with the diagonal;
    persistent: programs (2 or 6 under the interpreter) each take several tiles in turn."""
    lk = data.draw(st.integers(1, 80), label="kv_len")
    lq = data.draw(st.integers(1, lk), label="q_len")
    d = data.draw(st.sampled_from([16, 24, 32]), label="head_dim")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype")
    layout = data.draw(st.sampled_from(["bhsd", "bshd"]), label="layout")
    fuse = data.draw(st.booleans(), label="fuse_diagonal")
    tuning = {"kv_load": data.draw(st.sampled_from(["tma", "pointer"]), label="kv_load"), "fuse_diagonal": fuse,
              "block_m": data.draw(st.sampled_from([16, 32]), label="block_m"), "block_n": 16,
              "window_span": 1 if fuse else data.draw(st.sampled_from([1, 2]), label="window_span"),
              "persistent": data.draw(st.sampled_from([0, 1, 3]), label="persistent")}
    q, k, v = random_inputs(2, pattern.heads, pattern.kv_heads, lq, lk, d, dtype, layout, seed=lq * 7 + lk)
    out = torch.full_like(q, float("nan"))
    _, lse = forward(q, k, v, pattern, layout=layout, tuning=tuning, out=out)
    _check(out, lse, q, k, v, pattern, layout, 2e-5 if dtype == torch.float32 else 2e-3)


@interpreter
def test_tensor_descriptor_loads_packed_sequences():
    """Packed (varlen) sequences: each descriptor ends at its own sequence's last row."""
    pattern = s2dsl.parse("pattern p { block = 16 heads = 2 kv_heads = 1 heads * { window 2 stride 3 sink 1 } }")["p"]
    lens = [37, 16, 50]
    cu = torch.tensor([0, 37, 53, 103], dtype=torch.int32)
    torch.manual_seed(1)
    q, k, v = (torch.randn(sum(lens), h, 16) for h in (2, 1, 1))
    out, _ = forward(q, k, v, pattern, cu_seqlens_q=cu, cu_seqlens_k=cu, tuning={"kv_load": "tma"})
    for s, n in enumerate(lens):
        a = int(cu[s])
        ref = s2dsl.reference_attention(*(t[a:a + n].transpose(0, 1)[None] for t in (q, k, v)), pattern)
        torch.testing.assert_close(out[a:a + n].transpose(0, 1)[None], ref, atol=2e-5, rtol=2e-5)


ROUND2 = {
    "token window and sink": "heads * { window 20 tokens sink 4 tokens stride 3 offset h }",
    "two-sided window, relative stride": "bidirectional heads * { window 2 ahead 1 stride 3 relative }",
    "causal relative stride": "heads * { window 2 stride 3 relative sink 1 }",
    "dynamic top-k": "heads * { window 1 topk 2 }",
    "global rows": "bidirectional heads * { window 2 global 1 sink 1 }",
    "prefix": "causal prefix 2 heads * { window 2 stride 3 offset h }",
}


@interpreter
@pytest.mark.parametrize("body", ROUND2.values(), ids=list(ROUND2))
def test_tensor_descriptor_loads_round2_constructs(body):
    """Every loop the round-2 constructs add visits through the same loads: the TMA kernel
    gives the pointer kernel's output bit for bit (and the reference's, for static patterns)."""
    pattern = s2dsl.parse(f"pattern p {{ block = 16 heads = 2 {body} }}")["p"]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16 * 6 + 5, 16) for _ in range(3))
    want, _ = forward(q, k, v, pattern)
    got, _ = forward(q, k, v, pattern, tuning={"kv_load": "tma", "block_m": 16})
    assert torch.equal(got, want)
    if pattern.is_static:
        torch.testing.assert_close(got, s2dsl.reference_attention(q, k, v, pattern), atol=2e-5, rtol=2e-5)


def test_length_aware_choice():
    """Short sequences: 64-row tiles through TMA (only where K/V suit descriptors); long ones:
    residue pairs; no length (packed batches): the tiles of before."""
    plain = choose_forward_for_gpu(STRIDE32, 128)
    assert (plain.block_m, plain.window_span, plain.kv_load, plain.residue_span) == (128, 2, "pointer", 1)
    assert choose_forward_for_gpu(STRIDE32, 128, None, True) == plain
    short = choose_forward_for_gpu(STRIDE32, 128, SHORT_SEQ, True)
    assert (short.block_m, short.num_warps, short.window_span, short.kv_load) == (64, 4, 1, "tma")
    assert choose_forward_for_gpu(STRIDE32, 128, 8192, False) == plain  # unaligned K/V: pointers
    assert choose_forward_for_gpu(STRIDE32, 128, LONG_SEQ, True) == plain
    assert choose_forward_for_gpu(STRIDE32, 128, 2 * LONG_SEQ, True).residue_span == 2
    assert choose_forward_for_gpu(STRIDE32, 256, 8192, True) == choose_forward_for_gpu(STRIDE32, 256)
    # two residues per head: residue pairs do not apply
    two = s2dsl.parse("pattern p { block = 64 heads = 2 heads * { window 4 stride 8 stride 5 offset 1 } }")["p"]
    assert choose_forward_for_gpu(two, 128, 2 * LONG_SEQ, True).residue_span == 1
    # the rules were measured on window/sink/stride heads: other constructs keep their tiles
    for body in ROUND2.values():
        other = s2dsl.parse(f"pattern p {{ block = 64 heads = 2 {body} }}")["p"]
        assert choose_forward_for_gpu(other, 128, 8192, True) == choose_forward_for_gpu(other, 128)


@pytest.mark.parametrize("flag,body", [("TOPK_SHORT_TILES", "heads * { window 16 sink 1 topk 16 }"),
                                       ("EXTENDED_SHORT_TILES", "heads * { window 1020 tokens sink 4 tokens }"),
                                       ("EXTENDED_SHORT_TILES", "bidirectional heads * { window 2 ahead 1 stride 3 relative }")])
def test_other_plans_take_the_short_tiles_only_when_switched_on(monkeypatch, flag, body):
    from s2dsl.runtime import kernels
    plan = s2dsl.parse(f"pattern p {{ block = 64 heads = 4 kv_heads = 2 {body} }}")["p"]
    old = choose_forward_for_gpu(plan, 128)
    assert choose_forward_for_gpu(plan, 128, 8192, True) == old  # the default: the tiles of before
    monkeypatch.setattr(kernels, flag, True)
    short = choose_forward_for_gpu(plan, 128, SHORT_SEQ, True)
    assert (short.block_m, short.num_warps, short.window_span, short.kv_load, short.residue_span) == \
        (64, 4, 1, "tma", 1)
    assert choose_forward_for_gpu(plan, 128, 8192, False) == old  # unaligned K/V: pointers
    assert choose_forward_for_gpu(plan, 128, 2 * SHORT_SEQ, True) == old


@interpreter
@pytest.mark.parametrize("name", [n for n in ROUND2 if n != "dynamic top-k"])  # (test_topk has its own)
def test_short_tiles_on_round2_constructs_match_reference(name):
    """One block per window step with tensor-descriptor loads (EXTENDED_SHORT_TILES' tiles) on every
    round-2 construct, a ragged length and (causal plans) a past."""
    pattern = s2dsl.parse(f"pattern p {{ block = 16 heads = 4 kv_heads = 2 {ROUND2[name]} }}")["p"]
    for lq, lk in ((70, 70), (33, 81)) if pattern.causal else ((70, 70),):
        q, k, v = random_inputs(2, 4, 2, lq, lk, 16, torch.float16, "bhsd", seed=lq)
        out = torch.full_like(q, float("nan"))
        _, lse = forward(q, k, v, pattern, tuning={"window_span": 1, "kv_load": "tma", "block_m": 16}, out=out)
        _check(out, lse, q, k, v, pattern, "bhsd", 2e-3)


def test_kv_tma_ready():
    base = torch.randn(2, 4, 64, 32, dtype=torch.float16)
    assert kv_tma_ready(base, base.transpose(1, 2))
    assert not kv_tma_ready(base[..., 1:17])  # data 2 bytes off alignment
    odd = torch.randn(2, 4, 64, 12, dtype=torch.float16)  # 24-byte rows
    assert not kv_tma_ready(odd)


def test_refusals():
    plan = lower(STRIDE32)
    spec = replace(choose_forward_for_gpu(STRIDE32, 128), dtype="bfloat16", head_dim=128)
    with pytest.raises(ValueError, match="residue_span=1"):
        generate_forward(plan, replace(spec, kv_load="tma", residue_span=2))
    with pytest.raises(ValueError, match="kv_load"):
        generate_forward(plan, replace(spec, kv_load="bulk"))
    with pytest.raises(ValueError, match="fuse_diagonal"):
        generate_forward(plan, replace(spec, fuse_diagonal=True))  # window_span 2
    # the default emits neither descriptors nor warp specialisation
    source = generate_forward(plan, spec)
    assert "make_tensor_descriptor" not in source and "warp_specialize" not in source
    assert "warp_specialize=True" in generate_forward(plan, replace(spec, window_ws=True))
    assert "num_programs" not in source and "tl.num_programs(0)" in generate_forward(plan, replace(spec, persistent=2))
    with pytest.raises(ValueError, match="persistent"):
        generate_forward(plan, replace(spec, persistent=-1))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1000, 4096])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_gpu_short_sequence_choice(n, layout):
    """bf16 on the GPU: the short-sequence default (TMA, 64-row tiles), with the diagonal fused
    into the window loop, persistent programs (64- and 128-row tiles), and the pointer fallback for K/V that descriptors cannot take,
    against the float32 reference."""
    torch.manual_seed(n)
    pattern = s2dsl.local_stride(block=64, local_blocks=4, vert_stride=8, heads=8, kv_heads=2)
    shape = (1, 8, n, 128) if layout == "bhsd" else (1, n, 8, 128)
    kv_shape = (1, 2, n, 128) if layout == "bhsd" else (1, n, 2, 128)
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(kv_shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    to_bhsd = (lambda t: t) if layout == "bhsd" else (lambda t: t.transpose(1, 2))
    ref = s2dsl.reference_attention(*(to_bhsd(t).float() for t in (q, k, v)), pattern)
    for tuning in (None, {"fuse_diagonal": True}, {"block_m": 128, "num_warps": 8, "kv_load": "tma",
                                                    "window_span": 1, "fuse_diagonal": True},
                   {"persistent": 2}, {"persistent": 1, "block_m": 128, "num_warps": 8, "kv_load": "pointer",
                                       "window_span": 2}):
        out = torch.full_like(q, float("nan"))
        forward(q, k, v, pattern, layout=layout, out=out, tuning=tuning)
        err = ((to_bhsd(out).float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (tuning, err)
    # a K whose rows are 2 bytes off alignment: the default falls back, tma is refused
    storage = torch.randn(k.numel() + 1, device="cuda", dtype=torch.bfloat16)
    k_odd = storage[1:].view(k.shape)
    k_odd.copy_(k)
    out = torch.full_like(q, float("nan"))
    forward(q, k_odd, v, pattern, layout=layout, out=out)
    assert ((to_bhsd(out).float() - ref).norm() / ref.norm()).item() < 1e-2
    with pytest.raises(InputError, match="aligned"):
        forward(q, k_odd, v, pattern, layout=layout, tuning={"kv_load": "tma"})


def test_backward_refuses_forward_only_variants():
    from s2dsl.runtime.backward import choose_backward
    pattern = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=3, heads=2)
    for tuning in ({"kv_load": "tma"}, {"fuse_diagonal": True}, {"window_ws": True}, {"persistent": 2}):
        with pytest.raises(InputError, match="forward-only"):
            choose_backward(pattern, torch.float32, 16, "bhsd", torch.device("cpu"), tuning)


# ---- decode variants (issue 14): one flat loop over the split's kept blocks, several pages per step ----

DEC_PATTERNS = {
    "gqa": s2dsl.local_stride(block=16, local_blocks=2, vert_stride=3, heads=4, kv_heads=2),
    "hetero": s2dsl.parse("pattern p { block = 16 heads = 4 kv_heads = 2 causal "
                          "heads 0..0 { window 1 sink 1 stride 3 offset 1 } heads 1..1 { window 2 stride 2 } "
                          "heads 2..2 { dense } heads 3..3 { sink 2 stride 4 offset 3 stride 5 } }")["p"],
    "residues": s2dsl.parse("pattern p { block = 16 heads = 2 kv_heads = 1 causal "
                            "heads 0..0 { window 1 stride 3 } heads 1..1 { window 1 stride 3 offset 1 } }")["p"],
    "no_window": s2dsl.parse("pattern p { block = 16 heads = 2 causal heads * { sink 1 stride 3 offset h } }")["p"],
    "mha_block32": s2dsl.local_stride(block=32, local_blocks=2, vert_stride=2, heads=2),
}
DEC_VARIANTS = {"flat": {"flat": True}, "pages2": {"flat": True, "pages_per_step": 2},
                "pages4": {"flat": True, "pages_per_step": 4}, "prefetch": {"flat": True, "prefetch": True},
                "prefetch2_dot": {"flat": True, "prefetch": True, "pages_per_step": 2, "force_dot": True},
                "dot": {"force_dot": True}, "early_v": {"early_v": True},
                "flat_early_v_dot": {"flat": True, "early_v": True, "force_dot": True},
                "fused": {"fused_combine": True}, "flat_early_v_fused": {"flat": True, "early_v": True, "fused_combine": True}}


def _decode_steps(pattern, tuning, steps, dtype=torch.float32, seed=0, lengths=(70, 45)):
    """Two sequences of different lengths: a prefill of each, then ``steps`` = [(new tokens, splits)]
    over the pages with ``tuning``, each output against the reference; freed pages poisoned."""
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.kv_cache import PagedKVCache
    cache = PagedKVCache(pattern, num_pages=96, head_dim=16, dtype=dtype)
    ids = [cache.add_sequence() for _ in lengths]
    g = torch.Generator().manual_seed(seed)
    total = max(lengths) + sum(n for n, _ in steps)
    data = [tuple(torch.randn(1, h, total, 16, generator=g).to(dtype)
                  for h in (pattern.heads, pattern.kv_heads, pattern.kv_heads)) for _ in ids]
    pos = list(lengths)
    for (q, k, v), s, n in zip(data, ids, lengths):
        cached_attention(cache, [s], q[:, :, :n], k[:, :, :n], v[:, :, :n])
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    for n, splits in steps:
        free = list(cache.free_pages)
        cache.k_pages[free] = float("nan")
        cache.v_pages[free] = float("nan")
        q, k, v = (torch.cat([d[t][:, :, p:p + n] for d, p in zip(data, pos)]) for t in range(3))
        out = cached_attention(cache, ids, q, k, v, tuning=tuning, n_splits=splits)
        assert torch.isfinite(out).all(), "the kernel read a page it should not have"
        for b, ((qs, ks, vs), p) in enumerate(zip(data, pos)):
            ref = s2dsl.reference_attention(qs[:, :, p:p + n], ks[:, :, :p + n], vs[:, :, :p + n], pattern)
            torch.testing.assert_close(out[b:b + 1].float(), ref, atol=tol, rtol=tol)
        pos = [p + n for p in pos]


#: every variant on some pattern, every pattern under some variant (the fast default)
DEC_FAST = [("gqa", "flat_early_v_fused"), ("hetero", "prefetch2_dot"), ("residues", "pages4"),
            ("no_window", "prefetch"), ("mha_block32", "pages2"), ("hetero", "flat"), ("residues", "fused"),
            ("mha_block32", "dot"), ("gqa", "early_v"), ("no_window", "flat_early_v_dot")]
DEC_ALL = [pytest.param(n, v, marks=[] if (n, v) in DEC_FAST else [pytest.mark.slow])
           for n in DEC_PATTERNS for v in DEC_VARIANTS]


@interpreter
@pytest.mark.parametrize("name,variant", DEC_ALL)
def test_decode_variants_match_reference(name, variant):
    """Single tokens and short chunks; 1, 3 and 16 splits (16 leaves splits without a block)."""
    _decode_steps(DEC_PATTERNS[name], DEC_VARIANTS[variant], [(1, 1), (1, 3), (3, 16), (1, 16)])


@interpreter
def test_decode_pages_float16():
    _decode_steps(DEC_PATTERNS["gqa"], {"flat": True, "pages_per_step": 2}, [(1, 2), (2, 5)], dtype=torch.float16)


@interpreter
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=patterns(causal=True), data=st.data())
def test_decode_variants_random_patterns(pattern, data):
    """Random (heterogeneous, extended, top-k) patterns: extended and top-k plans keep their own
    loops under ``flat``; the rest run the flat loop at any pages per step and split count."""
    tuning = {"flat": True, "pages_per_step": data.draw(st.sampled_from([1, 2, 4]), label="pages"),
              "prefetch": data.draw(st.booleans(), label="prefetch"), "force_dot": data.draw(st.booleans(), label="dot"),
              "early_v": data.draw(st.booleans(), label="early_v"),
              "fused_combine": data.draw(st.booleans(), label="fused_combine")}
    if tuning["prefetch"]:
        tuning["block_n"] = pattern.block  # whole pages
    steps = [(data.draw(st.sampled_from([1, 2, 5]), label="n"), data.draw(st.integers(1, 9), label="splits"))
             for _ in range(2)]
    _decode_steps(pattern, tuning, steps, seed=data.draw(st.integers(0, 99), label="seed"), lengths=(40, 23))


def test_decode_variant_refusals():
    from s2dsl.codegen.decode import DecodeSpecialization, generate_decode
    plan = lower(DEC_PATTERNS["gqa"])
    base = DecodeSpecialization(block_n=16)
    for spec, match in ((replace(base, pages_per_step=2), "flat"),
                        (replace(base, flat=True, pages_per_step=3), "power of two"),
                        (replace(base, flat=True, pages_per_step=2, kv_int8=True), "INT8"),
                        (replace(base, prefetch=True), "flat"),
                        (replace(base, flat=True, prefetch=True, kv_int8=True), "INT8"),
                        (replace(base, flat=True, prefetch=True, block_n=8), "whole pages")):
        with pytest.raises(ValueError, match=match):
            generate_decode(plan, spec)
    flat = generate_decode(plan, replace(base, flat=True))
    assert "# -- sinks [0, n_s) --" not in flat and "_visit_pages" not in flat
    assert "_visit_pages(" in generate_decode(plan, replace(base, flat=True, pages_per_step=4))
    assert "# -- sinks [0, n_s) --" in generate_decode(plan, base)
    early = generate_decode(plan, replace(base, early_v=True))
    visit = early[early.index("def _visit("):]
    assert visit.index("v = tl.load(v_ptrs") < visit.index("k = tl.load(k_ptrs")


def test_split_policies():
    """The split count: batch x kv heads x tiles programs against the SM count, a power of two,
    never more than the kept blocks allow; "fine" splits batch 1 further than "occupancy"."""
    from s2dsl.runtime.decode import MAX_SPLITS, SPLIT_POLICIES, _splits_for, kept_blocks_for_query
    for batch in (1, 2, 8):
        for blocks in (4, 64, 512, 2048):
            kept = kept_blocks_for_query(STRIDE32, 0, blocks * 64 - 1, blocks * 64 - 1)
            got = {p: _splits_for(STRIDE32, batch, 1, blocks, 1, 132, p) for p in SPLIT_POLICIES}
            for policy, n in got.items():
                target, min_blocks = SPLIT_POLICIES[policy]
                assert n & (n - 1) == 0 and 1 <= n <= MAX_SPLITS
                assert n < 2 * max(1, -(-kept // min_blocks))  # rounded up to a power of two at most
                assert n < 2 * max(1, -(-target * 132 // (batch * 32)))
            assert got["fine"] >= got["occupancy"]
    # batch 1 at 32K stride 32: 32 programs before splitting
    assert _splits_for(STRIDE32, 1, 1, 512, 1, 132, "occupancy") == 4
    assert _splits_for(STRIDE32, 1, 1, 512, 1, 132, "fine") == 16  # 32 kept blocks, two per split


GPU_DEC_VARIANTS = {"flat": {"flat": True}, "early_v": {"early_v": True},
                    "early_v_fused": {"early_v": True, "fused_combine": True}, "flat_pages2_w8": {"flat": True, "pages_per_step": 2, "num_warps": 8},
                    "prefetch": {"flat": True, "prefetch": True}, "prefetch_w8": {"flat": True, "prefetch": True,
                                                                                  "num_warps": 8},
                    "prefetch_dot": {"flat": True, "prefetch": True, "force_dot": True}, "dot": {"force_dot": True}}


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads", [8, 2])
@pytest.mark.parametrize("variant", GPU_DEC_VARIANTS)
def test_gpu_decode_variants(variant, kv_heads):
    """bf16 on the GPU, head dim 128, 64-token pages: two sequences of different lengths, single
    tokens and a 3-token step, automatic and forced splits (16: some without a block); outputs
    poisoned with NaN before each call and freed pages after it, against the float32 reference."""
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.kv_cache import PagedKVCache
    pattern = s2dsl.local_stride(block=64, local_blocks=4, vert_stride=8, heads=8, kv_heads=kv_heads)
    tuning = GPU_DEC_VARIANTS[variant]
    torch.manual_seed(kv_heads)
    lengths, steps = (3000, 1500), [(1, None), (1, 1), (3, 5), (1, 16), (1, None)]
    total = max(lengths) + sum(n for n, _ in steps)
    data = [tuple(torch.randn(1, h, total, 128, device="cuda", dtype=torch.bfloat16)
                  for h in (8, kv_heads, kv_heads)) for _ in lengths]
    cache = PagedKVCache(pattern, num_pages=2 * kv_heads * 40, head_dim=128, dtype=torch.bfloat16, device="cuda")
    ids = [cache.add_sequence() for _ in lengths]
    for (q, k, v), s, n in zip(data, ids, lengths):
        cached_attention(cache, [s], q[:, :, :n], k[:, :, :n], v[:, :, :n])
    pos = list(lengths)
    for n, splits in steps:
        free = list(cache.free_pages)
        cache.k_pages[free] = float("nan")
        cache.v_pages[free] = float("nan")
        q, k, v = (torch.cat([d[t][:, :, p:p + n] for d, p in zip(data, pos)]) for t in range(3))
        out = torch.full_like(q, float("nan"))
        cached_attention(cache, ids, q, k, v, tuning=tuning, n_splits=splits, out=out)
        for b, ((qs, ks, vs), p) in enumerate(zip(data, pos)):
            ref = s2dsl.reference_attention(*(t.float() for t in (qs[:, :, p:p + n], ks[:, :, :p + n],
                                                                   vs[:, :, :p + n])), pattern)
            err = ((out[b:b + 1].float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (variant, n, splits, err)
        pos = [p + n for p in pos]


@interpreter
@pytest.mark.parametrize("tuning", [{"early_v": True}, {"flat": True, "early_v": True}], ids=["early_v", "flat"])
def test_decode_variants_int8_pages(tuning):
    """INT8 pages (dequantised in the kernel) through the one-page-per-step variants, against the
    reference on the cache's dequantised K/V."""
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.kv_cache import PagedKVCache
    pattern = DEC_PATTERNS["gqa"]
    g = torch.Generator().manual_seed(3)
    cache = PagedKVCache(pattern, num_pages=64, head_dim=16, dtype=torch.float32, kv_dtype=torch.int8, lookahead=16)
    ids = [cache.add_sequence() for _ in range(2)]
    data = [[torch.randn(1, h, 60, 16, generator=g) for h in (4, 2, 2)] for _ in ids]
    for d, s in zip(data, ids):
        cached_attention(cache, [s], *(t[:, :, :50] for t in d))
    for pos, splits in ((50, 1), (51, 3)):
        q, k, v = (torch.cat([d[t][:, :, pos:pos + 1] for d in data]) for t in range(3))
        out = cached_attention(cache, ids, q, k, v, n_splits=splits, tuning=tuning)
        for b, s in enumerate(ids):
            kd, vd = cache.gather(s)
            ref = s2dsl.reference_attention(q[b:b + 1], kd[None].float(), vd[None].float(), pattern)
            torch.testing.assert_close(out[b:b + 1], ref, atol=2e-5, rtol=2e-5)
