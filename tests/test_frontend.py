"""Front end: parser/printer round trip, semantic errors, pattern semantics, reference attention."""
from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import s2dsl
from s2dsl import ir
from s2dsl.errors import S2SemanticError, S2SyntaxError
from s2dsl.parser import parse_module
from s2dsl.printer import format_expr, format_module

# --------------------------------------------------------------------------- IR strategies
KEYWORDS = {"const", "pattern", "model", "block", "heads", "kv_heads", "causal", "bidirectional", "window",
            "sink", "stride", "offset", "shard", "of", "dense", "topk", "recent", "layers", "every", "from",
            "rest", "min", "max", "h", "ahead", "tokens", "blocks", "relative", "global", "prefix"}
names = st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True).filter(lambda n: n not in KEYWORDS)

exprs = st.recursive(
    st.one_of(st.builds(ir.Num, st.integers(-300, 300)),
              st.builds(ir.Var, names),
              st.just(ir.Var("h"))),
    lambda sub: st.one_of(
        st.builds(ir.BinOp, st.sampled_from(ir.BINOPS), sub, sub),
        # the parser folds '-<literal>' into a negative literal, so Neg never wraps a Num
        st.builds(ir.Neg, sub.filter(lambda e: not isinstance(e, ir.Num))),
        st.builds(ir.Call, st.sampled_from(ir.FUNCS), st.lists(sub, min_size=1, max_size=3).map(tuple)),
    ),
    max_leaves=10,
)
optional_exprs = st.none() | exprs

components = st.one_of(
    st.builds(ir.Window, exprs),
    st.builds(ir.Window, exprs, ahead=optional_exprs, tokens=st.booleans()),
    st.builds(ir.Sink, exprs, tokens=st.booleans()),
    st.builds(ir.RelativeStride, exprs),
    st.builds(ir.GlobalRows, exprs),
    st.builds(ir.Stride, exprs, exprs),
    st.builds(ir.Stride, exprs, st.just(ir.Num(0))),
    st.builds(ir.Shard, exprs, exprs),
    st.builds(ir.Dense),
    st.builds(ir.TopK, exprs, optional_exprs),
)


@st.composite
def head_groups(draw):
    comps = tuple(draw(st.lists(components, max_size=4)))
    if draw(st.booleans()):
        return ir.HeadGroup(None, None, comps)
    return ir.HeadGroup(draw(exprs), draw(exprs), comps)


patterns = st.builds(ir.PatternDef, names, optional_exprs, optional_exprs, optional_exprs, st.booleans(),
                     st.lists(head_groups(), max_size=3).map(tuple))
# 'prefix' follows the mode word, so the printer writes it for either mode (semantics refuses it bidirectional)
patterns = patterns | st.builds(ir.PatternDef, names, optional_exprs, optional_exprs, optional_exprs, st.booleans(),
                                st.lists(head_groups(), max_size=3).map(tuple), prefix=exprs,
                                prefix_tokens=st.booleans())
selectors = st.one_of(st.builds(ir.LayerSpan, exprs, exprs),
                      st.builds(ir.LayerEvery, exprs, optional_exprs),
                      st.just(ir.LayerRest()))
rules = st.builds(ir.Rule, selectors, names | st.just(ir.DENSE_PATTERN))
models = st.builds(ir.ModelDef, names, exprs, st.lists(rules, max_size=4).map(tuple))
consts = st.builds(ir.ConstDef, names, exprs)
modules = st.builds(ir.Module, st.lists(st.one_of(consts, patterns, models), max_size=6).map(tuple))

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(modules)
def test_print_parse_round_trip(module):
    text = format_module(module)
    assert parse_module(text) == module, text


@FAST
@given(modules)
def test_formatting_is_idempotent(module):
    text = format_module(module)
    assert format_module(parse_module(text)) == text


@FAST
@given(exprs, st.integers(0, 40))
def test_printed_expression_evaluates_alike(expr, h):
    """Parentheses and precedence survive printing: same value before and after."""
    env = {n: (hash(n) % 17) - 8 for n in ir.free_names(expr)}
    env["h"] = h
    text = f"const x = {format_expr(expr)}"
    reparsed = parse_module(text).items[0].value
    try:
        want = ir.evaluate(expr, env)
    except ir.EvalError:
        with pytest.raises(ir.EvalError):
            ir.evaluate(reparsed, env)
        return
    assert ir.evaluate(reparsed, env) == want


