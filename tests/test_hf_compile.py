"""S2Cache under torch.compile: the cache's update and attention run eagerly (a graph break at
each, named), the rest of the model is compiled, and the logits equal eager steps."""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from s2dsl.integrations import hf  # noqa: E402
from serving_helpers import tiny_llama  # noqa: E402

PLAN = """
pattern sparse { block = 16  heads = 4  kv_heads = 2  causal  heads * { window 2  stride 3 offset h } }
model tiny { layers = 2  every 2 -> dense  rest -> sparse }
"""


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_compiled_forward_over_s2cache_equals_eager():
    from torch import _dynamo
    model = tiny_llama(PLAN, layers=2, attn=hf.ATTN_IMPLEMENTATION)
    ids = torch.randint(1, 100, (2, 30), generator=torch.Generator().manual_seed(3))
    runs = []
    for forward in (model.forward, torch.compile(model.forward, backend="eager")):
        cache = hf.S2Cache(model, max_length=80, batch_size=2)
        with torch.no_grad():
            tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            logits = []
            for _ in range(4):  # greedy, so a wrong step would change the later ones too
                logits.append(forward(input_ids=tok, past_key_values=cache, use_cache=True).logits)
                tok = logits[-1][:, -1:].argmax(-1)
        runs.append(torch.cat(logits, 1))
        assert cache.get_seq_length() == 34
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=0)
    explained = _dynamo.explain(model.forward)(input_ids=tok, past_key_values=cache, use_cache=True)
    reasons = {str(b.reason).split("\n")[0] for b in explained.break_reasons}
    # every break is the cache's own eager step (update, attention) of a layer, nothing else
    assert explained.graph_break_count >= 2 * 2 and all("disable" in r for r in reasons), reasons
    _dynamo.reset()
