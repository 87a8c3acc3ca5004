"""One GPU run that sweeps the kernels' knobs at the DESIGN.md points, DKernel and SDPA in the same run.

Forward: every ``--fwd`` variant (fields of ``choose_forward``'s Specialization: tiles,
``window_span``, ``kv_load="tma"``, ``fuse_diagonal``, ``qk_fp8``, ...) is checked against the float32
reference (bf16, random inputs, output poisoned with NaN, two lengths; rel. L2 below TOLERANCE,
FP8_TOLERANCE for ``qk_fp8``, whose error and max abs error the JSON and summary keep), then timed with DKernel
at every (stride, length), twice (``--rounds``) to show the spread; each row has TFLOP/s on the
blocks the pattern keeps and the compiler's resource report of each variant; ``--ablate`` adds
copies of the default kernel whose residue, unmasked-window or masked loops run zero times.
Forward+backward: ``s2dsl.attention`` + backward and the kernels alone, DKernel's f+b beside.
Backward: ``backward()`` alone per ``--bwd`` tuning, gradients checked first (``BWD_DEFAULT``: issue
14's backward variants, timed in the train section unless ``--train-bwd`` narrows them; with
``--bwd-kv-heads``, also alone on the GQA pattern).
Decode: every ``--decode`` variant (DecodeSpecialization fields: ``flat``, ``pages_per_step``,
``prefetch``, ``force_dot``, warps) checked at batch 1 and 3 with 1, 4 and 16 splits, then
timed at batch 1 and 8, 32K and 128K, with the split count of each policy
(``decode.SPLIT_POLICIES``), SDPA dense decode's achieved bandwidth in the same run.

Kernels compile in ``--workers`` processes before anything is timed (each check writes
Triton's disk cache; the timing process then loads them), so a sweep of many variants fits
in a few minutes. Sections run while ``--budget-s`` lasts; the JSON is written after each.

    python benchmarks/sweep_kernels.py --out sweep.json
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import triton

BLOCK, WINDOW, HEADS, DIM = 64, 16, 32, 128
T0 = time.perf_counter()

# "default" is choose_forward's length-aware pick; "old" the 128-row tiles it used for every
# length before 2026-11-27; the others are candidates (benchmarks/RESULTS.md says what each did)
OLD = {"block_m": 128, "num_warps": 8, "window_span": 2, "kv_load": "pointer", "residue_span": 1}
M64 = {"block_m": 64, "num_warps": 4, "window_span": 1, "residue_span": 1}
# the forward variants still worth timing (issue 14; RESULTS.md has the rest): the diagonal fused
# into the window loop (short tiles: kernels.SHORT_FUSE_DIAGONAL), 64-row
# pointer tiles with and without residue pairs (14.53 ms at 128K stride 32 against the
# default's 14.69 in run 2), and persistent programs over the default's tiles
FWD_DEFAULT = {
    "default": {},
    "old": OLD,
    "m64_tma_fused": dict(M64, kv_load="tma", fuse_diagonal=True),
    "m64_ptr": dict(M64, kv_load="pointer"),
    "m64_ptr_res2": dict(M64, kv_load="pointer", residue_span=2),
    # persistent programs over the default's tiles (kernels.FORWARD_PERSISTENT), per SM: two
    # fit with 64-row tiles (214 regs, 113 KB shared), one with 128-row tiles
    "persist2": {"persistent": 2},
    "persist1": {"persistent": 1},
    # FP8 QK^T (codegen/forward.py, issue 14) over the default's tiles at each length; "fp8_span1"
    # over the 128-row tiles without two-block steps (no per-column K factor; the same kernel
    # as "fp8" up to 32K). Checked with FP8_TOLERANCE; each row also times the K pass alone
    "fp8": {"qk_fp8": True},
    "fp8_span1": {"qk_fp8": True, "window_span": 1, "residue_span": 1},
}
# relative L2 error of the output against the float32 reference on random normal bf16 inputs: the
# 16-bit kernels reach 2e-3 (bf16 rounding), e4m3 scores ~3.3e-2 (torch emulation, d 128): its
# 3 mantissa bits round each q·k product by up to 2^-4 relative
TOLERANCE, FP8_TOLERANCE = 2e-2, 6e-2
# the backward's knobs were timed on 2026-11-27 (the default stayed). Issue 14's fifth session
# (benchmarks/RESULTS.md, "Backward (issue 14), fifth session"): tensor-descriptor loads of Q/dO
# (dK/dV) and K/V (dQ), with the dK/dV product query-major, with 32-row dK/dV query steps (no
# spills), and two launches with a dQ kernel small enough for three programs per SM. Each is
# gradient-checked in the pool, then the train section times the backward alone and forward+backward
# (default forward) beside the default and DKernel (--train-bwd picks which)
BWD_DEFAULT = {
    "default": {},
    "tma": {"dq_load": "tma", "dkdv_load": "tma"},
    "tma_dkdv": {"dkdv_load": "tma"},
    "qmajor_tma": {"dkdv_query_major": True, "dq_load": "tma", "dkdv_load": "tma"},
    "m32_tma": {"dkdv_block_m": 32, "dq_load": "tma", "dkdv_load": "tma"},
    "streams_dq3": {"one_grid": False, "two_streams": True, "dq_load": "tma", "dkdv_load": "tma", "block_n": 32,
                    "num_stages": 1},
}
# decode (issue 14): the segmented loops (default) against V's load issued with K's (the sm_90
# SASS of the default waits for K, reduces, then loads V), one flat loop over the split's kept
# blocks, several pages per step, the next page's K/V prefetched into registers, and the
# one-row (MHA) path through tl.dot (the only loads Triton 3.6 pipelines with cp.async), and
# the splits merged by the last program of each group instead of a combine launch;
# warps / stages / split counts of the default loops were timed on 2026-11-27 (within 1-2%)
DECODE_DEFAULT = {
    "default": {},
    "early_v": {"early_v": True},
    "flat": {"flat": True},
    "flat_early_v": {"flat": True, "early_v": True},
    "early_v_fused": {"early_v": True, "fused_combine": True},
    "prefetch_fused": {"flat": True, "prefetch": True, "fused_combine": True},
    "flat_pages2_w8": {"flat": True, "pages_per_step": 2, "num_warps": 8},
    "prefetch": {"flat": True, "prefetch": True},
    "prefetch_w8": {"flat": True, "prefetch": True, "num_warps": 8},
    "dot": {"force_dot": True},
}


def pattern_for(stride: int, kv_heads=None):
    import s2dsl
    return s2dsl.local_stride(block=BLOCK, local_blocks=WINDOW, vert_stride=stride, heads=HEADS, kv_heads=kv_heads,
                              name=f"local16_stride{stride}" + (f"_kv{kv_heads}" if kv_heads else ""))


def elapsed() -> float:
    return time.perf_counter() - T0


def rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


# ---- loop ablations: the default kernel with one family of loops given an empty range ----

ABLATIONS = {
    "no_residue": [("for j in range(first, lo, period):", "for j in range(lo, lo, period):"),
                   ("for j in range(first, paired, 2 * period):", "for j in range(lo, lo, 2 * period):"),
                   ("for j in tl.range(paired, lo, period", "for j in tl.range(lo, lo, period")],
    "no_window": [("for j in range(edge, whole, WINDOW_SPAN):", "for j in range(whole, whole, WINDOW_SPAN):"),
                  ("for j in tl.range(whole, first_block, num_stages=1):",
                   "for j in tl.range(first_block, first_block, num_stages=1):"),
                  ("for j in range(edge, first_block):", "for j in range(first_block, first_block):")],
    "no_masked": [("for j in tl.range(lo, edge, num_stages=1):", "for j in tl.range(edge, edge, num_stages=1):"),
                  ("for j in tl.range(first_block, last_block + 1, num_stages=1):",
                   "for j in tl.range(first_block, first_block, num_stages=1):")],
}


def ablated_module(pattern, tuning: dict, which: str):
    """The generated forward module with one loop family emptied (timing only: its output is wrong)."""
    import importlib.util
    from s2dsl.runtime.kernels import choose_forward, forward_source
    spec = choose_forward(pattern, torch.bfloat16, DIM, "bhsd", torch.device("cuda"), tuning)
    source = forward_source(pattern, spec)
    hits = 0
    for old, new in ABLATIONS[which]:
        hits += source.count(old)
        source = source.replace(old, new)
    if not hits:
        raise RuntimeError(f"ablation {which}: no loop matched")
    cache = Path(os.environ.get("S2DSL_CACHE_DIR", "/tmp")) / "ablations"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{pattern.name}_{which}_{len(tuning)}.py"
    path.write_text(source)
    spec_ = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module


def launch_module(module, q, k, v, out, lse):
    n = q.shape[2]
    st = (q.stride(0), q.stride(1), q.stride(2))
    module.launch(q, k, v, out, lse, st, st, st, st, (lse.stride(0), lse.stride(1)), q.shape[0], n, n, n,
                  None, None, 1 / math.sqrt(DIM))


# ---- work done in the compile pool (each also checks what it compiled) ----

def _fwd_job(job):
    """Check one forward variant (or compile one ablation); returns (key, result)."""
    kind, stride, label, tuning = job
    import s2dsl
    from s2dsl.runtime.attention import forward
    pattern = pattern_for(stride)
    try:
        if kind == "ablate":
            module = ablated_module(pattern, {}, label)
            q = rand(1, HEADS, 2048, DIM)
            launch_module(module, q, q, q, torch.empty_like(q), torch.empty(1, HEADS, 2048, device="cuda"))
            torch.cuda.synchronize()
            return (kind, stride, label), {"compiled": True}
        errs, max_abs = {}, {}
        for n, dtype in ((2048 + 37, torch.bfloat16), (2048, torch.bfloat16), (1024, torch.float16)):
            torch.manual_seed(n)
            q, k, v = (rand(1, HEADS, n, DIM, dtype=dtype) for _ in range(3))
            out = torch.full_like(q, float("nan"))
            forward(q, k, v, pattern, tuning=tuning, out=out)
            ref = s2dsl.reference_attention(q.float(), k.float(), v.float(), pattern)
            errs[f"{n}_{str(dtype)[6:]}"] = ((out.float() - ref).norm() / ref.norm()).item()
            max_abs[f"{n}_{str(dtype)[6:]}"] = (out.float() - ref).abs().max().item()
        tol = FP8_TOLERANCE if tuning.get("qk_fp8") else TOLERANCE
        ok = all(math.isfinite(e) and e < tol for e in errs.values())
        return (kind, stride, label), {"ok": ok, "rel_err": errs, "max_abs": max_abs, "tolerance": tol}
    except Exception as exc:  # noqa: BLE001 - a variant that does not compile or fit is a result
        return (kind, stride, label), {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}


def _ref_grads(q, k, v, do, pattern):
    import s2dsl
    torch.backends.cuda.matmul.allow_tf32 = False
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    s2dsl.reference_attention(qf, kf, vf, pattern, dtype=torch.float32).backward(do.float())
    return qf.grad, kf.grad, vf.grad


def _bwd_job(job):
    """Check one backward variant: kind "bwd" on the MHA pattern, "bwdg" on (tuning, kv heads)."""
    kind, stride, label, payload = job
    from s2dsl.runtime.attention import forward
    from s2dsl.runtime.backward import backward
    tuning, kv_heads = payload if kind == "bwdg" else (payload, None)
    pattern = pattern_for(stride, kv_heads)
    try:
        errs = {}
        for n in (2048, 2048 + 37):  # and a partial last block (descriptor rows past kv_len)
            torch.manual_seed(n)
            q, do = (rand(1, HEADS, n, DIM) for _ in range(2))
            k, v = (rand(1, pattern.kv_heads, n, DIM) for _ in range(2))
            out, lse = forward(q, k, v, pattern)
            got = backward(q, k, v, out, lse, do, pattern, tuning=tuning)
            want = _ref_grads(q, k, v, do, pattern)
            errs[n] = max(((g.float() - w).norm() / w.norm()).item() for g, w in zip(got, want))
        ok = all(math.isfinite(e) and e < 3e-2 for e in errs.values())
        return (kind, stride, label), {"ok": ok, "rel_err": errs}
    except Exception as exc:  # noqa: BLE001
        return (kind, stride, label), {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}


def _decode_setup(pattern, context, batch_n):
    """A filled cache at ``context`` for ``batch_n`` sequences, queries, and the float32 reference
    of the first sequence's query (on the K/V the cache holds)."""
    import s2dsl
    from bench_decode import fill
    torch.manual_seed(context + batch_n)
    q = rand(batch_n, HEADS, 1, DIM)
    cache, ids = fill(pattern, context, batch_n)
    k0, v0 = cache.gather(ids[0])
    ref = s2dsl.reference_attention(q[:1].float(), k0[None].float(), v0[None].float(), pattern)
    return q, cache, cache.batch(ids), ref