COMMENTED = """\
# leading comment
const w = 16  # window in blocks
const s = 8

# the pattern
pattern p {  # opening
    block = 64
    heads = 4
    causal
    heads 0..3 {  # all heads
        window w
        # stride below
        stride s offset h
    }
    # trailing inside
}

model m {
    layers = 4
    every 2 from 1 -> dense  # odd layers dense
    rest -> p
}
# the end
"""


def test_format_keeps_comments_and_is_a_fixed_point():
    assert format_module(parse_module(COMMENTED)) == COMMENTED


def test_format_canonicalises_layout():
    messy = "const w=16 pattern p{block=64;heads=4 heads *{window w;stride 8 offset h;}} "
    out = format_module(parse_module(messy))
    assert out == ("const w = 16\n\npattern p {\n    block = 64\n    heads = 4\n    causal\n"
                   "    heads * {\n        window w\n        stride 8 offset h\n    }\n}\n")
    assert format_module(parse_module(out)) == out


def test_optional_parts_default():
    m = parse_module("pattern p { block = 64 heads = 1 heads * { stride 8 topk 4 } }\n"
                     "model x { layers = 4 every 2 -> dense rest -> p }")
    stride, topk = m.items[0].groups[0].components
    assert stride.offset == ir.Num(0) and topk.recent is None
    assert m.items[1].rules[0].selector == ir.LayerEvery(ir.Num(2), None)


# --------------------------------------------------------------------------- errors
def _error(text, kind=S2SemanticError, filename="t.s2"):
    with pytest.raises(kind) as info:
        s2dsl.parse(text, filename)
    return str(info.value)


def _where(message, line, text):
    """The message names t.s2:line:col and shows the line with a caret under column col."""
    match = re.match(r"t\.s2:(\d+):(\d+): ", message)
    assert match, message
    assert int(match.group(1)) == line, message
    col = int(match.group(2))
    source = text.splitlines()[line - 1]
    assert f"\n    {source}\n    {' ' * (col - 1)}^" in message, message
    return col


def _pattern(body, header="block = 64\n    heads = 4", prefix=""):
    return f"{prefix}pattern p {{\n    {header}\n{body}\n}}\n"


def test_heads_not_assigned():
    text = _pattern("    heads 0..1 { window 4 }")
    msg = _error(text)
    assert "leaves heads 2..3 unassigned" in msg
    _where(msg, 1, text)


def test_head_assigned_twice():
    text = _pattern("    heads 0..2 { window 4 }\n    heads 2..3 { dense }")
    msg = _error(text)
    assert "head 2 is assigned twice" in msg and "first at line 4" in msg
    assert _where(msg, 5, text) == 5


def test_head_range_outside():
    text = _pattern("    heads 0..4 { window 4 }")
    msg = _error(text)
    assert "head range 0..4 is outside 0..3" in msg
    _where(msg, 4, text)


def test_head_range_empty():
    assert "is empty" in _error(_pattern("    heads 3..1 { window 4 }"))


@pytest.mark.parametrize("value", ["0", "-8", "h - 2"])
def test_stride_not_positive(value):
    text = _pattern(f"    heads * {{\n        window 2\n        stride {value}\n    }}")
    msg = _error(text)
    assert "stride is" in msg and "must be a positive number" in msg
    assert "for head" in msg
    _where(msg, 6, text)


def test_shard_count_not_positive_and_index_out_of_range():
    assert "S must be positive" in _error(_pattern("    heads * { shard 0 of 0 }"))
    assert "the index must be in 0..7" in _error(_pattern("    heads * { shard h + 5 of 8 }"))


def test_negative_window_names_head():
    text = _pattern("    heads * {\n        window 2 - h\n    }")
    msg = _error(text)
    assert "window is -1 for head 3" in msg and "cannot be negative" in msg
    _where(msg, 5, text)


def test_negative_sink():
    msg = _error(_pattern("    heads * { sink -1 }"))
    assert "sink is -1 for head 0" in msg and "cannot be negative" in msg


@pytest.mark.parametrize("block", [0, 8, 48, 100, -64])
def test_bad_block_size(block):
    text = _pattern("    heads * { dense }", header=f"block = {block}\n    heads = 4")
    msg = _error(text)
    assert f"block = {block}" in msg and "not a power of two >= 16" in msg
    _where(msg, 2, text)


def test_missing_block_and_heads():
    assert "has no block size" in _error("pattern p { heads = 4 heads * { dense } }")
    assert "does not say how many heads" in _error("pattern p { block = 64 heads * { dense } }")


