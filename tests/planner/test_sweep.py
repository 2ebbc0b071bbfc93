"""The sweep against the planner: its best plan at each count is `plan_job` at that count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybridflow.cli.main import main
from hybridflow.planner.asynchronous import AsyncSearch
from hybridflow.planner.search import Planner, plan_job, standard_placements
from hybridflow.planner.sweep import Target, gpu_counts, planner_points, run_sweep
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job
from hybridflow.simulator.profile import load_profile

JOB = Job.create("ppo", "llama-2-7b", 512, 512, 256, mini_batches=4)


@pytest.fixture(scope="module")
def swept():
    profile = load_profile("a100-80gb")
    counts = gpu_counts(1, 16, 8)
    plan_at = planner_points("a100-80gb", JOB, profile, 8)
    return profile, run_sweep(counts, plan_at, Target(), JOB.to_dict(), "a100-80gb", 8)


def test_best_at_each_count_equals_plan_job(swept) -> None:
    profile, result = swept
    assert [r.gpus for r in result.rows] == [1, 2, 4, 8, 16]
    assert any(r.feasible for r in result.rows)
    for row in result.rows:
        cluster = Cluster.from_gpus("a100-80gb", row.gpus, 8)
        if not row.feasible:
            with pytest.raises(ValueError, match="smallest GPU count that fits"):
                plan_job(cluster, JOB, profile)
            continue
        alone = plan_job(cluster, JOB, profile)[0].to_dict()  # a fresh planner, no shared tables
        fresh = AsyncSearch(Planner(JOB, profile, 8)).plan(cluster)
        asynchronous = None if fresh is None else fresh.to_dict()
        faster = alone
        if asynchronous is not None:
            tps = asynchronous["predicted"]["tokens_per_s"]
            faster = asynchronous if tps > alone["predicted"]["tokens_per_s"] else alone
        assert row.plan == faster
        assert row.tokens_per_s == faster["predicted"]["tokens_per_s"]
        assert row.category == ("async" if faster is asynchronous else row.category)
        standard = standard_placements(cluster, JOB, profile)
        assert row.standard == {
            **{k: p.to_dict()["predicted"]["tokens_per_s"] for k, p in standard.items()},
            "async": None if asynchronous is None else asynchronous["predicted"]["tokens_per_s"],
        }
    assert any(r.standard["async"] for r in result.rows)


def test_cli_sweep_writes_table_csv_png(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "sweep",
            "--gpu",
            "a100-80gb",
            "--model",
            "llama-2-7b",
            "--prompt-len",
            "512",
            "--response-len",
            "512",
            "--batch",
            "256",
            "--mini-batches",
            "4",
            "--gpus",
            "4:16",
            "--target-tokens-per-s",
            "1",
            "--out",
            str(tmp_path),
            "--json",
        ]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    feasible = [r["gpus"] for r in data["rows"] if r["feasible"]]
    assert data["smallest_meeting_target"] == feasible[0]  # any feasible count makes 1 token/s
    assert (tmp_path / "sweep.csv").stat().st_size > 0
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpus", "0:8"], "--gpus must be LO:HI"),
        (["--gpus", "9:15"], "no cluster size"),
        (["--steps", "10"], "go together"),
        (["--model", "no-such-model"], "no-such-model"),
        (["--gpu", "no-such-gpu"], "no-such-gpu"),
        (["--algorithm", "dpo"], "invalid choice"),
        (["--job", "/nonexistent/job.yaml"], "does not exist"),
        (["--model", ""], "give --model"),
    ],
)
def test_cli_user_errors_exit_2(argv: list[str], message: str, capsys) -> None:
    flags = {"--gpu": "a100-80gb", "--model": "llama-2-7b", "--gpus": "8:8"}
    flags.update(zip(argv[::2], argv[1::2]))
    try:
        code = main(["sweep", *(w for pair in flags.items() for w in pair)])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_job_file(tmp_path: Path, capsys) -> None:
    job_file = tmp_path / "job.yaml"
    job_file.write_text(json.dumps(JOB.to_dict()))
    assert (
        main(["sweep", "--gpu", "a100-80gb", "--job", str(job_file), "--gpus", "8:8", "--json"])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["job"] == JOB.to_dict() and data["rows"][0]["gpus"] == 8


def test_cli_sweep_takes_the_plan_job_flags(capsys) -> None:
    """sweep and plan share the job flags (cli/jobargs.py): a rule reward and a length spread."""
    flags = [
        "--model",
        "tiny",
        "--algorithm",
        "grpo",
        "--reward",
        "rule",
        "--prompt-len",
        "64",
        "--response-len",
        "64",
        "--response-mean",
        "20",
        "--rule-cpu-s",
        "0.002",
        "--batch",
        "8",
        "--mini-batches",
        "2",
    ]
    assert main(["sweep", "--gpu", "local-cpu", "--gpus", "4:4", *flags, "--json"]) == 0
    swept = json.loads(capsys.readouterr().out)
    assert swept["job"]["models"]["reward"] == "rule"
    assert swept["job"]["response_mean"] == 20.0 and swept["job"]["rule_cpu_s"] == 0.002
    assert (
        main(["plan", "--gpu", "local-cpu", "--gpus", "4", *flags, "--pipeline", "auto", "--json"])
        == 0
    )
    planned = json.loads(capsys.readouterr().out)
    assert swept["job"] == planned["job"] and swept["rows"][0]["plan"] == planned


def test_plan_and_sweep_have_the_same_job_flags() -> None:
    from hybridflow.cli.main import build_parser

    def dests(cmd: str) -> set[str]:
        sub = build_parser([cmd])._subparsers._group_actions[0].choices[cmd]
        return {a.dest for a in sub._actions}

    job = {
        "model",
        "critic",
        "reference",
        "reward",
        "cost",
        "algorithm",
        "prompt_len",
        "response_len",
        "response_mean",
        "rule_cpu_s",
        "batch",
        "n_samples",
        "ppo_epochs",
        "mini_batches",
        "job",
    }
    assert job <= dests("plan") and job <= dests("sweep")
