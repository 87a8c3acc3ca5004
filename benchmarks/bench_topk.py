"""Dynamic top-k speed: prefill vs dense SDPA and FlexAttention on the same block mask; decode vs dense.

One GPU run, every baseline in the same run (ALISA-style ``window W sink 1 topk K recent 16``,
32 q / 8 kv heads, d 128, block 64, bf16):

1. correctness first: the bf16 forward against the float32 reference given the same selection
   (poisoned output); FlexAttention's output against ours on the same blocks (32K); each decode
   configuration's step against the reference replaying the selection it used;
2. prefill (batch 1): s2dsl end to end (selection + kernel), the selection alone (the generated
   select kernels; and its torch path — block score matrix, exclusion, top-k — the way it ran
   before, with the share of picks both paths agree on), the kernel alone given the selection,
   the 'bound' estimator's selection; SDPA flash (dense causal); FlexAttention given a BlockMask built
   from *our* selection (``BlockMask.from_kv_blocks``: per (head, query block) the window's and
   sink's blocks and the selected ones as full blocks, the diagonal block causal), so both
   kernels visit the same blocks;
3. decode (batch 8, one query per sequence, after a real first prefill that seeds the scores):
   the decode kernel alone; the top-k bookkeeping alone (``update_kernel``); one layer's whole
   attention step (kernel + combine + score update + next selection) called eagerly and
   replayed from a CUDA graph; one layer's whole ``cached_attention`` step (page plan, K/V
   write, attention, bookkeeping) as a static ``DecodeGraph`` step; SDPA over the dense
   contiguous cache (GQA by ``enable_gqa`` and by repeated kv heads; the faster counts).
   Twice: ALISA's scoring (``recent 16``, by the attention mass of the last steps, updated after
   the step) and ``topk K by bound`` (Quest: each page scored from the step's own query by the q.k
   upper bound of its keys' min / max, before the step; its "update" column times that selection,
   the bound kernel and a topk).

Prints tables and writes JSON to --out (after every row). ``--budget-s`` skips the parts that
would start too late (listed under "skipped"); ``--scorers bound mass`` runs the bound decode
rows at every length before the mass ones.

    python benchmarks/bench_topk.py --seqs 32768 131072 --out benchmarks/results/topk.json
    python benchmarks/bench_topk.py --seqs 32768 131072 --no-decode --select-variants old bitonic  # a quick A/B
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

from common import time_variants

HEADS, KV_HEADS, DIM, BLOCK, SINK = 32, 8, 128, 64, 1


def alisa(window: int, k: int, recent: int = 16):
    name = f"alisa_w{window}_k{k}"
    return s2dsl.parse(f"pattern {name} {{ block = {BLOCK} heads = {HEADS} kv_heads = {KV_HEADS} "
                       f"heads * {{ window {window} sink {SINK} topk {k} recent {recent} }} }}")[name]


def quest(window: int, k: int):
    name = f"quest_w{window}_k{k}"
    return s2dsl.parse(f"pattern {name} {{ block = {BLOCK} heads = {HEADS} kv_heads = {KV_HEADS} "
                       f"heads * {{ window {window} sink {SINK} topk {k} by bound }} }}")[name]


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


def flex_block_mask(sel: torch.Tensor, window: int, n: int):
    """FlexAttention's BlockMask for ``window W sink 1`` plus our selection ``sel`` (1, heads, nb, K),
    built from block lists (no token-level mask, no mask_mod evaluated over N x N): per (head,
    query block i) the full blocks are the sink, the window below the diagonal and the selected blocks (all below the window); the
    diagonal block is partial, cut by the causal mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = n // BLOCK
    dev = sel.device
    i = torch.arange(nb, device=dev).view(-1, 1)
    lo = i - window + 1                                                            # first window block
    sinks = torch.arange(SINK, device=dev).view(1, -1).expand(nb, -1)
    sinks = torch.where((sinks < lo) & (sinks <= i), sinks, -1)                    # outside the window
    below = i - torch.arange(1, window, device=dev).view(1, -1)                    # window minus diagonal
    below = torch.where(below >= 0, below, -1)
    static = torch.cat([sinks, below], -1).unsqueeze(0).expand(HEADS, -1, -1)
    full = torch.cat([static, sel[0].long()], -1)                                  # (heads, nb, F)
    full = torch.where(full >= 0, full, nb).sort(-1).values                        # unused last
    full_num = (full < nb).sum(-1).to(torch.int32)
    # Flex's block lists are as wide as the kv blocks (its own format, as create_block_mask makes)
    full_idx = torch.zeros(HEADS, nb, nb, dtype=torch.int32, device=dev)
    full_idx[:, :, :full.shape[-1]] = torch.where(full < nb, full, 0)[:, :, :nb]
    diag = torch.zeros(HEADS, nb, nb, dtype=torch.int32, device=dev)
    diag[:, :, 0] = torch.arange(nb, device=dev, dtype=torch.int32).view(1, nb)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = BlockMask.from_kv_blocks(torch.ones(1, HEADS, nb, dtype=torch.int32, device=dev),
                                    diag.unsqueeze(0).contiguous(), full_num.unsqueeze(0).contiguous(),
                                    full_idx.unsqueeze(0).contiguous(), BLOCK_SIZE=BLOCK, mask_mod=causal)
    return mask, (int(full_num.sum()) + HEADS * nb) / (HEADS * nb * (nb + 1) / 2)


