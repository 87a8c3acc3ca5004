"""Every examples/*.s2: parses, is canonically formatted, and checks as documented."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import s2dsl
from s2dsl.analysis import analyze
from s2dsl.cli import main
from s2dsl.parser import parse_module
from s2dsl.printer import format_module

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = sorted(EXAMPLES.glob("*.s2"))
NOT_COVERED = {"not_covering", "mistral_sliding_window", "gemma_local"}  # expected to fail coverage
NOT_KV_EFFICIENT = {"dkernel_bidirectional"}  # relative strides bring dropped blocks back


def test_examples_exist():
    names = {f.stem for f in FILES}
    assert {"phi3_small", "s2_local16_stride32", "s2_local16_stride8", "streaming_llm", "longformer_bigbird",
            "heterogeneous", "not_covering", "dkernel_bidirectional", "streaming_llm_tokens",
            "mistral_sliding_window", "gemma_interleaved", "bigbird_global", "prefix_lm"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_is_canonical_and_round_trips(path):
    text = path.read_text()
    module = parse_module(text, str(path))
    assert format_module(module) == text, f"run: s2dsl fmt --write {path.relative_to(EXAMPLES.parent)}"
    assert parse_module(format_module(module)) == module


def _brute_union_covered(p, n):
    masks = p.block_mask(n)
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    region = (j <= i) if p.causal else torch.ones(n, n, dtype=torch.bool)
    return bool((masks.any(0) | ~region).all())


def _brute_tokens_covered(p, n_tokens):
    q = torch.arange(n_tokens).view(-1, 1)
    k = torch.arange(n_tokens).view(1, -1)
    region = ((k <= q) | ((q < p.prefix) & (k < p.prefix))) if p.causal else torch.ones(n_tokens, n_tokens,
                                                                                      dtype=torch.bool)
    # one copy of each distinct head: the union does not depend on how many share a spec
    unique = tuple(dict.fromkeys(p.head_specs))
    distinct = s2dsl.Pattern(p.name, p.block, len(unique), 1, p.causal, unique, prefix=p.prefix)
    return bool((distinct.token_mask(n_tokens).any(0) | ~region).all())


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_verdict(path):
    f = s2dsl.load(path)
    assert f.patterns
    for name, p in f.items():
        report = analyze(p)
        assert report.covered == (name not in NOT_COVERED), report.reason
        assert report.rows_nonempty and report.kv_efficient == (name not in NOT_KV_EFFICIENT)
        # the proof agrees with brute force past the point where the pattern is periodic
        hulls = [s.blocks_touched(p.block) for s in p.head_specs]
        w = max(h[0] + h[1] for h in hulls)
        sink = max(h[2] for h in hulls) + max(s.global_rows for s in p.head_specs) + -(-p.prefix // p.block)
        period = math.lcm(*(s.period for s in p.head_specs), *(math.lcm(*s.relative) for s in p.head_specs
                                                                if s.relative))
        n = w + sink + 2 * period + 3
        if p.is_classic:
            assert _brute_union_covered(p, n) == report.covered
        else:
            assert _brute_tokens_covered(p, n * p.block) == report.covered
        if not report.covered:
            ce = report.counterexample
            assert not p.block_mask(ce.i + 1)[:, ce.i, ce.j].any()
    expected = 1 if any(n in NOT_COVERED for n in f) else 0
    assert main(["check", str(path)]) == expected


def test_phi3_small_is_dkernels_local_stride():
    f = s2dsl.load(EXAMPLES / "phi3_small.s2")
    p = f["phi3_small"]
    ref = s2dsl.local_stride(block=64, local_blocks=16, vert_stride=8, heads=32, kv_heads=8)
    assert (p.block, p.heads, p.kv_heads, p.causal) == (64, 32, 8, True)
    assert p.head_specs == ref.head_specs
    assert torch.equal(p.block_mask(100), ref.block_mask(100))
    assert torch.equal(p.token_mask(300, 700), ref.token_mask(300, 700))
    plan = f.models["phi3_small_model"]
    assert plan.layers == 32
    assert plan.layer_patterns == tuple("phi3_small" if layer % 2 == 0 else "dense" for layer in range(32))


@pytest.mark.parametrize("stride", [8, 32])
def test_s2_paper_patterns(stride):
    p = s2dsl.load(EXAMPLES / f"s2_local16_stride{stride}.s2")[f"s2_local16_stride{stride}"]
    assert (p.block, p.heads, p.kv_heads) == (64, 32, 32)
    n = 16 + 2 * stride + 5
    want = torch.tensor([[[j <= i and (i - j < 16 or (j + h) % stride == 0) for j in range(n)] for i in range(n)]
                         for h in range(32)])
    assert torch.equal(p.block_mask(n), want)
    assert p.head_specs == s2dsl.local_stride(block=64, local_blocks=16, vert_stride=stride, heads=32).head_specs


def test_heterogeneous_budgets():
    p = s2dsl.load(EXAMPLES / "heterogeneous.s2")["heterogeneous"]
    specs = p.head_specs
    assert all(s.window == 32 and not s.residues for s in specs[0:8])
    assert [s.residue_set for s in specs[8:24]] == [(h - 8,) for h in range(8, 24)]
    assert all(s.window == 8 and s.period == 16 for s in specs[8:24])
    assert [s.window for s in specs[24:30]] == [8, 12, 16, 20, 24, 28]
    assert all(s.sink == 1 for s in specs[24:30])
    assert all(s.dense for s in specs[30:32])


def test_streaming_llm_without_its_dense_heads_does_not_cover():
    p = s2dsl.load(EXAMPLES / "streaming_llm.s2")["streaming_llm"]
    assert all(s.sink == 1 and s.window == 32 for s in p.head_specs[:28])
    sparse = s2dsl.parse(p.to_source().replace("dense", "window 32\n        sink 1"))[p.name]
    report = analyze(sparse)
    assert not report.covered and report.counterexample.modulus == 1


def test_not_covering_counterexample():
    report = analyze(s2dsl.load(EXAMPLES / "not_covering.s2")["not_covering"])
    ce = report.counterexample
    assert (ce.i, ce.j, ce.missing_residues, ce.modulus) == (17, 1, (1, 2, 3, 4, 5, 6, 7), 8)


def test_longformer_bidirectional_variant():
    f = s2dsl.load(EXAMPLES / "longformer_bigbird.s2")
    assert f["longformer_causal"].causal and not f["bigbird_bidirectional"].causal
    assert f["longformer_causal"].head_specs == f["bigbird_bidirectional"].head_specs


# ------------------------------------------------------------------ round-2 constructs
def test_dkernel_bidirectional_is_dkernels_encoder_pattern():
    p = s2dsl.load(EXAMPLES / "dkernel_bidirectional.s2")["dkernel_bidirectional"]
    ref = s2dsl.local_stride(block=64, local_blocks=8, vert_stride=8, heads=16, kv_heads=8, num_dense_heads=2,
                             causal=False)
    assert not p.causal and p.head_specs == ref.head_specs
    assert torch.equal(p.block_mask(70), ref.block_mask(70))


def test_streaming_llm_in_tokens():
    p = s2dsl.load(EXAMPLES / "streaming_llm_tokens.s2")["streaming_llm_tokens"]
    spec = p.head_specs[0]
    assert (spec.sink_tokens, spec.window_tokens, spec.window, spec.sink) == (4, 1020, 0, 0)
    q = 2999
    row = p.token_mask(1, q + 1)[0, 0]
    assert row.nonzero().flatten().tolist() == [0, 1, 2, 3] + list(range(q - 1019, q + 1))


def test_mistral_window_edge_is_per_token():
    p = s2dsl.load(EXAMPLES / "mistral_sliding_window.s2")["mistral_sliding_window"]
    row = p.token_mask(1, 5000)[0, 0]  # the query at position 4999
    assert row.nonzero().flatten().tolist() == list(range(4999 - 4095, 5000))
    assert analyze(p).counterexample is not None


def test_gemma_plan_mixes_block_sizes():
    f = s2dsl.load(EXAMPLES / "gemma_interleaved.s2")
    plan = f.models["gemma3_1b"]
    assert plan.layers == 26
    assert [i for i, name in enumerate(plan.layer_patterns) if name == "gemma_global"] == [5, 11, 17, 23]
    local, glob = f["gemma_local"], f["gemma_global"]
    assert (local.block, glob.block) == (64, 128)
    assert local.head_specs[0].window_tokens == 512 and glob.head_specs[0].dense


def test_bigbird_global_rows_and_columns():
    p = s2dsl.load(EXAMPLES / "bigbird_global.s2")["bigbird_global"]
    mask = p.block_mask(30)
    assert mask[:, :2, :].all() and mask[:, :, :2].all()    # global rows and global columns
    assert mask[0, 10, 11] and mask[0, 10, 9] and not mask[0, 10, 7]  # two-sided band, shard 0 of 12 elsewhere


def test_prefix_lm_is_bidirectional_inside_the_prefix_only():
    p = s2dsl.load(EXAMPLES / "prefix_lm.s2")["prefix_lm"]
    assert p.prefix == 1000
    mask = p.token_mask(1200)[6:7]  # a dense head
    assert mask[0, 10, 999] and not mask[0, 10, 1000] and not mask[0, 1100, 1101] and mask[0, 1100, 1100]
