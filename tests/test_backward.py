"""The generated backward kernels against autograd through the dense reference (float64).

Runs under the Triton interpreter (TRITON_INTERPRET=1). bf16 is left to the
GPU check (benchmarks/gpu_check_backward.py): the interpreter's tl.dot on bfloat16 is wrong.
"""
from __future__ import annotations

import os

import pytest
import torch

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import s2dsl
from s2dsl.runtime.attention import InputError, forward
from s2dsl.runtime.backward import backward, backward_source, choose_backward

from kernel_strategies import patterns, random_inputs

# CPU tests under the Triton interpreter; tests/test_gpu_backward.py checks bf16/fp16 on the GPU
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
DEVICE = "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1.5e-2}


def _inputs(b, heads, kv_heads, lq, lk, d, dtype, layout="bhsd", seed=0):
    return random_inputs(b, heads, kv_heads, lq, lk, d, dtype, layout, seed, grad_out=True)


def _reference_grads(q, k, v, do, pattern, scale=None):
    """dq, dk, dv by autograd through the float64 reference; bhsd tensors."""
    qd, kd, vd = (t.detach().to(torch.float64).requires_grad_() for t in (q, k, v))
    out = s2dsl.reference_attention(qd, kd, vd, pattern, scale=scale, dtype=torch.float64)
    out.backward(do.to(torch.float64))
    return qd.grad, kd.grad, vd.grad


def _assert_grads(got, want, dtype):
    tol = TOL[dtype]
    for name, g, r in zip(("dq", "dk", "dv"), got, want):
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{name}: NaN/inf"
        # scaled to the gradient's size: fp16 rounds P and dS to 11 bits
        scale = max([1.0, *([r.abs().max().item()] if r.numel() else [])])
        torch.testing.assert_close(g.double().cpu(), r.cpu(), atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}")


def _run_and_compare(pattern, q, k, v, do, layout="bhsd", tuning=None, scale=None):
    out, lse = forward(q, k, v, pattern, layout=layout, scale=scale)
    grads = backward(q, k, v, out, lse, do, pattern, layout=layout, scale=scale, tuning=tuning)
    for t, g in zip((q, k, v), grads):
        assert g.dtype == t.dtype and g.shape == t.shape
    to_bhsd = (lambda t: t) if layout == "bhsd" else (lambda t: t.transpose(1, 2))
    want = _reference_grads(*(to_bhsd(t) for t in (q, k, v, do)), pattern, scale=scale)
    _assert_grads([to_bhsd(g) for g in grads], want, q.dtype)
    return grads


@settings(max_examples=22, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=patterns(), data=st.data())
def test_matches_autograd_reference(pattern, data):
    lk = data.draw(st.integers(1, 80), label="kv_len")
    lq = data.draw(st.integers(1, lk), label="q_len")
    d = data.draw(st.sampled_from([16, 24, 32]), label="head_dim")
    layout = data.draw(st.sampled_from(["bhsd", "bshd"]), label="layout")
    batch = data.draw(st.integers(1, 2), label="batch")
    tuning = {"block_m": data.draw(st.sampled_from([16, 32, 64]), label="dq_block_m"),
              "order": data.draw(st.sampled_from(["longest_first", "tile_major"]), label="order"),
              "one_grid": data.draw(st.booleans(), label="one_grid"),
              "flat_steps": data.draw(st.booleans(), label="flat_steps")}
    q, k, v, do = _inputs(batch, pattern.heads, pattern.kv_heads, lq, lk, d, torch.float32, layout, seed=lq * 131 + lk)
    _run_and_compare(pattern, q, k, v, do, layout, tuning)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=patterns(), data=st.data())
def test_float16_matches_reference(pattern, data):
    lk = data.draw(st.integers(1, 70), label="kv_len")
    lq = data.draw(st.integers(1, lk), label="q_len")
    d = data.draw(st.sampled_from([16, 24, 32]), label="head_dim")
    q, k, v, do = _inputs(1, pattern.heads, pattern.kv_heads, lq, lk, d, torch.float16, seed=lk * 7 + lq)
    _run_and_compare(pattern, q, k, v, do)


