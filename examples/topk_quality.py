"""Quality of dynamic top-k (ALISA's sparse window attention) vs static patterns at equal KV budget.

Trains the dense model of ``examples/train_tiny.py`` (multi-query associative recall: keys and
values scattered over a long context, queried at the end), then swaps its attention, with no
further training, for patterns that keep a fraction of the context (KV sparsity 50/80/90%: the
last query block keeps ``B = (1 - sparsity) * n_blocks`` kv blocks):

* ``window``:        ``window B``
* ``window+stride``: ``window B/2  stride S offset h`` (S so that the shard holds the other B/2)
* ``window+topk``:   ``window B/2  topk B/2`` (ALISA's SWA) with the prefill's default
  block-pooled estimator, and again with the ``last_row`` estimator (ALISA / SnapKV)
* ``dense``

and measures, per method and sparsity: retrieval accuracy (overall and by distance), the
answers' perplexity (exp of their mean cross-entropy), and the *attention recovery* per layer
and head: the share of the dense model's attention mass (rows of the last query block, where
the queries are) that falls on the kept tokens. For window+topk it also reports two oracles
at the same budget: the best B/2 blocks by true attention mass (the estimator's ceiling) and
the best B*block tokens per row (what a token-granular selection could reach): the gap between
them measures whether block granularity is too coarse.

    python examples/topk_quality.py --out benchmarks/results/topk_quality           # one H100, < 8 min
    TRITON_INTERPRET=1 python examples/topk_quality.py --config cpu --out /tmp/tq   # smoke run

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
METHODS = ("window", "window+stride", "window+topk", "window+topk (last row)")


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
"""
    f = s2dsl.parse(text, "<topk_quality>")
    return {"window": f["win"], "window+stride": f["win_stride"], "window+topk": f["win_topk"],
            "_budget": budget, "_window": w}


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
    methods = list(METHODS)
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(tt.CONFIGS), default="gpu")
    ap.add_argument("--out", type=str, default="topk_quality_out")
    ap.add_argument("--train-budget", type=float, default=None, help="seconds of training (default per config)")
    ap.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    ap.add_argument("--block", type=int, default=None,
                    help="pattern block in tokens (default per config); the task keeps each pair inside one block")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = tt.CONFIGS[args.config]
    if args.block is not None:
        cfg = replace(cfg, block=args.block)
    if device == "cpu":
        torch.set_num_threads(1)
    budget = args.train_budget if args.train_budget is not None else (200.0 if device == "cuda" else 20.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")
    t_start = time.perf_counter()
    model, cfg, train_s = train_dense(cfg, device, budget)
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    eval_set = [tt.make_batch(cfg, cfg.batch, gen, device) for _ in range(cfg.eval_batches)]
    vis = ["direct"] * cfg.n_blocks  # dense sees everything
    result = {"config": asdict(cfg), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "train_s": train_s, "chance": 1 / cfg.n_values, "rows": cfg.block,
              "estimator": "block-pooled q.k (s2dsl.runtime.topk.select_blocks)"}
    result["dense"] = evaluate_method(model, cfg, eval_set, device, attention_for(None, device), vis)
    print(f"dense: accuracy {result['dense']['accuracy']:.3f}, answer perplexity "
          f"{result['dense']['answer_perplexity']:.3f}", flush=True)
    captured = capture_qk(model, cfg, eval_set[0], device)
    result["sparsities"] = []
    for s in args.sparsities:
        pats = method_patterns(cfg, s)
        row = {"sparsity": s, "budget_blocks": pats["_budget"], "window_blocks": pats["_window"], "methods": {}}
        for name in METHODS:
            p = pats[name.split(" ")[0]]
            est = "last_row" if name.endswith("(last row)") else "pooled"
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
                     if "block_oracle_mean" in res else ""), flush=True)
        result["sparsities"].append(row)
        (out / "topk_quality.json").write_text(json.dumps(result, indent=1))
    result["total_s"] = time.perf_counter() - t_start
    (out / "topk_quality.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "topk_quality.png")
    print(f"wrote {out / 'topk_quality.json'} and {out / 'topk_quality.png'} ({result['total_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
