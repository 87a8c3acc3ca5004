"""Round-2 language constructs on the GPU: DKernel's bidirectional family (two-sided window
+ relative stride) vs FlexAttention with the same block mask, DKernel's own non-causal
kernel and SDPA flash (dense); plus the causal local-stride points against DKernel, all in
the same run.

Checks first (bf16, random inputs, outputs poisoned with NaN, against the float32
reference; gradients of the bidirectional points against autograd through it), then times
the forward, and at --backward-seqs (32K by default) fwd+bwd of the bidirectional points
(two-sided window + relative stride) against FlexAttention with the same block mask and SDPA
flash, with the median of triton.testing.do_bench; prints a table and
writes JSON to --out.

    PYTHONPATH=shared/anchors python benchmarks/bench_language.py --seqs 8192 32768 --out lang.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import triton

import s2dsl
from s2dsl.runtime.attention import forward

import dkernel_baseline
from common import bench, flex_block_attention, time_variants

BLOCK, LOCAL, HEADS, DIM = 64, 16, 32, 128
#: forward tile variants timed beside the default at every point (label -> tuning): plans with
#: round-2 constructs keep 64-row tiles with two-block window steps, 3 stages and pointer loads
#: (253 registers, 208 KB of shared memory on sm_90: one program per SM); "m64_tma" is the causal
#: local-stride default up to 32K (one block per step, tensor descriptors: 156 / 113 KB, two per
#: SM), what kernels.EXTENDED_SHORT_TILES switches on
TILE_VARIANTS = {"m64_tma": {"block_m": 64, "num_warps": 4, "window_span": 1, "kv_load": "tma"}}


def bidirectional(stride: int):
    """DKernel's non-causal default: local_blocks=(16, 16), relative vertical stride."""
    return s2dsl.local_stride(block=BLOCK, local_blocks=LOCAL, vert_stride=stride, heads=HEADS, causal=False,
                              name=f"bi_local16_rel{stride}")


def causal(stride: int):
    return s2dsl.local_stride(block=BLOCK, local_blocks=LOCAL, vert_stride=stride, heads=HEADS,
                              name=f"local16_stride{stride}")


def inputs(n, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return tuple(torch.randn(1, HEADS, n, DIM, device="cuda", dtype=dtype) for _ in range(3))


def check(pattern, n: int) -> float:
    q, k, v = inputs(n)
    out = torch.full_like(q, float("nan"))
    out, _ = forward(q, k, v, pattern, out=out)
    ref = s2dsl.reference_attention(q.float(), k.float(), v.float(), pattern)
    assert torch.isfinite(out).all(), f"{pattern.name}: unwritten or NaN output"
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, f"{pattern.name} n={n}: relative error {err}"
    return err


def sliding_window(tokens: int):
    return s2dsl.parse(f"pattern swa{tokens} {{ block = {BLOCK} heads = {HEADS} causal "
                       f"heads * {{ window {tokens} tokens }} }}")[f"swa{tokens}"]


def flex_sliding(tokens: int, n: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < tokens)

    return flex_block_attention(mask_mod, 1, n, BLOCK)[0]


def flex_bidirectional(stride: int, n: int):
    def mask_mod(b, h, q_idx, kv_idx):
        d = q_idx // BLOCK - kv_idx // BLOCK
        left = torch.clamp(d - LOCAL + 1, min=0)
        right = torch.clamp(-d - LOCAL + 1, min=0)
        return (left + right) % stride == 0

    return flex_block_attention(mask_mod, 1, n, BLOCK)


def training_step(fn, n: int, seed: int = 1):
    """A forward+backward step of ``fn`` (autograd) on fresh bf16 inputs of length n: the step and dO."""
    q, k, v = (t.requires_grad_() for t in inputs(n, seed=seed))
    do = torch.randn_like(q)

    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(do)
    return step, (q, k, v, do)


def check_backward(pattern, n: int) -> float:
    """Gradients of s2dsl's training step (bf16, poisoned first) vs autograd through the float32
    reference: the largest relative error of dq, dk, dv."""
    step, (q, k, v, do) = training_step(lambda a, b, c: s2dsl.attention(a, b, c, pattern), n)
    for t in (q, k, v):
        t.grad = torch.full_like(t, float("nan"))
    step()
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    s2dsl.reference_attention(qf, kf, vf, pattern).backward(do.float())
    torch.backends.cuda.matmul.allow_tf32 = prev
    worst = 0.0
    for name, got, want in (("dq", q.grad, qf.grad), ("dk", k.grad, kf.grad), ("dv", v.grad, vf.grad)):
        assert torch.isfinite(got).all(), f"{pattern.name}: {name} unwritten or NaN"
        err = ((got.float() - want).norm() / want.norm()).item()
        assert err < 2e-2, f"{pattern.name} n={n}: {name} relative error {err}"
        worst = max(worst, err)
    return worst


def time_training(row: dict, pattern, stride: int, n: int, use_flex: bool):
    """fwd+bwd of s2dsl, FlexAttention with the same block mask and SDPA flash (dense), same run."""
    step, _ = training_step(lambda a, b, c: s2dsl.attention(a, b, c, pattern), n)
    row["s2dsl_fwd_bwd_ms"] = bench(step)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        step, _ = training_step(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c), n)
        row["sdpa_flash_fwd_bwd_ms"] = bench(step)
    if use_flex:
        try:
            fn, _ = flex_bidirectional(stride, n)
            step, _ = training_step(fn, n)
            row["flex_fwd_bwd_ms"] = bench(step)
        except Exception as exc:  # noqa: BLE001 - a baseline failing is a result too
            row["flex_fwd_bwd_error"] = f"{type(exc).__name__}: {exc}"[:200]
    for key in ("flex_fwd_bwd_ms", "sdpa_flash_fwd_bwd_ms"):
        if key in row:
            row[key.replace("_ms", "_over_s2dsl")] = row[key] / row["s2dsl_fwd_bwd_ms"]


