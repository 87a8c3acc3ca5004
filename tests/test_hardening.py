"""Regression tests for issue 16 (hardening): limits, messages, lazy imports, input
validation, the kernel cache's fallback, CLI argument checks. One section per item."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import EXAMPLES, ROOT

import s2dsl
from s2dsl import limits

HEADER = "pattern p {{ block = {block} heads = {heads} heads * {{ {body} }} }}"


def _error(text: str) -> str:
    with pytest.raises(s2dsl.S2Error) as info:
        s2dsl.parse(text, filename="t.s2")
    return str(info.value)


# ------------------------------------------------------------- item 6: parser limits
@pytest.mark.parametrize("expr", [
    "+".join(["1"] * 500),                 # a long sum nests left-associatively
    "-(" * 500 + "1" + ")" * 500,
    "1+(" * 500 + "1" + ")" * 500,
    "min(1," * 300 + "1" + ")" * 300,
])
def test_deep_expressions_are_refused_with_the_limit(expr):
    message = _error(HEADER.format(block=64, heads=1, body=f"window {expr}"))
    assert message.startswith("t.s2:1:")
    assert f"more than {limits.MAX_EXPR_DEPTH} operators deep" in message
    assert "hint: split it with constants" in message


def test_expressions_at_the_depth_limit_still_parse():
    expr = "+".join(["1"] * limits.MAX_EXPR_DEPTH)  # nests MAX_EXPR_DEPTH - 1 deep
    f = s2dsl.parse(HEADER.format(block=64, heads=1, body=f"window {expr}"))
    assert f["p"].head_specs[0].window == limits.MAX_EXPR_DEPTH


def test_huge_literal_is_refused_before_conversion():
    message = _error(HEADER.format(block=64, heads=1, body="window " + "9" * 5000))
    assert "integer literal with 5000 digits" in message and f"at most {limits.MAX_LITERAL_DIGITS}" in message
    assert message.startswith("t.s2:1:51:")
    assert len(message) < 600  # the 5000-digit line is cut in the excerpt


@pytest.mark.parametrize("text, what", [
    ("pattern p { block = 64 heads = 1000000000 heads * { window 1 } }", "heads is 1000000000"),
    ("pattern p { block = 64 heads = 8 kv_heads = 100000 heads * { window 1 } }", "kv_heads is 100000"),
    ("pattern p { block = 64 heads = 1 heads * { window 1 } } model m { layers = 1000000000000 rest -> p }",
     "layers is 1000000000000"),
    ("const a = 999999999999999999 * 999999999999999999 * 999999999999999999\n"
     "pattern p { block = 64 heads = 1 heads * { window 1 } }", "constant 'a' is"),
])
def test_sizes_the_resolver_would_loop_over_are_refused(text, what):
    message = _error(text)
    assert what in message and ("above the limit" in message or "beyond the limit" in message), message


def test_repeated_squaring_of_constants_is_stopped_early():
    consts = "const c0 = 999999999999999999\n" + "".join(f"const c{i} = c{i - 1} * c{i - 1}\n" for i in range(1, 60))
    message = _error(consts + "pattern p { block = 64 heads = 1 heads * { window 1 } }")
    assert "constant 'c1' is a number of about 37 digits, above the limit 2^62" in message


# ------------------------------------------ item 7: values the int32 kernels cannot hold
@pytest.mark.parametrize("body, what", [
    ("window 2147483648", "window is 2147483648 for head 0, above the limit 2^30 - 1"),
    ("window 1 sink 4294967296", "sink is 4294967296 for head 0"),
    ("stride 1073741824", "stride is 1073741824 for head 0"),
    ("shard 0 of 1073741824", "shard count is 1073741824"),
    ("topk 1073741824", "topk is 1073741824"),
])
def test_component_values_beyond_the_kernels_are_refused_with_a_caret(body, what):
    message = _error(HEADER.format(block=64, heads=1, body=body))
    assert what in message, message
    assert "int32" in message  # the hint says why
    assert message.startswith("t.s2:1:")


def test_block_beyond_a_tile_is_refused():
    message = _error(HEADER.format(block="64*64*64*64*64*64*64*64*64*64*64*64*64*64*64*64*64", heads=1, body="window 1"))
    assert "block is a number of about" in message and "above the limit 65536" in message


def test_values_just_below_the_kernel_limits_are_accepted_and_lowered():
    from s2dsl.codegen.lower import lower
    f = s2dsl.parse(HEADER.format(block=65536, heads=limits.MAX_HEADS,
                                  body=f"window {limits.KERNEL_BLOCKS - 1} sink {limits.KERNEL_BLOCKS - 1}"))
    plan = lower(f["p"])
    assert plan.params[0].window == limits.KERNEL_BLOCKS - 1 < 2 ** 31


def test_large_offsets_are_fine_they_are_taken_modulo_the_stride():
    f = s2dsl.parse(HEADER.format(block=16, heads=2, body="stride 8 offset 1000000000000000 + h"))
    assert [s.residues for s in f["p"].head_specs] == [((8, 0),), ((8, 7),)]


# ------------------------------------------------------------------ item 15: messages
def test_causal_and_bidirectional_name_both_keywords():
    message = _error("pattern p { block = 64 heads = 1 causal bidirectional heads * { window 1 } }")
    assert "'bidirectional' after 'causal': a pattern is either causal or bidirectional" in message
    assert "'mode'" not in message
    assert "'causal' is given twice" in _error("pattern p { block = 64 heads = 1 causal causal heads * { window 1 } }")


def test_a_byte_order_mark_is_accepted(tmp_path):
    text = "\ufeffpattern p { block = 64 heads = 1 heads * { window 1 } }"
    assert s2dsl.parse(text)["p"].head_specs[0].window == 1
    path = tmp_path / "bom.s2"
    path.write_bytes(text.encode("utf-8"))
    assert s2dsl.load(path)["p"].block == 64
    from s2dsl.cli import main
    assert main(["check", str(path)]) == 1  # valid (not covered), not a syntax error


def test_a_long_line_is_cut_around_the_error():
    text = "pattern p { block = 64 heads = 1 heads * { window 1 } } " + " " * 1_000_000 + "@ x"
    message = _error(text)
    assert len(message) < 400
    excerpt, caret = message.splitlines()[1:3]
    assert excerpt.rstrip().endswith("@ x") and excerpt.lstrip().startswith("...")
    assert caret.index("^") == excerpt.index("@")  # the caret still points at the culprit


def test_a_long_token_is_cut_in_the_message():
    message = _error("9" * 3000)
    assert "(3000 characters)" in message and len(message) < 600


@pytest.mark.parametrize("body, expected", [
    ("topk 0", "topk 0 for head 0: it must pick at least one block"),
    ("topk 2 recent 0", "topk 2 recent 0 for head 0: recent counts decode steps and must be >= 1"),
])
def test_topk_messages_name_only_the_wrong_value(body, expected):
    message = _error(HEADER.format(block=64, heads=1, body=body))
    assert expected in message and "None" not in message


def test_parse_refuses_bytes_with_a_type_error():
    with pytest.raises(TypeError, match="takes the source text as a str"):
        s2dsl.parse(b"pattern p {}")


# -------------------------------------------------------------- item 13: lazy imports
def _modules_after(code: str) -> set:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


HEAVY = {"torch", "triton", "numpy", "matplotlib"}


@pytest.mark.parametrize("argv", [["--version"], ["fmt", str(EXAMPLES / "phi3_small.s2")],
                                  ["check", str(EXAMPLES / "phi3_small.s2")]])
def test_front_end_commands_do_not_import_torch(argv):
    code = ("import sys, contextlib, io\nfrom s2dsl.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n    code = main({argv!r})\n"
            "assert code == 0, code")
    loaded = _modules_after(code)
    assert not HEAVY & loaded, sorted(HEAVY & loaded)
    if argv[0] != "check":
        assert "sympy" not in loaded  # only the analyzer needs it


def test_python_m_s2dsl_check_does_not_import_torch():
    # the real entry point: run the module, then look at what it imported
    code = ("import runpy, sys, contextlib, io\nsys.argv = ['s2dsl', 'check', %r]\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        runpy.run_module('s2dsl', run_name='__main__')\n"
            "    except SystemExit as e:\n        assert e.code == 0, e.code") % str(EXAMPLES / "phi3_small.s2")
    assert not HEAVY & _modules_after(code)


def test_lazy_attributes_resolve_and_stay_listed():
    import s2dsl as m
    assert callable(m.attention) and m.SparseAttention.__name__ == "SparseAttention"
    assert callable(m.analyze) and callable(m.reference_attention)
    assert {"attention", "analyze", "reference_attention"} <= set(dir(m))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        m.nope


# ------------------------------------- items 2-4: every kernel entry point checks first
import torch  # noqa: E402  (after the lazy-import tests on purpose: they run in subprocesses anyway)

from s2dsl.runtime.attention import InputError, forward  # noqa: E402
from s2dsl.runtime.backward import backward  # noqa: E402

GQA = s2dsl.parse("pattern p { block = 16 heads = 2 kv_heads = 1 heads * { window 2 stride 3 offset h } }")["p"]


@pytest.fixture
def interpreter(monkeypatch):
    """Validation runs before any kernel; the flag only lets CPU tensors past the device check."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _packed(lens_q, lens_k, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens_q), 2, 16, generator=g, dtype=dtype)
    k, v = (torch.randn(sum(lens_k), 1, 16, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("offsets, match", [
    ([5, 10, 20], "must start at 0"),
    ([0, -4, 20], "non-decreasing: offset 1 is -4"),
    ([0, 15, 10, 20], "non-decreasing: offset 2 is 10, below offset 1 = 15"),
    ([0, 10, 19], "ends at 19 but the packed tensor has 20 tokens"),
    ([0, 10, 2 ** 31 - 1], "ends at 2147483647"),
])
@pytest.mark.parametrize("which", ["q", "k"])
def test_bad_cu_seqlens_are_refused_before_any_kernel(interpreter, offsets, match, which):
    q, k, v = _packed([10, 10], [10, 10])
    good = torch.tensor([0, 10, 20], dtype=torch.int32)
    bad = torch.tensor(offsets, dtype=torch.int32)
    cu_q, cu_k = (bad, good) if which == "q" else (good, bad)
    if len(offsets) != 3:
        cu_q = cu_k = bad
    with pytest.raises(InputError, match=match):
        s2dsl.attention(q, k, v, GQA, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out = torch.zeros_like(q)
    lse = torch.zeros(2, q.shape[0])
    with pytest.raises(InputError, match=match):
        backward(q, k, v, out, lse, out, GQA, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_cu_seqlens_with_more_queries_than_keys_name_the_sequence(interpreter):
    q, k, v = _packed([10, 12], [10, 10])
    with pytest.raises(InputError, match="sequence 1 has 12 queries but only 10 keys"):
        forward(q, k, v, GQA, cu_seqlens_q=torch.tensor([0, 10, 22], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 10, 20], dtype=torch.int32))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), torch.tensor(float("nan"))])
