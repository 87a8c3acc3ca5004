"""The IR of a .s2 file: frozen dataclasses, faithful to what was written.

Expressions keep constant names and the head variable ``h`` so that the printer can
write the file back as the user wrote it; ``s2dsl.semantics`` resolves them to the
integers every later stage works with. Source spans ride along for error messages but
take no part in equality, so ``parse(print(ir)) == ir``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple, Union


@dataclass(frozen=True)
class Span:
    """Where a node came from, for error messages."""

    line: int
    column: int
    end_line: int = 0
    end_column: int = 0


def _span() -> Optional[Span]:
    return field(default=None, compare=False, repr=False)


# ---------------------------------------------------------------- expressions
HEAD_VAR = "h"


class EvalError(Exception):
    """An expression could not be evaluated (unknown name, division by zero)."""

    def __init__(self, message: str, span: Optional[Span] = None):
        super().__init__(message)
        self.span = span


@dataclass(frozen=True)
class Num:
    value: int
    span: Optional[Span] = _span()


@dataclass(frozen=True)
class Var:
    name: str
    span: Optional[Span] = _span()


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    span: Optional[Span] = _span()


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * // %
    left: "Expr"
    right: "Expr"
    span: Optional[Span] = _span()


@dataclass(frozen=True)
class Call:
    func: str  # min or max
    args: Tuple["Expr", ...]
    span: Optional[Span] = _span()


Expr = Union[Num, Var, Neg, BinOp, Call]

BINOPS = ("+", "-", "*", "//", "%")
FUNCS = ("min", "max")


def evaluate(expr: Expr, env: Mapping[str, int]) -> int:
    """Integer value of ``expr``; ``//`` and ``%`` floor like Python (and sympy)."""
    if isinstance(expr, Num):
        return expr.value
    if isinstance(expr, Var):
        if expr.name not in env:
            raise EvalError(f"unknown name '{expr.name}'", expr.span)
        return env[expr.name]
    if isinstance(expr, Neg):
        return -evaluate(expr.operand, env)
    if isinstance(expr, Call):
        values = [evaluate(a, env) for a in expr.args]
        return min(values) if expr.func == "min" else max(values)
    left, right = evaluate(expr.left, env), evaluate(expr.right, env)
    if expr.op == "+":
        return left + right
    if expr.op == "-":
        return left - right
    if expr.op == "*":
        return left * right
    if right == 0:
        what = "division" if expr.op == "//" else "modulo"
        raise EvalError(f"{what} by zero", expr.span)
    return left // right if expr.op == "//" else left % right


def free_names(expr: Expr) -> frozenset:
    if isinstance(expr, Num):
        return frozenset()
    if isinstance(expr, Var):
        return frozenset({expr.name})
    if isinstance(expr, Neg):
        return free_names(expr.operand)
    if isinstance(expr, Call):
        return frozenset().union(*(free_names(a) for a in expr.args))
    return free_names(expr.left) | free_names(expr.right)


# ---------------------------------------------------------------- components
@dataclass(frozen=True)
class Window:
    """Keeps kv block j for query block i when -ahead <= i - j < size.

    With ``tokens`` both sides count tokens instead of blocks: query position q keeps key
    position k when -ahead <= q - k < size.
    """

    size: Expr
    span: Optional[Span] = _span()
    ahead: Optional[Expr] = None
    tokens: bool = False


@dataclass(frozen=True)
class Sink:
    """Keeps kv block j when j < count (key position k < count with ``tokens``)."""

    count: Expr
    span: Optional[Span] = _span()
    tokens: bool = False


@dataclass(frozen=True)
class RelativeStride:
    """Keeps (i, j) outside the head's block window when the distance beyond the window's
    edge is a multiple of ``stride``: ``(i - j - W + 1) % stride == 0`` for ``i - j >= W``
    and ``(j - i - A) % stride == 0`` for ``j - i > A`` (window W ahead A)."""

    stride: Expr
    span: Optional[Span] = _span()


@dataclass(frozen=True)
class GlobalRows:
    """The first ``count`` query blocks keep every kv block (BigBird's global rows)."""

    count: Expr
    span: Optional[Span] = _span()


@dataclass(frozen=True)
class Stride:
    """Keeps kv block j when (j + offset) % stride == 0."""

    stride: Expr
    offset: Expr
    span: Optional[Span] = _span()


@dataclass(frozen=True)
class Shard:
    """Keeps kv block j when j % of == index (a stride in other words)."""

    index: Expr
    of: Expr
    span: Optional[Span] = _span()


@dataclass(frozen=True)
class Dense:
    span: Optional[Span] = _span()


@dataclass(frozen=True)
class TopK:
    """Dynamic: k blocks chosen at run time from scores summed over ``recent`` steps."""

    k: Expr
    recent: Optional[Expr] = None
    span: Optional[Span] = _span()
    by: str = "mass"  # how decode scores the candidates: "mass" (ALISA) or "bound" (Quest)


Component = Union[Window, Sink, Stride, Shard, Dense, TopK, RelativeStride, GlobalRows]


@dataclass(frozen=True)
class HeadGroup:
    """``heads first..last { components }``; first and last None mean ``heads *``."""

    first: Optional[Expr]
    last: Optional[Expr]
    components: Tuple[Component, ...]
    span: Optional[Span] = _span()


@dataclass(frozen=True)
class PatternDef:
    name: str
    block: Optional[Expr]
    heads: Optional[Expr]
    kv_heads: Optional[Expr]
    causal: bool
    groups: Tuple[HeadGroup, ...]
    span: Optional[Span] = _span()
    # causal only: positions below the prefix attend each other both ways (prefix-LM)
    prefix: Optional[Expr] = None
    prefix_tokens: bool = False


@dataclass(frozen=True)
class ConstDef:
    name: str
    value: Expr
    span: Optional[Span] = _span()


# ---------------------------------------------------------------- model plans
@dataclass(frozen=True)
class LayerSpan:
    first: Expr
    last: Expr


@dataclass(frozen=True)
class LayerEvery:
    """Layers start, start + n, start + 2n, ..."""

    every: Expr
    start: Optional[Expr] = None


@dataclass(frozen=True)
class LayerRest:
    pass


LayerSelector = Union[LayerSpan, LayerEvery, LayerRest]
DENSE_PATTERN = "dense"  # the built-in pattern name a model plan may use


@dataclass(frozen=True)
class Rule:
    selector: LayerSelector
    pattern: str
    span: Optional[Span] = _span()


@dataclass(frozen=True)
class ModelDef:
    name: str
    layers: Expr
    rules: Tuple[Rule, ...]
    span: Optional[Span] = _span()


Item = Union[ConstDef, PatternDef, ModelDef]


@dataclass(frozen=True)
class Module:
    items: Tuple[Item, ...]
    # (line, text) of each '#' comment, so that formatting keeps them
    comments: Tuple[Tuple[int, str], ...] = field(default=(), compare=False, repr=False)
