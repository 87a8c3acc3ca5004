"""IR -> resolved patterns and model plans, with the semantic checks.

Every error says what is wrong, where, and how to fix it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

from . import ir
from .errors import S2SemanticError
from .limits import value_problem
from .pattern import HeadSpec, Pattern, combine_components


@dataclass(frozen=True)
class ModelPlan:
    """Which pattern each layer uses; ``"dense"`` means full attention."""

    name: str
    layer_patterns: Tuple[str, ...]

    @property
    def layers(self) -> int:
        return len(self.layer_patterns)


@dataclass(frozen=True)
class S2File(Mapping):
    """A checked .s2 file: its patterns by name (a read-only mapping), models and constants."""

    patterns: Dict[str, Pattern]
    models: Dict[str, ModelPlan] = field(default_factory=dict)
    constants: Dict[str, int] = field(default_factory=dict)
    module: Optional[ir.Module] = field(default=None, repr=False)
    filename: str = "<string>"

    def __getitem__(self, name: str) -> Pattern:
        try:
            return self.patterns[name]
        except KeyError:
            known = ", ".join(self.patterns) or "none"
            raise KeyError(f"no pattern named {name!r} in {self.filename} (patterns: {known})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.patterns)

    def __len__(self) -> int:
        return len(self.patterns)

    def pattern_for_layer(self, model: str, layer: int) -> Optional[Pattern]:
        """The pattern of ``layer`` in model plan ``model``; None for a dense layer."""
        name = self.models[model].layer_patterns[layer]
        return None if name == ir.DENSE_PATTERN else self.patterns[name]


class _Resolver:
    def __init__(self, filename: str, text: Optional[str]):
        self.filename, self.text = filename, text

    def error(self, message: str, node=None, hint: str = "", span: Optional[ir.Span] = None):
        span = span or getattr(node, "span", None)
        return S2SemanticError(message, filename=self.filename, text=self.text,
                               line=span.line if span else 0, column=span.column if span else 0, hint=hint)

    def eval(self, expr: ir.Expr, env: Mapping[str, int], what: str, owner=None) -> int:
        try:
            value = ir.evaluate(expr, env)
        except ir.EvalError as exc:
            span = exc.span or getattr(expr, "span", None) or getattr(owner, "span", None)
            message = str(exc)
            if "unknown name" in message:
                name = message.split("'")[1]
                if name == ir.HEAD_VAR:
                    raise self.error(f"{what} may not depend on the head index 'h'", span=span,
                                     hint="only component parameters inside 'heads a..b { }' may use h") from None
                known = ", ".join(sorted(k for k in env if k != ir.HEAD_VAR)) or "none defined"
                raise self.error(f"unknown constant '{name}' in {what}", span=span,
                                 hint=f"define it with 'const {name} = ...' before use (known: {known})") from None
            head = f" for head h={env[ir.HEAD_VAR]}" if ir.HEAD_VAR in env else ""
            raise self.error(f"{message} in {what}{head}", span=span,
                             hint="make the divisor non-zero for every head, e.g. with max(1, ...)") from None
        problem = value_problem(what, value, f" for head {env[ir.HEAD_VAR]}" if ir.HEAD_VAR in env else "")
        if problem:  # sizes the kernels or the resolver cannot hold (limits.py)
            raise self.error(problem[0], span=getattr(expr, "span", None) or getattr(owner, "span", None),
                             hint=problem[1])
        return value

    # ------------------------------------------------------------------ file
    def resolve(self, module: ir.Module) -> S2File:
        constants: Dict[str, int] = {}
        patterns: Dict[str, Pattern] = {}
        models: Dict[str, ModelPlan] = {}
        names: Dict[str, ir.Item] = {}
        for item in module.items:
            if item.name in names or item.name == ir.DENSE_PATTERN:
                clash = "the built-in pattern 'dense'" if item.name == ir.DENSE_PATTERN else "an earlier definition"
                raise self.error(f"'{item.name}' is already defined ({clash})", item, hint="choose another name")
            if item.name == ir.HEAD_VAR:
                raise self.error("'h' is the head index and cannot be redefined", item, hint="choose another name")
            names[item.name] = item
            if isinstance(item, ir.ConstDef):
                constants[item.name] = self.eval(item.value, constants, f"constant '{item.name}'", item)
        for item in module.items:
            if isinstance(item, ir.PatternDef):
                patterns[item.name] = self.pattern(item, constants)
        for item in module.items:
            if isinstance(item, ir.ModelDef):
                models[item.name] = self.model(item, constants, patterns)
        return S2File(patterns, models, constants, module, self.filename)

    # --------------------------------------------------------------- pattern
    def pattern(self, p: ir.PatternDef, constants: Dict[str, int]) -> Pattern:
        where = f"pattern '{p.name}'"
        if p.block is None:
            raise self.error(f"{where} has no block size", p, hint="add 'block = 64' (a power of two >= 16)")
        if p.heads is None:
            raise self.error(f"{where} does not say how many heads it has", p, hint="add 'heads = 32'")
        block = self.eval(p.block, constants, "block", p)
        if block < 16 or block & (block - 1):
            raise self.error(f"block = {block} in {where} is not a power of two >= 16", p.block,
                             hint="use 16, 32, 64 or 128 (kernels tile by the block)")
        heads = self.eval(p.heads, constants, "heads", p)
        if heads < 1:
            raise self.error(f"heads = {heads} in {where}; a pattern needs at least one head", p.heads)
        kv_heads = heads if p.kv_heads is None else self.eval(p.kv_heads, constants, "kv_heads", p)
        if kv_heads < 1 or heads % kv_heads:
            raise self.error(f"kv_heads = {kv_heads} does not divide heads = {heads} in {where}", p.kv_heads,
                             hint="grouped-query attention needs heads to be a multiple of kv_heads")
        prefix = 0
        if p.prefix is not None:
            if not p.causal:
                raise self.error(f"{where} is bidirectional and has a prefix", p.prefix,
                                 hint="a prefix makes a causal pattern bidirectional below it: write 'causal prefix P'")
            prefix = self.eval(p.prefix, constants, "prefix", p)
            if prefix < 0:
                raise self.error(f"prefix is {prefix} in {where}; it counts leading positions and cannot be "
                                 "negative", p.prefix, hint="use prefix >= 1 or drop it")
            if not p.prefix_tokens:
                prefix *= block
        if not p.groups:
            raise self.error(f"{where} assigns no heads", p, hint=f"add 'heads 0..{heads - 1} {{ ... }}'")
        owner: List[Optional[ir.HeadGroup]] = [None] * heads
        specs: List[Optional[HeadSpec]] = [None] * heads
        for group in p.groups:
            if group.first is None:
                first, last = 0, heads - 1
            else:
                first = self.eval(group.first, constants, "a head range", group)
                last = self.eval(group.last, constants, "a head range", group)
            if first > last:
                raise self.error(f"head range {first}..{last} is empty", group,
                                 hint="write the smaller index first; ranges include both ends")
            if first < 0 or last >= heads:
                raise self.error(f"head range {first}..{last} is outside 0..{heads - 1} in {where}", group,
                                 hint=f"{where} has {heads} heads, numbered 0..{heads - 1}")
            if not group.components:
                raise self.error(f"heads {first}..{last} have no components and would attend to nothing", group,
                                 hint="add a component such as 'window 16' or 'dense'")
            for h in range(first, last + 1):
                if owner[h] is not None:
                    other = owner[h].span
                    at = f" (first at line {other.line})" if other else ""
                    raise self.error(f"head {h} is assigned twice in {where}{at}", group,
                                     hint="make the head ranges disjoint")
                owner[h] = group
                specs[h] = self.head(group, dict(constants, h=h), h, block, p.causal and not prefix)
        missing = [h for h in range(heads) if owner[h] is None]
        if missing:
            raise self.error(f"{where} leaves heads {_ranges(missing)} unassigned", p,
                             hint="give every head 0..heads-1 a 'heads a..b { ... }' body")
        return Pattern(p.name, block, heads, kv_heads, p.causal, tuple(specs), p, tuple(constants.items()), prefix)

    def head(self, group: ir.HeadGroup, env: Dict[str, int], h: int, block: int, causal: bool) -> HeadSpec:
        parts = []
        topks = [c for c in group.components if isinstance(c, ir.TopK)]
        if len(topks) > 1:  # one run-time choice per head: two would leave K and recent ambiguous
            first = topks[0].span
            at = f" (the first at line {first.line})" if first else ""
            raise self.error(f"head {h} has {len(topks)} 'topk' components{at}; a head selects its dynamic "
                             "blocks once", topks[1],
                             hint="merge them into one 'topk K [by mass|bound] [recent R]' (K may use h)")
        for c in group.components:
            if isinstance(c, ir.Window):
                unit = "tokens" if c.tokens else "blocks"
                w = self.eval(c.size, env, "window", c)
                if w < 0:
                    raise self.error(f"window is {w} for head {h}; a window counts {unit} and cannot be negative",
                                     c, hint="use a window >= 1 (the diagonal) or drop it")
                a = 0 if c.ahead is None else self.eval(c.ahead, env, "window ahead", c)
                if a < 0:
                    raise self.error(f"window ahead is {a} for head {h}; it counts {unit} after the diagonal "
                                     "and cannot be negative", c.ahead, hint="use ahead >= 0 or drop it")
                if a and causal:
                    raise self.error(f"'window ... ahead {a}' in a causal pattern: the causal cut drops every "
                                     "block ahead of the diagonal", c,
                                     hint="make the pattern 'bidirectional' (or 'causal prefix P') or drop 'ahead'")
                parts.append(("window_tokens" if c.tokens else "window", w, a))
            elif isinstance(c, ir.Sink):
                unit = "tokens" if c.tokens else "leading blocks"
                s = self.eval(c.count, env, "sink", c)
                if s < 0:
                    raise self.error(f"sink is {s} for head {h}; it counts {unit} and cannot be negative",
                                     c, hint="use sink >= 0")
                parts.append(("sink_tokens" if c.tokens else "sink", s))
            elif isinstance(c, ir.RelativeStride):
                s = self.eval(c.stride, env, "relative stride", c)
                if s <= 0:
                    raise self.error(f"relative stride is {s} for head {h}; it must be a positive number of blocks",
                                     c, hint="use stride >= 1 (stride 1 relative keeps every block)")
                parts.append(("relative", s))
            elif isinstance(c, ir.GlobalRows):
                g = self.eval(c.count, env, "global", c)
                if g < 0:
                    raise self.error(f"global is {g} for head {h}; it counts leading query blocks and cannot be "
                                     "negative", c, hint="use global >= 1 or drop it")
                parts.append(("global", g))
            elif isinstance(c, ir.Stride):
                s = self.eval(c.stride, env, "stride", c)
                if s <= 0:
                    raise self.error(f"stride is {s} for head {h}; it must be a positive number of blocks",
                                     c, hint="use stride >= 1 (stride 1 keeps every block)")
                e = self.eval(c.offset, env, "stride offset", c)
                parts.append(("residue", s, (-e) % s))
            elif isinstance(c, ir.Shard):
                s = self.eval(c.of, env, "shard count", c)
                if s <= 0:
                    raise self.error(f"'shard K of S' has S = {s} for head {h}; S must be positive", c,
                                     hint="S is the number of shards the older context is split into")
                k = self.eval(c.index, env, "shard index", c)
                if not 0 <= k < s:
                    raise self.error(f"shard {k} of {s} for head {h}: the index must be in 0..{s - 1}", c,
                                     hint="use (expression) % S to wrap the index")
                parts.append(("residue", s, k))
            elif isinstance(c, ir.Dense):
                parts.append(("dense",))
            elif isinstance(c, ir.TopK):
                k = self.eval(c.k, env, "topk", c)
                recent = None if c.recent is None else self.eval(c.recent, env, "topk recent", c)
                if k < 1:
                    raise self.error(f"topk {k} for head {h}: it must pick at least one block", c,
                                     hint="use topk K with K >= 1")
                if recent is not None and recent < 1:
                    raise self.error(f"topk {k} recent {recent} for head {h}: recent counts decode steps and "
                                     "must be >= 1", c, hint="use recent R with R >= 1, or leave it out")
                if recent is not None and c.by == "bound":  # a bound needs no history to sum over
                    raise self.error(f"topk {k} by bound recent {recent} for head {h}: 'recent' sums attention "
                                     "mass over decode steps, and 'by bound' scores each step from its own query",
                                     c, hint="drop 'recent', or score 'by mass'")
                parts.append(("topk", k, recent, c.by))
        return combine_components(parts, block)

    # ----------------------------------------------------------------- model
    def model(self, m: ir.ModelDef, constants: Dict[str, int], patterns: Dict[str, Pattern]) -> ModelPlan:
        layers = self.eval(m.layers, constants, "layers", m)
        if layers < 1:
            raise self.error(f"model '{m.name}' has layers = {layers}", m.layers, hint="a model needs at least one layer")
        chosen: List[Optional[str]] = [None] * layers
        heads = {}
        for rule in m.rules:
            if rule.pattern != ir.DENSE_PATTERN:
                if rule.pattern not in patterns:
                    known = ", ".join(["dense", *patterns])
                    raise self.error(f"model '{m.name}' uses unknown pattern '{rule.pattern}'", rule,
                                     hint=f"define 'pattern {rule.pattern} {{ ... }}' or use one of: {known}")
                heads[rule.pattern] = patterns[rule.pattern].heads
            sel = rule.selector
            if isinstance(sel, ir.LayerSpan):
                first = self.eval(sel.first, constants, "a layer range", rule)
                last = self.eval(sel.last, constants, "a layer range", rule)
                if not 0 <= first <= last < layers:
                    raise self.error(f"layer range {first}..{last} is outside 0..{layers - 1}", rule,
                                     hint=f"model '{m.name}' has {layers} layers")
                picked = range(first, last + 1)
            elif isinstance(sel, ir.LayerEvery):
                every = self.eval(sel.every, constants, "'every'", rule)
                start = 0 if sel.start is None else self.eval(sel.start, constants, "'from'", rule)
                if every < 1 or start < 0:
                    raise self.error(f"'every {every} from {start}' needs every >= 1 and from >= 0", rule)
                picked = range(start, layers, every)
            else:
                picked = range(layers)
            for layer in picked:
                if chosen[layer] is None:  # first matching rule wins
                    chosen[layer] = rule.pattern
        missing = [i for i, c in enumerate(chosen) if c is None]
        if missing:
            raise self.error(f"model '{m.name}' gives no pattern to layers {_ranges(missing)}", m,
                             hint="add a final 'rest -> PATTERN' rule")
        if len(set(heads.values())) > 1:
            raise self.error(f"model '{m.name}' mixes patterns with different head counts: {heads}", m,
                             hint="every layer of one model has the same number of heads")
        return ModelPlan(m.name, tuple(chosen))


def _ranges(values: List[int]) -> str:
    out, start = [], values[0]
    for a, b in zip(values, values[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}..{a}")
            start = b
    return ", ".join(out)


def resolve(module: ir.Module, filename: str = "<string>", text: Optional[str] = None) -> S2File:
    return _Resolver(filename, text).resolve(module)
