"""S2Cache under torch.compile: each layer's cache update + attention is one opaque custom op
(``s2dsl::opaque_attention``) that runs eagerly inside one compiled graph (no graph break), and
the logits equal eager steps; ``decode_graph(compile=...)`` compiles its step once."""
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
    reasons = [str(b.reason).split("\n")[0] for b in explained.break_reasons]
    # one graph: the cache's eager work is an opaque node per layer, not a break that splits the layer
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons
    ops = [n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum(t is torch.ops.s2dsl.opaque_attention.default or t is torch.ops.s2dsl.opaque_attention
               for t in ops) == 2
    _dynamo.reset()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_decode_graph_compiled_by_inductor_once():
    """decode_graph(compile=True): inductor compiles the whole step once (no break, no recompile
    as the sequences grow: the step's lengths live on the device; the page tables' compiled plans
    settle within the two eager warm-up steps) and its greedy tokens and logits equal the
    uncompiled static step's."""
    from torch import _dynamo
    from torch._dynamo.utils import counters
    model = tiny_llama(PLAN, layers=2, attn=hf.ATTN_IMPLEMENTATION)
    ids = torch.randint(1, 100, (2, 30), generator=torch.Generator().manual_seed(3))
    runs = []
    for compiled in (False, True):
        _dynamo.reset()
        counters.clear()
        cache = hf.S2Cache(model, max_length=80, batch_size=2)
        with torch.no_grad():
            tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            step = cache.decode_graph(model, capture=False, compile=compiled)
            logits = []
            for i in range(5):
                logits.append(step(tok).clone())
                tok = logits[-1][:, -1:].argmax(-1)
                if i == 1:  # the two eager warm-up steps: nothing may compile after them (a CUDA graph captures)
                    graphs = dict(counters["stats"]).get("unique_graphs")
        runs.append(torch.cat(logits, 1))
        assert cache.get_seq_length() == 35
    frames = dict(counters["frames"])
    breaks = dict(counters["graph_break"])
    _dynamo.reset()
    assert frames.get("total") == 1 and not breaks, (frames, breaks)
    assert dict(counters["stats"]).get("unique_graphs") == graphs
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(runs[1].argmax(-1), runs[0].argmax(-1))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_a_copied_cache_steps_itself_under_compile():
    """copy.deepcopy of a prefilled S2Cache (transformers' way to reuse a prompt) gives layers with
    their own opaque-op handles: a compiled step over the copy advances the copy, and the
    original stays as it was (with the handle copied, the step would land in the original)."""
    import copy

    from torch import _dynamo
    from s2dsl.runtime import graphs
    model = tiny_llama(PLAN, layers=2, attn=hf.ATTN_IMPLEMENTATION)
    ids = torch.randint(1, 100, (1, 20), generator=torch.Generator().manual_seed(5))
    cache = hf.S2Cache(model, max_length=40, batch_size=1)
    with torch.no_grad():
        tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        twin = copy.deepcopy(cache)
        for a, b in zip(cache.layers, twin.layers):
            assert a._opaque != b._opaque and graphs._STEPS[b._opaque]().__self__ is b
        compiled = torch.compile(model.forward, backend="eager")
        got = compiled(input_ids=tok, past_key_values=twin, use_cache=True).logits
        want = model(input_ids=tok, past_key_values=cache, use_cache=True).logits  # the original, eagerly
    assert twin.get_seq_length() == 21 and cache.get_seq_length() == 21
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    _dynamo.reset()
