"""The generated decode kernel over the paged cache against the dense reference, under the
Triton interpreter: every position of a generation, continuous batching, chunked prefill,
speculative steps, split-KV. Freed pages are poisoned with NaN after every step, so a kernel
that read a page the pattern does not need would fail.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import s2dsl
from s2dsl.runtime.attention import InputError
from s2dsl.runtime.decode import cached_attention, decode_source, choose_decode, paged_attention
from s2dsl.runtime.graphs import DecodeGraph
from s2dsl.runtime.kv_cache import OutOfPagesError, PagedKVCache, dense_pattern

from kernel_strategies import patterns

# CPU tests of the kernels under the Triton interpreter; the `gpu` tests at the end run on CUDA (bf16)
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
D = 16
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _pattern(text):
    return s2dsl.parse(text)["p"]


PHI = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=3, heads=4, kv_heads=2)
HETERO = _pattern("pattern p { block = 16 heads = 4 kv_heads = 2 causal "
                  "heads 0..0 { window 1 sink 1 stride 3 offset 1 } heads 1..1 { window 2 stride 2 } "
                  "heads 2..2 { dense } heads 3..3 { sink 2 stride 4 offset 3 stride 5 } }")
MULTI = _pattern("pattern p { block = 16 heads = 2 kv_heads = 1 causal "
                 "heads 0..0 { window 1 stride 3 } heads 1..1 { window 1 stride 3 offset 1 } }")
NO_WINDOW = _pattern("pattern p { block = 16 heads = 2 kv_heads = 2 causal heads * { sink 1 stride 3 offset h } }")
DENSE = dense_pattern(4, 1, 16)
MHA = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=2, heads=2)  # one row per program: no tl.dot


def _data(pattern, lengths, dtype=torch.float32, seed=0, device="cpu", d=D):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(1, h, n, d, generator=g).to(device, dtype)
                  for h in (pattern.heads, pattern.kv_heads, pattern.kv_heads))
            for n in lengths]


def _poison(cache):
    free = list(cache.free_pages)
    if free:
        cache.k_pages[free] = float("nan")
        cache.v_pages[free] = float("nan")


def _step(cache, ids, data, pos, n, **kw):
    """Attend n new tokens of every sequence in ``ids`` and compare each with the reference."""
    q = torch.cat([data[s][0][:, :, pos[s]:pos[s] + n] for s in ids])
    k = torch.cat([data[s][1][:, :, pos[s]:pos[s] + n] for s in ids])
    v = torch.cat([data[s][2][:, :, pos[s]:pos[s] + n] for s in ids])
    out = cached_attention(cache, ids, q, k, v, **kw)
    assert torch.isfinite(out).all(), "the kernel read a page it should not have"
    for b, s in enumerate(ids):
        qs, ks, vs = data[s]
        end = pos[s] + n
        ref = s2dsl.reference_attention(qs[:, :, pos[s]:end], ks[:, :, :end], vs[:, :, :end], cache.pattern)
        tol = TOL[q.dtype]
        if q.dtype == torch.bfloat16:  # relative error of the whole output
            err = ((out[b:b + 1].float() - ref).norm() / ref.norm()).item()
            assert err < tol, f"relative error {err} at {pos[s]}+{n}"
        else:
            torch.testing.assert_close(out[b:b + 1].float(), ref, atol=tol, rtol=tol)
        pos[s] = end
    _poison(cache)


@interpreter
@pytest.mark.parametrize("pattern,splits", [(PHI, 1), (HETERO, 2), (MULTI, 3), (NO_WINDOW, 1), (DENSE, 2), (MHA, 1)],
                         ids=["phi-1", "hetero-2", "multi-3", "no_window-1", "dense-2", "mha-1"])
def test_every_position_of_a_generation(pattern, splits):
    """Prefill, then one token at a time for two sequences of different lengths."""
    cache = PagedKVCache(pattern, num_pages=64, head_dim=D, dtype=torch.float32)
    ids = [cache.add_sequence(), cache.add_sequence()]
    data = dict(zip(ids, _data(pattern, [60, 40])))
    pos = dict.fromkeys(ids, 0)
    _step(cache, ids[:1], data, pos, 21)  # first prefill (prefill kernel; keeps only what is needed)
    _step(cache, ids[1:], data, pos, 5)
    while pos[ids[1]] < 40:
        _step(cache, ids, data, pos, 1, n_splits=splits)
    assert cache.pages_in_use == sum(len(b) for s in ids for b in cache.kept_blocks(s))


@interpreter
def test_continuous_batching():
    """Sequences join (with a prefill) and leave between decode steps; lengths all differ."""
    cache = PagedKVCache(PHI, num_pages=48, head_dim=D, dtype=torch.float32, max_seqs=2)
    data, pos, live = {}, {}, []
    plan = {0: [30], 4: [3, 17], 9: [1]}   # step -> prompt lengths of new sequences
    leave = {6: 0, 11: 1}                  # step -> index in live of a finished sequence
    for step in range(16):
        for n in plan.get(step, []):
            s = cache.add_sequence()
            data[s] = _data(PHI, [n + 20], seed=len(data))[0]
            pos[s] = 0
            _step(cache, [s], data, pos, n)
        if step in leave:
            cache.remove_sequence(live.pop(leave[step]))
        live = [s for s in cache.sequences]
        _step(cache, live, data, pos, 1, n_splits=1 + step % 2)
    for s in list(cache.sequences):
        cache.remove_sequence(s)
    assert cache.num_free_pages == 48


@interpreter
@pytest.mark.parametrize("pattern", [PHI, HETERO], ids=["phi", "hetero"])
def test_chunked_prefill_and_speculative_steps(pattern):
    """Chunks of prompt and a few tokens at a time attend to what the cache already holds."""
    cache = PagedKVCache(pattern, num_pages=64, head_dim=D, dtype=torch.float32)
    s = cache.add_sequence()
    data = {s: _data(pattern, [100])[0]}
    pos = {s: 0}
    for n, splits in [(7, 1), (19, 2), (33, 1), (3, 2), (1, 1), (4, 3), (2, 1)]:
        _step(cache, [s], data, pos, n, n_splits=splits)
    assert pos[s] == 69


@interpreter
def test_float16():
    cache = PagedKVCache(PHI, num_pages=32, head_dim=D, dtype=torch.float16)
    ids = [cache.add_sequence(), cache.add_sequence()]
    data = dict(zip(ids, _data(PHI, [50, 50], dtype=torch.float16)))
    pos = dict.fromkeys(ids, 0)
    _step(cache, ids, data, pos, 30)
    for _ in range(6):
        _step(cache, ids, data, pos, 3, n_splits=2)


@interpreter
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=patterns(causal=True), data=st.data())
def test_random_patterns(pattern, data):
    """Random heterogeneous patterns, random step sizes (prefill, chunks, single tokens), random splits."""
    cache = PagedKVCache(pattern, num_pages=128, head_dim=D, dtype=torch.float32)
    s = cache.add_sequence()
    seqs = {s: _data(pattern, [60], seed=data.draw(st.integers(0, 100), label="seed"))[0]}
    pos = {s: 0}
    while pos[s] < 40:
        n = data.draw(st.sampled_from([1, 1, 2, 5, 17]), label="step")
        _step(cache, [s], seqs, pos, n, n_splits=data.draw(st.integers(1, 4), label="splits"))


@interpreter
def test_out_of_pages_changes_nothing():
    cache = PagedKVCache(PHI, num_pages=6, head_dim=D, dtype=torch.float32)
    s = cache.add_sequence()
    data = {s: _data(PHI, [80])[0]}
    pos = {s: 0}
    _step(cache, [s], data, pos, 20)
    before = (cache.seq_len(s), cache.kept_blocks(s), cache.free_pages, cache.block_tables.clone())
    q, k, v = (t[:, :, 20:70] for t in data[s])
    with pytest.raises(OutOfPagesError):
        cached_attention(cache, [s], q, k, v)
    after = (cache.seq_len(s), cache.kept_blocks(s), cache.free_pages, cache.block_tables.clone())
    assert before[:3] == after[:3] and torch.equal(before[3], after[3])
    _step(cache, [s], data, pos, 1)  # still usable


@interpreter
def test_refuses_bad_queries_before_writing():
    cache = PagedKVCache(PHI, num_pages=16, head_dim=D, dtype=torch.float32)
    s = cache.add_sequence()
    q, k, v = _data(PHI, [10])[0]
    with pytest.raises(InputError, match="dtype|holds"):
        cached_attention(cache, [s], q.half(), k, v)
    with pytest.raises(InputError, match="heads"):
        cached_attention(cache, [s], q[:, :2], k, v)
    with pytest.raises(InputError, match="new tokens"):
        cached_attention(cache, [s], q[:, :, :3], k, v)
    assert cache.seq_len(s) == 0
    cached_attention(cache, [s], q, k, v)
    with pytest.raises(InputError, match="append"):
        paged_attention(torch.zeros(1, 4, 11, D), cache, [s])


@interpreter
def test_generated_source_is_specialised():
    """Shared numbers are literals; the table is read only where heads differ."""
    homo = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=3, heads=4, kv_heads=2, homo_head=True)
    src = decode_source(homo, choose_decode(homo, torch.float16, 64, 1, torch.device("cpu")))
    kernel = src.split("def kernel")[1].split("def combine_kernel")[0]
    assert "W = 2" in kernel and "R = 0" in kernel and "GroupTable + g" not in kernel and "HeadTable + h" not in kernel
    phi = decode_source(PHI, choose_decode(PHI, torch.float16, 64, 1, torch.device("cpu")))
    assert "W = 2" in phi and "R = tl.load(GroupTable" in phi
    hetero = decode_source(HETERO, choose_decode(HETERO, torch.float16, 64, 4, torch.device("cpu")))
    assert "rW = tl.load(HeadTable" in hetero and "USE_DOT = True" in hetero


GPU_PHI = s2dsl.local_stride(block=64, local_blocks=4, vert_stride=4, heads=8, kv_heads=2)
GPU_HETERO = _pattern("pattern p { block = 64 heads = 8 kv_heads = 2 causal "
                      "heads 0..3 { window 2 stride 4 offset h } heads 4..5 { window 3 sink 1 stride 3 offset h } "
                      "heads 6..7 { window 1 stride 2 offset h stride 5 } }")
GPU_MHA = s2dsl.local_stride(block=64, local_blocks=4, vert_stride=8, heads=8)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", [GPU_PHI, GPU_HETERO, GPU_MHA], ids=["phi", "hetero", "mha"])
def test_gpu_bf16_generation(pattern):
    """bf16 on the GPU, head dim 128: prefill, decode steps, speculative and chunked steps, three
    sequences of different lengths, automatic and forced splits; freed pages poisoned."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("runs the compiled kernels")
    d = 128
    cache = PagedKVCache(pattern, num_pages=512, head_dim=d, dtype=torch.bfloat16, device="cuda")
    ids = [cache.add_sequence() for _ in range(3)]
    data = dict(zip(ids, _data(pattern, [1400, 1400, 1400], torch.bfloat16, device="cuda", d=d)))
    pos = dict.fromkeys(ids, 0)
    for s, n in zip(ids, [1000, 700, 129]):
        _step(cache, [s], data, pos, n)
    for n, splits in [(1, None), (1, 1), (1, 5), (4, None), (1, 16), (70, None), (1, None), (3, 2)] + [(1, None)] * 40:
        _step(cache, ids, data, pos, n, n_splits=splits)
    for s in ids:
        for g in range(pattern.kv_heads):
            assert cache.kept_blocks(s, g) == cache.needed_blocks(s, g)


