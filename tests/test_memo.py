"""The per-object memo behind the launch path's plan and module lookups."""
import gc

import pytest

import s2dsl
from s2dsl import memo
from s2dsl.codegen import Specialization, lower
from s2dsl.runtime.kernels import forward_module


def _pattern():
    return s2dsl.local_stride(block=16, local_blocks=2, vert_stride=4, heads=4, kv_heads=2)


def test_values_live_as_long_as_their_object():
    calls = []

    class Obj:
        pass
    a, b = Obj(), Obj()
    assert memo.per_object(a, "k", lambda: calls.append("a") or 1) == 1
    assert memo.per_object(a, "k", lambda: calls.append("a2") or 2) == 1  # computed once per object and key
    assert memo.per_object(a, "other", lambda: 3) == 3
    assert memo.per_object(b, "k", lambda: calls.append("b") or 4) == 4
    assert calls == ["a", "b"]
    ident = id(a)
    assert ident in memo._memos
    del a
    gc.collect()
    assert ident not in memo._memos  # the dead object's values are gone with it (others' may go too)


def test_a_failing_make_memoises_nothing():
    class Obj:
        pass
    o = Obj()
    with pytest.raises(ZeroDivisionError):
        memo.per_object(o, "k", lambda: 1 / 0)
    assert memo.per_object(o, "k", lambda: 5) == 5


def test_plans_and_modules_are_shared_per_pattern_and_equal_across_equal_patterns():
    p, q = _pattern(), _pattern()
    assert p == q and p is not q
    assert lower(p) is lower(p) and lower(p) == lower(q)
    spec = Specialization(head_dim=16, block_m=16, block_n=16)
    assert forward_module(p, spec) is forward_module(p, spec)
    assert forward_module(q, spec) is forward_module(p, spec)  # the kernel cache's one module for the key
    other = Specialization(head_dim=32, block_m=16, block_n=16)
    assert forward_module(p, other).HEAD_DIM == 32 and forward_module(p, spec).HEAD_DIM == 16


def test_a_pattern_first_lowered_inside_torch_compile_compiles_once():
    """The memo is skipped inside a trace: dynamo does not guard on it (a pattern first used
    inside a compiled function made the second call recompile)."""
    import torch
    import torch._dynamo.testing
    torch._dynamo.reset()
    p = s2dsl.local_stride(block=16, local_blocks=3, vert_stride=5, heads=2)  # never lowered before
    counts = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counts, fullgraph=True)
    def f(x):
        return x * lower(p).heads

    x = torch.ones(3)
    assert torch.equal(f(x), 2 * x) and torch.equal(f(x), 2 * x)
    assert counts.frame_count == 1
