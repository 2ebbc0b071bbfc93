"""The extraction of the reference lists, on small stand-in wheels, and the committed lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridflow.planner.export_refdata import (
    RefDataError,
    load_openrlhf_reference,
    load_verl_reference,
    openrlhf_args,
    verl_keys,
)

SCRIPT = """import argparse
from datetime import datetime

def train(args):
    raise SystemExit("training must not run")

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--actor.num_nodes", type=int, default=1)
    parser.add_argument("--train.colocate_all", action="store_true", default=False)
    for prefix in ["actor", "critic"]:
        parser.add_argument(f"--{prefix}.adam.betas", type=float, nargs=2, default=(0.9, 0.95))
    parser.add_argument("--algo.advantage.estimator", choices=["gae", "rloo"], default="gae")
    parser.add_argument("--ckpt.max_mem", type=float, default=float("inf"))
    args = parser.parse_args()
    train(args)
"""


def test_openrlhf_extraction(tmp_path: Path) -> None:
    src = tmp_path / "openrlhf-9.9.9.data/purelib/openrlhf/cli/train_ppo_ray.py"
    src.parent.mkdir(parents=True)
    src.write_text(SCRIPT)
    (tmp_path / "openrlhf-9.9.9.dist-info").mkdir()
    data = openrlhf_args(tmp_path)
    assert data["version"] == "9.9.9"
    by_dest = {a["dest"]: a for a in data["arguments"]}
    assert set(by_dest) == {
        "actor.num_nodes",
        "train.colocate_all",
        "actor.adam.betas",
        "critic.adam.betas",
        "algo.advantage.estimator",
        "ckpt.max_mem",
    }
    assert by_dest["train.colocate_all"]["action"] == "store_true"
    assert by_dest["critic.adam.betas"] == {
        "flags": ["--critic.adam.betas"],
        "dest": "critic.adam.betas",
        "action": "store",
        "type": "float",
        "nargs": 2,
        "choices": None,
        "default": [0.9, 0.95],
    }
    assert by_dest["algo.advantage.estimator"]["choices"] == ["gae", "rloo"]
    assert by_dest["ckpt.max_mem"]["default"] == "inf"


def test_verl_extraction(tmp_path: Path) -> None:
    cfg = tmp_path / "verl/trainer/config"
    (cfg / "model_engine").mkdir(parents=True)
    (cfg / "model_engine/megatron.yaml").write_text("{}\n")
    (cfg / "_generated_ppo_megatron_trainer.yaml").write_text(
        "trainer:\n  nnodes: 1\nactor_rollout_ref:\n"
        "  rollout:\n    'n': 1\n    x: ${oc.select:a,1}\n"
    )
    (tmp_path / "verl/version").mkdir()
    (tmp_path / "verl/version/version").write_text("9.9.9\n")
    data = verl_keys(tmp_path)
    assert data["version"] == "9.9.9" and data["group_overrides"] == {"model_engine": ["megatron"]}
    assert data["keys"] == [
        "actor_rollout_ref",
        "actor_rollout_ref.rollout",
        "actor_rollout_ref.rollout.n",
        "actor_rollout_ref.rollout.x",
        "trainer",
        "trainer.nnodes",
    ]


def test_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(RefDataError):
        verl_keys(tmp_path)
    with pytest.raises(RefDataError):
        openrlhf_args(tmp_path)


def test_committed_lists_name_their_version_and_source() -> None:
    verl, orl = load_verl_reference(), load_openrlhf_reference()
    assert verl["version"] == "0.9.1" and len(verl["source_sha256"]) == 64
    assert "actor_rollout_ref.rollout.tensor_model_parallel_size" in verl["key_set"]
    assert orl["version"] == "0.11.2" and len(orl["source_sha256"]) == 64
    flags = {f for a in orl["arguments"] for f in a["flags"]}
    assert {"--vllm.num_engines", "--train.colocate_all", "--ds.zero_stage"} <= flags