@interpreter
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches(side):
    """Rows of different real lengths (left or right padding) in a first prefill, a chunk and
    decode steps: each row equals its own sequence's reference; pad rows are zero."""
    cache = PagedKVCache(HETERO, num_pages=64, head_dim=D, dtype=torch.float32)
    ids = [cache.add_sequence() for _ in range(3)]
    data = dict(zip(ids, _data(HETERO, [70, 70, 70])))
    pos = dict.fromkeys(ids, 0)
    for n, counts in [(21, [21, 9, 0]), (6, [2, 6, 5]), (1, [1, 1, 1]), (4, [4, 0, 3]), (1, [1, 1, 1])]:
        left = [n - c for c in counts] if side == "left" else [0] * 3
        q, k, v = (torch.zeros(3, h, n, D) for h in (HETERO.heads, HETERO.kv_heads, HETERO.kv_heads))
        for r, (s, c, o) in enumerate(zip(ids, counts, left)):
            for t, src in zip((q, k, v), data[s]):
                t[r, :, o:o + c] = src[0, :, pos[s]:pos[s] + c]
        kw = dict(lengths=counts, left_padding=left) if side == "left" else dict(lengths=counts)
        out = cached_attention(cache, ids, q, k, v, **kw)
        for r, (s, c, o) in enumerate(zip(ids, counts, left)):
            qs, ks, vs = data[s]
            end = pos[s] + c
            if c:
                ref = s2dsl.reference_attention(qs[:, :, pos[s]:end], ks[:, :, :end], vs[:, :, :end], HETERO)
                torch.testing.assert_close(out[r:r + 1, :, o:o + c], ref, atol=2e-5, rtol=2e-5)
            assert (out[r, :, :o] == 0).all() and (out[r, :, o + c:] == 0).all()
            pos[s] = end
            assert cache.seq_len(s) == end
        _poison(cache)


