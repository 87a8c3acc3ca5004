"""Head-parallel prefill attention (S-HPLB) on 2 or 4 GPUs: contiguous vs placed heads.

For a heterogeneous per-head budget plan (budgets spread over two orders of magnitude, long
tail, as S-HPLB's figure 4 shows: most heads need a few percent of the context, a few need
all of it) and a uniform plan of the same total, every rank runs the generated kernel for
the pattern restricted to its heads. Per assignment (contiguous split; placed by the
analyzer's costs; placed by measured per-group times) the run reports each rank's attention
time (do_bench median), the imbalance max/mean, and the end-to-end latency (all ranks start
together, the step ends when the slowest finishes; median), plus the whole pattern on one GPU.

Correctness first, in the same run: each rank's output at 2048 tokens (bf16, output poisoned
with NaN) against the float32 reference of its sub-pattern, and against the same heads of the
whole pattern computed on that rank.

    python benchmarks/bench_head_parallel.py --gpus 2 --out hp2.json
    python benchmarks/bench_head_parallel.py --gpus 4 --out hp4.json
    python benchmarks/bench_head_parallel.py --gpus 4 --kv-heads 8 --out hp4_gqa.json
    python benchmarks/bench_head_parallel.py --gpus 4 --mode topk --out hp4_topk.json

With the measured placement, OUT.times-SEQ.json holds per-head times (a kv group's time split
evenly over its heads) in the form ``s2dsl place --times`` reads.

NCCL only; NVLink multicast (NVLS) and symmetric-memory multicast are switched off in every
process before torch.distributed starts.
"""
from __future__ import annotations

import os

# every process (the spawned ranks re-import this module) before NCCL is touched
for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[_k] = _v

import argparse
import json
import math
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import s2dsl
from s2dsl.parallel import place, restrict
from s2dsl.parallel.heads import kv_heads_of
from s2dsl.parallel.placement import contiguous, head_costs, place_weights, group_costs

BLOCK, HEADS, DIM = 64, 32, 128
CHECK_SEQ = 2048
DEVICE = "cuda"


def smoke_sizes():
    """--cpu-smoke: gloo, the Triton interpreter, tiny shapes (checks the script, times nothing real)."""
    global BLOCK, HEADS, DIM, CHECK_SEQ, DEVICE
    BLOCK, HEADS, DIM, CHECK_SEQ, DEVICE = 16, 8, 16, 64, "cpu"


def budget_fractions(heads: int, seed: int = 0):
    """Per-head budgets as fractions of the context: log-uniform from 1/64 to 1 (long tail:
    half the heads under 1/8, a few dense), shuffled over the head indices."""
    fr = [(1 / 64) ** (1 - t / (heads - 1)) for t in range(heads)]
    order = torch.randperm(heads, generator=torch.Generator().manual_seed(seed)).tolist()
    return [fr[i] for i in order]


def pattern_text(name: str, windows, kv_heads: int, mode: str = "static") -> str:
    """Per head a budget of w + 1 blocks per query block: ``sink 1  window w`` (static) or
    ``window 1  topk w`` (dynamic, as ``s2dsl calibrate --topk`` writes); None = dense."""
    bodies = []
    for h, w in enumerate(windows):
        body = "dense" if w is None else (f"sink 1  window {w}" if mode == "static" else f"window 1  topk {w}")
        bodies.append(f"heads {h}..{h} {{ {body} }}")
    return (f"pattern {name} {{ block = {BLOCK}  heads = {len(windows)}  kv_heads = {kv_heads}  causal "
            + " ".join(bodies) + " }")


