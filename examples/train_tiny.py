"""Train a tiny decoder-only transformer on long-context key-value retrieval, three times:
dense causal attention, an S2 pattern whose union covers the context, and one whose union
does not. Writes the loss curves and the retrieval accuracy by distance to a PNG and a JSON.

The claim tested: a covering S2 pattern matches dense quality; a non-covering one fails at
exactly the distances it provably cannot see.

Task (multi-query associative recall). A sequence of random filler tokens holds
``n_pairs`` (key, value) pairs, each pair inside one block of ``block`` tokens, never in
the last block; the sequence ends with ``n_queries`` of the keys, each followed by its
value. The loss is only on the answers (predict the value after a queried key). The
distance of a query is (query block) - (block of its pair), in blocks; the pair blocks are
drawn uniformly, so every distance from 1 to ``seq/block - 1`` blocks is trained and tested.

Patterns (``.s2`` text, parsed with ``s2dsl.parse``), H heads, window W, stride S <= H:

    covering:      heads 0..H-1 { window W  stride S offset h }   # head h: j = -h (mod S)
    non-covering:  heads 0..H-1 { window W  stride S }            # all heads: j = 0 (mod S)

(``s2dsl.analyze`` proves the first covers every causal block pair and gives a
counterexample for the second.)

Which kv blocks can influence the last block through L layers at all is the L-th power of
the non-covering pattern's block-level union mask (with the residual stream, a block always
"sees" itself): information in block j may hop through a window into a block k = 0 (mod S)
in one layer and be read through the stride in the next. A pair outside that set is
*invisible*: the answer is independent of it, so the best possible accuracy is chance
(1 / n_values). The JSON and the summary report accuracy separately at visible and
invisible distances (``direct`` = reachable in one layer, ``hop`` = only through several).

Model: pre-norm decoder, token embedding plus an embedding of the previous token (a token
shift, so one attention layer can match a key and read the value next to it), partial RoPE
(half of each head's dims rotated, the rest match content at any distance), L x (attention
+ GELU MLP), AdamW with warm-up and cosine decay. Every run starts from the same
initialisation and sees the same batches. The GPU config uses a length curriculum (512,
1024, 2048 tokens, then 4096 for the last 30% of the steps; the batch grows as the length
shrinks, so every step has the same tokens): all three runs alike, evaluated at 4096 only.

Attention backends: ``kernel`` = ``s2dsl.attention`` (generated Triton kernels, forward and
backward); ``mask`` = torch SDPA with the pattern's dense token mask (the reference
semantics; fast on the CPU, where the Triton interpreter is too slow to train with).
``--impl auto`` uses the kernels on CUDA and the mask on the CPU; ``--kernel-check N``
trains N steps both ways from the same initialisation and batches and records how far the
losses and parameters drift apart (the CPU config does this under TRITON_INTERPRET=1).

    TRITON_INTERPRET=1 python examples/train_tiny.py --config cpu --out /tmp/tt   # ~2 min CPU time
    python examples/train_tiny.py --config gpu --out /tmp/tt_gpu                   # one H100, < 6 min

The GPU config lowers its step count (for all three runs alike) if the first run's speed says
the runs would not fit in ``train_budget_s``; ``--steps N`` fixes the count instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch
import torch.nn as nn
import torch.nn.functional as F

import s2dsl


@dataclass(frozen=True)
class Config:
    seq: int = 256            # tokens per training sequence
    block: int = 16           # pattern block (tokens)
    d_model: int = 64
    heads: int = 4            # head dim = d_model // heads; the stride equals the head count
    layers: int = 2
    rope_fraction: float = 0.5  # partial RoPE: rotate this fraction of each head's dims (the
                                # rest match content at any distance, as retrieval needs)
    window: int = 2           # pattern window, in blocks
    stride: int = 0           # pattern stride, in blocks (0: the number of heads); <= heads to cover
    sink: int = 0             # pattern sink blocks
    n_filler: int = 64        # vocabulary: filler tokens, then keys, then values
    n_keys: int = 32
    n_values: int = 16
    n_pairs: int = 8          # (key, value) pairs per sequence
    n_queries: int = 4        # queried pairs at the end (answers per sequence)
    batch: int = 32
    steps: int = 600
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    eval_batches: int = 8     # eval set: eval_batches * batch sequences, fixed seed
    eval_every: int = 100
    log_every: int = 10
    seed: int = 0
    dtype: str = "float32"    # parameters; "bf16" = float32 parameters + bf16 autocast (CUDA)
    kernel_check_steps: int = 0
    kernel_check_seq: int = 128
    kernel_check_batch: int = 2
    train_budget_s: float = 0.0  # > 0: fewer steps (for every run) if the runs would not fit
    # length curriculum, "FRAC:SEQ,...": until FRAC of the steps train on SEQ-token sequences
    # (batch scaled to keep the tokens per step), then on ``seq``; "" = always ``seq``
    curriculum: str = ""

    def seq_at(self, step: int) -> int:
        for part in filter(None, self.curriculum.split(",")):
            frac, seq = part.split(":")
            if step < float(frac) * self.steps:
                return int(seq)
        return self.seq

    @property
    def stride_blocks(self) -> int:
        return self.stride or self.heads

    @property
    def vocab(self) -> int:
        return self.n_filler + self.n_keys + self.n_values

    @property
    def n_blocks(self) -> int:
        return self.seq // self.block


CONFIGS: Dict[str, Config] = {
    # mask backend on the CPU, one thread: ~60 ms a step; the kernel check trains 2 steps
    # with the generated kernels under the Triton interpreter
    "cpu": Config(seq=128, block=16, d_model=64, heads=4, stride=2, layers=2, window=1, n_pairs=4,
                  n_queries=4, batch=32, steps=300, eval_every=100, kernel_check_steps=2),
    # the top-k quality study on the CPU (examples/topk_quality.py --config cpu_quality): dense
    # only, 512 tokens = 32 blocks, so 80% / 90% KV sparsity keep a handful of blocks; the length
    # curriculum finds the retrieval at 128 tokens first (as the GPU config does at 512)
    "cpu_quality": Config(seq=512, block=16, d_model=64, heads=4, stride=2, layers=2, window=2, n_pairs=8,
                          n_queries=4, batch=16, steps=900, lr=3e-3, warmup=50, eval_batches=8, eval_every=0,
                          curriculum="0.3:128,0.55:256"),
    # one H100: 65536 tokens a step (16 x 4096 at the end of the length curriculum); 8 heads of
    # 32, stride 4 (two heads per shard: with one head per shard the S2 runs learn markedly
    # slower), window 2 blocks. A first run trained on 4096 tokens from the start (1500 steps,
    # ~20 ms a step) learned nothing, dense included: too few answers among too many
    # candidates to find the retrieval; at 512 tokens it is found in a few hundred steps.
    "gpu": Config(seq=4096, block=64, d_model=256, heads=8, stride=4, layers=2, window=2, n_filler=256,
                  n_keys=64, n_values=64, n_pairs=16, n_queries=8, batch=16, steps=3000, lr=2e-3,
                  warmup=100, eval_batches=32, eval_every=250, log_every=25, dtype="bf16",
                  kernel_check_steps=3, kernel_check_seq=1024, kernel_check_batch=2, train_budget_s=270,
                  curriculum="0.3:512,0.5:1024,0.7:2048"),
}


# ---------------------------------------------------------------- patterns and visibility

def make_patterns(cfg: Config) -> Dict[str, s2dsl.Pattern]:
    H, S, W, B = cfg.heads, cfg.stride_blocks, cfg.window, cfg.block
    sink = f"  sink {cfg.sink}" if cfg.sink else ""
    text = f"""
