"""`hybridflow plan` and `hybridflow simulate` through cli.main.main: real output, and every
bad input gives one clear line on stderr, exit code 2 and no traceback."""

import json

import pytest

from hybridflow.cli.main import main

TINY = [
    "--gpu",
    "local-cpu",
    "--gpus",
    "4",
    "--model",
    "tiny",
    "--prompt-len",
    "64",
    "--response-len",
    "64",
    "--batch",
    "8",
    "--mini-batches",
    "2",
]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_default_plan_prints_best_and_standard(capsys):
    code, out, err = run(capsys, "plan")
    assert code == 0 and err == ""
    assert "Best plan:" in out and "tokens/s" in out
    for name in ("colocated", "split", "separate"):
        assert name in out


def test_json_out_and_simulate_round_trip(capsys, tmp_path):
    path = tmp_path / "plan.json"
    code, out, _ = run(capsys, "plan", *TINY, "--json", "--out", str(path))
    assert code == 0
    printed = json.loads(out)
    assert printed == json.loads(path.read_text())
    code, out, _ = run(capsys, "simulate", str(path), "--json")
    assert code == 0
    assert json.loads(out)["predicted"]["iteration_s"] == pytest.approx(
        printed["predicted"]["iteration_s"]
    )
    code, out, _ = run(capsys, "simulate", str(path))
    assert code == 0 and "Terms" in out and "(measured)" in out  # the measured local profile


def test_simulate_takes_the_resharding_scheme(capsys, tmp_path):
    """An analytic GPU profile, a plan whose actor reshards: the scheme's own term."""
    path = tmp_path / "plan.json"
    code, _, _ = run(
        capsys,
        "plan",
        "--gpu",
        "a100-80gb",
        "--gpus",
        "16",
        "--model",
        "llama-2-7b",
        "--prompt-len",
        "512",
        "--response-len",
        "512",
        "--batch",
        "128",
        "--pipeline",
        "sync",  # an asynchronous plan has no actor to reshard
        "--out",
        str(path),
    )
    assert code == 0
    code, out, _ = run(capsys, "simulate", str(path), "--reshard", "allgather")
    assert code == 0 and "reshard_allgather" in out
    assert "Terms" in out and "(roofline)" in out


def test_top_k_json_is_a_list(capsys):
    code, out, _ = run(capsys, "plan", *TINY, "--top", "2", "--json")
    plans = json.loads(out)
    assert code == 0 and len(plans) == 2
    assert plans[0]["predicted"]["iteration_s"] <= plans[1]["predicted"]["iteration_s"]


def test_cluster_and_job_files(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("gpu: local-cpu\nnodes: 1\ngpus_per_node: 4\n")
    job = {
        "algorithm": "grpo",
        "models": {"actor": "tiny", "reference": "tiny", "reward": "tiny-gqa"},
        "prompt_len": 32,
        "response_len": 32,
        "global_batch": 4,
        "ppo_epochs": 1,
        "mini_batches": 1,
        "n_samples": 2,
    }
    (tmp_path / "j.json").write_text(json.dumps(job))
    code, out, _ = run(
        capsys,
        "plan",
        "--cluster",
        str(tmp_path / "c.yaml"),
        "--job",
        str(tmp_path / "j.json"),
        "--json",
    )
    assert code == 0 and json.loads(out)["job"] == job


def _bad(tmp_path):
    (tmp_path / "bad.json").write_text("{oops")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "badjob.json").write_text(
        json.dumps(
            {
                "algorithm": "ppo",
                "models": {"actor": "tiny"},
                "prompt_len": 8,
                "response_len": 8,
                "global_batch": 4,
            }
        )
    )
    (tmp_path / "badplan.json").write_text(json.dumps({"version": 1, "sets": []}))
    job = {
        "algorithm": "grpo",
        "models": {"actor": "llama-2-7b", "reference": "llama-2-7b", "reward": "llama-2-7b"},
        "prompt_len": 512,
        "response_len": 512,
        "global_batch": 8,
        "n_samples": 2,
    }
    one = {
        "version": 1,
        "cluster": {"gpu": "a100-80gb", "nodes": 1, "gpus_per_node": 8},
        "job": job,
        "sets": [
            {
                "models": ["actor", "reference", "reward"],
                "gpus": 1,
                "layouts": {
                    "actor": {
                        "train": {"pp": 1, "tp": 1, "dp": 1},
                        "generate": {"pp": 1, "tp": 1, "micro_dp": 1},
                    },
                    "reference": {"infer": {"pp": 1, "tp": 1, "dp": 1}},
                    "reward": {"infer": {"pp": 1, "tp": 1, "dp": 1}},
                },
            }
        ],
    }
    (tmp_path / "toobig.json").write_text(json.dumps(one))
    one["sets"][0]["layouts"]["actor"]["train"]["tp"] = 2
    (tmp_path / "badlayout.json").write_text(json.dumps(one))
    return tmp_path


