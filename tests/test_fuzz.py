"""Malformed and extreme input: only ``S2Error`` subclasses may leave ``s2dsl.parse`` and
``s2dsl.analyze``, and quickly (hypothesis' per-example deadline).

Four sources of text: the examples mutated (spans deleted, duplicated, swapped, tokens and
huge numbers inserted), random token soup, deep nesting, and a valid template with extreme
values in every slot.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES

import s2dsl

SOURCES = [p.read_text() for p in sorted(EXAMPLES.glob("*.s2"))]
# warm up the parser and sympy once, so the per-example deadline measures the example
s2dsl.analyze(s2dsl.parse(SOURCES[0])[next(iter(s2dsl.parse(SOURCES[0])))])

KEYWORDS = ["const", "pattern", "model", "block", "heads", "kv_heads", "causal", "bidirectional", "window",
            "sink", "stride", "offset", "shard", "of", "dense", "topk", "recent", "layers", "every", "from",
            "rest", "h", "min", "max", "x", "p"]
SYMBOLS = ["{", "}", "(", ")", "=", ";", ",", "+", "-", "*", "//", "%", "..", "->", "#", "\n", " ", "\t",
           "\ufeff", "\x00", "é", "@"]
HUGE = ["0", "-1", "1", "15", "16", "2147483647", "2147483648", "4294967296", "18446744073709551616",
        "9" * 19, "9" * 5000]

# the deadline is generous for a shared 2-core CI machine (a first analysis of a pattern takes
# ~0.5 s alone, several seconds under load); a hang or a minutes-long analysis still fails it
FUZZ = settings(max_examples=120, deadline=timedelta(seconds=15), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _only_s2_errors(text: str) -> None:
    try:
        f = s2dsl.parse(text, filename="fuzz.s2")
    except s2dsl.S2Error as exc:
        message = str(exc)
        assert message.startswith("fuzz.s2"), message  # every error names the file
        assert len(message) < 2000, "excerpts must be cut"
        return
    for p in f.patterns.values():
        try:
            s2dsl.analyze(p)  # decides, or refuses with an S2Error
        except s2dsl.S2Error as exc:
            assert str(exc).startswith(f"pattern {p.name}"), str(exc)[:300]


token = st.one_of(st.sampled_from(KEYWORDS), st.sampled_from(SYMBOLS), st.sampled_from(HUGE),
                  st.integers(-(2 ** 70), 2 ** 70).map(str))


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SOURCES))
    for _ in range(draw(st.integers(1, 4))):
        a = draw(st.integers(0, len(text)))
        b = draw(st.integers(a, min(len(text), a + 40)))
        op = draw(st.sampled_from(["delete", "insert", "duplicate", "number"]))
        if op == "delete":
            text = text[:a] + text[b:]
        elif op == "insert":
            text = text[:a] + " " + draw(token) + " " + text[a:]
        elif op == "duplicate":
            text = text[:b] + text[a:b] + text[b:]
        else:
            text = text[:a] + draw(st.sampled_from(HUGE)) + text[b:]
    return text


@pytest.mark.parametrize("strategy", ["mutated", "soup"])
def test_random_text_gives_only_s2_errors(strategy):
    source = mutated() if strategy == "mutated" else st.lists(token, max_size=60).map(" ".join)

    @FUZZ
    @given(source)
    def run(text):
        _only_s2_errors(text)

    run()


@settings(FUZZ, max_examples=40)
@given(depth=st.integers(0, 3000), opener=st.sampled_from(["-(", "1+(", "(", "min(1,", "2*(", "-"]),
       where=st.sampled_from(["window", "block =", "const x ="]))
def test_deep_nesting_gives_only_s2_errors(depth, opener, where):
    closer = ")" * opener.count("(")
    expr = opener * depth + "1" + closer * depth
    if where == "const x =":
        text = f"const x = {expr}\npattern p {{ block = 64 heads = 1 heads * {{ window 1 }} }}"
    elif where == "block =":
        text = f"pattern p {{ block = {expr} heads = 1 heads * {{ window 1 }} }}"
    else:
        text = f"pattern p {{ block = 64 heads = 1 heads * {{ window {expr} }} }}"
    _only_s2_errors(text)


values = st.one_of(st.integers(-(2 ** 40), 2 ** 40).map(str), st.sampled_from(HUGE),
                   st.sampled_from([0, 1, 2, 3, 16, 64, 4096, 4097, 1 << 30, (1 << 31) - 1, 1 << 62, 1 << 63]).map(str),
                   st.sampled_from(["64*64*64*64*64*64*64*64*64*64*64*64", "-(1 - 2)", "min(3, -5)"]))


@FUZZ
@given(block=values, heads=values, kv=values, window=values, sink=values, stride=values, offset=values,
       layers=values, mode=st.sampled_from(["causal", "bidirectional"]))
def test_extreme_values_give_only_s2_errors(block, heads, kv, window, sink, stride, offset, layers, mode):
    text = (f"pattern p {{ block = {block} heads = {heads} kv_heads = {kv} {mode}\n"
            f"  heads * {{ window {window} sink {sink} stride {stride} offset {offset} + h }} }}\n"
            f"model m {{ layers = {layers} rest -> p }}")
    _only_s2_errors(text)


# No deadline here: heads with several head-dependent strides make the analyzer's coverage
# search the slow part (e.g. 'stride 6 + h offset h stride 515 + h offset h' over 5 heads:
# 2.4 s alone, far more on a loaded machine), which would make a deadline flaky; the ranges
# are kept small instead.
@settings(FUZZ, max_examples=30, deadline=None)
@given(strides=st.lists(st.integers(1, 600), min_size=1, max_size=2), heads=st.integers(1, 8))
def test_many_strides_are_decided_or_refused(strides, heads):
    body = " ".join(f"stride {s} + h offset h" for s in strides)
    _only_s2_errors(f"pattern p {{ block = 16 heads = {heads} heads * {{ window 1 {body} }} }}")
