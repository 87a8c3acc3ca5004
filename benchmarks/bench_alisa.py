"""ALISA end to end: decode throughput with a GPU KV budget below the KV the batch needs.

One GPU run, about 4 minutes on an H100. A Llama-shaped model with random weights (8 layers,
hidden 2048, 32 q / 8 kv heads, head dim 64), bf16, every layer under ALISA's sparse window
attention (SWA): a window of recent blocks + a sink + the top-k blocks by the attention mass of
the last steps, sized to read ~20% of the final context's pages (80% KV sparsity).

1. Correctness (prompt 128, batch 2, decoding until the KV is 2 blocks per kv head over the budget): greedy tokens
   of S2Cache with a GPU budget + host tier equal those of the all-resident S2Cache (spilling is
   lossless); with a host budget too small (phase 3: drop + recompute from the logged hidden
   states) the share of equal tokens and the largest difference of recomputed K/V from what the
   layer wrote (bf16: a product over other rows rounds differently); INT8's tokens agree with
   16-bit's (share) and its logits change by a measured amount (teacher-forced, all-resident).
2. Host link: pinned host -> device bandwidth and the other machine costs (``measure_machine``).
3. Per point (prompt x batch x new tokens): decode tokens/s, timed over the second half of the
   new tokens (where the KV exceeds the budget), of
   * s2dsl SWA, GPU pool = the budget, the rest on the host (16-bit and INT8);
   * s2dsl SWA, GPU pool = the budget, host = half the rest, the oldest dropped and recomputed
     (phase 3);
   * HF SDPA + offloaded DynamicCache (``offloading=True``: transformers 5's OffloadedCache),
     and the offloaded StaticCache (OffloadedStaticCache) if it runs;
   * HF SDPA + DynamicCache all on the GPU (no budget: the upper bound where memory allows);
   with the dense KV / budget ratio, the pages moved and the phase the cost model chose.

Budget (``budget_pages``), per layer and (sequence, kv head): every layer has its own page table
under a tier, so a step reads its own layer's pages only: the static blocks at the query (window +
sink) and the kv head's top-k selection (the group shares one list of k_max blocks), one page
more for slack; and at least the prompt's blocks plus one (a first prefill does not spill, and a
top-k kv head keeps every block). The default point (512 x 8 x 1024, window 2, sink 1, top-2)
reads 5 of 24 blocks at the end (79% sparsity), budget 9 pages: the dense KV is 2.7x the budget
(``--points 512x8x2048``: 8 of 40 blocks, 4.4x, about twice as long).

    python benchmarks/bench_alisa.py --out benchmarks/results/alisa.json
    python benchmarks/bench_alisa.py --points 512x8x2048 --out /tmp/a.json
    TRITON_INTERPRET=1 python benchmarks/bench_alisa.py --tiny --out /tmp/tiny.json  # CPU smoke run
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

import s2dsl
from s2dsl.integrations import hf
from s2dsl.runtime import tiering
from common import make_alisa_model as make_model


def swa_plan(block: int, heads: int, kv_heads: int, layers: int, window: int, topk: int, recent: int = 16):
    text = (f"pattern swa {{ block = {block} heads = {heads} kv_heads = {kv_heads} causal "
            f"heads * {{ window {window} sink 1 topk {topk} recent {recent} }} }}\n"
            f"model bench {{ layers = {layers} rest -> swa }}")
    return s2dsl.parse(text, "<swa>")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def greedy(model, ids, cache, steps, time_from: int = 0):
    """Prefill, then ``steps`` greedy one-token steps; returns (tokens, seconds of the steps from
    ``time_from`` on)."""
    with torch.no_grad():
        tok = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        out = [tok]
        for n in range(steps):
            if n == time_from:
                sync()
                t = time.perf_counter()
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            out.append(tok)
        sync()
    return torch.cat(out, 1), time.perf_counter() - t


def teacher_forced(model, ids, cache, prompt):
    """Logits of every step after the prompt, fed the given tokens."""
    with torch.no_grad():
        model(ids[:, :prompt], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return torch.cat([model(ids[:, n:n + 1], past_key_values=cache, use_cache=True).logits
                          for n in range(prompt, ids.shape[1])], 1).float()


def budget_pages(pattern, prompt: int, batch: int) -> int:
    """GPU pages per layer: per (sequence, kv head) what one step reads (static blocks at the
    query and the group's k_max selected blocks) plus one, and at least the prompt's blocks plus
    one (a top-k kv head keeps every block, and a first prefill does not spill)."""
    from s2dsl.codegen.lower import lower
    g = pattern.group_size
    static = max(max(s.window + s.sink for s in pattern.head_specs[kv * g:(kv + 1) * g])
                 for kv in range(pattern.kv_heads))
    reads = static + lower(pattern).max_topk
    return batch * pattern.kv_heads * max(-(-prompt // pattern.block) + 1, reads + 1)


def run_s2dsl(model, plan, ids, steps, gpu_pages, host_pages, kv_dtype=None, recompute=None, time_from=0):
    hf.apply(model, plan, model_name="bench")
    model.set_attn_implementation(hf.ATTN_IMPLEMENTATION)
    free()
    b, n = ids.shape
    cache = hf.S2Cache(model, max_length=n + steps + 8, batch_size=b, gpu_pages=gpu_pages, host_pages=host_pages,
                       kv_dtype=kv_dtype, recompute=recompute)
    tokens, secs = greedy(model, ids, cache, steps, time_from)
    tiers = [p.table.tier for p in cache.paged if p.table.tier is not None]
    report = cache.debug_report()
    row = dict(tokens_per_s=b * (steps - time_from) / secs, decode_s=secs,
               moved_up=sum(t.moved_up for t in tiers), moved_down=sum(t.moved_down for t in tiers),
               dropped=sum(t.dropped_pages for t in tiers), recomputed=sum(t.recomputed for t in tiers),
               gpu_pool_pages=gpu_pages, host_pages=host_pages, phase=report.split("cost model")[-1].strip(),
               gpu_kv_gib=sum(p.num_pages * p.page_bytes for p in cache.paged) / 2 ** 30)
    del cache
    model.set_attn_implementation("sdpa")
    return tokens, row


def run_hf(model, ids, steps, kind, time_from=0):
    from transformers import DynamicCache, StaticCache
    model.set_attn_implementation("sdpa")
    free()
    b, n = ids.shape
    if kind == "offloaded":
        cache = DynamicCache(config=model.config, offloading=True)
    elif kind == "offloaded_static":
        cache = StaticCache(config=model.config, max_cache_len=n + steps + 8, offloading=True)
    else:
        cache = DynamicCache(config=model.config)
    tokens, secs = greedy(model, ids, cache, steps, time_from)
    del cache
    return tokens, dict(tokens_per_s=b * (steps - time_from) / secs, decode_s=secs)


def recompute_error(model, plan, ids, prompt, device):
    """Largest |recomputed - written| K/V over every held page of an all-resident cache that logs
    hidden states (bf16 on the GPU), in units of the largest |K/V|."""
    hf.apply(model, plan, model_name="bench")
    model.set_attn_implementation(hf.ATTN_IMPLEMENTATION)
    b = ids.shape[0]
    pattern = hf.layer_patterns(model, plan, model_name="bench")[0]
    total = b * pattern.kv_heads * (-(-ids.shape[1] // pattern.block) + 1)
    cache = hf.S2Cache(model, max_length=ids.shape[1] + 8, batch_size=b, gpu_pages=total, host_pages=0,
                       recompute="hidden")
    with torch.no_grad():
        model(ids[:, :prompt], past_key_values=cache)
        for n in range(prompt, ids.shape[1]):
            model(ids[:, n:n + 1], past_key_values=cache)
    worst = 0.0
    for p in cache.paged:
        tables = p.table.tables
        slot, g, j = torch.nonzero(tables >= 0).unbind(1)
        k, v = p.table.tier._recompute[id(p)](slot.cpu(), g.cpu(), j.cpu())
        pages = tables[slot, g, j].long()
        pos = j.view(-1, 1) * pattern.block + torch.arange(pattern.block, device=j.device).view(1, -1)
        valid = (pos < ids.shape[1]).unsqueeze(-1)
        for got, pool in ((k, p.k_pages), (v, p.v_pages)):
            ref = pool[pages].float()
            err = torch.where(valid, (got.float() - ref).abs(), 0).max().item()
            worst = max(worst, err / max(ref.abs().max().item(), 1e-30))
    del cache
    model.set_attn_implementation("sdpa")
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="*", default=["512x8x1024"], help="prompt x batch x new tokens")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run under TRITON_INTERPRET=1)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = args.tiny or device.type != "cuda"
    t0 = time.perf_counter()
    model = make_model(tiny, device, dtype)
    cfg = model.config
    heads, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    block = 16 if tiny else 64
    results = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", points=[])

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    if device.type == "cuda":
        costs = tiering.measure_machine(device)
        results["machine"] = dict(h2d_gbps=costs.h2d_gbps, hbm_tbps=costs.hbm_tbps, matmul_tflops=costs.matmul_tflops)
        print(f"host link {costs.h2d_gbps:.1f} GB/s, HBM copy {costs.hbm_tbps:.2f} TB/s, "
              f"bf16 matmul {costs.matmul_tflops:.0f} TFLOP/s")

    # 1. correctness
    prompt, batch = (40, 2) if tiny else (128, 2)
    plan = swa_plan(block, heads, kvh, cfg.num_hidden_layers, window=1 if tiny else 2, topk=2)
    pattern = hf.layer_patterns(model, plan, model_name="bench")[0]
    gpu = budget_pages(pattern, prompt, batch)
    per = gpu // (batch * kvh)
    steps = (per + 2) * block - prompt  # decode until each (sequence, kv head) holds 2 blocks over the budget
    final = prompt + steps
    ids = torch.randint(1, cfg.vocab_size, (batch, prompt), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    total = batch * kvh * -(-final // block)
    ref, _ = run_s2dsl(model, plan, ids, steps, total + batch * kvh, None)
    out, row = run_s2dsl(model, plan, ids, steps, gpu, total)
    assert torch.equal(out, ref), "tokens with the host tier differ from the all-resident cache"
    assert row["moved_down"] > 0, "the correctness run never exceeded the GPU budget"
    dropped, drow = run_s2dsl(model, plan, ids, steps, gpu, 0, recompute="hidden")
    q8, _ = run_s2dsl(model, plan, ids, steps, gpu, total, torch.int8)
    full = torch.cat([ids, ref[:, 1:]], 1)
    rec_err = recompute_error(model, plan, full[:, :prompt + 64], prompt, device)
    hf.apply(model, plan, model_name="bench")
    model.set_attn_implementation(hf.ATTN_IMPLEMENTATION)
    exact = teacher_forced(model, full[:, :prompt + 64], hf.S2Cache(model, max_length=prompt + 72, batch_size=batch),
                           prompt)
    int8 = teacher_forced(model, full[:, :prompt + 64], hf.S2Cache(model, max_length=prompt + 72, batch_size=batch,
                                                                  kv_dtype=torch.int8), prompt)
    model.set_attn_implementation("sdpa")
    logit_err = ((int8 - exact).abs().max() / exact.std()).item()
    results["correctness"] = dict(
        tiered_tokens_equal=True, moved_down=row["moved_down"], moved_up=row["moved_up"],
        drop_tokens_equal_share=(dropped == ref).float().mean().item(), dropped=drow["dropped"],
        recomputed=drow["recomputed"], recompute_kv_max_rel_error=rec_err,
        int8_token_agreement=(q8 == ref).float().mean().item(), int8_logit_max_change_over_std=logit_err)
    c = results["correctness"]
    print(f"correctness: host tier lossless (moved {c['moved_down']} pages down, {c['moved_up']} up); drop + "
          f"recompute: {c['drop_tokens_equal_share']:.1%} tokens equal ({c['dropped']} pages dropped, "
          f"{c['recomputed']} recomputed), recomputed K/V max error {rec_err:.2e} of max |K/V|; INT8 agrees on "
          f"{c['int8_token_agreement']:.1%} of greedy tokens, logits change {logit_err:.2e} of their std "
          f"[{time.perf_counter() - t0:.0f} s]")
    save()
    if tiny:
        return

    # 3. throughput
    print(f"{'point':>14} {'dense/budget':>12} {'impl':>34} {'tok/s':>9} {'up':>7} {'dropped':>7}  phase")
    for spec in args.points:
        prompt, batch, steps = map(int, spec.split("x"))
        final = prompt + steps
        n_final = -(-final // block)
        window, sink = 2, 1
        topk = max(1, round(0.2 * n_final) - window - sink)
        plan = swa_plan(block, heads, kvh, cfg.num_hidden_layers, window=window, topk=topk)
        pattern = hf.layer_patterns(model, plan, model_name="bench")[0]
        ids = torch.randint(1, cfg.vocab_size, (batch, prompt), device=device)
        gpu = budget_pages(pattern, prompt, batch)
        total = batch * kvh * n_final
        ratio = total / gpu
        half = steps // 2
        point = dict(point=spec, dense_over_budget=ratio, read_share=(window + sink + topk) / n_final, rows=[])
        runs = [("s2dsl swa + host tier", dict(host_pages=total)),
                ("s2dsl swa + host tier int8", dict(host_pages=total, kv_dtype=torch.int8)),
                ("s2dsl swa + drop/recompute (phase 3)", dict(host_pages=(total - gpu) // 2, recompute="hidden"))]
        for name, kw in runs:
            try:
                _, row = run_s2dsl(model, plan, ids, steps, gpu, time_from=half, **kw)
            except Exception as exc:  # report and go on: one failure must not lose the run
                row = dict(error=f"{type(exc).__name__}: {exc}")
            row["impl"] = name
            point["rows"].append(row)
        for kind in ("offloaded", "offloaded_static", "dense_gpu"):
            try:
                _, row = run_hf(model, ids, steps, kind, time_from=half)
            except Exception as exc:
                row = dict(error=f"{type(exc).__name__}: {exc}")
            row["impl"] = f"hf sdpa {kind}"
            point["rows"].append(row)
        for row in point["rows"]:
            phase = row.get("phase", row.get("error", ""))[:90]
            tps = f"{row['tokens_per_s']:9.1f}" if "tokens_per_s" in row else f"{'-':>9}"
            print(f"{spec:>14} {ratio:12.2f} {row['impl']:>34} {tps} {row.get('moved_up', ''):>7} "
                  f"{row.get('dropped', ''):>7}  {phase}")
        results["points"].append(point)
        save()
        print(f"[{time.perf_counter() - t0:.0f} s]")
    save()


if __name__ == "__main__":
    main()
