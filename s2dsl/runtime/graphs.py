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

from typing import Callable, Optional, Sequence, Tuple

import torch

from .paging import PageTable

__all__ = ["DecodeGraph"]


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
