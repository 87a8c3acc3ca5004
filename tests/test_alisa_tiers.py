"""ALISA's host tier under the Triton interpreter, both tiers on the CPU: a decode over a GPU pool
smaller than the KV must give exactly the outputs of the all-resident cache. Pages leaving the GPU
pool are poisoned with NaN, so reading one that was not brought back would show."""
from __future__ import annotations

import functools
import json
import os
import warnings

import pytest
import torch

import s2dsl
from s2dsl.runtime.host_tier import HostFullError, HostTier
from s2dsl.runtime.kv_cache import OutOfPagesError, PagedKVCache
from s2dsl.runtime.tiering import DropPolicy, MachineCosts

from serving_helpers import decode_steps

interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
D = 16
# ALISA's sparse window attention: the recent block plus the top 2 blocks by recent attention mass
SWA = s2dsl.parse("pattern p { block = 16 heads = 4 kv_heads = 2 heads * { window 1 topk 2 recent 3 } }")["p"]
# a static pattern: its kv heads are KV-efficient (the tier frees what the pattern drops)
STATIC = s2dsl.local_stride(block=16, local_blocks=1, vert_stride=3, heads=4, kv_heads=2)


def _data(pattern, n, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, h, n, D, generator=g) for h in (pattern.heads, pattern.kv_heads, pattern.kv_heads)]
            for _ in range(batch)]


@interpreter
@pytest.mark.parametrize("pattern,kv_dtype,alternate", [
    pytest.param(SWA, None, True, id="swa-alternate"),
    pytest.param(SWA, torch.int8, True, id="swa-int8-alternate", marks=pytest.mark.slow),
    pytest.param(SWA, None, False, id="swa-together", marks=pytest.mark.slow),
    pytest.param(STATIC, None, True, id="static-alternate", marks=pytest.mark.slow)])
def test_spilling_to_the_host_is_lossless(pattern, kv_dtype, alternate):
    data = _data(pattern, 66, 2)
    resident = PagedKVCache(pattern, num_pages=64, head_dim=D, dtype=torch.float32, kv_dtype=kv_dtype)
    ref, _ = decode_steps(resident, data, 40, 26, alternate)
    tiered = PagedKVCache(pattern, num_pages=16, head_dim=D, dtype=torch.float32, kv_dtype=kv_dtype)
    tier = HostTier(tiered.table, host_pages=32, poison=kv_dtype is None)
    tier.attach(tiered)
    out, _ = decode_steps(tiered, data, 40, 26, alternate)
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref)
    if pattern is SWA:
        assert tier.moved_down > 0, tier.report()
        # one sequence's step moves the other's pages down; its next step brings them back
        assert (tier.moved_up > 0) == alternate, tier.report()
        # every page of a top-k kv head is kept, in one tier or the other: 5 blocks x 2 kv heads x 2
        assert tiered.pages_in_use + tier.host_pages_in_use == 20
        assert tiered.pages_in_use <= 16


def _oracle(cache, data):
    """A recompute callback that returns the K/V each sequence wrote (slot i holds data[i])."""
    b = cache.block

    def recompute(slots, kv_heads, blocks):
        out = []
        for which in (1, 2):
            rows = []
            for s, g, j in zip(slots.tolist(), kv_heads.tolist(), blocks.tolist()):
                page = data[s][which][0, g, j * b:(j + 1) * b]
                rows.append(torch.cat([page, page.new_zeros(b - page.shape[0], D)]))
            out.append(torch.stack(rows))
        return tuple(out)
    return recompute


