"""The README's planning examples (and a job of each kind) print what they printed before the
restructuring, byte for byte: tests/cli/golden holds the output of each command, taken at the
commit before it. A change that means to change plans regenerates them on purpose:

    HYBRIDFLOW_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/cli/test_golden_plans.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hybridflow.cli.main import main

GOLDEN = Path(__file__).parent / "golden"
BIG = [
    "--gpu",
    "a100-80gb",
    "--gpus",
    "128",
    "--model",
    "llama-2-13b",
    "--algorithm",
    "ppo",
    "--prompt-len",
    "1024",
    "--response-len",
    "1024",
    "--batch",
    "1024",
    "--mini-batches",
    "8",
]
LOCAL = [
    "--gpu",
    "local-cpu",
    "--gpus",
    "4",
    "--model",
    "tiny",
    "--prompt-len",
    "16",
    "--response-len",
    "8",
    "--batch",
    "64",
    "--ppo-epochs",
    "2",
    "--mini-batches",
    "4",
]
COMMANDS = {  # name -> (arguments, files the command writes)
    "plan_13b": (["plan", *BIG, "--out", "plan.json"], ["plan.json"]),
    "plan_default": (["plan"], []),
    "plan_default_json_top3": (["plan", "--json", "--top", "3"], []),
    "plan_grpo_rule": (
        [
            "plan",
            "--gpu",
            "h100-80gb",
            "--gpus",
            "16",
            "--model",
            "llama-3.1-8b",
            "--algorithm",
            "grpo",
            "--reward",
            "rule",
            "--json",
        ],
        [],
    ),
    "plan_safe": (
        ["plan", "--gpus", "32", "--model", "qwen2.5-7b", "--algorithm", "safe-rlhf", "--json"],
        [],
    ),
    "plan_remax_spread": (
        [
            "plan",
            "--gpus",
            "16",
            "--model",
            "qwen2.5-1.5b",
            "--algorithm",
            "remax",
            "--response-mean",
            "300",
            "--json",
        ],
        [],
    ),
    "plan_moe": (
        [
            "plan",
            "--gpu",
            "h100-80gb",
            "--gpus",
            "64",
            "--model",
            "qwen3-30b-a3b",
            "--algorithm",
            "grpo",
            "--reward",
            "rule",
            "--json",
        ],
        [],
    ),
    "export_verl": (["plan", "--export", "verl"], []),
    "export_openrlhf": (["plan", "--export", "openrlhf"], []),
    "plan_local": (["plan", *LOCAL, "--json"], []),
    "sweep_70b": (
        [
            "sweep",
            "--gpu",
            "a100-80gb",
            "--model",
            "llama-2-70b",
            "--gpus",
            "8:256",
            "--target-tokens-per-s",
            "10000",
            "--out",
            "sweep-70b",
        ],
        ["sweep-70b/sweep.csv"],
    ),
}
SIMULATE = {
    "simulate_hybridengine": ["--reshard", "hybridengine"],
    "simulate_hybridengine-v": ["--reshard", "hybridengine-v"],
    "simulate_allgather": ["--reshard", "allgather"],
    "simulate_json": ["--json"],
}


def _run(capsys, argv: list[str]) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    return f"rc={rc}\n{out}\n--- stderr\n{err}"


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("HYBRIDFLOW_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from tests/cli/golden/{name}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_prints_what_it_printed(name, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    argv, files = COMMANDS[name]
    _check(f"{name}.out", _run(capsys, argv))
    for f in files:
        _check(f"{name}.{Path(f).name}", (tmp_path / f).read_text())


@pytest.mark.parametrize("name", list(SIMULATE))
def test_simulate_prints_what_it_printed(name, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    # the resharding schemes are the synchronous plan's (an asynchronous one has no reshard)
    assert main(["plan", *BIG, "--pipeline", "sync", "--out", "plan.json"]) == 0
    capsys.readouterr()
    _check(f"{name}.out", _run(capsys, ["simulate", "plan.json", *SIMULATE[name]]))