def _static_decode(device, dtype, pattern, d, prompts, steps, capture):
    """Decode steps through DecodeGraph (static plan; captured and replayed on CUDA) against the
    reference, and against a twin cache stepping with host-planned steps."""
    caches = [PagedKVCache(pattern, num_pages=256, head_dim=d, dtype=dtype, device=device, lookahead=4)
              for _ in range(2)]
    ids = [[c.add_sequence() for _ in prompts] for c in caches]
    total = max(prompts) + steps
    data = _data(pattern, [total] * len(prompts), dtype, device=device, d=d)
    pos = [dict.fromkeys(i, 0) for i in ids]
    for c, i, p in zip(caches, ids, pos):
        for s, n, x in zip(i, prompts, data):
            _step(c, [s], {s: x}, p, n)
    bufs = [torch.zeros(len(prompts), h, 1, d, dtype=dtype, device=device)
            for h in (pattern.heads, pattern.kv_heads, pattern.kv_heads)]
    graph = DecodeGraph(lambda: cached_attention(caches[0], ids[0], *bufs), [caches[0].table], [ids[0]],
                        max_length=total, capture=capture)
    for _ in range(steps):
        for t, buf in enumerate(bufs):
            buf.copy_(torch.cat([x[t][:, :, pos[0][s]:pos[0][s] + 1] for s, x in zip(ids[0], data)]))
        out = graph().clone()
        twin = cached_attention(caches[1], ids[1], *bufs)
        for r, (s, x) in enumerate(zip(ids[0], data)):
            end = pos[0][s] + 1
            ref = s2dsl.reference_attention(x[0][:, :, end - 1:end].float(), x[1][:, :, :end].float(),
                                            x[2][:, :, :end].float(), pattern)
            err = ((out[r:r + 1].float() - ref).norm() / ref.norm()).item()
            assert err < TOL[dtype], (end, err)
            pos[0][s] = end
        if capture:  # the graph's split count is chosen for max_length, the twin's for the lengths
            torch.testing.assert_close(out.float(), twin.float(), atol=3e-2, rtol=3e-2)
        else:
            assert torch.equal(out, twin)
        assert [caches[0].seq_len(s) for s in ids[0]] == [caches[1].seq_len(s) for s in ids[1]]
        _poison(caches[0])
    caches[0].evict()
    for a, b in zip(ids[0], ids[1]):
        assert caches[0].kept_blocks(a) == caches[1].kept_blocks(b)
    graph.close()


