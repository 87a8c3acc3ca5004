"""GPU checks of the generated backward at realistic shapes: bf16/fp16 gradients against
autograd through the float32 reference (TF32 off), gradients poisoned before each call so
an unwritten element shows up as NaN, two runs bit-identical. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

import s2dsl
from s2dsl.runtime.attention import forward
from s2dsl.runtime.backward import backward

from test_gpu import HEAD_DIMS, HETERO, PHI3, REALISTIC

pytestmark = pytest.mark.gpu


def _reference_grads(q, k, v, do, pattern, **kw):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        s2dsl.reference_attention(qf, kf, vf, pattern, dtype=torch.float32, **kw).backward(do.float())
        return qf.grad, kf.grad, vf.grad
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _rel(a, b):
    return ((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(pattern, b, lq, lk, d, dtype, layout="bhsd", tuning=None):
    torch.manual_seed(lq * 7 + lk + d)
    shape = (lambda h, n: (b, h, n, d)) if layout == "bhsd" else (lambda h, n: (b, n, h, d))
    q, do = (torch.randn(shape(pattern.heads, lq), device="cuda", dtype=dtype) for _ in range(2))
    k, v = (torch.randn(shape(pattern.kv_heads, lk), device="cuda", dtype=dtype) for _ in range(2))
    out, lse = forward(q, k, v, pattern, layout=layout)
    torch.empty(1 << 28, device="cuda").fill_(float("nan"))  # poison the allocator's free blocks
    got = backward(q, k, v, out, lse, do, pattern, layout=layout, tuning=tuning)
    again = backward(q, k, v, out, lse, do, pattern, layout=layout, tuning=tuning)
    t = (lambda x: x) if layout == "bhsd" else (lambda x: x.transpose(1, 2))
    want = _reference_grads(t(q), t(k), t(v), t(do), pattern)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for name, g, w, g2 in zip(("dq", "dk", "dv"), got, want, again):
        assert torch.isfinite(g).all(), f"{name}: unwritten or NaN"
        assert torch.equal(g, g2), f"{name}: two runs differ"
        assert _rel(t(g), w) < tol, (name, _rel(t(g), w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", REALISTIC, ids=lambda p: p.name)
def test_realistic_shapes(pattern, dtype):
    _check(pattern, 1, 2048, 2048, 128, dtype)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims(d):
    _check(HETERO, 1, 1100, 1100, d, torch.bfloat16)


@pytest.mark.parametrize("lq,lk", [(1, 3001), (333, 2000), (2049, 2049)])
def test_queries_shorter_than_keys_and_odd_lengths(lq, lk):
    _check(PHI3, 1, lq, lk, 128, torch.bfloat16)


def test_bshd_layout():
    _check(PHI3, 2, 1111, 1111, 64, torch.bfloat16, layout="bshd")


@pytest.mark.parametrize("tuning", [
    {"one_grid": True}, {"two_streams": True}, {"flat_steps": True, "num_stages": 2, "dkdv_num_stages": 2},
    {"block_m": 128, "num_warps": 8, "two_streams": True},
], ids=str)
def test_launch_variants(tuning):
    _check(PHI3, 1, 2048, 2048, 128, torch.bfloat16, tuning=tuning)


# issue 14's opt-in variants (benchmarks/sweep_kernels.py BWD_DEFAULT times them): descriptor
# rows before the first query (lq < lk, past not block-aligned) and past the last must read as zeros
BWD_VARIANTS = [
    {"dq_load": "tma", "dkdv_load": "tma"},
    {"dkdv_query_major": True, "dq_load": "tma", "dkdv_load": "tma"},
    {"dkdv_query_major": True},
    {"dkdv_block_m": 32, "dq_load": "tma", "dkdv_load": "tma"},
    {"one_grid": False, "two_streams": True, "dq_load": "tma", "dkdv_load": "tma", "block_n": 32, "num_stages": 1},
]


@pytest.mark.parametrize("tuning", BWD_VARIANTS, ids=str)
@pytest.mark.parametrize("lq,lk", [(2085, 2085), (333, 2000)])
def test_issue14_variants(tuning, lq, lk):
    _check(PHI3, 1, lq, lk, 128, torch.bfloat16, tuning=tuning)


def test_packed_variable_length():
    lens = [1000, 17, 1500, 640]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    torch.manual_seed(0)
    q, do = (torch.randn(sum(lens), PHI3.heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(sum(lens), PHI3.kv_heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, lse = forward(q, k, v, PHI3, cu_seqlens_q=cu, cu_seqlens_k=cu)
    grads = backward(q, k, v, out, lse, do, PHI3, cu_seqlens_q=cu, cu_seqlens_k=cu)
    for s in range(len(lens)):
        sl = slice(int(cu[s]), int(cu[s + 1]))
        bh = lambda x: x[sl].transpose(0, 1)[None]
        want = _reference_grads(bh(q), bh(k), bh(v), bh(do), PHI3)
        for g, w in zip(grads, want):
            assert _rel(bh(g), w) < 2e-2


def test_compiled_training_step_matches_eager():
    """torch.compile over s2dsl.attention: the custom op's registered autograd gives the
    eager gradients."""
    torch.manual_seed(1)
    q = torch.randn(1, 32, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 8, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    do = torch.randn_like(q)

    def step(q, k, v):
        return (s2dsl.attention(q, k, v, PHI3) * do).sum()

    eager = torch.autograd.grad(step(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(step, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