def _torch_path(pattern):
    """Context: select_blocks through its torch path (block score matrix, exclusion kernel, top-k of
    the same keys), the way every selection ran before the generated select_kernel."""
    import contextlib
    from s2dsl.runtime import topk as topk_mod

    @contextlib.contextmanager
    def ctx():
        module = topk_mod._prefill_info(pattern)[0]
        saved, module.FUSED_K = module.FUSED_K, 0
        try:
            yield
        finally:
            module.FUSED_K = saved
    return ctx()


#: select_kernel variants timed side by side (--select-variants): (SELECT_MERGE, LONG_FIRST, SELECT_DOT)
SELECT_VARIANTS = {"old": ("extract", False, "ieee"),           # K max-extractions per tile, grid in order
                   "insert": ("insert", True, "ieee"),          # threshold-gated insertions, longest tiles first
                   "bitonic": ("bitonic", True, "ieee"),        # opt-in: bitonic top-k + merge per tile
                   "bitonic_tf32x3": ("bitonic", True, "tf32x3")}


def _variant(pattern, name):
    """Context: select_blocks with select_kernel variant ``name`` (module settings, restored after)."""
    import contextlib
    from s2dsl.runtime import topk as topk_mod

    @contextlib.contextmanager
    def ctx():
        module = topk_mod._prefill_info(pattern)[0]
        saved = module.SELECT_MERGE, module.LONG_FIRST, module.SELECT_DOT
        module.SELECT_MERGE, module.LONG_FIRST, module.SELECT_DOT = SELECT_VARIANTS[name]
        try:
            yield
        finally:
            module.SELECT_MERGE, module.LONG_FIRST, module.SELECT_DOT = saved
    return ctx()


def select_variant_rows(pattern, q, k, sel, variants, row):
    """Each select_kernel variant on the same inputs: its picks' agreement with the default's, its time;
    and the key pooling launch alone (shared by all)."""
    from s2dsl.runtime import topk as topk_mod

    module = topk_mod._prefill_info(pattern)[0]
    row["select_pool_keys_ms"] = bench(lambda: module.pool_keys(k, k.shape[2]))
    for name in variants:
        with _variant(pattern, name):
            got = select_blocks(q, k, pattern)
            row[f"select_{name}_same_as_default"] = (got.sort(-1).values == sel.sort(-1).values).float().mean().item()
            row[f"select_{name}_ms"] = bench(lambda: select_blocks(q, k, pattern))
        if SELECT_VARIANTS[name][2] == "ieee" and row[f"select_{name}_same_as_default"] != 1.0:
            # the float32 variants must pick exactly the same blocks: recorded loudly, the timings kept
            row.setdefault("select_variants_differing", []).append(name)
            print(f"WRONG: select_kernel variant {name} picks differ from the default's", flush=True)


