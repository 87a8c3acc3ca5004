"""Quality of dynamic top-k (ALISA's sparse window attention) vs static patterns at equal KV budget.

Trains the dense model of ``examples/train_tiny.py`` (multi-query associative recall: keys and
values scattered over a long context, queried at the end), then swaps its attention, with no
further training, for patterns that keep a fraction of the context (KV sparsity 50/80/90%: the
last query block keeps ``B = (1 - sparsity) * n_blocks`` kv blocks):

* ``window``:        ``window B``
* ``window+stride``: ``window B/2  stride S offset h`` (S so that the shard holds the other B/2)
* ``window+topk``:   ``window B/2  topk B/2`` (ALISA's SWA) with the prefill's default
  block-pooled estimator, again with the ``last_row`` estimator (ALISA / SnapKV), and with the
  ``bound`` estimator (Quest's q.k upper bound from each kv block's key min / max, the largest
  over the query block's rows)
* ``window+topk (decode)``: the same pattern on ALISA's own path: the prompt prefilled into a
  ``PagedKVCache`` (the top-k scores seeded from its last rows), then the query region decoded
  one token at a time (teacher-forced) through ``cached_attention``, each step's K blocks chosen
  by the attention the previous steps gave them (``runtime/topk_state.py``); its recovery is
  measured on the decoded rows, with the selection each step used
* ``window+topk by bound (decode)``: the same path with ``topk B/2 by bound`` — each step's blocks
  chosen by Quest's q.k upper bound from each page's key min / max, from the step's own query
  (no history; the library's answer to the candidate study below)
* ``dense``
* with ``--kv-int8``: the two decode methods again over an INT8 paged cache (``PagedKVCache(...,
  kv_dtype=torch.int8)``: channel-wise asymmetric codes, dequantised inside the decode kernel),
  and ``dense (decode)`` / ``dense (decode, INT8)``: the whole-context pattern through the same
  decode path in 16 bits and in INT8; each INT8 method also reports its answer logits' change
  against its 16-bit twin (largest and mean absolute difference over the 16-bit logits' std)

and, separately, the *decode-time selection candidates* (``--parts candidates``, a torch
reference that runs on the CPU as on the GPU): the prompt attended densely, the query region one
row at a time under a window plus pages picked by ALISA's accumulated mass, by Quest's bound or
by the row's true mass (oracle), at pages of the block, a quarter block and single tokens.

It measures, per method and sparsity: retrieval accuracy (overall and by distance), the
answers' perplexity (exp of their mean cross-entropy), and the *attention recovery* per layer
and head: the share of the dense model's attention mass (rows of the last query block, where
the queries are) that falls on the kept tokens. For window+topk it also reports two oracles
at the same budget: the best B/2 blocks by true attention mass (the estimator's ceiling) and
the best B*block tokens per row (what a token-granular selection could reach): the gap between
them measures whether block granularity is too coarse.

    python examples/topk_quality.py --out benchmarks/results/topk_quality           # one GPU, ~2-3 min
    TRITON_INTERPRET=1 python examples/topk_quality.py --config cpu --out /tmp/tq   # smoke run (decode method
                                                                                    # on 4 sequences)
    python examples/topk_quality.py --config cpu_quality --parts candidates --out /tmp/tqc  # the candidate
                                                                                    # study on the CPU, ~4 min

Writes ``topk_quality.json`` and ``topk_quality.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F

import s2dsl
from s2dsl.runtime.topk import select_blocks

import train_tiny as tt

SPARSITIES = (0.5, 0.8, 0.9)
# window+topk twice: with the prefill's default block-pooled estimator and with ALISA/SnapKV's last row
METHODS = ("window", "window+stride", "window+topk", "window+topk (last row)", "window+topk (bound)",
           "window+topk (decode)", "window+topk by bound (decode)")
# the pattern each method runs (method_patterns' keys)
METHOD_PATTERN = {"window": "window", "window+stride": "window+stride", "window+topk": "window+topk",
                  "window+topk (last row)": "window+topk", "window+topk (bound)": "window+topk",
                  "window+topk (decode)": "window+topk",
                  "window+topk by bound (decode)": "window+topk by bound"}
# --kv-int8: the decode path over an INT8 paged cache, each beside its 16-bit twin (issue 12)
INT8_METHODS = ("dense (decode)", "dense (decode, INT8)", "window+topk (decode, INT8)",
                "window+topk by bound (decode, INT8)")
METHOD_PATTERN.update({"dense (decode)": "dense", "dense (decode, INT8)": "dense",
                       "window+topk (decode, INT8)": "window+topk",
                       "window+topk by bound (decode, INT8)": "window+topk by bound"})


def method_patterns(cfg: tt.Config, sparsity: float) -> dict:
    """The three sparse methods at this KV sparsity (budget counted at the last query block)."""
    nb, H, B = cfg.n_blocks, cfg.heads, cfg.block
    budget = max(2, round((1 - sparsity) * nb))
    w = max(1, budget // 2)
    rest = budget - w
    stride = max(1, math.ceil((nb - w) / max(rest, 1)))
    text = f"""
