"""Forward+backward (training) speed: SDPA flash vs FlexAttention vs s2dsl on the DESIGN.md patterns.

One GPU run:
1. Correctness: s2dsl gradients (``s2dsl.attention`` + ``out.backward(dout)``, and every
   ``--tuning`` variant through ``forward``/``backward`` directly) against autograd through
   the dense float32 reference (TF32 off) at 2K tokens, bf16.
2. Timing, milliseconds, median of ``triton.testing.do_bench`` (gradients reset between
   calls): q, k, v grads from ``out.backward(dout)`` for SDPA flash (``is_causal``),
   FlexAttention (``torch.compile``'d ``flex_attention`` with a block mask from
   ``torch.compile(create_block_mask)``, 64-token blocks, 64x64 tiles) and s2dsl, plus
   s2dsl's forward and backward alone. bf16, batch 1, 32 heads, head dim 128, block 64,
   window 16 blocks, vertical stride 8 or 32 with offset h (DKernel's local-stride).
A baseline that fails (compile error, out of memory, time budget spent) is recorded as such
in the table and the JSON; the run goes on. Defaults (8K and 32K, both strides, Flex
included) are meant to finish in under 8 minutes on an H100; ``--budget-s`` skips Flex for
the rows not yet started once that many seconds have passed. Flex runs last, after every
s2dsl and SDPA row, so a run cut short keeps those.

    python benchmarks/bench_train.py --json bench_train.json                # 8K, 32K
    python benchmarks/bench_train.py --seqs 8192 32768 131072 --no-flex
    python benchmarks/bench_train.py --tuning '[{"bwd": {"dkdv_block_m": 64}}, {"fwd": {"window_span": 1}}]'

``--tuning``: a JSON object or list of objects, each ``{"fwd": {...}, "bwd": {...}}`` (fields of
``choose_forward`` / ``choose_backward``); an object without those keys is a backward tuning.

Imports nothing outside torch, triton and s2dsl (and the standard library).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import triton

import s2dsl
from s2dsl.runtime.attention import forward
from s2dsl.runtime.backward import backward

import dkernel_baseline

HEADS, DIM, BLOCK, WINDOW = 32, 128, 64, 16
DEVICE, DTYPE = "cuda", torch.bfloat16  # --device cpu (a smoke run under TRITON_INTERPRET=1): float32
TARGET = 1.4  # DESIGN.md: forward+backward at least 1.4x faster than DKernel (same run) at 8K and 32K

T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def pattern_for(stride: int):
    return s2dsl.local_stride(block=BLOCK, local_blocks=WINDOW, vert_stride=stride, heads=HEADS,
                              name=f"local16_stride{stride}")


def parse_tuning(text: str):
    if not text:
        return []
    raw = json.loads(text)
    raw = raw if isinstance(raw, list) else [raw]
    out = []
    for t in raw:
        if not isinstance(t, dict):
            raise SystemExit(f"--tuning: each variant must be a JSON object, got {t!r}")
        if set(t) <= {"fwd", "bwd"}:
            out.append({"fwd": t.get("fwd") or {}, "bwd": t.get("bwd") or {}})
        else:
            out.append({"fwd": {}, "bwd": t})
    return out


def inputs(n: int, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return tuple(torch.randn(1, HEADS, n, DIM, device=DEVICE, generator=g).to(DTYPE) for _ in range(4))


def leaves(*ts):
    return tuple(t.detach().clone().requires_grad_() for t in ts)


def s2_autograd(q, k, v, do, pattern):
    """The user's path: s2dsl.attention, then out.backward(dout); grads land in .grad."""
    s2dsl.attention(q, k, v, pattern).backward(do)


def s2_direct(q, k, v, do, pattern, tuning):
    out, lse = forward(q, k, v, pattern, tuning=tuning["fwd"] or None)
    return backward(q, k, v, out, lse, do, pattern, tuning=tuning["bwd"] or None)


