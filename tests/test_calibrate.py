"""S-HPLB calibration: chunked capture against dense attention, recovery curves and budgets
against brute force, and ``s2dsl calibrate`` end to end on a tiny random Llama."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import s2dsl
from s2dsl import cli
from s2dsl.calibrate import budgets as B
from s2dsl.calibrate.capture import chunked_attention
from s2dsl.calibrate.curves import row_recovery

transformers = pytest.importorskip("transformers")


def dense_probs(q, k, scale):
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    n = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 80), st.sampled_from([1, 2]), st.integers(0, 3), st.integers(0, 10**6))
def test_chunked_capture_equals_dense_attention_and_its_block_sums(n, kv, chunk_shift, seed):
    g = torch.Generator().manual_seed(seed)
    block, heads, d = 16, 2 * kv, 8
    q = torch.randn(1, heads, n, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, kv, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    nb = -(-n // block)
    got = torch.zeros(heads, nb, nb, dtype=torch.float64)

    def on_chunk(i, mass):
        got[:, i:i + mass.shape[2]] += mass[0].double()

    # max_elements small enough to force one block of rows per chunk, or larger chunks
    out = chunked_attention(q, k, v, block, max_elements=heads * n * block * (1 << chunk_shift), on_chunk=on_chunk)
    p = dense_probs(q, k, d ** -0.5)
    # the capture computes in float32 whatever the input dtype
    torch.testing.assert_close(out, p @ v.repeat_interleave(heads // kv, dim=1), atol=1e-5, rtol=1e-5)
    pad = torch.nn.functional.pad(p[0], (0, nb * block - n, 0, nb * block - n))
    want = pad.view(heads, nb, block, nb, block).sum(dim=(2, 4))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def brute_curves(mass):
    """mass (h, nb, nb) -> (topk, static) (h, nb+1) by loops."""
    h, nb, _ = mass.shape
    topk = torch.zeros(h, nb + 1, dtype=torch.float64)
    static = torch.zeros(h, nb + 1, dtype=torch.float64)
    for a in range(h):
        for i in range(nb):
            row = mass[a, i].tolist()
            others = sorted((row[j] for j in range(nb) if j != i), reverse=True)
            for kk in range(1, nb + 1):
                topk[a, kk] += row[i] + sum(others[:kk - 1])
                window = {j for j in range(i - (kk - 2), i + 1) if j >= 0} if kk >= 2 else set()
                static[a, kk] += sum(row[j] for j in window | {0})
    return topk, static


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(0, 10**6))
def test_recovery_curves_equal_brute_force(nb, heads, seed):
    g = torch.Generator().manual_seed(seed)
    mass = torch.rand(1, heads, nb, nb, generator=g, dtype=torch.float64).tril()
    first = 0
    rec = {"topk": 0, "static": 0}
    for rows in (mass[:, :, :nb // 2], mass[:, :, nb // 2:]):  # two chunks, as the capture hands them
        if rows.shape[2]:
            part = row_recovery(rows, first)
            rec = {m: rec[m] + part[m] for m in rec}
            first += rows.shape[2]
    topk, static = brute_curves(mass[0])
    torch.testing.assert_close(rec["topk"], topk)
    torch.testing.assert_close(rec["static"], static)
    # from k = 2 on, the static set (sink, diagonal, k - 2 more) is one choice the top-k could make
    assert bool((rec["topk"][:, 2:] >= rec["static"][:, 2:] - 1e-12).all())


@st.composite
def curve_sets(draw):
    h, nb = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    rows = []
    for _ in range(h):
        steps = sorted(draw(st.lists(st.integers(0, 20), min_size=nb - 1, max_size=nb - 1)))
        rows.append([0.0] + [s / 20 for s in steps] + [1.0])
    return torch.tensor(rows, dtype=torch.float64)


@settings(max_examples=150, deadline=None)
@given(curve_sets(), st.data())
def test_budgets_against_brute_force(curves, data):
    h, nb = curves.shape[0], curves.shape[1] - 1
    k_min = data.draw(st.integers(1, nb))
    target = data.draw(st.sampled_from([0.3, 0.5, 0.95, 1.0]))
    tb = B.target_budgets(curves, target, k_min)
    for c, k in zip(curves, tb):
        assert c[k] >= target - 1e-9 and k >= k_min
        assert all(c[j] < target - 1e-9 for j in range(k_min, k))
    total = data.draw(st.integers(h * k_min, h * nb))
    got = B.max_min_budgets(curves, total, k_min)
    assert sum(got) == total and all(k_min <= k <= nb for k in got)
    best = max(min(float(curves[i, k]) for i, k in enumerate(ks))
               for ks in itertools.product(range(k_min, nb + 1), repeat=h) if sum(ks) == total)
    assert min(float(curves[i, k]) for i, k in enumerate(got)) == pytest.approx(best)
    with pytest.raises(ValueError, match="cannot be split"):
        B.max_min_budgets(curves, h * nb + 1, k_min)


def test_spearman_and_heterogeneity():
    assert B.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert B.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert B.spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)
    h = B.heterogeneity([2, 4, 8, 2], 16)
    assert h["max_over_min"] == 4 and h["min_fraction"] == 2 / 16 and h["coefficient_of_variation"] > 0


# ------------------------------------------------------------------ a tiny model end to end
def tiny_llama(path=None):
    """Random 2-layer Llama whose layer-0 heads differ on purpose: head 0 attends uniformly
    (q = 0), head 3 very sharply (q scaled up), so their budgets must differ."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    d = 16
    with torch.no_grad():
        attn = model.model.layers[0].self_attn
        attn.q_proj.weight[0:d] = 0
        attn.q_proj.weight[3 * d:4 * d] *= 40
        attn.k_proj.weight[d:2 * d] *= 8
    if path is not None:
        model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cal")
    tiny_llama(tmp / "model")
    ids = torch.randint(0, 97, (800,), generator=torch.Generator().manual_seed(3)).tolist()
    (tmp / "ids.txt").write_text(" ".join(map(str, ids)))
    return tmp