const window_blocks = {W}
const shards = {S}

# head h keeps its window plus every block j with (j + h) % shards == 0: the heads
# shard the older context between them, so their union covers everything
pattern covering {{
    block = {B}  heads = {H}  causal
    heads 0..{H - 1} {{ window window_blocks{sink}  stride shards offset h }}
}}

# every head reads the same shard (j % shards == 0): the other residues are never seen
pattern not_covering {{
    block = {B}  heads = {H}  causal
    heads 0..{H - 1} {{ window window_blocks{sink}  stride shards }}
}}
"""
    f = s2dsl.parse(text, "<train_tiny>")
    return {"covering": f["covering"], "not_covering": f["not_covering"]}


def reach(pattern: Optional[s2dsl.Pattern], n_blocks: int, layers: int) -> torch.Tensor:
    """Bool [n_blocks, n_blocks]: can kv block j influence query block i through ``layers``
    layers? The block-level union over heads, plus the identity (the residual stream), to
    the power ``layers``. A superset of what tokens can reach, so "unreachable" is a proof."""
    if pattern is None:
        return torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril()
    m = pattern.block_mask(n_blocks).any(0) | torch.eye(n_blocks, dtype=torch.bool)
    r = m.clone()
    for _ in range(layers - 1):
        r = (r.float() @ m.float()) > 0
    return r


def visibility(cfg: Config, pattern: Optional[s2dsl.Pattern]) -> List[str]:
    """Per distance d in blocks (index d, 0..n_blocks-1) from the last block: "direct" (one
    layer reaches it), "hop" (only through several layers) or "invisible"."""
    nb = cfg.n_blocks
    one, many = reach(pattern, nb, 1)[nb - 1], reach(pattern, nb, cfg.layers)[nb - 1]
    out = []
    for d in range(nb):
        j = nb - 1 - d
        out.append("direct" if one[j] else "hop" if many[j] else "invisible")
    return out


# ---------------------------------------------------------------- data

def make_batch(cfg: Config, batch: int, gen: torch.Generator, device, seq: Optional[int] = None):
    """Inputs [batch, T], query positions [n_queries], targets and distances [batch, n_queries]."""
    T = seq or cfg.seq
    B, nb = cfg.block, T // cfg.block
    n_p = min(cfg.n_pairs, nb - 1)  # shorter (curriculum) sequences hold fewer pairs
    n_q = min(cfg.n_queries, n_p)
    assert T % B == 0 and n_p >= 1 and 2 * n_q <= B and n_p <= cfg.n_keys and B >= 3
    toks = torch.randint(0, cfg.n_filler, (batch, T + 1), generator=gen)
    blocks = torch.rand(batch, nb - 1, generator=gen).argsort(-1)[:, :n_p]      # distinct blocks
    # key, value and the token after the value (which the token shift tells the value) in one block
    offs = torch.randint(0, B - 2, (batch, n_p), generator=gen)
    pos = blocks * B + offs
    keys = torch.rand(batch, cfg.n_keys, generator=gen).argsort(-1)[:, :n_p] + cfg.n_filler
    vals = torch.randint(0, cfg.n_values, (batch, n_p), generator=gen) + cfg.n_filler + cfg.n_keys
    toks.scatter_(1, pos, keys)
    toks.scatter_(1, pos + 1, vals)
    which = torch.rand(batch, n_p, generator=gen).argsort(-1)[:, :n_q]        # queried pairs
    qpos = T + 1 - 2 * n_q + 2 * torch.arange(n_q)                              # query keys (inputs)
    toks[:, qpos] = keys.gather(1, which)
    toks[:, qpos + 1] = vals.gather(1, which)
    dist = (qpos // B).view(1, -1) - blocks.gather(1, which)
    x, y = toks[:, :T], toks[:, qpos + 1]
    return x.to(device), qpos.to(device), y.to(device), dist.to(device)


# ---------------------------------------------------------------- model

def rope_tables(T: int, dim: int, device, base: float = 10000.0):
    inv = base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    ang = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv[None]
    return ang.cos(), ang.sin()


def rope(x, cos, sin):
    """Rotate the first 2 * cos.shape[-1] dims of x; keep the rest."""
    r = 2 * cos.shape[-1]
    x = x.float()
    x1, x2 = x[..., :r].chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., r:]], dim=-1)


AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attention_fn(pattern: Optional[s2dsl.Pattern], impl: str) -> AttnFn:
    """q, k, v: (batch, heads, seq, dim) -> same. Causal in every case."""
    if pattern is None:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if impl == "kernel":
        def kernel(q, k, v):
            with torch.autocast(q.device.type, enabled=False):  # q, k, v are already in the compute dtype
                return s2dsl.attention(q, k, v, pattern, layout="bhsd")
        return kernel
    masks: Dict[tuple, torch.Tensor] = {}

    def masked(q, k, v):
        key = (q.shape[2], q.device, q.dtype)
        if key not in masks:  # additive: SDPA would convert a bool mask on every call
            keep = pattern.token_mask(q.shape[2]).to(q.device)
            masks[key] = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=masks[key])
    return masked


class Layer(nn.Module):
    def __init__(self, cfg: Config, attn: AttnFn):
        super().__init__()
        d = cfg.d_model
        self.heads, self.attn = cfg.heads, attn
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        dt = qkv.dtype
        q, k, v = rope(qkv[0], cos, sin).to(dt), rope(qkv[1], cos, sin).to(dt), qkv[2].contiguous()
        o = self.attn(q, k, v)
        x = x + self.proj(o.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Pre-norm decoder: embedding, RoPE, ``layers`` x (attention + MLP), final norm, head."""

    def __init__(self, cfg: Config, attn: AttnFn):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.prev_emb = nn.Embedding(cfg.vocab, cfg.d_model)  # token shift: the previous token's id
        self.layers = nn.ModuleList(Layer(cfg, attn) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        nn.init.normal_(self.emb.weight, std=0.02)
        nn.init.normal_(self.prev_emb.weight, std=0.02)

    def forward(self, x, qpos):
        """Logits at the query positions only: [batch, n_queries, vocab]."""
        hd = self.cfg.d_model // self.cfg.heads
        rot = 2 * int(hd * self.cfg.rope_fraction / 2)
        cos, sin = rope_tables(x.shape[1], rot, x.device)
        h = self.emb(x) + self.prev_emb(F.pad(x[:, :-1], (1, 0)))
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.head(self.ln(h[:, qpos]))


# ---------------------------------------------------------------- training

def lr_at(cfg: Config, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def build(cfg: Config, pattern, impl, device) -> TinyLM:
    torch.manual_seed(cfg.seed)  # the same initialisation for every run
    return TinyLM(cfg, attention_fn(pattern, impl)).to(device)


def autocast(cfg: Config, device):
    if cfg.dtype == "bf16" and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def step_fn(model, opt, cfg, batch, step, device):
    x, qpos, y, _ = batch
    for g in opt.param_groups:
        g["lr"] = lr_at(cfg, step)
    with autocast(cfg, device):
        logits = model(x, qpos)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def make_opt(model, cfg):
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model, cfg: Config, eval_set, device):
    model.eval()
    correct, dists, losses = [], [], []
    for x, qpos, y, dist in eval_set:
        with autocast(cfg, device):
            logits = model(x, qpos).float()
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none"))
        correct.append((logits.argmax(-1) == y).flatten())
        dists.append(dist.flatten())
    model.train()
    return torch.cat(correct).cpu(), torch.cat(dists).cpu(), torch.cat(losses).mean().item()


def summarize(correct, dists, cfg: Config, vis: List[str]) -> dict:
    nb = cfg.n_blocks
    by_d = {}
    for d in range(1, nb):
        sel = dists == d
        if sel.any():
            by_d[d] = correct[sel].float().mean().item()
    out = {"accuracy": correct.float().mean().item(), "accuracy_by_distance": by_d}
    kind = torch.tensor([["direct", "hop", "invisible"].index(vis[d]) for d in range(nb)])[dists]
    for name, ks in (("visible", (0, 1)), ("direct", (0,)), ("hop", (1,)), ("invisible", (2,))):
        sel = torch.zeros_like(correct)
        for k in ks:
            sel |= kind == k
        out[f"accuracy_{name}"] = correct[sel].float().mean().item() if sel.any() else None
        out[f"n_{name}"] = int(sel.sum())
    return out


def fit_steps(cfg: Config, patterns, names, impl: str, device) -> Optional[int]:
    """Time 10 steps of each run at the full length (after 5 warm-up steps, which also
    compile the kernels); the step count that fits all runs in ``cfg.train_budget_s``."""
    total = 0.0
    gen = torch.Generator().manual_seed(cfg.seed + 99)
    for name in names:
        model = build(cfg, patterns.get(name), impl, device)
        opt = make_opt(model, cfg)
        batches = [make_batch(cfg, cfg.batch, gen, device) for _ in range(15)]
        for i, b in enumerate(batches):
            if i == 5:
                if device_is_cuda(device):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            step_fn(model, opt, cfg, b, cfg.steps - 1, device)  # a late step: a small learning rate
        if device_is_cuda(device):
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / 10
        print(f"  timing {name}: {dt * 1e3:.1f} ms/step at {cfg.seq} tokens", flush=True)
        total += dt
    fit = int(cfg.train_budget_s / (1.15 * total))  # 15% for evaluation
    return fit if fit < cfg.steps else None


def train_run(name: str, cfg: Config, pattern, impl: str, device, eval_set, vis) -> dict:
    model = build(cfg, pattern, impl, device)
    opt = make_opt(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same batches for every run
    curve, evals, acc = [], [], torch.zeros((), device=device)
    t0, t30 = time.perf_counter(), None
    step = 0
    while step < cfg.steps:
        t_len = cfg.seq_at(step)
        loss = step_fn(model, opt, cfg, make_batch(cfg, cfg.batch * cfg.seq // t_len, gen, device, t_len),
                       step, device)
        acc = acc + loss
        step += 1
        if step == 30:
            if device_is_cuda(device):
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t30) / 20 if t30 else 0.0
            print(f"  [{name}] {dt * 1e3:.1f} ms/step (steps 10-30)", flush=True)
        if step == 10:
            if device_is_cuda(device):
                torch.cuda.synchronize()
            t30 = time.perf_counter()
        if step % cfg.log_every == 0:
            curve.append((step, acc.item() / cfg.log_every))
            acc = torch.zeros((), device=device)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            c, _, el = evaluate(model, cfg, eval_set, device)
            evals.append((step, el, c.float().mean().item()))
            print(f"  [{name}] step {step}: train loss {curve[-1][1]:.3f}  eval loss {el:.3f}  "
                  f"acc {evals[-1][2]:.3f}", flush=True)
    if cfg.steps % cfg.log_every:  # the last, partial interval
        curve.append((cfg.steps, acc.item() / (cfg.steps % cfg.log_every)))
    if device_is_cuda(device):
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    correct, dists, eval_loss = evaluate(model, cfg, eval_set, device)
    evals.append((cfg.steps, eval_loss, correct.float().mean().item()))
    res = {"name": name, "pattern": None if pattern is None else pattern.to_source(),
           "covered": True if pattern is None else bool(s2dsl.analyze(pattern).covered),
           "impl": "sdpa" if pattern is None else impl, "train_s": train_s, "steps": cfg.steps,
           "loss_curve": curve, "eval_curve": evals, "final_train_loss": curve[-1][1] if curve else None,
           "eval_loss": eval_loss}
    res.update(summarize(correct, dists, cfg, vis))
    print(f"  [{name}] done in {train_s:.1f} s: eval loss {eval_loss:.3f}, accuracy {res['accuracy']:.3f} "
          f"(visible {fmt(res['accuracy_visible'])}, invisible {fmt(res['accuracy_invisible'])})", flush=True)
    return res


def device_is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def kernel_check(cfg: Config, patterns, device) -> dict:
    """Train a few steps with the generated kernels and with the masked reference, from the
    same initialisation and batches, in float32; report how far they drift apart."""
    ccfg = replace(cfg, seq=cfg.kernel_check_seq, batch=cfg.kernel_check_batch, dtype="float32",
                   n_pairs=min(cfg.n_pairs, cfg.kernel_check_seq // cfg.block - 1),
                   n_queries=min(cfg.n_queries, cfg.kernel_check_seq // cfg.block - 1),
                   steps=cfg.kernel_check_steps, warmup=1)  # full learning rate from the first step
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = {}
    try:
        for name, pattern in patterns.items():
            t0 = time.perf_counter()
            losses, params = {}, {}
            for impl in ("mask", "kernel"):
                model = build(ccfg, pattern, impl, device)
                opt = make_opt(model, ccfg)
                gen = torch.Generator().manual_seed(ccfg.seed + 7)
                losses[impl] = [step_fn(model, opt, ccfg, make_batch(ccfg, ccfg.batch, gen, device), s, device).item()
                                for s in range(ccfg.steps)]
                params[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
            dp = ((params["kernel"] - params["mask"]).norm() / params["mask"].norm()).item()
            dl = max(abs(a - b) for a, b in zip(losses["kernel"], losses["mask"]))
            out[name] = {"steps": len(losses["kernel"]), "seq": ccfg.seq, "loss_kernel": losses["kernel"],
                         "loss_mask": losses["mask"], "max_loss_diff": dl, "param_rel_diff": dp,
                         "seconds": time.perf_counter() - t0}
            print(f"  kernel check [{name}]: {len(losses['kernel'])} steps at {ccfg.seq} tokens, "
                  f"max |loss diff| {dl:.2e}, param rel diff {dp:.2e} ({out[name]['seconds']:.1f} s)", flush=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    return out


# ---------------------------------------------------------------- report

def plot(result: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, runs = result["config"], result["runs"]
    vis = result["visibility"]
    colors = {"dense": "black", "covering": "tab:blue", "not_covering": "tab:red"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for r in runs:
        if not r["loss_curve"]:
            continue
        s, l = zip(*r["loss_curve"])
        a1.plot(s, l, color=colors.get(r["name"]), label=f"{r['name']} (final {r['final_train_loss']:.3f})")
    a1.axhline(math.log(cfg["n_values"]), ls=":", color="gray", label="chance (log n_values)")
    for part in filter(None, cfg.get("curriculum", "").split(",")):
        frac, seq = part.split(":")
        a1.axvline(float(frac) * cfg["steps"], ls="--", lw=0.8, color="gray")
        a1.text(float(frac) * cfg["steps"], 1.0, f" <- {seq} tok", transform=a1.get_xaxis_transform(),
                fontsize=7, va="top", color="gray")
    a1.set_yscale("log")
    a1.set_xlabel("step")
    a1.set_ylabel("train loss (answer tokens)")
    a1.set_title("loss curves")
    a1.legend(fontsize=8)
    nb = cfg["seq"] // cfg["block"]
    for d in range(1, nb):
        if vis[d] == "invisible":
            a2.axvspan(d - 0.5, d + 0.5, color="tab:red", alpha=0.08, lw=0)
    for r in runs:
        ds = sorted(int(d) for d in r["accuracy_by_distance"])
        acc = [r["accuracy_by_distance"][d] if d in r["accuracy_by_distance"] else r["accuracy_by_distance"][str(d)]
               for d in ds]
        a2.plot(ds, acc, marker="." if r["covered"] else "o", ms=4, lw=1, ls="-" if r["covered"] else "none",
                color=colors.get(r["name"]),
                label=f"{r['name']}: vis {fmt(r['accuracy_visible'])} / invis {fmt(r['accuracy_invisible'])}")
    a2.axhline(1 / cfg["n_values"], ls=":", color="gray", label="chance")
    a2.set_ylim(-0.02, 1.02)
    a2.set_xlabel(f"distance (blocks of {cfg['block']} tokens); shaded: invisible to not_covering "
                  f"in {cfg['layers']} layers")
    a2.set_ylabel("retrieval accuracy")
    a2.set_title("accuracy by distance")
    a2.legend(fontsize=8)
    fig.suptitle(f"{cfg['layers']}-layer LM, {cfg['seq']} tokens, {cfg['heads']} heads, "
                 f"window {cfg['window']} + stride {cfg['stride'] or cfg['heads']} blocks: dense vs covering vs non-covering")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(result: dict):
    print("\n| run | impl | covered | steps | train s | final train loss | eval loss | accuracy | visible | "
          "invisible | direct | hop |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        print(f"| {r['name']} | {r['impl']} | {'yes' if r['covered'] else 'NO'} | {r['steps']} | {r['train_s']:.0f} | "
              f"{r['final_train_loss']:.3f} | {r['eval_loss']:.3f} | {r['accuracy']:.3f} | "
              f"{fmt(r['accuracy_visible'])} | {fmt(r['accuracy_invisible'])} | {fmt(r['accuracy_direct'])} | "
              f"{fmt(r['accuracy_hop'])} |")
    print(f"chance = {1 / result['config']['n_values']:.3f}; visible/invisible = as seen by not_covering "
          f"through {result['config']['layers']} layers ({result['n_invisible_distances']} of "
          f"{result['config']['seq'] // result['config']['block'] - 1} distances invisible)")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--out", type=str, default="train_tiny_out")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--device", type=str, default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--impl", choices=["auto", "kernel", "mask"], default="auto",
                    help="S2 runs through the generated kernels or SDPA with the pattern's mask "
                         "(auto: kernels on CUDA, mask on the CPU)")
    ap.add_argument("--kernel-check", type=int, default=None,
                    help="steps of the kernel-vs-mask training check (0 = skip; default per config)")
    ap.add_argument("--runs", nargs="+", default=["dense", "covering", "not_covering"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the tiny model gains nothing from more, and "
                         "OpenMP spin-waiting on a busy machine can cost 20x)")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override config fields")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = CONFIGS[args.config]
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    if args.kernel_check is not None:
        cfg = replace(cfg, kernel_check_steps=args.kernel_check)
    for kv in args.set:
        k, v = kv.split("=", 1)
        cfg = replace(cfg, **{k: type(getattr(cfg, k))(v)})
    if not device_is_cuda(device):
        torch.set_num_threads(args.threads)
    impl = args.impl if args.impl != "auto" else ("kernel" if device_is_cuda(device) else "mask")
    if impl == "kernel" and not device_is_cuda(device) and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--impl kernel on the CPU needs TRITON_INTERPRET=1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")

    patterns = make_patterns(cfg)
    reports = {n: s2dsl.analyze(p) for n, p in patterns.items()}
    vis = visibility(cfg, patterns["not_covering"])
    n_inv = sum(v == "invisible" for v in vis[1:])
    print(f"config {args.config} on {device} ({torch.cuda.get_device_name() if device_is_cuda(device) else 'cpu'}), "
          f"torch {torch.__version__}: {cfg.layers} layers, d_model {cfg.d_model}, {cfg.heads} heads, "
          f"{cfg.seq} tokens, block {cfg.block}, window {cfg.window}, stride {cfg.stride_blocks}, sink {cfg.sink}; S2 impl {impl}")
    for n, r in reports.items():
        ce = r.counterexample
        print(f"  {n}: covered={r.covered}" + (f" (counterexample i={ce.i}, j={ce.j})" if ce else ""))
    print(f"  not_covering through {cfg.layers} layers: {n_inv} of {cfg.n_blocks - 1} distances invisible")

    result = {"config": asdict(cfg), "config_name": args.config, "device": device, "impl": impl,
              "torch": torch.__version__, "visibility": vis, "n_invisible_distances": n_inv,
              "chance": 1 / cfg.n_values,
              "coverage": {n: {"covered": bool(r.covered), "counterexample":
                               None if r.counterexample is None else [r.counterexample.i, r.counterexample.j]}
                           for n, r in reports.items()}}
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    eval_set = [make_batch(cfg, cfg.batch, gen, device) for _ in range(cfg.eval_batches)]
    if cfg.kernel_check_steps:
        try:
            result["kernel_check"] = kernel_check(cfg, patterns, device)
        except Exception as exc:  # noqa: BLE001 - recorded, the training still runs
            result["kernel_check"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"  kernel check FAILED: {result['kernel_check']['error']}", flush=True)
    runs = []
    if cfg.train_budget_s and args.steps is None:
        fit = fit_steps(cfg, patterns, args.runs, impl, device)
        if fit is not None:
            print(f"  budget {cfg.train_budget_s:.0f} s for {len(args.runs)} runs: {fit} steps instead of "
                  f"{cfg.steps}", flush=True)
            result["steps_requested"] = cfg.steps
            cfg = replace(cfg, steps=max(fit, 2 * cfg.warmup))
    result["steps"], result["config"] = cfg.steps, asdict(cfg)
    t0 = time.perf_counter()
    for name in args.runs:
        print(f"run {name}", flush=True)
        runs.append(train_run(name, cfg, patterns.get(name), impl, device, eval_set, vis))
        result["runs"] = runs
        (out / "train_tiny.json").write_text(json.dumps(result, indent=1))  # keep partial results
    result["total_s"] = time.perf_counter() - t0
    (out / "train_tiny.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "train_tiny.png")
    print_summary(result)
    print(f"wrote {out / 'train_tiny.json'} and {out / 'train_tiny.png'} (training {result['total_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
