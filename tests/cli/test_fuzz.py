"""Every bad input at the command line (issue #26): each flag of plan, simulate, sweep,
report and run, and each field of a job, cluster, plan and profile file, given hostile
values (zero, negative, huge, float, NaN, inf, empty, unicode, wrong type). Each case ends
in exit 0 with a sane answer, or exit 2 with one line on stderr: never a traceback, a hang
or a silent wrong answer.

The flags come from the parser itself, so a new flag is fuzzed without editing this file.
`run` is checked up to the point where it would write its run dir and start Ray.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hybridflow.cli.main import build_parser, main

HUGE = str(10**40)
HUGER = str(10**400)  # beyond a float: int * float overflows
HOSTILE = ("0", "-1", HUGE, HUGER, "1e400", "nan", "inf", "-inf", "", "é", "1.5", "abc")
MISSING = object()  # the field left out
# the same, as values of a JSON or YAML file, plus the wrong types and none at all
HOSTILE_DATA: tuple[Any, ...] = (
    MISSING,
    0,
    -1,
    10**40,
    10**400,
    1.5,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "é",
    "abc",
    None,
    True,
    [],
    {},
)
CASE_S = 10  # a case running longer counts as a hang
SMALL_JOB = {
    "--model": "qwen2.5-0.5b",
    "--algorithm": "grpo",
    "--reward": "rule",
    "--batch": "8",
    "--prompt-len": "64",
    "--response-len": "64",
}
# flags and positionals of each command's small valid command line
BASES: dict[str, tuple[list[str], dict[str, str]]] = {
    "plan": ([], {"--gpu": "h100-80gb", "--gpus": "2", **SMALL_JOB}),
    "sweep": (
        [],
        {
            "--gpu": "h100-80gb",
            "--gpus": "1:2",
            "--steps": "10",
            "--deadline-hours": "1",
            **SMALL_JOB,
        },
    ),
    "simulate": (["PLAN"], {}),
    "report": (
        [],
        {
            "--compare": "",
            "--gpu": "h100-80gb",
            "--models": "qwen2.5-0.5b",
            "--gpus": "2",
            "--algorithm": "grpo",
        },
    ),
    "run": ([], {"--devices": "2", "--iterations": "2"}),
}
# flags fuzzed without some of the base's (they would disagree with it)
DROP = {("plan", "--nodes"): ("--gpus",), ("report", "run_dirs"): ("--compare",)}
# numeric flags for which 0 is a meaningful value
ZERO_OK = {
    "--prompt-mean",
    "--response-mean",
    "--rule-cpu-s",
    "--seed",
    "--max-restarts",
    "--staleness",  # 0: an asynchronous plan that overlaps nothing
}
# numeric flags for which a huge value is a meaningful one: K best plans, sweep targets
HUGE_OK = {"--top", "--target-tokens-per-s", "--steps", "--deadline-hours"}
# failures whose fix lies outside the command line's and the simulator's input checks,
# each with where it belongs; a case that passes must be taken out
KNOWN: dict[str, str] = {}
TOKENS_ZERO = re.compile(r"(?<![\d.,])0(\.0+)? tokens/s|\"tokens_per_s\": 0(\.0+)?[,\s}]")
NOT_FINITE = re.compile(r"\b(nan|inf|infinity)\b", re.IGNORECASE)


def _short(text: str) -> str:
    """`text` with the huge numbers written as powers (readable failure messages)."""
    return text.replace(HUGER, "10**400").replace(HUGE, "10**40")


class _Started(Exception):
    """`run` passed its checks and would now write its run dir and start Ray."""


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Hang(f"ran over {CASE_S} s")


@pytest.fixture(autouse=True)
def _sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Outputs (--out "0", ...) land in tmp_path; no plot is drawn (the checks come first)."""
    from hybridflow.report import compare, sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in ("compare_bars", "reshard_lines"):
        monkeypatch.setattr(compare.plots, name, lambda *a, **k: None)
    monkeypatch.setattr(sweep, "write_png", lambda *a, **k: None)
    old = signal.signal(signal.SIGALRM, _alarm)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def plan_dict(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A valid plan file's content (with its sets' memory settings and layouts' cp)."""
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["plan", *_flat(BASES["plan"][1]), "--out", str(path)]) == 0
    return json.loads(path.read_text())


