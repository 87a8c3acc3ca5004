"""The analyzer's proofs and closed forms, held against brute force on block masks.

The analyzer never looks at a mask; these tests do, on random small patterns, up to a
length past which the pattern is periodic (Wmax + Smax + 2*L + a few blocks: beyond the
windows and sinks only residues mod L matter), so agreement there is agreement everywhere.
"""
from __future__ import annotations

import json
import math
import re
import time
from fractions import Fraction

import pytest
import sympy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import s2dsl
from s2dsl.analysis import I, N, PatternReport, _head_forms, analyze, evaluate
from s2dsl.pattern import HeadSpec, Pattern, TopKSpec, combine_components

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ random patterns
@st.composite
def head_specs(draw):
    if draw(st.integers(0, 9)) == 0:
        return HeadSpec(dense=True)
    window = draw(st.one_of(st.just(0), st.integers(0, 5)))  # window-less heads are the risky ones
    sink = draw(st.one_of(st.just(0), st.integers(0, 3)))
    residues = []
    for _ in range(draw(st.integers(0, 2))):
        m = draw(st.integers(1, 6))
        residues.append((m, draw(st.integers(0, m - 1))))
    topk = (TopKSpec(draw(st.integers(1, 3))),) if draw(st.integers(0, 7)) == 0 else ()
    if draw(st.booleans()):  # the resolver's canonical form
        parts = [("window", window), ("sink", sink)] + [("residue", m, r) for m, r in residues]
        parts += [("topk", t.k, t.recent) for t in topk]
        return combine_components(parts)
    return HeadSpec(window, sink, tuple(residues), False, topk)  # raw, possibly redundant


@st.composite
def patterns(draw):
    heads = draw(st.integers(1, 6))
    kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    specs = tuple(draw(head_specs()) for _ in range(heads))
    return Pattern("rand", 16, heads, kv, draw(st.booleans()), specs)


# ---------------------------------------------------------------------- brute force
def periodic_bound(pattern: Pattern, heads=None) -> int:
    """Blocks after which nothing new can happen: windows, sinks, then two periods."""
    specs = [pattern.head_specs[h] for h in (range(pattern.heads) if heads is None else heads)]
    period = math.lcm(*(s.period for s in specs))
    return max(s.window for s in specs) + max(s.sink for s in specs) + 2 * period + 3


def lower(pattern: Pattern, n: int):
    """The pairs coverage is about: j <= i for causal, all for bidirectional."""
    import torch
    full = torch.ones(n, n, dtype=torch.bool)
    return full.tril() if pattern.causal else full


def holes(pattern: Pattern, heads, n: int):
    mask = pattern.block_mask(n)[list(heads)].any(0)  # block_mask ignores topk: static part
    return lower(pattern, n) & ~mask


def grid(pattern: Pattern, n: int) -> int:
    return n * (n + 1) // 2 if pattern.causal else n * n


def needed_kv_blocks(pattern: Pattern, heads, n: int) -> int:
    """#kv blocks j < n read by some query block i >= n-1 (the newest block and later)."""
    later = periodic_bound(pattern, heads) + 2
    mask = pattern.block_mask(later, n, past_blocks=n - 1)[list(heads)]
    return int(mask.any(0).any(0).sum())


def check_coverage_claim(pattern, heads, covered, ce):
    n = periodic_bound(pattern, heads)
    found = holes(pattern, heads, n)
    assert covered == (not bool(found.any())), (covered, found.nonzero()[:3])
    if covered:
        assert ce is None
        return
    assert ce is not None
    assert 0 <= ce.j and 0 <= ce.i and (ce.i >= ce.j or not pattern.causal)
    size = max(ce.i, ce.j) + 1
    assert holes(pattern, heads, size)[ce.i, ce.j], "claimed counterexample is covered"
    assert ce.j % ce.modulus in ce.missing_residues
    # every claimed-missing residue really has holes, every other residue has none far out
    smax = max(pattern.head_specs[h].sink for h in heads)
    wmax = max(pattern.head_specs[h].window for h in heads)
    for r in range(ce.modulus):
        j = smax + (r - smax) % ce.modulus
        i = j + wmax
        assert bool(holes(pattern, heads, i + 1)[i, j]) == (r in ce.missing_residues), r