#: forward-kernel tile variants timed beside the default for top-k plans (label -> tuning):
#: the default's 64-row tiles (a tile takes its one query block's selection) keep two-block
#: window steps, 3 stages and pointer loads: 255 registers and 208 KB of shared memory on sm_90,
#: one program per SM. One block per step with K/V through tensor descriptors is the static
#: patterns' default up to 32K (4-17% faster there): 168 registers, 113 KB, two programs per SM;
#: with 2 stages 166 / 81 KB (benchmarks/compile_report.py evidence, RESULTS.md fifth session);
#: "m64_tma" is what kernels.TOPK_SHORT_TILES switches on
KERNEL_VARIANTS = {
    "m64_tma": {"window_span": 1, "kv_load": "tma"},
    "m64_tma_s2": {"window_span": 1, "kv_load": "tma", "num_stages": 2},
    "m64_ptr": {"window_span": 1},
}


def prefill_rows(pattern, window: int, n: int, no_flex: bool, variants=(), kernel_variants=None) -> dict:
    torch.manual_seed(1)
    q = torch.randn(1, HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, KV_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    sel = select_blocks(q, k, pattern)
    row = {"pattern": pattern.name, "seq": n}
    with _torch_path(pattern):
        sel_torch = select_blocks(q, k, pattern)
        row["s2dsl_select_torch_path_ms"] = bench(lambda: select_blocks(q, k, pattern))
    # the two paths score in float32 in different orders: near-equal candidates may swap
    same = (sel.sort(-1).values == sel_torch.sort(-1).values).float().mean().item()
    row["select_same_as_torch_path"] = same
    assert same > 0.99, row
    row["s2dsl_select_ms"] = bench(lambda: select_blocks(q, k, pattern))
    select_variant_rows(pattern, q, k, sel, variants, row)
    row["s2dsl_kernel_ms"] = bench(lambda: forward(q, k, v, pattern, selection=sel))
    if kernel_variants:  # the same selection: only the tiles differ
        time_variants(row, kernel_variants, lambda t: forward(q, k, v, pattern, selection=sel, tuning=t)[0],
                      forward(q, k, v, pattern, selection=sel)[0],
                      lambda t: bench(lambda: forward(q, k, v, pattern, selection=sel, tuning=t)), "s2dsl_kernel_{}")
    row["s2dsl_total_ms"] = bench(lambda: forward(q, k, v, pattern))
    # the 'bound' estimator (Quest's q.k upper bound per kv block, max over the query block's rows)
    row["s2dsl_select_bound_ms"] = bench(lambda: select_blocks(q, k, pattern, estimator="bound"))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        kr, vr = (t.repeat_interleave(HEADS // KV_HEADS, 1) for t in (k, v))
        row["sdpa_flash_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr,
                                                                                              is_causal=True))
        kr = vr = None  # free before the next baseline
    if not no_flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            t0 = time.perf_counter()
            mask, kept = flex_block_mask(sel, window, n)
            torch.cuda.synchronize()
            row["flex_mask_from_selection_s"] = time.perf_counter() - t0
            row["kept_block_fraction"] = kept
            compiled = torch.compile(flex_attention)
            options = {"BLOCK_M": BLOCK, "BLOCK_N": BLOCK}
            fn = lambda: compiled(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=options)  # noqa: E731
            t0 = time.perf_counter()
            if n <= 32768:
                ref = forward(q, k, v, pattern, selection=sel)[0]
                row["flex_rel_err_vs_s2dsl"] = rel(fn(), ref)
                assert row["flex_rel_err_vs_s2dsl"] < 2e-2, row
            else:
                fn()
            torch.cuda.synchronize()
            row["flex_first_call_s"] = time.perf_counter() - t0  # compile included
            row["flex_same_mask_ms"] = bench(fn)
            row["s2dsl_total_over_flex"] = row["s2dsl_total_ms"] / row["flex_same_mask_ms"]
        except Exception as exc:  # noqa: BLE001 - a baseline failing is a result too
            row["flex_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def _graphed(fn):
    """``fn`` captured in a CUDA graph (warmed up on a side stream first); returns replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def decode_rows(pattern, n: int, batch: int) -> dict:
    """One decode step (one query per sequence) at context n, after a first prefill through the cache."""
    from s2dsl.runtime import decode as dec
    from s2dsl.runtime.decode import cached_attention, paged_attention
    from s2dsl.runtime.graphs import DecodeGraph
    from s2dsl.runtime.kv_cache import PagedKVCache
    from s2dsl.runtime.topk_state import state_for

    torch.manual_seed(2)
    row = {"pattern": pattern.name, "seq": n, "batch": batch}
    steps = 4000  # decode steps the timed graph step may take (do_bench replays it)
    k = torch.randn(batch, KV_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    pages = batch * KV_HEADS * (-(-(n + steps) // BLOCK) + 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # topk heads keep every page
        cache = PagedKVCache(pattern, num_pages=pages, head_dim=DIM, dtype=torch.bfloat16, device="cuda",
                             max_seqs=batch)
    ids = [cache.add_sequence() for _ in range(batch)]
    for b in range(batch):  # the first prefill, one sequence at a time (memory): seeds the scores
        qp = torch.randn(1, HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
        cached_attention(cache, ids[b:b + 1], qp, k[b:b + 1], v[b:b + 1])
        del qp
    torch.cuda.empty_cache()
    state = state_for(cache)
    q = torch.randn(batch, HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16)
    kn, vn = (torch.randn(batch, KV_HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cached_attention(cache, ids, q, kn, vn)  # one real step: the scores now hold a decode step's masses
    info = cache.batch(ids)
    row["selected_blocks_per_kv_head"] = float((state.selection[info.slots.long()] >= 0).sum(-1).float().mean())

    # check: a step against the reference replaying its selection (first sequence); a bound
    # selection is made inside the step, from its query
    row["scorer"] = "bound" if state.has_bound else "mass"
    used = state.selection[info.slots[:1].long()].clone()
    out = torch.full_like(q, float("nan"))
    out = paged_attention(q, cache, info, out=out)
    if state.has_bound:
        used = state.selection[info.slots[:1].long()].clone()
    sel = torch.full((1, HEADS, 1, used.shape[-1]), -1, dtype=torch.int32, device="cuda")
    sel[0, :, 0] = used[0].repeat_interleave(HEADS // KV_HEADS, 0)
    kc = torch.cat([k[:1], kn[:1]], 2)
    vc = torch.cat([v[:1], vn[:1]], 2)
    ref = s2dsl.reference_attention(q[:1], kc, vc, pattern, selection=sel)
    row["decode_rel_err"] = rel(out[:1], ref)
    assert row["decode_rel_err"] < 2e-2, row
    del kc, vc

    # the kernel alone, the bookkeeping alone, the attention step eager and graphed
    spec, module = dec._module(pattern, q.dtype, DIM, 1, q.device)
    splits = dec._splits(pattern, batch, 1, info.max_len, 1, q.device)
    row["n_splits"] = splits
    kout = torch.empty_like(q)
    lse = torch.empty(batch, HEADS, 1, device="cuda")
    extra = state.kernel_args()

    def kernel():
        module.launch(q, kout, lse, cache.k_pages, cache.v_pages, cache.block_tables, info.slots,
                      info.seq_lens, 1, splits, DIM ** -0.5, **extra)

    row["s2dsl_kernel_ms"] = bench(kernel)
    row["s2dsl_kernel_graph_ms"] = bench(_graphed(kernel))
    stale = torch.zeros(batch, dtype=torch.bool, device="cuda")  # no sequence new to its slot
    if state.has_bound:  # the selection before the step: bound kernel + topk
        row["s2dsl_update_ms"] = bench(_graphed(lambda: state.before_step(cache, q, info.slots, info.seq_lens)))
    else:
        row["s2dsl_update_ms"] = bench(_graphed(lambda: state.after_step(info.slots, info.seq_lens, lse, 1, stale)))
    step = lambda: paged_attention(q, cache, info, out=kout)  # noqa: E731
    row["s2dsl_step_eager_ms"] = bench(step)
    row["s2dsl_step_graph_ms"] = bench(_graphed(step))
    row["step_over_kernel"] = row["s2dsl_step_graph_ms"] / row["s2dsl_kernel_graph_ms"]

    # one layer's cached_attention step (plan, write, attention, bookkeeping) as a static graph step
    try:
        graph = DecodeGraph(lambda: cached_attention(cache, ids, q, kn, vn), [cache.table], [ids],
                            max_length=n + steps)
        graph()
        graph()
        row["s2dsl_cached_step_graph_ms"] = bench(graph)  # includes DecodeGraph's host bookkeeping
        graph.close()
    except Exception as exc:  # noqa: BLE001 - report, keep the other figures
        row["cached_step_error"] = f"{type(exc).__name__}: {exc}"[:300]
    cache = state = graph = None  # the pages go before the dense baseline's copies
    torch.cuda.empty_cache()

    # dense SDPA decode over the contiguous cache
    qd = q
    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        row["sdpa_dense_gqa_ms"] = bench(lambda: sdpa(qd, k, v, enable_gqa=True))
    except Exception as exc:  # noqa: BLE001
        row["sdpa_gqa_error"] = f"{type(exc).__name__}: {exc}"[:200]
    kr, vr = (t.repeat_interleave(HEADS // KV_HEADS, 1) for t in (k, v))
    row["sdpa_dense_repeat_ms"] = bench(lambda: sdpa(qd, kr, vr))
    kr = vr = None
    row["sdpa_dense_ms"] = min(row.get("sdpa_dense_gqa_ms", float("inf")), row["sdpa_dense_repeat_ms"])
    row["dense_kv_bytes"] = 2 * k.numel() * k.element_size()
    needed = min(-(-n // BLOCK), pattern.head_specs[0].window + SINK + pattern.head_specs[0].topk[0].k)
    row["topk_needed_bytes"] = 2 * batch * KV_HEADS * needed * BLOCK * DIM * k.element_size()
    if row["scorer"] == "bound":  # the selection reads each page's key min / max (float32)
        row["bound_bytes"] = 2 * batch * KV_HEADS * -(-n // BLOCK) * DIM * 4
    row["s2dsl_kernel_GBps_needed"] = row["topk_needed_bytes"] / row["s2dsl_kernel_graph_ms"] / 1e6
    row["sdpa_dense_GBps"] = row["dense_kv_bytes"] / row["sdpa_dense_ms"] / 1e6
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--scorers", nargs="+", choices=("mass", "bound"), default=["mass", "bound"],
                    help="decode: ALISA's accumulated mass (recent 16) and/or Quest's bound ('by bound')")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="skip the parts that would start too late to end within this many seconds (0: none)")
    ap.add_argument("--out", type=str, default="")
    ap.add_argument("--kernel-variants", default=None, metavar="JSON",
                    help="forward tile variants timed with the same selection beside the default kernel, a JSON "
                         "object label -> tuning ('{}' for none; default: KERNEL_VARIANTS)")
    ap.add_argument("--select-variants", nargs="*", default=list(SELECT_VARIANTS), choices=list(SELECT_VARIANTS),
                    help="prefill: select_kernel variants timed side by side with the default (A/B in one run)")
    args = ap.parse_args()
    start = time.perf_counter()
    if any(n % BLOCK for n in args.seqs):
        ap.error(f"--seqs must be multiples of the block ({BLOCK})")
    pattern = alisa(args.window, args.topk)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"check {pattern.name}: bf16 relative error {check_prefill(pattern):.2e}")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "pattern": pattern.to_source(), "prefill": [], "decode": []}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    result["skipped"] = []

    def room(what: str, reserve: float) -> bool:
        # start a part only if it should end inside --budget-s (the rows saved so far stay)
        elapsed = time.perf_counter() - start
        if args.budget_s and elapsed + reserve > args.budget_s:
            result["skipped"].append(what)
            print(f"skipped (budget, {elapsed:.0f} s spent): {what}", flush=True)
            return False
        return True

    def add(kind: str, row: dict):
        row["elapsed_s"] = round(time.perf_counter() - start, 1)
        result[kind].append(row)
        print(json.dumps(row), flush=True)
        save()
        torch.cuda.empty_cache()

    for n in [] if args.no_prefill else args.seqs:
        if room(f"prefill {n}", 25):  # (the 128K row took ~8 s on an H200, its kernels compiled at 32K)
            add("prefill", prefill_rows(pattern, args.window, n, args.no_flex, args.select_variants,
                                        KERNEL_VARIANTS if args.kernel_variants is None
                                        else json.loads(args.kernel_variants)))
    decode_patterns = {"mass": pattern, "bound": quest(args.window, args.topk)}
    result["decode_patterns"] = {s: decode_patterns[s].to_source() for s in args.scorers}
    for scorer in args.scorers:  # one scorer at every length first: --scorers bound mass puts bound first
        for n in [] if args.no_decode else args.seqs:
            if room(f"decode {scorer} {n}", 25):
                add("decode", decode_rows(decode_patterns[scorer], n, args.batch))
    nan = float("nan")
    if result["prefill"]:
        print("\nprefill (ms)\n| seq | s2dsl total | select | kernel | select, torch path | select (bound) "
              "| SDPA flash | Flex same blocks | total / Flex | kept |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in result["prefill"]:
            print(f"| {r['seq']} | {r['s2dsl_total_ms']:.2f} | {r['s2dsl_select_ms']:.3f} | {r['s2dsl_kernel_ms']:.2f} "
                  f"| {r['s2dsl_select_torch_path_ms']:.3f} | {r['s2dsl_select_bound_ms']:.2f} "
                  f"| {r['sdpa_flash_ms']:.2f} | {r.get('flex_same_mask_ms', nan):.2f} "
                  f"| {r.get('s2dsl_total_over_flex', nan):.3f} | {r.get('kept_block_fraction', nan):.3f} |")
    labels = sorted({key[len("s2dsl_kernel_"):].rsplit("_", 1)[0] for r in result["prefill"] for key in r
                     if key.startswith("s2dsl_kernel_") and key.endswith(("_ms", "_error"))
                     and key != "s2dsl_kernel_ms"})
    if labels:
        print("\nprefill kernel tile variants, same selection (ms; select + kernel over Flex in parentheses)")
        print("| seq | default | " + " | ".join(labels) + " |")
        print("|---|---|" + "---|" * len(labels))
        for r in result["prefill"]:
            flex = r.get("flex_same_mask_ms", nan)
            cells = [f"{r[f's2dsl_kernel_{x}_ms']:.2f} ({(r['s2dsl_select_ms'] + r[f's2dsl_kernel_{x}_ms']) / flex:.3f})"
                     if f"s2dsl_kernel_{x}_ms" in r else r.get(f"s2dsl_kernel_{x}_error", "-")[:40] for x in labels]
            print(f"| {r['seq']} | {r['s2dsl_kernel_ms']:.2f} | " + " | ".join(cells) + " |")
    if result["prefill"] and args.select_variants:
        print("\nselect_kernel variants (ms; the keys' pooling launch alone; same picks as the default)")
        print("| seq | pool keys | " + " | ".join(args.select_variants) + " |")
        print("|---|---|" + "---|" * len(args.select_variants))
        for r in result["prefill"]:
            print(f"| {r['seq']} | {r['select_pool_keys_ms']:.3f} | " + " | ".join(
                f"{r[f'select_{v}_ms']:.3f} ({r[f'select_{v}_same_as_default']:.4f})" for v in args.select_variants)
                + " |")
    if result["decode"]:
        print("\ndecode (ms, batch %d)\n| seq | scorer | kernel (graph) | selection (update / bound) | step eager "
              "| step graph | step/kernel | cached_attention graph | SDPA dense |" % args.batch)
        print("|---|---|---|---|---|---|---|---|---|")
        for r in result["decode"]:
            print(f"| {r['seq']} | {r['scorer']} | {r['s2dsl_kernel_graph_ms']:.3f} | {r['s2dsl_update_ms']:.3f} "
                  f"| {r['s2dsl_step_eager_ms']:.3f} | {r['s2dsl_step_graph_ms']:.3f} | {r['step_over_kernel']:.2f} "
                  f"| {r.get('s2dsl_cached_step_graph_ms', nan):.3f} | {r['sdpa_dense_ms']:.3f} |")
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    print(f"elapsed {result['elapsed_s']} s; skipped: {result['skipped'] or 'nothing'}")
    save()


if __name__ == "__main__":
    main()
