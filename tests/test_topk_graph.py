"""Dynamic top-k decode steps with static shapes (``DecodeGraph``): the step's top-k bookkeeping
runs on the device alone, so the whole step can be captured in a CUDA graph. The CPU test runs
the static step eagerly under the Triton interpreter; tests/test_gpu_topk.py captures it."""
from __future__ import annotations

import os

import pytest
import torch

import s2dsl

from serving_helpers import replay_selection

# ALISA's sparse window attention with per-group K (kv head 1: K 1 < K max 2) and a static group
ALISA_GQA = ("pattern p { block = 16 heads = 6 kv_heads = 3 heads 0..1 { window 1 topk 2 recent 3 } "
             "heads 2..3 { window 1 topk 1 recent 2 } heads 4..5 { window 2 sink 1 } }")
# kv head 0 scores by bound (selected inside the step, from its query) beside a 'by mass' kv head
BOUND_GQA = ALISA_GQA.replace("topk 2 recent 3", "topk 2 by bound")




def _graph_steps(device, dtype, capture, steps, prompt=37, d=16, text=ALISA_GQA):
    """Top-k decode steps through DecodeGraph (static plan; captured and replayed on CUDA) and a
    twin cache stepping with host-planned calls: eagerly the same selections and outputs; each
    output the reference given the selection its step used."""
    import warnings
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.graphs import DecodeGraph
    from s2dsl.runtime.kv_cache import PagedKVCache
    from s2dsl.runtime.topk_state import state_for

    pattern = s2dsl.parse(text)["p"]
    total = prompt + steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # topk heads keep every page
        # topk heads keep every page: two sequences x every kv head x every block, plus spare
        pages = 2 * pattern.kv_heads * -(-total // pattern.block) + 8
        caches = [PagedKVCache(pattern, num_pages=pages, head_dim=d, dtype=dtype, device=device, max_seqs=2)
                  for _ in range(2)]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, total, d, generator=g).to(device=device, dtype=dtype)
               for h in (pattern.heads, pattern.kv_heads, pattern.kv_heads))
    ids = [[c.add_sequence() for _ in range(2)] for c in caches]
    for c, i in zip(caches, ids):
        cached_attention(c, i, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    bufs = [torch.zeros_like(t[:, :, :1]) for t in (q, k, v)]
    graph = DecodeGraph(lambda: cached_attention(caches[0], ids[0], *bufs), [caches[0].table], [ids[0]],
                        max_length=total, capture=capture)
    states = [state_for(c) for c in caches]
    for pos in range(prompt, total):
        for buf, t in zip(bufs, (q, k, v)):
            buf.copy_(t[:, :, pos:pos + 1])
        used = states[0].selection[[caches[0].slot(s) for s in ids[0]]].clone()
        out = graph().clone()
        twin = cached_attention(caches[1], ids[1], *bufs)
        for g, bound in enumerate(states[0].bound_groups):  # chosen inside the step, from its query
            if bound:
                used[:, g] = states[0].selection[[caches[0].slot(s) for s in ids[0]], g]
        same = torch.equal(states[0].selection[[caches[0].slot(s) for s in ids[0]]],
                           states[1].selection[[caches[1].slot(s) for s in ids[1]]])
        if not capture:
            assert same and torch.equal(out, twin)
        # a replay's split count is chosen for max_length, the twin's for the lengths: in bf16 a
        # near-tie may then select differently; each output is held to the reference below
        for b in range(2):
            replay = replay_selection(pattern, used[b].cpu(), 1).to(device)
            ref = s2dsl.reference_attention(q[b:b + 1, :, pos:pos + 1].float(), k[b:b + 1, :, :pos + 1].float(),
                                            v[b:b + 1, :, :pos + 1].float(), pattern, selection=replay)
            err = ((out[b:b + 1].float() - ref).norm() / ref.norm()).item()
            assert err < (2e-5 if dtype == torch.float32 else 2e-2), (pos, err)
    graph.close()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("text", [ALISA_GQA, BOUND_GQA], ids=["by_mass", "by_bound"])
def test_topk_decode_runs_as_a_static_graph_step(text):
    _graph_steps("cpu", torch.float32, capture=False, steps=6, text=text)


TOPK_PLAN = ("pattern t { block = 16 heads = 4 kv_heads = 2 heads 0..1 { window 1 topk 2 recent 3 } "
             "heads 2..3 { window 1 sink 1 topk 1 } } model tiny { layers = 2 rest -> t }")


def _hf_graph_vs_eager(model, prompts, new, capture, device):
    """Greedy tokens of a left-padded batch: S2Cache.decode_graph steps vs generate() with an S2Cache
    (host-planned steps). Both prefill the padded batch (packed, each row seeding its own scores)."""
    from s2dsl.integrations import hf

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        cache = hf.S2Cache(model, max_length=width + new, batch_size=len(prompts))
        logits = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1:]
        step = cache.decode_graph(model, capture=capture)
        tokens = [logits.argmax(-1)]
        for _ in range(new - 1):
            tokens.append(step(tokens[-1])[:, -1:].argmax(-1))
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                             past_key_values=hf.S2Cache(model, max_length=width + new, batch_size=len(prompts)))
    return torch.cat(tokens, 1), ref[:, width:]


@pytest.mark.slow  # ~1.5 min; test_topk_decode_runs_as_a_static_graph_step is the fast one
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_hf_decode_graph_with_a_topk_plan():
    """A topk plan through S2Cache.decode_graph (the static step run eagerly on the CPU): the same
    greedy tokens as generate() stepping the same cache type with host-planned steps."""
    pytest.importorskip("transformers")
    import warnings
    from serving_helpers import tiny_llama

    from s2dsl.integrations import hf
    model = tiny_llama(TOPK_PLAN, attn=hf.ATTN_IMPLEMENTATION)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 100, (n,), generator=gen) for n in (40, 23)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # topk heads keep every page
        got, want = _hf_graph_vs_eager(model, prompts, 5, capture=False, device="cpu")
    assert torch.equal(got, want)