def _decode_call(pattern, q, cache, batch, ref, tuning):
    """Functions launching the decode kernel of ``tuning`` with a split count, and its error."""
    from s2dsl.runtime.decode import choose_decode, decode_module
    module = decode_module(pattern, choose_decode(pattern, q.dtype, DIM, 1, q.device, tuning))
    out = torch.full_like(q, float("nan"))
    lse = torch.empty(q.shape[0], HEADS, 1, device=q.device)

    def call(sp):
        module.launch(q, out, lse, cache.k_pages, cache.v_pages, cache.block_tables, batch.slots,
                      batch.seq_lens, 1, sp, 1 / math.sqrt(DIM))
        return out

    def error(sp):
        out.fill_(float("nan"))
        call(sp)
        return ((out[:1].float() - ref).norm() / ref.norm()).item()
    return call, error


def _decode_job(job):
    _, stride, label, (tuning, context, splits) = job
    from bench_decode import pattern_for as dpattern
    try:
        pattern = dpattern(stride)
        errs = {}
        for batch_n in (1, 3):
            _, error = _decode_call(pattern, *_decode_setup(pattern, context, batch_n), tuning)
            errs.update({f"b{batch_n} s{sp}": error(sp) for sp in splits})
        ok = all(math.isfinite(e) and e < 2e-2 for e in errs.values())
        return ("dec", stride, label), {"ok": ok, "rel_err": errs}
    except Exception as exc:  # noqa: BLE001
        return ("dec", stride, label), {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}


