"""INT8 KV pages (ALISA's channel-wise asymmetric quantisation) against its error bound."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from s2dsl.runtime.quant import QMAX, QMIN, dequantize_pages, quantize_pages


@st.composite
def pages(draw):
    n, block, dim = draw(st.integers(1, 4)), draw(st.sampled_from([1, 2, 16])), draw(st.sampled_from([1, 3, 8]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    # channels of very different magnitude (keys have them), some constant, some with an outlier
    mag = 10.0 ** torch.randint(-3, 4, (1, 1, dim), generator=g).float()
    x = torch.randn(n, block, dim, generator=g) * mag + torch.randn(1, 1, dim, generator=g) * mag
    if draw(st.booleans()):
        x[..., 0] = draw(st.floats(-1e3, 1e3))
    if draw(st.booleans()):
        x[0, 0, -1] = draw(st.floats(-1e4, 1e4))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return x.to(dtype)


@settings(max_examples=60, deadline=None)
@given(pages())
def test_error_at_most_half_a_step_per_page_and_channel(x):
    q = quantize_pages(x)
    assert q.codes.dtype == torch.int8 and q.codes.shape == x.shape
    assert q.scale.shape == q.bias.shape == (x.shape[0], x.shape[2])
    err = (dequantize_pages(q) - x.float()).abs()
    bound = q.scale.unsqueeze(1) / 2 * (1 + 1e-4) + 1e-6 * x.float().abs()
    assert bool((err <= bound).all()), float((err - bound).max())


@settings(max_examples=40, deadline=None)
@given(pages())
def test_codes_span_the_range(x):
    q = quantize_pages(x)
    codes = q.codes.int()
    assert int(codes.min()) >= QMIN and int(codes.max()) <= QMAX
    varying = (x.float().amax(1) - x.float().amin(1)) > 1e-6 * x.float().abs().amax(1).clamp_min(1)
    # every varying channel uses both ends: the minimum maps to QMIN and the maximum to QMAX
    assert bool((codes.amin(1)[varying] == QMIN).all()) and bool((codes.amax(1)[varying] == QMAX).all())


def test_constant_channel_is_exact():
    x = torch.full((2, 16, 4), 3.25)
    x[1, :, 2] = -7.5
    q = quantize_pages(x)
    assert torch.equal(dequantize_pages(q), x)


def test_valid_counts_ignore_the_unwritten_tail():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 8, generator=g)
    x[0, 5:] = 1e6  # garbage past the sequence's end must not stretch the range
    valid = torch.tensor([5, 16, 0])
    q = quantize_pages(x, valid)
    full = quantize_pages(x[:1, :5])
    assert torch.equal(q.scale[0], full.scale[0]) and torch.equal(q.codes[0, :5], full.codes[0])
    assert bool((q.codes[0, 5:] == QMIN).all()) and bool((q.codes[2] == QMIN).all())


def test_int8_halves_a_16_bit_page():
    x = torch.randn(4, 64, 128, dtype=torch.float16)
    q = quantize_pages(x)
    assert q.codes.numel() * q.codes.element_size() * 2 == x.numel() * x.element_size()
    # per page and channel two float32 numbers: 1/64 of the codes at block 64
    assert q.nbytes() == x.numel() + 2 * 4 * 4 * 128


@pytest.mark.parametrize("bad, msg", [
    (torch.randn(4, 8), "pages, block, head_dim"),
    (torch.ones(1, 2, 2, dtype=torch.int32), "floating-point"),
    (torch.tensor([[[float("nan")]]]), "NaN"),
])
def test_refuses_bad_input(bad, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        quantize_pages(bad)


def test_refuses_bad_valid_counts():
    with pytest.raises(ValueError, match="lie in"):
        quantize_pages(torch.randn(2, 4, 3), torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="one count per page"):
        quantize_pages(torch.randn(2, 4, 3), torch.tensor([1]))
