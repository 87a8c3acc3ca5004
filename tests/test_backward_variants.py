"""The backward's opt-in variants (issue 14) against autograd through the dense reference:
Q/dO (dK/dV kernel) and K/V (dQ kernel) through tensor descriptors, and the dK/dV product
computed query-major. Runs under the Triton interpreter (fp32/fp16: its bf16 tl.dot is wrong);
the GPU sweep (benchmarks/sweep_kernels.py) checks bf16 before timing them."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import s2dsl
from s2dsl.codegen import lower
from s2dsl.codegen.backward import generate_backward
from s2dsl.runtime.attention import forward
from s2dsl.runtime.backward import backward, choose_backward_for_gpu
from s2dsl.runtime.topk import select_blocks

from kernel_strategies import patterns, random_inputs

interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-4, torch.float16: 1.5e-2}
VARIANTS = {
    "tma": {"dq_load": "tma", "dkdv_load": "tma"},
    "query_major": {"dkdv_query_major": True},
    "query_major_tma": {"dkdv_query_major": True, "dkdv_load": "tma", "dq_load": "tma"},
}


def _reference_grads(q, k, v, do, pattern, layout):
    """dq, dk, dv by autograd through the float64 reference, in ``layout``."""
    to_bhsd = (lambda t: t) if layout == "bhsd" else (lambda t: t.transpose(1, 2))
    qd, kd, vd = (to_bhsd(t).detach().to(torch.float64).requires_grad_() for t in (q, k, v))
    s2dsl.reference_attention(qd, kd, vd, pattern, dtype=torch.float64).backward(to_bhsd(do).to(torch.float64))
    return [to_bhsd(g) for g in (qd.grad, kd.grad, vd.grad)]


def _check(pattern, q, k, v, do, tuning, layout="bhsd", **packed):
    out, lse = forward(q, k, v, pattern, layout=layout, **packed)
    got = backward(q, k, v, out, lse, do, pattern, layout=layout, tuning=tuning, **packed)
    return got


def _assert_close(got, want, dtype):
    for name, g, r in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), f"{name}: NaN/inf"
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        torch.testing.assert_close(g.double(), r, atol=TOL[dtype] * scale, rtol=TOL[dtype],
                                   msg=lambda m: f"{name}: {m}")


@interpreter
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=patterns(), data=st.data())
def test_variants_match_reference(pattern, data):
    """Descriptor rows outside the sequence (before ``past``, from kv_len on) read as zeros and
    padded head dims too; query-major P/dS transpose into the same dK/dV; GQA sums per q head."""
    lk = data.draw(st.integers(1, 70), label="kv_len")
    lq = data.draw(st.integers(1, lk), label="q_len")
    d = data.draw(st.sampled_from([16, 24, 32]), label="head_dim")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype")
    layout = data.draw(st.sampled_from(["bhsd", "bshd"]), label="layout")
    tuning = dict(data.draw(st.sampled_from(list(VARIANTS.values())), label="variant"),
                  one_grid=data.draw(st.booleans(), label="one_grid"),
                  flat_steps=data.draw(st.booleans(), label="flat_steps"))
    q, k, v, do = random_inputs(1, pattern.heads, pattern.kv_heads, lq, lk, d, dtype, layout, seed=lq * 13 + lk,
                                grad_out=True)
    _assert_close(_check(pattern, q, k, v, do, tuning, layout), _reference_grads(q, k, v, do, pattern, layout), dtype)


@interpreter
@pytest.mark.parametrize("name", list(VARIANTS))
def test_gqa_partial_last_block_bit_for_bit(name):
    """GQA (two q heads per kv head with different patterns), a partial last block and queries
    after a past that is not block-aligned (descriptor rows before the first query): under the
    interpreter each variant gives the pointer kernels' gradients bit for bit, and the reference's."""
    pattern = s2dsl.parse("""pattern p { block = 16 heads = 4 kv_heads = 2
        heads 0..1 { window 2 stride 3 offset h sink 1 } heads 2..3 { window 1 stride 2 offset h } }""")["p"]
    q, k, v, do = random_inputs(1, 4, 2, 37, 58, 16, torch.float32, seed=5, grad_out=True)
    tiles = {"block_m": 16, "block_n": 16, "dkdv_block_n": 16, "dkdv_block_m": 16}
    want = _check(pattern, q, k, v, do, tiles)
    got = _check(pattern, q, k, v, do, dict(tiles, **VARIANTS[name]))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    _assert_close(got, _reference_grads(q, k, v, do, pattern, "bhsd"), torch.float32)


ROUND2 = {
    "token window and sink": "heads * { window 20 tokens sink 4 tokens stride 3 offset h }",
    "two-sided window, relative stride": "bidirectional heads * { window 2 ahead 1 stride 3 relative }",
    "dynamic top-k": "heads * { window 1 topk 2 }",
}


@interpreter
@pytest.mark.parametrize("body", ROUND2.values(), ids=list(ROUND2))
def test_round2_constructs_bit_for_bit(body):
    """The per-pair masks (query-major: transposed) and the top-k loop through the same loads."""
    pattern = s2dsl.parse(f"pattern p {{ block = 16 heads = 2 {body} }}")["p"]
    q, k, v, do = random_inputs(1, 2, 2, 16 * 4 + 5, 16 * 4 + 5, 16, torch.float32, seed=7, grad_out=True)
    tiles = {"block_m": 16, "block_n": 16, "dkdv_block_n": 16, "dkdv_block_m": 16}
    extra = {} if pattern.is_static else {"selection": select_blocks(q, k, pattern)}
    out, lse = forward(q, k, v, pattern, **extra)
    want = backward(q, k, v, out, lse, do, pattern, tuning=tiles, **extra)
    got = backward(q, k, v, out, lse, do, pattern, tuning=dict(tiles, **VARIANTS["query_major_tma"]), **extra)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@interpreter
def test_packed_sequences_descriptors_end_at_each_sequence():
    """Packed (varlen) sequences: each descriptor covers its own sequence's rows only."""
    pattern = s2dsl.parse("pattern p { block = 16 heads = 2 kv_heads = 1 heads * { window 2 stride 3 sink 1 } }")["p"]
    lens = [37, 16, 30]
    cu = torch.tensor([0, 37, 53, 83], dtype=torch.int32)
    torch.manual_seed(1)
    q, do = (torch.randn(sum(lens), 2, 16) for _ in range(2))
    k, v = (torch.randn(sum(lens), 1, 16) for _ in range(2))
    packed = dict(cu_seqlens_q=cu, cu_seqlens_k=cu)
    got = _check(pattern, q, k, v, do, VARIANTS["query_major_tma"], **packed)
    for s, n in enumerate(lens):
        a = int(cu[s])
        part = [t[a:a + n].transpose(0, 1)[None] for t in (q, k, v, do)]
        want = _reference_grads(*part, pattern, "bhsd")
        _assert_close([g[a:a + n].transpose(0, 1)[None] for g in got], want, torch.float32)


def test_default_source_unchanged_and_bad_values_refused():
    """The variants are opt-in: the GPU default's source has no descriptors and its header no new
    fields (the measured default stays byte for byte); unknown load kinds are refused."""
    pattern = s2dsl.local_stride(block=64, local_blocks=16, vert_stride=8, heads=4)
    spec = replace(choose_backward_for_gpu(pattern, 128), dtype="bfloat16", layout="bhsd")
    default = generate_backward(lower(pattern), spec)
    assert "make_tensor_descriptor" not in default and "set_allocator" not in default
    assert "dq_load" not in default and "dkdv_query_major" not in default
    assert "qkt = tl.dot(k, qt)" in default
    tma = generate_backward(lower(pattern), replace(spec, dkdv_load="tma", dkdv_query_major=True))
    assert tma.count("make_tensor_descriptor") == 2 and "qk = tl.dot(q, tl.trans(k))" in tma
    assert "dkdv_load='tma'" in tma and "dkdv_query_major=True" in tma
    with pytest.raises(ValueError, match="dq_load"):
        generate_backward(lower(pattern), replace(spec, dq_load="tensor"))
