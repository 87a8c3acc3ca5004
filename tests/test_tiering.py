"""ALISA's cost model: phases by what fits, and predictions that move the right way."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from s2dsl.runtime.tiering import MachineCosts, Workload, plan, with_int8

GIB = 1 << 30


def llama(context=32768, batch=8, **kw) -> Workload:
    # Llama-3-8B-shaped layer: 8 kv heads of 128, hidden 4096; SWA at 80% sparsity of 32K
    base = dict(batch=batch, context=context, kv_heads=8, head_dim=128, block=64, hidden=4096,
                read_pages=context // 64 // 5, topk_pages=context // 64 // 10, layers=32)
    base.update(kw)
    return Workload(**base)


def test_phase_one_when_everything_fits():
    w = llama()
    p = plan(w, gpu_budget_bytes=w.total_bytes, host_budget_bytes=0)
    assert p.phase == 1 and p.transfer_ms == 0 and p.recompute_ms == 0 and p.host_bytes == 0
    assert "nothing moves" in p.report()


def test_phase_two_then_three_as_the_gpu_budget_shrinks():
    w = llama()
    p2 = plan(w, w.total_bytes / 2, w.total_bytes)
    assert p2.phase == 2 and p2.host_bytes == pytest.approx(w.total_bytes / 2) and p2.dropped_tokens == 0
    p3 = plan(w, w.total_bytes / 2, w.total_bytes / 4)
    assert p3.phase == 3 and p3.dropped_tokens > 0 and p3.recompute_ms > 0
    assert p3.gpu_bytes + p3.host_bytes < w.total_bytes


def test_refuses_a_gpu_budget_below_one_step():
    w = llama()
    with pytest.raises(ValueError, match="below what one step reads"):
        plan(w, w.read_bytes / 2, w.total_bytes)


@settings(max_examples=80, deadline=None)
@given(st.floats(0.25, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 2.0))
def test_less_gpu_never_predicts_faster(frac, host_frac, churn, overlap):
    w = llama(churn=churn)
    lo = max(frac, w.read_bytes / w.total_bytes)
    a = plan(w, w.total_bytes * lo, w.total_bytes * host_frac, overlap_ms=overlap)
    b = plan(w, w.total_bytes * min(1.0, lo * 1.5), w.total_bytes * host_frac, overlap_ms=overlap)
    assert b.step_ms <= a.step_ms + 1e-12
    assert a.phase >= b.phase


def test_int8_halves_the_bytes_that_move():
    w = llama()
    q = with_int8(w)
    assert q.total_bytes == pytest.approx(w.total_bytes * (1 + 8 / 64) / 2)
    pw = plan(w, w.total_bytes / 2, w.total_bytes)
    pq = plan(q, w.total_bytes * 0.6, w.total_bytes)
    assert pq.phase == 1  # INT8 (codes + per-channel scale and bias: 56% of 16-bit) makes it fit
    pq2 = plan(q, q.total_bytes / 2, q.total_bytes)
    assert pq2.transfer_ms == pytest.approx(pw.transfer_ms * (1 + 8 / 64) / 2)


def test_overlap_hides_copies():
    w = llama(churn=1.0)
    bare = plan(w, w.total_bytes / 2, w.total_bytes)
    hidden = plan(w, w.total_bytes / 2, w.total_bytes, overlap_ms=1e3)
    assert bare.transfer_ms > 0 and hidden.transfer_ms == 0


def test_gqa_changes_whether_recompute_saves_memory():
    # ALISA's OPT/LLaMA-1 (MHA): hidden 4096 < 2 * 32 * 128 -> keeping hidden states is cheaper
    assert Workload(1, 1024, 32, 128, 64, 4096, 4).recompute_saves_memory
    # GQA with 8 kv heads: K+V per token (2048) is smaller than the hidden state (4096)
    w = llama()
    assert not w.recompute_saves_memory
    p = plan(w, w.total_bytes / 2, w.total_bytes / 4)
    assert "more than the K/V they replace" in p.reason


def test_bad_values_refused():
    with pytest.raises(ValueError):
        Workload(0, 1024, 8, 128, 64, 4096, 4)
    with pytest.raises(ValueError):
        llama(churn=1.5)
    with pytest.raises(ValueError):
        MachineCosts(h2d_gbps=0)
    with pytest.raises(ValueError):
        plan(llama(), -1, 0)


def test_workload_for_counts_what_a_decode_step_reads():
    import s2dsl
    from s2dsl.runtime.tiering import workload_for
    swa = s2dsl.parse("pattern p { block = 64 heads = 8 kv_heads = 2 heads * { window 4 sink 1 topk 3 } }")["p"]
    w = workload_for(swa, batch=2, context=64 * 100, head_dim=64, hidden=512, layers=4)
    assert (w.read_pages, w.topk_pages, w.pages_per_head) == (4 + 1 + 3, 3, 100)
    short = workload_for(swa, batch=2, context=64 * 3, head_dim=64, hidden=512)
    assert short.read_pages == 3  # never more than the context holds
    q8 = workload_for(swa, batch=2, context=6400, head_dim=64, hidden=512, kv_int8=True)
    assert q8.page_bytes == w.page_bytes * (1 + 8 / 64) / 2  # codes + a float32 scale and bias per page channel
    # GQA: 2 kv heads of 64 per 512-wide token: hidden states cost more than the K/V they replace
    assert not w.recompute_saves_memory
    # the phase follows the budgets: all fits -> 1; a quarter on the GPU, the rest on the host -> 2
    assert plan(w, w.total_bytes, 0).phase == 1
    assert plan(w, w.total_bytes / 4, w.total_bytes).phase == 2


# ---------------------------------------------------------------- drop or keep: the costs decide
def mha(**kw) -> Workload:
    # ALISA's own shape (MHA: hidden = kv_heads * head_dim), SWA with churn, a third off the GPU
    base = dict(batch=8, context=16384, kv_heads=32, head_dim=128, block=64, hidden=4096,
                read_pages=16384 // 64 // 5, topk_pages=16384 // 64 // 10, churn=0.2, layers=32)
    base.update(kw)
    return Workload(**base)


def test_slow_link_and_fast_recompute_drop_although_the_host_has_room():
    w = mha()
    slow_link = MachineCosts(h2d_gbps=1.0, recompute_page_ms=1e-4)
    p = plan(w, w.total_bytes / 3, w.total_bytes, slow_link)
    assert p.phase == 3 and p.host_bytes == 0  # everything off the GPU dropped: recompute is cheaper
    assert p.recompute_ms > 0 and p.transfer_ms == 0 and p.pages_recomputed > 0
    assert "cheaper than fetching" in p.reason and "measured on this machine" in p.report()
    # the reverse: a fast link and a slow recompute keep the pages on the host
    fast_link = MachineCosts(h2d_gbps=1000.0, recompute_page_ms=10.0)
    q = plan(w, w.total_bytes / 3, w.total_bytes, fast_link)
    assert q.phase == 2 and q.dropped_tokens == 0 and q.recompute_ms == 0 and q.pages_up > 0
    assert "beats recomputing" in q.reason
    # and past the host budget it drops only what the budget forces
    r = plan(w, w.total_bytes / 3, w.total_bytes / 3, fast_link)
    assert r.phase == 3 and r.host_bytes == pytest.approx(w.total_bytes / 3)
    assert "exceeds GPU + host budgets" in r.reason
    # both choices predict the cheaper of the two for their machine
    assert p.step_ms < plan(w, w.total_bytes / 3, w.total_bytes, slow_link, can_drop=False).step_ms
    assert q.step_ms < plan(w, w.total_bytes / 3, 0, fast_link).step_ms


@pytest.mark.parametrize("rec_ms", [1e-4, 1e-3, 1e-2, 1e-1])
def test_the_drop_point_moves_with_the_recompute_cost(rec_ms):
    # the link fixed: recompute cheaper than a fetch -> drop; dearer -> keep on the host
    w = mha()
    costs = MachineCosts(h2d_gbps=20.0, recompute_page_ms=rec_ms)
    p = plan(w, w.total_bytes / 3, w.total_bytes, costs)
    fetch = costs.fetch_ms_per_page(w)
    assert p.phase == (3 if rec_ms < fetch else 2)
    assert p.fetch_page_ms == pytest.approx(fetch) and p.recompute_page_ms == rec_ms


def test_an_overlap_that_hides_the_copies_keeps_pages_on_the_host():
    w = mha()
    costs = MachineCosts(h2d_gbps=1.0, recompute_page_ms=1e-4)
    assert plan(w, w.total_bytes / 3, w.total_bytes, costs).phase == 3
    assert plan(w, w.total_bytes / 3, w.total_bytes, costs, overlap_ms=1e6).phase == 2


def test_modelled_recompute_moves_the_hidden_states_and_counts_the_products():
    # without a measurement, GQA (hidden bigger than K+V) never recomputes by choice: its hidden
    # states cost more link time than the page they replace
    w = llama(churn=0.5)
    c = MachineCosts()
    assert not c.recompute_measured
    assert c.recompute_ms_per_page(w) > c.fetch_ms_per_page(w)
    assert plan(w, w.total_bytes / 2, w.total_bytes, c).phase == 2
    assert "modelled, not measured" in plan(w, w.total_bytes / 2, w.total_bytes, c).report()


def test_no_recompute_source_refuses_past_the_host_budget():
    w = mha()
    with pytest.raises(ValueError, match="nothing can be dropped"):
        plan(w, w.total_bytes / 3, w.total_bytes / 4, can_drop=False)
    with pytest.raises(ValueError):
        MachineCosts(recompute_page_ms=0.0)


def test_fit_recompute_recovers_a_linear_cost():
    import time
    import torch
    from s2dsl.runtime.tiering import fit_recompute, with_recompute

    def slow(slots, kv_heads, blocks):  # 3 ms a call + 2 ms a page
        time.sleep(3e-3 + 2e-3 * slots.numel())

    m = 6
    fit = fit_recompute(slow, torch.zeros(m, dtype=torch.long), torch.zeros(m, dtype=torch.long),
                        torch.arange(m), reps=3)
    assert fit.recompute_page_ms == pytest.approx(2.0, rel=0.3)
    assert fit.recompute_fixed_ms == pytest.approx(3.0, abs=1.5)
    costs = with_recompute(MachineCosts(h2d_gbps=55.0), fit)
    assert costs.h2d_gbps == 55.0 and costs.recompute_measured
    with pytest.raises(ValueError, match="m >= 2"):
        fit_recompute(slow, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.arange(1))
