"""The compiler's resource report of generated forward kernels for sm_90, on a machine without a GPU.

Triton compiles for a named target (``GPUTarget("cuda", 90, 32)``) with its bundled ptxas, so
registers, stack (spill) bytes and shared memory of every variant can be read before any GPU
time is spent; ``cuobjdump``/``nvdisasm`` (bundled too) count the SASS instructions that tell
the paths apart (HGMMA: wgmma, QGMMA: its FP8 form; LDGSTS: cp.async pipelining; UTMALDG: TMA loads;
STL/LDL: spill stores/loads; BAR: CTA barriers; MUFU.EX2: exponentials), each counted in the whole kernel's SASS.
The integer arguments are marked 16-divisible and the pointers 16-aligned, as Triton's JIT
marks them at a launch over torch tensors with lengths that are multiples of 16.

    python benchmarks/compile_report.py --stride 32 --variants '[{}, {"kv_load": "tma", "block_m": 64}]'
    python benchmarks/compile_report.py --decode --variants '[{}, {"flat": true, "pages_per_step": 2}]'
    python benchmarks/compile_report.py --stride 8 --variants '[{"kv_load": "tma", "block_m": 64, "num_warps": 4,
        "window_span": 1}, {"qk_fp8": true, "kv_load": "tma", "block_m": 64, "num_warps": 4, "window_span": 1}]'

``qk_fp8``: K is the e4m3 copy (``*fp8e4nv``) and ``QGMMA`` counts the FP8 wgmma.

``--decode``: the decode kernel's GPU specialisation (one query, 64-token pages, the split
path) instead, with ``--kv-heads`` q-head groups (32: MHA, one row per program).
``--backward``: the backward's GPU specialisation (``choose_backward_for_gpu``; it does not
depend on the sequence length), one line per kernel of the generated module: ``dq``, ``dkdv``
and, for one-grid specialisations (the default), ``both`` (the kernel that runs).

    python benchmarks/compile_report.py --backward --stride 8 --variants '[{}, {"qdo_load": "tma"}]'
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import triton
from triton.backends.compiler import GPUTarget

import s2dsl
from s2dsl.codegen import generate_forward, lower
from s2dsl.runtime.kernels import choose_forward_for_gpu

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_CONSTS = ("HEADS GROUP BLOCK CAUSAL TABLE_WIDTH BLOCK_M BLOCK_N WINDOW_SPAN WIDE_N RES_N HEAD_DIM D_PAD").split()


def _module(source: str, tmp: Path):
    path = tmp / f"fwd_{abs(hash(source))}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_forward(pattern, tuning: dict, head_dim: int, dtype: str, tmp: Path):
    """Triton's compiled kernel for the GPU specialisation of ``pattern`` with ``tuning``."""
    spec = replace(choose_forward_for_gpu(pattern, head_dim), dtype=dtype, head_dim=head_dim, layout="bhsd",
                   capability=(9, 0), **tuning)
    module = _module(generate_forward(lower(pattern), spec), tmp)
    names = module.kernel.arg_names
    elem = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
    sig, consts = {}, {}
    for name in names:
        if name in _CONSTS:
            sig[name], consts[(names.index(name),)] = "constexpr", getattr(module, name)
        elif name == "FP8_EXACT":  # the interpreter's rounding: off on a GPU
            sig[name], consts[(names.index(name),)] = "constexpr", False
        elif name == "K" and spec.qk_fp8:  # the e4m3 copy quantize_k writes
            sig[name] = "*fp8e4nv"
        elif name in ("Q", "K", "V", "Out"):
            sig[name] = "*" + elem
        elif name in ("Lse", "KScale"):
            sig[name] = "*fp32"
        elif name in ("HeadTable", "CuSeqQ", "CuSeqK", "Sel"):  # Sel: a top-k pattern's selected blocks
            sig[name] = "*i32"
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n] not in ("constexpr", "fp32")}
    src = triton.compiler.ASTSource(fn=module.kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": module.NUM_WARPS, "num_stages": module.NUM_STAGES})


_DEC_CONSTS = "KV_HEADS GROUP BLOCK H_WIDTH G_WIDTH BLOCK_Q ROWS USE_DOT BLOCK_N HEAD_DIM D_PAD PAGES".split()
_DEC_ALIGNED = {"stride_qb", "stride_qh", "stride_ob", "stride_oh", "stride_page", "stride_tok", "stride_bt_slot",
                "stride_bt_head"}


def compile_decode(pattern, tuning: dict, head_dim: int, dtype: str, tmp: Path):
    """Triton's compiled decode kernel (split path) for the GPU specialisation with ``tuning``."""
    from s2dsl.codegen.decode import generate_decode
    from s2dsl.runtime.decode import choose_decode
    import torch
    spec = choose_decode(pattern, getattr(torch, dtype), head_dim, 1, torch.device("cpu"))
    gpu = dict(block_n=min(pattern.block, 64 if head_dim <= 128 else 32), num_warps=4,
               num_stages=3 if head_dim <= 128 else 2, capability=(9, 0))  # choose_decode's GPU pick
    spec = replace(spec, **dict(gpu, **tuning))
    module = _module(generate_decode(lower(pattern), spec), tmp)
    names = module.kernel.arg_names
    elem = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
    sig, consts = {}, {}
    for name in names:
        if name in _DEC_CONSTS or name == "SPLIT":
            sig[name], consts[(names.index(name),)] = "constexpr", True if name == "SPLIT" else getattr(module, name)
        elif name in ("Q", "KPages", "VPages", "Out"):
            sig[name] = "*" + elem
        elif name in ("Lse", "OutPart", "LsePart"):
            sig[name] = "*fp32"
        elif name in ("BlockTable", "Slots", "SeqLens", "HeadTable", "GroupTable", "Count"):
            sig[name] = "*i32"
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or n in _DEC_ALIGNED}
    src = triton.compiler.ASTSource(fn=module.kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": module.NUM_WARPS, "num_stages": module.NUM_STAGES})


_BWD_CONSTS = ("HEADS KV_HEADS GROUP BLOCK CAUSAL TABLE_WIDTH HEAD_DIM D_PAD BLOCK_M BLOCK_N DQ_BLOCK_M DQ_BLOCK_N "
               "DKDV_BLOCK_M DKDV_BLOCK_N").split()
# per backward kernel: the prefix of its BLOCK_M/BLOCK_N module constants (each pass has its own
# tiles) and of its NUM_WARPS/NUM_STAGES (the one-grid kernel runs with the dQ kernel's)
_BWD_TILES = {"dq_kernel": ("DQ_", "DQ_NUM_"), "dkdv_kernel": ("DKDV_", "DKDV_NUM_"),
              "backward_kernel": ("", "DQ_NUM_")}


def compile_backward(pattern, tuning: dict, head_dim: int, dtype: str, tmp: Path) -> dict:
    """Triton's compiled backward kernels (name -> compiled) for the GPU specialisation with ``tuning``:
    ``dq`` and ``dkdv`` always, ``both`` too when the specialisation runs them in one grid."""
    from s2dsl.codegen.backward import generate_backward
    from s2dsl.runtime.backward import choose_backward_for_gpu
    spec = replace(choose_backward_for_gpu(pattern, head_dim), dtype=dtype, head_dim=head_dim, layout="bhsd",
                   capability=(9, 0), **tuning)
    module = _module(generate_backward(lower(pattern), spec), tmp)
    elem = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
    kernels = {"dq": "dq_kernel", "dkdv": "dkdv_kernel"}
    if module.ONE_GRID:
        kernels["both"] = "backward_kernel"
    out = {}
    for label, kname in kernels.items():
        kernel = getattr(module, kname)
        names = kernel.arg_names
        prefix, warps_prefix = _BWD_TILES[kname]
        sig, consts = {}, {}
        for name in names:
            if name in _BWD_CONSTS:
                value = getattr(module, prefix + name if name in ("BLOCK_M", "BLOCK_N") else name)
                sig[name], consts[(names.index(name),)] = "constexpr", value
            elif name in ("Q", "K", "V", "DO", "DQ", "DK", "DV"):
                sig[name] = "*" + elem
            elif name in ("Lse", "Delta"):
                sig[name] = "*fp32"
            elif name in ("HeadTable", "CuSeqQ", "CuSeqK"):
                sig[name] = "*i32"
            else:
                sig[name] = "fp32" if name in ("qk_scale", "sm_scale") else "i32"
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n] not in ("constexpr", "fp32")}
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        out[label] = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": getattr(module, warps_prefix + "WARPS"),
                                             "num_stages": getattr(module, warps_prefix + "STAGES")})
    return out


