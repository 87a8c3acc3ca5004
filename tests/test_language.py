"""Round-2 constructs: two-sided and token-granular windows, token sinks, relative strides,
global rows, prefix-LM.  Semantics held against a direct per-token reading of the contract,
the analyzer against brute force on masks."""
from __future__ import annotations

import math
import time

import pytest
import sympy
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import s2dsl
from s2dsl.analysis import analyze, evaluate
from s2dsl.errors import S2SemanticError
from s2dsl.pattern import HeadSpec, Pattern, combine_components

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BLOCK = 4  # small blocks: token edges fall inside them often


# ------------------------------------------------------------------ random patterns
@st.composite
def specs(draw, bidirectional: bool, block: int = BLOCK):
    if draw(st.integers(0, 12)) == 0:
        return HeadSpec(dense=True)
    parts = []
    if draw(st.booleans()):
        parts.append(("window", draw(st.integers(0, 3)), draw(st.integers(0, 2)) if bidirectional else 0))
    if draw(st.integers(0, 2)) == 0:
        parts.append(("window_tokens", draw(st.integers(1, 10)), draw(st.integers(0, 6)) if bidirectional else 0))
    if draw(st.integers(0, 3)) == 0:
        parts.append(("sink", draw(st.integers(1, 2))))
    if draw(st.integers(0, 3)) == 0:
        parts.append(("sink_tokens", draw(st.integers(1, 9))))
    for _ in range(draw(st.integers(0, 1))):
        m = draw(st.integers(2, 5))
        parts.append(("residue", m, draw(st.integers(0, m - 1))))
    for _ in range(draw(st.integers(0, 2))):
        parts.append(("relative", draw(st.integers(2, 5))))
    if draw(st.integers(0, 3)) == 0:
        parts.append(("global", draw(st.integers(1, 3))))
    return combine_components(parts, block)


@st.composite
def patterns(draw, block: int = BLOCK):
    mode = draw(st.sampled_from(["causal", "bidirectional", "prefix"]))
    heads = draw(st.integers(1, 4))
    kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    hs = tuple(draw(specs(mode != "causal", block)) for _ in range(heads))
    prefix = draw(st.integers(1, 20)) if mode == "prefix" else 0
    return Pattern("rand", block, heads, kv, mode != "bidirectional", hs, prefix=prefix)


