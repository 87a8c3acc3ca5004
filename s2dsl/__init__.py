"""s2dsl: a compiler for per-head sparse attention patterns."""
from .analysis import analyze
from .errors import S2Error, S2SemanticError, S2SyntaxError
from .frontend import load, parse
from .library import local_stride
from .pattern import HeadSpec, Pattern
from .reference import reference_attention
from .semantics import ModelPlan, S2File
from .runtime.api import SparseAttention, attention, sparse_attention

__all__ = ["S2Error", "S2SemanticError", "S2SyntaxError", "load", "parse", "local_stride", "HeadSpec",
           "Pattern", "reference_attention", "ModelPlan", "S2File",
           "attention", "SparseAttention", "sparse_attention", "analyze"]
__version__ = "0.1.0"
