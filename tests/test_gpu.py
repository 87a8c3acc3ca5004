"""GPU checks at realistic shapes: bf16/fp16 against the float32 reference, outputs poisoned
before each call so an unwritten element shows up as NaN. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

import s2dsl
from s2dsl.runtime.attention import forward

pytestmark = pytest.mark.gpu

PHI3 = s2dsl.local_stride(block=64, local_blocks=16, vert_stride=8, heads=32, kv_heads=8)
STRIDE32 = s2dsl.local_stride(block=64, local_blocks=16, vert_stride=32, heads=32)
HETERO = s2dsl.parse("""
pattern hetero {
    block = 64  heads = 16  kv_heads = 4
    heads 0..3 { dense }
    heads 4..11 { window 8  stride 4 offset h  sink 1 }
    heads 12..15 { window 2  shard h % 3 of 3  stride 5 offset 1 }
}""")["hetero"]
BIDIR = s2dsl.parse("""
pattern bidir {
    block = 32  heads = 8  bidirectional
    heads 0..7 { window 4  stride 8 offset h  sink 2 }
}""")["bidir"]
# the patterns and head dims every GPU kernel check runs (forward here, backward in test_gpu_backward)
REALISTIC = [PHI3, STRIDE32, HETERO, BIDIR]
HEAD_DIMS = [64, 96, 128, 256, 40]


def _rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def _run(pattern, b, lq, lk, d, dtype, layout="bhsd"):
    torch.manual_seed(lq + lk + d)
    if layout == "bhsd":
        q = torch.randn(b, pattern.heads, lq, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(b, pattern.kv_heads, lk, d, device="cuda", dtype=dtype) for _ in range(2))
    else:
        q = torch.randn(b, lq, pattern.heads, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(b, lk, pattern.kv_heads, d, device="cuda", dtype=dtype) for _ in range(2))
    out = torch.full_like(q, float("nan"))
    out, lse = forward(q, k, v, pattern, layout=layout, out=out)
    t = (lambda x: x) if layout == "bhsd" else (lambda x: x.transpose(1, 2))
    ref, ref_lse = s2dsl.reference_attention(t(q), t(k), t(v), pattern, return_lse=True)
    assert torch.isfinite(out).all(), "unwritten or NaN output"
    assert _rel_err(t(out), ref) < 1e-2
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", REALISTIC, ids=lambda p: p.name)
def test_realistic_shapes(pattern, dtype):
    _run(pattern, 2, 3000, 3000, 128, dtype)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims(d):
    _run(HETERO, 1, 1500, 1500, d, torch.bfloat16)


@pytest.mark.parametrize("lq,lk", [(1, 4097), (333, 2000), (64, 64), (2049, 2049)])
def test_queries_shorter_than_keys_and_odd_lengths(lq, lk):
    _run(PHI3, 1, lq, lk, 128, torch.bfloat16)


def test_bshd_layout():
    _run(PHI3, 2, 1111, 1111, 64, torch.bfloat16, layout="bshd")


def test_packed_variable_length():
    lens = [1000, 17, 2500, 640]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens), PHI3.heads, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lens), PHI3.kv_heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = torch.full_like(q, float("nan"))
    out, _ = forward(q, k, v, PHI3, cu_seqlens_q=cu, cu_seqlens_k=cu, out=out)
    for s in range(len(lens)):
        sl = slice(int(cu[s]), int(cu[s + 1]))
        ref = s2dsl.reference_attention(*(t[sl].transpose(0, 1)[None] for t in (q, k, v)), PHI3)
        assert _rel_err(out[sl].transpose(0, 1)[None], ref) < 1e-2


def test_compiled_model_matches_eager():
    q = torch.randn(1, 32, 2048, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    f = torch.compile(lambda q, k, v: s2dsl.attention(q, k, v, PHI3) * 2, fullgraph=True)
    torch.testing.assert_close(f(q, k, v), s2dsl.attention(q, k, v, PHI3) * 2)


# round-2 constructs the forward runs: two-sided windows and relative strides (bidirectional
# DKernel family, causal relative strides), bf16 at realistic shapes
DKERNEL_BIDIR = s2dsl.local_stride(block=64, local_blocks=(16, 8), vert_stride=8, heads=16, kv_heads=4,
                                   num_dense_heads=1, causal=False, name="dkernel_bidir")
CAUSAL_REL = s2dsl.local_stride(block=64, local_blocks=16, vert_stride=8, heads=16, vert_position_type="relative",
                                name="causal_rel")


MISTRAL_SWA = s2dsl.parse("""
pattern mistral_swa {
    block = 64  heads = 16  kv_heads = 4  causal
    heads 0..13 { window 1000 tokens }
    heads 14..15 { window 2  sink 1  stride 8 offset h }
}""")["mistral_swa"]


STREAMING = s2dsl.parse("""
pattern streaming {
    block = 64  heads = 16  kv_heads = 4  causal
    heads 0..11 { sink 4 tokens  window 1020 tokens }
    heads 12..15 { dense }
}""")["streaming"]


@pytest.mark.parametrize("pattern", [DKERNEL_BIDIR, CAUSAL_REL, MISTRAL_SWA, STREAMING], ids=lambda p: p.name)
@pytest.mark.parametrize("d", [64, 128])
def test_two_sided_and_relative_forward(pattern, d):
    _run(pattern, 2, 3000, 3000, d, torch.bfloat16)
    if pattern.causal:
        _run(pattern, 1, 700, 3100, d, torch.bfloat16)  # chunked prefill: queries after a past