pattern win {{ block = {B} heads = {H} heads * {{ window {budget} }} }}
pattern win_stride {{ block = {B} heads = {H} heads * {{ window {w} stride {stride} offset h }} }}
pattern win_topk {{ block = {B} heads = {H} heads * {{ window {w} topk {rest} }} }}
pattern win_topk_bound {{ block = {B} heads = {H} heads * {{ window {w} topk {rest} by bound }} }}
pattern whole {{ block = {B} heads = {H} heads * {{ window {nb} }} }}
"""
    f = s2dsl.parse(text, "<topk_quality>")
    return {"window": f["win"], "window+stride": f["win_stride"], "window+topk": f["win_topk"],
            "window+topk by bound": f["win_topk_bound"], "dense": f["whole"], "_budget": budget, "_window": w}


def attention_for(pattern, device, estimator: str = "pooled"):
    """q, k, v (batch, heads, seq, dim) -> out, causal, under ``pattern`` (None: dense)."""
    if pattern is None:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if pattern.is_static:
        return tt.attention_fn(pattern, "kernel" if device == "cuda" else "mask")
    if device == "cuda":
        def kernel(q, k, v):
            with torch.autocast("cuda", enabled=False):
                return s2dsl.attention(q, k, v, pattern, topk_estimator=estimator)
        return kernel

    def reference(q, k, v):  # the CPU smoke run: the same selection, the dense reference
        sel = select_blocks(q, k, pattern, estimator=estimator)
        return s2dsl.reference_attention(q, k, v, pattern, selection=sel).to(q.dtype)
    return reference


def decode_attention(pattern, tail: int, device, record: list, kv_dtype=None):
    """q, k, v (batch, heads, T, dim) -> out, the way a decode produces it: the first ``T - tail``
    tokens prefilled through a paged cache, the last ``tail`` decoded one step at a time. The model
    is causal, so running a whole layer this way gives exactly the rows a token-by-token decode
    computes (with this layer's cache and top-k state). Appends, per call (layer), each head's
    mean share of the dense attention of the decoded rows on what the step kept. ``kv_dtype``:
    ``torch.int8`` stores the cache's pages as INT8 codes (the prompt's own prefill attends its
    16-bit K/V, every decoded row reads INT8, as in serving)."""
    import warnings
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.kv_cache import PagedKVCache
    from s2dsl.runtime.topk_state import state_for

    kernel_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ks = [spec.topk[0].k if spec.topk else 0 for spec in pattern.head_specs]

    @torch.no_grad()
    def attn(q, k, v):
        b, H, T, d = q.shape
        qc, kc, vc = (t.to(kernel_dtype).contiguous() for t in (q, k, v))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # topk heads keep every page
            cache = PagedKVCache(pattern, num_pages=b * pattern.kv_heads * (T // pattern.block + 2), head_dim=d,
                                 dtype=kernel_dtype, device=device, max_seqs=b, kv_dtype=kv_dtype)
        ids = [cache.add_sequence() for _ in range(b)]
        with torch.autocast(device, enabled=False):
            first = T - tail
            outs = [cached_attention(cache, ids, qc[:, :, :first], kc[:, :, :first], vc[:, :, :first])]
            state = state_for(cache)
            slots = torch.tensor([cache.slot(i) for i in ids], device=device).long()
            static_rows = {}
            kept = torch.zeros(b, H, device=device)
            none = torch.full((b, pattern.kv_heads, 1), -1, dtype=torch.long, device=device)  # a static pattern
            for t in range(first, T):
                used = none if state is None else state.selection[slots].clone()       # (b, kv, K)
                outs.append(cached_attention(cache, ids, qc[:, :, t:t + 1], kc[:, :, t:t + 1], vc[:, :, t:t + 1]))
                if state is not None and state.has_bound:  # 'by bound' selects inside the step, from its query
                    used = state.selection[slots].clone()
                sel = used.repeat_interleave(pattern.group_size, 1).long()
                sel = torch.where(torch.arange(sel.shape[-1], device=device).view(1, 1, -1)
                                  < torch.tensor(ks, device=device).view(1, -1, 1), sel, -1)     # (b, H, K)
                i = t // pattern.block
                if i not in static_rows:  # the static blocks of query block i, per head
                    static_rows[i] = pattern.block_mask(i + 1)[:, i].to(device)               # (H, i + 1)
                keep_b = F.pad(static_rows[i], (0, 1)).unsqueeze(0).expand(b, -1, -1).clone()  # + a spare column
                keep_b.scatter_(-1, torch.where(sel >= 0, sel, i + 1), True)                    # -1: the spare
                mask = keep_b[..., :i + 1].repeat_interleave(pattern.block, -1)[..., :t + 1]    # (b, H, t + 1)
                logits = torch.einsum("bhd,bhnd->bhn", q[:, :, t].float(), k[:, :, :t + 1].float()) / math.sqrt(d)
                probs = torch.softmax(logits, -1)                                       # the dense row
                kept += (probs * mask).sum(-1)
            record.append((kept / tail).mean(0).tolist())
        return torch.cat(outs, 2).to(q.dtype)
    return attn


# ---------------------------------------------------------------- decode-time selection candidates
# (issue 11's quality gap): torch reference of what each candidate keeps for each decoded row,
# run on the CPU as on the GPU; the prompt is attended densely (decode-time KV sparsity, as Quest
# and ALISA's decode measure it), the query region one row at a time under the candidate's selection.
# A candidate = (scorer, page in tokens): the window is the budget's first half rounded to pages,
# the selection the rest, in pages of that size (page 1 = token-granular).

#: scorers: "alisa" = attention mass the page got over all previous decode steps (seeded by the
#: dense attention of the prompt's last OBSERVATION_ROWS rows, as runtime/topk_state.py does);
#: "quest" = upper bound of q.k over the page from its keys' channel-wise min and max (Quest,
#: max over the kv group's q heads; no history); "oracle" = the row's true dense mass per page
SCORERS = ("alisa", "quest", "oracle")
OBSERVATION_ROWS = 16


def decode_candidates(block: int):
    """(name, scorer, page tokens) studied at decode; pages of the task block, half of it, and tokens."""
    pages = sorted({block, max(1, block // 4)}, reverse=True)
    out = [("window only", None, block)]
    for scorer in SCORERS:
        for page in pages + [1]:
            out.append((f"{scorer} page {page}" if page > 1 else f"{scorer} token", scorer, page))
    return out


def _page_sums(x: torch.Tensor, page: int) -> torch.Tensor:
    """Sum of the last dim of ``x`` over pages of ``page`` entries (the last page zero-padded)."""
    n = x.shape[-1]
    n_pages = -(-n // page)
    return F.pad(x, (0, n_pages * page - n)).view(*x.shape[:-1], n_pages, page).sum(-1)


def quest_bounds(q: torch.Tensor, k: torch.Tensor, page: int, group: int = 1) -> torch.Tensor:
    """Quest's page score: per (q row, kv page), sum over channels of max(q_c min_c, q_c max_c),
    the largest q.k any key of the page could give; the max over the kv group's q heads.
    q (b, H, rows, d), k (b, H_kv, T, d) -> (b, H, rows, pages). Pages are full (the last one
    is padded with its own keys' extremes)."""
    b, hk, T, d = k.shape
    n_pages = -(-T // page)
    pad = n_pages * page - T
    kp = torch.cat([k, k[:, :, -1:].expand(b, hk, pad, d)], 2) if pad else k
    kp = kp.view(b, hk, n_pages, page, d)
    lo, hi = kp.amin(3), kp.amax(3)                                                   # (b, hk, pages, d)
    qg = q.view(b, hk, group, q.shape[2], 1, d)
    ub = torch.maximum(qg * lo[:, :, None, None], qg * hi[:, :, None, None]).sum(-1)  # (b, hk, G, rows, pages)
    return ub.amax(2, keepdim=True).expand_as(ub).reshape(b, hk * group, q.shape[2], n_pages)


def candidate_attention(scorer, page: int, window_tokens: int, select_tokens: int, tail: int, record: list,
                        query_rows=None):
    """q, k, v (b, H, T, d) -> out: the prompt dense, the last ``tail`` rows each attending its
    window (``window_tokens`` rounded to pages) plus ``select_tokens // page`` pages chosen by
    ``scorer`` among those wholly before the window (None: the window alone, of window + select
    tokens). Appends per call (layer) each head's mean dense-attention share on what rows kept: over
    all ``tail`` rows, and over ``query_rows`` (indices into the tail: the queried keys' rows)."""
    @torch.no_grad()
    def attn(q, k, v):
        b, H, T, d = q.shape
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        first = T - tail
        qf, kf, vf = q.float(), k.float(), v.float()
        logits = (qf[:, :, first:] @ kf.transpose(-1, -2)) * d ** -0.5                  # (b, H, tail, T)
        pos = torch.arange(first, T, device=q.device)
        cols = torch.arange(T, device=q.device)
        causal = cols.view(1, -1) <= pos.view(-1, 1)
        dense = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        w_pages = max(1, window_tokens // page) if scorer else max(1, (window_tokens + select_tokens) // page)
        k_pages = select_tokens // page if scorer else 0
        row_page, col_page = pos // page, cols // page
        window = causal & (col_page.view(1, -1) > row_page.view(-1, 1) - w_pages)     # (tail, T)
        n_pages = -(-T // page)
        selectable = torch.arange(n_pages, device=q.device).view(1, -1) <= (row_page - w_pages).view(-1, 1)
        keep = window.expand(b, H, tail, T).clone()
        if k_pages > 0 and scorer in ("quest", "oracle"):
            score = quest_bounds(qf[:, :, first:], kf, page) if scorer == "quest" else _page_sums(dense, page)
            score = score.masked_fill(~selectable, float("-inf"))
            val, idx = score.topk(min(k_pages, n_pages), -1)
            chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, val > float("-inf"))
            keep |= chosen.repeat_interleave(page, -1)[..., :T]
        probs = None
        if k_pages > 0 and scorer == "alisa":  # sequential: each step's selection is the history's
            rows_obs = min(OBSERVATION_ROWS, first)
            ql = qf[:, :, first - rows_obs:first]
            lo = (ql @ kf[:, :, :first].transpose(-1, -2)) * d ** -0.5
            fut = cols[:first].view(1, -1) > torch.arange(first - rows_obs, first, device=q.device).view(-1, 1)
            seed = torch.softmax(lo.masked_fill(fut, float("-inf")), -1).sum(2)         # (b, H, first)
            score = _page_sums(F.pad(seed, (0, T - first)), page)                       # (b, H, n_pages)
            probs = torch.zeros_like(dense)
            for r in range(tail):
                s = score.masked_fill(~selectable[r], float("-inf"))
                val, idx = s.topk(min(k_pages, n_pages), -1)
                chosen = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, val > float("-inf"))
                keep[:, :, r] |= chosen.repeat_interleave(page, -1)[..., :T]
                p_r = torch.softmax(logits[:, :, r].masked_fill(~keep[:, :, r], float("-inf")), -1)
                probs[:, :, r] = p_r
                score = score + _page_sums(p_r, page)                                    # the mass this step gave
        if probs is None:
            probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1)
        out = out.clone()
        out[:, :, first:] = (probs @ vf).to(out.dtype)
        kept = (dense * keep).sum(-1)                                                    # (b, H, tail)
        qr = kept if query_rows is None else kept[:, :, query_rows]
        record.append((kept.mean((0, 2)).tolist(), qr.mean((0, 2)).tolist()))
        return out
    return attn


def decode_study(model, cfg, eval_set, device, sparsity: float, tail: int, vis) -> dict:
    """Every decode-time candidate at this KV sparsity: accuracy, answer perplexity, recovery."""
    budget = max(2, round((1 - sparsity) * cfg.n_blocks))
    w = max(1, budget // 2)
    res = {}
    T = eval_set[0][0].shape[1]
    query_rows = (eval_set[0][1] - (T - tail)).tolist()  # the queried keys' rows: where retrieval happens
    for name, scorer, page in decode_candidates(cfg.block):
        calls = []
        r = evaluate_method(model, cfg, eval_set, device, candidate_attention(
            scorer, page, w * cfg.block, (budget - w) * cfg.block, tail, calls, query_rows), vis)
        per_call = torch.tensor(calls).view(-1, cfg.layers, 2, cfg.heads)              # (batches, layers, rows, heads)
        r["recovery_per_layer_head"] = per_call[:, :, 0].mean(0).tolist()
        r["recovery_mean"] = float(per_call[:, :, 0].mean())
        r["recovery_min_head"] = float(per_call[:, :, 0].mean(0).min())
        r["recovery_query_rows_per_layer_head"] = per_call[:, :, 1].mean(0).tolist()
        r["recovery_query_rows_mean"] = float(per_call[:, :, 1].mean())
        r["recovery_query_rows_max_head"] = float(per_call[:, :, 1].mean(0).max())
        r.update(scorer=scorer, page=page, window_tokens=w * cfg.block, select_tokens=(budget - w) * cfg.block)
        res[name] = r
        print(f"  decode {sparsity:.0%} {name:16s}: accuracy {r['accuracy']:.3f}  ppl {r['answer_perplexity']:.3f}  "
              f"recovery {r['recovery_mean']:.3f} (min head {r['recovery_min_head']:.3f}; query rows "
              f"{r['recovery_query_rows_mean']:.3f}, best head {r['recovery_query_rows_max_head']:.3f})", flush=True)
    return res


def use(model, attn):
    for layer in model.layers:
        layer.attn = attn


def train_dense(cfg: tt.Config, device, budget_s: float):
    """The dense model, trained for about ``budget_s`` seconds (step count from a timing)."""
    probe = tt.build(cfg, None, "mask", device)
    opt = tt.make_opt(probe, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 99)
    batches = [tt.make_batch(cfg, cfg.batch, gen, device) for _ in range(8)]
    for i, b in enumerate(batches):
        if i == 3:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        tt.step_fn(probe, opt, cfg, b, cfg.steps - 1, device)
    if device == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / 5
    steps = min(cfg.steps, max(2 * cfg.warmup, int(budget_s / (1.1 * per_step))))
    cfg = replace(cfg, steps=steps)
    print(f"training dense: {steps} steps (~{per_step * 1e3:.0f} ms/step at {cfg.seq} tokens)", flush=True)
    model = tt.build(cfg, None, "mask", device)
    opt = tt.make_opt(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        t_len = cfg.seq_at(step)
        loss = tt.step_fn(model, opt, cfg, tt.make_batch(cfg, cfg.batch * cfg.seq // t_len, gen, device, t_len),
                          step, device)
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            print(f"  step {step + 1}: loss {loss.item():.3f}", flush=True)
    return model.eval(), cfg, time.perf_counter() - t0


@torch.no_grad()
def capture_qk(model, cfg, batch, device):
    """q and k of every layer on ``batch`` under dense attention."""
    captured = []

    def dense(q, k, v):
        captured.append((q.detach(), k.detach()))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    use(model, dense)
    x, qpos, _, _ = batch
    with tt.autocast(cfg, device):
        model(x, qpos)
    return captured


@torch.no_grad()
def recovery(cfg, captured, pattern, rows: int, estimator: str = "pooled"):
    """Per (layer, head): mean share of the dense attention mass of the last ``rows`` query rows
    on the tokens ``pattern`` keeps (with its selection); plus, for topk patterns, the
    block-oracle and token-oracle recoveries at the same budget. Lists over layers of lists
    over heads."""
    out = {"kept": [], "block_oracle": [], "token_oracle": []}
    B = cfg.block
    for q, k in captured:
        q, k = q.float(), k.float()
        b, H, T, d = q.shape
        nb = T // B
        logits = (q[:, :, -rows:] @ k.transpose(-1, -2)) / math.sqrt(d)                  # (b, H, rows, T)
        pos = torch.arange(T - rows, T, device=q.device).view(-1, 1)
        future = torch.arange(T, device=q.device).view(1, -1) > pos
        probs = torch.softmax(logits.masked_fill(future, float("-inf")), -1)
        sel = None if pattern.is_static else select_blocks(q, k, pattern, estimator=estimator)
        keep_b = pattern.block_mask(nb, nb, 0, selection=None if sel is None else sel.cpu())
        if sel is None:
            keep_b = keep_b.unsqueeze(0).expand(b, -1, -1, -1)
        # per row: the row's query block, its kept kv blocks expanded to tokens
        row_blocks = (torch.arange(T - rows, T) // B)
        keep_t = keep_b[:, :, row_blocks].repeat_interleave(B, -1).to(q.device)         # (b, H, rows, T)
        out["kept"].append((probs * keep_t).sum(-1).mean((0, 2)).tolist())
        if sel is not None:
            w = pattern.head_specs[0].window
            kk = pattern.head_specs[0].topk[0].k
            static = pattern.block_mask(nb, nb, 0)[:, row_blocks].repeat_interleave(B, -1).to(q.device)
            mass = (probs * ~static).view(b, H, rows, nb, B).sum((2, 4))                  # (b, H, nb) outside static
            top = mass.topk(min(kk, nb), -1).indices
            oracle = torch.zeros(b, H, nb, dtype=torch.bool, device=q.device).scatter_(-1, top, True)
            keep_o = static | oracle.repeat_interleave(B, -1).unsqueeze(2)
            out["block_oracle"].append((probs * keep_o).sum(-1).mean((0, 2)).tolist())
            n_tokens = (w + kk) * B
            out["token_oracle"].append(probs.topk(min(n_tokens, T), -1).values.sum(-1).mean((0, 2)).tolist())
    return out


def evaluate_method(model, cfg, eval_set, device, attn, vis):
    use(model, attn)
    correct, dists, loss = tt.evaluate(model, cfg, eval_set, device)
    res = tt.summarize(correct, dists, cfg, vis)
    res["answer_loss"] = loss
    res["answer_perplexity"] = math.exp(loss)
    return res


def plot(result: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    methods = [m for m in result["sparsities"][0]["methods"]]  # the ones this run measured
    sp = [r["sparsity"] for r in result["sparsities"]]
    ax = axes[0]
    for m in methods:
        ax.plot(sp, [r["methods"][m]["accuracy"] for r in result["sparsities"]], "o-", label=m)
    ax.axhline(result["dense"]["accuracy"], color="k", ls="--", label="dense")
    ax.axhline(result["chance"], color="gray", ls=":", label="chance")
    ax.set_xlabel("KV sparsity")
    ax.set_ylabel("retrieval accuracy")
    ax.legend()
    ax.set_title("accuracy at equal KV budget")
    ax = axes[1]
    for m in methods:
        ax.plot(sp, [r["methods"][m]["recovery_mean"] for r in result["sparsities"]], "o-", label=m)
    if "window+topk" in methods:
        ax.plot(sp, [r["methods"]["window+topk"]["block_oracle_mean"] for r in result["sparsities"]], "k^:",
                label="window + best blocks (oracle)")
        ax.plot(sp, [r["methods"]["window+topk"]["token_oracle_mean"] for r in result["sparsities"]], "kv:",
                label="token oracle, same budget")
    ax.set_xlabel("KV sparsity")
    ax.set_ylabel("attention recovery (mean over heads)")
    ax.legend(fontsize=8)
    ax.set_title("share of dense attention mass kept")
    ax = axes[2]
    at = next((r for r in result["sparsities"] if abs(r["sparsity"] - 0.8) < 1e-9), result["sparsities"][-1])
    for m in methods:
        by_d = at["methods"][m]["accuracy_by_distance"]
        ds = sorted(int(d) for d in by_d)
        ax.plot(ds, [by_d[d] for d in ds], ".-", label=m)
    by_d = result["dense"]["accuracy_by_distance"]
    ds = sorted(int(d) for d in by_d)
    ax.plot(ds, [by_d[d] for d in ds], "k--", label="dense")
    ax.set_xlabel("distance (blocks)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"by distance at sparsity {at['sparsity']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_candidates(result: dict):
    """The decode-time candidates as a markdown table: accuracy / recovery per sparsity."""
    rows = result["sparsities"]
    names = list(rows[0]["decode_candidates"])
    print("\n| decode-time selection | " + " | ".join(f"{r['sparsity']:.0%} acc / rec / query-row rec (best head)"
                                                   for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    print("| dense | " + " | ".join(f"{result['dense']['accuracy']:.3f} / 1.000 / 1.000 (1.000)" for _ in rows) + " |")
    for n in names:
        print(f"| {n} | " + " | ".join(f"{r['decode_candidates'][n]['accuracy']:.3f} / "
                                        f"{r['decode_candidates'][n]['recovery_mean']:.3f} / "
                                        f"{r['decode_candidates'][n]['recovery_query_rows_mean']:.3f} "
                                        f"({r['decode_candidates'][n]['recovery_query_rows_max_head']:.3f})"
                                        for r in rows) + " |")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(tt.CONFIGS), default="gpu")
    ap.add_argument("--out", type=str, default="topk_quality_out")
    ap.add_argument("--train-budget", type=float, default=None, help="seconds of training (default per config)")
    ap.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    ap.add_argument("--decode-batches", type=int, default=None,
                    help="eval batches the decode methods run (default: 8 on CUDA, 1 on the CPU)")
    ap.add_argument("--decode-sequences", type=int, default=None,
                    help="sequences of each such batch it runs (default: all on CUDA, 4 on the CPU)")
    ap.add_argument("--block", type=int, default=None,
                    help="pattern block in tokens (default per config); the task keeps each pair inside one block")
    ap.add_argument("--parts", nargs="+", choices=("methods", "candidates"), default=["methods", "candidates"],
                    help="methods: the patterns above (prefill and the library's decode path); candidates: the "
                         "decode-time selection candidates (torch reference, any device)")
    ap.add_argument("--load", type=str, default=None, help="a dense model's state_dict saved by --save (skips training)")
    ap.add_argument("--save", type=str, default=None, help="save the trained dense model's state_dict here")
    ap.add_argument("--kv-int8", action="store_true",
                    help="also run the decode methods over an INT8 paged cache, and dense through the decode path "
                         "in 16 bits and INT8 (%s)" % ", ".join(INT8_METHODS))
    ap.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                    help="run only these methods (names as printed; default: all, with --kv-int8's)")
    args = ap.parse_args(argv)
    names = list(METHODS) + (list(INT8_METHODS) if args.kv_int8 else [])
    if args.methods is not None:
        unknown = sorted(set(args.methods) - set(names))
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; choose from {names}")
        names = [n for n in names if n in args.methods]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = tt.CONFIGS[args.config]
    if args.block is not None:
        cfg = replace(cfg, block=args.block)
    if device == "cpu":
        torch.set_num_threads(1)
        if args.decode_batches is None:  # the interpreter runs every decode step's kernels in Python
            args.decode_batches, args.decode_sequences = 1, args.decode_sequences or 4
    elif args.decode_batches is None:  # two decode methods step through the kernels eagerly: bounded time
        args.decode_batches = 8
    budget = args.train_budget if args.train_budget is not None else (200.0 if device == "cuda" else 20.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")
    t_start = time.perf_counter()
    if args.load:
        model, train_s = tt.build(cfg, None, "mask", device), 0.0
        model.load_state_dict(torch.load(args.load, map_location=device))
        model.eval()
    else:
        model, cfg, train_s = train_dense(cfg, device, budget)
    if args.save:
        torch.save(model.state_dict(), args.save)
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    eval_set = [tt.make_batch(cfg, cfg.batch, gen, device) for _ in range(cfg.eval_batches)]
    vis = ["direct"] * cfg.n_blocks  # dense sees everything
    result = {"config": asdict(cfg), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "train_s": train_s, "chance": 1 / cfg.n_values, "rows": cfg.block,
              "estimator": "block-pooled q.k (s2dsl.runtime.topk.select_blocks)",
              "loaded_model": args.load}  # a loaded model's training is not in "config" / "train_s"
    result["dense"] = evaluate_method(model, cfg, eval_set, device, attention_for(None, device), vis)
    print(f"dense: accuracy {result['dense']['accuracy']:.3f}, answer perplexity "
          f"{result['dense']['answer_perplexity']:.3f}", flush=True)
    captured = capture_qk(model, cfg, eval_set[0], device)
    x0, qpos0, _, _ = eval_set[0]
    tail = cfg.seq - int(qpos0.min())  # the query region, decoded token by token in the decode method
    decode_batches = len(eval_set) if args.decode_batches is None else max(1, min(args.decode_batches, len(eval_set)))
    rows = args.decode_sequences or cfg.batch
    decode_set = [(x[:rows], qpos, y[:rows], dist[:rows]) for x, qpos, y, dist in eval_set[:decode_batches]]
    result["sparsities"] = []
    answer_logits = {}  # method -> the answer logits of its last evaluation (INT8 vs 16-bit twin)
    hook = model.register_forward_hook(lambda m, i, o: answer_logits.setdefault("_last", []).append(o.detach().float()))
    for s in args.sparsities:
        pats = method_patterns(cfg, s)
        row = {"sparsity": s, "budget_blocks": pats["_budget"], "window_blocks": pats["_window"], "methods": {}}
        if "candidates" in args.parts:
            row["decode_candidates"] = decode_study(model, cfg, eval_set, device, s, tail, vis)
        for name in (names if "methods" in args.parts else ()):
            p = pats[METHOD_PATTERN[name]]
            est = "last_row" if name.endswith("(last row)") else "bound" if name.endswith("(bound)") else "pooled"
            answer_logits["_last"] = []
            if "(decode" in name:  # ALISA's path: decode the query region step by step
                calls = []
                kv_dtype = torch.int8 if name.endswith("INT8)") else None
                res = evaluate_method(model, cfg, decode_set, device,
                                      decode_attention(p, tail, device, calls, kv_dtype), vis)
                answer_logits[name] = torch.cat(answer_logits["_last"])
                twin = answer_logits.get(name.replace(", INT8", ""))
                if kv_dtype is not None and twin is not None:
                    diff = (answer_logits[name] - twin).abs()
                    std = float(twin.std())
                    res["int8_vs_16bit"] = {
                        "twin": name.replace(", INT8", ""), "logit_std": std,
                        "max_abs_logit_change_over_std": float(diff.max()) / std,
                        "mean_abs_logit_change_over_std": float(diff.mean()) / std,
                        "argmax_agreement": float((answer_logits[name].argmax(-1) == twin.argmax(-1)).float().mean())}
                per_call = torch.tensor(calls).view(-1, cfg.layers, cfg.heads)         # (batches, layers, heads)
                rec = {"kept": per_call.mean(0).tolist(), "block_oracle": [], "token_oracle": []}
                res["eval_sequences"] = sum(x.shape[0] for x, *_ in decode_set)
                res["recovery_rows"] = f"the {tail} decoded rows (the query region)"
            else:
                res = evaluate_method(model, cfg, eval_set, device, attention_for(p, device, est), vis)
                rec = recovery(cfg, captured, p, cfg.block, est)
            res["pattern"] = p.to_source()
            res["recovery_per_layer_head"] = rec["kept"]
            res["recovery_mean"] = float(torch.tensor(rec["kept"]).mean())
            res["recovery_min_head"] = float(torch.tensor(rec["kept"]).min())
            if rec["block_oracle"]:
                res["block_oracle_per_layer_head"] = rec["block_oracle"]
                res["token_oracle_per_layer_head"] = rec["token_oracle"]
                res["block_oracle_mean"] = float(torch.tensor(rec["block_oracle"]).mean())
                res["token_oracle_mean"] = float(torch.tensor(rec["token_oracle"]).mean())
            row["methods"][name] = res
            print(f"sparsity {s:.0%} {name:22s}: accuracy {res['accuracy']:.3f}  ppl {res['answer_perplexity']:.3f}  "
                  f"recovery {res['recovery_mean']:.3f} (min head {res['recovery_min_head']:.3f})"
                  + (f"  block oracle {res['block_oracle_mean']:.3f}  token oracle {res['token_oracle_mean']:.3f}"
                     if "block_oracle_mean" in res else "")
                  + (f"  INT8 vs 16-bit logits: max {res['int8_vs_16bit']['max_abs_logit_change_over_std']:.4f}, "
                     f"mean {res['int8_vs_16bit']['mean_abs_logit_change_over_std']:.4f} of their std, argmax "
                     f"agreement {res['int8_vs_16bit']['argmax_agreement']:.3f}" if "int8_vs_16bit" in res else ""),
                  flush=True)
        result["sparsities"].append(row)
        (out / "topk_quality.json").write_text(json.dumps(result, indent=1))
    hook.remove()
    result["total_s"] = time.perf_counter() - t_start
    (out / "topk_quality.json").write_text(json.dumps(result, indent=1))
    if "methods" in args.parts:
        plot(result, out / "topk_quality.png")
    if "candidates" in args.parts:
        print_candidates(result)
    print(f"wrote {out / 'topk_quality.json'} and {out / 'topk_quality.png'} ({result['total_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
