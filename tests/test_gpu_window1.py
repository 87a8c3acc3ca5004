"""Window 1 on the GPU (issue 16 item 9): ptxas crashed (error code -11) compiling the forward
of ``local_stride(local_blocks=1)`` at block 64 / stride 8 and block 16 / stride 4 (8 heads,
bf16, head dim 128, 8K tokens). Forward, backward and decode, bf16, against the float32
reference, outputs poisoned with NaN first. A compile failure is reported with the
specialisation, the generated source's path and which simpler launch shapes do compile.
Skipped without CUDA."""
from __future__ import annotations

import os
import traceback

import pytest
import torch

import s2dsl
from s2dsl.runtime.attention import forward
from s2dsl.runtime.backward import backward, choose_backward
from s2dsl.runtime.kernels import choose_forward

pytestmark = pytest.mark.gpu

N, D, HEADS = 8192, 128, 8
WINDOW1 = {
    "block64-stride8": s2dsl.local_stride(block=64, local_blocks=1, vert_stride=8, heads=HEADS),
    "block16-stride4": s2dsl.local_stride(block=16, local_blocks=1, vert_stride=4, heads=HEADS),
    "block64-stride8-gqa": s2dsl.local_stride(block=64, local_blocks=1, vert_stride=8, heads=HEADS, kv_heads=2),
}


def _skip_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("runs the compiled kernels")


def _rel(a, b):
    return ((a.float() - b).norm() / b.norm()).item()


def _inputs(pattern, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, pattern.heads, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, pattern.kv_heads, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    return q, k, v


def _diagnose(pattern, kind, exc) -> str:
    """What failed, and which simpler shapes compile: enough to act on from a CI log."""
    import triton
    lines = [f"{kind} failed for {pattern.name} ({pattern.to_source().strip()})",
             f"  {type(exc).__name__}: {str(exc)[:2000]}",
             f"  triton {triton.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}, "
             f"capability {torch.cuda.get_device_capability()}",
             f"  kernel cache: {os.environ.get('S2DSL_CACHE_DIR') or '~/.cache/s2dsl'} (generated sources there)"]
    q, k, v = (t[:, :, :1024] for t in _inputs(pattern))
    base = choose_forward(pattern, torch.bfloat16, D, "bhsd", q.device)
    lines.append(f"  forward specialisation: {base}")
    for tuning in ({"num_stages": 1}, {"window_span": 1}, {"block_m": 64, "num_warps": 4},
                   {"block_m": 64, "num_warps": 4, "num_stages": 1, "window_span": 1}):
        try:
            forward(q, k, v, pattern, tuning=tuning)
            torch.cuda.synchronize()
            verdict = "compiles and runs"
        except Exception as e:  # noqa: BLE001 - a diagnosis lists every outcome
            verdict = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        lines.append(f"  forward with {tuning}: {verdict}")
    lines.append("  traceback:\n" + "".join(traceback.format_exception(exc))[-4000:])
    return "\n".join(lines)


@pytest.mark.parametrize("name", list(WINDOW1))
def test_window1_forward_bf16_8k(name):
    _skip_interpreter()
    pattern = WINDOW1[name]
    q, k, v = _inputs(pattern)
    out = torch.full_like(q, float("nan"))
    try:
        out, lse = forward(q, k, v, pattern, out=out)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(_diagnose(pattern, "forward", exc))
    ref, ref_lse = s2dsl.reference_attention(q, k, v, pattern, return_lse=True)
    assert torch.isfinite(out).all(), "unwritten or NaN output"
    err = _rel(out, ref)
    print(f"{name}: forward relative error {err:.2e}")
    assert err < 1e-2, err
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("name", list(WINDOW1))
def test_window1_backward_bf16_8k(name):
    _skip_interpreter()
    pattern = WINDOW1[name]
    q, k, v = _inputs(pattern, seed=1)
    dout = torch.randn_like(q)
    try:
        out, lse = forward(q, k, v, pattern)
        torch.empty(1 << 28, device="cuda").fill_(float("nan"))  # poison the allocator's free blocks
        dq, dk, dv = backward(q, k, v, out, lse, dout, pattern)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        spec = choose_backward(pattern, torch.bfloat16, D, "bhsd", q.device)
        pytest.fail(_diagnose(pattern, "backward", exc) + f"\n  backward specialisation: {spec}")
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    s2dsl.reference_attention(*leaves, pattern).backward(dout.float())
    for label, got, want in zip("qkv", (dq, dk, dv), leaves):
        assert torch.isfinite(got).all(), f"d{label}: unwritten or NaN"
        err = _rel(got, want.grad)
        print(f"{name}: d{label} relative error {err:.2e}")
        assert err < 2e-2, (label, err)


@pytest.mark.parametrize("name", list(WINDOW1))
def test_window1_decode_bf16_8k(name):
    """Prefill 8K - 24 tokens, a 16-token chunk, then 8 single-token steps through the paged cache."""
    _skip_interpreter()
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.kv_cache import PagedKVCache
    pattern = WINDOW1[name]
    q, k, v = _inputs(pattern, seed=2)
    ref = s2dsl.reference_attention(q, k, v, pattern)
    cache = PagedKVCache(pattern, num_pages=pattern.kv_heads * (N // pattern.block + 8), head_dim=D,
                         dtype=torch.bfloat16, device="cuda")
    seq = cache.add_sequence()
    steps = [(0, N - 24), (N - 24, N - 8)] + [(i, i + 1) for i in range(N - 8, N)]
    outs = []
    try:
        for a, b in steps:
            outs.append(cached_attention(cache, [seq], q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]))
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(_diagnose(pattern, f"decode (step {len(outs)} of {len(steps)})", exc))
    got = torch.cat(outs[1:], dim=2)
    assert torch.isfinite(got).all(), "unwritten or NaN output"
    err = _rel(got, ref[:, :, N - 24:])
    print(f"{name}: decode relative error {err:.2e}")
    assert err < 1e-2, err
