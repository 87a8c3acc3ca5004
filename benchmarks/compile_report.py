"""The compiler's resource report of generated forward kernels for sm_90, on a machine without a GPU.

Triton compiles for a named target (``GPUTarget("cuda", 90, 32)``) with its bundled ptxas, so
registers, stack (spill) bytes and shared memory of every variant can be read before any GPU
time is spent; ``cuobjdump``/``nvdisasm`` (bundled too) count the SASS instructions that tell
the paths apart (HGMMA: wgmma; LDGSTS: cp.async pipelining; UTMALDG: TMA loads; STL: spills).
The integer arguments are marked 16-divisible and the pointers 16-aligned, as Triton's JIT
marks them at a launch over torch tensors with lengths that are multiples of 16.

    python benchmarks/compile_report.py --stride 32 --variants '[{}, {"kv_load": "tma", "block_m": 64}]'
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
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
        elif name in ("Q", "K", "V", "Out"):
            sig[name] = "*" + elem
        elif name == "Lse":
            sig[name] = "*fp32"
        elif name in ("HeadTable", "CuSeqQ", "CuSeqK"):
            sig[name] = "*i32"
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n] not in ("constexpr", "fp32")}
    src = triton.compiler.ASTSource(fn=module.kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": module.NUM_WARPS, "num_stages": module.NUM_STAGES})


def report(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(_BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(_BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    fields = dict(part.split(":", 1) for line in usage.splitlines() if "REG:" in line for part in line.split())
    return {"regs": int(fields.get("REG", -1)), "stack_bytes": int(fields.get("STACK", -1)),
            "shared_bytes": compiled.metadata.shared,
            **{op: sass.count(op) for op in ("HGMMA", "LDGSTS", "UTMALDG", "STL", "LDL")}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stride", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--variants", default='[{}]', help="JSON list of Specialization overrides")
    args = ap.parse_args()
    pattern = s2dsl.local_stride(block=64, local_blocks=16, vert_stride=args.stride, heads=32)
    with tempfile.TemporaryDirectory() as tmp:
        for tuning in json.loads(args.variants):
            try:
                print(json.dumps(tuning), json.dumps(report(compile_forward(pattern, tuning, args.head_dim,
                                                                            args.dtype, Path(tmp)))))
            except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a result
                print(json.dumps(tuning), f"{type(exc).__name__}: {str(exc)[:200]}")


if __name__ == "__main__":
    main()
