"""Limits on what a .s2 file may ask for, each with the reason it exists.

The parser refuses literals and expressions beyond these sizes (deep nesting would exhaust
Python's recursion in the tree transformer, the evaluator and the printer; a huge literal
costs quadratic time to convert). The resolver refuses values that the analyzer can hold
but the kernels cannot: the generated kernels index blocks with int32 and treat a window
of ``KERNEL_BLOCKS`` blocks as unbounded, and work per head or per layer is done in Python.
"""
from __future__ import annotations

from typing import Optional, Tuple

#: digits of one integer literal
MAX_LITERAL_DIGITS = 18
#: nested operators in one expression (a sum of n terms nests n - 1 deep)
MAX_EXPR_DEPTH = 100
#: any evaluated value (constants, offsets, ranges): beyond it only mistakes live
MAX_VALUE = 1 << 62
#: block counts the int32 kernels can index (``codegen.lower.UNBOUNDED``): windows, sinks,
#: strides, shard counts and top-k sizes must stay below it
KERNEL_BLOCKS = 1 << 30
#: tokens per block (a kernel tile constant)
MAX_BLOCK = 1 << 16
#: heads of one pattern and layers of one model, resolved one by one
MAX_HEADS = 4096
MAX_LAYERS = 4096

# what the resolver evaluates -> (largest value allowed, why)
_UPPER = {
    "block": (MAX_BLOCK, "blocks are tiles of the kernels: use 16..65536 tokens"),
    "heads": (MAX_HEADS, f"patterns have at most {MAX_HEADS} heads"),
    "kv_heads": (MAX_HEADS, f"patterns have at most {MAX_HEADS} heads"),
    "layers": (MAX_LAYERS, f"models have at most {MAX_LAYERS} layers"),
    **{what: (KERNEL_BLOCKS - 1, "the kernels index blocks with int32; a larger value means nothing "
                                 "for any sequence they can run")
       for what in ("window", "window ahead", "sink", "stride", "relative stride", "global", "prefix",
                    "shard count", "topk", "topk recent")},
}


def _power(n: int) -> str:
    """``n`` as a power of two where it is one (or one less), else as digits."""
    if n < 1 << 20:
        return str(n)
    if n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    if (n + 1) & n == 0:
        return f"2^{n.bit_length()} - 1"
    return str(n)


def _show(value: int) -> str:
    if abs(value) < 10 ** 30:
        return str(value)
    return f"a number of about {int(abs(value).bit_length() * 0.30103) + 1} digits"  # str() is quadratic


def value_problem(what: str, value: int, where: str = "") -> Optional[Tuple[str, str]]:
    """``(message, hint)`` when ``value``, evaluated for ``what``, is beyond a limit; else None.

    Only upper limits: the resolver's own checks say why a negative value is wrong."""
    upper, why = _UPPER.get(what, (MAX_VALUE, "values this large are beyond every pattern s2dsl can run"))
    if value > upper:
        return f"{what} is {_show(value)}{where}, above the limit {_power(upper)}", why
    if abs(value) > MAX_VALUE:
        return f"{what} is {_show(value)}{where}, beyond the limit of +-{_power(MAX_VALUE)}", \
            "values this large are beyond every pattern s2dsl can run"
    return None
