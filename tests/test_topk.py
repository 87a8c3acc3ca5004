"""Dynamic top-k heads: selection, the generated forward and backward with a selection, decode.

Kernels run under the Triton interpreter (TRITON_INTERPRET=1); tests/test_gpu_topk.py runs
bf16 on the GPU. The reference is always given the same selection the kernels used.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import s2dsl
from s2dsl.codegen.forward import Specialization, generate_forward
from s2dsl.codegen.lower import lower
from s2dsl.runtime.attention import InputError
from s2dsl.runtime.topk import pooled_blocks, select_blocks, selection_shape, transpose_selection

from kernel_strategies import head_body, random_inputs
from serving_helpers import replay_selection

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 1.5e-2}


@st.composite
def topk_patterns(draw, block: int = 16, causal=None):
    """Random patterns where some heads add ``topk K`` (K possibly depending on h) to static parts."""
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.integers(1, 2))
    split = draw(st.integers(0, heads - 1))
    ranges = [(0, split)] + ([(split + 1, heads - 1)] if split + 1 < heads else [])
    bodies = []
    for n, (a, b) in enumerate(ranges):
        body = draw(head_body(heads)) if draw(st.booleans()) else ""
        if n == 0 or draw(st.booleans()):
            k = draw(st.sampled_from(["1", "2", "3", "h + 1", "3 - h % 2"]))
            body += f" topk {k}" + (f" recent {draw(st.integers(1, 4))}" if draw(st.booleans()) else "")
        bodies.append(f"heads {a}..{b} {{ {body.strip() or 'window 1'} }}")
    mode = "causal" if (draw(st.booleans()) if causal is None else causal) else "bidirectional"
    text = f"pattern p {{ block = {block} heads = {heads} kv_heads = {kv_heads} {mode} {' '.join(bodies)} }}"
    return s2dsl.parse(text)["p"]


def _ks(pattern):
    return [p.topk for p in lower(pattern).params]


# ------------------------------------------------------------------ selection
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=topk_patterns(), data=st.data())
def test_selection_is_the_top_k_outside_the_static_set(pattern, data):
    """Every row holds min(K, candidates) distinct blocks, none static or causally forbidden, and
    they are the candidates with the highest block-pooled score."""
    lk = data.draw(st.integers(1, 90), label="kv_len")
    lq = data.draw(st.integers(1, lk), label="q_len")
    q, k, _ = random_inputs(2, pattern.heads, pattern.kv_heads, lq, lk, 16, torch.float32, seed=lk * 7 + lq)
    sel = select_blocks(q, k, pattern)
    shape, first = selection_shape(pattern, 2, lq, lk)
    assert tuple(sel.shape) == shape and sel.dtype == torch.int32
    n_cols = -(-lk // pattern.block)
    qp = pooled_blocks(q, pattern.block, lk - lq)
    kp = pooled_blocks(k, pattern.block).repeat_interleave(pattern.group_size, dim=1)
    scores = qp @ kp.transpose(-1, -2)
    for b in range(2):
        for h, kh in enumerate(_ks(pattern)):
            for r in range(shape[2]):
                i = first + r
                row = sel[b, h, r].tolist()
                picked = [j for j in row if j >= 0]
                assert all(j == -1 for j in row[len(picked):]), "unused slots come last"
                cands = [j for j in range(n_cols) if not pattern.keeps(h, i, j)
                         and not (pattern.causal and j > i)]
                assert len(set(picked)) == len(picked) == min(kh, len(cands))
                assert set(picked) <= set(cands)
                rest = [j for j in cands if j not in picked]
                if picked and rest:
                    worst = min(scores[b, h, r, j].item() for j in picked)
                    assert worst >= max(scores[b, h, r, j].item() for j in rest) - 1e-5


def test_per_head_k_uses_h_end_to_end():
    pattern = s2dsl.parse("pattern p { block = 16 heads = 4 kv_heads = 2 heads * { window 1 topk h + 1 } }")["p"]
    assert _ks(pattern) == [1, 2, 3, 4]
    q, k, v = random_inputs(1, 4, 2, 96, 96, 16, torch.float32, seed=3)
    out, sel = s2dsl.attention(q, k, v, pattern, return_selection=True)
    assert sel.shape == (1, 4, 6, 4)
    for h in range(4):
        counts = (sel[0, h] >= 0).sum(-1).tolist()
        assert counts == [min(h + 1, i) for i in range(6)]  # query block i has i candidates below the diagonal
    torch.testing.assert_close(out, s2dsl.reference_attention(q, k, v, pattern, selection=sel),
                               atol=TOL[torch.float32], rtol=TOL[torch.float32])


def test_two_topk_components_in_one_head_are_a_semantic_error():
    from s2dsl.errors import S2SemanticError
    src = "pattern p {\n  block = 16 heads = 2\n  heads * { window 1 topk 2 topk 3 recent 4 }\n}\n"
    with pytest.raises(S2SemanticError) as info:
        s2dsl.parse(src, "two.s2")
    text = str(info.value)
    assert "2 'topk' components" in text and "two.s2:3:" in text and "merge them" in text


def test_static_patterns_generate_the_same_code_as_before():
    """The topk section is generated only for plans with topk heads."""
    static = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=4, heads=4, kv_heads=2)
    plan = lower(static)
    assert not plan.has_topk and plan.table_width == 4 + max(plan.max_residues, 1)
    src = generate_forward(plan, Specialization(block_m=16, block_n=16))
    assert "Sel" not in src and "static_keeps" not in src
    dyn = s2dsl.parse("pattern p { block = 16 heads = 1 heads * { window 1 topk 2 } }")["p"]
    assert "Sel" in generate_forward(lower(dyn), Specialization(block_m=16, block_n=16))


# ------------------------------------------------------------------ forward
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=topk_patterns(), data=st.data())
def test_forward_matches_reference_with_the_same_selection(pattern, data):
    lk = data.draw(st.integers(1, 90), label="kv_len")
    lq = data.draw(st.integers(1, lk), label="q_len")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype")
    layout = data.draw(st.sampled_from(["bhsd", "bshd"]), label="layout")
    q, k, v = random_inputs(2, pattern.heads, pattern.kv_heads, lq, lk, 16, dtype, layout, seed=lk * 31 + lq)
    out, lse, sel = s2dsl.attention(q, k, v, pattern, layout=layout, return_lse=True, return_selection=True)
    bhsd = (lambda t: t) if layout == "bhsd" else (lambda t: t.transpose(1, 2))
    ref, ref_lse = s2dsl.reference_attention(bhsd(q), bhsd(k), bhsd(v), pattern, selection=sel, return_lse=True)
    assert torch.isfinite(bhsd(out).float()).all()
    torch.testing.assert_close(bhsd(out).float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("tuning", [{"kv_load": "tma", "window_span": 1}, {"kv_load": "tma", "num_stages": 2},
                                    {"window_span": 1, "block_n": 16}])
def test_forward_tile_variants_visit_the_same_selection(tuning):
    """The GPU variants bench_topk times for top-k plans (tensor-descriptor loads, one block per
    window step, fewer stages: 64-row tiles that fit two programs per SM on sm_90) against the
    reference with the same selection, a ragged length and a past (q shorter than k)."""
    from s2dsl.runtime.attention import forward
    pattern = s2dsl.parse("pattern p { block = 16 heads = 4 kv_heads = 2 causal "
                          "heads * { window 2 sink 1 topk 2 recent 4 } }")["p"]
    for lq, lk in ((75, 75), (29, 83)):
        q, k, v = random_inputs(2, 4, 2, lq, lk, 16, torch.float16, "bhsd", seed=lq + lk)
        sel = select_blocks(q, k, pattern)
        out = torch.full_like(q, float("nan"))
        _, lse = forward(q, k, v, pattern, selection=sel, tuning=dict(tuning, block_m=16), out=out)
        ref, ref_lse = s2dsl.reference_attention(q, k, v, pattern, selection=sel, return_lse=True)
        torch.testing.assert_close(out.float(), ref, atol=TOL[torch.float16], rtol=TOL[torch.float16])
        torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)


def test_a_given_selection_is_used_and_bad_ones_are_refused():
    pattern = s2dsl.parse("pattern p { block = 16 heads = 2 kv_heads = 1 heads * { window 1 sink 1 topk 2 } }")["p"]
    q, k, v = random_inputs(1, 2, 1, 64, 80, 16, torch.float32, seed=5)
    sel = torch.full((1, 2, 4, 2), -1, dtype=torch.int32)  # query blocks 1..4
    sel[0, 0, 2] = torch.tensor([1, -1])       # block 3 keeps 0 (sink) and 3 (window): add 1
    sel[0, 1, 3] = torch.tensor([2, 1])
    out = s2dsl.attention(q, k, v, pattern, selection=sel)
    torch.testing.assert_close(out, s2dsl.reference_attention(q, k, v, pattern, selection=sel), atol=2e-5, rtol=2e-5)
    bad = {"static": (0, 0, 2, 0, 0), "causal": (0, 0, 1, 0, 3), "range": (0, 0, 3, 0, 9),
           "repeat": (0, 1, 3, 1, 2)}
    for what, (b, h, r, t, j) in bad.items():
        wrong = sel.clone()
        wrong[b, h, r, t] = j
        with pytest.raises(InputError):
            s2dsl.attention(q, k, v, pattern, selection=wrong)
    with pytest.raises(InputError, match="shape"):
        s2dsl.attention(q, k, v, pattern, selection=sel[:, :, :3])
    gap = sel.clone()
    gap[0, 0, 2] = torch.tensor([-1, 1])
    with pytest.raises(InputError, match="first"):
        s2dsl.attention(q, k, v, pattern, selection=gap)
    static = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=4, heads=2, kv_heads=1)
    with pytest.raises(ValueError, match="no topk"):
        s2dsl.attention(q, k, v, static, selection=sel)


# ------------------------------------------------------------------ backward
def _reference_grads(q, k, v, do, pattern, sel):
    qd, kd, vd = (t.detach().to(torch.float64).requires_grad_() for t in (q, k, v))
    s2dsl.reference_attention(qd, kd, vd, pattern, selection=sel, dtype=torch.float64).backward(do.double())
    return qd.grad, kd.grad, vd.grad


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=topk_patterns(), data=st.data())
def test_backward_matches_autograd_with_the_selection_held_fixed(pattern, data):
    lk = data.draw(st.integers(1, 70), label="kv_len")
    lq = data.draw(st.integers(1, lk), label="q_len")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype")
    q, k, v, do = random_inputs(data.draw(st.integers(1, 2), label="batch"), pattern.heads, pattern.kv_heads,
                                lq, lk, 16, dtype, seed=lk * 17 + lq, grad_out=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, sel = s2dsl.attention(q, k, v, pattern, return_selection=True)
    out.backward(do)
    want = _reference_grads(q, k, v, do, pattern, sel)
    for name, t, r in zip("qkv", (q, k, v), want):
        assert torch.isfinite(t.grad).all(), f"d{name}: NaN/inf"
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        torch.testing.assert_close(t.grad.double(), r, atol=GRAD_TOL[dtype] * scale, rtol=GRAD_TOL[dtype],
                                   msg=lambda m: f"d{name}: {m}")


def test_transposed_selection_lists_each_entry_once_in_order():
    sel = torch.tensor([[[[1, -1], [0, 1], [2, 0]]]], dtype=torch.int32)  # 1 batch, 1 head, 3 rows
    off, rows = transpose_selection(sel, 4, first_block=2)
    lists = [rows[off[j]:off[j + 1]].tolist() for j in range(4)]
    assert lists == [[3, 4], [2, 3], [4], []]


def test_backward_is_deterministic():
    pattern = s2dsl.parse("pattern p { block = 16 heads = 2 kv_heads = 1 heads * { window 1 topk 3 } }")["p"]
    q, k, v, do = random_inputs(1, 2, 1, 80, 80, 16, torch.float32, seed=9, grad_out=True)
    grads = []
    for _ in range(2):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        s2dsl.attention(qq, kk, vv, pattern).backward(do)
        grads.append((qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("estimator", ["pooled", "last_row"])
def test_packed_batches_select_per_sequence_and_train(estimator):
    """cu_seqlens batches (different lengths, chunked queries): each sequence's selection is the one
    it gets alone, the output and the gradients are each sequence's reference with it; a given
    selection is checked against each sequence's own lengths."""
    pattern = s2dsl.parse("pattern p { block = 16 heads = 4 kv_heads = 2 "
                          "heads 0..1 { window 1 topk h + 1 } heads 2..3 { sink 1 topk 2 recent 2 } }")["p"]
    lens = [(50, 50), (7, 70), (33, 40)]  # (queries, keys) per sequence
    parts = [random_inputs(1, 4, 2, lq, lk, 16, torch.float32, seed=lq + lk, grad_out=True) for lq, lk in lens]
    q, do = (torch.cat([p_[i][0].transpose(0, 1) for p_ in parts]) for i in (0, 3))
    k, v = (torch.cat([p_[i][0].transpose(0, 1) for p_ in parts]) for i in (1, 2))
    cu_q = torch.tensor([0, 50, 57, 90], dtype=torch.int32)
    cu_k = torch.tensor([0, 50, 120, 160], dtype=torch.int32)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, sel = s2dsl.attention(q, k, v, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_selection=True,
                               topk_estimator=estimator)
    out.backward(do)
    assert sel.shape == (3, 4, 4, 2)  # the longest: 50 queries over 50 keys, 4 query blocks
    for b, ((lq, lk), (qb, kb, vb, dob)) in enumerate(zip(lens, parts)):
        alone = select_blocks(qb, kb, pattern, estimator=estimator)
        rows = alone.shape[2]
        assert torch.equal(sel[b, :, :rows], alone[0]) and (sel[b, :, rows:] == -1).all()
        qd, kd, vd = (t.double().requires_grad_() for t in (qb, kb, vb))
        ref = s2dsl.reference_attention(qd, kd, vd, pattern, selection=alone, dtype=torch.float64)
        ref.backward(dob.double())
        sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        torch.testing.assert_close(out[sq].transpose(0, 1).unsqueeze(0).double(), ref, atol=2e-5, rtol=2e-5)
        for got, want in ((q.grad[sq], qd.grad), (k.grad[sk], kd.grad), (v.grad[sk], vd.grad)):
            torch.testing.assert_close(got.transpose(0, 1).unsqueeze(0).double(), want, atol=1e-4, rtol=1e-4)
    replay = s2dsl.attention(q.detach(), k.detach(), v.detach(), pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                             selection=sel)
    torch.testing.assert_close(replay, out.detach())
    bad = sel.clone()
    bad[1, 0, 3, 0] = 0  # sequence 1 has one query block: its later rows must stay unused
    with pytest.raises(InputError, match="unused"):
        s2dsl.attention(q.detach(), k.detach(), v.detach(), pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                        selection=bad)
    with pytest.raises(InputError, match="shape"):
        s2dsl.attention(q.detach(), k.detach(), v.detach(), pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                        selection=sel[:, :, :3])