# -------------------------------------------------------------------------- properties
@SETTINGS
@given(patterns())
def test_coverage_and_groups_match_brute_force(pattern):
    report = analyze(pattern)
    check_coverage_claim(pattern, range(pattern.heads), report.covered, report.counterexample)
    assert report.reason.startswith("covered" if report.covered else "not covered")
    assert len(report.groups) == pattern.kv_heads
    for g in report.groups:
        assert g.heads == tuple(h for h in range(pattern.heads) if pattern.kv_head_of(h) == g.kv_head)
        check_coverage_claim(pattern, g.heads, g.covered, g.counterexample)


def described_rows(desc: str, n: int):
    if desc.startswith("every query block ("):
        return list(range(n))
    if desc.startswith("query block 0 "):
        return [0]
    m = re.match(r"query blocks 0\.\.(\d+) ", desc)
    assert m, desc
    return list(range(int(m.group(1)) + 1))


@SETTINGS
@given(patterns())
def test_empty_rows_match_brute_force(pattern):
    report = analyze(pattern)
    listed = dict(report.empty_rows)
    assert report.rows_nonempty == (not listed)
    bound = periodic_bound(pattern)
    # a bidirectional row sees the whole sequence, so its emptiness depends on the length
    lengths = [bound] if pattern.causal else range(1, bound + 1)
    empty = {h: set() for h in range(pattern.heads)}
    for n in lengths:
        rows = ~pattern.block_mask(n).any(-1)  # [heads, n]
        for h, i in rows.nonzero().tolist():
            empty[h].add(i)
    for h, spec in enumerate(pattern.head_specs):
        if spec.topk:  # top-k picks >= 1 of the blocks j <= i, which always exist
            assert h not in listed
        elif not empty[h]:
            assert h not in listed
        else:
            assert h in listed
            if pattern.causal:
                assert described_rows(listed[h], bound) == sorted(empty[h]), (listed[h], empty[h])


@SETTINGS
@given(patterns())
def test_kv_efficiency_matches_brute_force(pattern):
    report = analyze(pattern)
    n = periodic_bound(pattern)
    mask = pattern.block_mask(n)
    for h, spec in enumerate(pattern.head_specs):
        claim = report.heads[h].kv_efficient
        if spec.topk:
            assert claim is False
            continue
        ok = True
        for j in range(n):
            rows = [bool(mask[h, i, j]) for i in range(j, n)]  # queries i >= j
            k = rows.index(False) if False in rows else len(rows)
            ok &= not any(rows[k:])  # kept rows form an interval starting at i = j
        assert claim == ok
    assert report.kv_efficient == all(c.kv_efficient for c in report.heads)


