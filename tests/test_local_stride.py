"""``s2dsl.local_stride`` is DKernel's ``get_sparse_attn_mask``, for every parameter.

Held against an independent implementation of DKernel's documented formula (written here
from ``shared/anchors/dkernel/utils.py``'s docstring and DESIGN.md) and, where the anchor is
on disk, against DKernel's own function (pure torch: it runs on the CPU).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st

import s2dsl

# shared/ inside the checkout (the GPU machine) or beside it (a developer's machine, CI)
_ROOT = Path(__file__).resolve().parents[1]
ANCHOR = next((r / "shared" / "anchors" / "dkernel" / "utils.py" for r in (_ROOT, _ROOT.parent)
               if (r / "shared" / "anchors" / "dkernel" / "utils.py").exists()), Path("/nonexistent"))


def _dkernel_utils():
    if not ANCHOR.exists():
        return None
    try:
        spec = importlib.util.spec_from_file_location("_dkernel_utils", ANCHOR)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # imports torch, numpy, triton only
        return module
    except Exception:  # noqa: BLE001 - an anchor that cannot load is simply not compared against
        return None


DKERNEL = _dkernel_utils()


def formula(*, heads, n, local_blocks, vert_stride, kv_heads=None, num_dense_heads=0, head_sliding_offset=0,
            head_sliding_step=None, homo_head=False, causal=True, vert_position_type=None):
    """DKernel's mask, block level, [heads, n, n], from its documented rules."""
    kv = kv_heads or heads
    group = heads // kv
    position = vert_position_type or ("absolute" if causal else "relative")
    left, right = (local_blocks, 1) if causal else (
        (local_blocks, local_blocks) if isinstance(local_blocks, int) else local_blocks)
    step = head_sliding_step or max(1, vert_stride // (1 if homo_head else heads))
    out = torch.zeros(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        g = 0 if homo_head else h // group
        dense = g >= kv - num_dense_heads
        for i in range(n):
            for j in range(n):
                if dense:
                    keep = True
                elif position == "absolute":
                    keep = (i - j < left and j - i < right) or (j + g * step + head_sliding_offset) % vert_stride == 0
                else:
                    l_dist = max(0, i - j - left + 1)
                    r_dist = max(0, j - i - right + 1)
                    keep = (l_dist + r_dist) % vert_stride == 0
                out[h, i, j] = keep and (j <= i or not causal)
    return out


@st.composite
def params(draw):
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2, 4]))
    causal = draw(st.booleans())
    position = draw(st.sampled_from([None, "absolute", "relative"]))
    if causal:
        local = draw(st.integers(1, 5))
    elif draw(st.booleans()):
        local = draw(st.integers(0 if position == "absolute" else 1, 5))
    else:
        local = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    homo = draw(st.booleans())
    return dict(heads=heads, kv_heads=kv, local_blocks=local, vert_stride=draw(st.integers(1, 20)),
                num_dense_heads=0 if homo else draw(st.integers(0, kv)),
                head_sliding_offset=draw(st.integers(0, 9)), homo_head=homo, causal=causal,
                vert_position_type=position,
                head_sliding_step=draw(st.none() | st.integers(1, 4)))


@settings(max_examples=150, deadline=None)
@given(params(), st.integers(1, 30))
def test_local_stride_is_dkernels_formula(kw, n):
    p = s2dsl.local_stride(block=16, **kw)
    assert torch.equal(p.block_mask(n), formula(n=n, **kw))
    # the printed pattern means the same
    assert s2dsl.parse(p.to_source())[p.name].head_specs == p.head_specs


@pytest.mark.skipif(DKERNEL is None, reason="DKernel anchor not on disk")
@settings(max_examples=60, deadline=None)
@given(params(), st.integers(1, 24))
def test_local_stride_is_dkernels_own_mask(kw, n):
    p = s2dsl.local_stride(block=16, **kw)
    dk_kw = dict(kw)
    # DKernel's homo_head sets num_heads = 1, so it takes no kv-head count (one shared pattern)
    dk_kw["num_kv_heads"] = None if kw["homo_head"] else dk_kw["kv_heads"]
    del dk_kw["kv_heads"]
    heads = dk_kw.pop("heads")
    try:
        _, mask, _ = DKERNEL.get_sparse_attn_mask(heads, n * 16, block_size=16, device="cpu", **dk_kw)
    except RuntimeError:
        # DKernel's own mask code fails on causal + relative + dense heads (its vstack'ed
        # [heads * n, n] cannot broadcast against the causal cut); the formula test covers it
        reject()
    # all heads sharing one pattern come back as [1, n, n]; DKernel stacks relative heads with
    # dense ones along the rows ([heads * n, n]): both are reshaped, not re-derived
    mask = mask.bool().reshape(-1, n, n).expand(heads, n, n)
    assert torch.equal(p.block_mask(n), mask)


def test_dkernel_counts_dense_heads_in_kv_heads():
    # 32 q / 8 kv heads, num_dense_heads=2: q heads 24..31 are dense (issue 16)
    p = s2dsl.local_stride(block=64, local_blocks=4, vert_stride=8, heads=32, kv_heads=8, num_dense_heads=2)
    assert [h for h, s in enumerate(p.head_specs) if s.dense] == list(range(24, 32))


def test_dkernel_shift_divides_by_q_heads():
    # 8 q / 2 kv heads, stride 16: step = 16 // 8 = 2 (not 16 // 2)
    p = s2dsl.local_stride(block=16, local_blocks=1, vert_stride=16, heads=8, kv_heads=2)
    assert p.head_specs[4].residues == ((16, (-2) % 16),)


def test_bidirectional_default_is_relative_two_sided():
    p = s2dsl.local_stride(block=16, local_blocks=(3, 2), vert_stride=4, heads=2, causal=False)
    spec = p.head_specs[0]
    assert (spec.window, spec.ahead, spec.relative) == (3, 1, (4,))
    assert not p.causal


def test_local_stride_refuses_what_dkernel_refuses():
    with pytest.raises(ValueError, match="kv heads"):
        s2dsl.local_stride(block=64, local_blocks=4, vert_stride=8, heads=4, kv_heads=2, num_dense_heads=3)
    with pytest.raises(ValueError, match="homo_head"):
        s2dsl.local_stride(block=64, local_blocks=4, vert_stride=8, heads=4, homo_head=True, num_dense_heads=1)
    with pytest.raises(ValueError, match="left, right"):
        s2dsl.local_stride(block=64, local_blocks=(0, 2), vert_stride=8, heads=4, causal=False)
    with pytest.raises(ValueError, match="degenerate"):
        s2dsl.local_stride(block=64, local_blocks=0, vert_stride=8, heads=4, causal=False)
    with pytest.raises(ValueError, match="causal"):
        s2dsl.local_stride(block=64, local_blocks=(2, 2), vert_stride=8, heads=4)
