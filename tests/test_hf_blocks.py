"""A model plan whose patterns tile by different blocks (Gemma-style local 16-token blocks,
global 32-token blocks) runs end to end in the Hugging Face integration."""
from __future__ import annotations

import os

import pytest
import torch


transformers = pytest.importorskip("transformers")
from s2dsl.integrations import hf  # noqa: E402
from serving_helpers import tiny_llama  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

PLAN = """
pattern local_layer {
    block = 16  heads = 4  kv_heads = 2  causal
    heads * { window 2  sink 1 }
}
pattern global_layer {
    block = 32  heads = 4  kv_heads = 2  causal
    heads 0..1 { window 1  stride 2 offset h }
    heads 2..3 { dense }
}
model two_blocks {
    layers = 3
    every 3 from 2 -> global_layer
    rest -> local_layer
}
"""


@pytest.fixture(scope="module")
def model():
    return tiny_llama(PLAN, layers=3, model_name="two_blocks")


def test_layers_keep_their_own_block(model):
    assert [p.block for p in model.s2dsl_patterns] == [16, 16, 32]


def test_prefill_and_decode_match_the_masked_reference(model):
    ids = torch.randint(0, 100, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.set_attn_implementation(hf.REFERENCE_IMPLEMENTATION)
        ref = model(ids, use_cache=False).logits
        model.set_attn_implementation(hf.ATTN_IMPLEMENTATION)
        out = model(ids, use_cache=False).logits
        cache = hf.S2Cache(model, max_length=48, batch_size=1)
        first = model(ids[:, :40], past_key_values=cache).logits
        steps = [model(ids[:, n:n + 1], past_key_values=cache).logits for n in range(40, 48)]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([first] + steps, dim=1), ref, atol=1e-5, rtol=1e-5)