@SETTINGS
@given(patterns())
def test_row_and_total_blocks_match_brute_force(pattern):
    report = analyze(pattern)
    bound = periodic_bound(pattern)
    sizes = sorted({1, 2, 3, bound // 2 + 1, bound})
    for n in sizes:
        mask = pattern.block_mask(n)
        for h, cost in enumerate(report.heads):
            assert evaluate(cost.total_blocks, N=n) == int(mask[h].sum()), (h, n, cost.total_blocks)
            assert evaluate(cost.flops, N=n) == 4 * 16 * 16 * 128 * int(mask[h].sum())
            for i in range(n):
                got = evaluate(cost.row_blocks, i=i, N=n)
                assert got == int(mask[h, i].sum()), (h, i, n, cost.row_blocks)
    for n in range(1, bound + 1):  # every length, totals only
        mask = pattern.block_mask(n)
        for h, cost in enumerate(report.heads):
            assert evaluate(cost.total_blocks, N=n) == int(mask[h].sum())


@SETTINGS
@given(patterns())
def test_kv_bytes_match_brute_force(pattern):
    report = analyze(pattern, head_dim=64, dtype_bytes=1)
    per_block = 2 * 16 * 64 * 1
    bound = periodic_bound(pattern)
    for n in sorted({1, 2, bound // 3 + 1, bound}):
        for h, spec in enumerate(pattern.head_specs):
            want = n if spec.topk else needed_kv_blocks(pattern, [h], n)
            assert evaluate(report.heads[h].kv_bytes, N=n) == per_block * want, (h, n)
        for g in report.groups:
            dynamic = any(pattern.head_specs[h].topk for h in g.heads)
            want = n if dynamic else needed_kv_blocks(pattern, g.heads, n)
            assert evaluate(g.kv_bytes, N=n) == per_block * want, (g, n)


@SETTINGS
@given(patterns(), st.lists(st.integers(1, 16 * 150), min_size=1, max_size=3))
def test_density_matches_brute_force(pattern, seq_lens):
    report = analyze(pattern)
    for seq_len in seq_lens:
        n = -(-seq_len // pattern.block)
        mask = pattern.block_mask(n)
        size = grid(pattern, n)
        got = report.density(seq_len, exact=True)
        assert got["union"] == sympy.Rational(int(mask.any(0).sum()), size)
        assert got["per_head"] == [sympy.Rational(int(mask[h].sum()), size) for h in range(pattern.heads)]
        approx = report.density(seq_len)
        assert approx["union"] == pytest.approx(float(got["union"]))
    out = report.to_json(seq_lens=tuple(seq_lens))
    json.dumps(out)
    assert set(out["density"]) == {str(s) for s in seq_lens}


def expected_limit(spec: HeadSpec) -> Fraction:
    if spec.dense:
        return Fraction(1)
    return Fraction(len(spec.residue_set), spec.period) if spec.residues else Fraction(0)


@SETTINGS
@given(patterns())
def test_density_limit(pattern):
    report = analyze(pattern)
    big = 10 ** 6
    for h, cost in enumerate(report.heads):
        lim = cost.density_limit
        assert isinstance(lim, sympy.Rational)
        assert Fraction(int(lim.p), int(lim.q)) == expected_limit(pattern.head_specs[h].with_(topk=()))
        ratio = Fraction(evaluate(cost.total_blocks, N=big), grid(pattern, big))
        assert abs(float(ratio) - float(lim)) < 1e-3
    ratio = Fraction(evaluate(report.union_total_blocks, N=big), grid(pattern, big))
    assert abs(float(ratio) - float(report.union_density_limit)) < 1e-3
    if report.covered:
        assert report.union_density_limit == 1


def test_evaluate_agrees_with_subs():
    p = Pattern("x", 16, 2, 1, False, (HeadSpec(3, 2, ((4, 1), (6, 5))), HeadSpec(0, 0, ((5, 2),))))
    report = analyze(p)
    for cost in report.heads:
        for n in (1, 7, 40):
            assert evaluate(cost.total_blocks, N=n) == cost.total_blocks.subs(N, n)
            for i in (0, n // 2, n - 1):
                assert evaluate(cost.row_blocks, i=i, N=n) == cost.row_blocks.subs({I: i, N: n})


# -------------------------------------------------------------------- concrete cases
def test_phi3_small_is_covered():
    p = s2dsl.local_stride(block=64, local_blocks=16, vert_stride=8, heads=32, kv_heads=8)
    report = analyze(p)
    assert report.covered and report.counterexample is None
    assert report.rows_nonempty and report.kv_efficient and not report.dynamic_heads
    # each kv head's 4 q heads share one residue of 8: a group alone covers 1/8 of the past
    assert all(not g.covered for g in report.groups)
    assert report.groups[0].counterexample.missing_residues == (1, 2, 3, 4, 5, 6, 7)
    assert all(h.density_limit == sympy.Rational(1, 8) for h in report.heads)
    assert report.union_density_limit == 1


def test_shared_offset_is_not_covered():
    text = """pattern same { block = 64 heads = 8 causal
                 heads 0..7 { window 4 stride 8 offset 0 } }"""
    p = s2dsl.parse(text)["same"]
    report = analyze(p)
    assert not report.covered
    ce = report.counterexample
    assert (ce.i, ce.j, ce.modulus, ce.missing_residues) == (5, 1, 8, (1, 2, 3, 4, 5, 6, 7))
    assert not any(p.keeps(h, ce.i, ce.j) for h in range(p.heads))
    assert "query block 5 never sees kv block 1" in report.reason
    js = report.to_json()
    assert js["counterexample"] == {"i": 5, "j": 1, "missing_residues": [1, 2, 3, 4, 5, 6, 7], "modulus": 8}
    assert js["covered"] is False


def test_local16_stride32_is_covered_with_limit_one_32nd():
    p = s2dsl.local_stride(block=64, local_blocks=16, vert_stride=32, heads=32)
    report = analyze(p)
    assert report.covered and report.rows_nonempty and report.kv_efficient
    assert all(h.density_limit == sympy.Rational(1, 32) for h in report.heads)
    d = report.density(131072)
    n = 131072 // 64
    assert d["union"] == 1.0
    # head 0 keeps j % 32 == 0 plus a 16-block window: count it by hand
    special = [j for j in range(n) if j % 32 == 0]
    by_hand = sum(min(16, n - j) for j in range(n)) + sum(max(0, n - 16 - j) for j in special)
    assert d["per_head"][0] == pytest.approx(by_hand / (n * (n + 1) / 2))
    # kv cache after 2048 blocks: 16 window blocks + every 32nd block below them
    assert evaluate(report.heads[0].kv_bytes, N=n) == 2 * 64 * 128 * 2 * (16 + len([j for j in special if j < n - 16]))


def test_analyze_is_fast_for_32_heads():
    p = s2dsl.local_stride(block=64, local_blocks=16, vert_stride=32, heads=32, head_sliding_offset=5)
    _head_forms.cache_clear()
    start = time.perf_counter()
    analyze(p)
    assert time.perf_counter() - start < 2.0  # target 0.5 s; loose for loaded CI machines


def test_stride_only_head_has_empty_leading_rows():
    text = """pattern s { block = 16 heads = 2 causal
                heads 0..1 { stride 4 offset h + 1 } }"""
    p = s2dsl.parse(text)["s"]  # head 0 keeps j % 4 == 3, head 1 keeps j % 4 == 2
    report = analyze(p)
    assert not report.rows_nonempty
    assert dict(report.empty_rows)[0].startswith("query blocks 0..2 (rows before the first kept residue")
    assert dict(report.empty_rows)[1].startswith("query blocks 0..1 ")
    assert not report.covered and report.counterexample.missing_residues == (0, 1)


def test_sink_only_dense_and_dynamic_heads():
    p = Pattern("mix", 16, 3, 3, True, (HeadSpec(sink=2), HeadSpec(dense=True),
                                           HeadSpec(window=1, topk=(TopKSpec(4),))))
    report = analyze(p)
    assert report.covered and "head 1 is dense" in report.reason
    assert report.dynamic_heads == (2,)
    assert not report.kv_efficient and report.heads[0].kv_efficient and report.heads[1].kv_efficient
    assert report.heads[0].density_limit == 0 and report.heads[1].density_limit == 1
    assert evaluate(report.heads[2].kv_bytes, N=10) == 2 * 16 * 128 * 2 * 10
    groups = {g.kv_head: g.covered for g in report.groups}
    assert groups == {0: False, 1: True, 2: False}


def test_dynamic_only_head_covers_nothing_statically():
    p = Pattern("dyn", 16, 1, 1, True, (HeadSpec(topk=(TopKSpec(8),)),))
    report = analyze(p)
    assert not report.covered and report.rows_nonempty and not report.kv_efficient
    assert report.counterexample.missing_residues == (0,) and report.counterexample.modulus == 1
    assert evaluate(report.heads[0].total_blocks, N=50) == 0


def test_bidirectional_counterexample_is_above_the_diagonal():
    p = Pattern("bi", 16, 2, 1, False, (HeadSpec(window=3, residues=((3, 0),)),
                                         HeadSpec(window=3, residues=((3, 1),))))
    report = analyze(p)
    assert not report.covered
    ce = report.counterexample
    assert (ce.i, ce.j, ce.missing_residues) == (0, 2, (2,))
    assert not any(p.keeps(h, ce.i, ce.j) for h in range(2))
    assert report.heads[0].density_limit == sympy.Rational(1, 3)


def test_to_json_shape():
    p = s2dsl.local_stride(block=64, local_blocks=16, vert_stride=8, heads=8)
    out = analyze(p).to_json()
    json.dumps(out)
    for key in ("pattern", "covered", "counterexample", "rows_nonempty", "kv_efficient", "density",
                "reason", "empty_rows", "density_per_head", "groups", "heads"):
        assert key in out
    assert set(out["density"]) == {"8192", "32768", "131072"}
    assert out["counterexample"] is None and out["covered"] is True
    assert isinstance(analyze(p), PatternReport)


def test_limit_agrees_with_sympy_limit():
    from s2dsl.analysis import _Counts
    for causal in (True, False):
        for spec in (HeadSpec(16, 0, ((32, 5),)), HeadSpec(3, 2, ((4, 1), (6, 5))), HeadSpec(sink=2),
                     HeadSpec(0, 1, ((5, 0), (5, 3)))):
            grid_n = N * (N + 1) / 2 if causal else N ** 2
            total = _Counts(spec, big=True).total(causal)
            assert _head_forms(spec, causal)[3] == sympy.limit(total / grid_n, N, sympy.oo)


def test_huge_common_period_is_decided_without_enumerating():
    # lcm 5*7*9*11*13*16*17 ~ 1.2e7: coverage is decided from a short sieve, costs by
    # inclusion-exclusion (the classes share residue 0: 127 terms), never by listing a period
    strides = (5, 7, 9, 11, 13, 16, 17)
    p = Pattern("huge", 16, len(strides), 1, True, tuple(HeadSpec(4, 0, ((s, 0),)) for s in strides))
    start = time.perf_counter()
    report = analyze(p)
    assert time.perf_counter() - start < 20
    assert not report.covered and (report.counterexample.i, report.counterexample.j) == (5, 1)
    for n in (1, 17, 60, 200):
        assert evaluate(report.union_total_blocks, N=n) == int(p.block_mask(n).any(0).sum())


def test_too_many_terms_is_refused_quickly_with_the_verdict():
    from s2dsl.analysis import AnalysisLimit
    from s2dsl.errors import S2Error
    strides = (5, 7, 9, 11, 13, 16, 17, 19, 23)  # 511 inclusion-exclusion terms
    p = Pattern("huge", 16, len(strides), 1, True, tuple(HeadSpec(4, 0, ((s, 0),)) for s in strides))
    start = time.perf_counter()
    with pytest.raises(AnalysisLimit, match="not covered.*query block 5 never sees kv block 1") as info:
        analyze(p)
    assert isinstance(info.value, S2Error) and time.perf_counter() - start < 10


@pytest.mark.parametrize("text, covered", [
    ("heads * { stride 1000 stride 1001 }", False),
    ("heads * { window 1 stride h + 2 }", False),  # 32 heads: lcm of 2..33 is 1.4e14
    ("heads 0..0 { stride 2 } heads 1..1 { stride 3 } heads 2..2 { stride 4 offset -1 } "
     "heads 3..3 { stride 6 offset -5 } heads 4..31 { stride 12 offset -7 }", True),  # a covering system
])
def test_large_lcm_decided_or_refused_quickly(text, covered):
    """Issue 16 item 5: never hang; decide, or refuse with an S2Error that still gives the verdict."""
    from s2dsl.analysis import AnalysisLimit
    p = s2dsl.parse(f"pattern p {{ block = 16 heads = 32 {text} }}")["p"]
    start = time.perf_counter()
    try:
        verdict = analyze(p).covered
    except AnalysisLimit as exc:
        verdict = "not covered" not in str(exc)
    assert verdict == covered
    assert time.perf_counter() - start < 20
