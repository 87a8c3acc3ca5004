"""Generate with a Hugging Face Llama whose attention is s2dsl's, layer by layer from a .s2 plan.

A tiny randomly initialised Llama (no download): every second layer dense, the others
a local-stride pattern (S2-Attention) whose heads together cover the whole context. Prefill and generate() run s2dsl's kernels with its
paged KV cache, which drops the pages the pattern no longer needs as the sequence grows.
The output is checked against generation with a full cache and masked dense attention.
Then prompts of different lengths are generated as one left-padded batch (each must get the
tokens it gets alone), and, on a GPU, decoded by the step captured in a CUDA graph.

    pip install transformers
    python examples/generate_hf.py                        # on a GPU
    TRITON_INTERPRET=1 python examples/generate_hf.py     # on the CPU (slow; small sizes)
"""
from __future__ import annotations

import argparse
import os

import torch

import s2dsl
from s2dsl.integrations import hf

PLAN = """
# S2-Attention on every other layer of a 4-layer model: each q head a window and its own
# shard of the older blocks; the two q heads of a kv head read different shards, so that
# kv head keeps the union of the two
const local_blocks = 2
const vert_stride = 4

pattern s2 {
    block = 16  heads = 4  kv_heads = 2  causal
    heads 0..3 { window local_blocks  stride vert_stride offset h }
}

model tiny {
    layers = 4
    every 2 -> dense
    rest -> s2
}
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32  # the interpreter's tl.dot on bf16 is wrong
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).to(device, dtype).eval()

    plan = s2dsl.parse(PLAN, "<plan>")
    print(s2dsl.analyze(plan["s2"]).reason)
    hf.apply(model, plan, model_name="tiny")  # registers "s2dsl", sets each layer's pattern

    ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), device=device)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    cache = hf.S2Cache(model, max_length=args.prompt_len + args.new_tokens, batch_size=args.batch)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, **kw)
        model.set_attn_implementation(hf.REFERENCE_IMPLEMENTATION)  # eager attention under the same masks
        ref = model.generate(ids, past_key_values=DynamicCache(config=config), **kw)
        model.set_attn_implementation(hf.ATTN_IMPLEMENTATION)
    print("generated:", out[0, args.prompt_len:].tolist())
    print("same tokens as a full cache with masked dense attention:", torch.equal(out, ref))
    for layer, (pattern, paged) in enumerate(zip(model.s2dsl_patterns, cache.paged)):
        print(f"layer {layer} ({pattern.name}): {paged.pages_in_use} pages of {paged.block} tokens held, "
              f"{paged.memory_bytes()} bytes")
    print(f"KV cache: {cache.memory_bytes()} bytes in pages vs {cache.dense_bytes()} bytes for a dense cache")

    # prompts of different lengths in one left-padded batch, as generate() pads them
    lengths = [args.prompt_len, args.prompt_len // 2 + 1]
    prompts = [torch.randint(1, config.vocab_size, (n,), device=device) for n in lengths]
    width = max(lengths)
    padded = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(padded)
    for r, p in enumerate(prompts):
        padded[r, width - len(p):], mask[r, width - len(p):] = p, 1
    new = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batch = model.generate(padded, attention_mask=mask, **new,
                               past_key_values=hf.S2Cache(model, max_length=width + args.new_tokens,
                                                          batch_size=len(prompts)))[:, width:]
        alone = [model.generate(p.view(1, -1), attention_mask=torch.ones(1, len(p), dtype=torch.long, device=device),
                                past_key_values=hf.S2Cache(model, max_length=len(p) + args.new_tokens), **new)
                 [0, len(p):] for p in prompts]
    print("left-padded batch gives each prompt its own tokens:",
          all(torch.equal(batch[r], alone[r]) for r in range(len(prompts))))

    # decode steps captured in a CUDA graph (after the prefill)
    if on_gpu:
        cache = hf.S2Cache(model, max_length=width + args.new_tokens, batch_size=len(prompts))
        with torch.no_grad():
            tok = model(padded, attention_mask=mask, past_key_values=cache).logits[:, -1:].argmax(-1)
            step = cache.decode_graph(model)
            graphed = [tok]
            for _ in range(args.new_tokens - 1):
                graphed.append(step(graphed[-1])[:, -1:].argmax(-1))
        print("CUDA-graph decoding gives the same tokens:", torch.equal(torch.cat(graphed, 1), batch))


if __name__ == "__main__":
    main()
