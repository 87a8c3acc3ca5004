"""The prefill K/V write kernel (runtime.kv_write.write_kv_tokens) against index_copy_, and a
first prefill through the cache: one launch for both pools, skipped blocks' rows never written."""
import os

import pytest
import torch

import s2dsl
from s2dsl.runtime import kv_write
from s2dsl.runtime.kv_cache import PagedKVCache

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                 reason="runs the Triton kernel under the interpreter")


@interpreted
@pytest.mark.parametrize("src_dtype,pool_dtype", [(torch.float16, torch.float16), (torch.float32, torch.float16),
                                                  (torch.float32, torch.float32)])
def test_write_kv_tokens_matches_index_copy_and_skips(src_dtype, pool_dtype):
    torch.manual_seed(0)
    b, h, n, d, rows_pool = 2, 3, 37, 20, 400
    skip = rows_pool - 1
    # a transposed projection, as HF hands it: (b, n, h, d) in memory
    k = torch.randn(b, n, h, d, dtype=src_dtype).transpose(1, 2)
    v = torch.randn(b, n, h, d, dtype=src_dtype).transpose(1, 2)
    dest = torch.randperm(skip)[:b * h * n]
    dest[torch.rand(dest.shape) < 0.6] = skip      # most rows skipped, as a sparse layer's prefill
    kp = torch.full((rows_pool, d), 7.0, dtype=pool_dtype)
    vp = torch.full((rows_pool, d), 7.0, dtype=pool_dtype)
    kv_write.write_kv_tokens(kp, vp, k, v, dest, skip, block_rows=16)
    ref_k = torch.full_like(kp, 7.0)
    ref_v = torch.full_like(vp, 7.0)
    live = dest != skip
    ref_k.index_copy_(0, dest[live], k.reshape(-1, d)[live].to(pool_dtype))
    ref_v.index_copy_(0, dest[live], v.reshape(-1, d)[live].to(pool_dtype))
    assert torch.equal(kp, ref_k) and torch.equal(vp, ref_v)
    assert (kp[skip] == 7).all() and (vp[skip] == 7).all()  # the scratch row is never written


@interpreted
def test_write_kv_tokens_refuses_mismatched_dest():
    k = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="rows"):
        kv_write.write_kv_tokens(torch.zeros(16, 8), torch.zeros(16, 8), k, k, torch.zeros(5, dtype=torch.long), 15)


@interpreted
def test_write_kv_rows_refuses_what_its_grid_would_overrun():
    """The decode write's grid is one program per row of k: a dest of another length, a v of
    another shape or a pool of another width would read or write out of bounds, so it is refused."""
    pool, rows = torch.zeros(16, 8), torch.zeros(4, 8)
    for k, v, dest, width in ((rows, rows, torch.zeros(3, dtype=torch.long), 8),
                              (rows, torch.zeros(5, 8), torch.zeros(4, dtype=torch.long), 8),
                              (rows, rows, torch.zeros(4, dtype=torch.long), 16)):
        with pytest.raises(ValueError, match="must agree"):
            kv_write.write_kv_rows(torch.zeros(16, width), torch.zeros(16, width), k, v, dest)
    kv_write.write_kv_rows(pool, pool.clone(), rows + 1, rows + 2, torch.tensor([3, 0, 9, 15]))
    assert (pool[[3, 0, 9, 15]] == 1).all() and (pool[[1, 2]] == 0).all()


@interpreted
def test_first_prefill_is_one_write_launch_per_layer_and_keeps_what_index_copy_keeps(monkeypatch):
    """8 layers sharing a table: every layer's write is one token-kernel launch and no other
    device op; the pages hold what the index_copy_ path writes (the reference: the token kernel
    switched off)."""
    from tests.serving_helpers import HostWork
    pattern = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=4, heads=4, kv_heads=2)
    n, d = 200, 16
    torch.manual_seed(1)
    k = torch.randn(1, n, 2, d, dtype=torch.float16).transpose(1, 2)
    v = torch.randn(1, n, 2, d, dtype=torch.float16).transpose(1, 2)

    def caches(token_kernel):
        cs = [PagedKVCache(pattern, num_pages=40, head_dim=d)]
        cs += [PagedKVCache(pattern, num_pages=40, head_dim=d, table=cs[0].table) for _ in range(3)]
        if not token_kernel:
            for c in cs:
                c._token_rows = 0
        return cs

    launches = []
    real = kv_write.kv_tokens_kernel

    class Count:  # records the launches; runs them only outside the counted calls
        run = True

        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid] if self.run else (lambda *a, **kw: None)
    counter = Count()
    monkeypatch.setattr(kv_write, "kv_tokens_kernel", counter)
    cs, ref = caches(True), caches(False)
    ids, rid = [cs[0].add_sequence()], [ref[0].add_sequence()]
    cs[0].append(ids, k, v, only_needed=True)
    for c in cs[1:]:
        counter.run = False  # the interpreter's own tensor ops would count as device ops
        with HostWork(monkeypatch) as w:
            c.append(ids, k, v, only_needed=True)
        counter.run = True
        assert not w.reads and not w.ops, (w.reads, w.ops)  # the launch alone: no copy, no cast, no sync
        c.write(cs[0].table.plan, k, v)  # the same write, launched for real
    assert len(launches) == 2 * len(cs) - 1
    for c in ref:
        c.append(rid, k, v, only_needed=True)
    for c, r in zip(cs, ref):
        assert c.kept_blocks(ids[0]) == r.kept_blocks(rid[0])
        assert 0 < sum(map(len, c.kept_blocks(ids[0]))) < 2 * -(-n // 16)  # some blocks skipped
        kc, vc = c.gather(ids[0])
        kr, vr = r.gather(rid[0])
        assert torch.equal(kc, kr) and torch.equal(vc, vr)
        assert (c._k_all[-1] == 0).all() and (c._v_all[-1] == 0).all()  # the scratch page stays untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pattern_kind", ["sparse", "dense"])
def test_gpu_prefill_write_matches_index_copy_(pattern_kind):
    """bf16, HF's transposed K/V, 8K tokens x 2 sequences into layers sharing a table: the token
    kernel's pages equal index_copy_'s, bit for bit, and the scratch page is never written."""
    from s2dsl.integrations import hf
    from s2dsl.runtime.kv_cache import dense_pattern
    pattern = s2dsl.local_stride(block=64, local_blocks=4, vert_stride=8, heads=8, kv_heads=4)
    if pattern_kind == "dense":
        pattern = dense_pattern(8, 4, 64)
    n, b, d = 8192, 2, 64
    torch.manual_seed(0)
    k = torch.randn(b, n, 4, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(b, n, 4, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    pages = hf.pages_needed(pattern, n + 64, b, 64)
    got = []
    for token_kernel in (True, False):
        cs = [PagedKVCache(pattern, num_pages=pages, head_dim=d, dtype=torch.bfloat16, device="cuda", max_seqs=b)]
        cs.append(PagedKVCache(pattern, num_pages=pages, head_dim=d, dtype=torch.bfloat16, device="cuda",
                               table=cs[0].table))
        if not token_kernel:
            for c in cs:
                c._token_rows = 0
        ids = [cs[0].add_sequence() for _ in range(b)]
        for c in cs:
            c.append(ids, k, v, only_needed=True)
        got.append([c.gather(s) for c in cs for s in ids])
        if token_kernel:
            assert (cs[1]._k_all[-1] == 0).all() and (cs[1]._v_all[-1] == 0).all()
    for (ka, va), (kb, vb) in zip(*got):
        assert torch.equal(ka, kb) and torch.equal(va, vb)
