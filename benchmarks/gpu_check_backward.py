"""GPU check of the generated backward: gradients against a float32 reference, then timings.

1. Correctness: bf16 and fp16 gradients of s2dsl (forward + generated backward) against
   autograd through the dense float32 reference (TF32 off), at realistic shapes, for the
   DESIGN.md pattern (block 64, 16 local blocks, vertical stride 8, 32 heads, d 128) and
   a GQA variant (8 kv heads). Also: determinism (two runs bit-equal) and no NaN.
2. Timing (median of triton.testing.do_bench, milliseconds): s2dsl fwd, bwd and fwd+bwd
   for several tuning variants of the backward, against SDPA flash (is_causal) fwd+bwd.

    python benchmarks/gpu_check_backward.py                       # check 2K/4K, time 4K/8K
    python benchmarks/gpu_check_backward.py --check-seqs 2048 --seqs 8192 32768
    python benchmarks/gpu_check_backward.py --variants '[{"block_m": 64, "dkdv_block_m": 32}]'

Imports nothing outside torch, triton and s2dsl (and the standard library).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch
import triton

import s2dsl
from s2dsl.runtime.attention import forward
from s2dsl.runtime.backward import backward, choose_backward

HEADS, DIM, BLOCK = 32, 128, 64

# Backward tuning variants: dQ kernel (block_m query rows / block_n kv rows per step), dK/dV
# kernel (dkdv_block_n kv rows per program / dkdv_block_m query rows per step), warps, stages;
# one_grid (dK/dV and dQ programs in one launch, with the dQ warps/stages), two_streams (dQ
# on a second stream beside dK/dV), flat_steps (dK/dV loops over query steps, not blocks).
VARIANTS = [
    {},  # choose_backward's defaults (d 128: one grid, 64x64 tiles, 4 warps, 2 stages, flat steps)
    dict(one_grid=False, dkdv_block_m=32, flat_steps=False, num_stages=3, dkdv_num_stages=3),  # the 2026-11-23 default
    dict(one_grid=False, two_streams=True, block_m=128, num_warps=8),
    dict(dkdv_block_m=32),
    dict(block_n=32),
]


def patterns():
    return {
        "local16/stride8": s2dsl.local_stride(block=BLOCK, local_blocks=16, vert_stride=8, heads=HEADS,
                                              name="local16_stride8"),
        "local16/stride8 gqa8": s2dsl.local_stride(block=BLOCK, local_blocks=16, vert_stride=8, heads=HEADS,
                                                   kv_heads=8, name="local16_stride8_gqa8"),
        "local16/stride32": s2dsl.local_stride(block=BLOCK, local_blocks=16, vert_stride=32, heads=HEADS,
                                               name="local16_stride32"),
    }


def inputs(pattern, n, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: torch.randn(1, h, n, DIM, device="cuda", generator=g).to(dtype)
    return mk(pattern.heads), mk(pattern.kv_heads), mk(pattern.kv_heads), mk(pattern.heads)


def reference_grads(q, k, v, do, pattern):
    """Autograd through the dense float32 reference (TF32 off)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        out = s2dsl.reference_attention(qf, kf, vf, pattern, dtype=torch.float32)
        out.backward(do.float())
        return qf.grad, kf.grad, vf.grad
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def rel(a, b) -> float:
    return ((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name, pattern, n, dtype, tuning=None, tol=None):
    q, k, v, do = inputs(pattern, n, dtype)
    out, lse = forward(q, k, v, pattern)
    torch.empty(1 << 28, device="cuda").fill_(float("nan"))  # poison freed memory
    got = backward(q, k, v, out, lse, do, pattern, tuning=tuning)
    again = backward(q, k, v, out, lse, do, pattern, tuning=tuning)
    want = reference_grads(q, k, v, do, pattern)
    errs = [rel(g, w) for g, w in zip(got, want)]
    finite = all(torch.isfinite(g).all().item() for g in got)
    deterministic = all(torch.equal(a, b) for a, b in zip(got, again))
    tol = tol if tol is not None else (3e-2 if dtype == torch.bfloat16 else 5e-3)
    ok = finite and deterministic and max(errs) < tol
    print(f"| {name:22s} | {n:6d} | {str(dtype)[6:]:8s} | {errs[0]:.2e} | {errs[1]:.2e} | {errs[2]:.2e} | "
          f"{'yes' if finite else 'NO':6s} | {'yes' if deterministic else 'NO':5s} | {'ok' if ok else 'FAIL'} |")
    del q, k, v, do, out, lse, got, again, want
    torch.cuda.empty_cache()
    return ok


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def kernel_times(fn, reps: int = 5) -> dict:
    """Milliseconds per call of each GPU kernel ``fn`` launches (torch.profiler, ``reps`` calls)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        total = getattr(evt, "self_device_time_total", None)
        if total is None:
            total = getattr(evt, "self_cuda_time_total", 0)
        if total > 0:
            out[evt.key] = round(total / reps / 1e3, 4)
    return out


def time_pattern(name, pattern, n, variants, dtype=torch.bfloat16):
    q, k, v, do = inputs(pattern, n, dtype)
    out, lse = forward(q, k, v, pattern)
    t_fwd = bench(lambda: forward(q, k, v, pattern))
    rows = []
    for i, tuning in enumerate(variants):
        try:
            t0 = time.perf_counter()
            backward(q, k, v, out, lse, do, pattern, tuning=tuning)  # compile
            torch.cuda.synchronize()
            jit_s = time.perf_counter() - t0
            t_bwd = bench(lambda: backward(q, k, v, out, lse, do, pattern, tuning=tuning))
            t_all = bench(lambda: backward(q, k, v, *forward(q, k, v, pattern), do, pattern, tuning=tuning))
            kernels = kernel_times(lambda: backward(q, k, v, out, lse, do, pattern, tuning=tuning))
            rows.append((i, t_bwd, t_all, jit_s, "", kernels))
        except Exception as exc:  # a variant that does not compile or fit: report, go on
            rows.append((i, float("nan"), float("nan"), 0.0, f"{type(exc).__name__}: {str(exc)[:60]}", {}))
    # SDPA flash, causal, MHA (kv expanded to the q heads: flash has no GQA here)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    group = pattern.heads // pattern.kv_heads
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k.repeat_interleave(group, 1),
                                                              v.repeat_interleave(group, 1)))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fa_fwd_bwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = sdpa(qs, ks, vs, is_causal=True)
        return torch.autograd.grad(o, (qs, ks, vs), do)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        t_fa_fwd = bench(lambda: sdpa(qs, ks, vs, is_causal=True))
    t_fa = bench(fa_fwd_bwd)
    best = min((r for r in rows if not math.isnan(r[2])), key=lambda r: r[2], default=None)
    for i, t_bwd, t_all, jit_s, err, kernels in rows:
        mark = " *" if best is not None and i == best[0] else ""
        per_kernel = " ".join(f"{k.split('_kernel')[0]}={v:.3f}" for k, v in sorted(kernels.items()))
        print(f"| {name:22s} | {n:6d} | v{i}{mark:2s} | {t_fwd:7.3f} | {t_bwd:7.3f} | {t_all:7.3f} | "
              f"{t_fa_fwd:7.3f} | {t_fa:7.3f} | {t_fa / t_all if t_all == t_all else float('nan'):6.2f}x | "
              f"{jit_s:5.1f} | {per_kernel} {err}")
    del q, k, v, do, out, lse, qs, ks, vs
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check-seqs", type=int, nargs="*", default=[2048, 4096])
    ap.add_argument("--seqs", type=int, nargs="*", default=[4096, 8192], help="lengths to time")
    ap.add_argument("--variants", type=str, default=None, help="JSON list of tuning dicts (replaces the built-ins)")
    ap.add_argument("--json", type=str, default=None, help="write the timings here")
    ap.add_argument("--patterns", type=str, nargs="*", default=None,
                    help="patterns to check and time (default: all of " + ", ".join(patterns()) + ")")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    variants = json.loads(args.variants) if args.variants else VARIANTS
    pats = {k: p for k, p in patterns().items() if args.patterns is None or k in args.patterns}
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    default = choose_backward(next(iter(pats.values())), torch.bfloat16, DIM, "bhsd", torch.device("cuda"))
    print(f"default backward spec: {default}")
    for i, v in enumerate(variants):
        print(f"  v{i}: {v or 'defaults'}")

    print("\n## gradients vs float32 reference (relative Frobenius error)\n")
    print("| pattern                | tokens | dtype    | dq       | dk       | dv       | finite | det.  | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    all_ok = True
    for n in args.check_seqs:
        for name, pattern in pats.items():
            for dtype in (torch.bfloat16, torch.float16):
                all_ok &= check(name, pattern, n, dtype)
    # a non-default tile shape too, on the smallest length
    if args.check_seqs:
        name, pattern = next(iter(pats.items()))
        for tuning in variants[1:]:  # the other variants, on the smallest length
            all_ok &= check(f"{name} {tuning}"[:60], pattern, min(args.check_seqs), torch.bfloat16, tuning=tuning)

    print("\n## timings, bf16, batch 1, ms (median of do_bench); * = fastest fwd+bwd variant\n")
    print("| pattern                | tokens | var  | s2 fwd  | s2 bwd  | s2 f+b  | FA fwd  | FA f+b  | FA/s2   | jit s | note")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for n in args.seqs:
        for name, pattern in pats.items():
            rows = time_pattern(name, pattern, n, variants)
            results[f"{name}@{n}"] = [dict(variant=variants[i], bwd_ms=b, fwd_bwd_ms=a, jit_s=j, error=e,
                                           kernel_ms=kms) for i, b, a, j, e, kms in rows]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print("\ngradient check:", "PASSED" if all_ok else "FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
