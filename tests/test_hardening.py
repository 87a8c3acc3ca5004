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