def _flat(flags: dict[str, str]) -> list[str]:
    return [x for k, v in flags.items() for x in ((k,) if k == "--compare" else (k, v))]


def _outcome(
    argv: list[str], capsys: pytest.CaptureFixture[str], echo: str | None = None
) -> tuple[object, str | None]:
    """The exit code of `argv`, and None if it ended well (exit 0 and a sane answer, or
    exit 2 and one error line), else what went wrong. `echo`: a name given on the command
    line (an --out folder "nan"), left out of the check of the answer."""
    argparse_exit = False
    signal.setitimer(signal.ITIMER_REAL, CASE_S)
    try:
        code: object = main(argv)
    except SystemExit as e:  # argparse: its usage, then one error line
        code, argparse_exit = e.code, True
    except _Started:
        code = 0
    except Exception as e:  # noqa: BLE001 (a traceback is what this test looks for)
        capsys.readouterr()
        return None, f"{type(e).__name__}: {_short(' '.join(str(e).split()))[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    out, err = capsys.readouterr()
    out = out.replace(echo, "") if echo else out
    lines = err.strip().splitlines()
    if code == 2:
        if not lines or ": error: " not in lines[-1] or (len(lines) != 1 and not argparse_exit):
            return code, f"exit 2 without one error line: {_short(err)[:300]!r}"
        return code, None
    if code != 0:
        return code, f"exit {code}: {_short(err.strip())[:200]!r}"
    if NOT_FINITE.search(out) or TOKENS_ZERO.search(out):
        return code, f"exit 0 with a non-finite or zero answer: {_short(out)[:300]!r}"
    return code, None


