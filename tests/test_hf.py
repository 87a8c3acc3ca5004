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
from serving_helpers import tiny_llama  # noqa: E402

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
    return tiny_llama(PLAN)


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
        cache = hf.S2Cache(model, max_length=37 + 24, batch_size=2, max_rollback=0)
        out = _use(model, hf.ATTN_IMPLEMENTATION).generate(ids, past_key_values=cache, **kw)
    assert out.shape == (2, 37 + 24)
    assert torch.equal(out, ref)
    cache.evict()  # each step frees what the step before no longer needs; the last step's, now
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


def _left_padded(prompts, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    return ids, mask


@kernels
def test_batched_generate_of_different_lengths_equals_each_alone(model):
    """A left-padded batch (as generate pads): every prompt gets exactly the tokens it gets alone;
    the pages hold only real tokens, each sequence at its own positions."""
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 100, (n,), generator=gen) for n in (37, 18, 29)]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    _use(model, hf.ATTN_IMPLEMENTATION)
    with torch.no_grad():
        alone = []
        for p in prompts:
            cache = hf.S2Cache(model, max_length=len(p) + 6, batch_size=1)
            alone.append(model.generate(p.view(1, -1), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                        past_key_values=cache, **kw)[0, len(p):])
        ids, mask = _left_padded(prompts)
        cache = hf.S2Cache(model, max_length=37 + 6, batch_size=3)
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, **kw)
    for r, p in enumerate(prompts):
        assert torch.equal(out[r, ids.shape[1]:], alone[r]), r
    sparse = cache.paged[1]
    assert [sparse.seq_len(s) for s in cache.layers[1].seq_ids] == [len(p) + 5 for p in prompts]