def _job(job):
    return {"bwd": _bwd_job, "bwdg": _bwd_job, "dec": _decode_job}.get(job[0], _fwd_job)(job)


# ---- timing in the main process ----

def bench(fn, rep=120) -> float:
    return triton.testing.do_bench(fn, warmup=20, rep=rep, return_mode="median")


def resources(module) -> list:
    out = []
    try:
        for caches in module.kernel.device_caches.values():
            for compiled in caches[0].values():
                compiled._init_handles()
                out.append({"regs": compiled.n_regs, "spills": compiled.n_spills,
                            "shared": compiled.metadata.shared})
    except Exception as exc:  # noqa: BLE001 - Triton internals: report, don't fail
        out.append({"error": str(exc)[:100]})
    return out


def sweep_forward(args, fwd, checks, rows, round_=1):
    import dkernel_baseline
    from bench_prefill import computed_blocks
    from s2dsl.runtime.attention import forward
    from s2dsl.runtime.kernels import choose_forward, forward_module
    for stride in args.strides:
        pattern = pattern_for(stride)
        ablations = {}
        for which in ABLATIONS if args.ablate else ():
            if checks.get(("ablate", stride, which), {}).get("compiled"):
                ablations[which] = ablated_module(pattern, {}, which)
        for n in args.seqs:
            if elapsed() > args.budget_s:
                print(f"forward: budget spent, skipping stride {stride} n {n}", flush=True)
                continue
            torch.manual_seed(n)
            q, k, v = (rand(1, HEADS, n, DIM) for _ in range(3))
            rep = 120 if n <= 32768 else 200
            row = {"section": "forward", "round": round_, "stride": stride, "seq": n}
            try:
                dk = dkernel_baseline.local_stride(HEADS, n, block=BLOCK, local_blocks=WINDOW, vert_stride=stride)
                row["dkernel_ms"] = bench(lambda: dk(q, k, v), rep)
            except Exception as exc:  # noqa: BLE001
                row["dkernel_error"] = f"{type(exc).__name__}: {exc}"[:200]
            flops = computed_blocks(pattern, n) * 4 * BLOCK * BLOCK * DIM
            out = torch.empty_like(q)
            for label, tuning in fwd.items():
                if not checks.get(("fwd", stride, label), {}).get("ok"):
                    continue
                ms = bench(lambda: forward(q, k, v, pattern, tuning=tuning, out=out), rep)
                row[f"ms {label}"] = ms
                row[f"tflops {label}"] = flops / ms / 1e9
                if tuning.get("qk_fp8"):  # the K pass alone (part of the ms above): one read of K, e4m3 write
                    spec = choose_forward(pattern, q.dtype, DIM, "bhsd", q.device, tuning, seq_len=n, kv_tma=True)
                    module = forward_module(pattern, spec)
                    row[f"kpass_ms {label}"] = bench(lambda: module.quantize_k(k, k.stride()[:3], 1, n), rep)
                if n == args.seqs[0] and round_ == 1:
                    spec = choose_forward(pattern, q.dtype, DIM, "bhsd", q.device, tuning, seq_len=n, kv_tma=True)
                    row[f"resources {label}"] = resources(forward_module(pattern, spec))
            lse = torch.empty(1, HEADS, n, device="cuda")
            for which, module in ablations.items():
                row[f"ms ablate {which}"] = bench(lambda: launch_module(module, q, k, v, out, lse), rep)
            rows.append(row)
            print(json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()
                              if not a.startswith("resources")}), flush=True)
            write(args, rows, checks)
            del q, k, v, out
            torch.cuda.empty_cache()


