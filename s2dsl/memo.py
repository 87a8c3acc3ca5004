"""Per-object memos for the launch path.

A launch looks up its pattern's plan and its kernel module by the pattern. Keyed by the
pattern's value, each lookup hashes the whole frozen pattern (~13 us on the host) and, for a
module, builds the kernel cache's key (a repr and a sha256, ~75 us): together about half of
``s2dsl.attention``'s host time. Patterns are immutable, so what was derived from one object
holds for as long as it lives: these memos are keyed by the object's identity and dropped when
it is collected (equal patterns made separately each derive once, then share the value caches;
a pattern an ``lru_cache`` keeps alive keeps its memo too).

Inside a ``torch.compile`` trace the memo is skipped (``make()`` runs): dynamo would guard on the
memo's dictionary, and a first use inside a compiled function would recompile at the second call.
"""
from __future__ import annotations

import sys
import weakref
from typing import Callable, Hashable, TypeVar

T = TypeVar("T")

_memos: dict = {}  # id(obj) -> (weak reference to obj, {key: value})


def per_object(obj, key: Hashable, make: Callable[[], T]) -> T:
    """``make()``, computed once per live ``obj`` and ``key`` (``obj`` must take weak references)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.compiler.is_compiling():
        return make()
    entry = _memos.get(id(obj))
    if entry is None or entry[0]() is not obj:  # new, or an id reused after its object died
        ident = id(obj)

        def forget(ref, ident=ident):
            if _memos.get(ident, (None,))[0] is ref:
                _memos.pop(ident, None)  # (a racing thread may have dropped it first)
        entry = _memos[ident] = (weakref.ref(obj, forget), {})
    values = entry[1]
    if key not in values:
        values[key] = make()
    return values[key]