def test_non_finite_scale_is_refused_by_every_entry_point(interpreter, scale):
    q, k, v = (torch.randn(1, n, 20, 16) for n in (2, 1, 1))
    with pytest.raises(InputError, match="must be finite"):
        s2dsl.attention(q, k, v, GQA, scale=scale)
    with pytest.raises(InputError, match="must be finite"):
        forward(q, k, v, GQA, scale=scale)
    with pytest.raises(InputError, match="must be finite"):
        backward(q, k, v, q, torch.zeros(1, 2, 20), q, GQA, scale=scale)
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.kv_cache import PagedKVCache
    cache = PagedKVCache(GQA, num_pages=8, head_dim=16, dtype=torch.float32, device="cpu")
    seq = cache.add_sequence()
    with pytest.raises(InputError, match="must be finite"):
        cached_attention(cache, [seq], q[:, :, :1], k[:, :, :1], v[:, :, :1], scale=scale)
    assert cache.seq_len(seq) == 0  # refused before anything was written


def test_scale_of_the_wrong_type_is_a_type_error(interpreter):
    q, k, v = (torch.randn(1, n, 20, 16) for n in (2, 1, 1))
    with pytest.raises(TypeError, match="scale must be a number"):
        s2dsl.attention(q, k, v, GQA, scale="0.1")
    with pytest.raises(InputError, match="one number"):
        s2dsl.attention(q, k, v, GQA, scale=torch.ones(2))


interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@interpreted
def test_bf16_under_the_interpreter_is_computed_correctly():
    """The interpreter's bf16 tl.dot is wrong (errors ~1e8); every entry point computes in
    float32 there and casts back, so forward, backward and decode match the reference."""
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.kv_cache import PagedKVCache
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 48, 16, generator=g) for n in (2, 1, 1))
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = s2dsl.attention(qb, kb, vb, GQA)
    assert out.dtype == torch.bfloat16
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = s2dsl.reference_attention(*ref_inputs, GQA)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    dout = torch.randn(ref.shape, generator=g)
    out.backward(dout.bfloat16())
    ref.backward(dout)
    for got, want in zip((qb, kb, vb), ref_inputs):
        assert got.grad.dtype == torch.bfloat16
        torch.testing.assert_close(got.grad.float(), want.grad, atol=6e-2, rtol=5e-2)
    cache = PagedKVCache(GQA, num_pages=16, head_dim=16, dtype=torch.bfloat16, device="cpu")
    seq = cache.add_sequence()
    cached_attention(cache, [seq], *(t.detach()[:, :, :40] for t in (qb, kb, vb)))
    steps = [cached_attention(cache, [seq], *(t.detach()[:, :, i:i + 1] for t in (qb, kb, vb))) for i in range(40, 48)]
    decoded = torch.cat(steps, dim=2)
    assert decoded.dtype == torch.bfloat16
    torch.testing.assert_close(decoded.float(), ref.detach()[:, :, 40:], atol=3e-2, rtol=3e-2)