@interpreter
@pytest.mark.parametrize("host_pages", [1, 0])
def test_dropping_past_the_host_budget_and_recomputing_is_lossless(host_pages):
    """Phase 3: the host holds 1 page (or none); older pages are dropped (their GPU pages
    poisoned) and made again by the layer's callback when a step reads them."""
    data = _data(SWA, 66, 2)
    resident = PagedKVCache(SWA, num_pages=64, head_dim=D, dtype=torch.float32)
    ref, _ = decode_steps(resident, data, 40, 26, alternate=True)
    tiered = PagedKVCache(SWA, num_pages=16, head_dim=D, dtype=torch.float32)
    tier = HostTier(tiered.table, host_pages=host_pages, drop=True, poison=True)
    tier.attach(tiered, recompute=_oracle(tiered, data))
    out, ids = decode_steps(tiered, data, 40, 26, alternate=True)
    assert [tiered.slot(s) for s in ids] == [0, 1]
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref)
    assert tier.dropped_pages > 0 and tier.recomputed > 0, tier.report()
    # every page of a top-k kv head is kept somewhere or marked dropped: 5 blocks x 2 kv heads x 2
    assert tiered.pages_in_use + tier.host_pages_in_use + tier.pages_dropped_now == 20
    assert tier.host_pages_in_use <= host_pages and tiered.pages_in_use <= 16
    assert tier.syncs == 2 * 26 + 2  # one device read per planned step (the prefills included)


def test_a_dropping_tier_needs_each_layers_recompute():
    cache = PagedKVCache(SWA, num_pages=4, head_dim=D, dtype=torch.float32)
    tier = HostTier(cache.table, host_pages=1, drop=True)
    with pytest.raises(ValueError, match="recompute"):
        tier.attach(cache)


@interpreter
def test_nothing_moves_when_everything_fits():
    data = _data(SWA, 52, 1)
    cache = PagedKVCache(SWA, num_pages=64, head_dim=D, dtype=torch.float32)
    tier = HostTier(cache.table, host_pages=8)
    tier.attach(cache)
    decode_steps(cache, data, 40, 12)
    assert tier.moved_down == tier.moved_up == 0


@interpreter
def test_full_host_and_too_small_gpu_pools_are_refused_clearly():
    data = _data(SWA, 50, 2)
    cache = PagedKVCache(SWA, num_pages=12, head_dim=D, dtype=torch.float32)
    tier = HostTier(cache.table, host_pages=2)
    tier.attach(cache)
    with pytest.raises(HostFullError, match="host_pages"):
        decode_steps(cache, data, 40, 10, alternate=True)
    # a step of two sequences reads 2 x 2 kv heads x (window + 2 top-k) = 12 pages: 11 cannot serve it
    cache = PagedKVCache(SWA, num_pages=11, head_dim=D, dtype=torch.float32)
    tier = HostTier(cache.table, host_pages=64)
    tier.attach(cache)
    with pytest.raises(OutOfPagesError, match="gpu_pages"):
        decode_steps(cache, data, 40, 10)


def test_one_tier_per_table():
    cache = PagedKVCache(SWA, num_pages=4, head_dim=D, dtype=torch.float32)
    HostTier(cache.table, host_pages=1)
    with pytest.raises(ValueError, match="already"):
        HostTier(cache.table, host_pages=1)
    with pytest.raises(ValueError, match="host_pages"):
        HostTier(PagedKVCache(SWA, num_pages=4, head_dim=D).table, host_pages=-1)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="captures interpreted launches")
