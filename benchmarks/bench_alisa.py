"""ALISA end to end: decode throughput with a GPU KV budget below the KV the batch needs.

One GPU run. A Llama-shaped model with random weights (8 layers, hidden 2048, 32 q / 8 kv
heads, head dim 64), bf16, every layer under ALISA's sparse window attention (SWA): a window
of recent blocks + a sink + the top-k blocks by the attention mass of the last steps, sized to
read ~20% of the final context's pages (80% KV sparsity).

1. Correctness: greedy tokens of S2Cache with a GPU budget + host tier equal those of the
   all-resident S2Cache (spilling is lossless); INT8's tokens agree with 16-bit's (share given).
2. Host link: pinned host -> device bandwidth and the other machine costs (``measure_machine``).
3. Per point (prompt x batch x new tokens): tokens/s of
   * s2dsl SWA, GPU pool = the budget, the rest on the host (16-bit and INT8);
   * HF SDPA + offloaded DynamicCache (``offloading=True``: transformers 5's OffloadedCache),
     and the offloaded StaticCache (OffloadedStaticCache) if it runs;
   * HF SDPA + DynamicCache all on the GPU (no budget: the upper bound where memory allows);
   with the dense KV / budget ratio, the pages moved and the phase the cost model chose.

The GPU budget per layer and (sequence, kv head) is the larger of the pages the prompt needs
(the tier cannot yet spill during a first prefill) plus one, and what one step reads (static
blocks plus the union of the group's top-k) plus two; decoding grows the KV to 2-4x that.

    python benchmarks/bench_alisa.py --out benchmarks/results/alisa.json            # ~6 min on an H100
    python benchmarks/bench_alisa.py --points 1024x8x2048 --out /tmp/a.json
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


def swa_plan(block: int, heads: int, kv_heads: int, layers: int, window: int, topk: int, recent: int = 16):
    text = (f"pattern swa {{ block = {block} heads = {heads} kv_heads = {kv_heads} causal "
            f"heads * {{ window {window} sink 1 topk {topk} recent {recent} }} }}\n"
            f"model bench {{ layers = {layers} rest -> swa }}")
    return s2dsl.parse(text, "<swa>")


def make_model(tiny: bool, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if tiny:
        cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 12)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                          max_position_embeddings=1 << 16, rope_theta=500000.0)
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def greedy(model, ids, cache, steps):
    """Prefill, then ``steps`` greedy one-token steps; returns (tokens, decode seconds)."""
    with torch.no_grad():
        tok = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        out = [tok]
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            out.append(tok)
        sync()
    return torch.cat(out, 1), time.perf_counter() - t


def budget_pages(pattern, prompt: int, batch: int) -> int:
    """Per layer and (sequence, kv head): the prompt's pages (a top-k kv head keeps them all), and at
    least what one step reads plus the page a step may open. A kv head reads the union of its q
    heads' selections: up to the sum of their K, beside the widest static part."""
    g = pattern.group_size
    reads = 0
    for kv in range(pattern.kv_heads):
        specs = pattern.head_specs[kv * g:(kv + 1) * g]
        static = max(s.window + s.sink for s in specs)
        reads = max(reads, static + sum(t.k for s in specs for t in s.topk))
    return batch * pattern.kv_heads * max(-(-prompt // pattern.block) + 1, reads + 2)


def run_s2dsl(model, plan, ids, steps, gpu_pages, host_pages, kv_dtype=None):
    hf.apply(model, plan, model_name="bench")
    model.set_attn_implementation(hf.ATTN_IMPLEMENTATION)
    free()
    b, n = ids.shape
    cache = hf.S2Cache(model, max_length=n + steps + 8, batch_size=b, gpu_pages=gpu_pages, host_pages=host_pages,
                       kv_dtype=kv_dtype)
    tokens, secs = greedy(model, ids, cache, steps)
    tier = cache.paged[0].table.tier
    report = cache.debug_report()
    row = dict(tokens_per_s=b * steps / secs, decode_s=secs, moved_up=tier.moved_up if tier else 0,
               moved_down=tier.moved_down if tier else 0, gpu_pool_pages=gpu_pages, report=report,
               gpu_kv_gib=sum(p.num_pages * p.page_bytes for p in cache.paged) / 2 ** 30)
    del cache
    model.set_attn_implementation("sdpa")
    return tokens, row


def run_hf(model, ids, steps, kind):
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
    tokens, secs = greedy(model, ids, cache, steps)
    del cache
    return tokens, dict(tokens_per_s=b * steps / secs, decode_s=secs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="*", default=["1024x8x2048", "512x16x1024"],
                    help="prompt x batch x new tokens")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run under TRITON_INTERPRET=1)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = args.tiny or device.type != "cuda"
    model = make_model(tiny, device, dtype)
    cfg = model.config
    heads, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    block = 16 if tiny else 64
    results = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", points=[])
    if device.type == "cuda":
        costs = tiering.measure_machine(device)
        results["machine"] = dict(h2d_gbps=costs.h2d_gbps, hbm_tbps=costs.hbm_tbps, matmul_tflops=costs.matmul_tflops)
        print(f"host link {costs.h2d_gbps:.1f} GB/s, HBM copy {costs.hbm_tbps:.2f} TB/s, "
              f"bf16 matmul {costs.matmul_tflops:.0f} TFLOP/s")

    # 1. correctness
    prompt, batch = (40, 2) if tiny else (512, 4)
    plan = swa_plan(block, heads, kvh, cfg.num_hidden_layers, window=1 if tiny else 4, topk=2)
    pattern = hf.layer_patterns(model, plan, model_name="bench")[0]
    # decode until each (sequence, kv head) holds two blocks more than the budget (which is at
    # least what one step reads: the static part and the union of its q heads' top-k)
    gpu = budget_pages(pattern, prompt, batch)
    steps = (gpu // (batch * kvh) + 2) * block - prompt
    final = prompt + steps
    ids = torch.randint(1, cfg.vocab_size, (batch, prompt), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    total = batch * kvh * -(-final // block)
    ref, _ = run_s2dsl(model, plan, ids, steps, total + batch * kvh, None)
    out, row = run_s2dsl(model, plan, ids, steps, gpu, total)
    assert torch.equal(out, ref), "tokens with the host tier differ from the all-resident cache"
    assert row["moved_down"] > 0, "the correctness run never exceeded the GPU budget"
    q8, _ = run_s2dsl(model, plan, ids, steps, gpu, total, torch.int8)
    agree = (q8 == ref).float().mean().item()
    results["correctness"] = dict(tiered_tokens_equal=True, int8_token_agreement=agree, moved=row["moved_down"])
    print(f"correctness: host tier lossless (moved {row['moved_down']} pages down, {row['moved_up']} up); "
          f"INT8 agrees on {agree:.1%} of greedy tokens")
    if tiny:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        return

    # 3. throughput
    hdr = f"{'point':>16} {'dense/budget':>12} {'impl':>28} {'tok/s':>9} {'moved up':>9}  phase"
    print(hdr)
    for spec in args.points:
        prompt, batch, steps = map(int, spec.split("x"))
        final = prompt + steps
        plan = swa_plan(block, heads, kvh, cfg.num_hidden_layers, window=4, topk=max(1, final // block // 5 - 5))
        pattern = hf.layer_patterns(model, plan, model_name="bench")[0]
        ids = torch.randint(1, cfg.vocab_size, (batch, prompt), device=device)
        gpu = budget_pages(pattern, prompt, batch)
        total = batch * kvh * -(-final // block)
        ratio = total / gpu
        point = dict(point=spec, dense_over_budget=ratio, rows=[])
        for name, kv in (("s2dsl swa + host tier", None), ("s2dsl swa + host tier int8", torch.int8)):
            try:
                _, row = run_s2dsl(model, plan, ids, steps, gpu, total, kv)
            except Exception as exc:  # report and go on: one failure must not lose the run
                row = dict(error=f"{type(exc).__name__}: {exc}")
            row["impl"] = name
            point["rows"].append(row)
        for kind in ("offloaded", "offloaded_static", "dense_gpu"):
            try:
                _, row = run_hf(model, ids, steps, kind)
            except Exception as exc:
                row = dict(error=f"{type(exc).__name__}: {exc}")
            row["impl"] = f"hf sdpa {kind}"
            point["rows"].append(row)
        for row in point["rows"]:
            phase = row.get("report", "").split("cost model")[-1][:80] if "report" in row else row.get("error", "")[:80]
            tps = f"{row['tokens_per_s']:9.1f}" if "tokens_per_s" in row else f"{'-':>9}"
            print(f"{spec:>16} {ratio:12.2f} {row['impl']:>28} {tps} {row.get('moved_up', ''):>9}  {phase}")
        results["points"].append(point)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