def sweep_backward(args, bwd, checks, rows, kv_heads=None):
    """``backward()`` alone per variant (MHA, or ``kv_heads`` kv heads: checks of kind "bwdg")."""
    from s2dsl.runtime.attention import forward
    from s2dsl.runtime.backward import backward
    kind = "bwdg" if kv_heads else "bwd"
    for stride in args.strides:
        pattern = pattern_for(stride, kv_heads)
        for n in [s for s in args.seqs if s <= 32768]:
            if elapsed() > args.budget_s:
                print(f"backward: budget spent, skipping stride {stride} n {n} kv heads {kv_heads}", flush=True)
                continue
            torch.manual_seed(n)
            q, do = (rand(1, HEADS, n, DIM) for _ in range(2))
            k, v = (rand(1, pattern.kv_heads, n, DIM) for _ in range(2))
            out, lse = forward(q, k, v, pattern)
            row = {"section": "backward", "stride": stride, "seq": n, "kv_heads": pattern.kv_heads,
                   "fwd_ms": bench(lambda: forward(q, k, v, pattern))}
            for label, tuning in bwd.items():
                if checks.get((kind, stride, label), {}).get("ok"):
                    row[f"bwd_ms {label}"] = bench(lambda: backward(q, k, v, out, lse, do, pattern, tuning=tuning))
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(args, rows, checks)
            del q, k, v, do, out, lse
            torch.cuda.empty_cache()