@pytest.mark.parametrize("unroll", [False, True])
def test_gqa_heads_of_one_group_with_different_patterns(unroll):
    """One kv head, four q heads that each keep a different set: dK/dV sums four ranges."""
    pattern = s2dsl.parse("""pattern p { block = 16 heads = 4 kv_heads = 1
        heads 0..0 { window 1 }
        heads 1..1 { window 2 sink 1 }
        heads 2..2 { stride 3 offset h }
        heads 3..3 { dense } }""")["p"]
    q, k, v, do = _inputs(2, 4, 1, 75, 75, 24, torch.float32, seed=1)
    _run_and_compare(pattern, q, k, v, do, tuning={"dkdv_unroll_group": unroll})


def test_gqa_two_groups_bidirectional_bshd():
    pattern = s2dsl.parse("""pattern p { block = 16 heads = 4 kv_heads = 2 bidirectional
        heads 0..1 { window 2 stride 4 offset h + 1 }
        heads 2..3 { sink 1 stride 3 offset h stride 5 offset 2 } }""")["p"]
    q, k, v, do = _inputs(1, 4, 2, 50, 70, 32, torch.float32, layout="bshd", seed=2)
    _run_and_compare(pattern, q, k, v, do, layout="bshd")


@pytest.mark.parametrize("tuning", [
    {"block_m": 16, "block_n": 16, "dkdv_block_n": 16, "dkdv_block_m": 16},
    {"block_m": 64, "block_n": 32, "dkdv_block_n": 32, "dkdv_block_m": 16},
    {"block_m": 128, "block_n": 16, "dkdv_block_n": 16, "dkdv_block_m": 32},
    {"block_m": 32, "block_n": 32, "dkdv_block_n": 32, "dkdv_block_m": 32},
    # dK/dV and dQ programs in one grid; dK/dV looping over query steps rather than blocks
    {"block_m": 64, "block_n": 32, "dkdv_block_n": 16, "dkdv_block_m": 16, "one_grid": True},
    {"block_m": 32, "block_n": 16, "dkdv_block_n": 32, "dkdv_block_m": 16, "flat_steps": True},
    {"block_m": 16, "block_n": 16, "dkdv_block_n": 16, "dkdv_block_m": 16, "flat_steps": True, "one_grid": True},
])
def test_tile_shapes_against_block(tuning):
    """Tiles smaller than, equal to and larger than the pattern block (32), and both launch
    and loop shapes, all agree with the reference."""
    pattern = s2dsl.parse("pattern p { block = 32 heads = 3 kv_heads = 1 "
                          "heads 0..1 { window 2 stride 3 offset h sink 1 } heads 2..2 { dense } }")["p"]
    q, k, v, do = _inputs(1, 3, 1, 100, 150, 32, torch.float32, seed=3)
    _run_and_compare(pattern, q, k, v, do, tuning=tuning)


@pytest.mark.parametrize("lq,lk", [(1, 77), (5, 40), (33, 70), (16, 64)])
def test_queries_shorter_than_keys(lq, lk):
    """Chunked prefill / decode: the queries are the last lq of lk positions."""
    pattern = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=3, heads=2, kv_heads=1)
    q, k, v, do = _inputs(2, 2, 1, lq, lk, 16, torch.float32, seed=lq + lk)
    _run_and_compare(pattern, q, k, v, do)


def test_empty_rows_give_zero_gradient_not_nan():
    # stride 4 offset 1 keeps blocks 3, 7, ...: query blocks 0..2 keep nothing
    pattern = s2dsl.parse("pattern p { block = 16 heads = 2 kv_heads = 1 "
                          "heads 0..0 { stride 4 offset 1 } heads 1..1 { window 1 } }")["p"]
    q, k, v, do = _inputs(1, 2, 1, 80, 80, 16, torch.float32, seed=4)
    dq, dk, dv = _run_and_compare(pattern, q, k, v, do)
    assert torch.all(dq[:, 0, :48] == 0)


def test_explicit_scale():
    pattern = s2dsl.local_stride(block=16, local_blocks=1, vert_stride=2, heads=2)
    q, k, v, do = _inputs(1, 2, 2, 40, 40, 24, torch.float32, seed=5)
    _run_and_compare(pattern, q, k, v, do, scale=0.3)


