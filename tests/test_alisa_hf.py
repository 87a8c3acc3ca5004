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
    report = cache.debug_report()
    assert "host tier" in report and "phase 2" in report, report
    assert getattr(cache, "_recompute_fit", None) is None  # nothing to recompute from: not fitted


@kernels
def test_generate_dropping_pages_gives_the_resident_tokens(swa_model):
    """Phase 3 under generate(): 12 GPU pages and no host pages for 16 pages per layer; the
    oldest pages the steps do not read are dropped."""
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(5))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = swa_model.generate(ids, past_key_values=hf.S2Cache(swa_model, max_length=60, batch_size=2), **kw)
        cache = hf.S2Cache(swa_model, max_length=60, batch_size=2, gpu_pages=12, host_pages=0, recompute="hidden")
        out = swa_model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(out, ref)
    tier = cache.paged[0].table.tier
    assert tier.dropped_pages > 0 and tier.host_pages_in_use == 0, tier.report()
    report = cache.debug_report()
    assert "dropped" in report
    # the cost model's recompute time is fitted through this layer's own recompute path
    fit = cache._recompute_fit
    assert fit is not None and fit.recompute_page_ms > 0
    assert "phase 3" in report and "measured on this machine" in report, report


@kernels
def test_a_dropped_page_selected_again_is_recomputed(swa_model):
    """ALISA's decode-side scores rarely bring back a page that left the selection (only visited
    blocks gain mass), so the test selects the dropped block 0 itself, in both caches, and steps:
    the tiered cache recomputes it from the logged hidden states and gives the resident logits."""
    ids = torch.randint(0, 100, (2, 51), generator=torch.Generator().manual_seed(7))
    caches = [hf.S2Cache(swa_model, max_length=60, batch_size=2),
              hf.S2Cache(swa_model, max_length=60, batch_size=2, gpu_pages=12, host_pages=0, recompute="hidden")]
    logits = []
    with torch.no_grad():
        for cache in caches:
            swa_model(ids[:, :40], past_key_values=cache)
            for n in range(40, 50):
                swa_model(ids[:, n:n + 1], past_key_values=cache)
            logits.append(cache)
        tier = caches[1].paged[0].table.tier
        slot, g, j = torch.nonzero(tier.dropped).unbind(1)  # 4 blocks x 4 (sequence, kv head) > 12 pages
        assert slot.numel() == 4, tier.report()
        logits = []
        for cache in caches:
            for p in cache.paged:
                p._topk_state.selection.fill_(-1)
                p._topk_state.selection[slot, g, 0] = j.to(torch.int32)
            logits.append(swa_model(ids[:, 50:51], past_key_values=cache).logits)
    assert tier.recomputed == 4 and tier.pages_dropped_now == 4, tier.report()
    for resident, tiered in zip(caches[0].paged, caches[1].paged):
        for a, b in ((resident.k_pages, tiered.k_pages), (resident.v_pages, tiered.v_pages)):
            want = a[resident.table.tables[slot, g, j].long()]
            got = b[tiered.table.tables[slot, g, j].long()]
            assert (got - want).abs().max().item() < 1e-5
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(logits[1].argmax(-1), logits[0].argmax(-1))


@kernels
def test_recomputed_kv_equal_what_the_layer_wrote(swa_model):
    """The recompute of every held page from the logged hidden states against the pages the
    prefill and decode steps wrote: float32 on the CPU, equal to rounding (a product over other
    rows rounds differently: about 1e-7)."""
    ids = torch.randint(0, 100, (2, 37), generator=torch.Generator().manual_seed(6))
    cache = hf.S2Cache(swa_model, max_length=60, batch_size=2, gpu_pages=64, host_pages=8, recompute="hidden")
    with torch.no_grad():
        swa_model(ids[:, :30], past_key_values=cache)
        for n in range(30, 37):
            swa_model(ids[:, n:n + 1], past_key_values=cache)
    tier = cache.paged[0].table.tier
    assert tier.dropped_pages == 0
    for layer in cache.layers:
        p = layer.paged
        tables = p.table.tables
        slot, g, j = torch.nonzero(tables >= 0).unbind(1)
        k, v = p.table.tier._recompute[id(p)](slot, g, j)
        pages = tables[slot, g, j].long()
        valid = (torch.arange(16).view(1, -1) + j.view(-1, 1) * 16 < 37).unsqueeze(-1)
        for got, pool in ((k, p.k_pages), (v, p.v_pages)):
            err = (torch.where(valid, got - pool[pages], 0)).abs().max().item()
            assert err < 1e-5, err


