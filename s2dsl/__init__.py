"""s2dsl: a compiler for per-head sparse attention patterns.

The front end (parse, load, the pattern types) imports neither torch nor sympy, so the
command line's ``fmt``/``check``/``--version`` start fast; the analyzer, the reference and
the kernels are imported on first use of their names (module ``__getattr__``).
"""
from .errors import S2Error, S2SemanticError, S2SyntaxError
from .frontend import load, parse
from .library import local_stride
from .pattern import HeadSpec, Pattern
from .semantics import ModelPlan, S2File

__all__ = ["S2Error", "S2SemanticError", "S2SyntaxError", "load", "parse", "local_stride", "HeadSpec",
           "Pattern", "reference_attention", "ModelPlan", "S2File",
           "attention", "SparseAttention", "sparse_attention", "analyze"]
__version__ = "0.1.0"

# name -> module that defines it, imported on first access
_LAZY = {
    "analyze": ".analysis",
    "reference_attention": ".reference",
    "attention": ".runtime.api",
    "SparseAttention": ".runtime.api",
    "sparse_attention": ".runtime.api",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 's2dsl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
