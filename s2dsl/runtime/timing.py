"""Timers for the runtime's own measurements (the cost model's fits, split tuning): each takes
the median of a few calls after one untimed call that compiles and warms what ``fn`` runs."""
from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["wall_ms", "event_ms"]


def wall_ms(fn: Callable[[], object], device, reps: int = 5) -> float:
    """Median wall time of ``fn()`` in ms, synchronised before and after each call on CUDA: what
    a caller waits for, host work included (a recompute's host-side gathers, say)."""
    cuda = torch.device(device).type == "cuda"
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def event_ms(fn: Callable[[], object], reps: int = 5, per_call: int = 1) -> float:
    """Device time of ``fn()`` in ms by CUDA events on the current stream (host time not counted).

    ``per_call == 1``: the median of ``reps`` calls each between its own events. ``per_call > 1``:
    ``reps`` rounds of ``per_call`` back-to-back calls, queued behind a ~1 ms device-side sleep so
    that the host's launch cost (more than a short kernel runs) does not leave gaps between them;
    the median round over ``per_call``."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if per_call > 1 and hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(2_000_000)  # ~1 ms of cycles: longer than the host takes to queue the round
        start.record()
        for _ in range(per_call):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per_call)
    return sorted(times)[len(times) // 2]
