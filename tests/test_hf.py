"""s2dsl inside Hugging Face transformers: a tiny random Llama with a per-layer .s2 plan.

Logits must equal transformers' eager attention under the same (per-layer, per-head) mask,
and greedy generation with s2dsl's paged cache must equal generation with a full
DynamicCache and masked dense attention.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import s2dsl

transformers = pytest.importorskip("transformers")
from s2dsl.integrations import hf  # noqa: E402

PLAN = """
const lb = 2
pattern sparse {
    block = 16  heads = 4  kv_heads = 2  causal
    heads 0..1 { window lb  stride 3 offset h }
    heads 2..3 { window 1  sink 1  stride 4 offset h }
}
model tiny {
    layers = 2
    every 2 -> dense
    rest -> sparse
}
"""
kernels = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    m = LlamaForCausalLM(config).eval()
    hf.apply(m, s2dsl.parse(PLAN), model_name="tiny")
    return m


def _use(model, name):
    model.set_attn_implementation(name)
    return model


def test_apply_gives_each_layer_its_pattern(model):
    pats = model.s2dsl_patterns
    assert [p.name for p in pats] == ["dense_layer0", "sparse"]
    assert all(p.heads == 4 and p.kv_heads == 2 for p in pats)
    assert all(m.s2dsl_pattern is p for m, p in zip(hf.attention_modules(model), pats))
    with pytest.raises(ValueError, match="layers"):
        hf.layer_patterns(model, [None, None, None])


@kernels
def test_logits_equal_eager_attention_under_the_mask(model):
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _use(model, hf.REFERENCE_IMPLEMENTATION)(ids, use_cache=False).logits
        out = _use(model, hf.ATTN_IMPLEMENTATION)(ids, use_cache=False).logits
        # the same forward, then decode steps through the paged cache: each step's logits
        cache = hf.S2Cache(model, max_length=40, batch_size=2)
        first = model(ids[:, :30], past_key_values=cache).logits
        steps = [model(ids[:, n:n + 1], past_key_values=cache).logits for n in range(30, 40)]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([first] + steps, dim=1), ref, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 40


@kernels
def test_greedy_generation_matches_full_cache_and_masked_dense(model):
    from transformers import DynamicCache
    ids = torch.randint(0, 100, (2, 37), generator=torch.Generator().manual_seed(2))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = _use(model, hf.REFERENCE_IMPLEMENTATION).generate(
            ids, past_key_values=DynamicCache(config=model.config), **kw)
        cache = hf.S2Cache(model, max_length=37 + 24, batch_size=2)
        out = _use(model, hf.ATTN_IMPLEMENTATION).generate(ids, past_key_values=cache, **kw)
    assert out.shape == (2, 37 + 24)
    assert torch.equal(out, ref)
    # the sparse layer holds what its pattern needs, less than the dense layer, which holds all
    dense_layer, sparse = cache.paged
    n = 37 + 24 - 1  # the last token is generated, never fed back
    assert dense_layer.pages_in_use == 2 * 2 * -(-n // 16)
    assert sparse.pages_in_use == sum(len(sparse.needed_blocks(s, g)) for s in sparse.sequences for g in range(2))
    assert sparse.pages_in_use < dense_layer.pages_in_use


@kernels
def test_dynamic_cache_with_s2dsl_attention(model):
    """Without our cache, "s2dsl" attends over the full keys (queries shorter than keys)."""
    from transformers import DynamicCache
    ids = torch.randint(0, 100, (1, 35), generator=torch.Generator().manual_seed(3))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = _use(model, hf.REFERENCE_IMPLEMENTATION).generate(
            ids, past_key_values=DynamicCache(config=model.config), **kw)
        out = _use(model, hf.ATTN_IMPLEMENTATION).generate(
            ids, past_key_values=DynamicCache(config=model.config), **kw)
    assert torch.equal(out, ref)


@kernels
def test_padding_is_refused(model):
    ids = torch.randint(0, 100, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad(), pytest.raises(NotImplementedError, match="padded"):
        _use(model, hf.ATTN_IMPLEMENTATION)(ids, attention_mask=mask, use_cache=False)


def test_import_s2dsl_does_not_import_transformers():
    code = "import sys, s2dsl, s2dsl.integrations.hf; assert 'transformers' not in sys.modules"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