@interpreter
def test_static_decode_steps():
    _static_decode("cpu", torch.float32, HETERO, D, [30, 9], 20, capture=False)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", [GPU_PHI, GPU_HETERO], ids=["phi", "hetero"])
def test_gpu_cuda_graph_decode(pattern):
    """The static step captured in a CUDA graph and replayed: equal to the reference and to
    host-planned eager steps; the pages held equal too."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("runs the compiled kernels")
    _static_decode("cuda", torch.bfloat16, pattern, 128, [900, 130, 64], 150, capture=True)


@pytest.mark.gpu
def test_gpu_pool_past_2_to_the_31_elements():
    """Pages at the top of a pool of more than 2**31 elements are written and read correctly."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("runs the compiled kernels")
    d = 128
    pages = (2 ** 31) // (GPU_PHI.block * d) + 64  # > 2**31 elements per pool (bf16: 4 GiB each)
    cache = PagedKVCache(GPU_PHI, num_pages=pages, head_dim=d, dtype=torch.bfloat16, device="cuda")
    # take the low pages with a filler sequence so the tested one lands past element 2**31
    filler = cache.add_sequence()
    cache.append([filler], *(torch.zeros(1, GPU_PHI.kv_heads, (pages - 40) // GPU_PHI.kv_heads * GPU_PHI.block, d,
                                         dtype=torch.bfloat16, device="cuda") for _ in range(2)))
    s = cache.add_sequence()
    data = {s: _data(GPU_PHI, [600], torch.bfloat16, device="cuda", d=d)[0]}
    pos = {s: 0}
    _step(cache, [s], data, pos, 500)
    held = [p for row in cache.pages_of(s) for p in row if p >= 0]
    assert min(held) * GPU_PHI.block * d >= 2 ** 31
    for _ in range(20):
        _step(cache, [s], data, pos, 1)


