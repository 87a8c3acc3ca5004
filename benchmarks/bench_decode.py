"""Decode: s2dsl's paged, pattern-specialised decode kernel vs SDPA dense decode and FlexAttention.

One GPU run. First a correctness check at a small size (bf16, a few generation steps through
the paged cache against the float32 reference). Then, per pattern and context length, batch
8, one query token per sequence, head dim 128, bf16:

* s2dsl: the cache is filled with the context (only the pages the pattern keeps), then the
  decode kernels are timed (median of triton.testing.do_bench) for each split count asked
  for, launched directly; the Python call ``paged_attention`` is timed too (its overhead
  shows where the kernels are shorter than the host work);
* SDPA: dense decode over contiguous (batch, heads, context, dim) K/V;
* FlexAttention: compiled flex_attention with a block mask of the same pattern for the
  query at the last position (its decode kernel), over the same dense K/V.

Bytes the pattern needs = kept pages x page bytes (K and V), from the cache; achieved
bandwidth = those bytes / time (dense: the whole K/V). KV memory: pages the cache holds vs
a dense cache, and the pattern's need from the analyzer's closed form.

    python benchmarks/bench_decode.py --seqs 32768 131072 --json decode.json
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import time

import torch
import torch.nn.functional as F
import triton

import s2dsl
from s2dsl.analysis import evaluate
from s2dsl.runtime.decode import _splits, cached_attention, choose_decode, decode_module, kept_blocks_for_query, \
    paged_attention
from s2dsl.runtime.kv_cache import PagedKVCache

BLOCK, WINDOW, HEADS, DIM, BATCH = 64, 16, 32, 128, 8
DTYPE = torch.bfloat16


def pattern_for(stride: int):
    return s2dsl.local_stride(block=BLOCK, local_blocks=WINDOW, vert_stride=stride, heads=HEADS,
                              name=f"local16_stride{stride}")


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def check(pattern, n: int = 3000, steps: int = 4, batch: int = 2) -> float:
    """A few steps of generation through the paged cache vs the float32 reference; worst relative error."""
    torch.manual_seed(0)
    schedule = [(n, None), (1, None), (1, 3), (3, None)] + [(1, 8)] * steps  # (new tokens, splits)
    total = sum(m for m, _ in schedule)
    q = torch.randn(batch, HEADS, total, DIM, device="cuda", dtype=DTYPE)
    k = torch.randn(batch, pattern.kv_heads, total, DIM, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    cache = PagedKVCache(pattern, num_pages=batch * pattern.kv_heads * (total // BLOCK + 2), head_dim=DIM,
                         dtype=DTYPE, device="cuda")
    ids = [cache.add_sequence() for _ in range(batch)]
    worst = 0.0
    pos = 0
    for n_new, splits in schedule:
        out = cached_attention(cache, ids, q[:, :, pos:pos + n_new], k[:, :, pos:pos + n_new],
                               v[:, :, pos:pos + n_new], n_splits=splits)
        ref = s2dsl.reference_attention(q[:, :, pos:pos + n_new].float(), k[:, :, :pos + n_new].float(),
                                        v[:, :, :pos + n_new].float(), pattern)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert math.isfinite(err) and err < 2e-2, f"{pattern.name} at {pos}+{n_new}: relative error {err}"
        worst = max(worst, err)
        pos += n_new
    return worst


def fill(pattern, context: int, batch: int = BATCH):
    """A cache holding ``context`` tokens of ``batch`` sequences: the first context-1 by a prefill that
    keeps only what the pattern needs, the last (the query's own) appended."""
    per_seq = sum(kept_blocks_for_query(pattern, g, context - 1, context - 1) + 1 for g in range(pattern.kv_heads))
    cache = PagedKVCache(pattern, num_pages=batch * per_seq, head_dim=DIM, dtype=DTYPE, device="cuda",
                         max_seqs=batch)
    ids = [cache.add_sequence() for _ in range(batch)]
    for s in ids:
        k = torch.randn(1, pattern.kv_heads, context - 1, DIM, device="cuda", dtype=DTYPE)
        v = torch.randn_like(k)
        cache.append([s], k, v, only_needed=True)
        del k, v
    cache.evict(ids)
    last = torch.randn(batch, pattern.kv_heads, 1, DIM, device="cuda", dtype=DTYPE)
    cache.append(ids, last, last)
    return cache, ids


def flex_decode(stride: int, context: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    q_pos = context - 1

    def mask_mod(b, h, q_idx, kv_idx):
        qb, kb = (q_idx + q_pos) // BLOCK, kv_idx // BLOCK
        return (q_idx + q_pos >= kv_idx) & ((qb - kb < WINDOW) | ((kb + h) % stride == 0))

    mask = create_block_mask(mask_mod, None, HEADS, 1, context, device="cuda", BLOCK_SIZE=BLOCK)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=mask)


def time_s2dsl(pattern, context: int, q, splits_list, row: dict) -> int:
    """Fill a cache, time the decode kernels and the API call, check the result; fills ``row``.
    Returns the bytes the pattern needs for the query."""
    cache, ids = fill(pattern, context)
    batch = cache.batch(ids)
    page_bytes = cache.page_bytes
    read_pages = BATCH * sum(kept_blocks_for_query(pattern, g, context - 1, context - 1)
                             for g in range(pattern.kv_heads))
    need_bytes = read_pages * page_bytes
    dense_bytes = BATCH * HEADS * context * DIM * 2 * 2
    report = s2dsl.analyze(pattern, head_dim=DIM, dtype_bytes=2)
    n_blocks = math.ceil(context / BLOCK)
    analyzer_bytes = BATCH * sum(evaluate(g.kv_bytes, N=n_blocks) for g in report.groups)
    row.update(pages_read=read_pages, bytes_needed=need_bytes, kv_cache_bytes=cache.memory_bytes(),
               kv_pool_bytes=cache.num_pages * page_bytes, kv_analyzer_bytes=int(analyzer_bytes),
               kv_dense_bytes=dense_bytes)
    auto = _splits(pattern, BATCH, 1, context, 1, q.device)
    # the kernels alone (launch with everything prepared), per split count ...
    module = decode_module(pattern, choose_decode(pattern, DTYPE, DIM, 1, q.device))
    out = torch.empty_like(q)
    lse = torch.empty(BATCH, HEADS, 1, dtype=torch.float32, device="cuda")
    scale = 1 / math.sqrt(DIM)
    times = {}
    for sp in [auto] + [s for s in splits_list if s != auto]:
        times[sp] = bench(lambda: module.launch(q, out, lse, cache.k_pages, cache.v_pages, cache.block_tables,
                                                batch.slots, batch.seq_lens, 1, sp, scale))
    best = min(times, key=times.get)
    # ... and the Python API call (its checks and launch overhead included)
    row["s2dsl_api_ms"] = bench(lambda: paged_attention(q, cache, batch))
    row.update(s2dsl_ms=times[auto], s2dsl_splits=auto, s2dsl_best_ms=times[best], s2dsl_best_splits=best,
               s2dsl_ms_by_splits={str(k): v for k, v in times.items()},
               s2dsl_tbps=need_bytes / (times[auto] * 1e-3) / 1e12,
               s2dsl_best_tbps=need_bytes / (times[best] * 1e-3) / 1e12)
    # correctness of this very call, against the float32 reference on the gathered kept K/V
    out = paged_attention(q, cache, batch, n_splits=best)
    k0, v0 = cache.gather(ids[0])
    ref = s2dsl.reference_attention(q[:1].float(), k0[None].float(), v0[None].float(), pattern)
    row["rel_err"] = ((out[:1].float() - ref).norm() / ref.norm()).item()
    return need_bytes


def run(stride: int, context: int, splits_list, with_flex: bool, with_sdpa: bool) -> dict:
    pattern = pattern_for(stride)
    row = {"pattern": pattern.name, "context": context, "batch": BATCH}
    torch.manual_seed(0)
    q = torch.randn(BATCH, HEADS, 1, DIM, device="cuda", dtype=DTYPE)
    need_bytes = time_s2dsl(pattern, context, q, splits_list, row)  # its cache is freed on return
    dense_bytes = row["kv_dense_bytes"]
    gc.collect()
    torch.cuda.empty_cache()
    if with_sdpa or with_flex:
        k = torch.randn(BATCH, HEADS, context, DIM, device="cuda", dtype=DTYPE)
        v = torch.randn_like(k)
        if with_sdpa:
            row["sdpa_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
            row["sdpa_tbps"] = dense_bytes / (row["sdpa_ms"] * 1e-3) / 1e12
        if with_flex:
            try:
                t0 = time.perf_counter()
                fn = flex_decode(stride, context)
                fn(q, k, v)
                torch.cuda.synchronize()
                row["flex_first_call_s"] = time.perf_counter() - t0
                row["flex_ms"] = bench(lambda: fn(q, k, v))
                row["flex_tbps"] = need_bytes / (row["flex_ms"] * 1e-3) / 1e12
            except Exception as exc:  # report, keep going
                row["flex_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        del k, v
        gc.collect()
        torch.cuda.empty_cache()
    return row


def table(rows) -> str:
    gib = 1 << 30
    out = ["| pattern | context | s2dsl ms (splits) | best ms (splits) | TB/s of needed bytes | API call ms | "
           "SDPA dense ms | SDPA TB/s | Flex ms | vs SDPA | KV cache GiB (pool) | dense KV GiB | analyzer GiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flex = f"{r['flex_ms']:.3f}" if "flex_ms" in r else ("error" if "flex_error" in r else "-")
        sdpa = f"{r['sdpa_ms']:.3f}" if "sdpa_ms" in r else "-"
        sdpa_bw = f"{r['sdpa_tbps']:.2f}" if "sdpa_tbps" in r else "-"
        speed = f"{r['sdpa_ms'] / r['s2dsl_best_ms']:.1f}x" if "sdpa_ms" in r else "-"
        out.append(f"| {r['pattern']} | {r['context'] // 1024}K | {r['s2dsl_ms']:.3f} ({r['s2dsl_splits']}) | "
                   f"{r['s2dsl_best_ms']:.3f} ({r['s2dsl_best_splits']}) | {r['s2dsl_best_tbps']:.2f} | "
                   f"{r['s2dsl_api_ms']:.3f} | {sdpa} | "
                   f"{sdpa_bw} | {flex} | {speed} | {r['kv_cache_bytes'] / gib:.2f} ({r['kv_pool_bytes'] / gib:.2f}) | "
                   f"{r['kv_dense_bytes'] / gib:.2f} | {r['kv_analyzer_bytes'] / gib:.2f} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768, 131072], help="context lengths")
    ap.add_argument("--strides", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4, 8, 16], help="split counts to time too")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "the benchmark needs a GPU"
    checks = {pattern_for(s).name: check(pattern_for(s)) for s in args.strides}
    print("correctness (relative error vs float32 reference, bf16, paged decode):",
          ", ".join(f"{k} {v:.2e}" for k, v in checks.items()))
    rows = []
    for stride in args.strides:
        for n in args.seqs:
            row = run(stride, n, args.splits, not args.no_flex, not args.no_sdpa)
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    print()
    print(f"decode, batch {BATCH}, {HEADS} heads, head dim {DIM}, bf16, {torch.cuda.get_device_name()}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "checks": checks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