def test_kv_heads_must_divide_heads():
    text = _pattern("    heads * { dense }", header="block = 64\n    heads = 6\n    kv_heads = 4")
    msg = _error(text)
    assert "kv_heads = 4 does not divide heads = 6" in msg
    _where(msg, 4, text)


def test_unknown_constant():
    text = "const w = 4\n" + _pattern("    heads * {\n        window w + ww\n    }")
    msg = _error(text)
    assert "unknown constant 'ww'" in msg and "known: w" in msg
    assert _where(msg, 6, text) == 20


def test_head_index_outside_components():
    assert "may not depend on the head index" in _error(_pattern("    heads * { dense }", header="block = 64 * h\n heads = 4"))


@pytest.mark.parametrize("op, word", [("//", "division"), ("%", "modulo")])
def test_division_by_zero_names_head(op, word):
    text = _pattern(f"    heads * {{\n        stride 8 offset 16 {op} (h - 2)\n    }}")
    msg = _error(text)
    assert f"{word} by zero" in msg and "for head h=2" in msg
    _where(msg, 5, text)


def test_division_by_zero_in_constant():
    msg = _error("const a = 0\nconst b = 4 // a\n")
    assert "division by zero in constant 'b'" in msg


def test_model_unknown_pattern():
    text = _pattern("    heads * { dense }") + "model m {\n    layers = 4\n    rest -> q\n}\n"
    msg = _error(text)
    assert "model 'm' uses unknown pattern 'q'" in msg and "dense, p" in msg
    _where(msg, 8, text)


def test_model_layers_uncovered_and_range():
    base = _pattern("    heads * { dense }")
    assert "gives no pattern to layers 2..3" in _error(base + "model m { layers = 4 0..1 -> p }")
    assert "layer range 2..4 is outside 0..3" in _error(base + "model m { layers = 4 2..4 -> p }")


def test_duplicate_names():
    assert "already defined" in _error("const a = 1\nconst a = 2\n")
    assert "already defined" in _error("const p = 1\n" + _pattern("    heads * { dense }"))
    assert "cannot be redefined" in _error("const h = 1\n")


@pytest.mark.parametrize("text, line, col, expected", [
    ("pattern p {\n    block = 64\n    heads = 4\n    heads 0..3 { window }\n}\n", 4, 25, "an integer"),
    ("pattern p {\n    blok = 64\n}\n", 2, 5, "'block'"),
    ("const a = 3 +\n", 1, 14, "an integer"),
    ("pattern p {\n    block = 64 $\n}\n", 2, 16, None),
    ("pattern p {\n    block = 64\n", 2, 15, "'}'"),
])
def test_syntax_errors(text, line, col, expected):
    msg = _error(text, S2SyntaxError)
    assert msg.startswith(f"t.s2:{line}:{col}: syntax error: unexpected"), msg
    if expected:
        assert "expected" in msg and expected in msg, msg
    lines = text.splitlines()
    if line <= len(lines):
        assert f"\n    {lines[line - 1]}\n    {' ' * (col - 1)}^" in msg, msg


def test_field_set_twice():
    msg = _error("pattern p {\n    block = 64\n    block = 32\n}\n", S2SyntaxError)
    assert "'block' is set twice" in msg and msg.startswith("t.s2:3:5")


# --------------------------------------------------------------------------- semantics
def test_shard_is_sugar_for_stride():
    for s, k in itertools.product((1, 2, 3, 8), range(8)):
        if k >= s:
            continue
        a = s2dsl.parse(f"pattern p {{ block = 16 heads = 1 heads * {{ shard {k} of {s} }} }}")["p"]
        b = s2dsl.parse(f"pattern p {{ block = 16 heads = 1 heads * {{ stride {s} offset -{k} }} }}")["p"]
        assert a.head_specs == b.head_specs
        assert torch.equal(a.block_mask(40), b.block_mask(40))


def test_heads_written_differently_compare_equal():
    a = s2dsl.parse("pattern p { block = 16 heads = 2 heads * { window 4 window 2 stride 4 stride 2 } }")["p"]
    b = s2dsl.parse("pattern p { block = 16 heads = 2 heads * { window 4 shard 0 of 2 } }")["p"]
    assert a.head_specs == b.head_specs and a.fingerprint() == b.fingerprint()


MIXED = """
const w = 3
pattern mixed {
    block = 16
    heads = 6
    kv_heads = 3
    causal
    heads 0..1 { window w  stride 4 offset h }
    heads 2..3 { sink 2  window 1  shard h % 3 of 3 }
    heads 4 .. 4 { dense }
    heads 5..5 { window 2  stride 5 offset -h  sink 1 }
}
pattern bi {
    block = 16
    heads = 2
    bidirectional
    heads * { window 2  stride 3 offset h }
}
"""


