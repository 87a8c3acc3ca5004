"""Hugging Face generation end to end: s2dsl's S2Cache (eager steps and the CUDA-graph step)
vs HF dense SDPA with its default cache and its static cache (eager and torch.compile'd).

One GPU run (about 6 minutes on an H100 by default; ``--budget-s``). The model is Llama-shaped
with random weights (16 layers, hidden 2048, 32 q / 8 kv heads, head dim 64, intermediate 8192,
vocab 32000), bf16; its s2dsl plan is ``benchmarks/llama_bench.s2`` (odd layers dense, even
layers Phi-3-style local-stride: a half-sparse plan).

1. Correctness at a small size: s2dsl's prefill logits against transformers' eager attention
   under the same per-layer masks (held to the bf16 reference's own error against float32), and
   the graph step's greedy tokens against eager steps.
2. Per point (prompt length x batch; default 32K and 128K, batch 1 and 8): prefill seconds
   (each implementation warmed once on a short prompt first, so Triton's JIT is not timed; the
   prompt in chunks when a forward's activations would not fit), decode ms/token (median over
   steps, greedy), peak GPU memory and KV bytes, for
   * s2dsl: ``S2Cache`` + attn_implementation "s2dsl"; decode by eager model calls and by
     ``S2Cache.decode_graph`` (the step captured in a CUDA graph);
   * HF SDPA + DynamicCache (its default);
   * HF SDPA + StaticCache, eager and with ``torch.compile(mode="reduce-overhead")`` (one
     compiled forward for the whole run; its compile seconds are reported, not timed per token).
   A point or implementation that cannot fit the GPU's free memory, or the time budget, by the
   estimates printed, is skipped and listed as skipped with the reason.
3. Where prefill time goes, one layer at the first point's prompt: the page plan and K/V
   scatter of 8 layers sharing a table, s2dsl's sparse prefill kernel, dense attention by SDPA
   (what dense layers run) and by s2dsl's dense-pattern kernel.
4. HF's static cache, why an earlier harness saw 424 ms/token: ``generate(cache_implementation=
   "static")`` compiles the forward itself (transformers' auto-compile for compileable caches)
   on its first decode step and again for every new cache size; timed over a few tokens that
   is compile time. Measured here: generate() cold (compiling), warm (same shapes again) and
   with ``disable_compile=True``; and one layer's SDPA call as the static cache makes it (over
   the whole ``max_cache_len`` with a padding mask) vs over the valid keys.
5. One layer's decode call (``cached_attention``: plan + write + attend) vs its kernel alone,
   at 32K and 128K, batch 8: the call alone, per layer when 8 layers share one plan per step,
   and the call replayed in a CUDA graph.
6. ``--profile PATH``: torch.profiler summaries of an eager decode step, a graph step and one
   layer's call at the first point (ops by host and device time, kernel launches, syncs and
   allocations per call). ``--graph-compile`` adds the row "s2dsl graph compiled":
   ``decode_graph(compile=True)``, the forward compiled by torch.compile inside the graph, and
   the row "s2dsl graph compiled tuned" (``tune_splits=True``: each layer's split count
   measured at the first step; its ``splits`` field gives policy vs tuned per pattern and
   shape; ``--no-tune-splits`` drops it).

The prompt is fed in chunks when it must be; the S2Cache is then sized for its chunks
(``prefill_chunk_size``: a chunk holds every block it writes until the next step evicts).

    PYTHONPATH=$PWD python benchmarks/bench_generate.py --out results/generate.json   # all of it, ~6 min
    python benchmarks/bench_generate.py --quick --out /tmp/quick.json          # ~1 min smoke run
    python benchmarks/bench_generate.py --points 32768x1 32768x8 --layer-contexts 32768 --out a.json
    TRITON_INTERPRET=1 python benchmarks/bench_generate.py --tiny              # CPU: every section, toy sizes
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F

import s2dsl
from s2dsl.integrations import hf

from common import make_model

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


def free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2 ** 30 if torch.cuda.is_available() else float("inf")


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


def bench_ms(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds: triton.testing.do_bench on the GPU, a few timed calls elsewhere (--tiny)."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        import triton
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    return ms([timed(fn)[1] for _ in range(3)])


def ms(times, skip: int = 0) -> float:
    return 1e3 * statistics.median(times[skip:])


# ----------------------------------------------------------------------------- estimates (what to skip)
class Budget:
    """What the run can still afford: GPU memory now, and seconds left of ``--budget-s``.
    The estimates are rough (H100-class throughput) and printed with every skip."""

    def __init__(self, seconds: float, on_gpu: bool):
        self.t0, self.seconds, self.on_gpu = time.perf_counter(), seconds, on_gpu
        self.skipped = []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def allow(self, what: str, est_s: float, est_gib: float) -> bool:
        if not self.on_gpu:
            return True
        reason = None
        if est_gib > 0.92 * free_gib():
            reason = f"needs ~{est_gib:.0f} GiB, {free_gib():.0f} GiB free"
        elif est_s > self.left():
            reason = f"needs ~{est_s:.0f} s, {max(self.left(), 0):.0f} s of the budget left"
        if reason:
            self.skipped.append(dict(what=what, reason=reason))
            print(f"skipped {what}: {reason}", flush=True)
            return False
        return True


def estimate(model, n: int, b: int, chunk: int, steps: int, sparse_share: float = 1.0):
    """(prefill + decode seconds, GiB) of one implementation at a point: attention FLOPs at
    ~350 TFLOP/s (``sparse_share``: the share of dense attention it computes), the rest of the
    model at ~400, dense KV read per step at ~2.5 TB/s, plus the KV cache and one chunk's
    activations (MLP intermediate, SDPA's chunk mask) in memory."""
    c = model.config
    layers, d = c.num_hidden_layers, c.head_dim if getattr(c, "head_dim", None) else c.hidden_size // c.num_attention_heads
    params = sum(p.numel() for p in model.parameters())
    attn = 2 * b * n * n * d * c.num_attention_heads * layers * sparse_share
    rest = 2 * b * n * params
    kv = 2 * layers * b * (n + 2 * steps + 64) * c.num_key_value_heads * d * 2
    seconds = attn / 350e12 + rest / 400e12 + steps * (kv / 2.5e12 + 0.03)
    act = b * chunk * (3 * c.intermediate_size + 6 * c.hidden_size) * 2 + (b * chunk * n if chunk < n else 0)
    return seconds, (kv + act) / 2 ** 30 + params * 2 / 2 ** 30


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
def warm(model, make_cache, ids, chunk: int, warm_tokens: int):
    """One short prefill (chunked like the real one when that is) and two decode steps: Triton
    and cuBLAS pick their kernels here, not in the timed run."""
    n = min(ids.shape[1], warm_tokens)
    w_chunk = n if chunk >= ids.shape[1] else max(n // 2, 16)
    with torch.no_grad():
        cache = make_cache(n + 8, w_chunk if w_chunk < n else 0)
        tok = prefill(model, ids[:, :n], cache, w_chunk)
        decode(lambda t: model(t, past_key_values=cache, use_cache=True).logits, tok, 2)
    del cache
    free()


def warm_prefill_kernels(model, n: int, chunk: int, d: int):
    """Launch s2dsl's prefill kernel once at every (queries, keys) length the timed prefill of
    ``n`` tokens in ``chunk``-token forwards launches, batch 1: the forward kernel is chosen per
    key length (short / long variants, runtime.kernels.choose_forward_for_gpu), so a warm-up on
    a short prompt leaves a long prompt's variant to compile inside the timed prefill (the 128K
    prefill of the last run, slower than HF's, likely paid that). Dense layers of a one-forward
    prefill run SDPA (nothing to compile); chunks after the first run the layer's own pattern."""
    patterns = {p.fingerprint(): p for p in model.s2dsl_patterns if chunk < n or not _dense(p)}
    q_len = min(chunk, n)
    dev, dt = model.device, model.dtype
    with torch.no_grad():
        for p in patterns.values():
            q = torch.randn(1, p.heads, q_len, d, device=dev, dtype=dt)
            for end in sorted(set(range(q_len, n + 1, q_len)) | {n}):
                kv = torch.randn(1, p.kv_heads, end, d, device=dev, dtype=dt)
                s2dsl.attention(q[:, :, -min(q_len, end):], kv, kv, p)
                del kv
            del q
    sync()
    free()


def _dense(pattern) -> bool:
    return pattern.causal and not pattern.prefix and all(h.dense for h in pattern.head_specs)


#: seconds a first decode_graph(compile=True) may take to compile (inductor, 16 layers; 15 s in
#: the first GPU probe); a later one of the same batch retraces and hits inductor's cache
GRAPH_COMPILE_S = 45.0


def run_s2dsl(model, plan, name, ids, steps, chunk, graph: bool, warm_tokens: int, graph_compile: bool = False,
              budget=None, fused_combine: bool = False, tune_splits: bool = True):
    """One prefill, then eager steps and (on the GPU) steps of the captured graph on the same cache
    (``graph_compile``: then steps of the graph of the forward compiled by torch.compile, if
    ``budget`` has the seconds left)."""
    hf.apply(model, plan, model_name=name)
    free()
    b, n = ids.shape
    # a chunk after the first holds every block it writes until the next step's plan evicts:
    # the pools are sized for it (the 128K x 8 run ran out of pages in the warm-up's second chunk)
    warm(model, lambda m, c: hf.S2Cache(model, max_length=m, batch_size=b, prefill_chunk_size=c), ids, chunk,
         warm_tokens)
    d = model.config.hidden_size // model.config.num_attention_heads
    warm_prefill_kernels(model, n, chunk, getattr(model.config, "head_dim", None) or d)
    cache = hf.S2Cache(model, max_length=n + 5 * steps + 32, batch_size=b, prefill_chunk_size=chunk if chunk < n else 0)
    with torch.no_grad():
        first, t_pre = timed(lambda: prefill(model, ids, cache, chunk))
        kv = cache.memory_bytes()
        dense_kv = cache.dense_bytes()
        times, tokens = decode(lambda t: model(t, past_key_values=cache, use_cache=True).logits, first, steps)
        rows = [dict(impl="s2dsl eager", prefill_s=t_pre, decode_ms=ms(times), peak_gib=peak_gib(),
                     kv_gib=kv / 2 ** 30, dense_kv_gib=dense_kv / 2 ** 30)]
        if graph:
            step = cache.decode_graph(model)
            g_times, _ = decode(step, tokens[:, -1:], steps + 2)
            rows.append(dict(impl="s2dsl graph", prefill_s=t_pre, decode_ms=ms(g_times, skip=2), peak_gib=peak_gib(),
                             kv_gib=kv / 2 ** 30, dense_kv_gib=dense_kv / 2 ** 30,
                             first_calls_ms=[1e3 * t for t in g_times[:2]]))
            step.graph.close()
        if graph and graph_compile and budget is not None and not budget.allow(
                f"s2dsl graph compiled at {n}x{b}", (10 if _GRAPH_COMPILED.get(b) else GRAPH_COMPILE_S) + steps * 0.05, 0):
            rows.append(dict(impl="s2dsl graph compiled (skipped)", reason=budget.skipped[-1]["reason"]))
        elif graph and graph_compile:
            try:
                step = cache.decode_graph(model, compile=True)
                c_times, _ = decode(step, tokens[:, -1:], steps + 4)
                _GRAPH_COMPILED[b] = True
                rows.append(dict(impl="s2dsl graph compiled", prefill_s=t_pre, decode_ms=ms(c_times, skip=4),
                                 peak_gib=peak_gib(), kv_gib=kv / 2 ** 30, dense_kv_gib=dense_kv / 2 ** 30,
                                 compile_s=sum(c_times[:4])))
                step.graph.close()
                if tune_splits and budget.allow(f"s2dsl graph compiled tuned at {n}x{b}",
                                                TUNE_ROW_S + steps * 0.05, 0):
                    try:
                        rows.append(_tuned_row(model, cache, tokens[:, -1:], steps, t_pre, kv, dense_kv))
                    except Exception as exc:  # reported as its own row; the rows after it still run
                        rows.append(dict(impl="s2dsl graph compiled tuned (failed)",
                                         error=f"{type(exc).__name__}: {exc}"[:500]))
                elif tune_splits:
                    rows.append(dict(impl="s2dsl graph compiled tuned (skipped)", reason=budget.skipped[-1]["reason"]))
                if fused_combine:  # the same, the decode kernel merging its splits in its last program
                    rows.append(_fused_combine_row(model, cache, tokens[:, -1:], steps, t_pre, kv, dense_kv))
            except Exception as exc:  # a compiler failure is a result to report, not the end of the run
                rows.append(dict(impl="s2dsl graph compiled (failed)", error=f"{type(exc).__name__}: {exc}"[:500]))
    del cache
    model.set_attn_implementation("sdpa")
    return rows


#: seconds the tuned compiled row may take besides its steps: a retrace that inductor's cache
#: serves (the same batch was just compiled), each layer's split timing, a few new kernel variants
TUNE_ROW_S = 20.0


def _tuned_row(model, cache, tok, steps, t_pre, kv, dense_kv):
    """``decode_graph(compile=True, tune_splits=True)`` steps on the same cache, right after the
    untuned compiled row: the split count of each layer's decode kernel measured at the first
    eager step, the fastest captured. Reports each pattern's policy and tuned split counts."""
    from s2dsl.runtime import decode as dec
    t0 = time.perf_counter()
    try:
        step = cache.decode_graph(model, compile=True, tune_splits=True)
        t_times, _ = decode(step, tok, steps + 4)
        step.graph.close()
    finally:
        chosen = {}
        for p in cache.paged:
            if p is None:
                continue
            for key, (policy, tuned) in dec.split_choices(p).items():
                chosen.setdefault(p.pattern.name, {})[str(key)] = {"policy": policy, "tuned": tuned}
            dec.enable_split_tuning(p, False)  # later rows on this cache use the policy again
    return dict(impl="s2dsl graph compiled tuned", prefill_s=t_pre, decode_ms=ms(t_times, skip=4),
                peak_gib=peak_gib(), kv_gib=kv / 2 ** 30, dense_kv_gib=dense_kv / 2 ** 30,
                first_calls_s=sum(t_times[:4]), setup_s=time.perf_counter() - t0, splits=chosen)


def _fused_combine_row(model, cache, tok, steps, t_pre, kv, dense_kv):
    """``decode_graph(compile=True)`` steps with the decode kernel's ``fused_combine`` variant
    (issue 14: the split-KV partials merged by the last program of each (sequence, kv head),
    no combine launch; it halved short batch-1 decode kernels in the variants sweep), on the
    same cache right after the default's row. The default is put back after."""
    from s2dsl.runtime import decode as dec
    saved = dict(dec.GPU_DECODE_LOOPS)

    def reset_kernels():
        dec._module.cache_clear()
        for p in cache.paged:
            p._decode_memo.clear()
    try:
        dec.GPU_DECODE_LOOPS.update(fused_combine=True)
        reset_kernels()
        step = cache.decode_graph(model, compile=True)
        f_times, _ = decode(step, tok, steps + 4)
        step.graph.close()
    finally:
        dec.GPU_DECODE_LOOPS.clear()
        dec.GPU_DECODE_LOOPS.update(saved)
        reset_kernels()
    return dict(impl="s2dsl graph compiled fused_combine", prefill_s=t_pre, decode_ms=ms(f_times, skip=4),
                peak_gib=peak_gib(), kv_gib=kv / 2 ** 30, dense_kv_gib=dense_kv / 2 ** 30)


# batch sizes whose compiled graph step inductor has compiled in this run: a later cache of the
# same batch gets the same layer handles, the same graph, and inductor's cache serves it
_GRAPH_COMPILED = {}


def run_dynamic(model, ids, steps, chunk, warm_tokens: int):
    from transformers import DynamicCache
    free()
    warm(model, lambda m, c: DynamicCache(config=model.config), ids, chunk, warm_tokens)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first, t_pre = timed(lambda: prefill(model, ids, cache, chunk))
        times, _ = decode(lambda t: model(t, past_key_values=cache, use_cache=True).logits, first, steps)
    kv = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 2
    row = dict(impl="hf sdpa dynamic", prefill_s=t_pre, decode_ms=ms(times), peak_gib=peak_gib(), kv_gib=kv / 2 ** 30)
    del cache
    return row


_COMPILED = {}


def run_static(model, ids, steps, chunk, compiled: bool, warm_tokens: int):
    """One prefill into a StaticCache, eager steps, then (``compiled``) the forward under
    torch.compile(mode="reduce-overhead", fullgraph=True) on the same cache. One compiled
    forward serves the whole run: its first calls at a new shape compile or record a graph
    (reported as compile_s), the median of the later ones is the figure."""
    from transformers import StaticCache
    free()
    b, n = ids.shape
    warm(model, lambda m, c: StaticCache(config=model.config, max_cache_len=m), ids, chunk, warm_tokens)
    cache = StaticCache(config=model.config, max_cache_len=n + 2 * steps + 16)
    with torch.no_grad():
        first, t_pre = timed(lambda: prefill(model, ids, cache, chunk))
        times, tokens = decode(lambda t: model(input_ids=t, past_key_values=cache, use_cache=True).logits,
                               first, steps)
        rows = [dict(impl="hf sdpa static", prefill_s=t_pre, decode_ms=ms(times), peak_gib=peak_gib())]
        if compiled:
            if "forward" not in _COMPILED:
                _COMPILED["forward"] = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            forward = _COMPILED["forward"]
            c_times, _ = decode(lambda t: forward(input_ids=t, past_key_values=cache, use_cache=True).logits,
                                tokens[:, -1:], steps + 3)
            rows.append(dict(impl="hf sdpa static compiled", prefill_s=t_pre, decode_ms=ms(c_times, skip=3),
                             peak_gib=peak_gib(), compile_s=sum(c_times[:3])))
    del cache
    return rows


# ----------------------------------------------------------------------------- 3. where prefill time goes
def prefill_parts(pattern, n: int, b: int, device, dtype, d: int = 64):
    """One layer at ``n`` tokens, batch ``b``: plan + scatter of 8 layers sharing a table (per
    layer), s2dsl's sparse prefill kernel, dense attention by SDPA and by s2dsl's kernel."""
    from s2dsl.runtime.kv_cache import PagedKVCache, dense_pattern
    free()
    dev, dt = device, dtype
    q = torch.randn(b, pattern.heads, n, d, device=dev, dtype=dt)
    k, v = (torch.randn(b, pattern.kv_heads, n, d, device=dev, dtype=dt) for _ in range(2))

    def t(fn):
        return bench_ms(fn, warmup=3, rep=20)

    pages = hf.pages_needed(pattern, n + 64, b, 64)

    dense = dense_pattern(pattern.heads, pattern.kv_heads, pattern.block)

    def plan_and_write(pat, token_kernel=True):
        # token_kernel=False: the index_copy_ write (two launches, every skipped row copied onto the
        # scratch page), the A/B reference of runtime.kv_write.write_kv_tokens
        pg = pages if pat is pattern else hf.pages_needed(pat, n + 64, b, 64)
        caches = [PagedKVCache(pat, num_pages=pg, head_dim=d, dtype=dt, device=dev, max_seqs=b)]
        caches += [PagedKVCache(pat, num_pages=pg, head_dim=d, dtype=dt, device=dev, table=caches[0].table)
                   for _ in range(7)]
        if not token_kernel:
            for c in caches:
                c._token_rows = 0
        ids = [caches[0].add_sequence() for _ in range(b)]
        sync()
        t0 = time.perf_counter()
        for c in caches:
            c.append(ids, kt, vt, only_needed=True)
        sync()
        ms = 1e3 * (time.perf_counter() - t0) / len(caches)
        return ms, caches[-1].gather(ids[-1])  # the last layer's K/V as its pages hold them

    # as HF hands them: (b, n, kv_heads, d) memory, transposed
    kt, vt = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    walls = {}
    for label, pat in (("", pattern), ("_dense", dense)):
        got = {}
        for tk in (True, False):
            got[tk] = plan_and_write(pat, tk)[1]
            walls[label + ("" if tk else "_index_copy")] = statistics.median(plan_and_write(pat, tk)[0]
                                                                             for _ in range(3))
        assert all(torch.equal(a, r) for a, r in zip(got[True], got[False])), \
            f"prefill write{label}: the token kernel's pages differ from index_copy_'s"
        del got
        free()
    row = dict(prompt=n, batch=b,
               plan_and_write_ms_per_layer=walls[""],
               plan_and_write_index_copy_ms_per_layer=walls["_index_copy"],
               dense_plan_and_write_ms_per_layer=walls["_dense"],
               dense_plan_and_write_index_copy_ms_per_layer=walls["_dense_index_copy"],
               s2dsl_sparse_kernel_ms=t(lambda: s2dsl.attention(q, k, v, pattern)),
               sdpa_dense_ms=t(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
               s2dsl_dense_kernel_ms=t(lambda: s2dsl.attention(q, k, v, dense)))
    del q, k, v
    free()
    return row


# ----------------------------------------------------------------------------- 4. static cache: HF or harness?
def static_attention_probe(batch: int, context: int, device):
    """One layer's SDPA call as HF's static cache makes it vs over the valid keys."""
    max_len = context + 64
    q = torch.randn(batch, 32, 1, 64, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, 8, max_len, 64, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool, device=device)
    mask[..., :context] = True
    t = bench_ms

    return {
        "sdpa_masked_full_len_gqa_ms": t(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                 enable_gqa=True)),
        "sdpa_valid_keys_no_mask_ms": t(lambda: F.scaled_dot_product_attention(q, k[:, :, :context],
                                                                               v[:, :, :context], enable_gqa=True)),
    }


def generate_probe(model, ids, steps):
    """ms/token of generate() itself, as (time of 1 + steps tokens - time of 1 token) / steps:
    the dynamic cache; the static cache with transformers' auto-compile (cold: the call that
    compiles; warm: the same call again) and with ``disable_compile=True``."""
    free()
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))

    def per_token(**extra):
        with torch.no_grad():
            _, t1 = timed(lambda: model.generate(ids, max_new_tokens=1, **kw, **extra))
            _, tn = timed(lambda: model.generate(ids, max_new_tokens=1 + steps, **kw, **extra))
        return 1e3 * (tn - t1) / steps

    out = {"prompt": ids.shape[1], "batch": ids.shape[0], "dynamic": per_token()}
    out["static_eager"] = per_token(cache_implementation="static", disable_compile=True)
    out["static_autocompile_cold"] = per_token(cache_implementation="static")
    out["static_autocompile_warm"] = per_token(cache_implementation="static")
    torch._dynamo.reset()
    _COMPILED.clear()
    return out


