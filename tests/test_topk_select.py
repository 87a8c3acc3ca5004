"""The prefill selection's generated kernels (pool_kernel + select_kernel) against brute force.

On inputs whose block-pooled scores are exact in float32 (small integers; either aligned full
blocks, or rows constant inside each block), the kernels, the torch fallback for large K and a
Python brute force must agree entry for entry, ties included: among equal scores the later
block wins. Kernels run under the Triton interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import s2dsl
from s2dsl.codegen.lower import lower
from s2dsl.runtime import topk as topk_mod
from s2dsl.runtime.topk import order_keys, select_blocks, selection_shape

from kernel_strategies import random_inputs
from test_topk import topk_patterns

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def _exact_inputs(pattern, batch, lq, lk, d, seed, per_block):
    """Small-integer q (batch, heads, lq, d) / k (batch, kv heads, lk, d) whose pooled scores are
    exact in float32: every row of a block equal (``per_block``), else any rows (the caller
    aligns the lengths to full blocks of a power-of-two size)."""
    g = torch.Generator().manual_seed(seed)
    block = pattern.block

    def draw(heads, n, first_pos):
        if not per_block:
            return torch.randint(-3, 4, (batch, heads, n, d), generator=g).float()
        blocks = (first_pos + n - 1) // block - first_pos // block + 1
        per = torch.randint(-2, 3, (batch, heads, blocks, d), generator=g).float()
        idx = (torch.arange(first_pos, first_pos + n) // block) - first_pos // block
        return per[:, :, idx]

    return draw(pattern.heads, lq, lk - lq), draw(pattern.kv_heads, lk, 0)


def _brute(pattern, q, k):
    """Per (batch, head, row): the head's K candidates of highest exact pooled score, later block
    first among equals, then -1 (float64 arithmetic; the inputs make it exact)."""
    batch, _, lq, _ = q.shape
    lk, block = k.shape[2], pattern.block
    shape, first = selection_shape(pattern, batch, lq, lk)
    past, n_cols = lk - lq, -(-lk // block)
    qd, kd = q.double(), k.double()
    ks = [p.topk for p in lower(pattern).params]
    k_pool = [kd[:, :, j * block:(j + 1) * block].mean(2) for j in range(n_cols)]   # (batch, kv heads, d) each
    out = torch.full(shape, -1, dtype=torch.int32)
    for r in range(shape[2]):
        i = first + r
        q_pool = qd[:, :, max(i * block, past) - past:(i + 1) * block - past].mean(2)  # (batch, heads, d)
        for h in range(pattern.heads):
            cands = [j for j in range(n_cols) if not pattern.keeps(h, i, j) and not (pattern.causal and j > i)]
            for b in range(batch):
                scored = sorted(((float(q_pool[b, h] @ k_pool[j][b, h // pattern.group_size]), j) for j in cands),
                                reverse=True)[:ks[h]]
                out[b, h, r, :len(scored)] = torch.tensor([j for _, j in scored], dtype=torch.int32)
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=topk_patterns(), data=st.data())
def test_kernel_torch_fallback_and_brute_force_pick_the_same_blocks(pattern, data):
    per_block = data.draw(st.booleans(), label="rows constant per block")
    lk = data.draw(st.integers(1, 100), label="kv_len")
    lq = data.draw(st.integers(1, lk), label="q_len")
    if not per_block:  # any rows: full blocks (means of 16 integers are exact)
        lk = max(1, lk // 16) * 16
        lq = max(1, min(lq, lk) // 16) * 16
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype")
    layout = data.draw(st.sampled_from(["bhsd", "bshd"]), label="layout")
    q, k = _exact_inputs(pattern, 2, lq, lk, 16, seed=lq * 101 + lk, per_block=per_block)
    want = _brute(pattern, q, k)
    q, k = q.to(dtype), k.to(dtype)
    if layout == "bshd":
        q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    got = select_blocks(q, k, pattern, layout=layout)
    assert torch.equal(got, want)
    module = topk_mod._prefill_info(pattern)[0]
    saved = module.FUSED_K
    module.FUSED_K = 0  # every K through the torch path (scores, exclude, top-k of order_keys)
    try:
        assert torch.equal(select_blocks(q, k, pattern, layout=layout), want)
    finally:
        module.FUSED_K = saved


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the NaN keys, in the interpreter's matmul
def test_equal_scores_pick_the_later_blocks_and_nan_or_inf_blocks_never():
    """Every kv block scores the same except block 2 (NaN keys) and block 4 (a -inf key): the
    rows take the latest selectable blocks, best first, never 2 or 4, unused slots last."""
    pattern = s2dsl.parse("pattern p { block = 16 heads = 2 kv_heads = 1 heads * { sink 1 topk 3 } }")["p"]
    q = torch.ones(1, 2, 128, 16)
    k = torch.ones(1, 1, 128, 16)
    k[:, :, 32:48] = float("nan")
    k[:, :, 70, 0] = float("-inf")
    for fused, merge in ((True, "insert"), (True, "bitonic"), (True, "extract"), (False, None)):
        module = topk_mod._prefill_info(pattern)[0]
        saved = module.FUSED_K, module.SELECT_MERGE
        module.FUSED_K = saved[0] if fused else 0
        module.SELECT_MERGE = merge
        try:
            sel = select_blocks(q, k, pattern)
        finally:
            module.FUSED_K, module.SELECT_MERGE = saved
        for i in range(8):
            want = [j for j in range(i, 0, -1) if j not in (2, 4)][:3]
            assert sel[0, 0, i].tolist() == want + [-1] * (3 - len(want)), (fused, merge, i)
        assert torch.equal(sel[0, 0], sel[0, 1])


@pytest.mark.parametrize("estimator", ["bound", "last_row"])
def test_score_estimators_pick_through_the_kernel_as_through_torch(estimator):
    """The bound and last-row scores go through select_kernel's score mode: the same picks as the
    torch path on the same scores (equal keys), on random inputs with a bidirectional head set."""
    for src in ("pattern p { block = 16 heads = 4 kv_heads = 2 heads 0..1 { window 1 topk h + 2 } "
                "heads 2..3 { window 2 } }",
                "pattern p { block = 16 heads = 2 bidirectional heads * { window 2 sink 1 topk 2 } }"):
        pattern = s2dsl.parse(src)["p"]
        q, k, _ = random_inputs(2, pattern.heads, pattern.kv_heads, 70, 90, 16, torch.float32, seed=11)
        got = select_blocks(q, k, pattern, estimator=estimator)
        module = topk_mod._prefill_info(pattern)[0]
        saved = module.FUSED_K
        module.FUSED_K = 0
        try:
            want = select_blocks(q, k, pattern, estimator=estimator)
        finally:
            module.FUSED_K = saved
        assert torch.equal(got, want)


def test_order_keys_rank_by_score_then_later_block():
    s = torch.tensor([[1.0, -0.0, 0.0, float("nan"), -2.0, 1.0, float("-inf"), float("inf")]])
    order = torch.argsort(order_keys(s), descending=True)[0].tolist()
    assert order[:6] == [7, 5, 0, 2, 1, 4]  # inf; the two 1.0s later first; 0.0 == -0.0, later first
    assert set(order[6:]) == {3, 6} and (order_keys(s)[0, [3, 6]] == topk_mod.NONE_KEY).all()


def test_pooled_selection_is_two_launches_and_no_torch_work():
    """The default selection: no block score matrix, no host sync, no per-head or per-tile torch
    ops; only the output and the pooled keys are allocated, and two generated kernels run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    pattern = s2dsl.parse("pattern p { block = 16 heads = 4 kv_heads = 2 heads * { window 2 sink 1 topk 3 } }")["p"]
    q, k, _ = random_inputs(1, 4, 2, 96, 128, 16, torch.float32, seed=2)
    select_blocks(q, k, pattern)  # tables made once per device
    module = topk_mod._prefill_info(pattern)[0]
    launches, inside = [], []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside:  # (the interpreter's own tensor work inside a launch is not the library's)
                launches.append(str(func))
            return func(*args, **(kwargs or {}))

    kernels = {name: getattr(module, name) for name in ("pool_kernel", "select_kernel")}

    class Count:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def run(*a, **kw):
                launches.append(self.name)
                inside.append(1)
                try:
                    return kernels[self.name][grid](*a, **kw)
                finally:
                    inside.pop()
            return run

    try:
        for name in kernels:
            setattr(module, name, Count(name))
        with Ops():
            select_blocks(q, k, pattern)
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
    assert [x for x in launches if not x.startswith("aten.empty")] == ["pool_kernel", "select_kernel"], launches
    assert sum(x.startswith("aten.empty") for x in launches) == 2