def bound(p: Pattern) -> int:
    """Blocks past which the masks are periodic (windows, sinks, prefix, then two periods)."""
    periods = [s.period for s in p.head_specs] + [math.lcm(*s.relative) for s in p.head_specs if s.relative]
    reach = max(max(s.blocks_touched(BLOCK)) + s.global_rows for s in p.head_specs)
    return reach + -(-p.prefix // BLOCK) + 2 * math.lcm(*periods) + 4


def contract(p: Pattern, h: int, q: int, k: int) -> bool:
    """The semantics contract, read literally, one token pair at a time."""
    s = p.head_specs[h]
    if p.causal and k > q and not (q < p.prefix and k < p.prefix):
        return False
    if s.dense:
        return True
    b = p.block
    i, j = q // b, k // b
    d = i - j
    if -s.ahead <= d < s.window or j < s.sink or i < s.global_rows or any(j % m == r for m, r in s.residues):
        return True
    for S in s.relative:
        if d >= s.window and (d - s.window + 1) % S == 0:
            return True
        if -d > s.ahead and (-d - s.ahead) % S == 0:
            return True
    return -s.ahead_tokens <= q - k < s.window_tokens or k < s.sink_tokens


# -------------------------------------------------------------------------- semantics
@SETTINGS
@given(patterns(), st.integers(1, 30), st.integers(0, 12))
def test_token_mask_is_the_contract(p, q_len, past):
    kv_len = q_len + past
    mask = p.token_mask(q_len, kv_len)
    for h in range(p.heads):
        want = torch.tensor([[contract(p, h, past + a, k) for k in range(kv_len)] for a in range(q_len)])
        assert torch.equal(mask[h], want)
        assert all(p.keeps_token(h, past + a, k) == bool(want[a, k]) for a in range(q_len) for k in range(kv_len))


@SETTINGS
@given(patterns(), st.integers(1, 12))
def test_block_mask_is_the_blocks_the_tokens_touch(p, n):
    tokens = p.token_mask(n * BLOCK)
    touched = tokens.view(p.heads, n, BLOCK, n, BLOCK).any(4).any(2)
    assert torch.equal(p.block_mask(n), touched)
    assert all(p.keeps(h, i, j) == bool(touched[h, i, j]) for h in range(p.heads) for i in range(n) for j in range(n))


@SETTINGS
@given(patterns(block=16))
def test_serialize_and_print_round_trip(p):
    assume(HeadSpec() not in p.head_specs)  # a head keeping nothing has no .s2 text
    back = Pattern.deserialize(p.serialize())
    assert back == p and back.fingerprint() == p.fingerprint()
    again = s2dsl.parse(p.to_source())["rand"]
    assert again.head_specs == p.head_specs and again.prefix == p.prefix and again.causal == p.causal


def test_canonical_forms():
    parse = lambda body, mode="bidirectional": s2dsl.parse(  # noqa: E731
        f"pattern p {{ block = 16 heads = 1 {mode} heads * {{ {body} }} }}")["p"].head_specs[0]
    assert parse("sink 32 tokens") == parse("sink 2")                       # whole blocks fold
    assert parse("window 4 window 49 tokens") == parse("window 4")          # inside the block window
    assert parse("window 2 ahead 1 window 1 ahead 16 tokens") == parse("window 2 ahead 1")
    assert parse("stride 4 relative stride 8 relative window 2") == parse("window 2 stride 4 relative")
    assert parse("stride 1 relative").dense
    assert parse("window 100 tokens").window_tokens == 100


@pytest.mark.parametrize("text, message", [
    ("causal heads * { window 2 ahead 1 }", "causal pattern"),
    ("bidirectional prefix 64 heads * { window 2 }", "bidirectional and has a prefix"),
    ("causal prefix -1 heads * { window 2 }", "prefix is -1"),
    ("bidirectional heads * { window 2 ahead -1 }", "ahead is -1"),
    ("bidirectional heads * { stride 0 relative }", "relative stride is 0"),
    ("bidirectional heads * { global -2 }", "global is -2"),
    ("causal heads * { sink -3 tokens }", "sink is -3"),
])
def test_semantic_errors(text, message):
    with pytest.raises(S2SemanticError, match=message):
        s2dsl.parse(f"pattern p {{ block = 16 heads = 2 {text} }}")


def test_prefix_counts_blocks_unless_tokens():
    a = s2dsl.parse("pattern p { block = 16 heads = 1 causal prefix 2 heads * { dense } }")["p"]
    b = s2dsl.parse("pattern p { block = 16 heads = 1 causal prefix 32 tokens heads * { dense } }")["p"]
    assert a.prefix == b.prefix == 32 and a == b


# -------------------------------------------------------------------------- analyzer
def required(p: Pattern, n_tokens: int) -> torch.Tensor:
    q = torch.arange(n_tokens).view(-1, 1)
    k = torch.arange(n_tokens).view(1, -1)
    if not p.causal:
        return torch.ones(n_tokens, n_tokens, dtype=torch.bool)
    return (k <= q) | ((q < p.prefix) & (k < p.prefix))


@SETTINGS
@given(patterns())
def test_coverage_matches_brute_force(p):
    report = analyze(p)
    n = bound(p) * BLOCK
    holes = required(p, n) & ~p.token_mask(n).any(0)
    assert report.covered == (not bool(holes.any())), (report.reason, holes.nonzero()[:3])
    if not report.covered:
        ce = report.counterexample
        size = (max(ce.i, ce.j) + 1) * BLOCK
        assert holes.shape[0] >= size or True
        pair = required(p, size) & ~p.token_mask(size).any(0)
        assert pair.view(size // BLOCK, BLOCK, size // BLOCK, BLOCK)[ce.i, :, ce.j, :].any(), report.reason
    for g in report.groups:
        sub = required(p, n) & ~p.token_mask(n)[list(g.heads)].any(0)
        assert g.covered == (not bool(sub.any()))


@SETTINGS
@given(patterns())
def test_costs_match_brute_force(p):
    report = analyze(p)
    for n in sorted({1, 2, 5, bound(p)}):
        mask = p.block_mask(n)
        for h, cost in enumerate(report.heads):
            got = evaluate(cost.total_blocks, N=n)
            want = int(mask[h].sum())
            assert got == want if cost.exact else got >= want, (h, n, cost.total_blocks)
            for i in range(n):
                row = evaluate(cost.row_blocks, i=i, N=n)
                want_row = int(mask[h, i].sum())
                assert row == want_row if cost.exact else row >= want_row, (h, i, n)
        union = evaluate(report.union_total_blocks, N=n)
        want = int(mask.any(0).sum())
        assert union == want if report.costs_exact else union >= want


@SETTINGS
@given(patterns())
def test_density_limit_matches_a_long_mask(p):
    report = analyze(p)
    n = 40 * max(math.lcm(*(s.period for s in p.head_specs),
                          *(math.lcm(*s.relative) for s in p.head_specs if s.relative)), 4)
    mask = p.block_mask(n)
    grid = n * (n + 1) // 2 if p.causal else n * n
    for h, cost in enumerate(report.heads):
        assert abs(float(mask[h].sum()) / grid - float(cost.density_limit)) < 0.12


@SETTINGS
@given(patterns())
def test_empty_rows_and_kv_efficiency_match_brute_force(p):
    report = analyze(p)
    listed = dict(report.empty_rows)
    top = bound(p)
    lengths = [top] if p.causal else range(1, top + 1)
    for h in range(p.heads):
        empty = any(bool((~p.block_mask(n)[h].any(-1)).any()) for n in lengths)
        assert (h in listed) == empty, (h, listed)
    mask = p.block_mask(top)
    for h, spec in enumerate(p.head_specs):
        ok = True
        for j in range(top):
            rows = [bool(mask[h, i, j]) for i in range(j, top)]
            k = rows.index(False) if False in rows else len(rows)
            ok &= not any(rows[k:])
        if spec.relative:
            assert report.heads[h].kv_efficient is False
        else:
            assert report.heads[h].kv_efficient == ok


def test_dkernel_bidirectional_family_costs_are_exact():
    p = s2dsl.local_stride(block=16, local_blocks=(3, 2), vert_stride=4, heads=4, causal=False)
    report = analyze(p)
    assert report.costs_exact and not report.kv_efficient
    assert report.heads[0].density_limit == sympy.Rational(1, 4)
    for n in (1, 7, 33):
        assert evaluate(report.heads[0].total_blocks, N=n) == int(p.block_mask(n)[0].sum())


def test_far_first_column_is_refused_quickly_not_built():
    from s2dsl.analysis import AnalysisLimit
    p = s2dsl.parse("pattern p { block = 16 heads = 1 bidirectional heads * { stride 5000 offset -4999 global 1 } }")["p"]
    start = time.perf_counter()
    with pytest.raises(AnalysisLimit, match="rows are empty"):
        analyze(p)
    assert time.perf_counter() - start < 10


ROUND2_EXAMPLES = ["dkernel_bidirectional", "streaming_llm_tokens", "mistral_sliding_window", "gemma_interleaved",
                   "bigbird_global", "prefix_lm"]


@pytest.mark.parametrize("example", ROUND2_EXAMPLES)
def test_round2_examples_generate_every_kernel(example, capsys):
    """Each round-2 example compiles (`s2dsl compile`, GPU tiles) to valid Python for the forward
    and backward, and every causal pattern in it to a decode module."""
    from pathlib import Path

    from s2dsl.cli import main
    from s2dsl.codegen import lower
    from s2dsl.codegen.decode import DecodeSpecialization, generate_decode
    path = Path(__file__).resolve().parent.parent / "examples" / f"{example}.s2"
    for name, pattern in s2dsl.load(path).patterns.items():
        for kernel in ("fwd", "bwd"):
            assert main(["compile", str(path), "--pattern", name, "--kernel", kernel, "--target", "gpu"]) == 0
            compile(capsys.readouterr().out, f"<{name} {kernel}>", "exec")
        if pattern.causal:
            source = generate_decode(lower(pattern), DecodeSpecialization(head_dim=128, block_n=min(64, pattern.block)))
            compile(source, f"<{name} decode>", "exec")
            assert ("def pair_keep" in source) == lower(pattern).extended
