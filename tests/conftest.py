"""Fixtures the test packages share, and the rule of the fast unit tier.

Tests are laid out like the packages (tests/simulator, tests/planner, ...). A test that
starts a process (a Ray cluster, spawned ranks, a subprocess) is marked ``process`` (or
``slow``); every other test is in the unit tier (``make test-unit``), and one that tries to
start a process anyway fails, naming the marker it needs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import multiprocessing.process
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from hybridflow.simulator.profile import Profile, load_profile

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # matplotlib builds its font cache with fc-list the first time it is imported on a
    # machine: do it before any test, so that no unit test starts that process
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager  # noqa: F401


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if request.node.get_closest_marker("process") or request.node.get_closest_marker("slow"):
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(
            f"{request.node.nodeid} starts a process: mark it @pytest.mark.process (or slow)"
        )

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    if str(REPO / "benchmarks") not in sys.path:  # benchmarks import each other by name
        sys.path.insert(0, str(REPO / "benchmarks"))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


A100: Profile = load_profile("a100-80gb")
# an A100 with 24 GiB: small jobs need splits and model parallelism on it (profiles are frozen)
A100_24GIB: Profile = dataclasses.replace(A100, hbm_gib=24.0)