# ----------------------------------------------------------------------------- 5. one layer's call
def layer_call_vs_kernel(pattern, context: int, batch: int = 8, calls: int = 100, device=None, dtype=None,
                         d: int = 64):
    from s2dsl.runtime.decode import _module, _splits, cached_attention
    from s2dsl.runtime.graphs import DecodeGraph
    from s2dsl.runtime.kv_cache import PagedKVCache
    free()
    dev = device or torch.device("cuda")
    dt = dtype or torch.bfloat16
    per_seq = hf.pages_needed(pattern, context + 3 * calls + 64, 1) + pattern.kv_heads * (3 * calls // 64 + 2)

    def filled(table=None):
        c = PagedKVCache(pattern, num_pages=batch * per_seq, head_dim=d, dtype=dt, device=dev, max_seqs=batch,
                         table=table)
        return c

    caches = [filled()]
    caches += [filled(caches[0].table) for _ in range(7)]  # the other sparse layers of a step
    ids = [caches[0].add_sequence() for _ in range(batch)]
    solo = filled()
    for c in (caches[0], solo):  # tables as wide as the run needs: no copy while timing
        c.table.reserve(max_length=context + 3 * calls + 64)
    solo_ids = [solo.add_sequence() for _ in range(batch)]
    for s, s_solo in zip(ids, solo_ids):
        kk = torch.randn(1, pattern.kv_heads, context - 1, d, device=dev, dtype=dt)
        for c in caches:
            c.append([s], kk, kk, only_needed=True)
        solo.append([s_solo], kk, kk, only_needed=True)
        del kk
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

    call_ms = per_call(lambda: cached_attention(solo, solo_ids, q, k, k), calls)
    # the kernel alone, on a prepared batch
    batch_t = solo.batch(solo_ids)
    spec, module = _module(pattern, dt, d, 1, dev)
    n_splits = _splits(pattern, batch, 1, batch_t.max_len, 1, dev)
    out = torch.empty_like(q)
    lse = torch.empty(batch, pattern.heads, 1, dtype=torch.float32, device=dev)
    scale = 1 / math.sqrt(d)
    kernel_ms = bench_ms(
        lambda: module.launch(q, out, lse, solo.k_pages, solo.v_pages, solo.block_tables, batch_t.slots,
                              batch_t.seq_lens, 1, n_splits, scale), warmup=25, rep=100)
    # eight layers sharing one plan per step
    shared_ms = per_call(lambda: [cached_attention(c, ids, q, k, k) for c in caches], max(calls // 4, 1)) / len(caches)
    # the one-layer step captured in a CUDA graph
    graph = DecodeGraph(lambda: cached_attention(solo, solo_ids, q, k, k), [solo.table], [solo_ids],
                        max_length=solo.seq_len(solo_ids[0]) + 2 * calls + 8, capture=dev.type == "cuda")
    graph()
    graph()
    graph_ms = per_call(graph, calls)
    graph.close()
    del caches, solo
    return dict(context=context, batch=batch, call_ms=call_ms, kernel_ms=kernel_ms,
                call_over_kernel=call_ms / kernel_ms, shared_plan_per_layer_ms=shared_ms,
                shared_over_kernel=shared_ms / kernel_ms, graph_call_ms=graph_ms, graph_over_kernel=graph_ms / kernel_ms)


#: decode kernel variants the split sweep times beside the default (label -> DecodeSpecialization
#: fields): at batch 1 a dense layer's pages are read at ~2.4 TB/s (H200, 2026-12-07), and
#: the decode step's target (3x HF at 32K) is ~0.06 ms short, about what that layer's bandwidth leaves
SPLIT_SWEEP_VARIANTS = {
    "flat_pages2": {"flat": True, "pages_per_step": 2},
    "flat_pages4": {"flat": True, "pages_per_step": 4},
    "early_v": {"early_v": True},
    "stages2": {"num_stages": 2},
    "stages4": {"num_stages": 4},
    "warps2": {"num_warps": 2},
    "warps8": {"num_warps": 8},
    "fused_combine": {"fused_combine": True},
}


def split_sweep(pattern, context: int, batch: int, device, dtype, d: int = 64, splits=(8, 16, 32, 64, 128),
                variants: Optional[dict] = None):
    """The decode kernel (with its combine) of one layer at ``context`` tokens, batch ``batch``,
    for the pattern and the dense pattern, at each split count against the default's choice: is
    the split policy leaving bandwidth unused where a step is long (batch 1, few programs)?
    ``variants`` (label -> decode tuning): each also timed at every split count, its output
    checked against the default's first; ``{label}_ms_{splits}`` in the row, or ``{label}_error``."""
    from s2dsl.runtime.decode import _module, _splits, choose_decode, decode_module
    from s2dsl.runtime.kv_cache import PagedKVCache, dense_pattern
    free()
    rows = []
    for pat in (pattern, dense_pattern(pattern.heads, pattern.kv_heads, pattern.block)):
        cache = PagedKVCache(pat, num_pages=hf.pages_needed(pat, context + 64, batch, 64), head_dim=d, dtype=dtype,
                             device=device, max_seqs=batch)
        ids = [cache.add_sequence() for _ in range(batch)]
        kk = torch.randn(batch, pat.kv_heads, context, d, device=device, dtype=dtype)
        cache.append(ids, kk, kk, only_needed=True)
        del kk
        q = torch.randn(batch, pat.heads, 1, d, device=device, dtype=dtype)
        bt = cache.batch(ids)
        _, module = _module(pat, dtype, d, 1, device)
        out = torch.empty_like(q)
        lse = torch.empty(batch, pat.heads, 1, dtype=torch.float32, device=device)
        default = _splits(pat, batch, 1, bt.max_len, 1, device)
        row = dict(pattern=pat.name, context=context, batch=batch, default_splits=default,
                   kv_mb=cache.memory_bytes() / 2 ** 20)
        ref = None

        def sweep(mod, prefix):  # every split count, each checked against the default's first output
            nonlocal ref
            for n_splits in sorted(set(splits) | {default}):
                out.fill_(float("nan"))
                row[f"{prefix}ms_{n_splits}"] = bench_ms(
                    lambda: mod.launch(q, out, lse, cache.k_pages, cache.v_pages, cache.block_tables, bt.slots,
                                       bt.seq_lens, 1, n_splits, 1 / math.sqrt(d)), warmup=10, rep=50)
                if ref is None:
                    ref = out.float().clone()
                err = (out.float() - ref).abs().max().item()
                if not err < 2e-2:  # NaN (a row left unwritten) fails too
                    raise AssertionError(f"split sweep: {prefix}{n_splits} splits differ from the default's "
                                         f"{min(splits)} by {err}")
        sweep(module, "")  # the default failing is fatal
        for label, tuning in (variants or {}).items():
            try:
                sweep(decode_module(pat, choose_decode(pat, dtype, d, 1, device, tuning)), f"{label}_")
            except Exception as exc:  # a variant that fails to compile or check is recorded, not fatal
                row[f"{label}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        best = min((k for k in row if "ms_" in k and not k.startswith("default")), key=row.get)
        row["best"], row["default_ms"] = best, row[f"ms_{default}"]
        row["gb_per_s_default"] = cache.memory_bytes() / row["default_ms"] / 1e6
        rows.append(row)
        del cache, q, out
        free()
    return rows


# ----------------------------------------------------------------------------- 6. profiles (--profile)
_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
          "cudaMemcpyAsync", "cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaGraphLaunch")
_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def profile_summary(fn, reps: int, top: int = 25):
    """``fn`` run ``reps`` times under torch.profiler: wall ms per call, the ops by host (self CPU)
    and device time per call, and per call the CUDA runtime calls that sync or allocate and the
    kernel launches."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    fn()
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        wall = (time.perf_counter() - t0) / reps
    events = prof.key_averages()

    def row(e, attr):
        return dict(name=e.key, calls=e.count / reps, ms=getattr(e, attr, 0.0) / 1e3 / reps)

    host = sorted(events, key=lambda e: -getattr(e, "self_cpu_time_total", 0.0))[:top]
    dev = sorted(events, key=lambda e: -getattr(e, "self_device_time_total", 0.0))[:top]
    return dict(wall_ms=1e3 * wall,
                host_ops=[row(e, "self_cpu_time_total") for e in host],
                device_ops=[row(e, "self_device_time_total") for e in dev if getattr(e, "self_device_time_total", 0)],
                runtime_calls={e.key: e.count / reps for e in events if e.key in _SYNCS},
                kernel_launches=sum(e.count for e in events if e.key in _LAUNCHES) / reps,
                # kernels run on the device, a graph's replayed ones included (launches count host calls)
                kernels=sum(e.count for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")) / reps,
                aten_ops=sum(e.count for e in events if e.key.startswith("aten::")) / reps)


def profiles(model, plan, name, n: int, b: int, device, sparse, d: int, compiled: bool = False):
    """Where an eager decode step, a graph step (``compiled``: also the graph step of
    ``decode_graph(compile=True)``) and one layer's call spend their time."""
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.kv_cache import PagedKVCache
    hf.apply(model, plan, model_name=name)
    free()
    ids = torch.randint(1, model.config.vocab_size, (b, n), device=device)
    cache = hf.S2Cache(model, max_length=n + 64, batch_size=b)
    out = {"prompt": n, "batch": b}
    with torch.no_grad():
        tok = prefill(model, ids, cache, n)
        out["eager_step"] = profile_summary(lambda: model(tok, past_key_values=cache, use_cache=True), 4)
        if torch.cuda.is_available():
            step = cache.decode_graph(model)
            step(tok)
            out["graph_step"] = profile_summary(lambda: step(tok), 4)
            step.graph.close()
            if compiled:  # the forward compiled by inductor inside the graph
                step = cache.decode_graph(model, compile=True)
                for _ in range(4):  # compile, settle (three eager steps), capture
                    step(tok)
                out["graph_step_compiled"] = profile_summary(lambda: step(tok), 4)
                step.graph.close()
                _GRAPH_COMPILED[b] = True
    del cache
    model.set_attn_implementation("sdpa")
    free()
    # one layer's call alone (its own page table, evicting after the step), as in section 5
    pages = hf.pages_needed(sparse, n + 64, b, 0) + b * sparse.kv_heads * 4
    solo = PagedKVCache(sparse, num_pages=pages, head_dim=d, dtype=model.dtype, device=device, max_seqs=b)
    seqs = [solo.add_sequence() for _ in range(b)]
    kk = torch.randn(b, sparse.kv_heads, n - 1, d, device=device, dtype=model.dtype)
    solo.append(seqs, kk, kk, only_needed=True)
    del kk
    q = torch.randn(b, sparse.heads, 1, d, device=device, dtype=model.dtype)
    k = torch.randn(b, sparse.kv_heads, 1, d, device=device, dtype=model.dtype)
    out["layer_call"] = profile_summary(lambda: cached_attention(solo, seqs, q, k, k), 20)
    del solo
    free()
    return out


# ----------------------------------------------------------------------------- main
def parse_point(text):
    n, b = text.lower().split("x")
    return int(n), int(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="+", default=["32768x1", "32768x8", "131072x1", "131072x8"],
                    help="prompt_len x batch")
    ap.add_argument("--compile-points", nargs="*", default=None,
                    help="points where the static cache also runs under torch.compile (default: all)")
    ap.add_argument("--steps", type=int, default=12, help="decode steps timed per implementation")
    ap.add_argument("--max-tokens", type=int, default=1 << 18, help="tokens per prefill forward (chunking)")
    ap.add_argument("--warm-tokens", type=int, default=2048, help="prompt tokens of each implementation's warm-up")
    ap.add_argument("--layer-contexts", nargs="*", type=int, default=[32768, 131072])
    ap.add_argument("--skip", nargs="*", default=[], help="implementations to skip: s2dsl dynamic static")
    ap.add_argument("--no-generate-probe", action="store_true", help="skip timing generate() itself")
    ap.add_argument("--graph-compile", action="store_true",
                    help="also time S2Cache.decode_graph(compile=True): the forward compiled by torch.compile, "
                         "captured in the graph (its first call compiles it, the fourth captures; reported as compile_s)")
    ap.add_argument("--fused-combine", action="store_true",
                    help="with --graph-compile: also time the compiled graph step with the decode kernel's "
                         "fused_combine variant (row 's2dsl graph compiled fused_combine'), same cache")
    ap.add_argument("--no-tune-splits", action="store_true",
                    help="with --graph-compile: skip the row 's2dsl graph compiled tuned' (the compiled graph step "
                         "with decode_graph(tune_splits=True): split counts measured per layer, same cache)")
    ap.add_argument("--profile", default=None, metavar="PATH",
                    help="torch.profiler summaries (JSON) of an eager decode step, a graph step and one layer's "
                         "cached_attention call at the first point: ops by host and device time, syncs, kernels")
    ap.add_argument("--split-sweep", action="store_true",
                    help="at each point: one layer's decode kernel (+ combine) at split counts 8..128 against the "
                         "default choice, for the sparse and the dense pattern (a few seconds)")
    ap.add_argument("--split-variants", default=None, metavar="JSON",
                    help="with --split-sweep: decode variants timed beside the default, a JSON object label -> "
                         "tuning ('{}' for none; default: SPLIT_SWEEP_VARIANTS)")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="seconds the points may take; what would not fit is skipped (and listed)")
    ap.add_argument("--quick", action="store_true", help="small points (smoke run)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU with TRITON_INTERPRET=1)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.quick or args.tiny:
        args.points, args.steps = ["4096x1", "4096x4"], 8
        args.compile_points = ["4096x1"]
        args.layer_contexts = [8192] if not args.tiny else [80]
    if args.tiny:
        args.points, args.steps, args.warm_tokens = ["96x2"], 3, 32
    if args.compile_points is None:
        args.compile_points = list(args.points)

    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = make_model(args.tiny, device, dtype)
    plan, name = plan_of(args.tiny)
    import transformers
    results = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
               "transformers": transformers.__version__, "plan": PLAN if not args.tiny else "tiny", "points": [],
               "layer": [], "prefill_parts": []}

    def save():  # after every section: a run cut by a time limit keeps what it measured
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as fh:
                json.dump(results, fh, indent=1)
    t0 = time.perf_counter()
    results["check"] = check(model, plan, name, device, args.tiny)
    print("check:", results["check"], flush=True)
    budget = Budget(args.budget_s, on_gpu)
    sparse_share = 0.5 + 0.5 * 0.25  # dense layers + the sparse layers' ~1/8 stride and window, generously
    # the sparse pattern of the plan; --tiny runs every section below on the CPU at toy sizes
    sparse = plan["tiny_ls" if args.tiny else "phi3_local_stride"]
    d = 16 if args.tiny else 64
    # the profile first: it is short, and its kernel counts say where a step's time goes
    if args.profile and args.points:
        n, b = parse_point(args.points[0])
        est = estimate(model, n, b, n, 8)
        if budget.allow(f"profiles at {n}x{b}", est[0] + 20 + GRAPH_COMPILE_S * args.graph_compile, est[1]):
            prof = profiles(model, plan, name, n, b, device, sparse, d, compiled=args.graph_compile and on_gpu)
            with open(args.profile, "w") as fh:
                json.dump(prof, fh, indent=1)
            for what in ("eager_step", "graph_step", "graph_step_compiled", "layer_call"):
                if what in prof:
                    p = prof[what]
                    print(f"profile {what}: {p['wall_ms']:.3f} ms/call, {p['aten_ops']:.0f} aten ops, "
                          f"{p['kernel_launches']:.0f} kernel launches, {p.get('kernels', 0):.0f} kernels run, "
                          f"runtime calls {p['runtime_calls']}; top device ops "
                          + ", ".join(f"{r['name'][:40]} {r['ms']:.3f}" for r in p["device_ops"][:6]), flush=True)

    # the parts first: short, and what they isolate (the prefill write, the split policy) is what the
    # points' totals are then read against
    if args.split_sweep:
        results["split_sweep"] = []
        for point in args.points:
            n, b = parse_point(point)
            variants = SPLIT_SWEEP_VARIANTS if args.split_variants is None else json.loads(args.split_variants)
            if budget.allow(f"split sweep at {point}", 10 + 4 * len(variants), 0):
                for r in split_sweep(sparse, n, b, device, dtype, d, splits=(2, 4) if args.tiny else
                                     (8, 16, 32, 64, 128), variants=variants):
                    results["split_sweep"].append(r)
                    save()
                    print("split sweep:", json.dumps(r), flush=True)
    for point in args.points:  # each point's: the write and the kernels grow differently with length
        n, b = parse_point(point)
        if not budget.allow(f"prefill parts at {point}", 15 * max(n * b // 32768, 1) ** 0.5, 0):
            continue
        results["prefill_parts"].append(prefill_parts(sparse, n, b, device, dtype, d))
        save()
        print("prefill parts:", json.dumps(results["prefill_parts"][-1]), flush=True)
    for point in args.points:
        n, b = parse_point(point)
        ids = torch.randint(1, model.config.vocab_size, (b, n), device=device)
        chunk = chunk_for(n, b, args.max_tokens)
        rows = []
        for impl in ("s2dsl", "dynamic", "static"):
            if impl in args.skip:
                continue
            est_s, est_gib = estimate(model, n, b, chunk, args.steps, sparse_share if impl == "s2dsl" else 1.0)
            compiled = impl == "static" and point in args.compile_points and on_gpu
            # torch.compile: the first compile, and a recompile at every new cache size or batch
            est_s += compiled * (60 if "forward" not in _COMPILED else 40)
            est_s += 10 * (impl == "s2dsl")  # warm-ups and kernel compiles at a new length
            if not budget.allow(f"{impl} at {n}x{b}", est_s, est_gib):
                rows.append(dict(impl=f"{impl} (skipped)", reason=budget.skipped[-1]["reason"]))
                continue
            try:
                if impl == "s2dsl":
                    rows += run_s2dsl(model, plan, name, ids, args.steps, chunk, on_gpu, args.warm_tokens,
                                      args.graph_compile, budget, args.fused_combine, not args.no_tune_splits)
                elif impl == "dynamic":
                    rows.append(run_dynamic(model, ids, args.steps, chunk, args.warm_tokens))
                else:
                    rows += run_static(model, ids, args.steps, chunk, compiled, args.warm_tokens)
            except torch.cuda.OutOfMemoryError as exc:
                rows.append(dict(impl=f"{impl} (out of memory)", error=str(exc).split("\n")[0]))
                free()
        extra = {}
        if (on_gpu or args.tiny) and "static" not in args.skip and n * b <= 1 << 18:
            extra["static_probe"] = static_attention_probe(b, n, device)
        for r in rows:
            r.update(prompt=n, batch=b, chunk=chunk)
            print(json.dumps(r), flush=True)
        results["points"].append(dict(prompt=n, batch=b, rows=rows, **extra))
        save()
        if extra:
            print("static-cache SDPA probe:", json.dumps(extra["static_probe"]), flush=True)
        del ids
        free()

    if args.points and not args.no_generate_probe:
        # the question is HF or harness, not length: a 4K prompt keeps the probe's prefills short
        ids = torch.randint(1, model.config.vocab_size, (1, 64 if args.tiny else 4096), device=device)
        results["generate_ms_per_token"] = generate_probe(model, ids, 2 if args.tiny else args.steps)
        print("generate():", results["generate_ms_per_token"], flush=True)
    for context in args.layer_contexts:
        if not budget.allow(f"layer call at {context}", 20, 0):
            continue
        row = layer_call_vs_kernel(sparse, context, batch=2 if args.tiny else 8, calls=3 if args.tiny else 100,
                                   device=device, dtype=dtype, d=d)
        results["layer"].append(row)
        save()
        print(json.dumps(row), flush=True)
    results["skipped"] = budget.skipped
    results["wall_s"] = time.perf_counter() - t0
    report(results)
    save()


def report(results):
    print("\n| prompt | batch | impl | prefill s | decode ms/token | peak GiB | KV GiB |")
    print("|---|---|---|---|---|---|---|")
    for p in results["points"]:
        for r in p["rows"]:
            if "prefill_s" not in r:
                print(f"| {p['prompt']} | {p['batch']} | {r['impl']} | {r.get('reason', r.get('error', ''))} | | | |")
                continue
            kv = f"{r['kv_gib']:.2f}" if r.get("kv_gib") is not None else ""
            print(f"| {p['prompt']} | {p['batch']} | {r['impl']} | {r['prefill_s']:.2f} | {r['decode_ms']:.2f} | "
                  f"{r['peak_gib']:.1f} | {kv} |")
    for r in results["prefill_parts"]:
        print(f"\nprefill parts at {r['prompt']}x{r['batch']}, one layer: plan+write {r['plan_and_write_ms_per_layer']:.2f} "
              f"ms (index_copy_ {r['plan_and_write_index_copy_ms_per_layer']:.2f}; dense pattern "
              f"{r['dense_plan_and_write_ms_per_layer']:.2f}, index_copy_ {r['dense_plan_and_write_index_copy_ms_per_layer']:.2f}), "
              f"s2dsl sparse {r['s2dsl_sparse_kernel_ms']:.2f} ms, SDPA dense {r['sdpa_dense_ms']:.2f} ms, "
              f"s2dsl dense-pattern kernel {r['s2dsl_dense_kernel_ms']:.2f} ms")
    if results["layer"]:
        print("\n| context | batch | call ms | kernel ms | call/kernel | shared plan ms/layer | shared/kernel "
              "| graph call ms |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results["layer"]:
            print(f"| {r['context']} | {r['batch']} | {r['call_ms']:.3f} | {r['kernel_ms']:.3f} | "
                  f"{r['call_over_kernel']:.2f} | {r['shared_plan_per_layer_ms']:.3f} | {r['shared_over_kernel']:.2f} "
                  f"| {r['graph_call_ms']:.3f} |")
    if results.get("skipped"):
        print("\nskipped (estimates):")
        for s in results["skipped"]:
            print(f"  {s['what']}: {s['reason']}")
    print(f"\nwall {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