def sweep_decode(args, dec, checks, rows):
    """Per (batch, stride, context): every decode variant at the split counts of both policies
    (and ``--decode-splits``), then SDPA dense decode on the same card; TB/s on needed bytes."""
    from bench_decode import pattern_for as dpattern
    from s2dsl.runtime.decode import SPLIT_POLICIES, _splits, kept_blocks_for_query
    dev = torch.device("cuda")
    for batch_n in args.decode_batches:
        for stride in args.strides:
            pattern = dpattern(stride)
            for context in args.decode_seqs:
                if elapsed() > args.budget_s:
                    print(f"decode: budget spent, skipping batch {batch_n} stride {stride} context {context}",
                          flush=True)
                    continue
                auto = {p: _splits(pattern, batch_n, 1, context, 1, dev, p) for p in SPLIT_POLICIES}
                pages = batch_n * sum(kept_blocks_for_query(pattern, g, context - 1, context - 1)
                                      for g in range(pattern.kv_heads))
                q, cache, batch, ref = _decode_setup(pattern, context, batch_n)
                need = pages * cache.page_bytes
                row = {"section": "decode", "batch": batch_n, "stride": stride, "context": context,
                       "auto_splits": auto, "bytes": need}
                for label, tuning in dec.items():
                    if not checks.get(("dec", stride, label), {}).get("ok"):
                        continue
                    call, error = _decode_call(pattern, q, cache, batch, ref, tuning)
                    for sp in sorted({*auto.values(), *args.decode_splits}):
                        err = error(sp)
                        if not (math.isfinite(err) and err < 2e-2):
                            row[f"bad {label} {sp}"] = err
                            continue
                        ms = bench(lambda: call(sp), 60)
                        row[f"ms {label} {sp}"] = ms
                        row[f"tbps {label} {sp}"] = need / (ms * 1e-3) / 1e12
                del q, cache, batch
                torch.cuda.empty_cache()
                qd, kd = rand(batch_n, HEADS, 1, DIM), rand(batch_n, HEADS, context, DIM)
                vd = torch.randn_like(kd)
                row["sdpa_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd), 60)
                row["sdpa_tbps"] = kd.numel() * 4 / (row["sdpa_ms"] * 1e-3) / 1e12
                del kd, vd
                torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}),
                      flush=True)
                write(args, rows, checks)


