"""The generated forward kernel against the dense reference, under the Triton interpreter.

bf16 is left to the GPU tests: the interpreter's tl.dot on bfloat16 is wrong.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import s2dsl
from s2dsl.runtime.attention import InputError, forward

from kernel_strategies import patterns, random_inputs

# CPU tests of the kernels under the Triton interpreter; tests/test_gpu.py covers the GPU
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
DEVICE = "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def _inputs(b, heads, kv_heads, lq, lk, d, dtype, layout="bhsd", seed=0):
    return random_inputs(b, heads, kv_heads, lq, lk, d, dtype, layout, seed)


def _compare(out, lse, q, k, v, pattern, layout="bhsd"):
    to_bhsd = (lambda t: t) if layout == "bhsd" else (lambda t: t.transpose(1, 2))
    ref, ref_lse = s2dsl.reference_attention(to_bhsd(q), to_bhsd(k), to_bhsd(v), pattern, return_lse=True)
    out = to_bhsd(out).float()
    assert torch.isfinite(out).all(), "kernel produced NaN/inf"
    torch.testing.assert_close(out, ref, atol=TOL[q.dtype], rtol=TOL[q.dtype])
    lse_ref = ref_lse if layout == "bhsd" else ref_lse
    torch.testing.assert_close(lse, lse_ref, atol=1e-3, rtol=1e-4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=patterns(), data=st.data())
def test_matches_reference(pattern, data):
    lk = data.draw(st.integers(1, 90), label="kv_len")
    lq = data.draw(st.integers(1, lk), label="q_len")
    d = data.draw(st.sampled_from([16, 24, 32]), label="head_dim")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype")
    layout = data.draw(st.sampled_from(["bhsd", "bshd"]), label="layout")
    tuning = {"block_m": data.draw(st.sampled_from([16, 32]), label="block_m"), "block_n": 16,
              "window_span": data.draw(st.sampled_from([1, 2, 4]), label="window_span"),
              "residue_span": data.draw(st.sampled_from([1, 2]), label="residue_span"),
              "order": data.draw(st.sampled_from(["longest_first", "naive", "tile_major"]), label="order")}
    q, k, v = _inputs(2, pattern.heads, pattern.kv_heads, lq, lk, d, dtype, layout, seed=lq * 131 + lk)
    out, lse = forward(q, k, v, pattern, layout=layout, tuning=tuning)
    _compare(out, lse, q, k, v, pattern, layout)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (64, 32), (16, 32)])
def test_tile_shapes_against_block(block_m, block_n):
    """Tiles smaller than, equal to and larger than the pattern block all agree."""
    pattern = s2dsl.parse("pattern p { block = 32 heads = 3 kv_heads = 1 "
                          "heads 0..1 { window 2 stride 3 offset h sink 1 } heads 2..2 { dense } }")["p"]
    q, k, v = _inputs(1, 3, 1, 150, 200, 32, torch.float32)
    out, lse = forward(q, k, v, pattern, tuning={"block_m": block_m, "block_n": block_n})
    _compare(out, lse, q, k, v, pattern)


def test_variable_length_packed_sequences():
    pattern = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=3, heads=4, kv_heads=2)
    lens_q, lens_k = [17, 64, 1, 40], [17, 90, 33, 40]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lens_q), 4, 32, generator=g).to(DEVICE)
    k = torch.randn(sum(lens_k), 2, 32, generator=g).to(DEVICE)
    v = torch.randn(sum(lens_k), 2, 32, generator=g).to(DEVICE)
    out, lse = forward(q, k, v, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    for s in range(len(lens_q)):
        qs = q[cu_q[s]:cu_q[s + 1]].transpose(0, 1)[None]
        ks = k[cu_k[s]:cu_k[s + 1]].transpose(0, 1)[None]
        vs = v[cu_k[s]:cu_k[s + 1]].transpose(0, 1)[None]
        ref, ref_lse = s2dsl.reference_attention(qs, ks, vs, pattern, return_lse=True)
        torch.testing.assert_close(out[cu_q[s]:cu_q[s + 1]].transpose(0, 1)[None], ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[:, cu_q[s]:cu_q[s + 1]][None], ref_lse, atol=1e-4, rtol=1e-4)


def test_every_output_element_is_written():
    """Unwritten elements would keep the poison: run twice into different garbage."""
    pattern = s2dsl.local_stride(block=16, local_blocks=1, vert_stride=4, heads=2)
    q, k, v = _inputs(1, 2, 2, 70, 70, 16, torch.float32)
    first, _ = forward(q, k, v, pattern)
    torch.empty(1 << 16).fill_(float("nan"))  # poison the allocator's free blocks
    second, _ = forward(q, k, v, pattern)
    assert torch.isfinite(first).all() and torch.equal(first, second)


def test_empty_rows_give_zero_not_nan():
    # stride 4 offset 1 keeps blocks 3, 7, ...: query blocks 0..2 keep nothing
    pattern = s2dsl.parse("pattern p { block = 16 heads = 1 heads 0..0 { stride 4 offset 1 } }")["p"]
    q, k, v = _inputs(1, 1, 1, 80, 80, 16, torch.float32)
    out, lse = forward(q, k, v, pattern)
    assert torch.all(out[:, :, :48] == 0) and torch.all(lse[:, :, :48] == float("-inf"))
    _compare(out, lse, q, k, v, pattern)


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q[:, :3], k, v), "heads"),
    (lambda q, k, v: (q, k[:, :1], v[:, :1]), "kv_heads"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "dtype"),
    (lambda q, k, v: (q, k.half(), v), "share one dtype"),
    (lambda q, k, v: (q[0], k[0], v[0]), "4-D"),
    (lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8]), "head dim"),
    (lambda q, k, v: (q, k[:, :, :10], v[:, :, :10]), "last positions"),
])
def test_bad_input_is_refused_up_front(bad, match):
    pattern = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=4, heads=4, kv_heads=2)
    q, k, v = _inputs(1, 4, 2, 20, 20, 16, torch.float32)
    with pytest.raises((InputError, TypeError), match=match):
        forward(*bad(q, k, v), pattern)


@pytest.mark.parametrize("window_span", [1, 2, 4])
def test_residue_pairs_with_any_window_span(window_span):
    """Regression: a residue pair's tile width must not follow a wider window step."""
    pattern = s2dsl.parse("pattern p { block = 16 heads = 1 bidirectional heads 0..0 { stride 2 } }")["p"]
    for lq, lk in [(1, 49), (49, 49)]:
        q, k, v = _inputs(1, 1, 1, lq, lk, 16, torch.float32, seed=lk)
        out, lse = forward(q, k, v, pattern, tuning={"block_m": 16, "block_n": 16, "window_span": window_span,
                                                     "residue_span": 2})
        _compare(out, lse, q, k, v, pattern)
