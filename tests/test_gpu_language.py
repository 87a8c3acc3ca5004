"""GPU checks of the round-2 constructs in every kernel: forward, backward and decode over the
paged cache, bf16, outputs and gradients poisoned with NaN before the call, against the float32
reference (TF32 off). One head per construct; each shape is a few blocks of 64. Skipped
without CUDA."""
from __future__ import annotations

import pytest
import torch

import s2dsl
from s2dsl.runtime.attention import forward
from s2dsl.runtime.backward import backward

pytestmark = pytest.mark.gpu

# few patterns (compiles dominate the time), each construct in one head; heads that differ load
# their numbers from the table, uniform ones get literals (dkernel_bidirectional, token_window)
BODIES = {
    "dkernel_bidirectional": ("bidirectional", "heads * { window 4 ahead 3 stride 3 relative }"),
    "bidirectional_mixed": ("bidirectional", "heads 0..0 { window 3 ahead 2 stride 5 relative } "
                                             "heads 1..1 { window 200 ahead 77 tokens sink 9 tokens } "
                                             "heads 2..2 { window 2 ahead 1 sink 2 global 2 shard h of 4 } "
                                             "heads 3..3 { dense }"),
    "causal_mixed": ("causal", "heads 0..1 { window 2 stride 4 relative } heads 2..2 { sink 4 tokens window 300 tokens } "
                               "heads 3..3 { window 2 global 3 }"),
    "token_window": ("causal", "heads * { window 300 tokens }"),
    "prefix_lm": ("causal prefix 300 tokens", "heads 0..2 { window 3 ahead 2 sink 1 } heads 3..3 { dense }"),
}
# sizes (a CPU smoke run under the interpreter may shrink them)
DEVICE, DTYPE, D, BLOCK, N = "cuda", torch.bfloat16, 128, 64, 1000
CAUSAL = sorted(k for k, (mode, _) in BODIES.items() if mode.startswith("causal"))


def _pattern(name):
    mode, body = BODIES[name]
    return s2dsl.parse(f"pattern {name} {{ block = {BLOCK} heads = 4 kv_heads = 2 {mode} {body} }}")[name]


def _rel(a, b):
    return ((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _reference(q, k, v, pattern, do=None):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        out = s2dsl.reference_attention(qf, kf, vf, pattern)
        if do is None:
            return out.detach()
        out.backward(do.float())
        return out.detach(), qf.grad, kf.grad, vf.grad
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _inputs(pattern, lq, lk, seed=0):
    torch.manual_seed(seed)
    q, do = (torch.randn(1, pattern.heads, lq, D, device=DEVICE, dtype=DTYPE) for _ in range(2))
    k, v = (torch.randn(1, pattern.kv_heads, lk, D, device=DEVICE, dtype=DTYPE) for _ in range(2))
    return q, k, v, do


@pytest.mark.parametrize("name", sorted(BODIES))
def test_forward_and_backward(name):
    pattern = _pattern(name)
    q, k, v, do = _inputs(pattern, N, N)  # 16 blocks of 64, the last one partial
    out = torch.full_like(q, float("nan"))
    out, lse = forward(q, k, v, pattern, out=out)
    if DEVICE == "cuda":
        torch.empty(1 << 28, device="cuda").fill_(float("nan"))  # poison the allocator's free blocks
    grads = backward(q, k, v, out, lse, do, pattern)
    want = _reference(q, k, v, pattern, do)
    assert torch.isfinite(out).all(), "forward: unwritten or NaN output"
    assert _rel(out, want[0]) < 2e-2, ("out", _rel(out, want[0]))
    for label, g, w in zip(("dq", "dk", "dv"), grads, want[1:]):
        assert torch.isfinite(g).all(), f"{label}: unwritten or NaN"
        assert _rel(g, w) < 2e-2, (label, _rel(g, w))


@pytest.mark.parametrize("name", CAUSAL)
def test_forward_after_a_past(name):
    """Queries that are the last rows of a longer sequence (chunked prefill)."""
    pattern = _pattern(name)
    q, k, v, _ = _inputs(pattern, N // 3, N + N // 10, seed=1)
    out = torch.full_like(q, float("nan"))
    out, _ = forward(q, k, v, pattern, out=out)
    assert torch.isfinite(out).all()
    assert _rel(out, _reference(q, k, v, pattern)) < 2e-2


@pytest.mark.parametrize("name", CAUSAL)
def test_decode(name):
    """Prefill, chunks and single tokens over the paged cache, freed pages poisoned with NaN."""
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.kv_cache import PagedKVCache
    pattern = _pattern(name)
    q, k, v, _ = _inputs(pattern, N * 13 // 10, N * 13 // 10, seed=2)
    cache = PagedKVCache(pattern, num_pages=128, head_dim=D, dtype=DTYPE, device=DEVICE)
    s = cache.add_sequence()
    pos = 0
    for step in (N // 5, 1, 1, N // 13, 1, N // 2, 1, 1, 3):
        end = pos + step
        out = cached_attention(cache, [s], q[:, :, pos:end], k[:, :, pos:end], v[:, :, pos:end])
        ref = _reference(q[:, :, pos:end], k[:, :, :end], v[:, :, :end], pattern)
        assert torch.isfinite(out).all(), f"step at {pos}: NaN (a freed page was read?)"
        assert _rel(out, ref) < 2e-2, (pos, step, _rel(out, ref))
        pos = end
        free = list(cache.free_pages)
        if free:
            cache.k_pages[free] = float("nan")
            cache.v_pages[free] = float("nan")
