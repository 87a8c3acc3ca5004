"""Pool sizing for chunked prefill (the 128K x 8 crash of bench_generate).

bench_generate's warm-up fed a 2048-token prompt to ``S2Cache(max_length=2056, batch_size=8)``
in two chunks of 1024: the first (a first prefill) kept only the 16 window blocks per kv head
(1024 of the sparse layers' 1336 pages), the second wrote all 16 blocks it touched per (sequence,
kv head) before the next step's plan could evict: 1024 pages needed, 312 free. The real run
(chunks of 4096) would have needed 64 blocks per (sequence, kv head) more than the pool held.
The pool is now sized for the longest step after the first prefill (``pages_needed(chunk=)``,
``S2Cache(prefill_chunk_size=)``). No kernels run in the page-table tests.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import s2dsl
from s2dsl.runtime.kv_cache import OutOfPagesError, dense_pattern
from s2dsl.runtime.paging import PageTable

from kernel_strategies import patterns

transformers = pytest.importorskip("transformers")
from s2dsl.integrations import hf  # noqa: E402
from serving_helpers import tiny_llama  # noqa: E402

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "llama_bench.s2")


def _hf_like_run(pattern, pool: int, batch: int, lookahead: int, chunks, decode: int) -> int:
    """Plan a prompt in ``chunks`` then ``decode`` one-token steps on a page table used as
    S2Cache uses it (eviction deferred to the next step's plan); returns the most pages held."""
    table = PageTable(pattern, num_pages=pool, device="cpu", max_seqs=batch, lookahead=lookahead)
    table.defer_eviction = True
    ids = [table.add_sequence() for _ in range(batch)]
    peak = 0
    for n in list(chunks) + [1] * decode:
        table.plan_step(ids, n)
        peak = max(peak, pool - int(table.n_free))
    return peak


def test_bench_warmup_at_128k_x8_reproduced_and_fixed():
    """The bench's arithmetic: the sparse layers' pool for the warm-up (max_length 2056, batch
    8, rollback 64) is 1336 pages; its second 1024-token chunk needs more, and a pool sized for
    1024-token chunks holds the warm-up and the real run's 4096-token chunks (scaled down to
    the same block arithmetic)."""
    sparse = s2dsl.load(BENCH)["phi3_local_stride"]
    assert hf.pages_needed(sparse, 2056, 8, 64) == 1336
    with pytest.raises(OutOfPagesError, match="writing 1024 token"):
        _hf_like_run(sparse, 1336, 8, 64, [1024, 1024], 8)
    pool = hf.pages_needed(sparse, 2056, 8, 64, chunk=1024)
    assert _hf_like_run(sparse, pool, 8, 64, [1024, 1024], 8) <= pool
    # a dense layer keeps every block anyway: chunking costs it nothing more
    dense = dense_pattern(32, 8, 64)
    assert hf.pages_needed(dense, 2056, 8, 64, chunk=1024) == hf.pages_needed(dense, 2056, 8, 64)
    # 128K-like: 16 chunks of 4096 (64 blocks) to 64K tokens at batch 2, then decoding
    pool = hf.pages_needed(sparse, 65536 + 40, 2, 64, chunk=4096)
    assert _hf_like_run(sparse, pool, 2, 64, [4096] * 16, 40) <= pool


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=patterns(causal=True), data=st.data())
def test_pool_sized_for_the_chunk_holds_any_chunking(pattern, data):
    """Any split of a prompt into a first prefill and later chunks of at most ``chunk`` tokens,
    then decode steps up to ``max_length``, fits ``pages_needed(..., chunk=chunk)``."""
    b = pattern.block
    batch = data.draw(st.integers(1, 3), label="batch")
    lookahead = data.draw(st.sampled_from([0, 5, b, 2 * b + 3]), label="lookahead")
    chunk = data.draw(st.integers(1, 5 * b), label="chunk")
    first = data.draw(st.integers(1, 6 * b), label="first prefill")
    n_chunks = data.draw(st.integers(0, 5), label="chunks")
    chunks = [first] + [data.draw(st.integers(1, chunk), label="chunk i") for _ in range(n_chunks)]
    decode = data.draw(st.integers(0, 2 * b), label="decode steps")
    max_length = sum(chunks) + decode
    pool = hf.pages_needed(pattern, max_length, batch, lookahead, chunk=chunk)
    assert _hf_like_run(pattern, pool, batch, lookahead, chunks, decode) <= pool