def test_bench_moving_pattern_decode_compiles_for_sm90():
    """bench_alisa's relative-stride ("moving") pattern at the bench's GPU shape (bf16, head dim 64,
    64-token pages, GQA 32/8): its decode kernel compiles for sm_90 without a GPU."""
    from test_sm90_compile import _Capture, _compile_sm90
    from s2dsl.codegen.decode import DecodeSpecialization
    from s2dsl.runtime.decode import decode_module
    pattern = s2dsl.parse("pattern moving { block = 64 heads = 32 kv_heads = 8 causal "
                          "heads * { window 2 sink 1 stride 8 relative } }")["moving"]
    spec = DecodeSpecialization(dtype="bfloat16", head_dim=64, capability=(9, 0), block_q=1, block_n=64,
                                num_warps=4, num_stages=3)
    module = decode_module(pattern, spec)
    space = module.launch.__globals__
    jobs, saved = [], (space["kernel"], space["combine_kernel"])
    space["kernel"], space["combine_kernel"] = (_Capture(k, jobs, run=False) for k in saved)
    try:
        q = torch.zeros(2, 32, 1, 64, dtype=torch.bfloat16)
        pages = torch.zeros(40, 64, 64, dtype=torch.bfloat16)
        table = torch.zeros(2, 8, 16, dtype=torch.int32)
        for splits in (1, 2):
            module.launch(q, torch.empty_like(q), torch.empty(2, 32, 1), pages, pages, table,
                          torch.arange(2, dtype=torch.int32), torch.full((2,), 1000, dtype=torch.int32), 1, splits, 0.1)
    finally:
        space["kernel"], space["combine_kernel"] = saved
    assert jobs
    unique = list({json.dumps([j["name"], j["consts"]], sort_keys=True): j for j in jobs}.values())
    for shared in _compile_sm90(unique):
        assert shared <= 232448


# the cost model's drop point, applied (HostTier(drop="cost", policy=...)): a link of ~1 kB/s
# against a recompute of 1 us a page, and the other way round
SLOW_LINK = MachineCosts(h2d_gbps=1e-6, recompute_page_ms=1e-3)
FAST_LINK = MachineCosts(h2d_gbps=1e3, recompute_page_ms=10.0)


@functools.lru_cache(maxsize=1)
def _cost_run():
    """Two sequences of 60 tokens decoding 8 alternate steps over the block crossing at 64 (the
    pool of 16 pages holds 4 blocks x 2 kv heads x 2 sequences), and the resident outputs."""
    data = _data(SWA, 68, 2)
    resident = PagedKVCache(SWA, num_pages=64, head_dim=D, dtype=torch.float32)
    return data, decode_steps(resident, data, 60, 8, alternate=True)[0]


@interpreter
@pytest.mark.parametrize("costs", [SLOW_LINK, FAST_LINK], ids=["slow-link", "fast-link"])
def test_the_tier_drops_where_the_cost_model_says(costs):
    """Host room for every page (12 host pages, 20 pages for 16 GPU pages): over a slow link the
    cost model drops everything that leaves the GPU (phase 3 by choice: the host stays empty);
    over a fast link nothing is dropped and the host holds what left. Both decode exactly."""
    data, ref = _cost_run()
    tiered = PagedKVCache(SWA, num_pages=16, head_dim=D, dtype=torch.float32)
    policy = DropPolicy(costs)
    tier = HostTier(tiered.table, host_pages=12, drop="cost", policy=policy, poison=True)
    tier.attach(tiered, recompute=_oracle(tiered, data))
    out, _ = decode_steps(tiered, data, 60, 8, alternate=True)
    assert torch.equal(out, ref)
    d = tier.decision
    assert d is not None and d is policy.decide(tier) and tier.drop_limit() == d.host_limit
    assert tiered.pages_in_use + tier.host_pages_in_use + tier.pages_dropped_now == 20
    if costs is SLOW_LINK:
        assert d.plan.phase == 3 and d.host_limit == 0, d.report()
        assert tier.dropped_pages > 0 and tier.recomputed > 0 and tier.host_pages_in_use == 0, tier.report()
        assert tier.moved_down == 0
    else:
        assert d.plan.phase == 2 and d.host_limit == 12, d.report()
        assert tier.dropped_pages == 0 and tier.moved_down > 0 and tier.host_pages_in_use > 0, tier.report()
    assert f"drop past {d.host_limit} of 12 host pages" in d.report()
    assert f"drops past {d.host_limit} host pages (cost)" in tier.report()
    # a plan per length bucket, not per step: every short step came at 65..68 tokens (5 pages)
    assert len(policy._decisions) == 1


