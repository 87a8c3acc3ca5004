"""Text -> IR: the Lark grammar in ``grammar/s2.lark`` and a Transformer to dataclasses."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ir
from .errors import S2SyntaxError
from .limits import MAX_EXPR_DEPTH, MAX_LITERAL_DIGITS


_comments: list = []  # filled by the lexer callback during one parse


@lru_cache(maxsize=1)
def _lark() -> Lark:
    grammar = resources.files("s2dsl.grammar").joinpath("s2.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True,
                lexer_callbacks={"COMMENT": _comments.append})


def _span(meta) -> ir.Span | None:
    if getattr(meta, "empty", True):
        return None
    return ir.Span(meta.line, meta.column, meta.end_line, meta.end_column)


@v_args(meta=True)
class _ToIR(Transformer):
    # expressions
    def num(self, meta, children):
        digits = str(children[0])
        if len(digits) > MAX_LITERAL_DIGITS:  # checked before int(): converting it is quadratic
            raise _SourceProblem(f"integer literal with {len(digits)} digits; literals have at most "
                                 f"{MAX_LITERAL_DIGITS}", _span(meta), "no block count or head index needs more")
        return ir.Num(int(digits), _span(meta))

    def var(self, meta, children):
        return ir.Var(str(children[0]), _span(meta))

    def neg(self, meta, children):
        operand = children[0]
        if isinstance(operand, ir.Num):  # "-3" is a literal, not an operation
            return ir.Num(-operand.value, _span(meta))
        return ir.Neg(operand, _span(meta))

    def _binop(self, op, meta, children):
        return ir.BinOp(op, children[0], children[1], _span(meta))

    def add(self, meta, c):
        return self._binop("+", meta, c)

    def sub(self, meta, c):
        return self._binop("-", meta, c)

    def mul(self, meta, c):
        return self._binop("*", meta, c)

    def floordiv(self, meta, c):
        return self._binop("//", meta, c)

    def mod(self, meta, c):
        return self._binop("%", meta, c)

    def call(self, meta, children):
        func, *args = children
        return ir.Call(str(func), tuple(args), _span(meta))

    # pattern bodies
    def window(self, meta, c):
        size, ahead, unit = c
        return ir.Window(size, _span(meta), ahead, _tokens(unit))

    def sink(self, meta, c):
        count, unit = c
        return ir.Sink(count, _span(meta), _tokens(unit))

    def stride_relative(self, meta, c):
        return ir.RelativeStride(c[0], _span(meta))

    def global_rows(self, meta, c):
        return ir.GlobalRows(c[0], _span(meta))

    def prefix(self, meta, c):
        return (c[0], _tokens(c[1]))

    def stride(self, meta, c):
        # '(offset expr)?' is not a [] optional, so a missing offset leaves no placeholder
        offset = c[1] if len(c) > 1 and c[1] is not None else ir.Num(0)
        return ir.Stride(c[0], offset, _span(meta))

    def shard(self, meta, c):
        return ir.Shard(c[0], c[1], _span(meta))

    def dense(self, meta, c):
        return ir.Dense(_span(meta))

    def topk(self, meta, c):
        by = next((str(x) for x in c[1:] if isinstance(x, Token) and x.type == "SCORER"), "mass")
        rest = [x for x in c[1:] if not (isinstance(x, Token) and x.type == "SCORER")]
        return ir.TopK(c[0], rest[0] if rest and rest[0] is not None else None, _span(meta), by)

    def range_span(self, meta, c):
        return (c[0], c[1])

    def range_all(self, meta, c):
        return (None, None)

    def group(self, meta, c):
        (first, last), *components = c
        return ir.HeadGroup(first, last, tuple(components), _span(meta))

    def block_stmt(self, meta, c):
        return ("block", c[0], _span(meta))

    def heads_stmt(self, meta, c):
        return ("heads", c[0], _span(meta))

    def kv_heads_stmt(self, meta, c):
        return ("kv_heads", c[0], _span(meta))

    def mode_stmt(self, meta, c):
        return ("mode", (str(c[0]), c[1]), _span(meta))

    def pattern_def(self, meta, c):
        name, *stmts = c
        fields = {"block": None, "heads": None, "kv_heads": None, "mode": ("causal", None)}
        seen = {}
        groups = []
        for stmt in stmts:
            if isinstance(stmt, ir.HeadGroup):
                groups.append(stmt)
                continue
            key, value, span = stmt
            if key in seen:
                if key != "mode":
                    raise _SourceProblem(f"'{key}' is set twice in one pattern", span, "keep one of the two settings")
                first, word = fields["mode"][0], value[0]
                raise _SourceProblem(f"'{word}' after '{first}': a pattern is either causal or bidirectional"
                                     if word != first else f"'{word}' is given twice", span,
                                     "keep one of the two keywords")
            seen[key] = span
            fields[key] = value
        mode, prefix = fields["mode"]
        prefix, prefix_tokens = prefix if prefix is not None else (None, False)
        return ir.PatternDef(str(name), fields["block"], fields["heads"], fields["kv_heads"],
                             mode == "causal", tuple(groups), _span(meta), prefix, prefix_tokens)

    def const_def(self, meta, c):
        return ir.ConstDef(str(c[0]), c[1], _span(meta))

    # model plans
    def sel_span(self, meta, c):
        return ir.LayerSpan(c[0], c[1])

    def sel_every(self, meta, c):
        return ir.LayerEvery(c[0], c[1] if len(c) > 1 else None)

    def sel_rest(self, meta, c):
        return ir.LayerRest()

    def rule(self, meta, c):
        return ir.Rule(c[0], str(c[1]), _span(meta))

    def rule_dense(self, meta, c):
        return ir.Rule(c[0], ir.DENSE_PATTERN, _span(meta))

    def model_def(self, meta, c):
        name, layers, *rules = c
        return ir.ModelDef(str(name), layers, tuple(rules), _span(meta))

    def start(self, meta, c):
        return ir.Module(tuple(c))


class _SourceProblem(Exception):
    """Raised inside the transformer; ``parse_module`` turns it into an ``S2SyntaxError``."""

    def __init__(self, message, span, hint=""):
        super().__init__(message)
        self.message, self.span, self.hint = message, span, hint


_EXPR_RULES = frozenset({"add", "sub", "mul", "floordiv", "mod", "neg", "call"})


def _check_depth(tree: Tree) -> None:
    """Refuse expressions nested deeper than ``MAX_EXPR_DEPTH`` before anything recursive
    (the transformer, the evaluator, the printer) walks them. Iterative on purpose."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if node.data in _EXPR_RULES:
            depth += 1
            if depth > MAX_EXPR_DEPTH:
                raise _SourceProblem(f"expression nested more than {MAX_EXPR_DEPTH} operators deep (a sum of n terms "
                                     "nests n - 1 deep)", _span(node.meta),
                                     "split it with constants: 'const part = ...'")
        stack.extend((c, depth) for c in node.children if isinstance(c, Tree))
