"""Dynamic top-k scored by a q.k upper bound at decode ('topk K by bound', Quest's estimator):
the language, the per-page key bounds the cache keeps at each write, and decode steps through
the generated kernels against the reference given the selection the bound picks."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import s2dsl
from s2dsl.codegen.lower import UnsupportedPattern, lower
from s2dsl.errors import S2Error

from kernel_strategies import random_inputs
from serving_helpers import replay_selection

BOUND = """
pattern p {
    block = 16  heads = 4  kv_heads = 2
    heads * { window 1  sink 1  topk 2 by bound }
}
"""
# kv head 0 scores by bound (its q heads take 1 and 2 pages), kv head 1 by mass over 3 steps
MIXED = """
pattern p {
    block = 16  heads = 4  kv_heads = 2
    heads 0..1 { window 1  topk h + 1 by bound }
    heads 2..3 { window 2  topk 2 recent 3 }
}
"""


def test_by_bound_parses_prints_and_round_trips():
    p = s2dsl.parse(BOUND)["p"]
    assert p.head_specs[0].topk[0].by == "bound"
    assert "topk 2 by bound" in p.to_source()
    assert s2dsl.parse(p.to_source())["p"] == p
    assert s2dsl.Pattern.deserialize(p.serialize()) == p
    mass = s2dsl.parse(BOUND.replace(" by bound", ""))["p"]
    assert mass.fingerprint() != p.fingerprint()
    assert s2dsl.parse(BOUND.replace(" by bound", " by mass"))["p"] == mass  # 'by mass' is the default
    assert [x.bound for x in lower(s2dsl.parse(MIXED)["p"]).params] == [True, True, False, False]


def test_by_bound_with_recent_or_mixed_in_a_kv_head_is_refused():
    with pytest.raises(S2Error, match="recent"):
        s2dsl.parse(BOUND.replace("by bound", "by bound recent 4"))
    with pytest.raises(S2Error):
        s2dsl.parse(BOUND.replace("by bound", "by keys"))
    mixed = s2dsl.parse("pattern p { block = 16 heads = 4 kv_heads = 2 heads 0..2 { window 1 topk 2 by bound } "
                        "heads 3..3 { window 1 topk 2 } }")["p"]
    with pytest.raises(UnsupportedPattern, match="mix"):
        lower(mixed)


def _cache(pattern, pages=64, **kw):
    from s2dsl.runtime.kv_cache import PagedKVCache
    with pytest.warns(UserWarning, match="KV-efficient"):
        return PagedKVCache(pattern, num_pages=pages, head_dim=16, dtype=torch.float32, max_seqs=2, **kw)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.integers(1, 40), chunks=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_key_bounds_are_each_pages_channel_min_and_max(prompt, chunks):
    """After a prompt and more chunks (appended, pages reused after a sequence leaves), each held
    page's bounds are the min / max of the keys it holds, channel by channel."""
    pattern = s2dsl.parse(BOUND)["p"]
    cache = _cache(pattern, pages=32)
    other = cache.add_sequence()  # its pages go back to the pool: the next sequence reuses them
    junk = torch.randn(1, 2, 40, 16) * 5
    cache.append([other], junk, junk)
    cache.remove_sequence(other)
    s = cache.add_sequence()
    total = prompt + sum(chunks)
    k = torch.randn(1, 2, total, 16, generator=torch.Generator().manual_seed(prompt + total))
    pos = 0
    for n in [prompt] + chunks:
        cache.append([s], k[:, :, pos:pos + n], k[:, :, pos:pos + n])
        pos += n
    lo, hi = cache.key_bounds
    for g, pages in enumerate(cache.pages_of(s)):
        for j, page in enumerate(pages):
            if page < 0:
                continue
            keys = k[0, g, j * 16:min(total, (j + 1) * 16)]
            torch.testing.assert_close(lo[page], keys.amin(0))
            torch.testing.assert_close(hi[page], keys.amax(0))


