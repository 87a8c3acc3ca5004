"""Dynamic top-k speed: prefill vs dense SDPA and FlexAttention on the same block mask; decode vs dense.

One GPU run, every baseline in the same run:

1. correctness first: the bf16 forward against the float32 reference given the same selection
   (poisoned output), and one decode step against its replayed selection;
2. prefill (B=1, 32 q / 8 kv heads, d 128, block 64; ALISA-style ``window W sink 1 topk K``):
   s2dsl end to end (selection + kernel), the selection alone, the kernel alone given the
   selection; SDPA flash (dense causal); FlexAttention given a BlockMask built from *our*
   selection (static blocks + selected blocks per (head, query block), causal inside the
   diagonal block), so both kernels do the same work;
3. decode (batch 8, one query per sequence): s2dsl's paged decode step for the top-k pattern
   (kernel + running-score update + next selection), the same pattern's static part alone,
   and SDPA over the dense contiguous cache.

Prints a table and writes JSON to --out.

    python benchmarks/bench_topk.py --seqs 32768 131072 --out benchmarks/results/topk.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
import warnings

import torch
import triton

import s2dsl
from s2dsl.runtime.attention import forward
from s2dsl.runtime.topk import select_blocks

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 64


def alisa(window: int, k: int, recent: int = 16):
    return s2dsl.parse(f"pattern alisa_w{window}_k{k} {{ block = {BLOCK} heads = {HEADS} kv_heads = {KV_HEADS} "
                       f"heads * {{ window {window} sink 1 topk {k} recent {recent} }} }}")[f"alisa_w{window}_k{k}"]


def static_part(window: int):
    return s2dsl.parse(f"pattern window_w{window} {{ block = {BLOCK} heads = {HEADS} kv_heads = {KV_HEADS} "
                       f"heads * {{ window {window} sink 1 }} }}")[f"window_w{window}"]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_prefill(pattern, n: int = 4096 + 37) -> float:
    torch.manual_seed(0)
    q = torch.randn(1, HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, KV_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    sel = select_blocks(q, k, pattern)
    out = torch.full_like(q, float("nan"))
    out, _ = forward(q, k, v, pattern, selection=sel, out=out)
    err = rel(out, s2dsl.reference_attention(q, k, v, pattern, selection=sel))
    assert math.isfinite(err) and err < 2e-2, f"{pattern.name}: relative error {err}"
    return err


def flex_block_mask(pattern, sel, n: int):
    """FlexAttention's BlockMask for static ∪ selected blocks under the causal cut: a mask_mod
    reading our block-level mask (built from the selection), compiled into Flex's block tables."""
    from torch.nn.attention.flex_attention import create_block_mask

    nb = -(-n // BLOCK)
    keep = pattern.block_mask(nb, nb, 0, selection=sel.cpu())[0].to(sel.device)     # (heads, nb, nb)

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[h, q_idx // BLOCK, kv_idx // BLOCK] & (q_idx >= kv_idx)

    make = torch.compile(create_block_mask) if sel.is_cuda else create_block_mask
    return make(mask_mod, 1, pattern.heads, n, n, device=sel.device, BLOCK_SIZE=BLOCK)


def prefill_rows(pattern, n: int, no_flex: bool) -> dict:
    torch.manual_seed(1)
    q = torch.randn(1, HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, KV_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    sel = select_blocks(q, k, pattern)
    kept = int(pattern.block_mask(-(-n // BLOCK), selection=sel.cpu()).sum()) if n <= 32768 else None
    row = {"pattern": pattern.name, "seq": n}
    row["s2dsl_total_ms"] = bench(lambda: forward(q, k, v, pattern))
    row["s2dsl_select_ms"] = bench(lambda: select_blocks(q, k, pattern))
    row["s2dsl_kernel_ms"] = bench(lambda: forward(q, k, v, pattern, selection=sel))
    if kept is not None:
        row["kept_block_fraction"] = kept / (HEADS * (-(-n // BLOCK)) * (-(-n // BLOCK) + 1) / 2)
    kr, vr = (t.repeat_interleave(HEADS // KV_HEADS, 1) for t in (k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        row["sdpa_flash_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr,
                                                                                              is_causal=True))
    if not no_flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            t0 = time.perf_counter()
            mask = flex_block_mask(pattern, sel, n)
            torch.cuda.synchronize()
            row["flex_mask_from_selection_s"] = time.perf_counter() - t0
            compiled = torch.compile(flex_attention)
            options = {"BLOCK_M": BLOCK, "BLOCK_N": BLOCK}
            fn = lambda: compiled(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=options)  # noqa: E731
            if n <= 32768:
                ref = forward(q, k, v, pattern, selection=sel)[0]
                row["flex_rel_err_vs_s2dsl"] = rel(fn(), ref)
            row["flex_same_mask_ms"] = bench(fn)
        except Exception as exc:  # noqa: BLE001 - a baseline failing is a result too
            row["flex_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def decode_rows(pattern, static, n: int, batch: int) -> dict:
    """One decode step (one query per sequence) at context n, after filling the cache directly."""
    from s2dsl.runtime.decode import paged_attention
    from s2dsl.runtime.kv_cache import PagedKVCache
    from s2dsl.runtime.topk_state import state_for

    torch.manual_seed(2)
    row = {"pattern": pattern.name, "seq": n, "batch": batch}
    k = torch.randn(batch, KV_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16)
    pages = batch * KV_HEADS * (-(-n // BLOCK) + 1)
    for name, pat in (("s2dsl_topk", pattern), ("s2dsl_static_part", static)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cache = PagedKVCache(pat, num_pages=pages, head_dim=DIM, dtype=torch.bfloat16, device="cuda",
                                 max_seqs=batch)
        ids = [cache.add_sequence() for _ in range(batch)]
        cache.append(ids, k, v)
        cache.evict(ids)
        state = state_for(cache)
        if state is not None:  # a selection from random scores, as after a few steps
            slots = cache.batch(ids).slots
            state.record(slots, torch.rand(batch, KV_HEADS, -(-n // BLOCK), device="cuda"))
            state.select(slots, cache.batch(ids).seq_lens)
            # check one step against the reference replaying its selection (first sequence)
            before = state.selection[slots[:1].long()].clone()
            out = paged_attention(q, cache, ids)
            sel = torch.full((1, HEADS, 1, before.shape[-1]), -1, dtype=torch.int32, device="cuda")
            sel[0, :, 0] = before[0].repeat_interleave(HEADS // KV_HEADS, 0)
            ref = s2dsl.reference_attention(q[:1, :, :, :], k[:1], v[:1], pattern, selection=sel)
            row["decode_rel_err"] = rel(out[:1], ref)
            assert row["decode_rel_err"] < 2e-2, row
        batch_info = cache.batch(ids)
        row[f"{name}_ms"] = bench(lambda: paged_attention(q, cache, batch_info))
        if state is not None:  # the decode kernel alone (no running-score update, no next selection)
            try:
                from s2dsl.runtime import decode as dec
                spec, module = dec._module(pat, q.dtype, DIM, 1, q.device)
                splits = dec._splits(pat, batch, 1, batch_info.max_len, 1, q.device)
                out = torch.empty_like(q)
                lse = torch.empty(batch, HEADS, 1, device="cuda")
                extra = state.kernel_args(batch, HEADS)
                row[f"{name}_kernel_ms"] = bench(lambda: module.launch(
                    q, out, lse, cache.k_pages, cache.v_pages, cache.block_tables, batch_info.slots,
                    batch_info.seq_lens, 1, splits, DIM ** -0.5, **extra))
            except Exception as exc:  # noqa: BLE001 - internal entry points may move; the step time stands
                row[f"{name}_kernel_error"] = f"{type(exc).__name__}: {exc}"[:300]
        del cache
        torch.cuda.empty_cache()
    kr, vr = (t.repeat_interleave(HEADS // KV_HEADS, 1) for t in (k, v))
    row["sdpa_dense_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr))
    row["dense_kv_bytes"] = 2 * k.numel() * k.element_size()
    # bytes the top-k step needs: per (sequence, kv head) its window, sink and K selected pages
    spec = pattern.head_specs[0]
    needed_blocks = min(-(-n // BLOCK), spec.window + spec.sink + spec.topk[0].k)
    row["topk_needed_bytes"] = 2 * batch * KV_HEADS * needed_blocks * BLOCK * DIM * k.element_size()
    row["s2dsl_topk_GBps_needed"] = row["topk_needed_bytes"] / row["s2dsl_topk_ms"] / 1e6
    if "s2dsl_topk_kernel_ms" in row:
        row["s2dsl_topk_kernel_GBps_needed"] = row["topk_needed_bytes"] / row["s2dsl_topk_kernel_ms"] / 1e6
    row["sdpa_dense_GBps"] = row["dense_kv_bytes"] / row["sdpa_dense_ms"] / 1e6
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--out", type=str, default="")
    args = ap.parse_args()
    pattern, static = alisa(args.window, args.topk), static_part(args.window)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"check {pattern.name}: bf16 relative error {check_prefill(pattern):.2e}")
    result = {"device": torch.cuda.get_device_name(), "pattern": pattern.to_source(), "prefill": [], "decode": []}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    for n in args.seqs:
        row = prefill_rows(pattern, n, args.no_flex)
        result["prefill"].append(row)
        print(json.dumps(row), flush=True)
        save()
        torch.cuda.empty_cache()
    if not args.no_decode:
        for n in args.seqs:
            row = decode_rows(pattern, static, n, args.batch)
            result["decode"].append(row)
            print(json.dumps(row), flush=True)
            save()
            torch.cuda.empty_cache()
    print("\n| seq | s2dsl total | select | kernel | SDPA flash | Flex same mask |")
    print("|---|---|---|---|---|---|")
    for r in result["prefill"]:
        print(f"| {r['seq']} | {r['s2dsl_total_ms']:.2f} | {r['s2dsl_select_ms']:.2f} | {r['s2dsl_kernel_ms']:.2f} "
              f"| {r['sdpa_flash_ms']:.2f} | {r.get('flex_same_mask_ms', float('nan')):.2f} |")
    if result["decode"]:
        print("\n| seq | batch | s2dsl topk step | static part | SDPA dense |")
        print("|---|---|---|---|---|")
        for r in result["decode"]:
            print(f"| {r['seq']} | {r['batch']} | {r['s2dsl_topk_ms']:.3f} | {r.get('s2dsl_topk_kernel_ms', float('nan')):.3f} "
                  f"| {r['s2dsl_static_part_ms']:.3f} "
                  f"| {r['sdpa_dense_ms']:.3f} |")
    save()


if __name__ == "__main__":
    main()