def _tokens(unit) -> bool:
    return unit is not None and str(unit) == "tokens"




_TOKEN_WORDS = {
    "LBRACE": "'{'", "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'", "EQUAL": "'='",
    "SEMICOLON": "';'", "COMMA": "','", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'",
    "PERCENT": "'%'", "__ANON_0": "'..'", "__ANON_1": "'//'", "__ANON_2": "'->'",
    "INT": "an integer", "NAME": "a name", "FUNC": "min(...) or max(...)", "MODE": "causal or bidirectional",
    "UNIT": "tokens or blocks",
}


def _describe_expected(expected) -> str:
    words = []
    for name in sorted(expected):
        if name in _TOKEN_WORDS:
            words.append(_TOKEN_WORDS[name])
        elif name.isupper() and not name.startswith("__"):
            words.append(f"'{name.lower()}'")
        else:
            words.append(name)
    words = sorted(set(words))
    if len(words) > 8:
        words = words[:8] + ["..."]
    return ", ".join(words)


def parse_module(text: str, filename: str = "<string>") -> ir.Module:
    """Parse .s2 source into the IR; syntax errors carry file, line, column and a caret."""
    _comments.clear()
    if text.startswith("\ufeff"):  # a UTF-8 byte order mark, as some editors write
        text = text[1:]
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as exc:
        line, column = exc.line, exc.column
        if isinstance(exc, UnexpectedEOF) or (isinstance(exc, UnexpectedToken) and exc.token.type == "$END"):
            lines = text.splitlines() or [""]
            line, column = len(lines), len(lines[-1]) + 1
            found = "end of file"
        elif isinstance(exc, UnexpectedToken):
            token = str(exc.token)
            found = f"'{token}'" if len(token) <= 40 else f"'{token[:37]}...' ({len(token)} characters)"
        else:
            found = f"character {text[exc.pos_in_stream]!r}" if isinstance(exc, UnexpectedCharacters) else "input"
        expected = getattr(exc, "expected", None) or getattr(exc, "allowed", None) or set()
        message = f"unexpected {found}"
        if expected:
            message += f"; expected {_describe_expected(expected)}"
        raise S2SyntaxError(message, filename=filename, text=text, line=line, column=column) from None
    comments = tuple((tok.line, str(tok).rstrip()) for tok in _comments)
    try:
        _check_depth(tree)
        module = _ToIR().transform(tree)
        return ir.Module(module.items, comments)
    except Exception as exc:  # lark wraps transformer errors in VisitError
        inner = getattr(exc, "orig_exc", exc)
        if isinstance(inner, _SourceProblem):
            span = inner.span
            raise S2SyntaxError(inner.message, filename=filename, text=text, line=span.line if span else 0,
                                column=span.column if span else 0, hint=inner.hint) from None
        raise