PLAN = """
pattern sparse { block = 16  heads = 4  kv_heads = 2  causal  heads * { window 2  stride 4 offset h // 2 } }
model tiny { layers = 2  every 2 -> dense  rest -> sparse }
"""


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_chunked_prefill_through_s2cache_sized_for_its_chunks():
    """A tiny Llama fed a 256-token prompt in chunks of 96 tokens: a cache sized for the
    length alone refuses the second chunk with an error that names the fix, and every layer (the
    dense one had run the chunk) is as before it; a
    cache with ``prefill_chunk_size=96`` takes it and gives the logits of one prefill."""
    model = tiny_llama(PLAN, attn=hf.ATTN_IMPLEMENTATION)
    ids = torch.randint(1, 100, (2, 256), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = hf.S2Cache(model, max_length=266, batch_size=2, max_rollback=0)
        ref = model(ids, past_key_values=whole, use_cache=True, logits_to_keep=1).logits
        tight = hf.S2Cache(model, max_length=266, batch_size=2, max_rollback=0)
        model(ids[:, :96], past_key_values=tight, use_cache=True)
        free = [p.num_free_pages for p in tight.paged]
        with pytest.raises(OutOfPagesError, match="prefill_chunk_size=96"):
            model(ids[:, 96:192], past_key_values=tight, use_cache=True)
        assert [p.num_free_pages for p in tight.paged] == free and tight.get_seq_length() == 96
        sized = hf.S2Cache(model, max_length=266, batch_size=2, max_rollback=0, prefill_chunk_size=96)
        for at in range(0, 256, 96):
            out = model(ids[:, at:at + 96], past_key_values=sized, use_cache=True, logits_to_keep=1).logits
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_refused_first_prefill_leaves_every_layer_empty():
    """A prompt the sparse layer's pool cannot hold: the dense layer (its own page table, run
    first) had written it; after the refusal every layer is empty and the cache takes a
    shorter prompt as a first prefill."""
    model = tiny_llama(PLAN, attn=hf.ATTN_IMPLEMENTATION)
    cache = hf.S2Cache(model, num_pages=[64, 2], max_rollback=0)
    ids = torch.randint(1, 100, (1, 200), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with pytest.raises(OutOfPagesError):
            model(ids, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 0
        assert [p.num_free_pages for p in cache.paged] == [64, 2]
        assert all(p.seq_len(s) == 0 for p, layer in zip(cache.paged, cache.layers) for s in layer.seq_ids)
        model(ids[:, :16], past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 16


def test_bad_sizes_are_refused():
    from s2dsl.runtime.graphs import DecodeGraph
    sparse = s2dsl.load(BENCH)["phi3_local_stride"]
    with pytest.raises(ValueError, match="chunk"):
        hf.pages_needed(sparse, 100, 1, 0, chunk=-1)
    table = PageTable(sparse, num_pages=8, device="cpu")
    with pytest.raises(ValueError, match="warmup"):
        DecodeGraph(lambda: None, [table], [[]], max_length=64, capture=False, warmup=0)
    model = tiny_llama(PLAN)
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        hf.S2Cache(model, max_length=64, prefill_chunk_size=-1)


def test_tables_grow_in_multiples_of_16_blocks():
    """The decode kernel takes the tables' strides as integer arguments, which Triton
    specialises on divisibility by 16: widths stay multiples of 16 blocks as the tables grow,
    so growing them never recompiles the kernel mid-generation (at 32K a lone layer's call
    measured 104x its kernel, the width having doubled from 514 blocks to 1029 in the timed
    calls)."""
    sparse = s2dsl.load(BENCH)["phi3_local_stride"]
    table = PageTable(sparse, num_pages=4096, device="cpu", max_seqs=1)
    s = table.add_sequence()
    widths = set()
    for n in [1000, 31767, 64, 64, 1] + [1] * 70:
        table.plan_step([s], n)
        widths.add(table.tables.shape[2])
        assert table.tables.stride(0) % 16 == 0 and table.tables.shape[2] % 16 == 0
    assert len(widths) >= 2  # it did grow
    table.reserve(max_length=40000)
    assert table.tables.shape[2] % 16 == 0 and table.tables.shape[2] * sparse.block >= 40000
