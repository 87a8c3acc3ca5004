"""Hugging Face generation end to end: s2dsl's S2Cache (eager steps and the CUDA-graph step)
vs HF dense SDPA with its default cache and its static cache (eager and torch.compile'd).

One GPU run. The model is Llama-shaped with random weights (16 layers, hidden 2048, 32 q /
8 kv heads, head dim 64, intermediate 8192, vocab 32000), bf16; its s2dsl plan is
``benchmarks/llama_bench.s2`` (odd layers dense, even layers Phi-3-style local-stride).

1. Correctness at a small size: s2dsl's prefill logits against transformers' eager attention
   under the same per-layer masks, and the graph step's greedy tokens against eager steps.
2. Per point (prompt length x batch): prefill seconds (the prompt in chunks when the batch's
   activations would not fit), decode ms/token (median over steps, greedy), peak GPU memory
   and KV bytes, for
   * s2dsl: ``S2Cache`` + attn_implementation "s2dsl"; decode by eager model calls and by
     ``S2Cache.decode_graph`` (the step captured in a CUDA graph);
   * HF SDPA + DynamicCache (its default);
   * HF SDPA + StaticCache, eager and with ``torch.compile(mode="reduce-overhead")``.
3. HF's static cache, why slow: one layer's SDPA call as the static cache makes it (over the
   whole ``max_cache_len`` with a padding mask) vs over the valid keys without a mask, and
   ``generate(cache_implementation="static")`` vs the manual loop.
4. One layer's decode call (``cached_attention``: plan + write + attend) vs its kernel alone,
   at 32K and 128K, batch 8; the call replayed in a CUDA graph; and one plan shared by the 8
   sparse layers of a step.

    python benchmarks/bench_generate.py --out results/generate.json             # ~8 min on an H100
    python benchmarks/bench_generate.py --quick --out /tmp/quick.json           # ~1 min smoke run
    python benchmarks/bench_generate.py --points 32768x1 32768x8 --layer-contexts 32768 --out a.json
    python benchmarks/bench_generate.py --points 131072x1 131072x8 --compile-points --layer-contexts 131072 \
        --no-generate-probe --out b.json                                        # the two halves, < 9 min each
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

import s2dsl
from s2dsl.integrations import hf

HERE = os.path.dirname(os.path.abspath(__file__))
PLAN = os.path.join(HERE, "llama_bench.s2")
TINY_PLAN = """
pattern tiny_ls { block = 16 heads = 4 kv_heads = 2 causal heads 0..3 { window 2 stride 4 offset h // 2 } }
model tiny { layers = 2  every 2 from 1 -> dense  rest -> tiny_ls }
"""


# ----------------------------------------------------------------------------- helpers
def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0


def make_model(tiny: bool, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if tiny:
        cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 12)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                          max_position_embeddings=1 << 18, rope_theta=500000.0)
    model = LlamaForCausalLM(cfg).to(device, dtype).eval()
    model.set_attn_implementation("sdpa")
    return model


def plan_of(tiny: bool):
    return (s2dsl.parse(TINY_PLAN, "<tiny>"), "tiny") if tiny else (s2dsl.load(PLAN), "llama_bench")


def use(model, impl):
    model.set_attn_implementation(impl)
    return model


def chunk_for(prompt: int, batch: int, max_tokens: int) -> int:
    """Prompt tokens per forward: at most ``max_tokens`` tokens per forward, and, once chunked,
    a dense (batch, 1, chunk, prompt) boolean mask (HF SDPA's for a chunk) of at most 4 GiB."""
    if prompt * batch <= max_tokens:
        return prompt
    chunk = max(max_tokens // batch, 1024)
    while chunk > 1024 and batch * chunk * prompt > 2 ** 32:
        chunk //= 2
    return chunk


def prefill(model, ids, cache, chunk: int):
    # positions come from the cache's length (transformers 5.x dropped cache_position)
    logits = None
    for c in range(0, ids.shape[1], chunk):
        logits = model(ids[:, c:c + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1:].argmax(-1)


def decode(step, first, n: int):
    """Greedy steps; returns (per-step seconds, tokens)."""
    times, tokens, tok = [], [], first
    for _ in range(n):
        logits, dt = timed(lambda: step(tok))
        tok = logits[:, -1:].argmax(-1)
        times.append(dt)
        tokens.append(tok)
    return times, torch.cat(tokens, 1)


def ms(times, skip: int = 0) -> float:
    return 1e3 * statistics.median(times[skip:])


# ----------------------------------------------------------------------------- 1. correctness
def check(model, plan, name, device, tiny: bool):
    from transformers import DynamicCache
    hf.apply(model, plan, model_name=name)
    n = 200 if tiny else 1500
    ids = torch.randint(1, model.config.vocab_size, (2, n), device=device, generator=None)
    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    with torch.no_grad():
        # the masked eager reference in float32 and in the model's dtype: through 16 random layers
        # bf16 alone moves the logits by a few percent, so s2dsl is held to that noise, not to a
        # fixed tolerance
        dtype = model.dtype
        model.float()
        ref32 = use(model, hf.REFERENCE_IMPLEMENTATION)(ids, past_key_values=DynamicCache(config=model.config),
                                                        logits_to_keep=1).logits.float()
        model.to(dtype)
        ref = use(model, hf.REFERENCE_IMPLEMENTATION)(ids, past_key_values=DynamicCache(config=model.config),
                                                      logits_to_keep=1).logits.float()
        cache = hf.S2Cache(model, max_length=n + 16, batch_size=2)
        out = use(model, hf.ATTN_IMPLEMENTATION)(ids, past_key_values=cache, logits_to_keep=1).logits.float()
        err, noise = rel(out, ref32), rel(ref, ref32)
        assert err <= 2 * noise + 5e-3, (f"s2dsl prefill logits vs the float32 masked reference: relative error "
                                         f"{err:.4f}, while the reference in {dtype} is off by {noise:.4f}")
        first = out.argmax(-1)
        eager = hf.S2Cache(model, max_length=n + 16, batch_size=2)
        model(ids, past_key_values=eager, logits_to_keep=1)
        _, t_eager = decode(lambda t: model(t, past_key_values=eager, use_cache=True).logits, first, 8)
        step = cache.decode_graph(model, capture=device.type == "cuda")
        _, t_graph = decode(step, first, 8)
    assert torch.equal(t_eager, t_graph), "graph-step tokens differ from eager steps"
    model.set_attn_implementation("sdpa")
    return {"prefill_logits_rel_err_vs_fp32": err, "reference_rel_err_vs_fp32": noise, "graph_tokens_equal_eager": True}


# ----------------------------------------------------------------------------- 2. generation
def run_s2dsl(model, plan, name, ids, steps, chunk, graph: bool):
    """One prefill, then eager steps and (on the GPU) steps of the captured graph on the same cache."""
    hf.apply(model, plan, model_name=name)
    free()
    b, n = ids.shape
    with torch.no_grad():  # a first prefill at this length compiles Triton specialisations: time the second
        _, t_first = timed(lambda: prefill(model, ids, hf.S2Cache(model, max_length=n + 2 * steps + 8, batch_size=b),
                                           chunk))
        free()
    cache = hf.S2Cache(model, max_length=n + 2 * steps + 8, batch_size=b)
    with torch.no_grad():
        first, t_pre = timed(lambda: prefill(model, ids, cache, chunk))
        kv = cache.memory_bytes()
        dense_kv = cache.dense_bytes()
        times, tokens = decode(lambda t: model(t, past_key_values=cache, use_cache=True).logits, first, steps)
        rows = [dict(impl="s2dsl eager", prefill_s=t_pre, first_prefill_s=t_first, decode_ms=ms(times),
                     peak_gib=peak_gib(), kv_gib=kv / 2 ** 30, dense_kv_gib=dense_kv / 2 ** 30)]
        if graph:
            step = cache.decode_graph(model)
            g_times, _ = decode(step, tokens[:, -1:], steps + 2)
            rows.append(dict(impl="s2dsl graph", prefill_s=t_pre, decode_ms=ms(g_times, skip=2), peak_gib=peak_gib(),
                             kv_gib=kv / 2 ** 30, dense_kv_gib=dense_kv / 2 ** 30,
                             first_calls_ms=[1e3 * t for t in g_times[:2]]))
            step.graph.close()
    del cache
    model.set_attn_implementation("sdpa")
    return rows


def run_dynamic(model, ids, steps, chunk):
    from transformers import DynamicCache
    free()
    with torch.no_grad():  # warm, as for s2dsl
        prefill(model, ids, DynamicCache(config=model.config), chunk)
    free()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first, t_pre = timed(lambda: prefill(model, ids, cache, chunk))
        times, _ = decode(lambda t: model(t, past_key_values=cache, use_cache=True).logits, first, steps)
    kv = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 2
    row = dict(impl="hf sdpa dynamic", prefill_s=t_pre, decode_ms=ms(times), peak_gib=peak_gib(), kv_gib=kv / 2 ** 30)
    del cache
    return row


def run_static(model, ids, steps, chunk, compiled: bool):
    """One prefill into a StaticCache, eager steps, then (``compiled``) the forward under
    torch.compile(mode="reduce-overhead") on the same cache (its first 3 calls compile)."""
    from transformers import StaticCache
    free()
    b, n = ids.shape
    with torch.no_grad():  # warm, as for s2dsl
        prefill(model, ids, StaticCache(config=model.config, max_cache_len=n + 2 * steps + 16), chunk)
    free()
    cache = StaticCache(config=model.config, max_cache_len=n + 2 * steps + 16)
    with torch.no_grad():
        first, t_pre = timed(lambda: prefill(model, ids, cache, chunk))
        times, tokens = decode(lambda t: model(input_ids=t, past_key_values=cache, use_cache=True).logits,
                               first, steps)
        rows = [dict(impl="hf sdpa static", prefill_s=t_pre, decode_ms=ms(times), peak_gib=peak_gib())]
        if compiled:
            forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            c_times, _ = decode(lambda t: forward(input_ids=t, past_key_values=cache, use_cache=True).logits,
                                tokens[:, -1:], steps + 3)
            rows.append(dict(impl="hf sdpa static compiled", prefill_s=t_pre, decode_ms=ms(c_times, skip=3),
                             peak_gib=peak_gib(), compile_s=sum(c_times[:3])))
            del forward
            torch._dynamo.reset()
    del cache
    return rows


# ----------------------------------------------------------------------------- 3. static cache: HF or harness?
def static_attention_probe(batch: int, context: int, device):
    """One layer's SDPA call as HF's static cache makes it vs over the valid keys."""
    import triton
    max_len = context + 64
    q = torch.randn(batch, 32, 1, 64, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, 8, max_len, 64, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool, device=device)
    mask[..., :context] = True
    kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)

    def t(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    return {
        "sdpa_masked_full_len_gqa_ms": t(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                 enable_gqa=True)),
        "sdpa_masked_full_len_repeat_kv_ms": t(lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)),
        "sdpa_valid_keys_no_mask_ms": t(lambda: F.scaled_dot_product_attention(q, k[:, :, :context],
                                                                               v[:, :, :context], enable_gqa=True)),
    }


def generate_ms_per_token(model, ids, steps, cache_implementation):
    """ms/token of generate() itself: (time of 1 + steps tokens - time of 1 token) / steps."""
    free()
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    if cache_implementation:
        kw["cache_implementation"] = cache_implementation
    with torch.no_grad():
        _, t1 = timed(lambda: model.generate(ids, max_new_tokens=1, **kw))
        _, tn = timed(lambda: model.generate(ids, max_new_tokens=1 + steps, **kw))
    torch._dynamo.reset()
    return 1e3 * (tn - t1) / steps


# ----------------------------------------------------------------------------- 4. one layer's call
def layer_call_vs_kernel(pattern, context: int, batch: int = 8, calls: int = 200):
    import triton
    from s2dsl.runtime.decode import _module, _splits, cached_attention
    from s2dsl.runtime.graphs import DecodeGraph
    from s2dsl.runtime.kv_cache import PagedKVCache
    free()
    d, dev, dt = 64, torch.device("cuda"), torch.bfloat16
    per_seq = hf.pages_needed(pattern, context + 3 * calls + 64, 1) + pattern.kv_heads * (3 * calls // 64 + 2)
    caches = [PagedKVCache(pattern, num_pages=batch * per_seq, head_dim=d, dtype=dt, device=dev, max_seqs=batch)]
    for _ in range(7):  # the other sparse layers of a 16-layer step, sharing the page table
        caches.append(PagedKVCache(pattern, num_pages=batch * per_seq, head_dim=d, dtype=dt, device=dev,
                                   table=caches[0].table))
    ids = [caches[0].add_sequence() for _ in range(batch)]
    for s in ids:
        k = torch.randn(1, pattern.kv_heads, context - 1, d, device=dev, dtype=dt)
        for c in caches:
            c.append([s], k, k, only_needed=True)
        del k
    q = torch.randn(batch, pattern.heads, 1, d, device=dev, dtype=dt)
    k = torch.randn(batch, pattern.kv_heads, 1, d, device=dev, dtype=dt)

    def per_call(fn, n):
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return 1e3 * (time.perf_counter() - t) / n

    one = caches[0]
    solo = PagedKVCache(pattern, num_pages=batch * per_seq, head_dim=d, dtype=dt, device=dev, max_seqs=batch)
    solo_ids = [solo.add_sequence() for _ in range(batch)]
    for s in solo_ids:
        kk = torch.randn(1, pattern.kv_heads, context - 1, d, device=dev, dtype=dt)
        solo.append([s], kk, kk, only_needed=True)
        del kk
    call_ms = per_call(lambda: cached_attention(solo, solo_ids, q, k, k), calls)
    # the kernel alone, on a prepared batch
    batch_t = solo.batch(solo_ids)
    spec, module = _module(pattern, dt, d, 1, dev)
    n_splits = _splits(pattern, batch, 1, batch_t.max_len, 1, dev)
    out = torch.empty_like(q)
    lse = torch.empty(batch, pattern.heads, 1, dtype=torch.float32, device=dev)
    scale = 1 / math.sqrt(d)
    kernel_ms = triton.testing.do_bench(
        lambda: module.launch(q, out, lse, solo.k_pages, solo.v_pages, solo.block_tables, batch_t.slots,
                              batch_t.seq_lens, 1, n_splits, scale), warmup=25, rep=100, return_mode="median")
    # eight layers sharing one plan per step
    shared_ms = per_call(lambda: [cached_attention(c, ids, q, k, k) for c in caches], calls // 4) / len(caches)
    # the one-layer step captured in a CUDA graph
    graph = DecodeGraph(lambda: cached_attention(solo, solo_ids, q, k, k), [solo.table], [solo_ids],
                        max_length=solo.seq_len(solo_ids[0]) + 2 * calls + 8)
    graph()
    graph()
    graph_ms = per_call(graph, calls)
    graph.close()
    del caches, solo, one
    return dict(context=context, batch=batch, call_ms=call_ms, kernel_ms=kernel_ms,
                call_over_kernel=call_ms / kernel_ms, shared_plan_per_layer_ms=shared_ms,
                shared_over_kernel=shared_ms / kernel_ms, graph_call_ms=graph_ms, graph_over_kernel=graph_ms / kernel_ms)


# ----------------------------------------------------------------------------- main
def parse_point(text):
    n, b = text.lower().split("x")
    return int(n), int(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="+", default=["32768x1", "32768x8", "131072x1", "131072x8"],
                    help="prompt_len x batch")
    ap.add_argument("--compile-points", nargs="*", default=["32768x1", "32768x8"],
                    help="points where the static cache is also run under torch.compile (each compiles)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per implementation")
    ap.add_argument("--max-tokens", type=int, default=1 << 18, help="tokens per prefill forward (chunking)")
    ap.add_argument("--layer-contexts", nargs="*", type=int, default=[32768, 131072])
    ap.add_argument("--skip", nargs="*", default=[], help="implementations to skip: s2dsl dynamic static")
    ap.add_argument("--no-generate-probe", action="store_true",
                    help="skip timing generate() itself (dynamic and static cache) at the first point")
    ap.add_argument("--quick", action="store_true", help="small points, no compile (smoke run)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU with TRITON_INTERPRET=1)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.quick or args.tiny:
        args.points, args.compile_points, args.steps = ["4096x1", "4096x4"], [], 8
        args.layer_contexts = [8192] if not args.tiny else []
    if args.tiny:
        args.points = ["96x2"]
        args.steps = 3

    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = make_model(args.tiny, device, dtype)
    plan, name = plan_of(args.tiny)
    results = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
               "plan": PLAN if not args.tiny else "tiny", "points": [], "layer": []}
    import transformers
    results["transformers"] = transformers.__version__
    t0 = time.perf_counter()
    results["check"] = check(model, plan, name, device, args.tiny)
    print("check:", results["check"], flush=True)

    for point in args.points:
        n, b = parse_point(point)
        ids = torch.randint(1, model.config.vocab_size, (b, n), device=device)
        chunk = chunk_for(n, b, args.max_tokens)
        rows = []
        try:
            if "s2dsl" not in args.skip:
                rows += run_s2dsl(model, plan, name, ids, args.steps, chunk, graph=on_gpu)
            if "dynamic" not in args.skip:
                rows.append(run_dynamic(model, ids, args.steps, chunk))
            if "static" not in args.skip:
                rows += run_static(model, ids, args.steps, chunk, compiled=point in args.compile_points and on_gpu)
        except torch.cuda.OutOfMemoryError as exc:
            rows.append(dict(impl="(out of memory)", error=str(exc).split("\n")[0]))
        extra = {}
        if on_gpu and "static" not in args.skip:
            extra["static_probe"] = static_attention_probe(b, n, device)
        for r in rows:
            r.update(prompt=n, batch=b, chunk=chunk)
            print(json.dumps(r), flush=True)
        results["points"].append(dict(prompt=n, batch=b, rows=rows, **extra))
        if extra:
            print("static-cache SDPA probe:", json.dumps(extra["static_probe"]), flush=True)
        free()

    if on_gpu and args.points and "static" not in args.skip and not args.quick and not args.no_generate_probe:
        n, b = parse_point(args.points[0])
        ids = torch.randint(1, model.config.vocab_size, (b, n), device=device)
        results["generate_ms_per_token"] = {
            "dynamic": generate_ms_per_token(model, ids, args.steps, None),
            "static": generate_ms_per_token(model, ids, args.steps, "static"),
            "prompt": n, "batch": b}
        print("generate():", results["generate_ms_per_token"], flush=True)

    if on_gpu and not args.tiny:
        for context in args.layer_contexts:
            row = layer_call_vs_kernel(plan["phi3_local_stride"], context)
            results["layer"].append(row)
            print(json.dumps(row), flush=True)
    results["wall_s"] = time.perf_counter() - t0

    print("\n| prompt | batch | impl | prefill s | decode ms/token | peak GiB | KV GiB |")
    print("|---|---|---|---|---|---|---|")
    for p in results["points"]:
        for r in p["rows"]:
            if "error" in r:
                print(f"| {p['prompt']} | {p['batch']} | {r['impl']} | | | | |")
                continue
            kv = f"{r['kv_gib']:.2f}" if r.get("kv_gib") is not None else ""
            print(f"| {p['prompt']} | {p['batch']} | {r['impl']} | {r['prefill_s']:.2f} | {r['decode_ms']:.2f} | "
                  f"{r['peak_gib']:.1f} | {kv} |")
    if results["layer"]:
        print("\n| context | batch | call ms | kernel ms | call/kernel | shared plan ms/layer | graph call ms |")
        print("|---|---|---|---|---|---|---|")
        for r in results["layer"]:
            print(f"| {r['context']} | {r['batch']} | {r['call_ms']:.3f} | {r['kernel_ms']:.3f} | "
                  f"{r['call_over_kernel']:.2f} | {r['shared_plan_per_layer_ms']:.3f} | {r['graph_call_ms']:.3f} |")
    print(f"\nwall {results['wall_s']:.0f} s")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