def test_recompute_arguments_are_checked(swa_model):
    with pytest.raises(ValueError, match="host_pages"):
        hf.S2Cache(swa_model, max_length=40, gpu_pages=8, recompute="hidden")
    with pytest.raises(ValueError, match="prefill"):
        hf.S2Cache(swa_model, max_length=40, gpu_pages=8, host_pages=2, recompute="ids")
    with pytest.raises(ValueError, match="hidden"):
        hf.S2Cache(swa_model, max_length=40, gpu_pages=8, host_pages=2, recompute="tokens")


REL_PLAN = """
pattern rel { block = 16  heads = 4  kv_heads = 2  causal  heads * { window 1  sink 1  stride 2 relative } }
model tiny { layers = 2  rest -> rel }
"""


@pytest.fixture(scope="module")
def rel_run():
    """A relative stride reads every 2nd block below the window, alternating as the query crosses
    blocks: a block left behind at one crossing is read again at the next, so under a GPU budget
    it comes back up (or is recomputed) by itself, with no selection to force."""
    model = tiny_llama(REL_PLAN, seed=1, attn=hf.ATTN_IMPLEMENTATION)
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(5))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=50, min_new_tokens=50, do_sample=False,
              pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, past_key_values=hf.S2Cache(model, max_length=90, batch_size=2), **kw)
    return model, ids, kw, ref


@kernels
@pytest.mark.parametrize("host_pages,recompute", [(24, None), (0, "hidden")], ids=["host", "drop"])
def test_generate_brings_pages_back_by_itself_losslessly(rel_run, host_pages, recompute):
    """generate() over 16 GPU pages per layer (20 needed at the end): at block 4 the unread block 1
    leaves the GPU, at block 5 the relative stride reads it again, and the tier moves it up from
    the host or recomputes it from the logged hidden states; the tokens are the resident cache's."""
    model, ids, kw, ref = rel_run
    cache = hf.S2Cache(model, max_length=90, batch_size=2, gpu_pages=16, host_pages=host_pages,
                       recompute=recompute)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(out, ref)
    tier = cache.paged[0].table.tier
    assert (tier.recomputed if recompute else tier.moved_up) > 0, tier.report()


def _greedy(model, ids, cache, steps, graph=False):
    """Prefill, then ``steps`` greedy tokens: eager forwards, or (``graph``) through
    ``cache.decode_graph`` (static steps, run eagerly on the CPU: ``capture=False``)."""
    with torch.no_grad():
        tok = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        step = cache.decode_graph(model, capture=False) if graph else \
            (lambda t: model(t, past_key_values=cache).logits)
        out = [tok]
        for _ in range(steps):
            tok = step(tok)[:, -1:].argmax(-1)
            out.append(tok)
    return torch.cat(out, 1)


@kernels
# the recomputing case is the slower one on the interpreter (~47 s); test_alisa_gpu captures it on a GPU
@pytest.mark.parametrize("host_pages,recompute",
                         [(8, None), pytest.param(0, "hidden", marks=pytest.mark.slow)], ids=["host", "drop"])
def test_decode_graph_steps_a_tiered_cache_losslessly(swa_model, host_pages, recompute):
    """Static (CUDA-graph) steps over a tiered cache: the tier moves, drops and recomputes pages in
    the host part before each step; the tokens are the all-resident eager cache's."""
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(8))
    ref = _greedy(swa_model, ids, hf.S2Cache(swa_model, max_length=60, batch_size=2), 16)
    cache = hf.S2Cache(swa_model, max_length=60, batch_size=2, gpu_pages=12, host_pages=host_pages,
                       recompute=recompute)
    out = _greedy(swa_model, ids, cache, 16, graph=True)
    assert torch.equal(out, ref)
    tier = cache.paged[0].table.tier
    assert (tier.dropped_pages if recompute else tier.moved_down) > 0, tier.report()
    assert all(p.table.static_max_len for p in cache.paged)


def test_tier_arguments_are_checked(swa_model):
    with pytest.raises(ValueError, match="gpu_pages"):
        hf.S2Cache(swa_model, max_length=40, host_pages=4)
    with pytest.raises(ValueError, match="not both"):
        hf.S2Cache(swa_model, num_pages=4, gpu_pages=4)


def _resident_run(model, prompt: int, new: int, seed: int):
    """(ids, generate kwargs, tokens) of a greedy run on the all-resident cache: two prompts."""
    ids = torch.randint(0, 100, (2, prompt), generator=torch.Generator().manual_seed(seed))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, past_key_values=hf.S2Cache(model, max_length=60, batch_size=2), **kw)
    return ids, kw, ref


@pytest.fixture(scope="module")
def swa_ref(swa_model):
    return _resident_run(swa_model, 40, 12, seed=5)