# --- measured split counts (decode_graph(tune_splits=True)): the choosing logic with a fake timer


def test_split_candidates_are_powers_of_two_within_bounds():
    from s2dsl.runtime import decode as dec
    for policy in range(1, dec.MAX_SPLITS + 1):
        cands = dec.split_candidates(policy)
        assert cands and all(1 <= s <= dec.MAX_SPLITS and s & (s - 1) == 0 for s in cands)
        assert dec._pow2(policy) in cands
    assert dec.split_candidates(64) == (16, 32, 64)
    assert dec.split_candidates(1) == (1, 2)


def test_tuned_split_choice_picks_the_fastest_once_and_never_while_capturing(monkeypatch):
    from s2dsl.runtime import decode as dec
    calls = []

    def timer(cands):
        calls.append(cands)
        return {s: {16: 3.0, 32: 1.0, 64: 2.0}[s] for s in cands}
    key = ("splits", 1, 1, 512, 1)
    monkeypatch.setattr(dec, "_capturing", lambda: True)
    memo = {}
    assert dec._tuned_choice(memo, key, 64, timer) == 64  # inside a capture: the policy, nothing timed
    assert not calls and not memo
    monkeypatch.setattr(dec, "_capturing", lambda: False)
    assert dec._tuned_choice(memo, key, 64, timer) == 32
    assert calls == [(16, 32, 64)]
    monkeypatch.setattr(dec, "_capturing", lambda: True)  # a later capture reuses the measured count
    assert dec._tuned_choice(memo, key, 64, timer) == 32 and len(calls) == 1
    monkeypatch.setattr(dec, "_capturing", lambda: False)
    # a longer context in the same power-of-two bucket of blocks reuses the measurement; the next bucket re-times
    assert dec._tuned_choice(memo, ("splits", 1, 1, 300, 1), 64, timer) == 32 and len(calls) == 1
    assert dec._tuned_choice(memo, ("splits", 1, 1, 513, 1), 64, timer) == 32 and len(calls) == 2
    # a candidate within the noise margin of the policy's count does not replace it
    assert dec.pick_splits(64, lambda c: {s: 1.0 - 0.01 * (s == 32) for s in c}) == 64
    assert dec.pick_splits(64, lambda c: {s: 1.0 - 0.1 * (s == 16) for s in c}) == 16


def test_split_tuning_is_ignored_off_cuda():
    """On the CPU the decode call splits nothing and times nothing: the same output as untuned."""
    from s2dsl.runtime import decode as dec
    pattern = dense_pattern(2, 1, 16)
    outs = []
    for tune in (False, True):
        cache = PagedKVCache(pattern, num_pages=16, head_dim=D, dtype=torch.float32)
        if tune:
            dec.enable_split_tuning(cache)
        (q, k, v), = _data(pattern, [40])
        seqs = [cache.add_sequence()]
        cache.append(seqs, k, v)
        outs.append(paged_attention(q[:, :, -1:], cache, seqs))
        assert dec.split_choices(cache) == {}
    assert torch.equal(outs[0], outs[1])
