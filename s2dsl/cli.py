"""The ``s2dsl`` command line: ``check``, ``show``, ``fmt``, ``compile``.

Exit codes (every subcommand): 0 success; 1 the input is valid but the answer is "no"
(``check``: a pattern is not covered or has empty rows; ``fmt --check``: a file is not
formatted); 2 the input is invalid (syntax or semantic error, unreadable file, unknown
pattern) — the message goes to stderr, never a traceback.

Adding a subcommand: write ``_add_NAME(subparsers)`` that creates its parser and sets
``func=`` to a function ``(args) -> int``, and append it to ``SUBCOMMANDS``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import __version__
from .errors import S2Error
from .pattern import HeadSpec, Pattern
from .semantics import S2File
from .printer import format_ranges as _span
from .visualize import MAX_DRAWN_BLOCKS  # visualize imports matplotlib only when it draws

SEQ_LENS = (8192, 32768, 131072)
MAX_SEQ = 2 ** 31 - 1


class CliError(Exception):
    """A user-facing failure: ``message`` goes to stderr, ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------ helpers
def _int_in(lo: int, hi: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer in lo..hi, else a usage error (exit 2) naming the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi} ({what})")
        return value
    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise CliError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"{path}: is a directory, not a .s2 file") from None
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _load(path: str) -> S2File:
    from .frontend import parse
    return parse(_read(path), path)  # S2Error propagates; main prints it


def _select(f: S2File, name: Optional[str], path: str) -> List[Pattern]:
    if name is None:
        if not f.patterns:
            raise CliError(f"{path}: defines no pattern")
        return list(f.patterns.values())
    if name not in f.patterns:
        known = ", ".join(f.patterns) or "none"
        raise CliError(f"{path}: no pattern named '{name}' (patterns: {known})")
    return [f.patterns[name]]


def _seq_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _describe(spec: HeadSpec) -> str:
    """A head's shape without its residue values, so heads differing only by shard group."""
    if spec.dense:
        parts = ["dense"]
    else:
        parts = []
        if spec.window or spec.ahead:
            parts.append(f"window {spec.window}" + (f" ahead {spec.ahead}" if spec.ahead else ""))
        if spec.window_tokens or spec.ahead_tokens:
            ahead = f" ahead {spec.ahead_tokens}" if spec.ahead_tokens else ""
            parts.append(f"window {spec.window_tokens}{ahead} tokens")
        if spec.sink:
            parts.append(f"sink {spec.sink}")
        if spec.sink_tokens:
            parts.append(f"sink {spec.sink_tokens} tokens")
        if spec.residues:
            p = spec.period
            if len(spec.residues) == 1:
                parts.append(f"stride {p}")
            else:  # counting residues lists a period: only when it is short
                parts.append(f"{len(spec.residue_set)}/{p} residues" if p <= 1 << 16
                             else f"{len(spec.residues)} residue classes")
        parts += [f"stride {s} relative" for s in spec.relative]
        if spec.global_rows:
            parts.append(f"global {spec.global_rows}")
    for t in spec.topk:
        parts.append(f"topk {t.k}" + ("" if t.by == "mass" else f" by {t.by}")
                     + ("" if t.recent is None else f" recent {t.recent}"))
    return " + ".join(parts) or "nothing"