def _lengths(cache, lengths):
    ids = [cache.add_sequence() for _ in lengths]
    for s, n in zip(ids, lengths):
        cache.table.get(s).length = n  # the policy reads lengths only: no K/V needed
    return ids


def test_drop_policy_plans_per_bucket_and_batch_and_applies_the_plans_host_bytes():
    """A link whose copies the overlap half hides: the cheapest drop keeps some pages on the host
    (the copies of those just fit behind the overlap): the limit is the plan's host bytes in pages,
    strictly between 0 and host_pages."""
    cache = PagedKVCache(SWA, num_pages=16, head_dim=D, dtype=torch.float32)
    # a page is 2 x 16 x 16 x 4 bytes = 2 KiB: 1 ms a page over 2.048 MB/s, recompute 0.5 ms
    policy = DropPolicy(MachineCosts(h2d_gbps=2.048e-3, recompute_page_ms=0.5), overlap_ms=0.2)
    tier = HostTier(cache.table, host_pages=4, drop="cost", policy=policy)
    tier.attach(cache, recompute=lambda *a: None)
    _lengths(cache, [79, 79])  # the step writes token 80: 5 pages
    d = policy.decide(tier)
    assert d.plan.phase == 3 and 0 < d.host_limit < 4, d.report()
    assert d.host_limit == int(d.plan.host_bytes / (d.plan.gpu_bytes / cache.num_pages) + 1e-9)
    assert tier.drop_limit() == d.host_limit and tier.decision is d
    cache.table.get(0).length = 80  # its step writes the 6th page: the next bucket, planned anew
    assert policy.decide(tier) is not d and len(policy._decisions) == 2
    cache.table.get(0).length = 90  # the same bucket: the same decision
    assert len(policy._decisions) == 2 and policy.decide(tier) is policy.decide(tier)
    _lengths(cache, [90])  # a third sequence: the batch changed
    policy.decide(tier)
    assert len(policy._decisions) == 3
    assert [DropPolicy.bucket(n) for n in (1, 4, 5, 8, 9, 10, 11, 17, 33)] == [1, 4, 5, 8, 10, 10, 12, 20, 40]


def test_drop_modes_are_checked():
    cache = PagedKVCache(SWA, num_pages=4, head_dim=D, dtype=torch.float32)
    with pytest.raises(ValueError, match="not a drop mode"):
        HostTier(cache.table, host_pages=1, drop="sometimes")
    with pytest.raises(ValueError, match="policy"):
        HostTier(cache.table, host_pages=1, drop="cost")
    with pytest.raises(ValueError, match="'cost' only"):
        HostTier(cache.table, host_pages=1, drop="budget", policy=DropPolicy())
    with pytest.raises(TypeError, match="MachineCosts"):
        DropPolicy(costs=20.0)
    with pytest.raises(ValueError, match="overlap_ms"):
        DropPolicy(overlap_ms=-1)
    tier = HostTier(cache.table, host_pages=1, drop=True)  # True keeps its old meaning: past host_pages
    assert tier.drop_mode == "budget" and tier.drop_limit() == 1


def test_a_cost_plan_that_fails_mid_step_falls_back_to_the_host_budget():
    """Deciding may measure the machine and fit the recompute path inside a step; if that raises
    (out of memory, an error in the recompute callback), the tier warns once and drops past
    host_pages, as drop="budget" would, instead of leaving the step's layers half-stepped."""
    cache = PagedKVCache(SWA, num_pages=16, head_dim=D, dtype=torch.float32)

    class Failing(DropPolicy):
        def decide(self, tier):
            raise RuntimeError("recompute callback failed")

    tier = HostTier(cache.table, host_pages=4, drop="cost", policy=Failing())
    tier.attach(cache, recompute=lambda *a: None)
    _lengths(cache, [79, 79])
    with pytest.warns(RuntimeWarning, match="could not plan.*host_pages=4"):
        assert tier.drop_limit() == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tier.drop_limit() == 4  # warned once
