"""ALISA's GPU/host split chosen from the machine's memory (``runtime.split``), without a model:
the budgets it must respect, the phases, the refusals; and the counts it is built on."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import s2dsl
from s2dsl.runtime import split, tiering
from s2dsl.runtime.host_tier import HostTier
from s2dsl.runtime.kv_cache import PagedKVCache

SWA = s2dsl.parse("pattern p { block = 16 heads = 4 kv_heads = 2 causal heads * { window 1 topk 2 recent 3 } }")["p"]


@st.composite
def layers(draw):
    n = draw(st.integers(1, 4))
    step = draw(st.lists(st.integers(1, 64), min_size=n, max_size=n))
    need = [s + draw(st.integers(0, 200)) for s in step]
    page = draw(st.lists(st.sampled_from([512, 2048, 4096 + 64]), min_size=n, max_size=n))
    return need, step, page


@settings(max_examples=200, deadline=None)
@given(layers(), st.floats(0, 1.2), st.floats(0, 1.2), st.booleans())
def test_the_split_keeps_within_the_budgets(layer, gpu_frac, host_frac, can_drop):
    """Whatever the budgets: each layer keeps at least one step's pages and at most its need on the
    GPU, the GPU pools fit the GPU budget, the host pages fit the host budget, a phase is what its
    split says, and what is refused is refused because nothing fits."""
    need, step, page = layer
    total = sum(d * b for d, b in zip(need, page))
    least = sum(s * b for s, b in zip(step, page))
    gpu_budget = int(least + gpu_frac * (total - least))
    host_budget = int(host_frac * (total - least))
    try:
        got = split.choose_split(need, step, page, gpu_budget=gpu_budget, host_budget=host_budget, can_drop=can_drop)
    except ValueError as exc:
        assert not can_drop and "recompute='hidden'" in str(exc)
        return
    assert sum(g * b for g, b in zip(got.gpu_pages, page)) <= gpu_budget
    assert all(s <= g <= d for s, g, d in zip(step, got.gpu_pages, need))
    if got.phase == 1:
        assert total <= gpu_budget and got.host_pages is None and list(got.gpu_pages) == need
        return
    rest = [d - g for d, g in zip(need, got.gpu_pages)]
    assert sum(h * b for h, b in zip(got.host_pages, page)) <= host_budget
    if got.phase == 2:
        assert list(got.host_pages) == rest
    else:
        assert can_drop and sum(r * b for r, b in zip(rest, page)) > host_budget
        assert all(h <= r for h, r in zip(got.host_pages, rest))


def test_the_gpu_budget_goes_to_the_layers_that_would_spill():
    """A layer that reads everything it holds (need == step: dense) keeps it all; the budget left
    is shared in proportion to what the others would spill."""
    got = split.choose_split([10, 50, 90], [10, 10, 10], [1, 1, 1], gpu_budget=30 + 60, host_budget=1 << 30)
    assert got.phase == 2 and got.gpu_pages == (10, 30, 50) and got.host_pages == (0, 20, 40)


def test_given_pools_are_kept_and_only_the_rest_is_chosen():
    # a given GPU pool: the host takes what it leaves (phase 2), or none when it holds the need
    got = split.choose_split([20, 20], [12, 12], [1, 1], gpu_pages=[14, 14], host_budget=1 << 20)
    assert (got.phase, got.gpu_pages, got.host_pages, got.gpu_budget) == (2, (14, 14), (6, 6), None)
    assert split.choose_split([20], [12], [1], gpu_pages=[20], host_budget=0).host_pages is None
    # given host pages: phase 2 when they hold the rest, phase 3 (dropping) when they do not
    got = split.choose_split([20], [12], [1], gpu_budget=14, host_pages=[6])
    assert (got.phase, got.gpu_pages, got.host_pages) == (2, (14,), (6,))
    got = split.choose_split([20], [12], [1], gpu_budget=14, host_pages=[2], can_drop=True)
    assert (got.phase, got.host_pages) == (3, (2,)) and "(given)" in got.report()


def test_refusals_say_what_is_needed_and_what_to_pass():
    with pytest.raises(ValueError, match=r"one decode step needs.*gpu_pages=12"):
        split.choose_split([20, 20], [12, 12], [2048, 2048], gpu_budget=23 * 2048, host_budget=1 << 30)
    with pytest.raises(ValueError, match=r"recompute='hidden'.*host_memory="):
        split.choose_split([20], [12], [1], gpu_budget=12, host_budget=7)
    with pytest.raises(ValueError, match="smaller headroom="):
        split.choose_split([20], [12], [1], gpu_budget=-1, host_budget=7)
    with pytest.raises(ValueError, match="host_memory=BYTES"):
        split.choose_split([20], [12], [1], gpu_budget=12, host_budget=-5, can_drop=True)
    with pytest.raises(ValueError, match="raise host_pages"):
        split.choose_split([20], [12], [1], gpu_budget=12, host_pages=[4])


def test_free_memory_of_a_device_that_cannot_report_it_is_refused():
    with pytest.raises(ValueError, match="free_memory=BYTES"):
        split.device_free_bytes("cpu")


def test_host_memory_is_read_from_the_machine():
    avail = split.host_available_bytes()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < avail <= total


@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, None), (torch.float16, None), (torch.float32, torch.int8)])
def test_page_bytes_are_the_caches_own(dtype, kv_dtype):
    cache = PagedKVCache(SWA, num_pages=4, head_dim=16, dtype=dtype, kv_dtype=kv_dtype)
    assert split.kv_page_bytes(16, 16, 1 if kv_dtype else dtype.itemsize, kv_dtype is not None) == cache.page_bytes


def test_step_pages_count_the_reads_with_the_querys_own_block():
    # window 1 + top 2 at 4 blocks: 3 pages per (sequence, kv head), the new page being the window's
    assert tiering.step_pages(SWA, 60, batch=2) == 2 * 2 * 3
    # a sink alone: the sink block and the query's own (a step attends its own token), per sequence
    sink = s2dsl.parse("pattern q { block = 16 heads = 2 kv_heads = 1 causal heads * { sink 1 } }")["q"]
    assert tiering.step_pages(sink, 64, batch=3) == 3 * 2


def test_activation_headroom_follows_its_formula():
    kw = dict(batch=2, tokens=100, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=100,
              dtype_bytes=4)
    live = 2 * 100 * 4 * (4 * 64 + 2 * 8 * 16 + 3 * 128) + 2 * 100 * 8
    assert split.activation_headroom(**kw) == int(split.HEADROOM_SLACK * live) + split.HEADROOM_FIXED
    with pytest.raises(ValueError, match="tokens"):
        split.activation_headroom(**dict(kw, tokens=0))


@pytest.mark.parametrize("drop", [0, 1, None, "no", 0.0])
def test_a_bad_drop_says_what_drop_takes_and_how_to_turn_it_off(drop):
    cache = PagedKVCache(SWA, num_pages=4, head_dim=16, dtype=torch.float32)
    with pytest.raises(ValueError) as err:
        HostTier(cache.table, host_pages=1, drop=drop)
    msg = str(err.value)
    assert "not a drop mode" in msg and "'cost'" in msg and "'budget'" in msg and "pass drop=False" in msg, msg
    assert ("not a page count" in msg) == isinstance(drop, (int, float)), msg
    assert HostTier(cache.table, host_pages=1, drop=False).drop_mode is None
