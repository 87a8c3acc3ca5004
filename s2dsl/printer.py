"""IR -> canonical .s2 text. ``parse(format_module(m)) == m`` for every module ``m``."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from . import ir

INDENT = "    "
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "//": 2, "%": 2}


def format_expr(e: ir.Expr) -> str:
    if isinstance(e, ir.Num):
        return str(e.value)
    if isinstance(e, ir.Var):
        return e.name
    if isinstance(e, ir.Call):
        return f"{e.func}({', '.join(format_expr(a) for a in e.args)})"
    if isinstance(e, ir.Neg):
        inner = format_expr(e.operand)
        simple = isinstance(e.operand, (ir.Var, ir.Call)) or (isinstance(e.operand, ir.Num) and e.operand.value >= 0)
        return f"-{inner}" if simple else f"-({inner})"
    level = _PRECEDENCE[e.op]
    left, right = format_expr(e.left), format_expr(e.right)
    # the grammar is left-associative: a right operand of equal precedence needs parentheses
    if isinstance(e.left, ir.BinOp) and _PRECEDENCE[e.left.op] < level:
        left = f"({left})"
    if isinstance(e.right, ir.BinOp) and _PRECEDENCE[e.right.op] <= level:
        right = f"({right})"
    return f"{left} {e.op} {right}"


def format_component(c: ir.Component) -> str:
    unit = " tokens" if getattr(c, "tokens", False) else ""
    if isinstance(c, ir.Window):
        ahead = "" if c.ahead is None else f" ahead {format_expr(c.ahead)}"
        return f"window {format_expr(c.size)}{ahead}{unit}"
    if isinstance(c, ir.Sink):
        return f"sink {format_expr(c.count)}{unit}"
    if isinstance(c, ir.RelativeStride):
        return f"stride {format_expr(c.stride)} relative"
    if isinstance(c, ir.GlobalRows):
        return f"global {format_expr(c.count)}"
    if isinstance(c, ir.Stride):
        offset = "" if c.offset == ir.Num(0) else f" offset {format_expr(c.offset)}"
        return f"stride {format_expr(c.stride)}{offset}"
    if isinstance(c, ir.Shard):
        return f"shard {format_expr(c.index)} of {format_expr(c.of)}"
    if isinstance(c, ir.Dense):
        return "dense"
    recent = "" if c.recent is None else f" recent {format_expr(c.recent)}"
    by = "" if c.by == "mass" else f" by {c.by}"
    return f"topk {format_expr(c.k)}{by}{recent}"


def _selector(sel: ir.LayerSelector) -> str:
    if isinstance(sel, ir.LayerSpan):
        first = format_expr(sel.first)
        if first.startswith("-"):  # after 'layers = N' a leading '-' would read as N - ...
            first = f"({first})"
        return f"{first}..{format_expr(sel.last)}"
    if isinstance(sel, ir.LayerEvery):
        start = "" if sel.start is None else f" from {format_expr(sel.start)}"
        return f"every {format_expr(sel.every)}{start}"
    return "rest"


class _Writer:
    """Collects lines and re-attaches comments by their original line numbers."""

    def __init__(self, comments: Tuple[Tuple[int, str], ...]):
        self.lines: List[str] = []
        self.comments = list(comments)

    def flush_before(self, span: Optional[ir.Span], depth: int):
        if span is None:
            return
        while self.comments and self.comments[0][0] < span.line:
            line, text = self.comments.pop(0)
            self.lines.append(INDENT * depth + text)
            if depth == 0:  # keep one blank line after a top-level comment where the source had one
                following = self.comments[0][0] if self.comments and self.comments[0][0] < span.line else span.line
                if following - line > 1:
                    self.lines.append("")

    def emit(self, text: str, depth: int, span: Optional[ir.Span] = None, end_line: Optional[int] = None):
        self.flush_before(span, depth)
        line = INDENT * depth + text
        last = end_line if end_line is not None else (span.end_line if span else None)
        if last is not None and self.comments and self.comments[0][0] == last:
            line += "  " + self.comments.pop(0)[1]
        self.lines.append(line)

    def close(self, depth: int, span: Optional[ir.Span]):
        # comments inside the braces that follow the last statement
        if span is not None:
            while self.comments and self.comments[0][0] < span.end_line:
                self.lines.append(INDENT * (depth + 1) + self.comments.pop(0)[1])
        self.emit("}", depth, None, span.end_line if span else None)


def _pattern_lines(w: _Writer, p: ir.PatternDef):
    w.emit(f"pattern {p.name} {{", 0, p.span, p.span.line if p.span else None)
    for key in ("block", "heads", "kv_heads"):
        value = getattr(p, key)
        if value is not None:
            w.emit(f"{key} = {format_expr(value)}", 1, value.span, value.span.line if value.span else None)
    mode = "causal" if p.causal else "bidirectional"
    if p.prefix is not None:
        mode += f" prefix {format_expr(p.prefix)}" + (" tokens" if p.prefix_tokens else "")
    w.emit(mode, 1)
    for g in p.groups:
        head_range = "*" if g.first is None else f"{format_expr(g.first)}..{format_expr(g.last)}"
        w.emit(f"heads {head_range} {{", 1, g.span, g.span.line if g.span else None)
        for c in g.components:
            w.emit(format_component(c), 2, c.span)
        w.close(1, g.span)
    w.close(0, p.span)


def format_module(module: ir.Module) -> str:
    w = _Writer(module.comments)
    previous = None
    for item in module.items:
        if previous is not None and not (isinstance(item, ir.ConstDef) and isinstance(previous, ir.ConstDef)):
            w.lines.append("")
        if isinstance(item, ir.ConstDef):
            w.emit(f"const {item.name} = {format_expr(item.value)}", 0, item.span)
        elif isinstance(item, ir.PatternDef):
            _pattern_lines(w, item)
        else:
            w.emit(f"model {item.name} {{", 0, item.span, item.span.line if item.span else None)
            w.emit(f"layers = {format_expr(item.layers)}", 1, item.layers.span)
            for rule in item.rules:
                w.emit(f"{_selector(rule.selector)} -> {rule.pattern}", 1, rule.span)
            w.close(0, item.span)
        previous = item
    w.lines.extend(text for _, text in w.comments)
    return "\n".join(w.lines) + "\n"


def format_pattern(pattern) -> str:
    """A resolved ``Pattern`` as .s2 text: its own definition when it has one, else
    one ``heads a..b`` body per run of identical heads."""
    if pattern.definition is not None:
        used = set()
        for g in pattern.definition.groups:
            for c in g.components:
                for value in vars(c).values():
                    if isinstance(value, (ir.Num, ir.Var, ir.Neg, ir.BinOp, ir.Call)):
                        used |= ir.free_names(value)
        for value in (pattern.definition.block, pattern.definition.heads, pattern.definition.kv_heads,
                      pattern.definition.prefix):
            if value is not None:
                used |= ir.free_names(value)
        consts = tuple(ir.ConstDef(n, ir.Num(v)) for n, v in pattern.constants if n in used)
        return format_module(ir.Module(consts + (_strip_spans(pattern.definition),)))
    return format_module(ir.Module((pattern_def_from_specs(pattern),)))


def _strip_spans(p: ir.PatternDef) -> ir.PatternDef:
    from dataclasses import replace
    return replace(p, span=None, groups=tuple(replace(g, span=None) for g in p.groups))


def pattern_def_from_specs(pattern) -> ir.PatternDef:
    """Synthesise IR for a pattern built in Python (no source text)."""
    groups = []
    start = 0
    specs = pattern.head_specs
    for h in range(1, pattern.heads + 1):
        if h == pattern.heads or specs[h] != specs[start]:
            spec = specs[start]
            comps: List[ir.Component] = []
            if spec.dense:
                comps.append(ir.Dense())
            if spec.window or spec.ahead:
                comps.append(ir.Window(ir.Num(spec.window), ahead=ir.Num(spec.ahead) if spec.ahead else None))
            if spec.window_tokens or spec.ahead_tokens:
                comps.append(ir.Window(ir.Num(spec.window_tokens), tokens=True,
                                       ahead=ir.Num(spec.ahead_tokens) if spec.ahead_tokens else None))
            if spec.sink:
                comps.append(ir.Sink(ir.Num(spec.sink)))
            if spec.sink_tokens:
                comps.append(ir.Sink(ir.Num(spec.sink_tokens), tokens=True))
            comps += [ir.Shard(ir.Num(r), ir.Num(m)) for m, r in spec.residues]
            comps += [ir.RelativeStride(ir.Num(s)) for s in spec.relative]
            if spec.global_rows:
                comps.append(ir.GlobalRows(ir.Num(spec.global_rows)))
            comps += [ir.TopK(ir.Num(t.k), None if t.recent is None else ir.Num(t.recent), by=t.by) for t in spec.topk]
            groups.append(ir.HeadGroup(ir.Num(start), ir.Num(h - 1), tuple(comps)))
            start = h
    kv = None if pattern.kv_heads == pattern.heads else ir.Num(pattern.kv_heads)
    prefix = ir.Num(pattern.prefix) if pattern.prefix else None
    return ir.PatternDef(pattern.name, ir.Num(pattern.block), ir.Num(pattern.heads), kv, pattern.causal, tuple(groups),
                         prefix=prefix, prefix_tokens=bool(pattern.prefix))


def format_ranges(values: Sequence[int]) -> str:
    """0,1,2,3,8,9 -> '0..3, 8..9'; an arithmetic progression of 3+ -> '1..31 step 2'."""
    values = list(values)
    if not values:
        return "none"
    if len(values) >= 3:
        step = values[1] - values[0]
        if step > 1 and all(b - a == step for a, b in zip(values, values[1:])):
            return f"{values[0]}..{values[-1]} step {step}"
    out, start = [], values[0]
    for a, b in zip(values, values[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}..{a}")
            start = b
    return ", ".join(out)