def report(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(_BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(_BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    fields = dict(part.split(":", 1) for line in usage.splitlines() if "REG:" in line for part in line.split())
    return {"regs": int(fields.get("REG", -1)), "stack_bytes": int(fields.get("STACK", -1)),
            "shared_bytes": compiled.metadata.shared,
            # QGMMA: sm_90's wgmma on 8-bit float operands (qk_fp8's QK^T: 64xNx32 per instruction,
            # half as many as HGMMA's 64xNx16 for the same product); HGMMA: 16-bit operands
            **{op: sass.count(op) for op in ("HGMMA", "QGMMA", "LDGSTS", "UTMALDG", "STL", "LDL")},
            # CTA barriers (BAR.SYNC / BAR.ARV), not DEPBAR / MEMBAR; MUFU.EX2: the exponentials
            "BAR": len(re.findall(r"\bBAR\.", sass)), "MUFU.EX2": sass.count("MUFU.EX2"),
            # float32 -> e4m3 conversions (qk_fp8's in-kernel Q quantisation)
            "F2FP_E4M3": sum("F2FP" in line and "E4M3" in line for line in sass.splitlines())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stride", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--variants", default='[{}]', help="JSON list of Specialization overrides")
    ap.add_argument("--decode", action="store_true", help="the decode kernel (DecodeSpecialization overrides)")
    ap.add_argument("--backward", action="store_true", help="the backward kernels (BackwardSpecialization overrides)")
    ap.add_argument("--kv-heads", type=int, default=32, help="decode, backward: kv heads of the 32 q heads")
    args = ap.parse_args()
    pattern = s2dsl.local_stride(block=64, local_blocks=16, vert_stride=args.stride, heads=32,
                                 kv_heads=args.kv_heads if args.decode or args.backward else None)
    build = compile_backward if args.backward else compile_decode if args.decode else compile_forward
    with tempfile.TemporaryDirectory() as tmp:
        for tuning in json.loads(args.variants):
            try:
                built = build(pattern, tuning, args.head_dim, args.dtype, Path(tmp))
                for label, compiled in (built.items() if isinstance(built, dict) else [("", built)]):
                    print(json.dumps(tuning), label, json.dumps(report(compiled)), flush=True)
            except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a result
                print(json.dumps(tuning), f"{type(exc).__name__}: {str(exc)[:200]}")


if __name__ == "__main__":
    main()
