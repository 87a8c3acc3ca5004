"""Calibrate per-head budgets (S-HPLB) on a model trained here, and place its heads.

No checkpoint can be downloaded on these machines, so this trains a small Hugging Face
Llama on ``train_tiny.py``'s long-context key-value retrieval task (retrieval needs a few
heads to look far back while others can stay local), then:

1. runs ``s2dsl.calibrate.calibrate`` on fresh task sequences at two lengths (recovery
   curves, budgets at the target, max-min at the same total) and on the same model
   untrained, so the heterogeneity that training creates is measured, not assumed;
2. writes PLAN.s2 / PLAN.json / PLAN.png (``s2dsl check`` reads the .s2);
3. places every layer's heads on 2 GPUs (``s2dsl.parallel.place``) and prints the imbalance
   of the contiguous split vs the placement.

    python examples/calibrate_tiny.py --config cpu --out /tmp/cal_tiny      # a few minutes of CPU
    python examples/calibrate_tiny.py --config gpu --out /tmp/cal_tiny_gpu  # one GPU, < 5 minutes

Writes OUT/summary.json with the task accuracy, both calibrations' summaries and the placements.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout

import torch
import torch.nn.functional as F

from s2dsl.calibrate import calibrate, write_outputs
from s2dsl.parallel import place


def _train_tiny():
    spec = importlib.util.spec_from_file_location("train_tiny", HERE / "train_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_tiny"] = mod
    spec.loader.exec_module(mod)
    return mod


tt = _train_tiny()

CONFIGS = {
    # train_tiny's CPU task at 128 tokens, blocks of 16; calibration at 64 and 128 tokens
    "cpu": dict(task=replace(tt.CONFIGS["cpu"], steps=400, lr=3e-3), lengths=[64, 128], samples=4, target=0.9,
                heads=4, kv_heads=2, layers=2, d_model=64),
    "gpu": dict(task=replace(tt.CONFIGS["cpu"], seq=1024, block=64, d_model=256, heads=8, n_filler=256,
                             n_keys=64, n_values=64, n_pairs=12, n_queries=8, batch=32, steps=2000, lr=2e-3,
                             warmup=100, curriculum="0.3:256,0.6:512"),
                lengths=[512, 1024], samples=8, target=0.9, heads=8, kv_heads=4, layers=4, d_model=256),
}


def build(cfg: dict, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    task = cfg["task"]
    config = LlamaConfig(vocab_size=task.vocab, hidden_size=cfg["d_model"], intermediate_size=4 * cfg["d_model"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["kv_heads"], max_position_embeddings=task.seq,
                         attn_implementation="sdpa")
    torch.manual_seed(task.seed)
    return LlamaForCausalLM(config).to(device)


def answer_logits(model, x, qpos):
    return model(input_ids=x, use_cache=False).logits[:, qpos]


def train(model, task, device, log):
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr, betas=(0.9, 0.95), weight_decay=task.weight_decay)
    gen = torch.Generator().manual_seed(task.seed + 1)
    model.train()
    for step in range(task.steps):
        for g in opt.param_groups:
            g["lr"] = tt.lr_at(task, step)
        seq = task.seq_at(step)  # train_tiny's length curriculum: short first, same tokens per step
        x, qpos, y, _ = tt.make_batch(task, task.batch * task.seq // seq, gen, device, seq=seq)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
            logits = answer_logits(model, x, qpos)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % max(1, task.steps // 10) == 0 or step == task.steps - 1:
            log(f"step {step}: loss {loss.item():.3f}")
    model.eval()


@torch.no_grad()
def accuracy(model, task, device) -> float:
    gen = torch.Generator().manual_seed(task.seed + 99)
    right = total = 0
    for _ in range(4):
        x, qpos, y, _ = tt.make_batch(task, task.batch, gen, device)
        right += int((answer_logits(model, x, qpos).argmax(-1) == y).sum())
        total += y.numel()
    return right / total


def calibration_ids(task, n_seqs: int) -> torch.Tensor:
    """A stream of fresh task sequences (never seen in training) cut back to back."""
    gen = torch.Generator().manual_seed(task.seed + 12345)
    x, _, _, _ = tt.make_batch(task, n_seqs, gen, "cpu")
    return x.flatten()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--out", default="calibrate_tiny_out")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    cfg = dict(CONFIGS[args.config])
    if args.steps is not None:
        cfg["task"] = replace(cfg["task"], steps=args.steps)
    task = cfg["task"]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    if device == "cpu":
        torch.set_num_threads(1)

    t0 = time.time()
    untrained = build(cfg, device).eval()
    ids = calibration_ids(task, cfg["samples"] * max(cfg["lengths"]) // task.seq + 1)
    common = dict(lengths=cfg["lengths"], samples=cfg["samples"], block=task.block, target=cfg["target"])
    before = calibrate(untrained, ids, name="untrained", **common)
    del untrained

    model = build(cfg, device)
    train(model, task, device, log)
    acc = accuracy(model, task, device)
    log(f"retrieval accuracy {acc:.3f} (chance {1 / task.n_values:.3f}) after {task.steps} steps, "
        f"{time.time() - t0:.0f} s")
    model.save_pretrained(out / "model")
    cal = calibrate(model, ids, name=f"calibrate_tiny ({args.config})", **common)
    paths = write_outputs(cal, str(out / "plan"))

    from s2dsl import load
    plan = load(paths["s2"])
    (model_plan,) = plan.models.values()
    placements = []
    for layer in range(model_plan.layers):
        p = plan.pattern_for_layer(model_plan.name, layer)
        if p is not None and p.kv_heads >= 2:
            r = place(p, 2, max(cfg["lengths"]))
            placements.append({"layer": layer, **r.to_json()})
            log(f"layer {layer}: budgets {cal.budgets[layer]}; 2 GPUs: imbalance {r.imbalance:.3f} "
                f"(contiguous {r.naive_imbalance:.3f})")

    summary = {"config": args.config, "accuracy": acc, "chance": 1 / task.n_values, "steps": task.steps,
               "trained": cal.report()["summary"], "untrained": before.report()["summary"],
               "trained_budgets": cal.budgets, "untrained_budgets": before.budgets, "placements": placements,
               "files": paths, "wall_s": time.time() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for name in ("untrained", "trained"):
        s = summary[name]
        log(f"{name:9s}: budget CV {s['budget_coefficient_of_variation_mean']:.3f}, max/min "
            f"{s['budget_max_over_min_mean']:.2f}, mean budget {100 * s['mean_budget_fraction']:.1f}% of the "
            f"context, min recovery {s['min_recovery_budgets']:.3f}")
    log(f"wrote {out / 'summary.json'} and {', '.join(paths.values())}")
    return summary


if __name__ == "__main__":
    main()
