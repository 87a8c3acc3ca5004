"""Head-parallel attention on torch.distributed: 2 gloo ranks on the CPU (Triton interpreter)
give the single-process result, for the bare attention and for a Hugging Face model whose
attention weights are split by a non-contiguous placement."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import s2dsl
from s2dsl.parallel import place
from s2dsl.parallel.distributed import head_parallel_attention, rank_heads, shard_attention_layers
from s2dsl.parallel.placement import contiguous, place_layers

transformers = pytest.importorskip("transformers")
kernels = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

# kv groups 0 and 1 dense, 2 and 3 local: the contiguous split is unbalanced, so the placement
# interleaves them and the weight slices are not contiguous
PLAN = """
pattern mixed {
    block = 16  heads = 8  kv_heads = 4  causal
    heads 0..3 { dense }
    heads 4..7 { window 1  stride 2 offset h // 2 }
}
model tiny {
    layers = 2
    0..0 -> dense
    rest -> mixed
}
"""
SEQ = 48


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM
    from s2dsl.integrations import hf
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    hf.apply(model, s2dsl.parse(PLAN), model_name="tiny")
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 8, SEQ, 16, generator=g)
    k, v = torch.randn(1, 4, SEQ, 16, generator=g), torch.randn(1, 4, SEQ, 16, generator=g)
    ids = torch.randint(0, 64, (1, SEQ), generator=g)
    return q, k, v, ids


def _worker(rank: int, world: int, tmp: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        pattern = s2dsl.parse(PLAN)["mixed"]
        q, k, v, ids = _inputs()
        placement = place(pattern, world, SEQ)
        attn = head_parallel_attention(q, k, v, pattern, placement)
        model = _model()
        shard_attention_layers(model, place_layers(model.s2dsl_patterns, world, SEQ))
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        torch.save({"attn": attn, "logits": logits, "heads": model.s2dsl_patterns[1].heads},
                   os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@kernels
def test_two_gloo_ranks_equal_the_single_process_model(tmp_path):
    pattern = s2dsl.parse(PLAN)["mixed"]
    placement = place(pattern, 2, SEQ)
    assert [list(a) for a in placement.assignment] != contiguous(8, 2), "the test needs a permuted split"
    assert placement.imbalance < placement.naive_imbalance
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)

    q, k, v, ids = _inputs()
    ref_attn = s2dsl.reference_attention(q, k, v, pattern)
    model = _model()
    with torch.no_grad():
        ref_logits = model(ids, use_cache=False).logits
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["heads"] == len(placement.assignment[rank])
        torch.testing.assert_close(got["attn"], ref_attn, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(got["logits"], ref_logits, atol=2e-5, rtol=2e-5)


def test_rank_heads_checks_the_world_size():
    assert rank_heads([[0, 1], [2, 3]], rank=1, world_size=2) == [2, 3]
    with pytest.raises(ValueError, match="world size"):
        rank_heads([[0, 1], [2, 3]], rank=0, world_size=4)