def reference_grads(q, k, v, do, pattern):
    """Autograd through the dense float32 reference (TF32 off)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        s2dsl.reference_attention(qf, kf, vf, pattern, dtype=torch.float32).backward(do.float())
        return qf.grad, kf.grad, vf.grad
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def rel(a, b) -> float:
    return ((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name: str, pattern, n: int, variants, tol: float = 3e-2):
    """Gradient errors of the autograd path and of every tuning variant; returns rows."""
    q, k, v, do = inputs(n)
    want = reference_grads(q, k, v, do, pattern)
    rows = []
    for label, tuning in [("attention()+backward", None)] + [(f"v{i}", t) for i, t in enumerate(variants, 1)]:
        try:
            if tuning is None:
                qg, kg, vg = leaves(q, k, v)
                s2_autograd(qg, kg, vg, do, pattern)
                got = (qg.grad, kg.grad, vg.grad)
            else:
                got = s2_direct(q, k, v, do, pattern, tuning)
            errs = [rel(g, w) for g, w in zip(got, want)]
            finite = all(torch.isfinite(g).all().item() for g in got)
            ok = finite and max(errs) < tol
            rows.append({"pattern": name, "seq": n, "variant": label, "tuning": tuning, "dq": errs[0],
                         "dk": errs[1], "dv": errs[2], "finite": finite, "ok": ok})
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile or fit is a result
            rows.append({"pattern": name, "seq": n, "variant": label, "tuning": tuning, "ok": False,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
    del q, k, v, do, want
    empty_cache()
    return rows


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bench(fn, grads=None) -> float:
    if DEVICE == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=300, grad_to_none=grads, return_mode="median")
    times = []  # CPU smoke run: a plain timer
    for _ in range(2):
        for g in grads or ():
            g.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def first_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def force_flex_backward_tiles(block: int) -> bool:
    """Let Flex's backward run over ``block``-token mask blocks.

    Inductor keeps only the backward configs whose tiles divide the mask's block size, and on
    sm90 at head dim 128 its one default config is 64 x 128 / 128 x 64: with 64-token blocks
    nothing is left ("NoValidChoicesError ... flex_attention_backward", torch 2.11). This adds
    the same config with every tile 64 (what inductor itself uses on sm90 below head dim 64).
    Patches ``InductorChoices.get_flex_attention_bwd_configs`` in this process only; returns
    whether the patch is in place."""
    import dataclasses
    try:
        from torch._inductor.choices import InductorChoices
    except ImportError:
        return False
    orig = InductorChoices.get_flex_attention_bwd_configs
    if getattr(orig, "_bench_train_patched", False):
        return True

    def patched(self, head_dim, dtype, *args, **kwargs):
        confs = list(orig(self, head_dim, dtype, *args, **kwargs))
        tiles = ("block_m1", "block_n1", "block_m2", "block_n2")
        if confs and not any(all(block % getattr(c, t) == 0 for t in tiles) for c in confs) \
                and dataclasses.is_dataclass(confs[0]):
            for stages in (3, 2):
                confs.append(dataclasses.replace(confs[0], block_m1=min(64, block), block_n1=min(64, block),
                                                 block_m2=min(64, block), block_n2=min(64, block),
                                                 num_stages=stages, num_warps=4))
        return confs

    patched._bench_train_patched = True
    InductorChoices.get_flex_attention_bwd_configs = patched
    return True


def flex_fn(stride: int, n: int, mask_block: int = BLOCK):
    """Compiled flex_attention and its block mask (compiled create_block_mask); the mask
    is bench_prefill.py's: DKernel local-stride, step = max(1, stride // heads) = 1. The
    forward's tiles are 64 x 64 (``fwd_`` options, so the backward keeps its own)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        qb, kb = q_idx // BLOCK, kv_idx // BLOCK
        return (q_idx >= kv_idx) & ((qb - kb < WINDOW) | ((kb + h) % stride == 0))

    t0 = time.perf_counter()
    mask = torch.compile(create_block_mask)(mask_mod, 1, HEADS, n, n, device=DEVICE, BLOCK_SIZE=mask_block)
    sync()
    plan_s = time.perf_counter() - t0
    compiled = torch.compile(flex_attention)
    options = {"fwd_BLOCK_M": BLOCK, "fwd_BLOCK_N": BLOCK}  # 64-token blocks need 64-row tiles in Flex too
    return (lambda q, k, v: compiled(q, k, v, block_mask=mask, kernel_options=options)), plan_s


