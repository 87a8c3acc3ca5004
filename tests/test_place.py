"""Head placement (S-HPLB): partitions, balance against the contiguous split and the optimum,
costs against brute-force counts, the ``s2dsl place`` command."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import s2dsl
from s2dsl import cli
from s2dsl.parallel import placement as pl
from s2dsl.parallel import restrict
from s2dsl.pattern import HeadSpec, Pattern, TopKSpec

from conftest import EXAMPLES

HET = str(EXAMPLES / "heterogeneous.s2")


@st.composite
def head_specs(draw):
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return HeadSpec(dense=True)
    residues = tuple(sorted({(m, draw(st.integers(0, m - 1)))
                             for m in draw(st.lists(st.integers(2, 6), max_size=2))}))
    topk = (TopKSpec(draw(st.integers(1, 3))),) if kind == 1 else ()
    return HeadSpec(window=draw(st.integers(1, 6)), sink=draw(st.integers(0, 2)), residues=residues, topk=topk)


@st.composite
def patterns(draw, max_groups=8):
    kv = draw(st.integers(1, max_groups))
    g = draw(st.sampled_from([1, 2, 4]))
    specs = tuple(draw(head_specs()) for _ in range(kv * g))
    return Pattern("p", 16, kv * g, kv, draw(st.booleans()), specs)


def brute_costs(p: Pattern, seq_len: int):
    n = -(-seq_len // p.block)
    mask = p.block_mask(n, n)
    out = []
    for h, spec in enumerate(p.head_specs):
        k = sum(t.k for t in spec.topk)
        rows = mask[h].sum(1)
        avail = (1 + torch.arange(n)) if p.causal else torch.full((n,), n)
        out.append(float(torch.minimum(rows + k, avail).sum()))
    return out


@settings(max_examples=60, deadline=None)
@given(patterns(), st.integers(1, 300))
def test_head_costs_equal_brute_force_counts(p, seq_len):
    assert pl.head_costs(p, seq_len) == brute_costs(p, seq_len)


@settings(max_examples=80, deadline=None)
@given(patterns(), st.integers(1, 8), st.sampled_from([64, 1000, 4096]))
def test_placement_is_a_partition_with_groups_whole_and_beats_the_contiguous_split(p, gpus, seq_len):
    if gpus > p.kv_heads:
        with pytest.raises(pl.PlacementError, match="at most"):
            pl.place(p, gpus, seq_len)
        return
    r = pl.place(p, gpus, seq_len)
    heads = [h for a in r.assignment for h in a]
    assert sorted(heads) == list(range(p.heads))
    for a in r.assignment:
        assert a, "every GPU gets heads"
        for h in a:
            kv = p.kv_head_of(h)
            assert set(range(kv * p.group_size, (kv + 1) * p.group_size)) <= set(a)
    costs = pl.head_costs(p, seq_len)
    assert list(r.loads) == pytest.approx([sum(costs[h] for h in a) for a in r.assignment])
    assert sum(r.loads) == pytest.approx(sum(r.naive_loads))
    assert max(r.loads) <= max(r.naive_loads) * (1 + 1e-12)
    assert r.imbalance <= r.naive_imbalance * (1 + 1e-12)
    # each GPU's heads form a pattern the kernels can run: the restriction keeps every head's spec
    for a in r.assignment:
        sub = restrict(p, a)
        assert sub.kv_heads * sub.group_size == len(a) and sub.group_size == p.group_size
        assert list(sub.head_specs) == [p.head_specs[h] for h in a]


weights = st.lists(st.integers(0, 50).map(float), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(weights, st.integers(1, 4))
def test_within_grahams_bound_of_the_brute_force_optimum(ws, bins):
    if bins > len(ws):
        return
    opt = pl.brute_force_makespan(ws, bins)
    result, _ = pl.place_weights(ws, bins)
    assert sorted(i for b in result for i in b) == list(range(len(ws)))
    got = pl.makespan(ws, result)
    assert got <= (4 / 3 - 1 / (3 * bins)) * opt + 1e-9
    assert got >= opt - 1e-9
    # each start alone is a partition, and refining never makes it worse
    for start in (pl.lpt(ws, bins), pl.karmarkar_karp(ws, bins), pl.contiguous(len(ws), bins)):
        assert sorted(i for b in start for i in b) == list(range(len(ws)))
        assert pl.makespan(ws, pl.refine(ws, start)) <= pl.makespan(ws, start)
    assert pl.makespan(ws, pl.lpt(ws, bins)) <= (4 / 3 - 1 / (3 * bins)) * opt + 1e-9


def test_swaps_fix_what_lpt_misses():
    # LPT puts 3+3 / 2+2+2 -> makespan 7 with {3,2,2}; the optimum is 6 = {3,3} {2,2,2}
    ws = [3.0, 3.0, 2.0, 2.0, 2.0]
    assert pl.makespan(ws, pl.lpt(ws, 2)) == 7
    result, _ = pl.place_weights(ws, 2)
    assert pl.makespan(ws, result) == 6


def test_measured_times_replace_the_analyzer_costs():
    p = s2dsl.load(str(EXAMPLES / "phi3_small.s2"))["phi3_small"]
    times = [1.0] * 28 + [10.0] * 4  # the last kv group is slow on the device
    r = pl.place(p, 2, 8192, measured=times)
    assert r.cost_unit == "measured"
    assert sorted(r.loads) == [28.0, 40.0]  # the slow group alone: the optimum
    with pytest.raises(pl.PlacementError, match="32 heads"):
        pl.place(p, 2, 8192, measured=[1.0])


def test_restrict_refuses_split_groups():
    p = s2dsl.load(str(EXAMPLES / "phi3_small.s2"))["phi3_small"]
    with pytest.raises(ValueError, match="keep GQA groups whole"):
        restrict(p, [0, 1])
    with pytest.raises(ValueError, match="outside"):
        restrict(p, [40])
    sub = restrict(p, [4, 5, 6, 7, 28, 29, 30, 31])
    assert (sub.heads, sub.kv_heads) == (8, 2)
    assert sub.head_specs[4] == p.head_specs[28]
    # pattern-wide fields (a prefix-LM prefix) carry over
    from dataclasses import replace
    sub = restrict(replace(p, prefix=128), range(8, 16))
    assert sub.prefix == 128 and sub.causal


# ------------------------------------------------------------------------------ CLI
def test_cli_place_json_and_table(tmp_path, capsys):
    code = cli.main(["place", HET, "--gpus", "4", "--seq", "32768", "--json"])
    assert code == 0
    obj = json.loads(capsys.readouterr().out)
    for key in ("pattern", "gpus", "assignment", "loads", "imbalance", "naive_imbalance"):
        assert key in obj
    assert obj["gpus"] == 4 and len(obj["assignment"]) == 4
    assert obj["imbalance"] <= obj["naive_imbalance"]
    assert cli.main(["place", HET, "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "imbalance" in out and "contiguous split" in out and "gpu" in out


def test_cli_place_with_measured_times(tmp_path, capsys):
    times = tmp_path / "t.json"
    times.write_text(json.dumps({"head_ms": [1.0] * 16 + [3.0] * 16}))
    assert cli.main(["place", HET, "--gpus", "2", "--times", str(times), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["loads"] == [32.0, 32.0] and obj["naive_imbalance"] == 1.5


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "9"], "at most 8 GPUs"),
    (["--gpus", "0"], ">= 1"),
    (["--gpus", "2", "--seq", "0"], ">= 1 token"),
    (["--gpus", "2", "--pattern", "nope"], "no pattern named"),
])
def test_cli_place_invalid_input_exit_2(capsys, argv, message):
    assert cli.main(["place", HET, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_place_bad_times_file(tmp_path, capsys):
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    assert cli.main(["place", HET, "--gpus", "2", "--times", str(bad)]) == 2
    bad.write_text(json.dumps({"head_ms": [1.0]}))
    assert cli.main(["place", HET, "--gpus", "2", "--times", str(bad)]) == 2
    assert "1 measured head times for 32 heads" in capsys.readouterr().err


@settings(max_examples=40, deadline=None)
@given(head_specs(), st.integers(1, 40), st.integers(1, 600))
def test_topk_cost_bisection_equals_the_row_by_row_sum(spec, k, n):
    from s2dsl.analysis import analyze, evaluate
    spec = spec.with_(topk=(TopKSpec(k),))
    p = Pattern("p", 16, 1, 1, True, (spec,))
    cost = analyze(p).heads[0]
    rows = sum(min(i + 1, evaluate(cost.row_blocks, i=i) + k) for i in range(n))
    assert pl.head_costs(p, n * 16) == [float(rows)]