def test_variable_length_packed_sequences():
    pattern = s2dsl.parse("""pattern p { block = 16 heads = 4 kv_heads = 2
        heads 0..1 { window 2 stride 3 offset h }
        heads 2..3 { window 1 sink 1 } }""")["p"]
    lens_q, lens_k = [17, 50, 1, 0, 40], [17, 70, 33, 5, 40]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(sum(lens_q), 4, 24, generator=g).to(DEVICE)
    k = torch.randn(sum(lens_k), 2, 24, generator=g).to(DEVICE)
    v = torch.randn(sum(lens_k), 2, 24, generator=g).to(DEVICE)
    do = torch.randn(sum(lens_q), 4, 24, generator=g).to(DEVICE)
    out, lse = forward(q, k, v, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    dq, dk, dv = backward(q, k, v, out, lse, do, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for s in range(len(lens_q)):
        sq, sk = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        bh = lambda t: t.transpose(0, 1)[None]  # (n, h, d) -> (1, h, n, d)
        want = _reference_grads(bh(q[sq]), bh(k[sk]), bh(v[sk]), bh(do[sq]), pattern)
        _assert_grads([bh(dq[sq]), bh(dk[sk]), bh(dv[sk])], want, torch.float32)


def test_deterministic_and_every_element_written():
    """No atomics: two runs agree bit for bit, whatever garbage the outputs start from."""
    pattern = s2dsl.local_stride(block=16, local_blocks=1, vert_stride=4, heads=4, kv_heads=2)
    q, k, v, do = _inputs(1, 4, 2, 70, 70, 16, torch.float32, seed=7)
    out, lse = forward(q, k, v, pattern)
    first = backward(q, k, v, out, lse, do, pattern)
    torch.empty(1 << 16).fill_(float("nan"))  # poison the allocator's free blocks
    second = backward(q, k, v, out, lse, do, pattern)
    for a, b in zip(first, second):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_autograd_through_attention():
    """s2dsl.attention's custom op reaches this backward."""
    pattern = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=3, heads=2, kv_heads=1)
    q, k, v, do = _inputs(1, 2, 1, 40, 48, 16, torch.float32, seed=8)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    s2dsl.attention(q, k, v, pattern).backward(do)
    _assert_grads([q.grad, k.grad, v.grad], _reference_grads(q, k, v, do, pattern), torch.float32)


def test_source_is_specialised_and_small():
    """The source holds literal per-pattern numbers, no loop for absent components, and
    no table that grows with the sequence length (only the per-head table)."""
    uniform = s2dsl.parse("pattern p { block = 64 heads = 8 heads 0..7 { window 16 } }")["p"]
    src = backward_source(uniform)
    compile(src, "<generated>", "exec")
    assert "window = 16" in src and "sink = 0" in src
    assert "range(first," not in src and "HeadTable + h" not in src  # no residue loops, no table loads
    mixed = s2dsl.local_stride(block=64, local_blocks=16, vert_stride=8, heads=32, kv_heads=8)
    src = backward_source(mixed)
    compile(src, "<generated>", "exec")
    assert "HeadTable" in src and "for j in range(first, lo, period)" in src


def test_choose_backward_tiles_divide_the_block():
    pattern = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=3, heads=2)
    spec = choose_backward(pattern, torch.float32, 16, "bhsd", torch.device("cpu"))
    assert 16 % spec.block_n == 0 and 16 % spec.dkdv_block_n == 0 and 16 % spec.dkdv_block_m == 0
    spec = choose_backward(pattern, torch.float32, 16, "bhsd", torch.device("cpu"), tuning={"dkdv_block_m": 16})
    assert spec.dkdv_block_m == 16


def test_bad_tiles_are_refused():
    pattern = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=3, heads=2)
    q, k, v, do = _inputs(1, 2, 2, 20, 20, 16, torch.float32)
    out, lse = forward(q, k, v, pattern)
    with pytest.raises(ValueError, match="divid"):
        backward(q, k, v, out, lse, do, pattern, tuning={"dkdv_block_n": 32})


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v, o, l, d: (q, k, v, o, l, d[:, :, :5]), "dout"),
    (lambda q, k, v, o, l, d: (q, k, v, o[:, :1], l, d), "out"),
    (lambda q, k, v, o, l, d: (q, k, v, o, l[:, :, :5], d), "lse"),
    (lambda q, k, v, o, l, d: (q, k[:, :, :10], v[:, :, :10], o, l, d), "last positions"),
])
def test_bad_input_is_refused_up_front(bad, match):
    pattern = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=4, heads=4, kv_heads=2)
    q, k, v, do = _inputs(1, 4, 2, 20, 20, 16, torch.float32)
    out, lse = forward(q, k, v, pattern)
    with pytest.raises((InputError, TypeError), match=match):
        backward(*bad(q, k, v, out, lse, do), pattern)