@kernels
@pytest.mark.parametrize("drop", ["cost", "budget"])
def test_generate_drops_where_the_cost_model_says(swa_model, swa_ref, drop):
    """A slow modelled link (~1 kB/s) and a recompute of 1 us a page: with drop="cost" (the
    default) the tiers drop every page that leaves the GPU although the host has 8 slots, and the
    tokens are the resident ones; drop="budget" keeps them on the host. The report states the
    drop point each tier applies."""
    from s2dsl.runtime.tiering import MachineCosts
    ids, kw, ref = swa_ref
    costs = MachineCosts(h2d_gbps=1e-6, recompute_page_ms=1e-3)
    cache = hf.S2Cache(swa_model, max_length=60, batch_size=2, gpu_pages=12, host_pages=8, recompute="hidden",
                       costs=costs, **({} if drop == "cost" else dict(drop="budget")))
    with torch.no_grad():
        out = swa_model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(out, ref)
    tiers = [p.table.tier for p in cache.paged]
    report = cache.debug_report()
    if drop == "cost":
        assert all(t.decision is not None and t.decision.host_limit == 0 for t in tiers)
        assert all(t.dropped_pages > 0 and t.host_pages_in_use == 0 and t.moved_down == 0 for t in tiers), report
        assert "drop='cost' in force: drop past 0 of 8 host pages per layer (phase 3" in report, report
        assert "drops past 0 host pages (cost)" in report
        assert cache.drop_policy.decide(tiers[0]) is tiers[0].decision  # the report's numbers are the tier's
    else:
        assert all(t.dropped_pages == 0 and t.host_pages_in_use > 0 for t in tiers), report
        assert "drop='budget' in force: drop past 8 of 8 host pages per layer (host_pages); the cost model " \
               "would drop past 0" in report, report


def test_drop_arguments_are_checked(swa_model):
    from s2dsl.runtime.tiering import MachineCosts
    with pytest.raises(ValueError, match="not a drop mode"):
        hf.S2Cache(swa_model, max_length=40, gpu_pages=8, host_pages=2, recompute="hidden", drop="early")
    with pytest.raises(ValueError, match="recompute='hidden'"):
        hf.S2Cache(swa_model, max_length=40, gpu_pages=8, host_pages=2, drop="cost")
    with pytest.raises(TypeError, match="MachineCosts"):
        hf.S2Cache(swa_model, max_length=40, gpu_pages=8, host_pages=2, recompute="hidden", costs=20.0)
    cache = hf.S2Cache(swa_model, max_length=40, gpu_pages=8, host_pages=2, recompute="hidden", drop="budget",
                       costs=MachineCosts())
    assert cache.drop_policy is not None and all(layer.drop_policy is None for layer in cache.layers)


# ---------------------------------------------------------------- gpu_pages="auto": the split
# both tiers on the CPU: the "device" memory is given (free_memory=), never read
PAGE = 2 * 16 * 16 * 4  # one float32 page of K and V (block 16, head dim 16)


def _auto(model, **kw):
    return hf.S2Cache(model, max_length=60, batch_size=2, gpu_pages="auto", **kw)


@pytest.fixture(scope="module")
def auto_ref(swa_model):
    """A 47-token prompt (3 blocks) and 4 greedy tokens: the second opens block 4, where a GPU pool
    of 3 pages per (sequence, kv head) must move one down. The resident cache's tokens."""
    return _resident_run(swa_model, 47, 4, seed=9)


@kernels
def test_auto_split_phase_1_when_the_device_has_room(swa_model, auto_ref):
    """Ample free memory: every page on the GPU, no host tier at all (not even for recompute),
    the plain cache's tokens; the report names the phase and the budget's parts."""
    ids, kw, ref = auto_ref
    seen = []
    cache = _auto(swa_model, free_memory=lambda device: seen.append(device) or 1 << 30, recompute="hidden")
    assert seen == [torch.device("cpu")] and cache.split.phase == 1
    with torch.no_grad():
        out = swa_model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(out, ref)
    assert all(p.table.tier is None for p in cache.paged) and all(layer.hidden_log is None for layer in cache.layers)
    assert [p.num_pages for p in cache.paged] == [hf.pages_needed(p, 60, 2) for p in swa_model.s2dsl_patterns]
    report = cache.debug_report()
    assert report.startswith("split (auto): phase 1: need 20 pages/layer, GPU 20 (budget ") and \
        "free 1.00 GiB - headroom 256.51 MiB (forward of 2 x 60 tokens)" in report, report