def run_point(pattern, stride: int, n: int, is_causal: bool, use_flex: bool, use_dkernel: bool,
              variants: dict = None) -> dict:
    q, k, v = inputs(n)
    row = {"pattern": pattern.name, "seq": n, "causal": is_causal}
    row["s2dsl_ms"] = bench(lambda a, b, c: forward(a, b, c, pattern), q, k, v)
    time_variants(row, TILE_VARIANTS if variants is None else variants,
                  lambda t: forward(q, k, v, pattern, tuning=t)[0], forward(q, k, v, pattern)[0],
                  lambda t: bench(lambda a, b, c: forward(a, b, c, pattern, tuning=t), q, k, v), "s2dsl_{}")
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        row["sdpa_flash_ms"] = bench(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
            a, b, c, is_causal=is_causal), q, k, v)
    if use_dkernel:
        try:
            dk = dkernel_baseline.local_stride(HEADS, n, block=BLOCK, local_blocks=LOCAL, vert_stride=stride,
                                               causal=is_causal)
            if n <= 32768:  # the same work? DKernel's output vs s2dsl's
                ref = forward(q, k, v, pattern)[0].float()
                row["dkernel_vs_s2dsl_rel"] = ((dk(q, k, v).float() - ref).norm() / ref.norm()).item()
                del ref
            row["dkernel_ms"] = bench(dk, q, k, v)
        except Exception as exc:  # noqa: BLE001 - a baseline failing is a result too
            row["dkernel_error"] = f"{type(exc).__name__}: {exc}"[:200]
    if use_flex and not is_causal:
        try:
            fn, plan_s = flex_bidirectional(stride, n)
            if n <= 32768:
                ref = forward(q, k, v, pattern)[0].float()
                row["flex_vs_s2dsl_rel"] = ((fn(q, k, v).float() - ref).norm() / ref.norm()).item()
                del ref
            row["flex_ms"] = bench(fn, q, k, v)
            row["flex_plan_s"] = plan_s
        except Exception as exc:  # noqa: BLE001
            row["flex_error"] = f"{type(exc).__name__}: {exc}"[:200]
    for key in ("dkernel_ms", "flex_ms", "sdpa_flash_ms"):
        if key in row:
            row[key.replace("_ms", "_over_s2dsl")] = row[key] / row["s2dsl_ms"]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--strides", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-dkernel", action="store_true")
    ap.add_argument("--no-causal", action="store_true", help="skip the causal local-stride points")
    ap.add_argument("--windows", type=int, nargs="*", default=[4096],
                    help="token sliding windows (Mistral-style) to time against Flex and SDPA")
    ap.add_argument("--no-backward", action="store_true", help="skip the fwd+bwd timing of the bidirectional points")
    ap.add_argument("--backward-seqs", type=int, nargs="*", default=[32768],
                    help="lengths at which the bidirectional points also time fwd+bwd")
    ap.add_argument("--out", type=str, default="")
    ap.add_argument("--tile-variants", default=None, metavar="JSON",
                    help="forward tile variants timed beside the default at every point, a JSON object label -> "
                         "tuning ('{}' for none; default: TILE_VARIANTS)")
    args = ap.parse_args()
    variants = TILE_VARIANTS if args.tile_variants is None else json.loads(args.tile_variants)
    ok, why = dkernel_baseline.available()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}"
          f"  dkernel: {'yes' if ok else why}")
    checks, rows = {}, []
    for stride in args.strides:
        patterns = [(bidirectional(stride), False)] + ([] if args.no_causal else [(causal(stride), True)])
        for pattern, is_causal in patterns:
            checks[pattern.name] = check(pattern, 2048 + 37)
            print(f"check {pattern.name}: rel err bf16 {checks[pattern.name]:.2e}")
            if not is_causal and not args.no_backward:
                checks[pattern.name + "_grads"] = check_backward(pattern, 2048 + 37)
                print(f"check {pattern.name} gradients: worst rel err bf16 {checks[pattern.name + '_grads']:.2e}")
            for n in args.seqs:
                row = run_point(pattern, stride, n, is_causal, not args.no_flex, not args.no_dkernel and ok, variants)
                if not is_causal and not args.no_backward and n in args.backward_seqs:
                    time_training(row, pattern, stride, n, not args.no_flex)
                rows.append(row)
                print(json.dumps(row))
    for tokens in args.windows:
        pattern = sliding_window(tokens)
        checks[pattern.name] = check(pattern, 2048 + 37 + tokens)
        print(f"check {pattern.name}: rel err bf16 {checks[pattern.name]:.2e}")
        for n in args.seqs:
            row = run_point(pattern, 0, n, True, False, False, variants)
            if not args.no_flex:
                try:
                    q, k, v = inputs(n)
                    fn = flex_sliding(tokens, n)
                    row["flex_ms"] = bench(fn, q, k, v)
                    row["flex_over_s2dsl"] = row["flex_ms"] / row["s2dsl_ms"]
                except Exception as exc:  # noqa: BLE001
                    row["flex_error"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
            print(json.dumps(row))
    print("\n| pattern | seq | s2dsl ms | Flex ms (x) | DKernel ms (x) | SDPA flash ms (x) | "
          + " | ".join(f"s2dsl {label} ms" for label in variants) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(variants))
    for r in rows:
        def cell(key):
            return f"{r[key + '_ms']:.3f} ({r[key + '_over_s2dsl']:.2f})" if key + "_ms" in r else "-"
        tiles = " | ".join(f"{r[f's2dsl_{x}_ms']:.3f}" if f"s2dsl_{x}_ms" in r else r.get(f"s2dsl_{x}_error", "-")[:30]
                           for x in variants)
        print(f"| {r['pattern']} | {r['seq']} | {r['s2dsl_ms']:.3f} | {cell('flex')} | {cell('dkernel')} | "
              f"{cell('sdpa_flash')} | {tiles} |")
    trained = [r for r in rows if "s2dsl_fwd_bwd_ms" in r]
    if trained:
        print("\n| pattern | seq | s2dsl fwd+bwd ms | Flex fwd+bwd ms (x) | SDPA flash fwd+bwd ms (x) |")
        print("|---|---|---|---|---|")
        for r in trained:
            def cell2(key):
                ms = key + "_fwd_bwd_ms"
                return f"{r[ms]:.3f} ({r[key + '_fwd_bwd_over_s2dsl']:.2f})" if ms in r else "-"
            print(f"| {r['pattern']} | {r['seq']} | {r['s2dsl_fwd_bwd_ms']:.3f} | {cell2('flex')} | "
                  f"{cell2('sdpa_flash')} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "triton": triton.__version__, "checks": checks, "rows": rows},
                                             indent=1))


if __name__ == "__main__":
    main()