def hetero_pattern(seq: int, kv_heads: int, mode: str = "static"):
    nb = seq // BLOCK
    g = HEADS // kv_heads
    fr = budget_fractions(HEADS)
    # a kv group shares its K/V: its heads get neighbouring budgets (a sorted run of the spread)
    windows = []
    for h in range(HEADS):
        w = max(1, round(fr[h] * nb)) - 1
        windows.append(None if w + 1 >= nb else max(1, w))
    if g > 1:
        windows = [windows[(h // g) * g] for h in range(HEADS)]
    return s2dsl.parse(pattern_text("hetero", windows, kv_heads, mode))["hetero"]


def uniform_pattern(seq: int, kv_heads: int, total: float, mode: str = "static"):
    """Every head ``sink 1 window W`` with W chosen so the attended blocks match ``total``."""
    lo, hi = 1, seq // BLOCK
    best = None
    while lo <= hi:
        w = (lo + hi) // 2
        p = s2dsl.parse(pattern_text("uniform", [w] * HEADS, kv_heads, mode))["uniform"]
        t = sum(head_costs(p, seq))
        if best is None or abs(t - total) < abs(best[0] - total):
            best = (t, p)
        lo, hi = (w + 1, hi) if t < total else (lo, w - 1)
    return best[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bench(fn, rep=200):
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def synced_latency(fn, reps: int) -> float:
    """Median ms from a common start to the slowest rank's end (an all-reduce closes each step)."""
    flag = torch.zeros(1, device=DEVICE)
    times = []
    for it in range(reps + 3):
        dist.all_reduce(flag)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        dist.all_reduce(flag)
        sync()
        if it >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rand(shape, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    # bf16 on the GPU; fp16 under the interpreter (its tl.dot on bf16 is wrong)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    return torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)


def local_inputs(pattern, heads, seq, seed=0):
    """q/k/v of ``heads`` cut from the full random tensors (the same on every rank)."""
    kv = list(kv_heads_of(pattern, heads))
    q = rand((1, pattern.heads, seq, DIM), seed)[:, heads].contiguous()
    k = rand((1, pattern.kv_heads, seq, DIM), seed + 1)[:, kv].contiguous()
    v = rand((1, pattern.kv_heads, seq, DIM), seed + 2)[:, kv].contiguous()
    return q, k, v


def check(pattern, heads) -> dict:
    """This rank's sub-pattern at CHECK_SEQ tokens vs the float32 reference and the whole pattern."""
    from s2dsl.runtime.attention import forward
    sub = restrict(pattern, heads)
    q, k, v = local_inputs(pattern, heads, CHECK_SEQ, seed=7)
    out = torch.full_like(q, float("nan"))
    selection = None
    if not sub.is_static:  # the blocks the top-k heads chose, so the reference attends the same
        _, selection = s2dsl.attention(q, k, v, sub, return_selection=True)
    forward(q, k, v, sub, out=out, selection=selection)
    ref = s2dsl.reference_attention(q.float(), k.float(), v.float(), sub, selection=selection)
    err = float((out.float() - ref).abs().max())
    qa, ka, va = local_inputs(pattern, list(range(pattern.heads)), CHECK_SEQ, seed=7)
    whole = s2dsl.attention(qa, ka, va, pattern)[:, heads]
    split_err = float((out.float() - whole.float()).abs().max())
    ok = not torch.isnan(out).any().item() and err < 3e-2 and split_err < 3e-2
    return {"max_abs_err_vs_fp32": err, "max_abs_diff_vs_whole_pattern": split_err, "ok": bool(ok)}


def measured_group_times(pattern, seq, rank, world):
    """Each kv group alone (its q heads) timed on one rank (groups dealt round-robin)."""
    g = pattern.group_size
    mine = {}
    for grp in range(rank, pattern.kv_heads, world):
        heads = list(range(grp * g, (grp + 1) * g))
        q, k, v = local_inputs(pattern, heads, seq, seed=11)
        sub = restrict(pattern, heads)
        mine[grp] = bench(lambda: s2dsl.attention(q, k, v, sub), rep=50)
        del q, k, v
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    merged = {k: v for p in parts for k, v in p.items()}
    return [merged[grp] for grp in range(pattern.kv_heads)]


def worker(rank: int, world: int, args, port: int, out_path: str):
    if args.cpu_smoke:
        smoke_sizes()
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    else:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
    rows = []
    try:
        for seq in args.seqs:
            het = hetero_pattern(seq, args.kv_heads, args.mode)
            total = sum(head_costs(het, seq))
            uni = uniform_pattern(seq, args.kv_heads, total, args.mode)
            for plan, pattern in (("heterogeneous", het), ("uniform", uni)):
                g = pattern.group_size
                expand = lambda bins: [[h for grp in sorted(b) for h in range(grp * g, (grp + 1) * g)] for b in bins]
                assigns = {"contiguous": expand(contiguous(pattern.kv_heads, world)),
                           "placed": [list(a) for a in place(pattern, world, seq).assignment]}
                if plan == "heterogeneous" and not args.no_measured:
                    group_ms = measured_group_times(pattern, seq, rank, world)
                    bins, _ = place_weights(group_ms, world)
                    assigns["placed_measured"] = expand(bins)
                    if rank == 0:  # each kv group alone: what `s2dsl place --times` can balance
                        rows.append({"seq": seq, "plan": plan, "assignment": "group_times", "group_ms": group_ms})
                        head_ms = [group_ms[h // g] / g for h in range(pattern.heads)]
                        Path(f"{out_path}.times-{seq}.json").write_text(json.dumps({"head_ms": head_ms}))
                costs = head_costs(pattern, seq)
                for name, assignment in assigns.items():
                    heads = sorted(assignment[rank])
                    sub = restrict(pattern, heads)
                    correctness = check(pattern, heads) if seq == args.seqs[0] else None
                    q, k, v = local_inputs(pattern, heads, seq)
                    fn = lambda: s2dsl.attention(q, k, v, sub)  # noqa: E731
                    t_rank = bench(fn)
                    latency = synced_latency(fn, args.reps)
                    gathered = [None] * world
                    dist.all_gather_object(gathered, {"ms": t_rank, "heads": heads, "check": correctness,
                                                      "predicted_blocks": sum(costs[h] for h in heads)})
                    del q, k, v
                    if rank == 0:
                        ms = [x["ms"] for x in gathered]
                        pred = [x["predicted_blocks"] for x in gathered]
                        rows.append({"seq": seq, "plan": plan, "assignment": name, "gpus": world,
                                     "rank_ms": ms, "rank_heads": [x["heads"] for x in gathered],
                                     "imbalance_measured": max(ms) / (sum(ms) / len(ms)),
                                     "imbalance_predicted": max(pred) / (sum(pred) / len(pred)),
                                     "latency_ms": latency, "checks": [x["check"] for x in gathered]})
                # the whole pattern on one GPU (rank 0), the others wait
                if rank == 0:
                    q, k, v = local_inputs(pattern, list(range(pattern.heads)), seq)
                    one = bench(lambda: s2dsl.attention(q, k, v, pattern))
                    rows.append({"seq": seq, "plan": plan, "assignment": "one_gpu", "gpus": 1, "rank_ms": [one],
                                 "latency_ms": one, "imbalance_measured": 1.0, "imbalance_predicted": 1.0})
                    del q, k, v
                dist.barrier()
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
        sync = synced_latency(lambda: None, 50)  # collective: every rank takes part
        if rank == 0:
            result = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (smoke run)",
                      "torch": torch.__version__,
                      "gpus": world, "kv_heads": args.kv_heads, "mode": args.mode, "heads": HEADS, "head_dim": DIM, "block": BLOCK,
                      "dtype": "bf16" if DEVICE == "cuda" else "fp16", "budget_fractions": budget_fractions(HEADS),
                      "sync_overhead_ms": sync, "rows": rows}
            Path(out_path).write_text(json.dumps(result, indent=1))
    finally:
        dist.destroy_process_group()


def _label(seq: int) -> str:
    return f"{seq // 1024}K" if seq % 1024 == 0 else str(seq)


def table(result):
    print(f"\n{result['device']}, {result['gpus']} GPUs, {result['heads']} heads / {result['kv_heads']} kv heads, {result['mode']} budgets, "
          f"d {result['head_dim']}, block {result['block']}, {result['dtype']}; sync overhead {result['sync_overhead_ms']:.3f} ms")
    print("| seq | plan | assignment | per-rank ms | imbalance (measured / predicted) | latency ms | vs contiguous | vs one GPU |")
    print("|---|---|---|---|---|---|---|---|")
    by = {(r["seq"], r["plan"], r["assignment"]): r for r in result["rows"]}
    for r in result["rows"]:
        if "rank_ms" not in r:
            continue
        base = by.get((r["seq"], r["plan"], "contiguous"))
        one = by.get((r["seq"], r["plan"], "one_gpu"))
        ranks = " / ".join(f"{x:.2f}" for x in r["rank_ms"])
        print(f"| {_label(r['seq'])} | {r['plan']} | {r['assignment']} | {ranks} | "
              f"{r['imbalance_measured']:.3f} / {r['imbalance_predicted']:.3f} | {r['latency_ms']:.2f} | "
              f"{base['latency_ms'] / r['latency_ms']:.2f}x | {one['latency_ms'] / r['latency_ms']:.2f}x |")
    bad = [(r["seq"], r["plan"], r["assignment"]) for r in result["rows"]
           for c in (r.get("checks") or []) if c is not None and not c["ok"]]
    print("correctness:", "all ranks match the float32 reference and the whole pattern" if not bad
          else f"FAILED for {bad}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--kv-heads", type=int, default=32, help="32 (MHA, default) or 8 (GQA groups of 4)")
    ap.add_argument("--mode", choices=["static", "topk"], default="static",
                    help="budgets as sink + window (default) or as window 1 + dynamic top-k blocks")
    ap.add_argument("--reps", type=int, default=20, help="synchronised steps per latency median")
    ap.add_argument("--no-measured", action="store_true", help="skip the placement by measured group times")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="gloo ranks on the CPU with TRITON_INTERPRET=1 and tiny shapes: checks the script only")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--cpu-smoke needs TRITON_INTERPRET=1")
        smoke_sizes()
    elif torch.cuda.device_count() < args.gpus:
        sys.exit(f"needs {args.gpus} GPUs, found {torch.cuda.device_count()}")
    if HEADS % args.kv_heads or args.kv_heads < args.gpus:
        sys.exit(f"--kv-heads must divide {HEADS} and be >= --gpus")
    t0 = time.time()
    mp.spawn(worker, args=(args.gpus, args, free_port(), args.out), nprocs=args.gpus, join=True)
    result = json.loads(Path(args.out).read_text())
    result["wall_s"] = time.time() - t0
    Path(args.out).write_text(json.dumps(result, indent=1))
    table(result)


if __name__ == "__main__":
    main()
