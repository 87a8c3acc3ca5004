"""Kernel cache, the public API, custom-op tracing."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

import s2dsl
from s2dsl.codegen import Specialization
from s2dsl.runtime.cache import CHECKSUM_PREFIX, KernelCache
from s2dsl.runtime.kernels import forward_module

from conftest import ROOT

# CPU tests of the kernels under the Triton interpreter; tests/test_gpu.py covers the GPU
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
DEVICE = "cpu"
PATTERN = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=4, heads=4, kv_heads=2)


def _qkv(n=40, d=16, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    make = lambda h: torch.randn(1, h, n, d, generator=g).to(DEVICE, dtype).requires_grad_(requires_grad)
    return make(4), make(2), make(2)


# ------------------------------------------------------------------ cache
def test_cache_generates_once_then_hits_memory_and_disk(tmp_path):
    cache = KernelCache(tmp_path)
    spec = Specialization(head_dim=16, block_m=16, block_n=16)
    first = forward_module(PATTERN, spec, cache)
    assert cache.stats.generated == 1 and len(list(tmp_path.glob("*.py"))) == 1
    assert forward_module(PATTERN, spec, cache) is first and cache.stats.memory_hits == 1
    fresh = KernelCache(tmp_path)  # another process, in effect
    forward_module(PATTERN, spec, fresh)
    assert fresh.stats.generated == 0 and fresh.stats.disk_hits == 1


def test_cache_key_separates_specialisations(tmp_path):
    cache = KernelCache(tmp_path)
    base = Specialization(head_dim=16, dtype="float16", block_m=16, block_n=16)
    forward_module(PATTERN, base, cache)
    forward_module(PATTERN, replace(base, head_dim=32), cache)
    forward_module(PATTERN, replace(base, dtype="bfloat16"), cache)
    forward_module(PATTERN, replace(base, layout="bshd"), cache)
    other = s2dsl.local_stride(block=16, local_blocks=3, vert_stride=4, heads=4, kv_heads=2)
    forward_module(other, base, cache)
    assert cache.stats.generated == 5 and len(list(tmp_path.glob("*.py"))) == 5


def test_corrupted_entry_is_detected_and_regenerated(tmp_path):
    spec = Specialization(head_dim=16, block_m=16, block_n=16)
    forward_module(PATTERN, spec, KernelCache(tmp_path))
    (entry,) = tmp_path.glob("*.py")
    text = entry.read_text()
    entry.write_text(text.replace("tl.dot(q, k)", "tl.dot(q, k) * 0"))  # a silent miscompile, if trusted
    cache = KernelCache(tmp_path)
    forward_module(PATTERN, spec, cache)
    assert cache.stats.corrupted == 1 and cache.stats.generated == 1
    assert entry.read_text() == text
    entry.write_text(text[: len(text) // 2])  # a torn write
    cache = KernelCache(tmp_path)
    forward_module(PATTERN, spec, cache)
    assert cache.stats.corrupted == 1 and entry.read_text().startswith(CHECKSUM_PREFIX)


def test_concurrent_fill_leaves_whole_entries(tmp_path):
    specs = [Specialization(head_dim=d, block_m=16, block_n=16) for d in (16, 32, 48, 64)] * 4

    def fill(spec):
        return forward_module(PATTERN, spec, KernelCache(tmp_path)).HEAD_DIM

    with ThreadPoolExecutor(8) as pool:
        dims = list(pool.map(fill, specs))
    assert dims == [s.head_dim for s in specs]
    assert len(list(tmp_path.glob("*.py"))) == 4 and not list(tmp_path.glob("*.tmp"))
    for entry in tmp_path.glob("*.py"):
        cache = KernelCache(tmp_path)
        assert cache._valid(entry)


def test_second_process_with_warm_cache_generates_nothing(tmp_path):
    script = textwrap.dedent("""
        import torch, s2dsl
        from s2dsl.runtime.cache import default_cache
        p = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=4, heads=4, kv_heads=2)
        q = torch.randn(1, 4, 20, 16); k = torch.randn(1, 2, 20, 16)
        out = s2dsl.attention(q, k, k, p)
        ref = s2dsl.reference_attention(q, k, k, p)
        assert torch.allclose(out, ref, atol=1e-5)
        print(default_cache().stats.generated, default_cache().stats.disk_hits)
    """)
    env = dict(os.environ, S2DSL_CACHE_DIR=str(tmp_path), TRITON_INTERPRET="1")
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert runs[0].stdout.split() == ["1", "0"]
    assert runs[1].stdout.split() == ["0", "1"]


# ------------------------------------------------------------------- API
def test_attention_module_and_decorator_agree_with_reference():
    q, k, v = _qkv()
    ref = s2dsl.reference_attention(q, k, v, PATTERN)
    torch.testing.assert_close(s2dsl.attention(q, k, v, PATTERN), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s2dsl.SparseAttention(PATTERN)(q, k, v), ref, atol=2e-5, rtol=2e-5)

    @s2dsl.sparse_attention(PATTERN)
    def attn(q, k, v, scale=None):
        mask = PATTERN.token_mask(q.shape[2], k.shape[2])
        k, v = (t.repeat_interleave(PATTERN.group_size, 1) for t in (k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    torch.testing.assert_close(attn(q, k, v), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(attn.reference(q, k, v), ref, atol=2e-5, rtol=2e-5)
    assert attn.pattern is PATTERN


def test_decorator_loads_a_file(tmp_path):
    path = tmp_path / "two.s2"
    path.write_text("pattern a { block = 16 heads = 2 heads * { window 2 } }\n"
                    "pattern b { block = 16 heads = 2 heads * { dense } }\n")
    with pytest.raises(ValueError, match="name="):
        s2dsl.sparse_attention(path)
    fn = s2dsl.sparse_attention(path, name="b")(lambda q, k, v, scale=None: None)
    q = torch.randn(1, 2, 20, 16, device=DEVICE)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(fn(q, q, q), ref, atol=2e-5, rtol=2e-5)


def test_torch_compile_traces_without_graph_break():
    q, k, v = _qkv()

    def f(q, k, v):
        return s2dsl.attention(q * 2, k, v, PATTERN).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v), atol=1e-5, rtol=1e-5)


def test_torch_compile_in_a_fresh_process_first_call():
    """The first call of a pattern may happen inside torch.compile (nothing registered before)."""
    script = textwrap.dedent("""
        import torch, s2dsl
        p = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=3, heads=2)
        q = torch.randn(1, 2, 40, 16)
        f = torch.compile(lambda q: s2dsl.attention(q, q, q, p), fullgraph=True, backend="aot_eager")
        assert torch.allclose(f(q), s2dsl.reference_attention(q, q, q, p), atol=1e-5)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_pattern_serialization_round_trips():
    for path in (ROOT / "examples").glob("*.s2"):
        for pattern in s2dsl.load(path).values():
            again = s2dsl.Pattern.deserialize(pattern.serialize())
            assert again == pattern and again.fingerprint() == pattern.fingerprint()


def test_several_processes_fill_one_cache_at_once(tmp_path):
    script = textwrap.dedent("""
        import sys, s2dsl
        from s2dsl.codegen import Specialization
        from s2dsl.runtime.cache import default_cache
        from s2dsl.runtime.kernels import forward_module
        p = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=4, heads=4, kv_heads=2)
        for d in (16, 32, 48, 64):  # every process asks for the same four entries
            assert forward_module(p, Specialization(head_dim=d, block_m=16, block_n=16)).HEAD_DIM == d
        print(default_cache().stats.generated)
    """)
    env = dict(os.environ, S2DSL_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, err, code in results:
        assert code == 0, err[-2000:]
    entries = list(tmp_path.glob("*.py"))
    assert len(entries) == 4 and not list(tmp_path.glob("*.tmp"))
    assert all(KernelCache(tmp_path)._valid(e) for e in entries)
    assert KernelCache(tmp_path).stats.corrupted == 0