def test_capture_leaves_the_model_as_it_was():
    from s2dsl.calibrate import calibrate
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 96), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    impl = model.config._attn_implementation
    cal = calibrate(model, ids[0], lengths=[64, 96], samples=1, block=16, target=0.9)
    assert model.config._attn_implementation == impl
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, before)
    assert len(cal.budgets) == 2 and all(len(b) == 4 for b in cal.budgets)


def test_cli_calibrate_end_to_end(calibrated, capsys):
    out = calibrated / "run" / "plan"
    code = cli.main(["calibrate", str(calibrated / "model"), "--ids", str(calibrated / "ids.txt"),
                     "--lengths", "96", "192", "--samples", "3", "--block", "16", "--target", "0.9",
                     "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "wrote" in printed and "min_recovery_budgets" in printed
    report = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    f = s2dsl.load(str(out.with_suffix(".s2")))
    (plan,) = f.models.values()
    assert plan.layers == 2
    for layer, budgets in enumerate(report["per_layer"]):
        p = f.pattern_for_layer(plan.name, layer)
        assert (p.heads, p.kv_heads, p.block) == (4, 2, 16)
        nb = report["n_blocks"]
        for h, k in enumerate(budgets["budgets"]):
            spec = p.head_specs[h]
            assert spec.dense if k >= nb else (spec.window == 1 and sum(t.k for t in spec.topk) == k - 1)
        assert sum(budgets["budgets"]) == budgets["total_budget"] == sum(budgets["target_budgets"])
        assert budgets["min_recovery_budgets"] >= budgets["min_recovery_target_budgets"] - 1e-9
        assert budgets["min_recovery_target_budgets"] >= 0.9 - 1e-9
        assert "across_inputs" in budgets and "192" not in budgets["across_lengths"]
        assert "96" in budgets["across_lengths"]
    # the heads made different are measured different: uniform head 0 needs more than sharp head 3
    tb = report["per_layer"][0]["target_budgets"]
    assert tb[0] > tb[3]
    assert report["per_layer"][0]["heterogeneity"]["max_over_min"] > 1
    for key in ("budget_coefficient_of_variation_mean", "across_inputs_recovery_std_mean",
                "across_lengths_96_rank_correlation_mean"):
        assert key in report["summary"]
    # s2dsl check accepts the plan: valid (exit 0 or 1: top-k heads cover nothing statically)
    assert cli.main(["check", str(out.with_suffix(".s2"))]) in (0, 1)


def test_cli_calibrate_static_cover_and_total_budget(calibrated, capsys):
    out = calibrated / "static"
    code = cli.main(["calibrate", str(calibrated / "model"), "--ids", str(calibrated / "ids.txt"),
                     "--lengths", "128", "--samples", "2", "--block", "16", "--static", "--cover",
                     "--total-budget", "0.5", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    for layer in report["per_layer"]:
        assert sum(layer["budgets"]) == round(0.5 * 8 * 4)
    capsys.readouterr()
    assert cli.main(["check", str(out.with_suffix(".s2"))]) == 0  # --cover: the union covers
    f = s2dsl.load(str(out.with_suffix(".s2")))
    assert all(not s.topk for p in f.values() for s in p.head_specs)


@pytest.mark.parametrize("extra, message", [
    (["--lengths", "4096"], "fewer than the longest length"),
    (["--lengths", "16"], "at least two blocks"),
    (["--target", "1.5"], "must be in (0, 1]"),
    (["--total-budget", "1000"], "cannot be split"),
])
def test_cli_calibrate_invalid_input_exit_2(calibrated, capsys, extra, message):
    argv = ["calibrate", str(calibrated / "model"), "--ids", str(calibrated / "ids.txt"), "--block", "16",
            "--samples", "1", "--lengths", "64", "--out", str(calibrated / "bad"), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_calibrate_bad_paths(tmp_path, calibrated, capsys):
    assert cli.main(["calibrate", str(tmp_path / "nope"), "--ids", str(calibrated / "ids.txt"),
                     "--out", str(tmp_path / "o")]) == 2
    bad = tmp_path / "ids.txt"
    bad.write_text("1 2 x")
    assert cli.main(["calibrate", str(calibrated / "model"), "--ids", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "token ids" in capsys.readouterr().err


def test_cli_calibrate_from_text_with_the_models_tokenizer(calibrated, capsys):
    """--text goes through the tokenizer saved with the model (a word-level one built here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(96)}
    vocab["[UNK]"] = 96
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(calibrated / "model")
    words = torch.randint(0, 96, (300,), generator=torch.Generator().manual_seed(8)).tolist()
    (calibrated / "text.txt").write_text(" ".join(f"w{i}" for i in words))
    out = calibrated / "fromtext"
    assert cli.main(["calibrate", str(calibrated / "model"), "--text", str(calibrated / "text.txt"),
                     "--lengths", "128", "--samples", "2", "--block", "16", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["samples"] == {"128": 2} and len(report["per_layer"]) == 2
    capsys.readouterr()
    (calibrated / "short.txt").write_text("w1 w2 w3")
    assert cli.main(["calibrate", str(calibrated / "model"), "--text", str(calibrated / "short.txt"),
                     "--lengths", "128", "--block", "16", "--out", str(out)]) == 2
    assert "3 tokens, fewer than" in capsys.readouterr().err
