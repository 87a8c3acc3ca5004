"""A pattern restricted to some of its heads: what one GPU runs in head-parallel attention."""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Optional, Tuple

from ..pattern import Pattern

__all__ = ["restrict", "kv_heads_of"]


def _checked(pattern: Pattern, heads: Iterable[int]) -> Tuple[int, ...]:
    heads = tuple(int(h) for h in heads)
    if not heads:
        raise ValueError(f"pattern {pattern.name}: restrict to no heads; give at least one kv group")
    if len(set(heads)) != len(heads):
        raise ValueError(f"pattern {pattern.name}: heads listed twice in {list(heads)}")
    bad = [h for h in heads if not 0 <= h < pattern.heads]
    if bad:
        raise ValueError(f"pattern {pattern.name}: heads {bad} outside 0..{pattern.heads - 1}")
    chosen = set(heads)
    g = pattern.group_size
    for h in heads:
        group = set(range(pattern.kv_head_of(h) * g, (pattern.kv_head_of(h) + 1) * g))
        if not group <= chosen:
            raise ValueError(f"pattern {pattern.name}: head {h} shares kv head {pattern.kv_head_of(h)} with heads "
                             f"{sorted(group - chosen)}, which are not included; keep GQA groups whole")
    return tuple(sorted(heads))


def kv_heads_of(pattern: Pattern, heads: Iterable[int]) -> Tuple[int, ...]:
    """The kv heads (ascending) whose groups make up ``heads``."""
    return tuple(sorted({pattern.kv_head_of(h) for h in _checked(pattern, heads)}))


def restrict(pattern: Pattern, heads: Iterable[int], name: Optional[str] = None) -> Pattern:
    """``pattern`` on ``heads`` only (whole GQA groups), renumbered in ascending order.

    Head ``t`` of the result is the ``t``-th smallest of ``heads`` and keeps exactly what it
    kept before; kv head ``u`` of the result is the ``u``-th of ``kv_heads_of(...)``, so the
    group structure survives: the result's q head t still reads its own kv head.
    """
    heads = _checked(pattern, heads)
    kv = len(heads) // pattern.group_size
    # replace() carries every pattern-wide field (causality, prefix, ...) over unchanged
    return replace(pattern, name=name or pattern.name, heads=len(heads), kv_heads=kv,
                   head_specs=tuple(pattern.head_specs[h] for h in heads), definition=None)
