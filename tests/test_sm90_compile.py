"""Generated kernels compile for sm_90 — on a machine without a GPU.

The Triton interpreter (the CPU tests) runs Python semantics and accepts code the GPU compiler
refuses: a name given a 2D value in one branch of a runtime ``if`` and a 1D value in the other
broke every top-k decode step on the first H200 run. Triton compiles for a named target with its
bundled ptxas, so these tests capture real launches under the interpreter, then compile the same
generated functions for ``GPUTarget("cuda", 90, 32)`` in a subprocess without the interpreter.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import s2dsl

_TYPES = {torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1",
          torch.uint8: "*u8", torch.int8: "*i8", torch.float16: "*fp16", torch.bfloat16: "*bf16"}

_COMPILE = """
import importlib.util, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
out = []
for job in json.load(sys.stdin):
    spec = importlib.util.spec_from_file_location("generated", job["file"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, job["name"])
    attrs = {(i,): [["tt.divisibility", 16]] for i in job["div16"]}  # as the JIT marks aligned arguments
    c = triton.compile(ASTSource(fn, job["sig"], job["consts"], attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": job["warps"], "num_stages": job["stages"]})
    out.append(c.metadata.shared)
print(json.dumps(out))
"""


def _job(fn, args, kwargs) -> dict:
    """Signature and constants of one launch of the interpreted function ``fn``."""
    params = inspect.signature(fn).parameters
    sig, consts, div16 = {}, {}, []
    values = dict(zip(params, args), **{k: v for k, v in kwargs.items() if k in params})
    for i, (name, p) in enumerate(params.items()):
        value = values[name]
        if "constexpr" in str(p.annotation):
            sig[name], consts[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = _TYPES[value.dtype]
            div16.append(i)
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if abs(int(value)) >= 2 ** 31 else "i32"
            if int(value) % 16 == 0:
                div16.append(i)
    return {"file": fn.__code__.co_filename, "name": fn.__name__, "sig": sig, "consts": consts, "div16": div16,
            "warps": kwargs.get("num_warps", 4), "stages": kwargs.get("num_stages", 2)}


class _Capture:
    """Stands in for an interpreted kernel: records each launch's job, then runs it or not."""

    def __init__(self, kernel, jobs: list, run: bool):
        self.kernel, self.jobs, self.run = kernel, jobs, run

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.jobs.append(_job(self.kernel.fn, args, kwargs))
            if self.run:
                self.kernel[grid](*args, **kwargs)
        return launch


def _compile_sm90(jobs) -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(jobs), text=True, env=env,
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="captures interpreted launches")
def test_topk_decode_update_kernel_compiles_for_sm90(monkeypatch):
    from s2dsl.runtime import topk_state
    from s2dsl.runtime.decode import cached_attention
    from s2dsl.runtime.kv_cache import PagedKVCache

    jobs = []
    init = topk_state.TopKDecodeState.__init__

    def capturing_init(self, cache):
        init(self, cache)
        space = self._update.__globals__  # the generated module's namespace
        space["update_kernel"] = _Capture(space["update_kernel"], jobs, run=True)

    monkeypatch.setattr(topk_state.TopKDecodeState, "__init__", capturing_init)
    # with and without a ring of recent steps, and a group without top-k heads beside one with
    bodies = ("heads * { window 2 sink 1 topk 3 recent 4 }", "heads * { window 2 topk 3 }",
              "heads 0..1 { window 2 topk 2 recent 3 } heads 2..3 { window 3 stride 4 }")
    torch.manual_seed(0)
    for body in bodies:
        pattern = s2dsl.parse(f"pattern t {{ block = 16 heads = 4 kv_heads = 2 causal {body} }}")["t"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # topk heads keep every page
            cache = PagedKVCache(pattern, num_pages=32, head_dim=16, dtype=torch.float32)
        ids = [cache.add_sequence()]
        q, k, v = (torch.randn(1, h, 50, 16) for h in (4, 2, 2))
        cached_attention(cache, ids, q[:, :, :49], k[:, :, :49], v[:, :, :49])
        cached_attention(cache, ids, q[:, :, 49:], k[:, :, 49:], v[:, :, 49:])
    assert len(jobs) >= len(bodies)
    unique = list({json.dumps(j["consts"], sort_keys=True): j for j in jobs}.values())
    for shared in _compile_sm90(unique):
        assert shared <= 232448  # sm_90's shared memory per block


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="captures interpreted launches")
def test_bidirectional_extended_forward_fits_sm90_shared_memory(monkeypatch):
    """The forward the GPU would run for a bidirectional two-sided + relative plan at head dim 128
    fits sm_90's shared memory (three stages asked 240 KB on the first H200 run)."""
    from s2dsl.runtime import attention, kernels

    pattern = s2dsl.parse("pattern bi { block = 64 heads = 2 bidirectional "
                          "heads * { window 4 ahead 3 stride 3 relative } }")["bi"]
    monkeypatch.setattr(kernels.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    real_choose = attention.choose_forward

    def gpu_spec(pattern, dtype, head_dim, layout, device, tuning=None, **kw):
        kw["kv_tma"] = False
        return real_choose(pattern, dtype, head_dim, layout, torch.device("cuda"), tuning, **kw)

    monkeypatch.setattr(attention, "choose_forward", gpu_spec)
    jobs = []
    real_module = attention.forward_module

    def capturing_module(pattern, spec, *a, **k):
        module = real_module(pattern, spec, *a, **k)
        monkeypatch.setattr(module, "kernel", _Capture(module.kernel, jobs, run=False))
        return module

    monkeypatch.setattr(attention, "forward_module", capturing_module)
    # fp16: the interpreter computes bf16 in float32 (see validate); fp16 tiles are the size of bf16 ones
    q, k, v = (torch.randn(1, 2, 256, 128, dtype=torch.float16) for _ in range(3))
    attention.forward(q, k, v, pattern)
    assert jobs
    for shared in _compile_sm90(jobs):
        assert shared <= 232448, shared


#: the decode kernel's loop forms timed by benchmarks/sweep_kernels.py (issue 14)
DECODE_VARIANTS = ({}, {"flat": True}, {"early_v": True}, {"early_v": True, "fused_combine": True},
                   {"flat": True, "early_v": True, "fused_combine": True}, {"flat": True, "early_v": True, "force_dot": True}, {"flat": True, "pages_per_step": 2}, {"force_dot": True},
                   {"flat": True, "prefetch": True}, {"flat": True, "prefetch": True, "force_dot": True},
                   {"flat": True, "prefetch": True, "pages_per_step": 2, "num_warps": 8},
                   {"flat": True, "pages_per_step": 2, "num_warps": 8}, {"flat": True, "pages_per_step": 4, "num_warps": 8})


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="captures interpreted launches")
def test_decode_variants_compile_for_sm90():
    """The GPU specialisation (bf16, head dim 128, 64-token pages, 3 stages) of every decode loop
    form: MHA (one row per program, no tl.dot), GQA (a group's rows through tl.dot), a group
    of heads with different patterns and one with several residues, with and without splits."""
    from dataclasses import replace
    from s2dsl.codegen.decode import DecodeSpecialization
    from s2dsl.runtime.decode import decode_module

    patterns = [s2dsl.local_stride(block=64, local_blocks=16, vert_stride=8, heads=4),
                s2dsl.local_stride(block=64, local_blocks=16, vert_stride=32, heads=8, kv_heads=2),
                s2dsl.parse("pattern p { block = 64 heads = 4 kv_heads = 2 causal heads 0..0 { window 2 sink 1 } "
                            "heads 1..1 { window 4 stride 3 offset 1 } heads 2..3 { window 1 stride 4 stride 6 } }")["p"]]
    base = DecodeSpecialization(dtype="bfloat16", head_dim=128, capability=(9, 0), block_q=1, block_n=64,
                                num_warps=4, num_stages=3)
    jobs = []
    for pattern in patterns:
        b, pages = 2, 40
        q = torch.zeros(b, pattern.heads, 1, 128, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        lse = torch.empty(b, pattern.heads, 1)
        k_pages = torch.zeros(pages, 64, 128, dtype=torch.bfloat16)
        table = torch.zeros(b, pattern.kv_heads, 16, dtype=torch.int32)
        slots = torch.arange(b, dtype=torch.int32)
        lens = torch.full((b,), 1000, dtype=torch.int32)
        for tuning in DECODE_VARIANTS:
            module = decode_module(pattern, replace(base, **tuning))
            space = module.launch.__globals__
            saved = space["kernel"], space["combine_kernel"]
            space["kernel"], space["combine_kernel"] = (_Capture(k, jobs, run=False) for k in saved)
            try:
                for splits in (1, 4):
                    module.launch(q, out, lse, k_pages, k_pages, table, slots, lens, 1, splits, 0.1)
            finally:
                space["kernel"], space["combine_kernel"] = saved
    unique = list({json.dumps([j["file"], j["name"], j["consts"], j["warps"]], sort_keys=True): j for j in jobs}.values())
    assert len(unique) >= len(patterns) * len(DECODE_VARIANTS)
    for job, shared in zip(unique, _compile_sm90(unique)):
        assert shared <= 232448, (job["consts"], shared)


#: forward variants timed by benchmarks/sweep_kernels.py (issue 14), on top of the GPU's pick at 8K
FORWARD_VARIANTS = ({}, {"persistent": 2}, {"fuse_diagonal": True}, {"fuse_diagonal": True, "persistent": 2},
                    {"window_span": 2}, {"kv_load": "pointer"}, {"kv_load": "pointer", "residue_span": 2},
                    {"block_m": 128, "num_warps": 8, "window_span": 2, "kv_load": "pointer", "persistent": 1},
                    {"block_m": 128, "num_warps": 8, "window_span": 1, "kv_load": "pointer", "fuse_diagonal": True})


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="captures interpreted launches")
def test_forward_variants_compile_for_sm90():
    """bf16, head dim 128, block 64, local 16 / stride 32: every forward variant of the sweep
    compiles for sm_90 and fits its shared memory (the persistent loop around the body too)."""
    from dataclasses import replace
    from s2dsl.runtime.kernels import choose_forward_for_gpu, forward_module

    pattern = s2dsl.local_stride(block=64, local_blocks=16, vert_stride=32, heads=4)
    base = replace(choose_forward_for_gpu(pattern, 128, 8192, True), dtype="bfloat16", head_dim=128, layout="bhsd")
    n = 1024
    q = torch.zeros(1, 4, n, 128, dtype=torch.bfloat16)
    lse = torch.empty(1, 4, n)
    st = (q.stride(0), q.stride(1), q.stride(2))
    jobs = []
    for tuning in FORWARD_VARIANTS:
        module = forward_module(pattern, replace(base, **tuning))
        space = module.launch.__globals__
        saved = space["kernel"]
        space["kernel"] = _Capture(saved, jobs, run=False)
        try:
            module.launch(q, q, q, torch.empty_like(q), lse, st, st, st, st, (lse.stride(0), lse.stride(1)), 1, n,
                          n, n, None, None, 0.1)
        finally:
            space["kernel"] = saved
    assert len({j["file"] for j in jobs}) == len(FORWARD_VARIANTS)
    for job, shared in zip(jobs, _compile_sm90(jobs)):
        assert shared <= 232448, (job["file"], shared)


_SPILLS = """
import subprocess, sys, tempfile
import triton
ptx = sys.stdin.read()
with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
    f.write(ptx)
r = subprocess.run([triton.__path__[0] + "/backends/nvidia/bin/ptxas", "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"],
                   capture_output=True, text=True)
print(r.stderr)
"""


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="captures interpreted launches")
def test_prefill_selection_kernels_compile_for_sm90():
    """The prefill selection's generated kernels as the GPU runs them (bf16, head dim 128, block 64,
    the GPU's pooling step): pooled keys, pooled top-k per query tile (padded and packed batches,
    causal and bidirectional, K 16 and the largest K kept in registers, the three running top-K merges
    and both dot precisions) and the score mode the bound / last-row estimators use; and select_kernel at
    K 16 and 128 spills no registers (ptxas: a bare data-dependent loop in the merge once spilled
    6.8 KB per thread)."""
    from s2dsl.runtime import topk as topk_mod

    jobs = []
    cases = [("causal heads * { window 16 sink 1 topk 16 }", "pooled", "bitonic", "ieee"),
             ("causal heads * { window 16 sink 1 topk 16 }", "pooled", "insert", "ieee"),
             ("causal heads * { window 16 sink 1 topk 16 }", "pooled", "extract", "ieee"),  # the GPU's default
             ("causal heads * { window 16 sink 1 topk 16 }", "pooled", "bitonic", "tf32x3"),
             ("causal heads * { window 16 sink 1 topk 16 }", "bound", "bitonic", "ieee"),
             ("causal heads 0..1 { window 4 topk 128 } heads 2..3 { window 4 stride 8 }", "pooled", "insert", "ieee"),
             ("bidirectional heads * { window 2 topk 3 }", "pooled", "bitonic", "ieee")]
    for body, estimator, merge, dot in cases:
        pattern = s2dsl.parse(f"pattern s {{ block = 64 heads = 4 kv_heads = 2 {body} }}")["s"]
        module = topk_mod._prefill_info(pattern)[0]
        saved = {n: getattr(module, n) for n in ("pool_kernel", "select_kernel", "pool_step", "SELECT_MERGE",
                                                 "SELECT_DOT")}
        module.pool_kernel, module.select_kernel = (_Capture(saved[n], jobs, run=False)
                                                    for n in ("pool_kernel", "select_kernel"))
        module.pool_step = lambda device: min(4, pattern.block)  # the GPU's, not the interpreter's whole block
        module.SELECT_MERGE, module.SELECT_DOT = merge, dot
        try:
            q = torch.zeros(1, 4, 1024, 128, dtype=torch.bfloat16)
            k = torch.zeros(1, 2, 1024, 128, dtype=torch.bfloat16)
            topk_mod.select_blocks(q, k, pattern, estimator=estimator)
            if estimator == "pooled":
                cu = torch.tensor([0, 300, 1024], dtype=torch.int32)
                topk_mod.select_blocks(q[0].transpose(0, 1), k[0].transpose(0, 1), pattern, cu_seqlens_q=cu,
                                       cu_seqlens_k=cu)
        finally:
            for n, v in saved.items():
                setattr(module, n, v)
    unique = list({json.dumps([j["name"], j["consts"]], sort_keys=True): j for j in jobs}.values())
    assert {j["name"] for j in unique} == {"pool_kernel", "select_kernel"}
    selects = [j for j in unique if j["name"] == "select_kernel"]
    assert {(j["consts"]["FROM_SCORES"], j["consts"]["PACKED"]) for j in selects} \
        >= {(False, False), (False, True), (True, False)}
    assert {(j["consts"]["MERGE"], j["consts"]["DOT_PRECISION"]) for j in selects} \
        == {(2, "ieee"), (1, "ieee"), (0, "ieee"), (2, "tf32x3")}
    for job, shared in zip(unique, _compile_sm90(unique)):
        assert shared <= 232448, (job["name"], job["consts"], shared)
    # register spills of the opt-in insert and bitonic merges' unpacked causal launches (K 16; insert
    # also K 128); extract, the GPU's default, ran there
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for job in selects:
        c = job["consts"]
        if c["PACKED"] or c["FROM_SCORES"] or c["DOT_PRECISION"] != "ieee" or c["MERGE"] == 0 or not c["CAUSAL"]:
            continue
        ptx = subprocess.run([sys.executable, "-c", _COMPILE.replace("out.append(c.metadata.shared)",
                                                                     "out.append(c.asm['ptx'])")],
                             input=json.dumps([job]), text=True, env=env, capture_output=True, timeout=600)
        assert ptx.returncode == 0, ptx.stderr[-2000:]
        info = subprocess.run([sys.executable, "-c", _SPILLS], input=json.loads(ptx.stdout.strip().splitlines()[-1])[0],
                              text=True, env=env, capture_output=True, timeout=600).stdout
        spilled = [int(n) for n in re.findall(r"(\d+) bytes spill stores", info)]
        assert spilled and max(spilled) <= 64, (c["K_PAD"], c["MERGE"], info)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="captures interpreted launches")