def sweep_train(args, fwd, bwd, checks, rows):
    """Forward+backward: s2dsl.attention + out.backward (the user's path), the kernels alone per
    forward variant (``--train-fwd``) and per backward variant (``--train-bwd``, default forward;
    also the backward alone), and DKernel's forward+backward, same inputs."""
    import dkernel_baseline
    import s2dsl
    from s2dsl.runtime.attention import forward
    from s2dsl.runtime.backward import backward
    for stride in args.strides:
        pattern = pattern_for(stride)
        for n in [s for s in args.seqs if s <= 32768]:
            if elapsed() > args.budget_s:
                print(f"train: budget spent, skipping stride {stride} n {n}", flush=True)
                continue
            torch.manual_seed(n)
            q, k, v, do = (rand(1, HEADS, n, DIM) for _ in range(4))
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            row = {"section": "train", "stride": stride, "seq": n}
            row["s2dsl_autograd_ms"] = triton.testing.do_bench(
                lambda: s2dsl.attention(qg, kg, vg, pattern).backward(do), warmup=20, rep=150,
                grad_to_none=[qg, kg, vg], return_mode="median")
            for label in args.train_fwd:
                if fwd.get(label, {}).get("qk_fp8"):
                    continue  # forward-only: the backward recomputes 16-bit scores (main() says so)
                if checks.get(("fwd", stride, label), {}).get("ok"):
                    def kernels():
                        out, lse = forward(q, k, v, pattern, tuning=fwd[label])
                        backward(q, k, v, out, lse, do, pattern)
                    row[f"s2dsl_kernels_ms {label}"] = bench(kernels, 150)
            out, lse = forward(q, k, v, pattern)
            for label in args.train_bwd:
                tuning = bwd.get(label)
                if tuning is None or not checks.get(("bwd", stride, label), {}).get("ok"):
                    continue
                row[f"bwd_ms {label}"] = bench(lambda: backward(q, k, v, out, lse, do, pattern, tuning=tuning), 150)
                if label != "default":  # the default's f+b is s2dsl_kernels_ms default
                    def kernels():
                        o, m = forward(q, k, v, pattern)
                        backward(q, k, v, o, m, do, pattern, tuning=tuning)
                    row[f"s2dsl_kernels_ms bwd:{label}"] = bench(kernels, 150)
            del out, lse
            try:
                dk = dkernel_baseline.local_stride(HEADS, n, block=BLOCK, local_blocks=WINDOW, vert_stride=stride)
                row["dkernel_ms"] = triton.testing.do_bench(lambda: dk(qg, kg, vg).backward(do), warmup=20, rep=150,
                                                            grad_to_none=[qg, kg, vg], return_mode="median")
            except Exception as exc:  # noqa: BLE001
                row["dkernel_error"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(args, rows, checks)
            del q, k, v, do, qg, kg, vg
            torch.cuda.empty_cache()


def write(args, rows, checks):
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "checks": {" ".join(map(str, k)): v for k, v in checks.items()} if checks else None,
            "rows": rows}, indent=1, default=str))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--strides", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--fwd", type=str, default="", help="JSON object label -> forward tuning")
    ap.add_argument("--bwd", type=str, default="", help="JSON object label -> backward tuning, timed alone")
    ap.add_argument("--decode", type=str, default="", help="JSON object label -> decode tuning ('{}' to skip)")
    ap.add_argument("--decode-seqs", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--decode-splits", type=int, nargs="*", default=[],
                    help="split counts timed besides those of each split policy")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--ablate", action="store_true", help="time the loop ablations too (RESULTS.md has them)")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--budget-s", type=float, default=200, help="no new point starts after this many seconds")
    ap.add_argument("--rounds", type=int, default=2, help="forward sweeps (the second shows the spread)")
    ap.add_argument("--train-fwd", nargs="*", default=["default"],
                    help="forward variants timed with the backward (kernels alone)")
    ap.add_argument("--bwd-kv-heads", type=int, default=0,
                    help="also check and time the backward variants alone with this many kv heads (GQA; "
                         "Phi-3-small: 8), no DKernel beside them")
    ap.add_argument("--train-bwd", nargs="*", default=None,
                    help="backward variants (labels of --bwd or BWD_DEFAULT) timed in the train section, alone and "
                         "with the default forward; default: all that passed their check")
    args = ap.parse_args()
    fwd = json.loads(args.fwd) if args.fwd else FWD_DEFAULT
    if any(fwd.get(label, {}).get("qk_fp8") for label in args.train_fwd):
        print("train: qk_fp8 variants are forward-only; the train section skips them", flush=True)
    bwd = json.loads(args.bwd) if args.bwd else BWD_DEFAULT
    dec = json.loads(args.decode) if args.decode else DECODE_DEFAULT
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    jobs = [("fwd", s, label, t) for s in args.strides for label, t in fwd.items()]
    jobs += [("ablate", s, which, None) for s in args.strides for which in (ABLATIONS if args.ablate else ())]
    jobs += [("bwd", s, label, t) for s in args.strides for label, t in bwd.items()]
    jobs += [("bwdg", s, label, (t, args.bwd_kv_heads)) for s in args.strides for label, t in bwd.items()
             if args.bwd_kv_heads]
    splits = sorted({1, 4, 16, *args.decode_splits})
    # decode checks at 4K tokens (batch 1 and 3): the kernels are the same at every length
    jobs += [("dec", s, label, (t, 4096, splits)) for s in args.strides for label, t in dec.items()]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        checks = dict(pool.map(_job, jobs, chunksize=1))
    print(f"compiled and checked {len(jobs)} jobs in {elapsed():.0f} s", flush=True)
    for key, res in checks.items():
        print(" ".join(map(str, key)), json.dumps(res), flush=True)
    rows = []
    sweep_forward(args, fwd, checks, rows)
    if dec:
        sweep_decode(args, dec, checks, rows)
    if args.train_bwd is None:
        args.train_bwd = list(bwd)
    if args.train_fwd:
        sweep_train(args, fwd, bwd, checks, rows)
    if args.bwd:  # timed alone only when asked for
        sweep_backward(args, bwd, checks, rows)
    if args.bwd_kv_heads:
        sweep_backward(args, bwd, checks, rows, args.bwd_kv_heads)
    for round_ in range(2, args.rounds + 1):
        sweep_forward(args, fwd, checks, rows, round_)
    write(args, rows, checks)
    print(f"\ndone in {elapsed():.0f} s\n")
    summary(rows, checks)