BAD = [
    (["plan", "--gpu", "v100"], "unknown GPU kind 'v100'"),
    (["plan", "--model", "gpt-9"], "unknown model 'gpt-9'"),
    (["plan", "--gpus", "0"], "--gpus must be a positive integer"),
    (["plan", "--gpus", "-8"], "--gpus must be a positive integer"),
    (["plan", "--gpus", "12"], "not a whole number of 8-GPU nodes"),
    (["plan", "--nodes", "2", "--gpus", "8"], "disagrees"),
    (["plan", "--batch", "0"], "global_batch must be a positive integer"),
    (["plan", "--prompt-len", "-1"], "prompt_len must be a positive integer"),
    (["plan", "--response-len", "0"], "response_len must be a positive integer"),
    (["plan", "--mini-batches", "3"], "equal mini-batches"),
    (["plan", "--top", "0"], "--top must be a positive integer"),
    (["plan", "--algorithm", "grpo", "--critic", "tiny"], "grpo has no critic"),
    (["plan", "--cost", "tiny"], "only safe-rlhf"),
    (["plan", "--model", "llama-2-70b", "--gpus", "8"], "smallest GPU count that fits is"),
    (["plan", "--cluster", "{d}/bad.json"], "not valid JSON or YAML"),
    (["plan", "--cluster", "{d}/list.yaml"], "must hold a mapping"),
    (["plan", "--cluster", "{d}/missing.yaml"], "does not exist"),
    (["plan", "--job", "{d}/badjob.json"], "needs exactly the roles"),
    (["plan", "--export", "slurm"], "unknown export format"),
    (["simulate", "{d}/bad.json"], "not valid JSON"),
    (["simulate", "{d}/badplan.json"], "expected keys"),
    (["simulate", "{d}/missing.json"], "does not exist"),
    (["simulate", "{d}/toobig.json"], "GiB usable on a100-80gb"),
    (["simulate", "{d}/badlayout.json"], "uses 2 GPUs, but its set has 1"),
    (["simulate", "{d}/toobig.json", "--profile", "tpu-v9"], "unknown GPU kind"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_is_one_clear_line(capsys, tmp_path, argv, message):
    d = _bad(tmp_path)
    code, out, err = run(capsys, *[a.format(d=d) for a in argv])
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hybridflow {argv[0]}: error: ")
    assert message in lines[0]


def test_argparse_rejects_non_numbers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--gpus", "many"])
    assert e.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def _moe_plan(**job):
    from hybridflow.plan import Plan

    lay = {"pp": 1, "tp": 2, "dp": 8, "ep": 4}
    j = {
        "algorithm": "grpo",
        "models": {"actor": "qwen3-30b-a3b", "reference": "qwen3-30b-a3b", "reward": "rule"},
        "prompt_len": 1024,
        "response_len": 8192,
        "global_batch": 64,
        "n_samples": 4,
    } | job
    return Plan.from_dict(
        {
            "version": 1,
            "cluster": {"gpu": "a100-80gb", "nodes": 2, "gpus_per_node": 8},
            "job": j,
            "sets": [
                {
                    "models": ["actor", "reference"],
                    "gpus": 16,
                    "layouts": {
                        "actor": {"train": lay, "generate": {"pp": 1, "tp": 2, "micro_dp": 1}},
                        "reference": {"infer": {"pp": 1, "tp": 1, "dp": 16}},
                    },
                }
            ],
        }
    )


def test_header_shows_length_spread_rules_and_ep():
    from hybridflow.cli.planfmt import format_plan
    from hybridflow.simulator.profile import load_profile

    profile = load_profile("a100-80gb")
    text = format_plan(_moe_plan(response_mean=1500.0), profile)
    header = text.splitlines()[0]
    assert "prompt 1024 + response mean 1,500 / max 8,192 tokens" in header
    assert "qwen3-30b-a3b, reward: rule;" in header and "rule, " not in header
    assert "train pp=1 tp=2 dp=8 ep=4 | generate" in text
    assert "infer pp=1 tp=1 dp=16 " in text and "dp=16 ep" not in text  # ep only when > 1
    dist = format_plan(_moe_plan(response_dist=[[500, 3], [6000, 1]]), profile).splitlines()[0]
    assert "response mean 1,875 / max 6,000 tokens (2-point distribution)" in dist
    fixed = format_plan(_moe_plan(), profile).splitlines()[0]
    assert "prompt 1024 + response 8192 tokens," in fixed


def test_plan_cli_with_rule_reward_and_spread(capsys):
    code, out, err = run(
        capsys,
        "plan",
        "--gpu",
        "local-cpu",
        "--gpus",
        "4",
        "--model",
        "tiny",
        "--algorithm",
        "grpo",
        "--reward",
        "rule",
        "--prompt-len",
        "64",
        "--response-len",
        "128",
        "--response-mean",
        "40",
        "--batch",
        "8",
        "--mini-batches",
        "2",
    )
    assert code == 0 and err == ""
    assert "tiny, reward: rule; prompt 64 + response mean 40 / max 128 tokens" in out
