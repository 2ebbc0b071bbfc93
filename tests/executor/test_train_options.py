"""Training options on 4 gloo ranks: activation recompute (selective, full) trains exactly
like none at TP1 (DP4), TP2xDP2 and PP2xDP2, the distributed optimizer like the plain one,
and every rank's training state (weights, gradient buffer, Adam) is the bytes the
simulator's state_memory predicts for its stage.

One spawn of 4 ranks builds every role (colocated, each with its own groups), trains each
one step from the same initial weights and returns what the assertions need.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import pytest
import torch
import yaml

from hybridflow.executor.spawn import run_ranks
from hybridflow.layout import ParallelLayout
from hybridflow.memory import MemorySettings
from hybridflow.simulator.architecture import ModelSpec
from hybridflow.simulator.model import load_model
from hybridflow.simulator.train_memory import rank_params, state_memory

pytestmark = pytest.mark.process

TINY = load_model("tiny-4l")
# sizes that are not multiples of 64 (hidden 80, vocab 500, a qkv bias): megatron's
# distributed-optimizer buffer pads between parameters and at the bucket's end; the tied
# one also keeps the shared embedding in a bucket of its own on both end stages
ODD = ModelSpec("odd", 4, 80, 2, 2, 100, 500, max_position=64, qkv_bias=True)
SPECS = {"tiny": TINY, "odd": ODD, "odd-tied": dataclasses.replace(ODD, tied_embeddings=True)}
LAYOUTS = {
    "dp4": ParallelLayout(dp=4),
    "tp2dp2": ParallelLayout(tp=2, dp=2),
    "pp2dp2": ParallelLayout(pp=2, dp=2),
}
RECOMPUTE = ("none", "selective", "full")
# role -> (spec, layout, recompute, distributed optimizer)
ROLES: dict[str, tuple[str, str, str, bool]] = {
    f"{lay}-{rc}": ("tiny", lay, rc, False) for lay in LAYOUTS for rc in RECOMPUTE
}
ROLES.update({f"{lay}-distopt": ("tiny", lay, "none", True) for lay in ("tp2dp2", "pp2dp2")})
ROLES.update(
    {
        f"{s}-{lay}-distopt": (s, lay, "none", True)
        for s in ("odd", "odd-tied")
        for lay in ("tp2dp2", "pp2dp2")
    }
)
MEMORY_ROLES = [r for r in ROLES if r.endswith("distopt")] + ["tp2dp2-none", "pp2dp2-none"]


def _batch(vocab: int, dp: int, dp_rank: int):
    from hybridflow.executor.controller.batch import Batch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (8, 16), generator=g)
    mask = torch.ones(8, 16, dtype=torch.long)
    mask[::3, :3] = 0  # left padding on some rows
    return Batch({"input_ids": ids, "attention_mask": mask}).split(dp)[dp_rank]


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages under `tensors` (a buffer once, padding included)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def _state_bytes(engine: Any) -> dict[str, int]:
    """What this rank holds: parameters, DDP gradient buffers, optimizer state (fp32
    master copies that are not the model's own storage, Adam's exp_avg and exp_avg_sq)."""
    params = [p for m in engine.model for p in m.parameters()]
    buffers = [b for m in engine.model for b in [*m.buffers, *m.expert_parallel_buffers]]
    model_storages = {p.untyped_storage().data_ptr() for p in params}
    optimizer = 0
    for opt in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                if p.untyped_storage().data_ptr() not in model_storages:
                    optimizer += p.numel() * p.element_size()
                state = opt.optimizer.state.get(p, {})
                optimizer += sum(
                    state[k].numel() * state[k].element_size()
                    for k in state
                    if k in ("exp_avg", "exp_avg_sq")
                )
    return {
        "weights": _storage_bytes(params),
        "grads": _storage_bytes([b.grad_data for b in buffers]),
        "optimizer": optimizer,
    }


def _reference(role: str) -> str | None:
    """The role whose step this one must equal: same model and layout, plain settings."""
    spec, lay, recompute, distopt = ROLES[role]
    return f"{lay}-none" if spec == "tiny" and (recompute != "none" or distopt) else None


def _resume_diff(engine: Any, cfg: Any, spec: ModelSpec, layout: ParallelLayout) -> float:
    """A second engine given this one's weights and optimizer state (as the RL worker's
    checkpoints save them) takes the next step as this one does: the largest difference."""
    from hybridflow.executor.engines import megatron_model as mm
    from hybridflow.executor.engines.groups import build_role_groups
    from hybridflow.executor.engines.train_engine import TrainEngine, lm_loss
    from hybridflow.executor.rl.worker import load_optimizer_state, optimizer_state

    saved = io.BytesIO()  # through a file's bytes, as the worker's checkpoint goes
    torch.save(optimizer_state(engine.optimizer), saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=False)
    other = TrainEngine("resumed", spec, build_role_groups("resumed", layout, seed=9), cfg)
    # not stepped yet (megatron's state_dict refuses one): saved as nothing, loads as fresh
    assert all(sub is None for sub in optimizer_state(other.optimizer))
    with torch.no_grad():
        mm.load_local_state(
            other.model, {n: p.detach().clone() for n, p in engine.named_local_parameters()}
        )
    load_optimizer_state(other.optimizer, state)
    batch = _batch(spec.vocab, layout.dp, engine.groups.dp_rank)
    engine.train_step(batch, lm_loss)
    other.train_step(batch, lm_loss)
    mine = dict(engine.named_local_parameters())
    return max((p - mine[n]).abs().max().item() for n, p in other.named_local_parameters())


def _run(rank: int, world: int, roles: dict) -> dict:
    """Per role: loss, this rank's state bytes and place, and the largest weight difference
    after the step from its reference role (tensors stay here: plain values go back)."""
    from hybridflow.executor.engines.groups import build_role_groups
    from hybridflow.executor.engines.train_engine import EngineConfig, TrainEngine, lm_loss

    out: dict[str, dict] = {}
    kept: dict[str, dict[str, torch.Tensor]] = {}
    for role, (spec_name, lay_name, recompute, distopt) in roles.items():
        spec, layout = SPECS[spec_name], LAYOUTS[lay_name]
        cfg = EngineConfig(
            micro_batch_size=1, lr=1e-3, recompute=recompute, use_distributed_optimizer=distopt
        )
        engine = TrainEngine(role, spec, build_role_groups(role, layout, seed=3), cfg)
        groups = engine.groups
        metrics = engine.train_step(_batch(spec.vocab, layout.dp, groups.dp_rank), lm_loss)
        params = {n: p.detach().clone() for n, p in engine.named_local_parameters()}
        ref = _reference(role)
        diff = None
        if ref is not None:
            assert params.keys() == kept[ref].keys()
            diff = max((t - kept[ref][n]).abs().max().item() for n, t in params.items())
        elif role.endswith("-none"):
            kept[role] = params
        if role == "tp2dp2-distopt":
            out["resumed"] = _resume_diff(engine, cfg, spec, layout)
        out[role] = {
            "loss": metrics["loss"],
            "diff": diff,
            "recompute": engine.tconfig.recompute_granularity,
            "bytes": _state_bytes(engine),
            "stage": groups.pp_rank,
            "tp_rank": groups.tp_rank,
        }
        del engine
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ranks(_run, 4, ROLES, backend="gloo", timeout_s=900)


def _assert_same_step(ranks: list[dict], role: str, atol: float) -> None:
    ref = _reference(role)
    assert ref is not None
    for r, got in enumerate(ranks):
        assert got[role]["loss"] == pytest.approx(got[ref]["loss"], rel=1e-6), (role, r)
        assert got[role]["diff"] <= atol, f"{role} rank {r}: weights differ by {got[role]['diff']}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_trains_like_none(ranks, layout, recompute):
    # the same operations recomputed: one step gives the same loss and weights
    _assert_same_step(ranks, f"{layout}-{recompute}", atol=1e-7)


def test_roles_recompute_as_configured(ranks):
    want = {"none": None, "selective": "selective", "full": "full"}
    for role, (_, _, recompute, _) in ROLES.items():
        assert all(got[role]["recompute"] == want[recompute] for got in ranks), role


def test_distributed_optimizer_state_resumes(ranks):
    # its Adam shards travel with the checkpoint: the resumed step equals the original
    assert all(got["resumed"] == 0.0 for got in ranks), [got["resumed"] for got in ranks]


@pytest.mark.parametrize("layout", ["tp2dp2", "pp2dp2"])
def test_distributed_optimizer_steps_like_the_plain_one(ranks, layout):
    # reduce-scatter + sharded Adam + all-gather vs all-reduce + Adam: the grad norm sums
    # in another order (clip factor ~1e-7 apart), so the weights agree to float rounding
    _assert_same_step(ranks, f"{layout}-distopt", atol=1e-6)


@pytest.mark.parametrize("role", MEMORY_ROLES)
def test_rank_state_bytes_are_the_simulators(ranks, role):
    spec_name, lay_name, _, distopt = ROLES[role]
    spec, layout = SPECS[spec_name], LAYOUTS[lay_name]
    settings = MemorySettings(distributed_optimizer=distopt)
    by_stage: dict[int, list[dict]] = {}
    for got in ranks:
        r = got[role]
        by_stage.setdefault(r["stage"], []).append(r)
        want = state_memory(spec, layout, settings, r["stage"], param_bytes=4).as_dict()
        assert r["bytes"]["weights"] == want["weights"], (role, r["stage"])
        assert r["bytes"]["grads"] == want["grads"], (role, r["stage"])
        assert r["bytes"]["optimizer"] <= want["optimizer"], (role, r["stage"])
    for stage, held in by_stage.items():
        want = state_memory(spec, layout, settings, stage, param_bytes=4).as_dict()
        # the simulator's optimizer bytes are the stage's fullest rank's (the distributed
        # optimizer's dp ranks hold their slice's parameter elements, padding excluded)
        assert max(r["bytes"]["optimizer"] for r in held) == want["optimizer"], (role, stage)
        for tp_rank in range(layout.tp):
            replicas = [r for r in held if r["tp_rank"] == tp_rank]
            total = sum(r["bytes"]["optimizer"] for r in replicas)
            # sharded: the replicas' slices cover every parameter element once
            copies = 1 if distopt else layout.dp
            assert total == 8 * copies * rank_params(spec, layout, stage), (role, stage)


def test_profile_times_the_memory_settings(tmp_path) -> None:
    from hybridflow.executor.profiler.train_options import (
        SETTINGS,
        TrainOptionsGrid,
        measure_train_options,
    )
    from hybridflow.executor.profiler.writer import build_profile, write_profile
    from hybridflow.simulator.profile import load_profile
    from tests.executor.test_profile_writer import INFO, measurements

    grid = TrainOptionsGrid(model="tiny", ranks=2, sequences=4, seq_len=16, repeats=2)
    rows = measure_train_options(grid)
    assert [r["setting"] for r in rows] == list(SETTINGS)
    assert rows[0]["relative"] == 1.0 and all(r["step_s"] > 0 for r in rows)
    assert {(r["distributed_optimizer"], r["recompute"]) for r in rows} == {
        (True, "none"),
        (False, "none"),
        (True, "selective"),
        (True, "full"),
    }
    m = dataclasses.replace(measurements(), train_options=rows)
    path = write_profile(build_profile("cpu-test", INFO, m, 1.0), tmp_path / "cpu-test.yaml")
    load_profile(str(path))  # the simulator reads a profile with the new table
    assert yaml.safe_load(path.read_text())["extra"]["train_options"] == rows
