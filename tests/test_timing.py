"""The runtime's timers (cost-model fits, split tuning)."""
import time

import pytest
import torch

from s2dsl.runtime.timing import event_ms, wall_ms


def test_wall_ms_is_the_median_call_after_one_warm_up():
    calls = []
    delays = iter([0.0, 0.030, 0.002, 0.002, 0.002, 0.030])  # warm-up, then five timed calls

    def fn():
        calls.append(1)
        time.sleep(next(delays))
    ms = wall_ms(fn, "cpu", reps=5)
    assert len(calls) == 6
    assert 2.0 <= ms < 25.0  # the median of 30, 2, 2, 2, 30 ms: one of the 2 ms calls, not an outlier


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_event_ms_counts_device_time_per_call_back_to_back_or_not():
    a = torch.randn(2048, 2048, device="cuda")
    one = event_ms(lambda: a @ a, reps=5)
    amortised = event_ms(lambda: a @ a, reps=3, per_call=8)
    assert one > 0 and amortised > 0
    assert 0.5 < amortised / one < 1.5  # the same kernel: its time per call, however it was queued
