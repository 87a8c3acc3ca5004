"""ALISA through Hugging Face: ``S2Cache(kv_dtype=torch.int8)`` (and the tiers) under generate(),
on a tiny random Llama (Triton interpreter)."""
from __future__ import annotations

import os

import pytest
import torch


transformers = pytest.importorskip("transformers")
from s2dsl.integrations import hf  # noqa: E402
from serving_helpers import tiny_llama  # noqa: E402

kernels = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

PLAN = """
pattern sparse {
    block = 16  heads = 4  kv_heads = 2  causal
    heads 0..1 { window 2  stride 3 offset h }
    heads 2..3 { window 1  sink 1  stride 4 offset h }
}
model tiny {
    layers = 2
    every 2 -> dense
    rest -> sparse
}
"""


@pytest.fixture(scope="module")
def model():
    return tiny_llama(PLAN, attn=hf.ATTN_IMPLEMENTATION)


def _teacher_forced(model, ids, prompt, **cache_kw):
    cache = hf.S2Cache(model, max_length=ids.shape[1], batch_size=ids.shape[0], **cache_kw)
    with torch.no_grad():
        first = model(ids[:, :prompt], past_key_values=cache).logits[:, -1:]
        steps = [model(ids[:, n:n + 1], past_key_values=cache).logits for n in range(prompt, ids.shape[1])]
    return torch.cat([first] + steps, dim=1), cache


@kernels
def test_int8_logits_change_by_a_small_measured_amount(model):
    ids = torch.randint(0, 100, (2, 44), generator=torch.Generator().manual_seed(3))
    exact, _ = _teacher_forced(model, ids, 30)
    int8, cache = _teacher_forced(model, ids, 30, kv_dtype=torch.int8)
    assert all(p.k_pages.dtype == torch.int8 for p in cache.paged)
    # the prefill's logits come from the 16-bit prompt; the decode steps read INT8 pages
    torch.testing.assert_close(int8[:, 0], exact[:, 0])
    change = ((int8[:, 1:] - exact[:, 1:]).abs().max() / exact[:, 1:].std()).item()
    print(f"INT8 KV: largest logit change {change:.2e} of the logits' standard deviation")
    assert 0 < change < 0.05


@kernels
def test_int8_cache_runs_generate(model):
    ids = torch.randint(0, 100, (2, 33), generator=torch.Generator().manual_seed(4))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, past_key_values=hf.S2Cache(model, max_length=45, batch_size=2), **kw)
        out = model.generate(ids, past_key_values=hf.S2Cache(model, max_length=45, batch_size=2,
                                                              kv_dtype=torch.int8), **kw)
    assert out.shape == ref.shape == (2, 45)
    # a tiny random model's next-token margins are small, yet INT8 keeps most greedy choices
    assert (out[:, 33:] == ref[:, 33:]).float().mean() >= 0.75


def test_s2cache_refuses_a_bad_kv_dtype(model):
    with pytest.raises(ValueError, match="kv_dtype"):
        hf.S2Cache(model, max_length=40, kv_dtype=torch.int32)


SWA_PLAN = """
pattern swa {
    block = 16  heads = 4  kv_heads = 2  causal
    heads * { window 1  topk 2  recent 3 }
}
model tiny {
    layers = 2
    rest -> swa
}
"""


@pytest.fixture(scope="module")
def swa_model():
    return tiny_llama(SWA_PLAN, seed=1, attn=hf.ATTN_IMPLEMENTATION)


@kernels
def test_generate_over_a_gpu_budget_with_a_host_tier_is_lossless(swa_model):
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(5))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = swa_model.generate(ids, past_key_values=hf.S2Cache(swa_model, max_length=60, batch_size=2), **kw)
        # each layer holds 2 sequences x 2 kv heads x 4 blocks = 16 pages; the GPU pool takes 12
        cache = hf.S2Cache(swa_model, max_length=60, batch_size=2, gpu_pages=12, host_pages=8)
        out = swa_model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(out, ref)
    tier = cache.paged[0].table.tier
    assert tier.moved_down > 0 and tier.host_pages_in_use > 0
    assert all(p.pages_in_use <= 12 for p in cache.paged)
    assert "host tier" in cache.debug_report()


def test_tier_arguments_are_checked(swa_model):
    with pytest.raises(ValueError, match="gpu_pages"):
        hf.S2Cache(swa_model, max_length=40, host_pages=4)
    with pytest.raises(ValueError, match="not both"):
        hf.S2Cache(swa_model, num_pages=4, gpu_pages=4)