def test_kv_write_kernel_compiles_for_sm90(monkeypatch):
    """The decode step's K/V write kernel (runtime.kv_write), as a decode step launches it, in
    16-bit and float32 pools."""
    from s2dsl.runtime import kv_write
    from s2dsl.runtime.kv_cache import PagedKVCache
    jobs = []
    monkeypatch.setattr(kv_write, "kv_rows_kernel", _Capture(kv_write.kv_rows_kernel, jobs, run=True))
    pattern = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=4, heads=4, kv_heads=2)
    for dtype, d in ((torch.float16, 64), (torch.float32, 80)):
        cache = PagedKVCache(pattern, num_pages=8, head_dim=d, dtype=dtype)
        ids = [cache.add_sequence(), cache.add_sequence()]
        k = torch.randn(2, 2, 1, d).to(dtype)
        cache.append(ids, k, k)
        assert torch.equal(cache.gather(ids[1])[0][:, -1], k[1, :, 0])
    assert len(jobs) == 2
    _compile_sm90(jobs)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="captures interpreted launches")
def test_kv_token_write_kernel_compiles_for_sm90(monkeypatch):
    """The prefill K/V write kernel (runtime.kv_write.write_kv_tokens), as a first prefill through
    the cache launches it: a transposed bf16-shaped projection into 16-bit pools, float32 into float32."""
    from s2dsl.runtime import kv_write
    from s2dsl.runtime.kv_cache import PagedKVCache
    jobs = []
    monkeypatch.setattr(kv_write, "kv_tokens_kernel", _Capture(kv_write.kv_tokens_kernel, jobs, run=True))
    pattern = s2dsl.local_stride(block=16, local_blocks=2, vert_stride=4, heads=4, kv_heads=2)
    for dtype, d in ((torch.float16, 64), (torch.float32, 80)):
        cache = PagedKVCache(pattern, num_pages=16, head_dim=d, dtype=dtype)
        ids = [cache.add_sequence()]
        k = torch.randn(1, 100, 2, d).to(dtype).transpose(1, 2)
        cache.append(ids, k, k, only_needed=True)
        assert torch.equal(cache.gather(ids[0])[0][:, -1], k[0, :, -1])
    assert len(jobs) == 2
    _compile_sm90(jobs)


