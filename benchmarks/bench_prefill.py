"""Prefill forward: SDPA flash vs FlexAttention vs DKernel vs s2dsl on the DESIGN.md patterns.

One GPU run checks s2dsl against the float32 reference (bf16, random inputs, poisoned
outputs), then times every method with the median of triton.testing.do_bench. Writes a
markdown table to stdout and JSON to --json.

    python benchmarks/bench_prefill.py --seqs 8192 32768 131072 --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import triton

import s2dsl
from s2dsl.codegen import lower
from s2dsl.runtime.attention import forward
from s2dsl.runtime.kernels import choose_forward, forward_module

import dkernel_baseline
from common import bench, flex_block_attention

BLOCK, WINDOW, HEADS, DIM = 64, 16, 32, 128


def pattern_for(stride: int):
    return s2dsl.local_stride(block=BLOCK, local_blocks=WINDOW, vert_stride=stride, heads=HEADS,
                              name=f"local16_stride{stride}")


def computed_blocks(pattern, n_tokens: int) -> int:
    """Block pairs (h, i, j) the pattern keeps: what any exact kernel must compute."""
    n = math.ceil(n_tokens / pattern.block)
    total = 0
    for spec in pattern.head_specs:  # closed form per head for window + one residue class
        for i in range(n):
            w = min(spec.window, i + 1)
            below = i + 1 - w
            extra = 0
            for m, r in spec.residues:
                extra += (below - 1 - r) // m + 1 if below > r else 0
            total += w + extra
    return total


def check(pattern, n: int, dtype=torch.bfloat16, tuning=None) -> float:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, DIM, device="cuda", dtype=dtype) for _ in range(3))
    out, lse = forward(q, k, v, pattern, tuning=tuning)
    ref = s2dsl.reference_attention(q.float(), k.float(), v.float(), pattern)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    # e4m3 scores (qk_fp8) are off by ~3.3e-2 on these inputs (sweep_kernels.FP8_TOLERANCE)
    tol = 6e-2 if (tuning or {}).get("qk_fp8") else 2e-2
    assert math.isfinite(err) and err < tol, f"{pattern.name} n={n} {tuning}: relative error {err}"
    return err


def flex_fn(stride: int, n: int):
    def mask_mod(b, h, q_idx, kv_idx):
        qb, kb = q_idx // BLOCK, kv_idx // BLOCK
        return (q_idx >= kv_idx) & ((qb - kb < WINDOW) | ((kb + h) % stride == 0))

    return flex_block_attention(mask_mod, HEADS, n, BLOCK)


def resource_report(pattern, n: int) -> list:
    """Registers, spills and shared memory of the compiled forward kernels (Triton's metadata)."""
    spec = choose_forward(pattern, torch.bfloat16, DIM, "bhsd", torch.device("cuda"), seq_len=n, kv_tma=True)
    module = forward_module(pattern, spec)
    report = []
    try:
        for caches in module.kernel.device_caches.values():
            for compiled in caches[0].values():
                compiled._init_handles()
                report.append({"regs_per_thread": compiled.n_regs, "spills": compiled.n_spills,
                               "shared_bytes": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
                               "num_stages": compiled.metadata.num_stages})
    except Exception as exc:  # noqa: BLE001 - internal Triton structures: report, don't fail
        report.append({"error": f"{type(exc).__name__}: {exc}"})
    return report


def plan_memory(pattern, n: int) -> int:
    """Device bytes a call at a new length allocates beyond its output and log-sum-exp."""
    q, k, v = (torch.randn(1, HEADS, n, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, lse = forward(q, k, v, pattern)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size() - lse.numel() * 4


def plan_cost(pattern, n: int):
    """Host time and device memory to plan a new length (Triton's JIT excluded: warm)."""
    spec = choose_forward(pattern, torch.bfloat16, DIM, "bhsd", torch.device("cuda"), seq_len=n, kv_tma=True)
    forward_module(pattern, spec)  # warm
    t0 = time.perf_counter()
    for _ in range(100):
        lower(pattern)
        spec = choose_forward(pattern, torch.bfloat16, DIM, "bhsd", torch.device("cuda"), seq_len=n, kv_tma=True)
        forward_module(pattern, spec)
    return (time.perf_counter() - t0) / 100 * 1e3


HETERO = """
pattern hetero {
    block = 64  heads = 32  causal
    heads 0..7 { dense }
    heads 8..23 { window 16  stride 8 offset h }
    heads 24..31 { window 4  sink 1 }
}
"""


def heterogeneous(n: int, tuning):
    """Heads with very different work in one launch: longest-first order vs a naive one."""
    pattern = s2dsl.parse(HETERO)["hetero"]
    check(pattern, 2048 + 37, tuning=tuning)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = []
    for order in ("naive", "tile_major", "longest_first"):
        t = dict(tuning or {}, order=order)
        out.append({"pattern": "hetero(8 dense, 16 local16/stride8, 8 window4+sink)", "seq": n, "order": order,
                    "s2dsl_ms": bench(lambda a, b, c: forward(a, b, c, pattern, tuning=t), q, k, v)})
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        out.append({"pattern": "dense (SDPA flash), same shape", "seq": n,
                    "sdpa_flash_ms": bench(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
                        a, b, c, is_causal=True), q, k, v)})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--strides", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-dkernel", action="store_true")
    ap.add_argument("--variants", type=str, default="", help="json list of tuning dicts to time too")
    ap.add_argument("--fp8", action="store_true", help="time FP8 QK^T ({'qk_fp8': true}) beside the default")
    ap.add_argument("--json", type=str, default="")
    ap.add_argument("--hetero", type=int, default=0, help="also time a heterogeneous pattern at this length")
    args = ap.parse_args()
    variants = json.loads(args.variants) if args.variants else [None]
    if args.fp8:
        variants.append({"qk_fp8": True})
    rows = []
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    for stride in args.strides:
        pattern = pattern_for(stride)
        usable, check_errors = [], {}
        for tuning in variants:
            try:
                err = check(pattern, 2048 + 37, tuning=tuning)
            except triton.runtime.errors.OutOfResources as exc:
                print(f"skip {tuning}: {exc}")
                continue
            err2 = check(pattern, 4096, torch.float16, tuning=tuning)
            usable.append(tuning)
            check_errors[json.dumps(tuning)] = {"bf16_2085": err, "fp16_4096": err2}
            print(f"check {pattern.name} {tuning}: rel err bf16 {err:.2e}, fp16 {err2:.2e}")
        for n in args.seqs:
            torch.manual_seed(0)
            q, k, v = (torch.randn(1, HEADS, n, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            row = {"pattern": pattern.name, "seq": n, "check_rel_err": check_errors}
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                row["sdpa_flash_ms"] = bench(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
                    a, b, c, is_causal=True), q, k, v)
            if not args.no_dkernel:
                try:
                    dk = dkernel_baseline.local_stride(HEADS, n, block=BLOCK, local_blocks=WINDOW, vert_stride=stride)
                    if n <= 32768:  # the same work? DKernel's output vs s2dsl's
                        ref = forward(q, k, v, pattern)[0].float()
                        row["dkernel_vs_s2dsl_rel"] = ((dk(q, k, v).float() - ref).norm() / ref.norm()).item()
                        del ref
                    row["dkernel_ms"] = bench(dk, q, k, v)
                except Exception as exc:  # noqa: BLE001 - a baseline failing is a result too
                    row["dkernel_error"] = f"{type(exc).__name__}: {exc}"[:200]
            if not args.no_flex:
                try:
                    fn, plan_s = flex_fn(stride, n)
                    row["flex_ms"] = bench(fn, q, k, v)
                    row["flex_plan_s"] = plan_s
                except Exception as exc:  # noqa: BLE001 - a baseline failing is a result too
                    row["flex_error"] = f"{type(exc).__name__}: {exc}"[:200]
            blocks = computed_blocks(pattern, n)
            flops = blocks * 4 * BLOCK * BLOCK * DIM
            for tuning in usable:
                ms = bench(lambda a, b, c: forward(a, b, c, pattern, tuning=tuning), q, k, v)
                key = "s2dsl_ms" if tuning is None else f"s2dsl_ms {json.dumps(tuning)}"
                row[key] = ms
                row[key.replace("_ms", "_tflops")] = flops / ms / 1e9
            row["plan_ms"] = plan_cost(pattern, n)
            row["plan_extra_bytes_new_length"] = plan_memory(pattern, n + 3 * BLOCK + 5)
            row["kernel_resources"] = resource_report(pattern, n)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:  # after every row, so a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
            del q, k, v
            torch.cuda.empty_cache()
    def cell(x, fmt="{:.2f}"):
        return fmt.format(x) if x else "-"

    print("\n| pattern | seq | SDPA flash ms | Flex ms | DKernel ms | s2dsl ms | best variant ms | s2dsl TFLOP/s "
          "| vs FA2 | vs Flex | vs DKernel (default) | vs DKernel (best) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        flex, dk = r.get("flex_ms"), r.get("dkernel_ms")
        timed = {k2: v for k2, v in r.items() if k2.startswith("s2dsl_ms")}
        ours = r.get("s2dsl_ms", min(timed.values()))
        best = min(timed.values())
        tf = max(v for k2, v in r.items() if k2.startswith("s2dsl_tflops"))
        print(f"| {r['pattern']} | {r['seq']} | {r['sdpa_flash_ms']:.2f} | {cell(flex)} | {cell(dk, '{:.3f}')} | "
              f"{ours:.3f} | {best:.3f} | {tf:.0f} | {r['sdpa_flash_ms'] / ours:.1f}x | "
              f"{cell(flex and flex / ours, '{:.2f}x')} | {cell(dk and dk / ours, '{:.2f}x')} | "
              f"{cell(dk and dk / best, '{:.2f}x')} |")
    for r in rows:
        if len([k2 for k2 in r if k2.startswith("s2dsl_ms")]) > 1:
            best = min((v, k2) for k2, v in r.items() if k2.startswith("s2dsl_ms"))
            print(f"  {r['pattern']} @ {r['seq']}: fastest {best[1]} {best[0]:.3f} ms")
    if args.hetero:
        hetero_rows = heterogeneous(args.hetero, variants[0])
        for r in hetero_rows:
            print(json.dumps(r))
        rows.extend(hetero_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