@kernels
def test_assisted_generation_rolls_back_rejected_tokens(model):
    """Assisted decoding with a different draft model: rejected draft tokens are cropped from
    S2Cache, and the tokens equal plain greedy generation."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(5)
    draft = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=256)).eval()
    ids = torch.randint(1, 100, (1, 33), generator=torch.Generator().manual_seed(6))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    crops = []
    _use(model, hf.ATTN_IMPLEMENTATION)
    with torch.no_grad():
        plain = model.generate(ids, past_key_values=hf.S2Cache(model, max_length=60), **kw)
        cache = hf.S2Cache(model, max_length=60)
        layer = cache.layers[1]
        original = layer.crop
        layer.crop = lambda t: (crops.append(t), original(t))[1]
        out = model.generate(ids, assistant_model=draft, past_key_values=cache, **kw)
    assert torch.equal(out, plain)
    assert any(t < 0 for t in crops), "no draft token was rejected: the test did not exercise crop"


@kernels
def test_crop_beyond_the_rollback_window_is_refused(model):
    cache = hf.S2Cache(model, max_length=80, max_rollback=0)
    ids = torch.randint(1, 100, (1, 70), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        _use(model, hf.ATTN_IMPLEMENTATION)(ids, past_key_values=cache)
    with pytest.raises(ValueError, match="lookahead"):
        cache.crop(-40)


@kernels
def test_padded_batch_without_s2cache(model):
    """Full keys (no cache, DynamicCache): a left-padded batch gives each prompt its own logits and
    tokens; real tokens that are not contiguous are refused."""
    from transformers import DynamicCache
    gen = torch.Generator().manual_seed(10)
    prompts = [torch.randint(1, 100, (n,), generator=gen) for n in (26, 17)]
    ids, mask = _left_padded(prompts)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    _use(model, hf.ATTN_IMPLEMENTATION)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        out = model.generate(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config), **kw)
        for r, p in enumerate(prompts):
            alone = model(p.view(1, -1), use_cache=False).logits
            torch.testing.assert_close(logits[r, ids.shape[1] - len(p):], alone[0], atol=1e-4, rtol=1e-4)
            solo = model.generate(p.view(1, -1), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  past_key_values=DynamicCache(config=model.config), **kw)
            assert torch.equal(out[r, ids.shape[1]:], solo[0, len(p):])
        holes = mask.clone()
        holes[0, -5] = 0
        with pytest.raises(NotImplementedError, match="contiguous"):
            model(ids, attention_mask=holes, use_cache=False)


def test_import_s2dsl_does_not_import_transformers():
    code = "import sys, s2dsl, s2dsl.integrations.hf; assert 'transformers' not in sys.modules"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def _graph_greedy(model, prompts, new, capture, device="cpu", compile=False, tune_splits=False):
    """Prefill a left-padded batch, then decode through S2Cache.decode_graph."""
    ids, mask = _left_padded(prompts)
    ids, mask = ids.to(device), mask.to(device)
    cache = hf.S2Cache(model, max_length=ids.shape[1] + new, batch_size=len(prompts))
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1:]
        step = cache.decode_graph(model, capture=capture, compile=compile, tune_splits=tune_splits)
        tokens = [logits.argmax(-1)]
        for _ in range(new - 1):
            tokens.append(step(tokens[-1])[:, -1:].argmax(-1))
    return torch.cat(tokens, 1), cache


@kernels
def test_static_decode_step_through_the_model(model):
    """The graph-ready step (static plan, device positions) run eagerly: the same tokens as generate."""
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(1, 100, (n,), generator=gen) for n in (34, 20)]
    _use(model, hf.ATTN_IMPLEMENTATION)
    out, cache = _graph_greedy(model, prompts, 6, capture=False)
    with torch.no_grad():
        ids, mask = _left_padded(prompts)
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             past_key_values=hf.S2Cache(model, max_length=40, batch_size=2))[:, ids.shape[1]:]
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == ids.shape[1] + 5


@kernels
def test_compiled_static_decode_step(model):
    """decode_graph(compile=...): the step's forward through torch.compile (the cache's update
    and attention graph-broken, eager) gives the tokens of the uncompiled step."""
    from torch import _dynamo
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(1, 100, (n,), generator=gen) for n in (34, 20)]
    _use(model, hf.ATTN_IMPLEMENTATION)
    plain, _ = _graph_greedy(model, prompts, 5, capture=False)
    compiled, cache = _graph_greedy(model, prompts, 5, capture=False, compile="aot_eager")
    _dynamo.reset()
    assert torch.equal(compiled, plain)
    assert cache.get_seq_length() == 34 + 4


@kernels
def test_tune_splits_is_ignored_off_cuda(model):
    """decode_graph(tune_splits=True) on the CPU: no split to tune, nothing timed, the same tokens."""
    from s2dsl.runtime.decode import split_choices
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(1, 100, (n,), generator=gen) for n in (20, 12)]
    _use(model, hf.ATTN_IMPLEMENTATION)
    plain, _ = _graph_greedy(model, prompts, 3, capture=False)
    tuned, cache = _graph_greedy(model, prompts, 3, capture=False, tune_splits=True)
    assert torch.equal(tuned, plain)
    assert all(split_choices(layer.paged) == {} for layer in cache.layers)


def _gpu_model(max_positions: int):
    """A 4-layer bf16 Llama on the GPU (8 q / 2 kv heads) under PLAN at block 64."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max_positions)
    m = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    plan = PLAN.replace("block = 16", "block = 64").replace("heads = 4  kv_heads = 2", "heads = 8  kv_heads = 2") \
        .replace("heads 0..1", "heads 0..3").replace("heads 2..3", "heads 4..7").replace("layers = 2", "layers = 4")
    hf.apply(m, s2dsl.parse(plan), model_name="tiny")
    return m


def _fed_steps(step, tok, feed, n: int):
    """``n`` decode steps: greedy from ``tok``, or fed ``feed``'s tokens one per step when given
    (so a second run sees the first run's tokens). Returns (float32 logits, tokens fed), each
    concatenated over the steps."""
    logits, toks = [], []
    for i in range(n):
        t = tok if feed is None else feed[:, i:i + 1]
        out = step(t).float().clone()
        logits.append(out)
        toks.append(t)
        tok = out[:, -1:].argmax(-1)
    return torch.cat(logits, 1), torch.cat(toks, 1)