def record_error(row: dict, key: str, exc: BaseException):
    row[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(f"  {row['pattern']} @ {row['seq']}: {key} failed: {row[f'{key}_error'][:160]}", flush=True)
    empty_cache()


def empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def time_row(stride: int, pattern, n: int, variants, args) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    row = {"pattern": f"local16/stride{stride}", "seq": n}
    q, k, v, do = inputs(n)
    qg, kg, vg = leaves(q, k, v)
    grads = [qg, kg, vg]

    # s2dsl first: it is what the run is for
    try:
        row["s2dsl_first_call_s"] = first_call(lambda: s2_autograd(qg, kg, vg, do, pattern))
        row["s2dsl_ms"] = bench(lambda: s2_autograd(qg, kg, vg, do, pattern), grads)
        with torch.no_grad():
            out, lse = forward(q, k, v, pattern)
            row["s2dsl_fwd_ms"] = bench(lambda: forward(q, k, v, pattern))
            row["s2dsl_bwd_ms"] = bench(lambda: backward(q, k, v, out, lse, do, pattern))
        for i, t in enumerate(variants, 1):
            key = f"s2dsl_v{i}"
            if not args.variant_ok.get((stride, i), True):
                row[f"{key}_error"] = "failed the gradient check; not timed"
                continue
            try:
                row[f"{key}_ms"] = bench(lambda: s2_direct(q, k, v, do, pattern, t))
            except Exception as exc:  # noqa: BLE001
                record_error(row, key, exc)
    except Exception as exc:  # noqa: BLE001
        record_error(row, "s2dsl", exc)

    # SDPA flash, causal (cheap: never skipped)
    def fa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
        o.backward(do)
    try:
        row["sdpa_flash_ms"] = bench(fa, grads)
    except Exception as exc:  # noqa: BLE001 - a baseline failing is a result too
        record_error(row, "sdpa_flash", exc)

    # DKernel, the same run: fwd+bwd through its autograd function, and its forward alone
    if DEVICE == "cuda" and not args.no_dkernel:
        try:
            dk = dkernel_baseline.local_stride(HEADS, n, block=BLOCK, local_blocks=WINDOW, vert_stride=stride)
            row["dkernel_ms"] = bench(lambda: dk(qg, kg, vg).backward(do), grads)
            with torch.no_grad():
                row["dkernel_fwd_ms"] = bench(lambda: dk(q, k, v))
        except Exception as exc:  # noqa: BLE001 - a baseline failing is a result too
            record_error(row, "dkernel", exc)

    if args.no_flex:
        row["flex_error"] = "skipped: --no-flex"
    return row  # the inputs are freed here; the caller empties the cache


def time_flex(row: dict, stride: int, pattern, n: int, args):
    """FlexAttention fwd+bwd for a row (after every s2dsl/SDPA row: its compiles are slow)."""
    if elapsed() > args.budget_s:
        row["flex_error"] = f"skipped: time budget ({args.budget_s:.0f} s) spent"
        return
    q, k, v, do = inputs(n)
    qg, kg, vg = leaves(q, k, v)
    # 64-token mask blocks (the pattern's own) with the backward's tiles forced to 64; if that
    # fails, Flex's default 128-token mask blocks (exact too: mask_mod cuts inside the blocks)
    row["flex_bwd_tiles_forced"] = force_flex_backward_tiles(BLOCK)
    for mask_block in (BLOCK, 128):
        if mask_block != BLOCK and elapsed() > args.budget_s:
            break
        try:
            fn, row["flex_plan_s"] = flex_fn(stride, n, mask_block)
            t0 = time.perf_counter()
            o = fn(qg, kg, vg)
            o.backward(do)
            sync()
            row["flex_first_call_s"] = time.perf_counter() - t0
            with torch.no_grad():  # the same pattern? s2dsl's output vs Flex's
                ref = forward(q, k, v, pattern)[0].float()
                row["flex_vs_s2dsl_rel"] = ((o.detach().float() - ref).norm() / ref.norm()).item()
            del o
            row["flex_ms"] = bench(lambda: fn(qg, kg, vg).backward(do), [qg, kg, vg])
            row["flex_mask_block"] = mask_block
            row.pop("flex_error", None)
            return
        except Exception as exc:  # noqa: BLE001 - a baseline failing is a result too
            record_error(row, "flex", exc)
            row[f"flex{mask_block}_error"] = row["flex_error"]


def f2(x) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if x >= 100 else f"{x:.2f}"


def seq_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def print_table(rows, variants):
    print(f"\n## forward+backward, {str(DTYPE)[6:]}, batch 1, {HEADS} heads, d {DIM}, ms "
          f"(median of {'do_bench' if DEVICE == 'cuda' else 'a plain timer'})\n")
    print("| pattern | seq | SDPA flash f+b | Flex f+b | s2dsl fwd | s2dsl bwd | s2dsl f+b | DKernel f+b "
          "| vs DKernel | vs FA2 | vs Flex |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ours = r.get("s2dsl_ms")
        fa, flex, dk = r.get("sdpa_flash_ms"), r.get("flex_ms"), r.get("dkernel_ms")
        print(f"| {r['pattern']} | {seq_label(r['seq'])} | {f2(fa) if fa else 'FAILED'} | "
              f"{(f2(flex) + ('' if r.get('flex_mask_block', BLOCK) == BLOCK else ' (128-blocks)')) if flex else ('skipped' if 'skipped' in r.get('flex_error', '') else 'FAILED')} | "
              f"{f2(r.get('s2dsl_fwd_ms'))} | {f2(r.get('s2dsl_bwd_ms'))} | {f2(ours) if ours else 'FAILED'} | "
              f"{f2(dk)} | {ratio(dk, ours)} | {ratio(fa, ours)} | {ratio(flex, ours)} |")
    if variants:
        print("\n| pattern | seq | default f+b | " + " | ".join(f"v{i}" for i in range(1, len(variants) + 1)) + " |")
        print("|---|---|---|" + "---|" * len(variants))
        for r in rows:
            cells = [f2(r.get(f"s2dsl_v{i}_ms")) if r.get(f"s2dsl_v{i}_ms") else "FAILED"
                     for i in range(1, len(variants) + 1)]
            print(f"| {r['pattern']} | {seq_label(r['seq'])} | {f2(r.get('s2dsl_ms'))} | " + " | ".join(cells) + " |")
        for i, t in enumerate(variants, 1):
            print(f"  v{i}: {json.dumps(t)}")
    errs = [(r["pattern"], r["seq"], k, v) for r in rows for k, v in r.items() if k.endswith("_error")]
    for p, n, k, v in errs:
        print(f"  note: {p} @ {n}: {k[:-6]}: {v[:200]}")
    met = []
    for r in rows:
        dk, ours = r.get("dkernel_ms"), r.get("s2dsl_ms")
        if dk and ours:
            met.append(f"{r['pattern']} @ {seq_label(r['seq'])}: {dk / ours:.2f}x DKernel "
                       f"({'met' if dk / ours >= TARGET else 'NOT met'})")
    if met:
        print(f"\ntarget (>= {TARGET}x DKernel fwd+bwd, same run): " + "; ".join(met))


def main():
    global DEVICE, DTYPE, HEADS, DIM
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--strides", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--check-seq", type=int, default=2048)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-dkernel", action="store_true")
    ap.add_argument("--tuning", type=str, default="", help="JSON: s2dsl tuning variant(s) to check and time")
    ap.add_argument("--budget-s", type=float, default=400.0,
                    help="after this many seconds, Flex (whose compiles are the slow part: its first compiled "
                         "create_block_mask took 137 s on an H100) is skipped for the rows not yet started")
    ap.add_argument("--json", type=str, default="")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a smoke run of this script under TRITON_INTERPRET=1 (float32; use tiny "
                         "--heads/--dim/--seqs/--check-seq); no timing worth reading")
    ap.add_argument("--heads", type=int, default=HEADS)
    ap.add_argument("--dim", type=int, default=DIM)
    args = ap.parse_args()
    DEVICE, HEADS, DIM = args.device, args.heads, args.dim
    if DEVICE == "cuda":
        assert torch.cuda.is_available(), "needs a CUDA device"
        name = torch.cuda.get_device_name()
    else:
        DTYPE, name = torch.float32, "cpu (smoke run)"
    variants = parse_tuning(args.tuning)
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}")
    result = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
              "shape": {"batch": 1, "heads": HEADS, "head_dim": DIM, "block": BLOCK, "window": WINDOW,
                        "dtype": str(DTYPE)[6:]},
              "variants": variants, "check": [], "rows": []}

    def save():
        if args.json:  # after every step, so a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(result, indent=1))

    print(f"\n## gradients vs float32 reference at {args.check_seq} tokens, bf16 (relative Frobenius error)\n")
    print("| pattern | variant | dq | dk | dv | finite | verdict |")
    print("|---|---|---|---|---|---|---|")
    args.variant_ok = {}
    for stride in args.strides:
        for c in check(f"local16/stride{stride}", pattern_for(stride), args.check_seq, variants):
            result["check"].append(c)
            if c["variant"] != "attention()+backward":
                args.variant_ok[(stride, int(c["variant"][1:]))] = c["ok"]
            if "error" in c:
                print(f"| {c['pattern']} | {c['variant']} | - | - | - | - | ERROR {c['error'][:100]} |")
            else:
                print(f"| {c['pattern']} | {c['variant']} | {c['dq']:.2e} | {c['dk']:.2e} | {c['dv']:.2e} | "
                      f"{'yes' if c['finite'] else 'NO'} | {'ok' if c['ok'] else 'FAIL'} |", flush=True)
    save()
    all_ok = all(c["ok"] for c in result["check"] if c["variant"] == "attention()+backward")
    bad_variants = sorted({c["variant"] for c in result["check"] if not c["ok"]} - {"attention()+backward"})

    for stride in args.strides:
        pattern = pattern_for(stride)
        for n in args.seqs:
            row = time_row(stride, pattern, n, variants, args)
            empty_cache()
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            save()
    if not args.no_flex:  # last: its compiles take minutes, and the numbers above are kept if cut short
        for row, (stride, n) in zip(result["rows"], [(s_, n_) for s_ in args.strides for n_ in args.seqs]):
            time_flex(row, stride, pattern_for(stride), n, args)
            empty_cache()
            print(json.dumps({k: v for k, v in row.items() if k.startswith(("pattern", "seq", "flex"))}), flush=True)
            save()
    result["total_s"] = elapsed()
    save()
    print_table(result["rows"], variants)
    print(f"\ngradient check (s2dsl.attention + backward): {'PASSED' if all_ok else 'FAILED'}"
          + (f"; tuning variants failing it (not timed): {', '.join(bad_variants)}" if bad_variants else "")
          + f"; total {elapsed():.0f} s")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
