"""What several benchmark scripts share: the Llama-shaped model of the generation benchmarks,
FlexAttention over a block mask, and do_bench timing.

The scripts import it as ``common`` (a script's own folder is on ``sys.path`` when it runs).
"""
from __future__ import annotations

import time

import torch


def make_model(tiny: bool, device, dtype, *, layers: int = 16, intermediate: int = 8192,
               max_positions: int = 1 << 18, attn: str = "sdpa"):
    """A Llama with random weights (seeded): hidden 2048, 32 q / 8 kv heads of dim 64, vocab
    32000, ``layers`` layers of MLP width ``intermediate``; ``tiny``: 2 layers, hidden 64, 4 / 2
    heads, vocab 100 (CPU runs). Evaluation mode, on ``device`` in ``dtype``, attention
    implementation ``attn`` (None: transformers' default)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if tiny:
        cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 12)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                          max_position_embeddings=max_positions, rope_theta=500000.0)
    model = LlamaForCausalLM(cfg).to(device, dtype).eval()
    if attn is not None:
        model.set_attn_implementation(attn)
    return model


def make_alisa_model(tiny: bool, device, dtype):
    """bench_alisa's model: ``make_model`` with 8 layers of MLP width 5632, 64K positions,
    transformers' default attention."""
    return make_model(tiny, device, dtype, layers=8, intermediate=5632, max_positions=1 << 16, attn=None)


def flex_block_attention(mask_mod, heads: int, n: int, block: int):
    """FlexAttention over ``mask_mod``'s block mask (``heads``: 1 when the mask is the same for
    every head) at ``n`` tokens with ``block``-token tiles (blocks of 64 tokens need 64-row
    tiles in Flex's kernel too). Returns (attention function of q, k, v; seconds the block mask
    took to build, compile included)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    t0 = time.perf_counter()
    mask = torch.compile(create_block_mask)(mask_mod, 1, heads, n, n, device="cuda", BLOCK_SIZE=block)
    torch.cuda.synchronize()
    plan_s = time.perf_counter() - t0
    compiled = torch.compile(flex_attention)
    options = {"BLOCK_M": block, "BLOCK_N": block}
    return (lambda q, k, v: compiled(q, k, v, block_mask=mask, kernel_options=options)), plan_s


def bench(fn, *args, warmup: int = 50, rep: int = 200) -> float:
    """Median milliseconds of ``fn(*args)`` by triton.testing.do_bench."""
    import triton
    return triton.testing.do_bench(lambda: fn(*args), warmup=warmup, rep=rep, return_mode="median")


def time_variants(row: dict, variants: dict, run, ref: torch.Tensor, time, name: str, tol: float = 1e-2) -> None:
    """Kernel variants beside the default, in one run: for each ``label -> tuning``, ``run(tuning)``
    (its output) is checked against ``ref`` (the default's output; relative L2 below ``tol``), then
    ``time(tuning)`` (ms) goes to ``row[name.format(label) + "_ms"]``. A variant that fails to
    compile or to check is recorded as ``row[name.format(label) + "_error"]``, not fatal."""
    ref = ref.float()
    for label, tuning in variants.items():
        key = name.format(label)
        try:
            err = ((run(tuning).float() - ref).norm() / ref.norm()).item()
            if not err < tol:  # NaN fails too
                raise AssertionError(f"differs from the default's output by {err:.2e}")
            row[key + "_ms"] = time(tuning)
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a result, not the end of the run
            row[key + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