# ------------------------------------------------------------------ decode
DECODE_PATTERNS = {
    # ALISA's sparse window attention: recent window + top-k by the mass of the last 3 steps;
    # kv head 1 has K 1 < K max 2, kv head 2 is static
    "alisa-gqa": "pattern p { block = 16 heads = 6 kv_heads = 3 heads 0..1 { window 1 topk 2 recent 3 } "
                 "heads 2..3 { window 1 topk 1 recent 2 } heads 4..5 { window 2 sink 1 } }",
    # per-head K with h, mixed with sinks and strides, one static head, no recent (all steps)
    "mixed": "pattern p { block = 16 heads = 4 kv_heads = 2 heads 0..2 { sink 1 topk h + 1 } "
             "heads 3..3 { window 2 stride 3 } }",
}




def _block_mass(pattern, q, k, sel):
    """Attention mass per (kv head, block) of the last query, from the reference with this selection."""
    lq, lk = q.shape[2], k.shape[2]
    mask = pattern.token_mask(lq, lk, selection=sel)[0, :, -1]                     # (heads, lk)
    kf = k[0].repeat_interleave(pattern.group_size, 0)
    logits = (q[0, :, -1:] @ kf.transpose(-1, -2))[:, 0] / q.shape[-1] ** 0.5
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    n_blocks = -(-lk // pattern.block)
    probs = torch.nn.functional.pad(probs, (0, n_blocks * pattern.block - lk))
    return probs.view(pattern.kv_heads, pattern.group_size, n_blocks, pattern.block).sum((1, 3))


def _seed_mass(pattern, q, k):
    """The seed's dense mass per (kv head, block): the prompt's last rows, all keys, summed over the group."""
    from s2dsl.runtime.topk_state import OBSERVATION_ROWS
    n = k.shape[2]
    rows = min(OBSERVATION_ROWS, n)
    kf = k[0].repeat_interleave(pattern.group_size, 0)
    logits = (q[0, :, n - rows:] @ kf.transpose(-1, -2)) / q.shape[-1] ** 0.5           # (heads, rows, n)
    logits = logits.masked_fill(torch.arange(n).view(1, -1) > torch.arange(n - rows, n).view(-1, 1), float("-inf"))
    probs = torch.softmax(logits, -1).sum(1)
    n_blocks = -(-n // pattern.block)
    probs = torch.nn.functional.pad(probs, (0, n_blocks * pattern.block - n))
    return probs.view(pattern.kv_heads, pattern.group_size, n_blocks, pattern.block).sum((1, 3))


def _kept(mass, i_last, wcap, sel):
    """What a ring row keeps of a step's mass: the window range and the selection, 0 elsewhere."""
    out = torch.zeros_like(mass)
    for g in range(mass.shape[0]):
        cols = list(range(max(i_last - wcap + 1, 0), i_last + 1)) + [j for j in sel[g].tolist() if j >= 0]
        for j in set(cols):
            if j < mass.shape[1]:
                out[g, j] = mass[g, j]
    return out


@pytest.mark.parametrize("name", list(DECODE_PATTERNS))
def test_decode_replays_the_selection_and_scores_the_last_steps(name):
    """Prefill, then decode steps (and a 3-token chunk) through cached_attention: each output
    matches the reference given the selection the step used; the running scores are the
    reference's block masses of the last R steps (the seed's first), kept on the window range
    and the selection (without recent: every step, the seed in full); the next selection is
    the top K of that score outside the static set."""
    from s2dsl.runtime.kv_cache import PagedKVCache
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.topk_state import state_for

    pattern = s2dsl.parse(DECODE_PATTERNS[name])["p"]
    ks = _ks(pattern)
    splits = 3 if name == "mixed" else 1  # split-KV: the selected blocks spread over the splits too
    with pytest.warns(UserWarning, match="KV-efficient"):
        cache = PagedKVCache(pattern, num_pages=64, head_dim=16, dtype=torch.float32, max_seqs=2)
    total = 70
    q, k, v = random_inputs(2, pattern.heads, pattern.kv_heads, total, total, 16, torch.float32, seed=11)
    ids = [cache.add_sequence(), cache.add_sequence()]
    prompt = 37
    out = cached_attention(cache, ids, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    sel = select_blocks(q[:, :, :prompt], k[:, :, :prompt], pattern)
    torch.testing.assert_close(out, s2dsl.reference_attention(q[:, :, :prompt], k[:, :, :prompt],
                                                              v[:, :, :prompt], pattern, selection=sel),
                               atol=2e-5, rtol=2e-5)
    state = state_for(cache)
    width = state.width
    members = [range(g * pattern.group_size, (g + 1) * pattern.group_size) for g in range(pattern.kv_heads)]
    recent = [max(lower(pattern).params[h].recent for h in m) for m in members]
    history = [[], []]  # per sequence: (kept mass, full mass) per step, the seed first, (kv_heads, width)
    for b, s in enumerate(ids):
        seed = torch.nn.functional.pad(_seed_mass(pattern, q[b:b + 1, :, :prompt], k[b:b + 1, :, :prompt]),
                                       (0, width - -(-prompt // pattern.block)))
        history[b].append((_kept(seed, (prompt - 1) // pattern.block, state.wcap, state.selection[cache.slot(s)]),
                           seed))
    pos = prompt
    steps = [1] * 10 + [3] + [1] * 14  # the last queries have more candidates than K
    for n in steps:
        before = state.selection[[cache.slot(s) for s in ids]].clone()
        out = cached_attention(cache, ids, q[:, :, pos:pos + n], k[:, :, pos:pos + n], v[:, :, pos:pos + n],
                               n_splits=splits)
        pos += n
        scores = state.running_scores(torch.tensor([cache.slot(s) for s in ids]))
        for b, s in enumerate(ids):
            first = (pos - n) // pattern.block
            replay = replay_selection(pattern, before[b], (pos - 1) // pattern.block - first + 1)
            qb, kb, vb = q[b:b + 1, :, pos - n:pos], k[b:b + 1, :, :pos], v[b:b + 1, :, :pos]
            ref = s2dsl.reference_attention(qb, kb, vb, pattern, selection=replay)
            torch.testing.assert_close(out[b:b + 1], ref, atol=2e-5, rtol=2e-5)
            # the by-product: this step's mass per (kv head, block), as the reference computes it
            mass = torch.nn.functional.pad(_block_mass(pattern, qb, kb, replay), (0, width - -(-pos // pattern.block)))
            history[b].append((_kept(mass, (pos - 1) // pattern.block, state.wcap, before[b]), mass))
            i = pos // pattern.block
            now = state.selection[cache.slot(s)]
            for g in range(pattern.kv_heads):
                kg = max(ks[h] for h in members[g])
                if not kg:  # no q head would read them: nothing selected, no page loaded
                    assert now[g].tolist() == [-1] * state.k_max
                    continue
                r = recent[g]
                want = sum(x[0][g] for x in history[b][-r:]) if r else sum(
                    x[0][g] for x in history[b][1:]) + history[b][0][1][g]
                # sinks and residue blocks are static for good: their mass is not kept
                ever = torch.tensor([not any(pattern.keeps(h, j + 10 ** 6, j) for h in members[g])
                                     for j in range(width)])
                torch.testing.assert_close(scores[b, g][ever], want[ever], atol=1e-5, rtol=1e-4)
                # the next selection: the top K of the running score outside the union's static set
                cands = [j for j in range(i + 1) if not any(pattern.keeps(h, i, j) for h in members[g])]
                picked = [j for j in now[g].tolist() if j >= 0]
                assert len(set(picked)) == len(picked) == min(kg, len(cands))
                assert set(picked) <= set(cands)
                rest = [want[j].item() for j in cands if j not in picked]
                if picked and rest:
                    assert min(want[j].item() for j in picked) >= max(rest) - 1e-6
    # a removed sequence's slot starts afresh for the next one
    slot = cache.slot(ids[0])
    cache.remove_sequence(ids[0])
    fresh = cache.add_sequence()
    assert cache.slot(fresh) == slot
    out = cached_attention(cache, [fresh], q[:1, :, :1], k[:1, :, :1], v[:1, :, :1])
    torch.testing.assert_close(out, s2dsl.reference_attention(q[:1, :, :1], k[:1, :, :1], v[:1, :, :1], pattern))


@pytest.mark.parametrize("scoring", ["recent 2", pytest.param("by bound", marks=pytest.mark.slow)])
def test_hf_generation_with_a_topk_plan_that_reaches_every_block_equals_dense(scoring):
    """Through hf.S2Cache (prefill kernel, then decode steps with selections): top-k with K above
    the number of candidate blocks attends like dense attention, so greedy tokens match SDPA's."""
    pytest.importorskip("transformers")
    import warnings
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
    from s2dsl.integrations import hf

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    plan = s2dsl.parse(f"pattern t {{ block = 16 heads = 4 kv_heads = 2 heads * {{ window 1 topk 8 {scoring} }} }} "
                       "model tiny { layers = 2 rest -> t }")
    hf.apply(model, plan, model_name="tiny")
    ids = torch.randint(0, 100, (2, 37), generator=torch.Generator().manual_seed(2))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # topk heads keep every page (not KV-efficient)
        model.set_attn_implementation("sdpa")
        ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
        model.set_attn_implementation(hf.ATTN_IMPLEMENTATION)
        out = model.generate(ids, past_key_values=hf.S2Cache(model, max_length=37 + 12, batch_size=2), **kw)
    assert torch.equal(out, ref)


def test_torch_compile_traces_topk_without_graph_break():
    pattern = s2dsl.parse("pattern p { block = 16 heads = 2 kv_heads = 1 heads * { window 1 topk 2 } }")["p"]
    q, k, v = random_inputs(1, 2, 1, 48, 48, 16, torch.float32, seed=4)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        out, sel = s2dsl.attention(q, k, v, pattern, return_selection=True)
        return out * 2, sel

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, sel = compiled(q, k, v)
    want, want_sel = f(q, k, v)
    assert torch.equal(sel, want_sel)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("tuning", [{"one_grid": True, "flat_steps": True, "block_m": 16},
                                    {"two_streams": True, "dkdv_unroll_group": True, "order": "tile_major"}])
def test_backward_launch_shapes_with_topk(tuning):
    """The GPU's launch shape (dK/dV and dQ programs in one grid, flat query steps) and the others."""
    from s2dsl.runtime.attention import forward
    from s2dsl.runtime.backward import backward

    pattern = s2dsl.parse("pattern p { block = 32 heads = 4 kv_heads = 2 "
                          "heads 0..1 { window 1 topk h + 1 } heads 2..3 { stride 3 offset h topk 2 } }")["p"]
    q, k, v, do = random_inputs(1, 4, 2, 70, 100, 16, torch.float32, seed=8, grad_out=True)
    sel = select_blocks(q, k, pattern)
    out, lse = forward(q, k, v, pattern, selection=sel)
    got = backward(q, k, v, out, lse, do, pattern, selection=sel, tuning=tuning)
    want = _reference_grads(q, k, v, do, pattern, sel)
    for name, g, r in zip("qkv", got, want):
        torch.testing.assert_close(g.double(), r, atol=1e-4 * max(1.0, r.abs().max().item()), rtol=1e-4,
                                   msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("lq,lk,causal", [(80, 80, True), (37, 90, True), (50, 70, False)])
def test_last_row_estimator_picks_the_blocks_the_last_query_attends_most(lq, lk, causal):
    mode = "causal" if causal else "bidirectional"
    pattern = s2dsl.parse(f"pattern p {{ block = 16 heads = 4 kv_heads = 2 {mode} "
                          "heads 0..1 { window 1 topk 2 } heads 2..3 { sink 1 topk h - 1 } }")["p"]
    q, k, _ = random_inputs(1, 4, 2, lq, lk, 16, torch.float32, seed=lk + lq)
    sel = select_blocks(q, k, pattern, estimator="last_row")
    shape, first = selection_shape(pattern, 1, lq, lk)
    kf = k.repeat_interleave(2, dim=1)
    for h, kh in enumerate(_ks(pattern)):
        for r in range(shape[2]):
            i = first + r
            p = min((i + 1) * 16, lk) - 1
            logits = (q[0, h, p - (lk - lq)] @ kf[0, h].T) / 4.0
            if causal:
                logits[p + 1:] = float("-inf")
            mass = torch.nn.functional.pad(torch.softmax(logits, -1), (0, -lk % 16)).view(-1, 16).sum(-1)
            cands = [j for j in range(-(-lk // 16)) if not pattern.keeps(h, i, j) and not (causal and j > i)]
            picked = [j for j in sel[0, h, r].tolist() if j >= 0]
            assert len(picked) == min(kh, len(cands)) and set(picked) <= set(cands)
            rest = [mass[j].item() for j in cands if j not in picked]
            if picked and rest:
                assert min(mass[j].item() for j in picked) >= max(rest) - 1e-6
    with pytest.raises(ValueError, match="estimator"):
        select_blocks(q, k, pattern, estimator="antidiagonal")


def test_quality_study_recovery_is_bounded_by_its_oracles():
    """examples/topk_quality.py's measure: shares in [0, 1], a pattern keeping everything recovers
    all, and pooled top-k <= the best blocks (block oracle) <= the best tokens (token oracle)."""
    import sys
    from conftest import EXAMPLES
    sys.path.insert(0, str(EXAMPLES))
    import topk_quality as tq

    cfg = tq.tt.CONFIGS["cpu"]
    g = torch.Generator().manual_seed(0)
    captured = [(torch.randn(2, cfg.heads, cfg.seq, 16, generator=g) * 2,
                 torch.randn(2, cfg.heads, cfg.seq, 16, generator=g)) for _ in range(2)]
    everything = s2dsl.parse(f"pattern a {{ block = {cfg.block} heads = {cfg.heads} "
                             f"heads * {{ window {cfg.n_blocks} }} }}")["a"]
    full = tq.recovery(cfg, captured, everything, cfg.block)["kept"]
    assert all(abs(x - 1.0) < 1e-5 for layer in full for x in layer)
    for sparsity in (0.5, 0.8):
        pats = tq.method_patterns(cfg, sparsity)
        for est in ("pooled", "last_row", "bound"):
            rec = tq.recovery(cfg, captured, pats["window+topk"], cfg.block, est)
            for kept, block, token in zip(*(torch.tensor(rec[n]).flatten() for n in
                                            ("kept", "block_oracle", "token_oracle"))):
                assert 0.0 <= kept <= block + 1e-5 <= token + 2e-5 <= 1.0 + 3e-5
