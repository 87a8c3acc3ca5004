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


def _model(hidden: int = 128, plan: str = PLAN):
    from transformers import LlamaConfig, LlamaForCausalLM
    from s2dsl.integrations import hf
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    hf.apply(model, s2dsl.parse(plan), model_name="tiny")
    return model


# on the GPU: the kernels' tuned shapes (block 64, head dim 64), 512 tokens
GPU_PLAN = PLAN.replace("block = 16", "block = 64")
GPU_SEQ = 512


def _gpu_ids():
    return torch.randint(0, 64, (1, GPU_SEQ), generator=torch.Generator().manual_seed(5))


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


# ------------------------------------------------------------------------------ GPU
def _gpu_inputs(pattern, seq, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, pattern.heads, seq, 128, generator=g, device="cuda").to(torch.bfloat16)
    k = torch.randn(1, pattern.kv_heads, seq, 128, generator=g, device="cuda").to(torch.bfloat16)
    v = torch.randn(1, pattern.kv_heads, seq, 128, generator=g, device="cuda").to(torch.bfloat16)
    return q, k, v


@pytest.mark.gpu
def test_gpu_each_gpus_sub_pattern_matches_the_reference(examples_dir):
    from s2dsl.parallel import restrict
    from s2dsl.parallel.heads import kv_heads_of
    from s2dsl.runtime.attention import forward
    pattern = s2dsl.load(str(examples_dir / "heterogeneous.s2"))["heterogeneous"]
    q, k, v = _gpu_inputs(pattern, 2048)
    placement = place(pattern, 4, 32768)
    for heads in placement.assignment:
        heads = list(heads)
        kv = list(kv_heads_of(pattern, heads))
        sub = restrict(pattern, heads)
        ql, kl, vl = q[:, heads].contiguous(), k[:, kv].contiguous(), v[:, kv].contiguous()
        out = torch.full_like(ql, float("nan"))
        forward(ql, kl, vl, sub, out=out)
        ref = s2dsl.reference_attention(ql.float(), kl.float(), vl.float(), sub)
        assert not out.isnan().any()
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def _nccl_worker(rank: int, world: int, tmp: str, examples: str):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    try:
        pattern = s2dsl.load(os.path.join(examples, "heterogeneous.s2"))["heterogeneous"]
        q, k, v = _gpu_inputs(pattern, 2048)
        attn = head_parallel_attention(q, k, v, pattern, place(pattern, world, 32768))
        model = _model(512, GPU_PLAN).cuda()
        placements = place_layers(model.s2dsl_patterns, world, GPU_SEQ)
        assert [list(a) for a in placements[1].assignment] != contiguous(8, 2)
        shard_attention_layers(model, placements)
        with torch.no_grad():
            logits = model(_gpu_ids().cuda(), use_cache=False).logits
        torch.save({"attn": attn.cpu(), "logits": logits.cpu()}, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_two_nccl_ranks_equal_one_gpu(tmp_path, examples_dir, monkeypatch):
    for name, value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                        "NVSHMEM_DISABLE_NVLS": "1"}.items():
        monkeypatch.setenv(name, value)
    mp.spawn(_nccl_worker, args=(2, str(tmp_path), str(examples_dir)), nprocs=2, join=True)
    pattern = s2dsl.load(str(examples_dir / "heterogeneous.s2"))["heterogeneous"]
    q, k, v = _gpu_inputs(pattern, 2048)
    ref = s2dsl.reference_attention(q.float(), k.float(), v.float(), pattern).cpu()
    model = _model(512, GPU_PLAN).cuda()
    with torch.no_grad():
        ref_logits = model(_gpu_ids().cuda(), use_cache=False).logits.cpu()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert not got["attn"].isnan().any()
        torch.testing.assert_close(got["attn"].float(), ref, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got["logits"], ref_logits, atol=1e-3, rtol=1e-3)


def test_a_placement_of_another_pattern_is_refused():
    from s2dsl.parallel.distributed import _check_partition
    pattern = s2dsl.parse(PLAN)["mixed"]
    _check_partition([[0, 1, 4, 5], [2, 3, 6, 7]], pattern)
    with pytest.raises(ValueError, match="each exactly once"):
        _check_partition([[0, 1], [2, 3]], pattern)
