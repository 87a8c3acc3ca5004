"""Decode steps captured in a CUDA graph and replayed.

A decode step over the paged cache has static shapes once its page tables are wide enough
for the longest sequence (``PageTable.enable_static``): one token per sequence, the page
bookkeeping planned by device ops from the device lengths (``PageTable._plan_static``), the
kernels reading lengths and page tables from device memory. ``DecodeGraph`` runs such a
step: the first call eagerly (it compiles the kernels and is a real step; ``warmup`` calls
when a compiled step needs a second one to settle), the next captures the step and replays
it, every later call replays it. Before each step the host
checks the pool and catches eviction up (``prepare_static``), after it counts the new token
(``commit_static``); nothing inside the step waits for the host.

``step`` reads its inputs from tensors the caller fills in place before each call (the
token ids, positions, queries...) and returns its outputs, which are the graph's own
tensors on replay (overwritten by the next call). Host state that ``step``'s Python code
changes while it is captured (it runs once then, but executes nothing) is put back by
``host_state``: a pair (snapshot, restore) of callables; ``on_commit`` advances it after
every step instead.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Callable, Optional, Sequence, Tuple

import torch

from .paging import PageTable

__all__ = ["DecodeGraph", "opaque_handle", "opaque_attention"]


# ---------------------------------------------------------------------------- one opaque call per layer
# A cache step keeps host state (lengths, the shared plan, eviction) that a traced graph would
# freeze, so under torch.compile it must run eagerly. A graph break there splits every layer's
# compiled code in pieces (the norms, rotary embedding and MLP around attention then cannot
# fuse across it, and each piece is a frame of its own); a custom op is one opaque node in a
# single graph instead: the compiler fuses everything around it and calls back into eager code
# for the cache. Layers find their step through an int handle (a graph constant). A handle is
# the smallest one free, so the layers of a new cache that replaces an old one get the old
# one's handles: the same graph again, which inductor's graph cache serves without compiling.
_STEPS: "dict[int, weakref.ReferenceType]" = {}


def opaque_handle(step) -> int:
    """A handle for ``opaque_attention`` that calls the bound method ``step(q, k, v, scale, mask)``
    (held weakly: the handle is free again once its object is gone)."""
    handle = next(h for h in itertools.count(1) if h not in _STEPS)
    _STEPS[handle] = weakref.WeakMethod(step)
    weakref.finalize(step.__self__, _STEPS.pop, handle, None)
    return handle


@torch.library.custom_op("s2dsl::opaque_attention", mutates_args=())
def opaque_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     handle: int, scale: Optional[float]) -> torch.Tensor:
    """The step registered as ``handle``: q (b, h, n, d) -> (b, h, n, d) in (b, n, h, d) memory."""
    ref = _STEPS.get(handle)
    step = ref() if ref is not None else None
    if step is None:
        raise RuntimeError(f"s2dsl::opaque_attention: handle {handle} names no live cache layer (a compiled "
                           "graph outlived its cache)")
    out = step(q, k, v, scale, mask)
    b, h, n, d = q.shape
    if out.shape != (b, h, n, d) or out.stride() != _transposed_strides(b, h, n, d):
        out = out.transpose(1, 2).contiguous().transpose(1, 2)  # the layout the fake promises
    return out


def _transposed_strides(b, h, n, d):
    return (n * h * d, d, h * d, 1)


@opaque_attention.register_fake
def _(q, k, v, mask, handle, scale):
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d).transpose(1, 2)


class DecodeGraph:
    """One static decode step of ``tables``' sequences ``seq_ids`` (one id list per table), graphed."""

    def __init__(self, step: Callable[[], object], tables: Sequence[PageTable], seq_ids: Sequence[Sequence],
                 *, max_length: int, host_state: Optional[Tuple[Callable, Callable]] = None,
                 on_commit: Optional[Callable[[], None]] = None, capture: bool = True, warmup: int = 1):
        tables = list(tables)
        if len(seq_ids) != len(tables):
            raise ValueError(f"{len(seq_ids)} sequence-id lists for {len(tables)} page tables")
        if capture and not all(t.device.type == "cuda" for t in tables):
            raise ValueError("CUDA graphs capture steps on CUDA devices; pass capture=False to run the static "
                             "step eagerly elsewhere")
        self.step, self.tables, self.seq_ids = step, tables, [list(s) for s in seq_ids]
        self.host_state, self.on_commit, self.capture = host_state, on_commit, capture
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 eager step (it compiles the kernels), got {warmup}")
        self.warmup = warmup
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.outputs = None
        self.calls = 0
        for t in tables:
            t.enable_static(max_length)

    def __call__(self):
        for t, ids in zip(self.tables, self.seq_ids):
            t.prepare_static(ids)
        try:
            if not self.capture or self.calls < self.warmup:
                out = self._eager()
            else:
                if self.graph is None:
                    self._capture()
                self.graph.replay()
                out = self.outputs
        except BaseException:
            for t in self.tables:  # the step did not happen: later host-planned steps must not go static
                t.in_static_step = False
                t.plan = None
            raise
        self.calls += 1
        for t, ids in zip(self.tables, self.seq_ids):
            t.commit_static(ids)
        if self.on_commit is not None:
            self.on_commit()
        return out

    def _eager(self):
        if self.capture:  # warm up on a side stream, as CUDA graph capture asks
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.step()
            torch.cuda.current_stream().wait_stream(stream)
            return out
        return self.step()

    def _capture(self):
        saved = self.host_state[0]() if self.host_state else None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.step()
        if self.host_state:
            self.host_state[1](saved)
        for t in self.tables:
            t.plan = None

    def close(self) -> None:
        """Back to host-planned steps (the graph is dropped)."""
        for t in self.tables:
            t.disable_static()
        self.graph = None
        self.outputs = None