def _best_per_variant(cells: dict) -> dict:
    """'label splits' -> ms, as label -> (best ms, its split count)."""
    best = {}
    for key, ms in cells.items():
        label, sp = key.rsplit(" ", 1)
        if label not in best or ms < best[label][0]:
            best[label] = (ms, sp)
    return best


def summary(rows, checks=None):
    """The short table the lead reads first."""
    for (kind, stride, label), res in (checks or {}).items():
        if kind == "fwd" and "max_abs" in res and res.get("tolerance") == FP8_TOLERANCE:
            print(f"fp8 error s{stride} {label}: rel L2 " + " ".join(f"{k} {v:.2e}" for k, v in res["rel_err"].items())
                  + " | max abs " + " ".join(f"{k} {v:.2e}" for k, v in res["max_abs"].items())
                  + f" | ok {res['ok']}")
    for r in rows:
        if r["section"] == "forward":
            times = {a[3:]: b for a, b in r.items() if a.startswith("ms ") and not a.startswith("ms ablate")}
            best = min(times, key=times.get) if times else "-"
            dk = r.get("dkernel_ms", float("nan"))
            print(f"fwd{r['round']} s{r['stride']} {r['seq'] // 1024}K DKernel {dk:.3f} | " + " ".join(
                f"{a} {b:.3f} ({dk / b:.2f}x)" for a, b in times.items()) + f" | best {best}"
                + "".join(f" | {a[9:]} {b:.3f}" for a, b in r.items() if a.startswith("ms ablate"))
                + "".join(f" | K pass {a[9:]} {b:.3f}" for a, b in r.items() if a.startswith("kpass_ms")))
        elif r["section"] == "decode":
            cells = {a[3:]: b for a, b in r.items() if a.startswith("ms ")}
            if not cells:
                continue
            best = min(cells, key=cells.get)
            now = f"default {r['auto_splits']['occupancy']}"
            base = cells.get(now, float("nan"))
            print(f"dec b{r['batch']} s{r['stride']} {r['context'] // 1024}K splits {r['auto_splits']} "
                  f"sdpa {r['sdpa_tbps']:.2f} TB/s | default {base:.4f} = "
                  f"{r.get('tbps ' + now, float('nan')) / r['sdpa_tbps']:.0%} | best {best} {cells[best]:.4f} = "
                  f"{r['tbps ' + best]:.2f} TB/s ({r['tbps ' + best] / r['sdpa_tbps']:.0%}) | " + " ".join(
                      f"{v} {ms:.4f}@{sp}" for v, (ms, sp) in _best_per_variant(cells).items()))
        elif r["section"] == "train":
            dk = r.get("dkernel_ms", float("nan"))
            print(f"f+b s{r['stride']} {r['seq'] // 1024}K DKernel {dk:.3f} | autograd {r['s2dsl_autograd_ms']:.3f} "
                  f"({dk / r['s2dsl_autograd_ms']:.2f}x) | " + " ".join(
                      f"{a[17:]} {b:.3f} ({dk / b:.2f}x)" for a, b in r.items() if a.startswith("s2dsl_kernels_ms")))
            alone = {a[7:]: b for a, b in r.items() if a.startswith("bwd_ms ")}
            if alone:
                base = alone.get("default", float("nan"))
                print(f"    bwd alone s{r['stride']} {r['seq'] // 1024}K | " + " ".join(
                    f"{a} {b:.3f} ({base / b:.2f}x)" for a, b in alone.items()))
        else:
            print(f"bwd s{r['stride']} {r['seq'] // 1024}K kv{r.get('kv_heads', HEADS)} fwd {r['fwd_ms']:.3f} | "
                  + " ".join(f"{a[7:]} {b:.3f}" for a, b in r.items() if a.startswith("bwd_ms")))


if __name__ == "__main__":
    main()