def _mib(nbytes) -> str:
    """Bytes in KiB/MiB/GiB, one decimal."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _pct(fraction) -> str:
    """A fraction as a percentage: one decimal, or two significant digits below 1%."""
    value = 100 * float(fraction)
    if value == 0 or value >= 1:
        return f"{value:.1f}%"
    return f"{value:.2g}%"


def _table(rows: List[List[str]], right: Iterable[int] = ()) -> List[str]:
    right = set(right)
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if c in right else cell.ljust(w)
                      for c, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]


# -------------------------------------------------------------------------- check
def _check_text(path: str, p: Pattern, report, seq_lens: Sequence[int]) -> List[str]:
    from .analysis import evaluate
    mode = "causal" if p.causal else "bidirectional"
    out = [f"{path}: pattern {p.name}: block {p.block}, {p.heads} heads, {p.kv_heads} kv heads, {mode}"]
    verdict = "COVERED" if report.covered else "NOT COVERED"
    reason = report.reason
    for prefix in ("covered for every sequence length: ", "not covered: "):
        if reason.startswith(prefix):
            reason = reason[len(prefix):]
    if report.covered:
        out.append(f"  coverage      {verdict} for every sequence length: {reason}")
    else:
        out.append(f"  coverage      {verdict}: {reason}")
        ce = report.counterexample
        if ce is not None:
            miss = _span(ce.missing_residues)
            b = p.block
            if ce.modulus > 1:
                unreached = f"no head reaches kv blocks j with j mod {ce.modulus} in {{{miss}}}"
            else:
                unreached = "no head has a stride, shard or dense component to reach beyond its window and sinks"
            out.append(f"                counterexample: (i, j) = ({ce.i}, {ce.j}): query tokens {ce.i * b}..{ce.i * b + b - 1} "
                       f"never attend key tokens {ce.j * b}..{ce.j * b + b - 1}; {unreached}")
    if report.rows_nonempty:
        out.append("  empty rows    none: every query row of every head keeps at least one block")
    else:
        out.append("  empty rows    YES: softmax over nothing (NaN in naive kernels; s2dsl outputs 0):")
        for h, desc in report.empty_rows:
            out.append(f"                head {h}: {desc}")
    if report.kv_efficient:
        out.append("  kv-efficient  yes: a head never needs a kv block again once it has dropped it")
    else:
        bad = [c.head for c in report.heads if not c.kv_efficient]
        out.append(f"  kv-efficient  no: heads {_span(bad)} may need a dropped kv block again")
    if report.dynamic_heads:
        out.append(f"  dynamic       heads {_span(report.dynamic_heads)} pick top-k blocks at run time; "
                   f"the figures below count their static part")

    # per kv group: coverage on its own and the decode cache it must hold
    n_big = -(-max(seq_lens) // p.block)
    dense_bytes = 2 * n_big * p.block * 128 * 2
    alone = sum(g.covered for g in report.groups)
    out.append(f"  kv groups     {alone}/{len(report.groups)} cover the context on their own; "
               f"KV cache per kv head at {_seq_label(max(seq_lens))} (head dim 128, 2 bytes; dense "
               f"{_mib(dense_bytes)}):")
    lines: List[Tuple[Tuple[int, str, str], List[int]]] = []
    for g in report.groups:
        if g.covered:
            what = "covers alone"
        elif g.counterexample is not None and g.counterexample.modulus > 1:
            ce = g.counterexample
            what = f"misses {len(ce.missing_residues)} of {ce.modulus} residues mod {ce.modulus}"
        else:
            what = "misses everything beyond its windows and sinks"
        size = _mib(evaluate(g.kv_bytes, N=n_big)) if getattr(g, "kv_bytes", None) is not None else "?"
        key = (len(g.heads), what, size)
        if lines and lines[-1][0] == key:
            lines[-1][1].append(g.kv_head)
        else:
            lines.append((key, [g.kv_head]))
    for (q, what, size), kvs in lines:
        each = "" if len(kvs) == 1 else " each"
        label = f"kv head {kvs[0]}" if len(kvs) == 1 else f"kv heads {_span(kvs)}"
        out.append(f"                {label} ({q} q head{'s' if q > 1 else ''}{each}): {what}; cache {size}{each}")

    # density table: consecutive heads of the same shape merged (their shards differ), with
    # the range of their densities
    dens = [report.density(s) for s in seq_lens]
    header = ["heads", "components", *(_seq_label(s) for s in seq_lens), "limit"]
    runs: List[Tuple[Tuple[str, str], List[int]]] = []
    for h, cost in enumerate(report.heads):
        key = (_describe(p.head_specs[h]), str(cost.density_limit))
        if runs and runs[-1][0] == key:
            runs[-1][1].append(h)
        else:
            runs.append((key, [h]))

    def pct(values) -> str:
        lo, hi = _pct(min(values)), _pct(max(values))
        return lo if lo == hi else f"{lo[:-1]}-{hi}"

    table = [header] + [[_span(hs), shape, *(pct([d["per_head"][h] for h in hs]) for d in dens), limit]
                        for (shape, limit), hs in runs]
    limit = getattr(report, "union_density_limit", None)
    table.append(["union", "", *(_pct(d["union"]) for d in dens), "" if limit is None else str(limit)])
    out.append("  density       attended fraction of the block grid (limit: N -> infinity):")
    out += ["                " + line for line in _table(table, right=range(2, 2 + len(seq_lens)))]
    return out


def _model_text(f: S2File) -> List[str]:
    out = []
    for m in f.models.values():
        uses: Dict[str, List[int]] = {}
        for layer, name in enumerate(m.layer_patterns):
            uses.setdefault(name, []).append(layer)
        parts = "; ".join(f"{name}: layers {_span(ls)}" for name, ls in uses.items())
        out.append(f"{f.filename}: model {m.name}: {m.layers} layers; {parts}")
    return out


def _check(args) -> int:
    from .analysis import analyze
    code = 0
    results = []
    for path in args.files:
        try:
            f = _load(path)
            patterns = _select(f, args.pattern, path)
        except (S2Error, CliError) as exc:
            print(str(exc) if isinstance(exc, S2Error) else f"s2dsl: error: {exc}", file=sys.stderr)
            code = 2
            continue
        for p in patterns:
            report = analyze(p, head_dim=args.head_dim, dtype_bytes=args.dtype_bytes)
            if not (report.covered and report.rows_nonempty):
                code = max(code, 1)
            if args.json:
                obj = {"file": path, **report.to_json(SEQ_LENS)}
                results.append(obj)
            else:
                print("\n".join(_check_text(path, p, report, SEQ_LENS)))
                print()
        if not args.json and args.pattern is None:
            for line in _model_text(f):
                print(line)
            if f.models:
                print()
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    return code


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="prove coverage, empty rows, KV-efficiency; report densities",
                       description="Analyse every pattern of each FILE. Exit 0 when every pattern is covered "
                                   "and has no empty rows, 1 when one is not, 2 on invalid input.")
    p.add_argument("files", nargs="+", metavar="FILE", help=".s2 file")
    p.add_argument("--pattern", metavar="NAME", help="only this pattern")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list, one object per pattern (keys: file, pattern, covered, reason, "
                        "counterexample, rows_nonempty, kv_efficient, density, ...)")
    p.add_argument("--head-dim", type=_int_in(1, 65536, "elements per head"), default=128,
                   help="for FLOP and KV-byte figures (default 128)")
    p.add_argument("--dtype-bytes", type=_int_in(1, 16, "bytes per element"), default=2,
                   help="bytes per K/V element (default 2)")
    p.set_defaults(func=_check)


# --------------------------------------------------------------------------- show
def _out_paths(out: str, names: Sequence[str]) -> List[str]:
    if len(names) == 1:
        return [out]
    root, ext = os.path.splitext(out)
    return [f"{root}-{name}{ext or '.png'}" for name in names]


def _show(args) -> int:
    from .visualize import render_pattern
    f = _load(args.file)
    patterns = _select(f, args.pattern, args.file)
    for p, out in zip(patterns, _out_paths(args.png, [p.name for p in patterns])):
        try:
            render_pattern(p, out, seq_len=args.seq)
        except OSError as exc:
            raise CliError(f"cannot write {out}: {exc.strerror or exc}") from None
        print(f"wrote {out}")
    return 0


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="draw each head's block mask and the union's coverage to a PNG",
                       description="One PNG per pattern: a panel per distinct head (titled with the heads "
                                   "sharing it) and a union panel where uncovered causal cells are red. With "
                                   "several patterns and no --pattern, OUT.png becomes OUT-<pattern>.png.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--pattern", metavar="NAME", help="only this pattern")
    p.add_argument("--png", required=True, metavar="OUT", help="output PNG path")
    p.add_argument("--seq", type=_int_in(1, MAX_SEQ, "tokens; the kernels index tokens with int32"), default=None,
                   metavar="N", help="sequence length in tokens (default: 64 blocks); beyond "
                   f"{MAX_DRAWN_BLOCKS} blocks every k-th block is drawn")
    p.set_defaults(func=_show)


# ---------------------------------------------------------------------------- fmt
def _fmt(args) -> int:
    from .parser import parse_module
    from .printer import format_module
    code = 0
    for path in args.files:
        text = _read(path)
        formatted = format_module(parse_module(text, path))
        if args.check:
            if formatted != text:
                print(f"{path}: not formatted (run 's2dsl fmt --write {path}')", file=sys.stderr)
                code = 1
        elif args.write:
            if formatted != text:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(formatted)
                print(f"formatted {path}")
        else:
            sys.stdout.write(formatted)
    return code


def _add_fmt(sub) -> None:
    p = sub.add_parser("fmt", help="print .s2 files in canonical form (comments kept)",
                       description="Canonical formatting. Default: print to stdout. --check exits 1 if a file "
                                   "is not formatted; --write rewrites files in place.")
    p.add_argument("files", nargs="+", metavar="FILE")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if a file is not canonically formatted")
    mode.add_argument("--write", action="store_true", help="rewrite the files in place")
    p.set_defaults(func=_fmt)


_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _compile(args) -> int:
    from dataclasses import replace

    from .codegen.lower import UnsupportedPattern
    from .runtime import kernels

    f = _load(args.file)
    (pattern,) = _select(f, args.pattern, args.file) if args.pattern or len(f.patterns) == 1 else [None]
    if pattern is None:
        raise CliError(f"{args.file} defines {len(f.patterns)} patterns ({', '.join(f.patterns)}); "
                       "choose one with --pattern")
    import torch
    dtype = getattr(torch, _DTYPE_NAMES[args.dtype])
    try:
        if args.target == "gpu":  # the tiles the runtime picks on a Hopper GPU, without needing one here
            gpu = kernels.choose_forward_for_gpu(pattern, args.head_dim)
            spec = replace(gpu, dtype=_DTYPE_NAMES[args.dtype], layout=args.layout)
        else:
            spec = kernels.choose_forward(pattern, dtype, args.head_dim, args.layout, torch.device("cpu"))
        if args.kernel == "fwd":
            source = kernels.forward_source(pattern, spec)
        else:
            from .runtime.backward import backward_source, choose_backward, choose_backward_for_gpu
            if args.target == "gpu":
                bwd = replace(choose_backward_for_gpu(pattern, args.head_dim), dtype=_DTYPE_NAMES[args.dtype],
                              layout=args.layout)
            else:
                bwd = choose_backward(pattern, dtype, args.head_dim, args.layout, torch.device("cpu"))
            source = backward_source(pattern, bwd)
    except UnsupportedPattern as exc:
        raise CliError(str(exc), code=1) from None
    sys.stdout.write(source)
    return 0


def _add_compile(sub) -> None:
    p = sub.add_parser("compile", help="print the Triton source generated for a pattern",
                       description="Print the generated, pattern-specialised Triton kernel source.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--pattern", help="pattern name (needed when the file has several)")
    p.add_argument("--kernel", choices=["fwd", "bwd"], default="fwd")
    p.add_argument("--dtype", choices=sorted(_DTYPE_NAMES), default="bf16")
    p.add_argument("--head-dim", type=_int_in(16, 256, "the head dims the kernels support"), default=128)
    p.add_argument("--layout", choices=["bhsd", "bshd", "varlen"], default="bhsd")
    p.add_argument("--target", choices=["gpu", "interpreter"], default="gpu",
                   help="tile sizes for a Hopper GPU (default) or for the CPU interpreter")
    p.set_defaults(func=_compile)


# -------------------------------------------------------------------------- place
def _place(args) -> int:
    from .parallel.placement import PlacementError, place
    f = _load(args.file)
    patterns = _select(f, args.pattern, args.file)
    measured = None
    if args.times is not None:
        try:
            data = json.loads(_read(args.times))
        except json.JSONDecodeError as exc:
            raise CliError(f"{args.times}: not JSON ({exc.msg} at line {exc.lineno})") from None
        measured = data.get("head_ms") if isinstance(data, dict) else data
        if not isinstance(measured, list) or not all(isinstance(x, (int, float)) for x in measured):
            raise CliError(f"{args.times}: expected a list of per-head times, or an object with 'head_ms'")
        if len(patterns) != 1:
            raise CliError("--times gives one pattern's head times: choose the pattern with --pattern")
    try:
        results = [place(p, args.gpus, args.seq, measured=measured) for p in patterns]
    except PlacementError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        objs = [r.to_json() for r in results]
        json.dump(objs[0] if len(objs) == 1 else objs, sys.stdout, indent=2)
        print()
    else:
        for r in results:
            print("\n".join(r.table()))
    return 0


def _add_place(sub) -> None:
    p = sub.add_parser("place", help="assign heads to GPUs for head-parallel attention (S-HPLB)",
                       description="Balance the heads' attention costs (the analyzer's block counts at --seq "
                                   "tokens, or measured times) over --gpus GPUs, GQA groups kept whole: LPT and "
                                   "Karmarkar-Karp, refined by moves and swaps. With --json: one object per "
                                   "pattern (a list when several are placed).")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--pattern", metavar="NAME", help="only this pattern (default: every pattern of FILE)")
    p.add_argument("--gpus", type=int, required=True, metavar="G")
    p.add_argument("--seq", type=int, default=32768, metavar="N", help="sequence length in tokens (default 32768)")
    p.add_argument("--times", metavar="JSON", help="measured per-head times: a JSON list, or an object with 'head_ms'")
    p.add_argument("--json", action="store_true", help="keys: pattern, gpus, assignment, loads, imbalance, "
                                                        "naive_imbalance, ...")
    p.set_defaults(func=_place)


# ---------------------------------------------------------------------- calibrate
def _read_ids(path: str) -> List[int]:
    text = _read(path).strip()
    try:
        values = json.loads(text) if text.startswith("[") else [int(t) for t in text.replace(",", " ").split()]
    except (ValueError, json.JSONDecodeError):
        raise CliError(f"{path}: expected token ids (integers separated by spaces/commas, or a JSON list)") from None
    if not isinstance(values, list) or not all(isinstance(v, int) for v in values):
        raise CliError(f"{path}: expected a flat list of integer token ids")
    return values


def _calibrate(args) -> int:
    if not os.path.isdir(args.model):
        raise CliError(f"{args.model}: not a directory with a Hugging Face model (config.json, weights)")
    ids = _read_ids(args.ids) if args.ids else None
    text = _read(args.text) if args.text else None
    import torch
    from transformers import AutoModelForCausalLM

    from .calibrate import CalibrationError, calibrate, write_outputs
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                     dtype=getattr(torch, _DTYPE_NAMES[args.dtype])).to(device)
        if text is not None:
            from transformers import AutoTokenizer
            ids = AutoTokenizer.from_pretrained(args.model, local_files_only=True)(text)["input_ids"]
    except (OSError, ValueError) as exc:
        raise CliError(f"{args.model}: cannot load the model or its tokenizer: {str(exc).splitlines()[0]}") from None
    try:
        cal = calibrate(model, torch.tensor(ids), lengths=args.lengths, samples=args.samples, block=args.block,
                        target=args.target, total_budget=args.total_budget, mode=args.mode,
                        name=os.path.basename(os.path.normpath(args.model)),
                        progress=lambda m: print(m, file=sys.stderr))
        paths = write_outputs(cal, args.out, cover=args.cover)
    except CalibrationError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write {args.out}.*: {exc.strerror or exc}") from None
    summary = cal.report()["summary"]
    for key, value in summary.items():
        print(f"{key:48s} {value if not isinstance(value, float) else f'{value:.4f}'}")
    for layer, (tb, b) in enumerate(zip(cal.target_budgets, cal.budgets)):
        print(f"layer {layer}: target budgets {tb} -> max-min {b} (blocks of {cal.block} tokens)")
    for kind, path in paths.items():
        print(f"wrote {path}")
    return 0


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="per-head budgets from a model's attention (S-HPLB) -> .s2, JSON, PNG",
                       description="Run a local Hugging Face causal LM on calibration tokens, measure each head's "
                                   "recovery curve (share of attention mass its best k blocks capture), choose "
                                   "budgets (smallest k reaching --target, then max-min at a fixed total) and "
                                   "write PREFIX.s2 (a model plan), PREFIX.json and PREFIX.png.")
    p.add_argument("model", metavar="MODEL", help="directory of a Hugging Face causal LM (no downloads)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="FILE", help="calibration text (tokenised with the model's tokenizer)")
    src.add_argument("--ids", metavar="FILE", help="calibration token ids (whitespace/comma separated or a JSON list)")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096], metavar="N",
                   help="calibration lengths in tokens; budgets come from the longest (default 4096)")
    p.add_argument("--samples", type=int, default=4, help="sequences per length (default 4)")
    p.add_argument("--block", type=int, default=64, help="tokens per block (default 64)")
    p.add_argument("--target", type=float, default=0.95, help="recovery each head must reach (default 0.95)")
    p.add_argument("--total-budget", type=float, default=None, metavar="T",
                   help="per layer, the sum of the heads' budgets in blocks (> 1) or as a fraction of dense "
                        "(<= 1); default: the sum of the target budgets")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--topk", dest="mode", action="store_const", const="topk",
                      help="dynamic budgets: window 1 + topk k-1 (default)")
    mode.add_argument("--static", dest="mode", action="store_const", const="static",
                      help="static budgets: sink 1 + window k-1")
    p.set_defaults(mode="topk")
    p.add_argument("--cover", action="store_true",
                   help="add 'stride heads offset h' to every sparse head so the union provably covers")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPE_NAMES), default="fp32")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.s2, PREFIX.json, PREFIX.png")
    p.set_defaults(func=_calibrate)


# --------------------------------------------------------------------------- main
SUBCOMMANDS: List[Callable] = [_add_check, _add_show, _add_fmt, _add_compile, _add_place, _add_calibrate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2dsl", description="Per-head sparse attention patterns: "
                                     "check, draw and format .s2 files.")
    parser.add_argument("--version", action="version", version=f"s2dsl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help/--version exit 0
        return int(exc.code or 0)
    try:
        return args.func(args)
    except S2Error as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"s2dsl: error: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # e.g. `s2dsl check ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
