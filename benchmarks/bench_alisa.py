"""ALISA end to end: decode throughput with a GPU KV budget below the KV the batch needs.

One GPU run, about 3-4 minutes (``--budget-s``, default 230, skips the remaining s2dsl runs,
each recorded as skipped, once the run has taken that long). A Llama-shaped model with
random weights (8 layers, hidden 2048, 32 q / 8 kv heads, head dim 64), bf16, every layer under
ALISA's sparse window attention (SWA): a window of recent blocks + a sink + the top-k blocks by
the attention mass of the last steps, sized to read ~20% of the final context's pages (80% KV
sparsity).

1. Correctness (prompt 128, batch 2, decoding until the KV is 2 blocks per kv head over the
   budget): greedy tokens of S2Cache with a GPU budget + host tier equal those of the
   all-resident S2Cache (spilling is lossless), eagerly and through ``decode_graph`` (CUDA
   graph steps, the tier working in the host part before each); with a host budget too small
   (phase 3: drop + recompute from the logged hidden states) the share of equal tokens and the
   largest difference of recomputed K/V from what the layer wrote (bf16: a product over other
   rows rounds differently); INT8's tokens agree with 16-bit's (share) and its logits change by
   a measured amount (teacher-forced, all-resident). Random weights keep SWA's selection still,
   so nothing comes back up under SWA: the "moving" pattern (``window 2 sink 1 stride S
   relative``: every S-th block beyond the window, a residue that shifts by one at every block
   crossing) reads again, at the next crossings, the blocks it left behind, so pages really
   move up (host tier) or are recomputed (phase 3); its tokens are checked against its
   all-resident run too.
2. Host link: pinned host -> device bandwidth and the other machine costs (``measure_machine``).
3. Per point (prompt x batch x new tokens): decode tokens/s, timed over the second half of the
   new tokens (where the KV exceeds the budget), of
   * s2dsl SWA all on the GPU (no budget), eager and in a CUDA graph: what tiering costs;
   * s2dsl SWA, GPU pool = the budget, the rest on the host (16-bit and INT8), eager
     (``generate()``'s path) and in a CUDA graph (``S2Cache.decode_graph``);
   * s2dsl SWA with ``gpu_pages="auto"`` (graph, every point): the library's GPU/host split under a
     forced GPU budget (``free_memory`` = it, no headroom): the bytes of the rows above's pools
     (the two splits timed at one budget) and each ``--gpu-budget-gib``; the host's share chosen
     from the host's memory; the split (phase, pages per layer, budgets) is in the row's ``split``;
   * s2dsl SWA, GPU pool = the budget, host = half the rest, the oldest dropped and recomputed
     (phase 3), in a CUDA graph (phase 3's eager path is checked in part 1);
   * the moving pattern, all on the GPU / host tier / phase 3 (graph): pages moved up and
     recomputed per step and what they cost against its all-resident run; the host tier again
     with ``HostTier.graph_overlap`` off (every copy up before the replay instead of each layer
     waiting for its own inside it);
   * HF SDPA + offloaded DynamicCache (``offloading=True``: transformers 5's OffloadedCache),
     and the offloaded StaticCache (OffloadedStaticCache) if it runs;
   * HF SDPA + DynamicCache all on the GPU (no budget: the upper bound where memory allows);
   with the dense KV / budget ratio, the pages moved, the phase the cost model chose and, for
   the rows that drop, the drop point the tiers applied (``drop_point``: ``drop="cost"``, the
   default, with the measured link and the recompute fitted on the machine). The
   second (larger) point runs the graph rows only (``LARGE_POINT_RUNS``) and every HF row.
   HF's rows run first of all, before anything of s2dsl (a fresh process: no graph pools, no
   patched attention), each timed over 64 steps at the middle of the s2dsl rows' timed stretch
   (``run_hf``: same average context, a fraction of the time); the all-on-GPU row runs again
   after each point's s2dsl rows, to show whether their leftovers slow HF down.

Budget (``budget_pages``), per layer and (sequence, kv head): every layer has its own page table
under a tier, so a step reads its own layer's pages only: the static blocks at the query (window +
sink, and the relative residue) and the kv head's top-k selection (the group shares one list of
k_max blocks), one page more for slack; and at least the prompt's blocks plus one (a first
prefill does not spill, and a top-k kv head keeps every block). The default points: 512 x 8 x
1024 (window 2, sink 1, top-2: reads 5 of 24 blocks at the end, 79% sparsity, budget 9 pages:
dense KV 2.7x the budget) and 256 x 8 x 1024 (top-1: reads 4 of 20 blocks, budget 5: 4.0x).

    python benchmarks/bench_alisa.py --out benchmarks/results/alisa.json
    python benchmarks/bench_alisa.py --points 512x8x2048 --out /tmp/a.json
    python benchmarks/bench_alisa.py --gpu-budget-gib 0.1 --out /tmp/a.json  # + the auto split at 0.1 GiB
    TRITON_INTERPRET=1 python benchmarks/bench_alisa.py --tiny --out /tmp/tiny.json  # CPU smoke run
    TRITON_INTERPRET=1 python benchmarks/bench_alisa.py --tiny --no-correctness --points 40x2x8 \
        --budget-s 100000 --out /tmp/rows.json  # CPU smoke run of the throughput rows
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

import s2dsl
from s2dsl.integrations import hf
from s2dsl.runtime import split as kv_split
from s2dsl.runtime import tiering
from common import make_alisa_model as make_model


def swa_plan(block: int, heads: int, kv_heads: int, layers: int, window: int, topk: int, recent: int = 16):
    text = (f"pattern swa {{ block = {block} heads = {heads} kv_heads = {kv_heads} causal "
            f"heads * {{ window {window} sink 1 topk {topk} recent {recent} }} }}\n"
            f"model bench {{ layers = {layers} rest -> swa }}")
    return s2dsl.parse(text, "<swa>")


def moving_plan(block: int, heads: int, kv_heads: int, layers: int, window: int, stride: int):
    """Every ``stride``-th block beyond the window (a relative stride): the residue it reads shifts
    by one block at every block crossing, so the blocks it left behind are read again later."""
    text = (f"pattern moving {{ block = {block} heads = {heads} kv_heads = {kv_heads} causal "
            f"heads * {{ window {window} sink 1 stride {stride} relative }} }}\n"
            f"model bench {{ layers = {layers} rest -> moving }}")
    return s2dsl.parse(text, "<moving>")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def greedy(model, ids, cache, steps, time_from: int = 0, graph: bool = False):
    """Prefill, then ``steps`` greedy one-token steps, eagerly or (``graph``) through
    ``cache.decode_graph`` (captured on a GPU); returns (tokens, seconds of the steps from
    ``time_from`` on)."""
    with torch.no_grad():
        tok = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        if graph:
            run = cache.decode_graph(model, capture=torch.cuda.is_available())
            step = lambda t: run(t)  # noqa: E731
        else:
            step = lambda t: model(t, past_key_values=cache, use_cache=True).logits  # noqa: E731
        out = [tok]
        t = time.perf_counter()
        for n in range(steps):
            if n == time_from:
                sync()
                t = time.perf_counter()
            tok = step(tok)[:, -1:].argmax(-1)
            out.append(tok)
        sync()
    return torch.cat(out, 1), time.perf_counter() - t


def teacher_forced(model, ids, cache, prompt):
    """Logits of every step after the prompt, fed the given tokens."""
    with torch.no_grad():
        model(ids[:, :prompt], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return torch.cat([model(ids[:, n:n + 1], past_key_values=cache, use_cache=True).logits
                          for n in range(prompt, ids.shape[1])], 1).float()


def reads_per_step(pattern, final: int) -> int:
    """Blocks one (sequence, kv head) reads at the last query: window + sink (+ the relative
    residue below the window) + the group's k_max selected blocks."""
    from s2dsl.codegen.lower import lower
    g = pattern.group_size
    n = -(-final // pattern.block)
    worst = 0
    for kv in range(pattern.kv_heads):
        specs = pattern.head_specs[kv * g:(kv + 1) * g]
        w = max(s.window for s in specs)
        sink = max(s.sink for s in specs)
        rel = min((r for s in specs for r in s.relative), default=0)
        worst = max(worst, w + sink + (-(-max(n - w - sink, 0) // rel) if rel else 0))
    return worst + lower(pattern).max_topk


def budget_pages(pattern, prompt: int, batch: int, final: int) -> int:
    """GPU pages per layer: per (sequence, kv head) what one step reads plus one, and at least the
    prompt's blocks plus one (a top-k kv head keeps every block, and a first prefill does not spill)."""
    return batch * pattern.kv_heads * max(-(-prompt // pattern.block) + 1, reads_per_step(pattern, final) + 1)


def run_s2dsl(model, plan, ids, steps, gpu_pages, host_pages, kv_dtype=None, recompute=None, time_from=0,
              graph=False, overlap=True, **split_kw):
    """``overlap=False``: graph steps wait for every copy up before each replay (``HostTier.graph_overlap``).
    ``split_kw``: ``S2Cache``'s keywords of ``gpu_pages="auto"`` (``free_memory``, ``headroom``, ``host_memory``)."""
    from s2dsl.runtime.host_tier import HostTier
    saved, HostTier.graph_overlap = HostTier.graph_overlap, overlap
    try:
        return _run_s2dsl(model, plan, ids, steps, gpu_pages, host_pages, kv_dtype, recompute, time_from, graph,
                          split_kw)
    finally:
        HostTier.graph_overlap = saved


def _run_s2dsl(model, plan, ids, steps, gpu_pages, host_pages, kv_dtype, recompute, time_from, graph, split_kw):
    hf.apply(model, plan, model_name="bench")
    model.set_attn_implementation(hf.ATTN_IMPLEMENTATION)
    free()
    b, n = ids.shape
    cache = hf.S2Cache(model, max_length=n + steps + 8, batch_size=b, gpu_pages=gpu_pages, host_pages=host_pages,
                       kv_dtype=kv_dtype, recompute=recompute, **split_kw)
    tokens, secs = greedy(model, ids, cache, steps, time_from, graph)
    tiers = [p.table.tier for p in cache.paged if p.table.tier is not None]
    report = cache.debug_report()
    lines = report.splitlines()
    phase = next((ln.split(": ", 1)[-1] for ln in lines if ln.startswith("cost model (")), "")
    drop_point = next((ln for ln in lines if ln.startswith("drop=")), None)  # the drop point the tiers apply
    timed = steps - time_from
    row = dict(tokens_per_s=b * timed / secs, ms_per_step=1e3 * secs / timed, decode_s=secs,
               moved_up=sum(t.moved_up for t in tiers), moved_down=sum(t.moved_down for t in tiers),
               dropped=sum(t.dropped_pages for t in tiers), recomputed=sum(t.recomputed for t in tiers),
               gpu_pool_pages=gpu_pages, host_pages=host_pages, phase=phase, drop_point=drop_point,
               graph=graph, gpu_kv_gib=sum(p.num_pages * p.page_bytes for p in cache.paged) / 2 ** 30)
    if cache.split is not None:  # gpu_pages="auto": the split the library chose, per layer
        sp = cache.split
        row.update(gpu_pool_pages=list(sp.gpu_pages), host_pages=None if sp.host_pages is None else list(sp.host_pages),
                   split=dict(phase=sp.phase, gpu_pages=list(sp.gpu_pages), need_pages=list(sp.need_pages),
                              step_pages=list(sp.step_pages),
                              host_pages=None if sp.host_pages is None else list(sp.host_pages),
                              gpu_budget_bytes=sp.gpu_budget, host_budget_bytes=sp.host_budget,
                              prefill_tokens=sp.prefill_tokens, report=sp.report()))
    # per step over the whole decode (all layers): what the moving pattern brings back
    row["moved_up_per_step"] = row["moved_up"] / steps
    row["recomputed_per_step"] = row["recomputed"] / steps
    del cache
    model.set_attn_implementation("sdpa")
    return tokens, row


def run_hf(model, prompt, batch, steps, kind, time_from=0, sample=64, warm=4):
    """HF's decode at the middle of the timed stretch: a random prompt as long as the context
    halfway through the s2dsl rows' timed steps (``time_from`` .. ``steps``), ``warm`` untimed
    steps, then ``sample`` timed steps. A step's cost grows about linearly with the context, so
    this is their average at a fraction of the time (OffloadedCache decodes at ~120 tok/s: 1024
    steps of it took a minute per point)."""
    from transformers import DynamicCache, StaticCache
    model.set_attn_implementation("sdpa")
    free()
    start = prompt + time_from + (steps - time_from) // 2 - sample // 2
    ids = torch.randint(1, model.config.vocab_size, (batch, start), device=model.device)
    if kind == "offloaded":
        cache = DynamicCache(config=model.config, offloading=True)
    elif kind == "offloaded_static":
        cache = StaticCache(config=model.config, max_cache_len=start + warm + sample + 8, offloading=True)
    else:
        cache = DynamicCache(config=model.config)
    _, secs = greedy(model, ids, cache, warm + sample, warm)
    del cache
    return dict(tokens_per_s=batch * sample / secs, ms_per_step=1e3 * secs / sample, decode_s=secs,
                timed_context=[start + warm, start + warm + sample])


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


#: gpu_pages="auto" rows (graph steps), one per GPU budget; every point runs them
AUTO = "s2dsl swa auto split graph"
#: the runs of the second and later points (the first runs all): the fast ones and the baselines
LARGE_POINT_RUNS = ("s2dsl swa resident graph", "s2dsl swa + host tier graph", "s2dsl swa + host tier int8 graph",
                    "s2dsl swa drop/recompute graph", "moving resident graph", "moving + host tier graph")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="*", default=None,
                    help="prompt x batch x new tokens (default 512x8x1024 256x8x1024; --tiny: 40x2x24)")
    ap.add_argument("--no-correctness", action="store_true", help="skip part 1 (CPU smoke runs of the rows)")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run under TRITON_INTERPRET=1)")
    ap.add_argument("--budget-s", type=float, default=230.0,
                    help="skip the runs not started after this many seconds (recorded as skipped)")
    ap.add_argument("--gpu-budget-gib", type=float, nargs="*", default=[],
                    help="one more 'auto split' row per value: gpu_pages='auto' under this GPU KV budget "
                         "(free_memory = it, headroom 0; the host's share chosen from host memory), beside the row "
                         "at each point's own budget (the bytes of the host tier rows' pools)")
    ap.add_argument("--rows", nargs="*", default=None,
                    help="run only the s2dsl rows whose name contains one of these (default: all)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = args.tiny or device.type != "cuda"
    t0 = time.perf_counter()
    model = make_model(tiny, device, dtype)
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

    points = args.points or (["40x2x24"] if tiny else ["512x8x1024", "256x8x1024"])
    # HF's rows first, before anything of s2dsl ran in this process (no CUDA graph pools, no
    # patched attention, no hooks): the third session's all-on-GPU row read 50 ms/step after the
    # s2dsl graph runs against 7.3 ms in a run where it came earlier; each point re-runs it last
    hf_rows = {spec: hf_baselines(model, spec, tiny, args, t0) for spec in points}
    if not args.no_correctness:
        correctness(model, args, device, tiny, block, results, t0)
        save()
    throughput(model, args, device, tiny, block, points, results, save, t0, hf_rows)
    save()


HF_RUNS = ("offloaded_static", "dense_gpu", "offloaded")


def hf_baselines(model, spec, tiny, args, t0) -> list:
    """HF's rows of one point (``run_hf``)."""
    prompt, batch, steps = map(int, spec.split("x"))
    rows = []
    for kind in HF_RUNS:
        if tiny and kind == "offloaded_static":
            continue  # transformers' offloaded static cache wants CUDA streams
        row = hf_row(model, prompt, batch, steps, kind, args, t0)
        row["impl"] = f"hf sdpa {kind}"
        rows.append(row)
    return rows


def hf_row(model, prompt, batch, steps, kind, args, t0) -> dict:
    if time.perf_counter() - t0 > args.budget_s:
        return dict(skipped=f"time budget ({args.budget_s:.0f} s) spent")
    try:
        return run_hf(model, prompt, batch, steps, kind, time_from=steps // 2)
    except Exception as exc:  # report and go on: one failure must not lose the run
        return dict(error=f"{type(exc).__name__}: {exc}")


def correctness(model, args, device, tiny, block, results, t0):
    """Part 1 (see the module docstring)."""
    cfg = model.config
    heads, kvh, layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    prompt, batch = (40, 2) if tiny else (128, 2)
    plan = swa_plan(block, heads, kvh, layers, window=1 if tiny else 2, topk=2)
    pattern = hf.layer_patterns(model, plan, model_name="bench")[0]
    per = budget_pages(pattern, prompt, batch, prompt) // (batch * kvh)
    steps = (per + 2) * block - prompt  # decode until each (sequence, kv head) holds 2 blocks over the budget
    final = prompt + steps
    gpu = batch * kvh * per
    ids = torch.randint(1, cfg.vocab_size, (batch, prompt), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    total = batch * kvh * -(-final // block)
    ref, _ = run_s2dsl(model, plan, ids, steps, total + batch * kvh, None)
    out, row = run_s2dsl(model, plan, ids, steps, gpu, total)
    assert torch.equal(out, ref), "tokens with the host tier differ from the all-resident cache"
    assert row["moved_down"] > 0, "the correctness run never exceeded the GPU budget"
    g_out, _ = run_s2dsl(model, plan, ids, steps, gpu, total, graph=True)
    dropped, drow = run_s2dsl(model, plan, ids, steps, gpu, 0, recompute="hidden")
    q8, _ = run_s2dsl(model, plan, ids, steps, gpu, total, torch.int8)
    # the moving pattern (stride 3 over 12 blocks: its residue comes back at later crossings):
    # pages come back up / are recomputed by themselves (graph steps)
    mplan = moving_plan(block, heads, kvh, layers, window=1 if tiny else 2, stride=2 if tiny else 3)
    mpattern = hf.layer_patterns(model, mplan, model_name="bench")[0]
    m_steps = (8 if tiny else 12) * block - prompt
    m_total = batch * kvh * -(-(prompt + m_steps) // block)
    mgpu = budget_pages(mpattern, prompt, batch, prompt + m_steps)
    m_ref, _ = run_s2dsl(model, mplan, ids, m_steps, m_total + batch * kvh, None, graph=True)
    m_up, mrow = run_s2dsl(model, mplan, ids, m_steps, mgpu, m_total, graph=True)
    m_rec, mrec = run_s2dsl(model, mplan, ids, m_steps, mgpu, 0, recompute="hidden", graph=True)
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
        graph_tiered_tokens_equal=bool(torch.equal(g_out, ref)),
        drop_tokens_equal_share=(dropped == ref).float().mean().item(), dropped=drow["dropped"],
        recomputed=drow["recomputed"], recompute_kv_max_rel_error=rec_err,
        moving_host_tokens_equal=bool(torch.equal(m_up, m_ref)), moving_moved_up=mrow["moved_up"],
        moving_drop_tokens_equal_share=(m_rec == m_ref).float().mean().item(), moving_recomputed=mrec["recomputed"],
        int8_token_agreement=(q8 == ref).float().mean().item(), int8_logit_max_change_over_std=logit_err)
    c = results["correctness"]
    print(f"correctness: host tier lossless (moved {c['moved_down']} pages down, {c['moved_up']} up; graph steps "
          f"equal: {c['graph_tiered_tokens_equal']}); drop + recompute: {c['drop_tokens_equal_share']:.1%} tokens "
          f"equal ({c['dropped']} pages dropped, {c['recomputed']} recomputed), recomputed K/V max error "
          f"{rec_err:.2e} of max |K/V|; moving pattern: host tier equal {c['moving_host_tokens_equal']} "
          f"({c['moving_moved_up']} pages up), drop {c['moving_drop_tokens_equal_share']:.1%} equal "
          f"({c['moving_recomputed']} recomputed); INT8 agrees on {c['int8_token_agreement']:.1%} of greedy tokens, "
          f"logits change {logit_err:.2e} of their std [{time.perf_counter() - t0:.0f} s]")


def throughput(model, args, device, tiny, block, points, results, save, t0, hf_rows):
    """Part 3 (see the module docstring)."""
    cfg = model.config
    heads, kvh, layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    stride = 2 if tiny else 8
    print(f"{'point':>14} {'dense/budget':>12} {'impl':>36} {'tok/s':>9} {'ms/step':>8} {'up/step':>8} "
          f"{'rec/step':>8}  phase")
    for n_point, spec in enumerate(points):
        prompt, batch, steps = map(int, spec.split("x"))
        final = prompt + steps
        n_final = -(-final // block)
        window, sink = (1, 1) if tiny else (2, 1)
        topk = max(1, round(0.2 * n_final) - window - sink)
        plan = swa_plan(block, heads, kvh, layers, window=window, topk=topk)
        pattern = hf.layer_patterns(model, plan, model_name="bench")[0]
        mplan = moving_plan(block, heads, kvh, layers, window=window, stride=stride)
        mpattern = hf.layer_patterns(model, mplan, model_name="bench")[0]
        ids = torch.randint(1, cfg.vocab_size, (batch, prompt), device=device)
        gpu = budget_pages(pattern, prompt, batch, final)
        mgpu = budget_pages(mpattern, prompt, batch, final)
        total = batch * kvh * n_final
        resident = total + batch * kvh
        ratio = total / gpu
        half = steps // 2
        point = dict(point=spec, dense_over_budget=ratio, read_share=reads_per_step(pattern, final) / n_final,
                     moving_dense_over_budget=total / mgpu,
                     moving_read_share=reads_per_step(mpattern, final) / n_final, rows=[])
        tier = dict(host_pages=total)
        # gpu_pages="auto" under a forced GPU budget (free_memory, no headroom: the budget is the KV's):
        # the bytes of the explicit rows' pools (their spare page each included), so the library's
        # split is timed beside the hand-made one at the same budget, and each --gpu-budget-gib
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        page = kv_split.kv_page_bytes(block, head_dim, next(model.parameters()).dtype.itemsize, False)
        budgets = [("", layers * (gpu + 1) * page)] + [(f" @{g:g} GiB", int(g * 2 ** 30)) for g in args.gpu_budget_gib]
        point["auto_gpu_budget_bytes"] = {AUTO + suffix: b for suffix, b in budgets}
        drop = dict(host_pages=max((total - gpu) // 2, 0), recompute="hidden")
        runs = [("s2dsl swa resident", plan, resident, dict(host_pages=None), False),
                ("s2dsl swa resident graph", plan, resident, dict(host_pages=None), True),
                ("s2dsl swa + host tier", plan, gpu, tier, False),
                ("s2dsl swa + host tier graph", plan, gpu, tier, True),
                *[(AUTO + suffix, plan, "auto", dict(host_pages="auto", free_memory=b, headroom=0), True)
                  for suffix, b in budgets],
                ("s2dsl swa + host tier int8", plan, gpu, dict(tier, kv_dtype=torch.int8), False),
                ("s2dsl swa + host tier int8 graph", plan, gpu, dict(tier, kv_dtype=torch.int8), True),
                ("s2dsl swa drop/recompute graph", plan, gpu, drop, True),
                ("moving resident graph", mplan, resident, dict(host_pages=None), True),
                ("moving + host tier graph", mplan, mgpu, tier, True),
                ("moving + host tier graph, no overlap", mplan, mgpu, dict(tier, overlap=False), True),
                ("moving drop/recompute graph", mplan, mgpu, dict(host_pages=max((total - mgpu) // 2, 0),
                                                                  recompute="hidden"), True)]
        wanted = (lambda name: True) if n_point == 0 else \
            (lambda name: name in LARGE_POINT_RUNS or name.startswith(AUTO))
        for name, p, pool, kw, graph in runs:
            if not wanted(name) or (args.rows is not None and not any(r in name for r in args.rows)):
                continue
            if time.perf_counter() - t0 > args.budget_s:
                row = dict(skipped=f"time budget ({args.budget_s:.0f} s) spent")
            else:
                try:
                    _, row = run_s2dsl(model, p, ids, steps, pool, time_from=half, graph=graph, **kw)
                except Exception as exc:  # report and go on: one failure must not lose the run
                    row = dict(error=f"{type(exc).__name__}: {exc}")
            row["impl"] = name
            point["rows"].append(row)
        point["rows"] += hf_rows[spec]
        # the all-on-GPU row again, now after the s2dsl runs: equal to the first within noise
        # unless state left by them (graph pools, hooks, allocator) slows HF down
        again = hf_row(model, prompt, batch, steps, "dense_gpu", args, t0)
        again["impl"] = "hf sdpa dense_gpu (again, after s2dsl)"
        point["rows"].append(again)
        by = {r["impl"]: r for r in point["rows"]}
        for name, base in (("s2dsl swa + host tier graph", "s2dsl swa resident graph"),
                           *[(AUTO + suffix, "s2dsl swa resident graph") for suffix, _ in budgets],
                           ("moving + host tier graph", "moving resident graph"),
                           ("moving + host tier graph, no overlap", "moving resident graph"),
                           ("moving drop/recompute graph", "moving resident graph")):
            if "ms_per_step" in by.get(name, {}) and "ms_per_step" in by.get(base, {}):
                by[name]["ms_over_resident"] = by[name]["ms_per_step"] - by[base]["ms_per_step"]
        for row in point["rows"]:
            phase = row.get("phase", row.get("error", row.get("skipped", "")))[:90]
            if row.get("drop_point"):  # phase 3 rows: where the tiers drop (the cost model's point)
                dp = row["drop_point"]
                phase = dp[dp.find("drop past"):].split(" per layer")[0] + " | " + phase[:60]
            if row.get("split"):  # gpu_pages="auto": the split chosen
                sp = row["split"]
                phase = (f"split: phase {sp['phase']}, GPU {max(sp['gpu_pages'])} host "
                         f"{max(sp['host_pages'] or [0])} of {max(sp['need_pages'])} pages/layer | " + phase[:50])
            tps = f"{row['tokens_per_s']:9.1f}" if "tokens_per_s" in row else f"{'-':>9}"
            ms = f"{row['ms_per_step']:8.2f}" if "ms_per_step" in row else f"{'-':>8}"
            up = f"{row['moved_up_per_step']:8.2f}" if "moved_up_per_step" in row else f"{'':>8}"
            rc = f"{row['recomputed_per_step']:8.2f}" if "recomputed_per_step" in row else f"{'':>8}"
            print(f"{spec:>14} {ratio:12.2f} {row['impl']:>36} {tps} {ms} {up} {rc}  {phase}")
        results["points"].append(point)
        save()
        print(f"[{time.perf_counter() - t0:.0f} s]")


if __name__ == "__main__":
    main()