def test_interpreter_with_an_incompatible_numpy_is_refused_with_the_fix(interpreter, monkeypatch):
    from s2dsl.runtime import validate
    monkeypatch.setattr(validate, "_interpreter_problem", lambda: "numpy 2.4 refuses it; install 'numpy<2.4'")
    q, k, v = (torch.randn(1, n, 20, 16) for n in (2, 1, 1))
    with pytest.raises(InputError, match="numpy<2.4"):
        s2dsl.attention(q, k, v, GQA)


def test_the_interpreter_probe_passes_with_the_pinned_numpy():
    from s2dsl.runtime import validate
    validate._interpreter_problem.cache_clear()
    assert validate._interpreter_problem() is None  # pyproject pins numpy<2.4 for exactly this


# ---------------------------------------------- item 11: the base install runs the interpreter
def test_numpy_pin_is_in_the_base_dependencies():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "numpy<2.4" in project["dependencies"]


# ------------------------------------------------- item 8: an unusable cache directory
from s2dsl.runtime.cache import STALE_TMP_SECONDS, CacheWarning, KernelCache  # noqa: E402


def _fill(cache, keys=("a", "b")):
    with pytest.warns(CacheWarning) as record:
        modules = [cache.get(key, lambda key=key: f"VALUE = {key!r}\n") for key in keys]
    assert [m.VALUE for m in modules] == list(keys)
    return [w for w in record if issubclass(w.category, CacheWarning)]