@pytest.mark.parametrize("merge, long_first, lq", [("insert", True, 150), ("insert", False, 150),
                                                   ("extract", False, 150), ("bitonic", True, 16)])
def test_running_top_k_over_many_kv_tiles_matches_brute_force(merge, long_first, lq):
    """Hundreds of kv blocks (several 64-block tiles per row, so the running list is merged tile after
    tile), few distinct scores (ties across tiles), a decode-like tail (q shorter than k) and two
    K: both merges of select_kernel, and either launch order, pick what brute force picks."""
    pattern = s2dsl.parse("pattern p { block = 16 heads = 2 kv_heads = 1 heads 0..0 { window 2 sink 1 topk 3 } "
                          "heads 1..1 { window 3 topk 37 } }")["p"]
    q, k = _exact_inputs(pattern, 1, 16 * lq, 16 * 200, 16, seed=5, per_block=True)
    want = _brute(pattern, q, k)
    module = topk_mod._prefill_info(pattern)[0]
    saved = module.SELECT_MERGE, module.LONG_FIRST
    module.SELECT_MERGE, module.LONG_FIRST = merge, long_first
    try:
        got = select_blocks(q, k, pattern)
    finally:
        module.SELECT_MERGE, module.LONG_FIRST = saved
    assert (want[0, 1, -1] >= 0).sum() == 37 and torch.equal(got, want)


def test_select_blocks_refuses_tensors_the_kernels_would_misread():
    """The generated selection takes heads, kv heads and head dim from the pattern and the
    shapes unchecked: q with another head count, k with another batch or head dim, or mixed
    dtypes are refused before any launch."""
    from s2dsl.runtime.validate import InputError
    pattern = s2dsl.parse("pattern s { block = 16 heads = 4 kv_heads = 2 causal heads * { window 2 topk 2 } }")["s"]
    q, k = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16)
    assert select_blocks(q, k, pattern).shape[1] == 4
    for bad_q, bad_k in ((torch.randn(1, 8, 64, 16), k), (q, torch.randn(2, 2, 64, 16)),
                         (q, torch.randn(1, 2, 64, 32)), (q, k.half())):
        with pytest.raises(InputError):
            select_blocks(bad_q, bad_k, pattern)