#: the backward variants timed by benchmarks/sweep_kernels.py (BWD_DEFAULT, issue 14)
BACKWARD_VARIANTS = ({"dq_load": "tma", "dkdv_load": "tma"}, {"dkdv_load": "tma"},
                     {"dkdv_query_major": True, "dq_load": "tma", "dkdv_load": "tma"},
                     {"dkdv_block_m": 32, "dq_load": "tma", "dkdv_load": "tma"},
                     {"one_grid": False, "two_streams": True, "dq_load": "tma", "dkdv_load": "tma", "block_n": 32,
                      "num_stages": 1})


def _backward_jobs(tunings) -> list:
    """The captured launches (delta, then the one-grid or the dK/dV and dQ kernels) of the GPU
    backward specialisation with each of ``tunings``, bf16, head dim 128, block 64, 4 kv heads."""
    from dataclasses import replace
    from s2dsl.runtime.backward import backward_module, choose_backward_for_gpu

    pattern = s2dsl.local_stride(block=64, local_blocks=16, vert_stride=8, heads=4)
    base = replace(choose_backward_for_gpu(pattern, 128), dtype="bfloat16", layout="bhsd")
    n = 1024
    q = torch.zeros(1, 4, n, 128, dtype=torch.bfloat16)
    lse = torch.zeros(1, 4, n)
    st = (q.stride(0), q.stride(1), q.stride(2))
    jobs = []
    for tuning in tunings:
        module = backward_module(pattern, replace(base, **tuning))
        space = module.launch.__globals__
        names = ("preprocess_kernel", "backward_kernel", "dkdv_kernel", "dq_kernel")
        saved = {name: space[name] for name in names}
        space.update({name: _Capture(kernel, jobs, run=False) for name, kernel in saved.items()})
        try:
            module.launch(q, q, q, q, q, lse, q, q, q, st, st, st, st, st, st, st, st, (lse.stride(0), lse.stride(1)),
                          1, n, n, None, None, 0.1)
        finally:
            space.update(saved)
    return jobs


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="captures interpreted launches")
def test_backward_variants_compile_for_sm90():
    """Every backward variant of the sweep compiles for sm_90 and fits its shared memory (two
    programs per SM need <= 113 KB each; benchmarks/compile_report.py --backward has the counts)."""
    jobs = [job for job in _backward_jobs(BACKWARD_VARIANTS) if job["name"] != "preprocess_kernel"]
    assert len(jobs) == len(BACKWARD_VARIANTS) + 1  # the two-launch variant has two kernels
    for job, shared in zip(jobs, _compile_sm90(jobs)):
        assert shared <= 113 * 1024, (job["name"], job["file"], shared)
