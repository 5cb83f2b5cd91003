"""The benchmark's clock: throughput over many steps, not one synchronization per step."""

from __future__ import annotations

import pytest

from cifar_dist.bench.timing import figures, time_steps


class CountingClock:
    """A device clock that counts its synchronizations (each read synchronizes)."""

    def __init__(self):
        self.syncs, self.t = 0, 0.0

    def sync(self):
        self.syncs += 1

    def now(self):
        self.sync()
        self.t += 1.0  # one second between reads
        return self.t


def test_the_bench_synchronizes_once_per_repeat_not_per_step():
    clock, steps_run = CountingClock(), []
    timing = time_steps(steps_run.append, lambda: "batch", clock, warmup=3, steps=20, repeats=4)
    assert len(steps_run) == 3 + 4 * 20
    assert clock.syncs == 1 + 4  # after the warm-up, then at the end of each repeat
    assert timing["repeat_times"] == [1.0] * 4 and timing["step_times"] == pytest.approx([0.05] * 4)
    fig = figures(timing, steps=20, global_batch=64, world=2, peak_mib=1.0)
    assert fig["images_per_s"] == pytest.approx(20 * 64) and fig["images_per_s_per_device"] == pytest.approx(640)
    assert 0 <= fig["data_wait_share"] < 0.01
