"""One error base; the command line tells bad input (one line, exit 2) from a run that
stopped (one line, exit 1) from a bug (its traceback kept)."""

from __future__ import annotations

import pytest

from hybridflow.cli import main as cli
from hybridflow.cli import plan as plan_command
from hybridflow.errors import HybridflowError, RunStopped, UserError
from hybridflow.layout import LayoutError
from hybridflow.plan import PlanError
from hybridflow.simulator.costs import DoesNotFit
from hybridflow.simulator.job import JobError


def test_project_errors_share_one_base() -> None:
    for error in (LayoutError, PlanError, JobError, DoesNotFit):
        assert issubclass(error, UserError) and issubclass(error, HybridflowError)
    assert issubclass(RunStopped, HybridflowError) and not issubclass(RunStopped, UserError)


def _failing(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    def main(args: object) -> int:
        raise error

    monkeypatch.setattr(plan_command, "main", main)


def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys) -> None:
    _failing(monkeypatch, UserError("--gpus must be a positive integer"))
    assert cli.main(["plan"]) == 2
    err = capsys.readouterr().err
    assert err == "hybridflow plan: error: --gpus must be a positive integer\n"


def test_a_stopped_run_is_one_line_and_exit_1(monkeypatch, capsys) -> None:
    _failing(monkeypatch, RunStopped("worker group 'set0' rank 1: the worker process died"))
    assert cli.main(["plan"]) == 1
    assert (
        capsys.readouterr().err
        == "hybridflow plan: stopped: worker group 'set0' rank 1: the worker process died\n"
    )


def test_a_bug_keeps_its_traceback(monkeypatch) -> None:
    """A ValueError that is not a UserError (numpy, torch, our own bug) is not swallowed:
    it leaves main() and Python prints its traceback (exit code 1)."""
    _failing(monkeypatch, ValueError("operands could not be broadcast together"))
    with pytest.raises(ValueError, match="broadcast"):
        cli.main(["plan"])


def test_debug_logging_shows_where_a_user_error_came_from(monkeypatch, capsys) -> None:
    _failing(monkeypatch, UserError("no such model"))
    assert cli.main(["--log-level", "debug", "plan"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("hybridflow plan: error: no such model")