def _must_work(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The valid command line the cases vary must itself plan (or, for run, pass)."""
    try:
        code = main(argv)
    except _Started:
        code = 0
    err = capsys.readouterr().err.strip()
    assert code == 0, f"the base command {' '.join(argv)!r} must work: {err}"


def _expected_refusal(action: argparse.Action, value: str) -> bool:
    """Values a flag must refuse: empty ones, and NaN, inf, negative, zero or huge numbers
    where it takes a number."""
    if value == "":
        return True
    if action.type not in (int, float):
        return False
    flag = action.option_strings[-1]
    return (
        value in ("nan", "inf", "-inf", "1e400", "-1")
        or (value == "0" and flag not in ZERO_OK)
        or (value in (HUGE, HUGER) and flag not in HUGE_OK)
    )


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _cases(command: str) -> Iterator[tuple[argparse.Action, str | None]]:
    """(action, value) for every flag and positional of `command`; None for a switch."""
    for action in _subparser(command)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings and action.nargs == 0:
            yield action, None
            continue
        for value in HOSTILE:
            yield action, value


def _argv(command: str, action: argparse.Action, value: str | None, plan: Path) -> list[str]:
    positional, flags = BASES[command]
    flags = dict(flags)
    name = action.option_strings[-1] if action.option_strings else action.dest
    for dropped in DROP.get((command, name), ()):
        flags.pop(dropped)
    positional = [str(plan) if p == "PLAN" else p for p in positional]
    if not action.option_strings:
        positional = [value] if value is not None else []
    elif value is None:
        return [command, *positional, *_flat(flags), name]
    else:
        flags[name] = value
    return [command, *positional, *_flat(flags)]


@pytest.fixture
def dry_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` stops where its checks end: before the run dir is written and Ray starts."""
    from hybridflow.executor.run import driver

    class _NoRunDir:
        def __init__(self, path: object) -> None:
            raise _Started

    monkeypatch.setattr(driver, "RunDir", _NoRunDir)


@pytest.mark.parametrize("command", list(BASES))
def test_every_flag_takes_every_hostile_value(
    command: str,
    plan_dict: dict,
    dry_run: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = tmp_path / "base-plan.json"
    plan.write_text(json.dumps(plan_dict))
    positional, flags = BASES[command]
    base = [command, *(str(plan) if p == "PLAN" else p for p in positional), *_flat(flags)]
    _must_work(base, capsys)
    failures = []
    for action, value in _cases(command):
        argv = _argv(command, action, value, plan)
        echo = None if action.type in (int, float) else value
        code, problem = _outcome(argv, capsys, echo)
        if not problem and code == 0 and value is not None and _expected_refusal(action, value):
            problem = "accepted (exit 0)"
        if problem:
            failures.append(_short(f"{' '.join(argv[1:])!r}: {problem}"))
    assert not failures, "\n".join(failures)


def test_top_level_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    failures = []
    for value in HOSTILE:
        argv = ["--log-level", value, "plan", *_flat(BASES["plan"][1])]
        _, problem = _outcome(argv, capsys)
        if problem:
            failures.append(_short(f"--log-level {value!r}: {problem}"))
    assert not failures, "\n".join(failures)


# ---- the files ---------------------------------------------------------------------------
def _paths(data: Any, skip: tuple[str, ...] = ()) -> Iterator[tuple]:
    """The path of every value inside `data` (containers too), outside the keys `skip`."""
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for key, value in items:
        yield (key,)
        if isinstance(value, (dict, list)) and key not in skip:
            for rest in _paths(value):
                yield (key, *rest)


def _replaced(data: Any, path: tuple, value: Any) -> Any:
    """A copy of `data` with the value at `path` replaced by `value` (MISSING: left out)."""
    out = copy.deepcopy(data)
    inner = out
    for key in path[:-1]:
        inner = inner[key]
    if value is MISSING:
        del inner[path[-1]]
    else:
        inner[path[-1]] = value
    return out


def _fuzz_file(
    data: dict,
    write: Callable[[Any], Path],
    argv_of: Callable[[Path], list[str]],
    capsys: pytest.CaptureFixture[str],
    skip: tuple[str, ...] = (),
) -> list[str]:
    """What goes wrong with each value of `data` replaced by each hostile one."""
    _must_work(argv_of(write(data)), capsys)
    failures = []
    for path in _paths(data, skip):
        for value in HOSTILE_DATA:
            _, problem = _outcome(argv_of(write(_replaced(data, path, value))), capsys)
            shown = "missing" if value is MISSING else repr(value)
            case = _short(f"{'.'.join(map(str, path))} = {shown}")
            if case in KNOWN and not problem:
                failures.append(f"{case}: passes now, take it out of KNOWN")
            elif problem and case not in KNOWN:
                failures.append(f"{case}: {_short(problem)}")
    return failures


def _json_writer(path: Path) -> Callable[[Any], Path]:
    def write(data: Any) -> Path:
        path.write_text(json.dumps(data))
        return path

    return write


def test_every_job_file_field(
    plan_dict: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = dict(plan_dict["job"], rule_cpu_s=0.002, prompt_mean=32.0, response_mean=32.0)
    spread = dict(plan_dict["job"], response_dist=[[16, 1.0], [64, 2.0]])
    write = _json_writer(tmp_path / "job.json")
    failures = []
    for data in (job, spread):
        failures += _fuzz_file(
            data, write, lambda p: ["plan", "--gpus", "2", "--job", str(p)], capsys
        )
    assert not failures, "\n".join(failures)


def test_every_cluster_file_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = {"gpu": "h100-80gb", "nodes": 1, "gpus_per_node": 2}
    write = _json_writer(tmp_path / "cluster.json")
    job = _flat(SMALL_JOB)
    failures = _fuzz_file(cluster, write, lambda p: ["plan", *job, "--cluster", str(p)], capsys)
    assert not failures, "\n".join(failures)


def test_every_plan_file_field(
    plan_dict: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each field of the plan (job, cluster, sets with their memory settings and layouts'
    cp); `models` and `predicted`, which simulate recomputes, are replaced whole."""
    write = _json_writer(tmp_path / "plan.json")
    failures = _fuzz_file(
        plan_dict,
        write,
        lambda p: ["simulate", str(p)],
        capsys,
        skip=("models", "predicted"),
    )
    assert not failures, "\n".join(failures)


def test_every_profile_file_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hybridflow import profiles

    source = profiles.shipped("h100-80gb")
    assert source is not None
    data = yaml.safe_load(source.read_text())
    path = tmp_path / "h100-80gb.yaml"

    def write(d: Any) -> Path:
        path.write_text(yaml.safe_dump(d, allow_unicode=True))
        return path

    job = _flat(SMALL_JOB)
    failures = _fuzz_file(
        data, write, lambda p: ["plan", "--gpu", str(p), "--gpus", "2", *job], capsys
    )
    assert not failures, "\n".join(failures)