def _bound_pick(pattern, q, k, i_last, g, kk):
    """Reference: kv head g's pages outside its q heads' static sets at query block i_last, ranked by
    the largest sum_c max(q_c lo_c, q_c hi_c) over its q heads and the step's queries; the top kk."""
    B, G = pattern.block, pattern.group_size
    members = range(g * G, (g + 1) * G)
    cands = [j for j in range(i_last + 1) if not any(pattern.keeps(h, i_last, j) for h in members)]
    scores = {}
    for j in cands:
        keys = k[g, j * B:(j + 1) * B]
        lo, hi = keys.amin(0), keys.amax(0)
        qs = q[list(members)].reshape(-1, q.shape[-1])
        scores[j] = torch.maximum(qs * lo, qs * hi).sum(-1).max().item()
    return sorted(cands, key=lambda j: -scores[j])[:kk], scores




@pytest.mark.parametrize("name", ["bound", "mixed"])
def test_decode_selects_by_the_bound_of_the_steps_own_queries(name):
    """Prefill, then decode steps and a 3-token chunk through cached_attention: the pages a 'by bound'
    kv head reads are the top K of the bound for that step's queries (the first step included: no
    history needed), the outputs equal the reference given that selection, and a 'by mass' kv head
    beside it keeps ALISA's selection (by the previous steps)."""
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.topk_state import state_for

    pattern = s2dsl.parse(BOUND if name == "bound" else MIXED)["p"]
    cache = _cache(pattern)
    total, prompt = 120, 70
    q, k, v = random_inputs(2, pattern.heads, pattern.kv_heads, total, total, 16, torch.float32, seed=5)
    # make the pages differ in what they answer: a few keys far out along random directions
    k = k.clone()
    k[:, :, 3::9] *= 4
    ids = [cache.add_sequence(), cache.add_sequence()]
    cached_attention(cache, ids, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    state = state_for(cache)
    pos = prompt
    for n in [1] * 5 + [3] + [1] * 4:
        before_mass = state.selection[[cache.slot(s) for s in ids]].clone()
        out = cached_attention(cache, ids, q[:, :, pos:pos + n], k[:, :, pos:pos + n], v[:, :, pos:pos + n],
                               n_splits=2 if n == 3 else 1)
        pos += n
        used = state.selection[[cache.slot(s) for s in ids]].clone()
        for b in range(2):
            i_last = (pos - 1) // pattern.block
            for g in range(pattern.kv_heads):
                if not state.bound_groups[g]:
                    assert used[b, g].tolist() != [-1] * state.k_max or i_last < 3
                    used[b, g] = before_mass[b, g]  # the step read the selection made after the last one
                    continue
                kk = max(lower(pattern).params[h].topk for h in range(g * 2, g * 2 + 2))
                want, scores = _bound_pick(pattern, q[b, :, pos - n:pos], k[b, :, :pos], i_last, g, kk)
                got = [j for j in used[b, g].tolist() if j >= 0]
                assert len(got) == len(want)
                # the same pages, up to ties in the bound
                assert sorted(scores[j] for j in got) == pytest.approx(sorted(scores[j] for j in want), rel=1e-5)
            first = (pos - n) // pattern.block
            replay = replay_selection(pattern, used[b], (pos - 1) // pattern.block - first + 1)
            ref = s2dsl.reference_attention(q[b:b + 1, :, pos - n:pos], k[b:b + 1, :, :pos], v[b:b + 1, :, :pos],
                                            pattern, selection=replay)
            torch.testing.assert_close(out[b:b + 1], ref, atol=2e-5, rtol=2e-5)


def test_a_host_tier_with_by_bound_heads_is_refused():
    from s2dsl.runtime.topk_state import TopKDecodeState
    pattern = s2dsl.parse(BOUND)["p"]
    cache = _cache(pattern)

    class Tiered:  # a page table that says it has a tier (the rest is the cache's own)
        def __init__(self, table):
            self.tier, self._t = object(), table

        def __getattr__(self, name):
            return getattr(self._t, name)
    cache.table = Tiered(cache.table)
    with pytest.raises(ValueError, match="host tier"):
        TopKDecodeState(cache)


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="captures interpreted launches")
def test_bound_kernel_compiles_for_sm90(monkeypatch):
    """The bound kernel a GPU would launch (fp32 and bf16 queries, GQA 2, head dim 16 and 128)
    compiles for sm_90 with Triton's bundled ptxas (the interpreter accepts code the GPU compiler
    refuses; see test_sm90_compile)."""
    import json
    import warnings

    from test_sm90_compile import _Capture, _compile_sm90

    from s2dsl.runtime import topk_state
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.kv_cache import PagedKVCache

    jobs = []
    init = topk_state.TopKDecodeState.__init__

    def capturing_init(self, cache):
        init(self, cache)
        space = self._bound_scores.__globals__  # the generated module's namespace
        if not isinstance(space["bound_kernel"], _Capture):
            space["bound_kernel"] = _Capture(space["bound_kernel"], jobs, run=True)

    monkeypatch.setattr(topk_state.TopKDecodeState, "__init__", capturing_init)
    torch.manual_seed(0)
    for d in (16, 128):
        pattern = s2dsl.parse(BOUND)["p"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # topk heads keep every page
            cache = PagedKVCache(pattern, num_pages=32, head_dim=d, dtype=torch.float32)
        ids = [cache.add_sequence()]
        q, k, v = (torch.randn(1, h, 60, d) for h in (4, 2, 2))
        cached_attention(cache, ids, q[:, :, :57], k[:, :, :57], v[:, :, :57])
        cached_attention(cache, ids, q[:, :, 57:], k[:, :, 57:], v[:, :, 57:])
    assert jobs
    unique = list({json.dumps(j["consts"], sort_keys=True): j for j in jobs}.values())
    unique += [dict(j, sig=dict(j["sig"], Q="*bf16")) for j in unique]  # the GPU's queries are bf16
    for shared in _compile_sm90(unique):
        assert shared <= 232448


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lq=st.integers(1, 70), extra=st.integers(0, 40), seed=st.integers(0, 99))
def test_bound_prefill_estimator_picks_the_largest_bounds(lq, extra, seed):
    """select_blocks(estimator="bound"): per (head, query block) the K selectable kv blocks with the
    largest max over the block's rows of sum_c max(q_c lo_c, q_c hi_c), brute force; with GQA and a
    past (queries the last lq of lq + extra keys, not block-aligned)."""
    from s2dsl.runtime.topk import select_blocks

    pattern = s2dsl.parse("pattern p { block = 16 heads = 4 kv_heads = 2 heads 0..1 { window 1 sink 1 topk 2 } "
                          "heads 2..3 { window 2 topk h - 1 } }")["p"]
    lk = lq + extra
    q, k, _ = random_inputs(1, 4, 2, lq, lk, 16, torch.float32, seed=seed)
    sel = select_blocks(q, k, pattern, estimator="bound")
    past, B = lk - lq, 16
    first = past // B
    for h in range(4):
        kk = lower(pattern).params[h].topk
        for r in range(sel.shape[2]):
            i = first + r
            rows = [t - past for t in range(max(i * B, past), min((i + 1) * B, lk))]
            cands = [j for j in range(i + 1) if not pattern.keeps(h, i, j)]
            score = {}
            for j in cands:
                keys = k[0, h // 2, j * B:min((j + 1) * B, lk)]
                lo, hi = keys.amin(0), keys.amax(0)
                qs = q[0, h, rows]
                score[j] = torch.maximum(qs * lo, qs * hi).sum(-1).max().item()
            got = [j for j in sel[0, h, r].tolist() if j >= 0]
            assert len(got) == min(kk, len(cands)) and set(got) <= set(cands)
            want = sorted(score.values(), reverse=True)[:len(got)]
            assert sorted((score[j] for j in got), reverse=True) == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_decode_candidate_study_is_bounded_by_its_oracles():
    """examples/topk_quality.py's decode-time candidates: Quest's bound is >= every q.k of its page;
    with pages of one token the bound is q.k itself, so quest picks what the oracle picks; at any
    page, no scorer recovers more than the oracle (the most mass a window + K pages can hold); a
    budget of everything keeps everything."""
    import sys
    from conftest import EXAMPLES
    sys.path.insert(0, str(EXAMPLES))
    import topk_quality as tq

    g = torch.Generator().manual_seed(1)
    b, H, T, d, tail = 2, 3, 96, 16, 6
    q, k, v = (torch.randn(b, H, T, d, generator=g) * s for s in (2.0, 1.0, 1.0))
    ub = tq.quest_bounds(q[:, :, -tail:], k, 16)                                      # (b, H, tail, 6)
    dots = (q[:, :, -tail:] @ k.transpose(-1, -2)).view(b, H, tail, 6, 16).amax(-1)
    assert (ub >= dots - 1e-4).all()
    torch.testing.assert_close(tq.quest_bounds(q, k, 1), q @ k.transpose(-1, -2), atol=1e-4, rtol=1e-4)
    rec = {}
    for scorer in (None, "alisa", "quest", "oracle"):
        for page in (16, 4, 1):
            calls = []
            out = tq.candidate_attention(scorer, page, 16, 32, tail, calls, [0, 2, 4])(q, k, v)
            assert out.shape == q.shape and torch.isfinite(out).all()
            rec[scorer, page] = torch.tensor(calls[0][0])
            assert ((rec[scorer, page] >= 0) & (rec[scorer, page] <= 1 + 1e-5)).all()
    for page in (16, 4, 1):
        for scorer in ("alisa", "quest"):
            assert (rec[scorer, page] <= rec["oracle", page] + 1e-5).all(), (scorer, page)
    torch.testing.assert_close(rec["quest", 1], rec["oracle", 1])
    calls = []
    tq.candidate_attention("quest", 16, 16, T, tail, calls)(q, k, v)
    torch.testing.assert_close(torch.tensor(calls[0][0]), torch.ones(H))


def test_analysis_counts_the_key_bounds_in_the_decode_cache():
    """A 'by bound' kv head holds, beside every page, its keys' float32 min / max (2 x head_dim x 4
    bytes per block); the CLI's component list says 'by bound'."""
    import sympy
    from s2dsl.analysis import N

    mass = s2dsl.parse(BOUND.replace(" by bound", ""))["p"]
    bound = s2dsl.parse(BOUND)["p"]
    for d in (64, 128):
        a, b = s2dsl.analyze(mass, head_dim=d), s2dsl.analyze(bound, head_dim=d)
        assert sympy.simplify(b.groups[0].kv_bytes - a.groups[0].kv_bytes - 2 * d * 4 * N) == 0
        assert sympy.simplify(b.heads[0].kv_bytes - a.heads[0].kv_bytes - 2 * d * 4 * N) == 0
    from s2dsl.cli import main
    import io
    import contextlib
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".s2", delete=False) as f:
        f.write(BOUND)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["check", f.name])
    assert "topk 2 by bound" in buf.getvalue()


def test_int8_pages_keep_the_bounds_of_the_keys_as_given():
    """An INT8 cache keeps its key bounds from the 16/32-bit keys (before rounding): the same bounds,
    so the same pages, as a float cache fed the same tokens."""
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.topk_state import state_for

    pattern = s2dsl.parse(BOUND)["p"]
    caches = [_cache(pattern), _cache(pattern, kv_dtype=torch.int8)]
    q, k, v = random_inputs(1, 4, 2, 90, 90, 16, torch.float32, seed=9)
    ids = [[c.add_sequence()] for c in caches]
    for c, i in zip(caches, ids):
        cached_attention(c, i, q[:, :, :80], k[:, :, :80], v[:, :, :80])
    for t in range(80, 84):
        for c, i in zip(caches, ids):
            cached_attention(c, i, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        torch.testing.assert_close(caches[1].key_bounds, caches[0].key_bounds)
        sels = [state_for(c).selection[c.slot(i[0])] for c, i in zip(caches, ids)]
        assert torch.equal(sels[0], sels[1])