def test_a_file_where_the_directory_should_be_falls_back_to_memory_with_one_warning(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("not a directory")
    cache = KernelCache(blocker)
    warned = _fill(cache)
    assert len(warned) == 1 and str(blocker) in str(warned[0].message)
    assert cache.stats.memory_only == 2
    assert cache.get("a", lambda: pytest.fail("regenerated")).VALUE == "a"  # kept in memory


def test_an_entry_that_is_a_directory_falls_back_to_memory(tmp_path):
    cache = KernelCache(tmp_path)
    cache.entry("a").mkdir()
    assert len(_fill(cache, ("a",))) == 1


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_directory_falls_back_to_memory(tmp_path):
    tmp_path.chmod(0o500)
    try:
        assert len(_fill(KernelCache(tmp_path / "sub"))) == 1
    finally:
        tmp_path.chmod(0o700)


@interpreted
def test_kernels_run_from_the_memory_fallback(tmp_path, monkeypatch):
    """Triton reads a kernel's source through inspect; the in-memory modules provide it."""
    from s2dsl.runtime import cache as cache_module
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(cache_module, "_default", KernelCache(blocker))
    q, k, v = (torch.randn(1, n, 40, 16, generator=torch.Generator().manual_seed(3)) for n in (2, 1, 1))
    import warnings
    with warnings.catch_warnings(record=True) as caught:  # not pytest.warns: it re-emits the interpreter's noise
        warnings.simplefilter("always", CacheWarning)
        out = s2dsl.attention(q, k, v, GQA)
    assert sum(issubclass(w.category, CacheWarning) for w in caught) == 1
    torch.testing.assert_close(out, s2dsl.reference_attention(q, k, v, GQA), atol=2e-5, rtol=2e-5)


def test_stale_temporary_files_are_removed_fresh_ones_kept(tmp_path):
    stale, fresh = tmp_path / "abc123.tmp", tmp_path / "def456.tmp"
    for f in (stale, fresh):
        f.write_text("half a file")
    old = os.path.getmtime(stale) - STALE_TMP_SECONDS - 10
    os.utime(stale, (old, old))
    cache = KernelCache(tmp_path)
    assert cache.get("a", lambda: "VALUE = 1\n").VALUE == 1
    assert not stale.exists() and fresh.exists()  # a live writer's file stays


# ------------------------------------------------------ item 10: command-line arguments
from s2dsl.cli import main  # noqa: E402

PHI3 = str(EXAMPLES / "phi3_small.s2")


@pytest.mark.parametrize("argv, says", [
    (["check", PHI3, "--head-dim", "-128"], "--head-dim: -128 is outside 1..65536"),
    (["check", PHI3, "--dtype-bytes", "0"], "--dtype-bytes: 0 is outside 1..16"),
    (["compile", PHI3, "--head-dim", "0"], "--head-dim: 0 is outside 16..256"),
    (["compile", PHI3, "--head-dim", "1000"], "--head-dim: 1000 is outside 16..256"),
    (["show", PHI3, "--png", "x.png", "--seq", "-5"], "--seq: -5 is outside 1..2147483647"),
    (["show", PHI3, "--png", "x.png", "--seq", "0"], "--seq: 0 is outside"),
    (["show", PHI3, "--png", "x.png", "--seq", "1e6"], "--seq: '1e6' is not an integer"),
])
def test_bad_arguments_exit_2_with_the_allowed_range(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_show_draws_a_million_tokens_sampled_without_dense_masks(tmp_path, monkeypatch):
    from s2dsl import pattern as pattern_module
    monkeypatch.setattr(pattern_module.Pattern, "block_mask", lambda *a, **k: pytest.fail("dense mask built"))
    out = tmp_path / "big.png"
    assert main(["show", PHI3, "--png", str(out), "--seq", "1000000"]) == 0
    assert out.stat().st_size > 10_000


def test_sampled_mask_is_block_mask_at_the_drawn_blocks():
    from s2dsl.visualize import sampled_block_mask
    # round-2 constructs too (two-sided and token windows, relative strides, global rows, prefix)
    round2 = ["dkernel_bidirectional", "streaming_llm_tokens", "bigbird_global", "prefix_lm"]
    pats = [p for name in ["heterogeneous"] + round2 for p in s2dsl.load(EXAMPLES / f"{name}.s2").patterns.values()]
    for p in pats + [GQA]:
        full = p.block_mask(90)
        for step in (1, 7):
            idx = torch.arange(0, 90, step)
            assert torch.equal(sampled_block_mask(p, idx), full[:, idx][:, :, idx])


# -------------------------------------------------- item 9: window 1 (ptxas crash on sm_90)
WINDOW1 = [s2dsl.local_stride(block=16, local_blocks=1, vert_stride=4, heads=4, kv_heads=2),
           s2dsl.local_stride(block=32, local_blocks=1, vert_stride=2, heads=2),
           s2dsl.parse("pattern w { block = 16 heads = 2 heads 0..0 { window 1 sink 1 } heads 1..1 { window 0 stride 3 } }")["w"]]


@pytest.mark.parametrize("pattern", WINDOW1[:1] + [s2dsl.local_stride(block=64, local_blocks=1, vert_stride=8, heads=8)])
def test_window_1_sources_have_no_loops_that_cannot_run(pattern):
    """With every window <= 1 the window range is the diagonal blocks: the forward, the dQ
    part of the backward and the decode kernel emit no loop before them."""
    from s2dsl.runtime.backward import backward_source, choose_backward_for_gpu
    from s2dsl.runtime.decode import choose_decode, decode_source
    from s2dsl.runtime.kernels import choose_forward_for_gpu, forward_source
    from dataclasses import replace
    fwd = forward_source(pattern, replace(choose_forward_for_gpu(pattern, 128), dtype="bfloat16"))
    bwd = backward_source(pattern, replace(choose_backward_for_gpu(pattern, 128), dtype="bfloat16"))
    dec = decode_source(pattern, replace(choose_decode(pattern, torch.float16, 128, 1, torch.device("cpu")),
                                         dtype="bfloat16"))
    for source in (fwd, bwd):
        assert "lo = first_block  # window <= 1" in source
        window_range = source.split("lo = first_block  # window <= 1")[1].split("after the diagonal")[0]
        assert "edge" not in window_range and "WINDOW_SPAN" not in window_range
        assert window_range.count("for j in") == 2  # residue blocks below lo, then the diagonal
    assert "edge = " not in dec and "range(tl.maximum(w_begin, i0), w_end)" in dec
    wider = s2dsl.local_stride(block=pattern.block, local_blocks=2, vert_stride=4, heads=pattern.heads)
    assert "(lo, edge" in forward_source(wider, replace(choose_forward_for_gpu(wider, 128), dtype="bfloat16"))


@interpreted
@pytest.mark.parametrize("pattern", WINDOW1, ids=["local1-stride4-gqa", "local1-stride2-b32", "window1-sink-window0"])
def test_window_1_forward_backward_decode_match_the_reference(pattern):
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.kv_cache import PagedKVCache
    g = torch.Generator().manual_seed(7)
    n = 5 * pattern.block + 3
    q, k, v = (torch.randn(1, h, n, 16, generator=g) for h in (pattern.heads, pattern.kv_heads, pattern.kv_heads))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = s2dsl.attention(*leaves, pattern)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = s2dsl.reference_attention(*ref_leaves, pattern)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    dout = torch.randn(ref.shape, generator=g)
    out.backward(dout)
    ref.backward(dout)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)
    cache = PagedKVCache(pattern, num_pages=64, head_dim=16, dtype=torch.float32, device="cpu")
    seq = cache.add_sequence()
    split = n - 4
    cached_attention(cache, [seq], q[:, :, :split], k[:, :, :split], v[:, :, :split])
    steps = [cached_attention(cache, [seq], q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
             for i in range(split, n)]
    torch.testing.assert_close(torch.cat(steps, dim=2), ref.detach()[:, :, split:], atol=2e-5, rtol=2e-5)
