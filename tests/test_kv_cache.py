"""The paged KV cache's bookkeeping: what it keeps, frees, refuses. No kernels run here."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import s2dsl
from s2dsl.analysis import evaluate
from s2dsl.runtime.kv_cache import OutOfPagesError, PagedKVCache, dense_pattern

from kernel_strategies import patterns

D = 8


def _pattern(text):
    return s2dsl.parse(text)["p"]


HETERO = _pattern("pattern p { block = 16 heads = 4 kv_heads = 2 causal "
                  "heads 0..0 { window 1 sink 1 stride 3 offset 1 } heads 1..1 { window 2 stride 2 } "
                  "heads 2..3 { window 3 stride 5 offset h } }")
PHI = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=4, heads=4, kv_heads=2)
TOPK = _pattern("pattern p { block = 16 heads = 2 kv_heads = 2 causal "
                "heads 0..0 { window 2 topk 2 } heads 1..1 { window 1 stride 3 } }")


def _brute_needed(pattern, kv_head, length):
    """Blocks of a sequence of ``length`` tokens that some q head of ``kv_head`` keeps for a
    query block >= length // block (the next query), by the pattern's own verdicts."""
    n_blocks = -(-length // pattern.block)
    i = length // pattern.block
    g = pattern.group_size
    heads = range(kv_head * g, (kv_head + 1) * g)
    return [j for j in range(n_blocks)
            if j >= i or any(pattern.keeps(h, q, j) for h in heads for q in range(i, i + 4))]


def _kv(n, kv_heads, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, kv_heads, n, D, generator=g), torch.randn(1, kv_heads, n, D, generator=g)


def _check_tables(cache):
    """The device page table mirrors the host's."""
    held = []
    for s in cache.sequences:
        slot = cache.slot(s)
        for g, pages in enumerate(cache.pages_of(s)):
            assert (cache.block_tables[slot, g, len(pages):] == -1).all()
            held += [p for p in pages if p >= 0]
    # held and free pages partition the pool
    assert sorted(held + list(cache.free_pages)) == list(range(cache.num_pages))


@pytest.mark.parametrize("pattern", [HETERO, PHI], ids=["hetero", "phi3_like"])
def test_keeps_exactly_what_the_pattern_needs(pattern):
    """Token by token: kept blocks == brute force, and == the analyzer's kv_bytes per kv head."""
    report = s2dsl.analyze(pattern, head_dim=D, dtype_bytes=4)
    page = 2 * pattern.block * D * 4
    cache = PagedKVCache(pattern, num_pages=200, head_dim=D, dtype=torch.float32)
    s = cache.add_sequence()
    k, v = _kv(150, pattern.kv_heads)
    held = []
    for n in range(150):
        cache.append([s], k[:, :, n:n + 1], v[:, :, n:n + 1])
        cache.evict([s])
        length = n + 1
        total = 0
        for g in range(pattern.kv_heads):
            kept = cache.kept_blocks(s, g)
            assert kept == _brute_needed(pattern, g, length), (length, g)
            assert kept == cache.needed_blocks(s, g)
            total += len(kept)
            if length % pattern.block:  # the next query is in the last block: exactly the analyzer's figure
                n_blocks = -(-length // pattern.block)
                assert len(kept) * page == evaluate(report.groups[g].kv_bytes, N=n_blocks)
        assert cache.pages_in_use == total
        held.append(total)
    _check_tables(cache)
    # the kept K/V are the tokens written
    kk, vv = cache.gather(s)
    for g in range(pattern.kv_heads):
        for j in cache.kept_blocks(s, g):
            sl = slice(j * pattern.block, (j + 1) * pattern.block)
            assert torch.equal(kk[g, sl], k[0, g, sl]) and torch.equal(vv[g, sl], v[0, g, sl])
    dense = pattern.kv_heads * -(-150 // pattern.block)
    assert held[-1] < dense  # the cache is smaller than a dense one


def test_pages_are_freed_and_reused():
    cache = PagedKVCache(PHI, num_pages=20, head_dim=D, dtype=torch.float32)
    s = cache.add_sequence()
    k, v = _kv(400, PHI.kv_heads)
    for n in range(0, 400, 7):  # far more blocks than pages: only eviction makes this fit
        cache.append([s], k[:, :, n:n + 7], v[:, :, n:n + 7])
        cache.evict([s])
    assert cache.seq_len(s) == 400
    used = cache.pages_in_use
    seen = {p for pages in cache.pages_of(s) for p in pages if p >= 0}
    assert len(seen) == used
    cache.remove_sequence(s)
    assert cache.pages_in_use == 0 and cache.num_free_pages == 20
    assert (cache.block_tables == -1).all()
    t = cache.add_sequence()
    cache.append([t], k[:, :, :40], v[:, :, :40])
    assert cache.pages_in_use == PHI.kv_heads * 3
    _check_tables(cache)


def test_out_of_pages_changes_nothing():
    cache = PagedKVCache(HETERO, num_pages=9, head_dim=D, dtype=torch.float32)
    a, b = cache.add_sequence("a"), cache.add_sequence("b")
    k, v = _kv(60, HETERO.kv_heads)
    cache.append([a], k[:, :, :33], v[:, :, :33])
    cache.append([b], k[:, :, :10], v[:, :, :10])
    cache.evict()
    before = (cache.num_free_pages, cache.seq_len(a), cache.seq_len(b), cache.kept_blocks(a), cache.kept_blocks(b),
              cache.block_tables.clone(), cache.k_pages.clone(), cache.v_pages.clone(), list(cache.free_pages))
    kk = torch.cat([k[:, :, 33:60], k[:, :, 10:37]])
    vv = torch.cat([v[:, :, 33:60], v[:, :, 10:37]])
    with pytest.raises(OutOfPagesError, match="free pages"):
        cache.append([a, b], kk, vv)
    after = (cache.num_free_pages, cache.seq_len(a), cache.seq_len(b), cache.kept_blocks(a), cache.kept_blocks(b),
             cache.block_tables.clone(), cache.k_pages.clone(), cache.v_pages.clone(), list(cache.free_pages))
    for x, y in zip(before, after):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    # a smaller write still fits
    cache.append([a, b], kk[:, :, :1], vv[:, :, :1])
    assert cache.seq_len(a) == 34 and cache.seq_len(b) == 11


def test_continuous_batching_bookkeeping():
    """Sequences join and leave between steps; the pool always holds the sum of their needs."""
    cache = PagedKVCache(PHI, num_pages=64, head_dim=D, dtype=torch.float32, max_seqs=2)
    k, v = _kv(300, PHI.kv_heads)
    lengths = {}
    live = []
    schedule = {0: 2, 5: 1, 30: 2, 70: 1}  # step -> sequences to add
    for step in range(120):
        for _ in range(schedule.get(step, 0)):
            s = cache.add_sequence()
            live.append(s)
            lengths[s] = 0
        if step in (40, 90) and live:
            gone = live.pop(0)
            cache.remove_sequence(gone)
            del lengths[gone]
        n = 1 + step % 3
        cache.append(live, k[:, :, :n].expand(len(live), -1, -1, -1), v[:, :, :n].expand(len(live), -1, -1, -1))
        cache.evict(live)
        for s in live:
            lengths[s] += n
        assert sum(len(b) for s in live for b in cache.kept_blocks(s)) == cache.pages_in_use
        for s in live:
            assert cache.seq_len(s) == lengths[s]
            for g in range(PHI.kv_heads):
                assert cache.kept_blocks(s, g) == _brute_needed(PHI, g, lengths[s])
    assert cache.block_tables.shape[0] >= 3  # grew past max_seqs=2
    _check_tables(cache)
    for s in list(live):
        cache.remove_sequence(s)
    assert cache.num_free_pages == 64


def test_only_needed_skips_dropped_blocks():
    cache = PagedKVCache(PHI, num_pages=64, head_dim=D, dtype=torch.float32)
    s = cache.add_sequence()
    k, v = _kv(200, PHI.kv_heads)
    cache.append([s], k, v, only_needed=True)
    for g in range(PHI.kv_heads):
        assert cache.kept_blocks(s, g) == _brute_needed(PHI, g, 200)
    assert cache.pages_in_use == sum(len(_brute_needed(PHI, g, 200)) for g in range(PHI.kv_heads))
    kk, _ = cache.gather(s)
    for j in cache.kept_blocks(s, 0):
        assert torch.equal(kk[0, j * 16:(j + 1) * 16], k[0, 0, j * 16:(j + 1) * 16])


def test_not_kv_efficient_keeps_everything_and_warns_once():
    with pytest.warns(UserWarning, match="not KV-efficient") as record:
        cache = PagedKVCache(TOPK, num_pages=64, head_dim=D, dtype=torch.float32)
        s = cache.add_sequence()
        k, v = _kv(100, TOPK.kv_heads)
        for n in range(0, 100, 5):
            cache.append([s], k[:, :, n:n + 5], v[:, :, n:n + 5])
            cache.evict([s])
    assert len([w for w in record if "KV-efficient" in str(w.message)]) == 1
    assert cache.kept_blocks(s, 0) == list(range(7))           # the topk head's kv head keeps all
    assert cache.kept_blocks(s, 1) == _brute_needed(TOPK, 1, 100)  # the other one still evicts


def test_dense_and_no_eviction_keep_everything():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense = PagedKVCache(dense_pattern(4, 2, 16), num_pages=64, head_dim=D, dtype=torch.float32)
        off = PagedKVCache(PHI, num_pages=64, head_dim=D, dtype=torch.float32, evict=False)
    k, v = _kv(100, 2)
    for cache in (dense, off):
        s = cache.add_sequence()
        cache.append([s], k, v)
        cache.evict()
        assert cache.kept_blocks(s) == [list(range(7))] * 2


def test_refuses_bad_input():
    cache = PagedKVCache(PHI, num_pages=8, head_dim=D, dtype=torch.float32)
    s = cache.add_sequence("x")
    with pytest.raises(KeyError):
        cache.add_sequence("x")
    with pytest.raises(KeyError, match="no sequence"):
        cache.append(["y"], *_kv(1, 2))
    with pytest.raises(ValueError, match="must be"):
        cache.append([s], *_kv(1, 3))
    with pytest.raises(ValueError, match="repeat"):
        cache.append([s, s], torch.zeros(2, 2, 1, D), torch.zeros(2, 2, 1, D))
    with pytest.raises(ValueError, match="bidirectional"):
        PagedKVCache(_pattern("pattern p { block = 16 heads = 1 bidirectional heads * { window 1 } }"),
                     num_pages=4, head_dim=D)
    assert cache.seq_len(s) == 0 and cache.pages_in_use == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=patterns(causal=True), data=st.data())
def test_random_patterns_keep_what_they_need(pattern, data):
    cache = PagedKVCache(pattern, num_pages=400, head_dim=D, dtype=torch.float32)
    s = cache.add_sequence()
    k, v = _kv(130, pattern.kv_heads)
    n = 0
    while n < 130:
        step = data.draw(st.integers(1, 20), label="step")
        cache.append([s], k[:, :, n:n + step], v[:, :, n:n + step])
        cache.evict([s])
        n = cache.seq_len(s)
        for g in range(pattern.kv_heads):
            assert cache.kept_blocks(s, g) == _brute_needed(pattern, g, n)
    _check_tables(cache)


# ---------------------------------------------------------------------------------------------
# The device-side bookkeeping against a plain Python model of the cache: random appends (padded
# rows, first prefills that keep only what is needed), evictions, crops, sequences coming and going.

class _Model:
    """What the cache must hold: per (sequence, kv head) a set of blocks, by the pattern's own verdicts."""

    def __init__(self, pattern, num_pages, lookahead):
        self.p, self.num_pages, self.la = pattern, num_pages, lookahead
        self.held, self.len, self.evicted_at = {}, {}, {}
        g = pattern.group_size
        eff = s2dsl.analyze(pattern).heads
        self.keep_all = [any(pattern.head_specs[h].dense or not eff[h].kv_efficient for h in range(kv * g, kv * g + g))
                         for kv in range(pattern.kv_heads)]

    def needed(self, kv, i, j):
        g = self.p.group_size
        return self.keep_all[kv] or j >= i or any(self.p.head_specs[h].touches(i, j, self.p.block)
                                                  for h in range(kv * g, kv * g + g))

    def used(self):
        return sum(len(b) for blocks in self.held.values() for b in blocks)

    def evict(self, s, at):
        i = at // self.p.block
        for kv, blocks in enumerate(self.held[s]):
            blocks -= {j for j in blocks if not self.needed(kv, i, j)}
        self.evicted_at[s] = max(self.evicted_at[s], at)

    def append(self, seqs, counts, only_needed):
        """Evict for the step's queries, then take the new blocks; out of pages: nothing changes."""
        import copy
        saved = copy.deepcopy((self.held, self.evicted_at))
        b = self.p.block
        for s in seqs:
            self.evict(s, max(self.len[s] - self.la, 0))
        new = {}
        for s, c in zip(seqs, counts):
            start, end = self.len[s], self.len[s] + c
            keep_i = max(end - self.la, 0) // b
            new[s] = [{j for j in range(start // b, -(-end // b)) if j not in self.held[s][kv]
                       and (not only_needed or self.needed(kv, keep_i, j))} for kv in range(self.p.kv_heads)]
        if sum(len(x) for v in new.values() for x in v) > self.num_pages - self.used():
            self.held, self.evicted_at = saved
            return False
        for s, c in zip(seqs, counts):
            for kv in range(self.p.kv_heads):
                self.held[s][kv] |= new[s][kv]
            self.len[s] += c
            if only_needed:
                self.evicted_at[s] = max(self.evicted_at[s], self.len[s] - self.la)
        return True


def _code(s, pos, g):
    return float(s * 10000 + pos * 10 + g)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=patterns(causal=True), data=st.data())
def test_bookkeeping_matches_a_python_model(pattern, data):
    _against_the_model(pattern, data)


NEW_CONSTRUCTS = [
    _pattern("pattern p { block = 16 heads = 2 kv_heads = 1 causal heads 0..0 { window 40 tokens sink 4 tokens } "
             "heads 1..1 { window 1 stride 3 } }"),
    _pattern("pattern p { block = 16 heads = 2 kv_heads = 2 causal heads * { global 2 window 1 stride 4 offset h } }"),
]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=st.sampled_from(NEW_CONSTRUCTS), data=st.data())
def test_bookkeeping_with_token_edges_and_global_rows(pattern, data):
    """Token-granular windows/sinks keep the blocks they touch; global query rows keep everything
    until the queries pass them, then eviction catches up."""
    _against_the_model(pattern, data)


def _against_the_model(pattern, data):
    b = pattern.block
    lookahead = data.draw(st.sampled_from([0, 0, 5, 2 * b]), label="lookahead")
    num_pages = data.draw(st.integers(4, 60), label="num_pages")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = PagedKVCache(pattern, num_pages=num_pages, head_dim=2, dtype=torch.float32, max_seqs=1,
                             lookahead=lookahead)
    model = _Model(pattern, num_pages, lookahead)
    live = []
    for _ in range(data.draw(st.integers(1, 25), label="ops")):
        op = data.draw(st.sampled_from(["add", "append", "append", "append", "evict", "crop", "remove"]), label="op")
        if op == "add" or not live:
            s = cache.add_sequence()
            live.append(s)
            model.held[s], model.len[s], model.evicted_at[s] = [set() for _ in range(pattern.kv_heads)], 0, 0
        elif op == "append":
            seqs = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=3, unique=True), label="seqs")
            n = data.draw(st.sampled_from([1, 1, 2, 7, b, 3 * b + 5]), label="n")
            counts = [data.draw(st.integers(0, n), label="count") for _ in seqs]
            left = [data.draw(st.integers(0, n - c), label="left") for c in counts]
            only = n > 1 and all(model.len[s] == 0 for s in seqs)
            k = torch.full((len(seqs), pattern.kv_heads, n, 2), -1.0)
            for r, (s, c, o) in enumerate(zip(seqs, counts, left)):
                for t in range(c):
                    for g in range(pattern.kv_heads):
                        k[r, g, o + t] = _code(s, model.len[s] + t, g)
            ok = model.append(seqs, counts, only)
            if ok:
                cache.append(seqs, k, -k, only_needed=only, lengths=counts, left_padding=left)
            else:
                before = ([cache.pages_of(s) for s in live], cache.free_pages, [cache.seq_len(s) for s in live])
                with pytest.raises(OutOfPagesError):
                    cache.append(seqs, k, -k, only_needed=only, lengths=counts, left_padding=left)
                after = ([cache.pages_of(s) for s in live], cache.free_pages, [cache.seq_len(s) for s in live])
                assert before == after
        elif op == "evict":
            s = data.draw(st.sampled_from(live), label="seq")
            cache.evict([s])
            model.evict(s, max(model.len[s] - lookahead, 0))
        elif op == "crop":
            s = data.draw(st.sampled_from(live), label="seq")
            to = data.draw(st.integers(max(model.len[s] - 2 * b, 0), model.len[s]), label="to")
            if to < model.evicted_at[s] and not all(model.keep_all):
                with pytest.raises(ValueError, match="lookahead"):
                    cache.crop(s, to)
            else:
                cache.crop(s, to)
                model.held[s] = [{j for j in blk if j < -(-to // b)} for blk in model.held[s]]
                model.len[s] = to
        else:
            s = live.pop(data.draw(st.integers(0, len(live) - 1), label="which"))
            cache.remove_sequence(s)
            del model.held[s], model.len[s], model.evicted_at[s]
        # the cache is the model, and what it holds is what was written
        assert cache.pages_in_use == model.used()
        for s in live:
            assert cache.seq_len(s) == model.len[s]
            assert [set(x) for x in cache.kept_blocks(s)] == model.held[s]
            kk, vv = cache.gather(s)
            for g in range(pattern.kv_heads):
                for j in model.held[s][g]:
                    for pos in range(j * b, min((j + 1) * b, model.len[s])):
                        assert kk[g, pos, 0].item() == _code(s, pos, g) and vv[g, pos, 0].item() == -_code(s, pos, g)
        _check_tables(cache)


def test_crop_restores_what_later_queries_need():
    """Speculative tokens rejected: after a crop, the pages and the next steps equal a run that
    never saw them; a crop past the lookahead is refused before anything changes."""
    a = PagedKVCache(PHI, num_pages=64, head_dim=D, dtype=torch.float32, lookahead=8)
    ref = PagedKVCache(PHI, num_pages=64, head_dim=D, dtype=torch.float32, lookahead=8)
    k, v = _kv(140, PHI.kv_heads)
    s, r = a.add_sequence(), ref.add_sequence()
    for cache, seq in ((a, s), (ref, r)):
        cache.append([seq], k[:, :, :95], v[:, :, :95])
        cache.evict([seq])
    junk = torch.randn(1, PHI.kv_heads, 8, D)
    a.append([s], junk[:, :, :5], junk[:, :, :5])  # 5 draft tokens, cross a block edge
    a.evict([s])
    a.crop(s, 95)
    assert a.seq_len(s) == 95
    for g in range(PHI.kv_heads):
        assert set(a.needed_blocks(s, g)) <= set(a.kept_blocks(s, g))
    for n in range(95, 140, 3):
        for cache, seq in ((a, s), (ref, r)):
            cache.append([seq], k[:, :, n:n + 3], v[:, :, n:n + 3])
            cache.evict([seq])
        assert a.kept_blocks(s) == ref.kept_blocks(r)
        ka, va = a.gather(s)
        kr, vr = ref.gather(r)
        assert torch.equal(ka, kr) and torch.equal(va, vr)
    before = (a.kept_blocks(s), a.free_pages, a.seq_len(s))
    with pytest.raises(ValueError, match="lookahead"):
        a.crop(s, a.seq_len(s) - 30)
    assert (a.kept_blocks(s), a.free_pages, a.seq_len(s)) == before


def test_shared_table_plans_once_per_step():
    """Two layers of one pattern share the bookkeeping: one plan per step, each layer its own K/V."""
    l0 = PagedKVCache(PHI, num_pages=32, head_dim=D, dtype=torch.float32)
    l1 = PagedKVCache(PHI, num_pages=32, head_dim=D, dtype=torch.float32, table=l0.table)
    s = l0.add_sequence()
    assert s in l1 and l0.shared and l1.shared
    k, v = _kv(70, PHI.kv_heads)
    for n in range(0, 70, 5):
        p0 = l0.append([s], k[:, :, n:n + 5], v[:, :, n:n + 5])
        p1 = l1.append([s], 2 * k[:, :, n:n + 5], 2 * v[:, :, n:n + 5])
        assert p0 is p1 and l0.seq_len(s) == l1.seq_len(s) == n + 5
    k0, _ = l0.gather(s)
    k1, _ = l1.gather(s)
    assert torch.equal(k1, 2 * k0)
    with pytest.raises(ValueError, match="shared page table"):
        PagedKVCache(HETERO, num_pages=32, head_dim=D, table=l0.table)


def test_write_detaches_and_bare_ids_are_refused():
    cache = PagedKVCache(PHI, num_pages=16, head_dim=D, dtype=torch.float32)
    s = cache.add_sequence()
    k, v = _kv(20, PHI.kv_heads)
    k.requires_grad_(True)
    cache.append([s], k, v)
    assert not cache.k_pages.requires_grad and cache.k_pages.grad_fn is None
    for bad in (s, "ab"):
        with pytest.raises(TypeError, match="list of sequence ids"):
            cache.append(bad, k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="lengths"):
        cache.append([s], k[:, :, :2], v[:, :, :2], lengths=[3])
    assert cache.seq_len(s) == 20


def test_int64_destinations():
    """Token destinations are int64 rows of the pools: a pool past 2**31 elements stays addressable."""
    cache = PagedKVCache(PHI, num_pages=4, head_dim=D, dtype=torch.float32)
    s = cache.add_sequence()
    plan = cache.append([s], *_kv(3, PHI.kv_heads))
    assert plan.dest.dtype == torch.int64


def test_static_decode_plan_is_device_ops_only(monkeypatch):
    """A static one-token step (what a CUDA graph captures) reads no host value and makes no
    host tensor; its pages and lengths equal the host-planned step's."""
    lookahead = 3
    ref = PagedKVCache(PHI, num_pages=40, head_dim=D, dtype=torch.float32, lookahead=lookahead)
    st_ = PagedKVCache(PHI, num_pages=40, head_dim=D, dtype=torch.float32, lookahead=lookahead)
    k, v = _kv(120, PHI.kv_heads)
    ids = []
    for cache in (ref, st_):
        a, b = cache.add_sequence(), cache.add_sequence()
        cache.append([a], k[:, :, :37], v[:, :, :37], only_needed=True)
        cache.append([b], k[:, :, :5], v[:, :, :5])
        ids.append([a, b])
    st_.table.enable_static(max_length=200)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync or host tensor inside a static step")

    for t in range(37, 100):
        kk = torch.stack([k[0, :, t:t + 1], k[0, :, t - 32:t - 31]])
        vv = torch.stack([v[0, :, t:t + 1], v[0, :, t - 32:t - 31]])
        ref.append(ids[0], kk, vv)
        st_.table.prepare_static(ids[1])
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__int__", "cpu", "numpy"):
                m.setattr(torch.Tensor, name, forbidden)
            m.setattr(torch, "tensor", forbidden)
            st_.append(ids[1], kk, vv)
        st_.table.commit_static(ids[1])
        assert [st_.seq_len(s) for s in ids[1]] == [ref.seq_len(s) for s in ids[0]]
        for a, b in zip(ids[0], ids[1]):
            assert st_.kept_blocks(b) == ref.kept_blocks(a)
            assert all(torch.equal(x, y) for x, y in zip(st_.gather(b), ref.gather(a)))
        assert st_.table.lens[[st_.slot(s) for s in ids[1]]].tolist() == [st_.seq_len(s) for s in ids[1]]
        _check_tables(st_)
    st_.table.disable_static()


def test_compiled_static_plan_equals_the_eager_one():
    """``PageTable.compile_static``: the static step's device ops compiled by inductor leave the
    tables, free stack, lengths and pages exactly as the eager ops do, step by step, through
    blocks starting and eviction (lookahead 3) with a sequence of its own length beside."""
    from torch import _dynamo
    from torch._dynamo.utils import counters
    _dynamo.reset()
    counters.clear()
    lookahead = 3
    caches = [PagedKVCache(PHI, num_pages=40, head_dim=D, dtype=torch.float32, lookahead=lookahead)
              for _ in range(2)]
    k, v = _kv(120, PHI.kv_heads)
    ids = []
    for cache in caches:
        a, b = cache.add_sequence(), cache.add_sequence()
        cache.append([a], k[:, :, :37], v[:, :, :37], only_needed=True)
        cache.append([b], k[:, :, :5], v[:, :, :5])
        ids.append([a, b])
        cache.table.enable_static(max_length=200)
    caches[1].table.compile_static("inductor")
    for t in range(37, 100):
        kk = torch.stack([k[0, :, t:t + 1], k[0, :, t - 32:t - 31]])
        vv = torch.stack([v[0, :, t:t + 1], v[0, :, t - 32:t - 31]])
        plans = []
        for cache, i in zip(caches, ids):
            cache.table.prepare_static(i)
            plans.append(cache.append(i, kk, vv))
            cache.table.commit_static(i)
        a, b = (c.table for c in caches)
        assert torch.equal(plans[1].dest, plans[0].dest) and torch.equal(plans[1].seq_lens, plans[0].seq_lens)
        for name in ("_tables_flat", "free_stack", "n_free", "lens"):
            assert torch.equal(getattr(b, name), getattr(a, name)), (t, name)
        assert torch.equal(caches[1].k_pages, caches[0].k_pages)
        _check_tables(caches[1])
    assert b._static_fn is not None
    assert dict(counters["stats"]).get("unique_graphs") == 1, dict(counters["stats"])  # compiled once, no recompile
    for cache in caches:
        cache.table.disable_static()
    assert b._static_fn is None
    _dynamo.reset()


def test_the_last_step_can_be_cropped_whole_when_eviction_waits_for_the_next_plan():
    """With eviction in the next step's plan (shared tables, S2Cache), a step's tokens can all be
    rolled back without any lookahead; one token further back is refused."""
    cache = PagedKVCache(PHI, num_pages=64, head_dim=D, dtype=torch.float32)
    s = cache.add_sequence()
    k, v = _kv(200, PHI.kv_heads)
    for t in range(0, 180, 20):
        cache.append([s], k[:, :, t:t + 20], v[:, :, t:t + 20])
    cache.crop(s, 160)
    for g in range(PHI.kv_heads):
        assert set(cache.needed_blocks(s, g)) <= set(cache.kept_blocks(s, g))
    with pytest.raises(ValueError, match="lookahead"):
        cache.crop(s, 159)


def test_static_steps_fix_the_tables_and_the_sequences():
    """While a CUDA graph may hold the tables, they neither grow nor lose sequences; host-planned
    steps outside a static step keep working."""
    cache = PagedKVCache(PHI, num_pages=40, head_dim=D, dtype=torch.float32)
    s = cache.add_sequence()
    k, v = _kv(400, PHI.kv_heads)
    cache.append([s], k[:, :, :20], v[:, :, :20])
    cache.table.enable_static(max_length=40)
    with pytest.raises(RuntimeError, match="DecodeGraph"):
        cache.remove_sequence(s)
    with pytest.raises(RuntimeError, match="fixed"):
        cache.append([s], k[:, :, 20:400], v[:, :, 20:400])  # past the tables' width
    plan = cache.append([s], k[:, :, 20:21], v[:, :, 20:21])  # host-planned: not inside a static step
    assert plan.starts == (20,) and cache.seq_len(s) == 21
    cache.table.disable_static()
    cache.remove_sequence(s)
    assert cache.pages_in_use == 0


def test_eager_decode_steps_never_wait_for_the_device(monkeypatch):
    """Eager decode steps of layers sharing a page table (HF's S2Cache) read no device value and
    copy no host data to the device (on a GPU either is a sync that stalls the launches queued
    behind it), across block boundaries and evictions; the first layer of a step plans with a
    few device ops, every other layer only writes its K/V and launches the kernel."""
    from serving_helpers import HostWork, stub_decode_kernels
    from s2dsl.runtime.decode import cached_attention
    stub_decode_kernels(monkeypatch)
    layers = [PagedKVCache(PHI, num_pages=200, head_dim=D, dtype=torch.float32)]
    layers += [PagedKVCache(PHI, num_pages=200, head_dim=D, dtype=torch.float32, table=layers[0].table)
               for _ in range(3)]
    ids = [layers[0].add_sequence() for _ in range(3)]
    for s, n in zip(ids, (37, 50, 16)):
        kk, vv = _kv(n, PHI.kv_heads)
        for c in layers:
            c.append([s], kk, vv, only_needed=True)
    q = torch.randn(3, PHI.heads, 1, D)
    k = torch.randn(3, PHI.kv_heads, 1, D)
    for c in layers:  # the batch's first step makes its slot tensor (an asynchronous copy, once)
        cached_attention(c, ids, q, k, k)
    first_ops = []
    for _ in range(3 * PHI.block - 1):
        per_layer = []
        for c in layers:
            with HostWork(monkeypatch) as work:
                cached_attention(c, ids, q, k, k)
            assert not work.reads, f"the step read the device or copied host data: {dict(work.reads)}"
            per_layer.append(sum(work.ops.values()))
        first_ops.append(per_layer[0])
        # the write (two indexed copies) and the output buffers
        assert max(per_layer[1:]) <= 4, per_layer
    # most steps start no block and evict nothing: a dozen ops plan them
    assert sorted(first_ops)[len(first_ops) // 2] <= 16, first_ops
    _check_tables(layers[0])
    assert [layers[0].seq_len(s) for s in ids] == [37 + 48, 50 + 48, 16 + 48]