@kernels
def test_auto_split_phase_2_when_the_device_is_short_is_lossless(swa_model, auto_ref):
    """Free memory = the estimated headroom + one step's pages (12 of 20 per layer): the GPU pools
    get exactly one step's pages, the host the rest, and the tokens are the all-resident ones."""
    ids, kw, ref = auto_ref
    room = hf.activation_headroom(swa_model, 2, 60)
    cache = _auto(swa_model, free_memory=room + (2 * 12 + 2) * PAGE)
    assert cache.split.phase == 2 and cache.split.gpu_pages == (12, 12) and cache.split.host_pages == (8, 8)
    with torch.no_grad():
        out = swa_model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(out, ref)
    tiers = [p.table.tier for p in cache.paged]
    assert all(t.host_pages == 8 and t.moved_down > 0 and not t.drop for t in tiers), tiers[0].report()
    assert all(p.pages_in_use <= 12 == p.num_pages for p in cache.paged)
    report = cache.debug_report()
    assert "split (auto): phase 2: need 20 pages/layer, GPU 12 (budget 48.00 KiB = free" in report, report
    assert "host 8 (budget" in report and "available) pages/layer" in report and "up to 48 tokens" in report, report


@kernels
def test_auto_split_phase_3_when_the_host_is_short_too(swa_model, auto_ref):
    """The host may hold 3 of the 8 pages per layer left off the GPU (after the hidden-state log):
    phase 3, the tiers drop the oldest pages (the cost model may drop earlier), tokens unchanged."""
    ids, kw, ref = auto_ref
    log = 2 * 2 * 60 * 64 * 4  # layers x batch x max_length x hidden x float32: 60 KiB
    cache = _auto(swa_model, free_memory=(2 * 12 + 2) * PAGE, headroom=0, host_memory=log + 2 * 3 * PAGE,
                  recompute="hidden")
    assert cache.split.phase == 3 and cache.split.host_pages == (3, 3)
    with torch.no_grad():
        out = swa_model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(out, ref)
    tiers = [p.table.tier for p in cache.paged]
    assert all(t.host_pages == 3 and t.dropped_pages > 0 and t.host_pages_in_use <= 3 for t in tiers), \
        tiers[0].report()
    report = cache.debug_report()
    assert "split (auto): phase 3: need 20 pages/layer, GPU 12" in report and "host 3 (budget 12.00 KiB: " \
        "host_memory 72.00 KiB - hidden-state log 60.00 KiB)" in report and "drop='cost' in force" in report, report


def test_auto_split_arguments_are_checked(swa_model):
    with pytest.raises(ValueError, match="'auto'.*'atuo'"):
        hf.S2Cache(swa_model, max_length=60, gpu_pages="atuo")
    with pytest.raises(ValueError, match="host_pages must be"):
        hf.S2Cache(swa_model, max_length=60, gpu_pages=12, host_pages="all")
    with pytest.raises(ValueError, match="cannot be read.*free_memory=BYTES"):
        _auto(swa_model)  # the CPU reports no free device memory
    with pytest.raises(ValueError, match=r"one decode step needs.*12 pages/layer.*gpu_pages=12"):
        _auto(swa_model, free_memory=(2 * 12 + 1) * PAGE, headroom=0)
    with pytest.raises(ValueError, match=r"recompute='hidden'.*host_memory="):
        _auto(swa_model, free_memory=(2 * 12 + 2) * PAGE, headroom=0, host_memory=PAGE)
    with pytest.raises(ValueError, match="free_memory must be"):
        _auto(swa_model, free_memory=-1)
    with pytest.raises(ValueError, match="max_length"):
        hf.S2Cache(swa_model, gpu_pages="auto", free_memory=1 << 30)
    with pytest.raises(ValueError, match="needs the model"):
        hf.S2Cache(patterns=swa_model.s2dsl_patterns, max_length=60, gpu_pages="auto", free_memory=1 << 30)
    with pytest.raises(ValueError, match="do nothing"):
        hf.S2Cache(swa_model, max_length=60, gpu_pages=12, free_memory=1 << 30)
    with pytest.raises(ValueError, match="host_pages needs gpu_pages"):
        hf.S2Cache(swa_model, max_length=60, host_pages="auto")
    # a given GPU pool with the host's share chosen: the rest of the need, no more
    cache = hf.S2Cache(swa_model, max_length=60, batch_size=2, gpu_pages=14, host_pages="auto", host_memory=1 << 20)
    assert cache.split.phase == 2 and cache.split.host_pages == (6, 6)
    assert [layer.host_pages for layer in cache.layers] == [6, 6]


@pytest.mark.parametrize("drop", [0, False])
def test_s2cache_drop_errors_say_how_to_turn_dropping_off(swa_model, drop):
    # drop=False without recompute keeps every page (the default); with recompute it contradicts it
    if drop is False:
        assert hf.S2Cache(swa_model, max_length=40, gpu_pages=8, host_pages=2, drop=False).drop_policy is None
    with pytest.raises(ValueError, match="leave out recompute" if drop is False else "not a page count.*recompute="):
        hf.S2Cache(swa_model, max_length=40, gpu_pages=8, host_pages=2, recompute="hidden", drop=drop)
