"""Start-up phases: each the time since the one before, the first since the process began,
nothing after the first iteration began."""

from __future__ import annotations

import time

from hybridflow.executor.run.startup import Startup, process_start


def test_phases_add_up_to_the_time_since_the_process_started() -> None:
    began = process_start()
    assert 0 <= time.time() - began < 24 * 3600  # this process's own start, not the epoch
    up = Startup(start=time.time() - 2.0)
    up.mark("launch")
    time.sleep(0.05)
    up.mark("workers")
    up.finish()
    d = up.to_dict()
    assert list(d) == ["total_s", "launch_s", "workers_s", "eval_s"]
    assert 2.0 <= d["launch_s"] < 2.5 and 0.05 <= d["workers_s"] < 0.5
    assert abs(d["total_s"] - (time.time() - up.start)) < 0.05
    up.mark("workers")  # a restart's set-up after the first iteration: not start-up
    assert up.to_dict() == d