@pytest.mark.gpu
def test_gpu_compiled_cuda_graph_step():
    """bf16 on the GPU: the step compiled by inductor and captured in a CUDA graph, fed the
    tokens of eager decoding, gives eager decoding's logits within bf16 noise at every step."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from torch import _dynamo
    m = _gpu_model(max_positions=4096)
    ids = torch.randint(1, 1000, (2, 900), device="cuda")
    runs = []
    for compiled in (False, True):
        cache = hf.S2Cache(m, max_length=960, batch_size=2)
        with torch.no_grad():
            tok = m(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            step = cache.decode_graph(m, compile=compiled, capture=compiled)
            logits, toks = _fed_steps(step, tok, runs[0][1] if runs else None, 12)
        runs.append((logits, toks))
    _dynamo.reset()
    ref, got = runs[0][0], runs[1][0]
    assert torch.isfinite(got).all()
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 3e-2, err


@pytest.mark.gpu
def test_gpu_tuned_splits_compiled_graph_gives_the_untuned_tokens():
    """bf16 on the GPU: the compiled graph step with tune_splits=True, fed the untuned step's
    tokens, predicts the same tokens (where the untuned top two logits are not a near tie) with
    logits within bf16 noise; each tuned count is one of its candidates, measured before capture."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from torch import _dynamo
    from s2dsl.runtime.decode import split_candidates, split_choices
    m = _gpu_model(max_positions=8192)
    ids = torch.randint(1, 1000, (1, 4000), device="cuda")
    runs = []
    for tune in (False, True):
        cache = hf.S2Cache(m, max_length=4040, batch_size=1)
        with torch.no_grad():
            tok = m(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            step = cache.decode_graph(m, compile=True, tune_splits=tune)
            logits, toks = _fed_steps(step, tok, runs[0][1] if runs else None, 10)
            step.graph.close()
        runs.append((logits, toks, cache))
    _dynamo.reset()
    ref, got, cache = runs[0][0], runs[1][0], runs[1][2]
    choices = [c for layer in cache.layers for c in split_choices(layer.paged).values()]
    assert choices and all(tuned in split_candidates(policy) for policy, tuned in choices)
    assert torch.isfinite(got).all()
    assert ((got - ref).norm() / ref.norm()).item() < 3e-2
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05
    assert clear.any()
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


@pytest.mark.gpu
def test_gpu_cuda_graph_generation():
    """bf16 on the GPU: greedy tokens of a left-padded batch decoded by the captured graph equal
    eager decoding through S2Cache."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = _gpu_model(max_positions=4096)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(1, 1000, (n,), generator=gen) for n in (1500, 700, 64)]
    graphed, _ = _graph_greedy(m, prompts, 40, capture=True, device="cuda")
    eager, _ = _graph_greedy(m, prompts, 40, capture=False, device="cuda")
    assert torch.equal(graphed, eager)


@kernels
def test_chunked_prefill_through_s2cache_equals_one_prefill(model, monkeypatch):
    """A prompt fed in chunks (the long one gathered from the pages into the prefill kernel,
    the short one by the decode kernel) gives the logits of one prefill, and the same tokens."""
    from s2dsl.runtime import decode
    monkeypatch.setattr(decode, "GATHER_PREFILL_MIN", 16)
    _use(model, hf.ATTN_IMPLEMENTATION)
    ids = torch.randint(1, 100, (2, 70), generator=torch.Generator().manual_seed(5))
    runs = []
    for chunks in ((70,), (21, 40, 9)):
        cache = hf.S2Cache(model, max_length=90, batch_size=2)
        with torch.no_grad():
            at = 0
            for c in chunks:
                logits = model(ids[:, at:at + c], past_key_values=cache, use_cache=True).logits[:, -1:]
                at += c
            tokens = [logits.argmax(-1)]
            for _ in range(4):
                tokens.append(model(tokens[-1], past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1))
        runs.append((logits, torch.cat(tokens, 1)))
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=2e-4, rtol=2e-4)
    assert torch.equal(runs[1][1], runs[0][1])


@pytest.mark.gpu
def test_gpu_chunked_prefill_gathers_and_matches_one_prefill():
    """bf16 on the GPU: a 4K prompt in 1K chunks (each gathered from the pages into the prefill
    kernel) gives the last logits of one prefill (dense layers: SDPA) within bf16 noise."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = _gpu_model(max_positions=8192)
    ids = torch.randint(1, 1000, (2, 4096), device="cuda")
    last = []
    for chunk in (4096, 1024):
        cache = hf.S2Cache(m, max_length=4200, batch_size=2)
        with torch.no_grad():
            for at in range(0, 4096, chunk):
                logits = m(ids[:, at:at + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        last.append(logits.float())
    err = ((last[1] - last[0]).norm() / last[0].norm()).item()
    assert torch.isfinite(last[1]).all() and err < 3e-2, err
