"""Dynamic top-k on the GPU: bf16 forward, backward and decode against the float32 / float64
reference given the same selection; outputs poisoned with NaN first. Skipped without CUDA."""
from __future__ import annotations

import warnings

import pytest
import torch

import s2dsl
from s2dsl.runtime.attention import forward
from s2dsl.runtime.backward import backward
from s2dsl.runtime.topk import select_blocks

pytestmark = pytest.mark.gpu

# ALISA's sparse window attention at the DESIGN.md block size; per-head K with h; GQA
ALISA = s2dsl.parse("""
pattern alisa {
    block = 64  heads = 32  kv_heads = 8
    heads * { window 4  sink 1  topk 8 recent 16 }
}""")["alisa"]
MIXED = s2dsl.parse("""
pattern mixed {
    block = 64  heads = 16  kv_heads = 4
    heads 0..7 { window 2  topk 2 + h % 4 }
    heads 8..11 { window 8  stride 4 offset h }
    heads 12..15 { topk 6 }
}""")["mixed"]
BIDIR = s2dsl.parse("""
pattern bidir_topk {
    block = 32  heads = 8  bidirectional
    heads * { window 2  topk 4 }
}""")["bidir_topk"]


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _inputs(pattern, b, lq, lk, d, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(b, pattern.heads, lq, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, pattern.kv_heads, lk, d, device="cuda", dtype=dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("pattern", [ALISA, MIXED, BIDIR], ids=lambda p: p.name)
@pytest.mark.parametrize("lq,lk", [(3000, 3000), (333, 2000), (1, 4097)])
def test_forward_bf16_matches_reference(pattern, lq, lk):
    q, k, v = _inputs(pattern, 2, lq, lk, 128)
    sel = select_blocks(q, k, pattern)
    out = torch.full_like(q, float("nan"))
    out, lse = forward(q, k, v, pattern, out=out, selection=sel)
    ref, ref_lse = s2dsl.reference_attention(q, k, v, pattern, selection=sel, return_lse=True)
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < 1e-2
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("pattern", [ALISA, MIXED], ids=lambda p: p.name)
def test_generated_prefill_selection_variants_pick_the_same_blocks(pattern):
    """select_kernel's running top-K merges (bitonic, insert, extract) and launch orders, on bf16 inputs long
    enough for many kv tiles per row: identical selections, order included (the same float32 keys);
    the tf32x3 dot: the same picks but for near-ties."""
    from s2dsl.runtime import topk as topk_mod

    q, k, _ = _inputs(pattern, 1, 12000, 16384, 128, seed=9)
    module = topk_mod._prefill_info(pattern)[0]
    saved = module.SELECT_MERGE, module.LONG_FIRST, module.SELECT_DOT
    got = {}
    try:
        for variant in [("bitonic", True, "ieee"), ("insert", True, "ieee"), ("insert", False, "ieee"),
                        ("extract", False, "ieee"), ("bitonic", True, "tf32x3")]:
            module.SELECT_MERGE, module.LONG_FIRST, module.SELECT_DOT = variant
            got[variant] = select_blocks(q, k, pattern)
    finally:
        module.SELECT_MERGE, module.LONG_FIRST, module.SELECT_DOT = saved
    base = got[("bitonic", True, "ieee")]
    assert (base >= 0).sum() > 0
    for variant, sel in got.items():
        if variant[2] == "ieee":
            assert torch.equal(sel, base), variant
    assert torch.equal(base, select_blocks(q, k, pattern))  # the GPU's default (extract) too
    assert (got[("bitonic", True, "tf32x3")].sort(-1).values == base.sort(-1).values).float().mean() >= 0.99


@pytest.mark.parametrize("pattern", [ALISA, MIXED, BIDIR], ids=lambda p: p.name)
@pytest.mark.parametrize("lq,lk", [(3000, 3000), (333, 2000)])
def test_generated_prefill_selection_is_the_top_k_of_the_pooled_scores(pattern, lq, lk):
    """The generated pool / select kernels on bf16 inputs: per row, exactly min(K, candidates)
    distinct selectable blocks, none scoring below an unpicked candidate by more than float32
    rounding (pooled scores recomputed in float64), and the torch path agrees on >= 99% of them."""
    from s2dsl.codegen.lower import lower
    from s2dsl.runtime import topk as topk_mod

    q, k, _ = _inputs(pattern, 2, lq, lk, 128, seed=5)
    sel = select_blocks(q, k, pattern)
    shape, first = topk_mod.selection_shape(pattern, 2, lq, lk)
    n_cols = -(-lk // pattern.block)
    qp = topk_mod.pooled_blocks(q.double(), pattern.block, lk - lq)
    kp = topk_mod.pooled_blocks(k.double(), pattern.block).repeat_interleave(pattern.group_size, 1)
    scores = qp @ kp.transpose(-1, -2)                                              # (b, heads, rows, cols)
    i = torch.arange(shape[2], device="cuda").view(-1, 1) + first
    j = torch.arange(n_cols, device="cuda").view(1, -1)
    static = torch.stack([torch.tensor([[pattern.keeps(h, a, c) for c in range(n_cols)]
                                        for a in range(first, first + shape[2])], device="cuda")
                          for h in range(pattern.heads)])
    ok = ~static & ((j <= i) if pattern.causal else torch.ones_like(j <= i))         # (heads, rows, cols)
    ks = torch.tensor([p.topk for p in lower(pattern).params], device="cuda").view(1, -1, 1)
    picked = torch.zeros(*scores.shape[:-1], n_cols + 1, dtype=torch.bool, device="cuda")  # + a column for -1
    picked = picked.scatter_(-1, torch.where(sel >= 0, sel, n_cols).long(), True)[..., :n_cols]
    assert ((sel >= 0).sum(-1) == torch.minimum(ks, ok.sum(-1).unsqueeze(0))).all()
    assert not (picked & ~ok.unsqueeze(0)).any()
    worst = torch.where(picked, scores, float("inf")).amin(-1)
    best_rest = torch.where(~picked & ok.unsqueeze(0), scores, float("-inf")).amax(-1)
    assert (worst >= best_rest - 1e-4 * scores.abs().amax()).all()
    module = topk_mod._prefill_info(pattern)[0]
    saved, module.FUSED_K = module.FUSED_K, 0
    try:
        sel_torch = select_blocks(q, k, pattern)
    finally:
        module.FUSED_K = saved
    assert (sel.sort(-1).values == sel_torch.sort(-1).values).float().mean() >= 0.99


@pytest.mark.parametrize("lq,lk", [(3000, 3000), (333, 2000)])
def test_bound_prefill_estimator_bf16(lq, lk):
    """select_blocks(estimator="bound") on bf16 inputs (16-bit products): its picks' bounds are the top
    bounds by a float32 recomputation up to bf16 rounding, and the forward with them (NaN-poisoned)
    matches the float32 reference."""
    pattern = MIXED
    q, k, v = _inputs(pattern, 2, lq, lk, 128, seed=7)
    sel = select_blocks(q, k, pattern, estimator="bound")
    out = torch.full_like(q, float("nan"))
    out, _ = forward(q, k, v, pattern, out=out, selection=sel)
    ref = s2dsl.reference_attention(q, k, v, pattern, selection=sel)
    assert torch.isfinite(out).all() and _rel_err(out, ref) < 1e-2
    # mostly the blocks a float32 selection picks (bf16 products reorder near-ties only; a wrong
    # head or row mapping would overlap by about K / candidates, ~0.1 here)
    sel32 = select_blocks(q.float(), k.float(), pattern, estimator="bound")
    assert (sel >= 0).sum() == (sel32 >= 0).sum()
    shared = ((sel.unsqueeze(-1) == sel32.unsqueeze(-2)).any(-1) & (sel >= 0)).sum()
    assert shared >= 0.6 * (sel >= 0).sum()


@pytest.mark.parametrize("pattern", [ALISA, MIXED], ids=lambda p: p.name)
def test_backward_bf16_matches_float64_autograd(pattern):
    q, k, v = _inputs(pattern, 1, 1500, 1500, 64, seed=1)
    do = torch.randn_like(q)
    sel = select_blocks(q, k, pattern)
    out, lse = forward(q, k, v, pattern, selection=sel)
    dq, dk, dv = backward(q, k, v, out, lse, do, pattern, selection=sel)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    s2dsl.reference_attention(qd, kd, vd, pattern, selection=sel, dtype=torch.float64).backward(do.double())
    for name, got, want in (("dq", dq, qd.grad), ("dk", dk, kd.grad), ("dv", dv, vd.grad)):
        assert torch.isfinite(got).all(), name
        assert _rel_err(got, want) < 2e-2, name


def test_attention_api_returns_its_selection_and_trains():
    q, k, v = _inputs(ALISA, 1, 4096, 4096, 128, seed=2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, sel = s2dsl.attention(q, k, v, ALISA, return_selection=True)
    assert sel.shape == (1, 32, 64, 8) and sel.dtype == torch.int32
    out.float().square().mean().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_decode_bf16_replays_the_selection():
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.kv_cache import PagedKVCache
    from s2dsl.runtime.topk_state import state_for

    pattern = ALISA
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = PagedKVCache(pattern, num_pages=4096, head_dim=128, dtype=torch.bfloat16, device="cuda", max_seqs=4)
    total, prompt = 3000, 2900
    q, k, v = _inputs(pattern, 4, total, total, 128, seed=3)
    ids = [cache.add_sequence() for _ in range(4)]
    cached_attention(cache, ids, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    state = state_for(cache)
    slots = torch.tensor([cache.slot(s) for s in ids], device="cuda")
    for pos in range(prompt, total, 7):
        n = 1
        before = state.selection[slots].clone()
        out = cached_attention(cache, ids, q[:, :, pos:pos + n], k[:, :, pos:pos + n], v[:, :, pos:pos + n])
        assert torch.isfinite(out).all()
        for b in range(4):
            sel = torch.full((1, pattern.heads, 1, 8), -1, dtype=torch.int32, device="cuda")
            sel[0, :, 0] = before[b].repeat_interleave(pattern.group_size, 0)
            ref = s2dsl.reference_attention(q[b:b + 1, :, pos:pos + n], k[b:b + 1, :, :pos + n],
                                            v[b:b + 1, :, :pos + n], pattern, selection=sel)
            assert _rel_err(out[b:b + 1], ref) < 2e-2
        # feed the rest of the stride's tokens without checking
        for p in range(pos + 1, min(pos + 7, total)):
            cached_attention(cache, ids, q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1])


def test_topk_decode_step_captured_in_a_cuda_graph():
    """The whole top-k decode step (page plan, K/V write, kernel, score update, next selection)
    captured in a CUDA graph and replayed: the same selections as host-planned steps, outputs
    the reference given the selection each step used."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_topk_graph import _graph_steps

    _graph_steps("cuda", torch.bfloat16, capture=True, steps=40, prompt=200, d=64)


def test_bound_topk_decode_step_captured_in_a_cuda_graph():
    """As above with a 'topk ... by bound' kv head: its pages scored and picked inside the captured step."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_topk_graph import BOUND_GQA, _graph_steps

    _graph_steps("cuda", torch.bfloat16, capture=True, steps=40, prompt=200, d=64, text=BOUND_GQA)


QUEST = s2dsl.parse("""
pattern quest {
    block = 64  heads = 32  kv_heads = 8
    heads * { window 4  sink 1  topk 8 by bound }
}""")["quest"]


@pytest.mark.parametrize("d", [64, 128])
def test_bound_decode_bf16_picks_the_top_bounds_and_matches_reference(d):
    """bf16 'by bound' decode at GQA 4 (batch 4, ~3K tokens, a 5-token chunk among single steps):
    each step's pages are the top K of the q.k upper bound from the pages' key min / max (computed
    here in float32 from the keys), and the output (NaN-poisoned first) is the float32 reference
    given that selection."""
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.kv_cache import PagedKVCache
    from s2dsl.runtime.topk_state import state_for

    pattern = QUEST
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = PagedKVCache(pattern, num_pages=2048, head_dim=d, dtype=torch.bfloat16, device="cuda", max_seqs=4)
    total, prompt = 3000, 2900
    q, k, v = _inputs(pattern, 4, total, total, d, seed=4)
    ids = [cache.add_sequence() for _ in range(4)]
    cached_attention(cache, ids, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    state = state_for(cache)
    slots = torch.tensor([cache.slot(s) for s in ids], device="cuda")
    B, G = pattern.block, pattern.group_size
    pos = prompt
    for n in (1, 1, 5, 1, 1):
        out = torch.full_like(q[:, :, :n], float("nan"))
        out = cached_attention(cache, ids, q[:, :, pos:pos + n], k[:, :, pos:pos + n], v[:, :, pos:pos + n], out=out)
        pos += n
        assert torch.isfinite(out).all()
        used = state.selection[slots]
        i_last = (pos - 1) // B
        n_full = i_last  # blocks before the query's own (the window covers it anyway)
        keys = k[:, :, :n_full * B].float().view(4, pattern.kv_heads, n_full, B, d)
        lo, hi = keys.amin(3), keys.amax(3)                                              # (b, kv, blocks, d)
        qs = q[:, :, pos - n:pos].float().view(4, pattern.kv_heads, G * n, 1, d)
        bound = torch.maximum(qs * lo[:, :, None], qs * hi[:, :, None]).sum(-1).amax(2)  # (b, kv, blocks)
        cand = torch.ones(n_full, dtype=torch.bool, device="cuda")
        cand[0] = False                                        # the sink
        cand[max(0, i_last - 3):] = False                      # the window
        bound = bound.masked_fill(~cand, float("-inf"))
        for b in range(4):
            for g in range(pattern.kv_heads):
                got = used[b, g][used[b, g] >= 0].long()
                assert got.numel() == 8
                want = bound[b, g].topk(8).values
                # the same bounds, up to float rounding of near-ties
                torch.testing.assert_close(bound[b, g][got].sort().values, want.sort().values, atol=1e-2, rtol=1e-3)
            sel = torch.full((1, pattern.heads, i_last - (pos - n) // B + 1, 8), -1, dtype=torch.int32, device="cuda")
            sel[0] = used[b].repeat_interleave(G, 0).unsqueeze(1)
            ref = s2dsl.reference_attention(q[b:b + 1, :, pos - n:pos].float(), k[b:b + 1, :, :pos].float(),
                                            v[b:b + 1, :, :pos].float(), pattern, selection=sel)
            assert _rel_err(out[b:b + 1], ref) < 2e-2


def test_hf_decode_graph_with_a_topk_plan_captured():
    """bf16: a topk plan's whole model decode step captured by S2Cache.decode_graph gives the greedy
    tokens of generate() with host-planned steps (a few may differ in bf16 only where logits tie)."""
    import sys
    from pathlib import Path
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serving_helpers import tiny_llama
    from test_topk_graph import TOPK_PLAN, _hf_graph_vs_eager

    from s2dsl.integrations import hf
    plan = TOPK_PLAN.replace("block = 16", "block = 64")
    model = tiny_llama(plan, attn=hf.ATTN_IMPLEMENTATION).to("cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 100, (n,), generator=gen) for n in (230, 150)]  # RoPE table: 256
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, want = _hf_graph_vs_eager(model, prompts, 20, capture=True, device="cuda")
    assert (got == want).float().mean() >= 0.9, (got, want)