@pytest.mark.parametrize("name", ["mixed", "bi"])
def test_block_mask_agrees_with_keeps(name):
    p = s2dsl.parse(MIXED)[name]
    n = 23
    mask = p.block_mask(n)
    want = torch.tensor([[[p.keeps(h, i, j) for j in range(n)] for i in range(n)] for h in range(p.heads)])
    assert torch.equal(mask, want)
    past = 5
    part = p.block_mask(7, past_blocks=past)
    assert torch.equal(part, want[:, past:past + 7, :past + 7])


@pytest.mark.parametrize("name, q_len, kv_len", [("mixed", 100, 100), ("mixed", 37, 130), ("bi", 50, 90), ("mixed", 1, 77)])
def test_token_mask_agrees_with_keeps(name, q_len, kv_len):
    p = s2dsl.parse(MIXED)[name]
    mask = p.token_mask(q_len, kv_len)
    past = kv_len - q_len
    for h in range(p.heads):
        for qi in range(q_len):
            qpos = qi + past
            row = [p.keeps(h, qpos // p.block, k // p.block) and (not p.causal or k <= qpos) for k in range(kv_len)]
            assert mask[h, qi].tolist() == row


def _naive_attention(q, k, v, pattern):
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    past = lk - lq
    out = torch.zeros(b, hq, lq, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kvh = h // (hq // pattern.kv_heads)
            for qi in range(lq):
                qpos = qi + past
                allowed = [kp for kp in range(lk)
                           if pattern.keeps(h, qpos // pattern.block, kp // pattern.block)
                           and (not pattern.causal or kp <= qpos)]
                if not allowed:
                    continue
                scores = torch.stack([(q[bi, h, qi].double() @ k[bi, kvh, kp].double()) / math.sqrt(d)
                                      for kp in allowed])
                probs = torch.softmax(scores, 0)
                out[bi, h, qi] = sum(p_ * v[bi, kvh, kp].double() for p_, kp in zip(probs, allowed))
    return out


@pytest.mark.parametrize("name, lq, lk", [("mixed", 70, 70), ("mixed", 20, 75), ("bi", 33, 60)])
def test_reference_attention_matches_naive_loop(name, lq, lk):
    p = s2dsl.parse(MIXED)[name]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, p.heads, lq, 8, generator=g)
    k = torch.randn(1, p.kv_heads, lk, 8, generator=g)
    v = torch.randn(1, p.kv_heads, lk, 8, generator=g)
    got = s2dsl.reference_attention(q, k, v, p, dtype=torch.float64)
    assert torch.allclose(got, _naive_attention(q, k, v, p), atol=1e-10)


def test_reference_attention_empty_rows_are_zero():
    p = s2dsl.parse("pattern p { block = 16 heads = 1 heads * { shard 1 of 4 } }")["p"]
    q, k, v = (torch.randn(1, 1, 40, 4) for _ in range(3))
    out, lse = s2dsl.reference_attention(q, k, v, p, return_lse=True)
    assert torch.all(out[0, 0, :16] == 0) and torch.all(torch.isneginf(lse[0, 0, :16]))
    assert torch.isfinite(lse[0, 0, 16:]).all()


# local_stride against DKernel's own formula and mask: tests/test_local_stride.py


def test_local_stride_rejects_bad_arguments():
    with pytest.raises(ValueError):
        s2dsl.local_stride(block=64, local_blocks=4, vert_stride=8, heads=6, kv_heads=4)
    with pytest.raises(ValueError):
        s2dsl.local_stride(block=64, local_blocks=4, vert_stride=8, heads=4, num_dense_heads=5)


def test_model_plan_first_rule_wins():
    f = s2dsl.parse(_pattern("    heads * { window 2 }") + "model m { layers = 6 0..1 -> dense every 2 -> p rest -> dense }")
    assert f.models["m"].layer_patterns == ("dense", "dense", "p", "dense", "p", "dense")
    assert f.pattern_for_layer("m", 1) is None and f.pattern_for_layer("m", 2) is f["p"]


def test_format_keeps_blank_line_after_top_level_comments():
    text = "# header\n#\n# more\n\nconst a = 1\n\n# about p\n\npattern p {\n    block = 64\n    heads = 1\n    causal\n    heads * {\n        dense\n    }\n}\n"
    assert format_module(parse_module(text)) == text
