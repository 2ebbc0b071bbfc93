"""A user's own job, the three commands of the README: plan a checkpoint folder, run it on a
JSONL prompt file with a reward function, load the trained actor with transformers.

GRPO with a Qwen2-style actor (QKV bias, tied embeddings) and a Llama-style reward model of
another size, on the local CPU cluster (Ray, megatron-core, vLLM).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from hybridflow.cli.main import main as cli_main
from tests.executor import user_models as U

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("userjob")
    return {
        "actor": U.qwen2_actor(root / "actor"),
        "reward": U.llama_reward(root / "reward"),
        "data": U.write_prompts(root / "train.jsonl", 24),
        "eval": U.write_prompts(root / "eval.jsonl", 8, seed=1),
        "fn": U.write_reward_fn(root / "my_reward.py"),
        "root": root,
    }


def _plan(job: dict[str, Path], out: Path, capsys: pytest.CaptureFixture) -> Path:
    argv = ["plan", "--model", str(job["actor"]), "--reward", str(job["reward"])]
    argv += ["--algorithm", "grpo", "--gpu", "local-cpu", "--gpus", "2", "--n-samples", "4"]
    argv += ["--prompt-len", "16", "--response-len", "8", "--batch", "4", "--mini-batches", "1"]
    assert cli_main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    return out


def _logprobs_hf(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]


def test_grpo_on_a_users_models_data_and_reward_fn(
    job: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    plan = _plan(job, tmp_path / "plan.json", capsys)
    names = json.loads(plan.read_text())["job"]["models"]
    assert names["actor"] == str(job["actor"].resolve())
    assert names["reward"] == str(job["reward"].resolve())
    out, export = tmp_path / "run", tmp_path / "trained"
    argv = ["run", str(plan), "--out", str(out), "--iterations", "3", "--devices", "2"]
    argv += ["--data", str(job["data"]), "--eval-data", str(job["eval"])]
    argv += ["--answer-key", "reward_model.ground_truth"]
    argv += ["--reward-fn", f"{job['fn']}:digit_reward", "--export-hf", str(export)]
    assert cli_main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert math.isfinite(r["actor_loss"]) and math.isfinite(r["reward"])
        assert 0.0 <= r["score"] <= 1.0  # the user's function, on the controller
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["prompts"] == 24 and summary["inputs"]["truncated"] == 0
    assert summary["measured"]["eval_score_after"] is not None

    # the exported actor: transformers loads it, and its log-probs are the checkpoint's
    ckpt = sorted((out / "checkpoints").glob("iter_*"))[-1]
    assert (export / "tokenizer.json").exists() and (export / "config.json").exists()
    ids = torch.randint(6, 45, (3, 12), generator=torch.Generator().manual_seed(0))
    exported = _logprobs_hf(export, ids)
    assert torch.allclose(exported, _logprobs_hf(ckpt / "actor_hf", ids), atol=0, rtol=0)
    assert not torch.allclose(exported, _logprobs_hf(job["actor"], ids), atol=1e-4)
    megatron = _logprobs_megatron(ckpt, plan, ids)
    torch.testing.assert_close(exported, megatron, atol=1e-5, rtol=0)


def _logprobs_megatron(ckpt: Path, plan_path: Path, ids: torch.Tensor) -> torch.Tensor:
    """The checkpoint's own actor shards (merged) in a one-process megatron-core model."""
    from hybridflow.executor.run.export import full_actor_state
    from hybridflow.executor.spawn import run_ranks
    from hybridflow.plan import Plan

    plan = Plan.load(plan_path)
    state = full_actor_state(ckpt)
    out = run_ranks(_megatron_logprobs, 1, (plan.job.model("actor"), state, ids), "gloo")[0]
    return torch.from_numpy(out)


def _megatron_logprobs(rank: int, world: int, payload: tuple) -> Any:
    from hybridflow.executor.controller.batch import Batch
    from hybridflow.executor.engines import megatron_model as mm
    from hybridflow.executor.engines.groups import build_role_groups
    from hybridflow.executor.engines.train_engine import EngineConfig, TrainEngine
    from hybridflow.layout import ParallelLayout
    from hybridflow.simulator.model import load_model

    model, state, ids = payload
    groups = build_role_groups("actor", ParallelLayout(1, 1, 1))
    engine = TrainEngine("actor", load_model(model), groups, EngineConfig(trainable=False))
    mm.load_full_state(engine.model, state, 0, 1)
    out = engine.forward(Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    return out[:, :-1].detach().numpy()  # a tensor does not cross the spawn pipe here


def test_bad_inputs_stop_before_any_worker(
    job: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    plan = _plan(job, tmp_path / "plan.json", capsys)
    base = ["run", str(plan), "--out", str(tmp_path / "r"), "--devices", "2"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text(json.dumps({"question": "what is 1 + 1 ?"}) + "\n")
    cases = [
        (["--data", str(empty), "--reward-fn", "math"], "empty"),
        (["--data", str(nokey), "--reward-fn", "math"], "prompt"),
        (["--data", str(job["data"]), "--reward-fn", f"{tmp_path}/none.py:f"], "none.py"),
        (["--data", str(job["data"]), "--reward-fn", f"{job['fn']}:nope"], "nope"),
    ]
    for extra, word in cases:
        assert cli_main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert word in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


FAILING_FN = '''
from pathlib import Path

def counted(data_source, solution_str, ground_truth, extra_info):
    """Fails on the first sample scored after LIMIT of them (a counter file)."""
    counter = Path(__file__).with_suffix(".count")
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    if n >= LIMIT:
        raise ValueError("the grader is down")
    return 0.5
'''


def test_a_reward_fn_that_raises_stops_the_run_with_its_checkpoint_whole(
    job: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from hybridflow.executor.run.rundir import checkpoint_damage

    plan = _plan(job, tmp_path / "plan.json", capsys)
    # 16 samples an iteration, scored inline (fewer than 8 per call go to processes)
    fn = tmp_path / "grader.py"
    fn.write_text(FAILING_FN.replace("LIMIT", "16"))
    out = tmp_path / "run"
    argv = ["run", str(plan), "--out", str(out), "--iterations", "3", "--devices", "2"]
    argv += ["--data", str(job["data"]), "--answer-key", "reward_model.ground_truth"]
    argv += ["--reward-fn", f"{fn}:counted", "--checkpoint-every", "1", "--reward-processes", "1"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "raised on the sample of row" in err and "ValueError: the grader is down" in err
    assert "the last whole checkpoint: iter_000001" in err and "Traceback" not in err
    ckpt = out / "checkpoints" / "iter_000001"
    assert checkpoint_damage(ckpt) is None and (ckpt / "actor_hf" / "config.json").exists()
