"""A real Qwen3-MoE Hugging Face folder (made by transformers: 4 experts, top 2, in both
layers): megatron-core shards read rank by rank give transformers' log-probs under TP1 (x DP2),
TP2 and PP2, and a TP2 train step equals the TP1 one; vLLM loaded from the megatron shards
(twice: another model's, then this one's) generates transformers' greedy tokens at TP1 and
TP2; names and shapes round-trip; check_folder takes Qwen3-MoE and refuses the MoE forms
the executor does not build, in one line each.

Two spawns of 2 ranks (megatron, vLLM); references are transformers' own in this process.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridflow.executor.engines import hf_checkpoint as H
from hybridflow.executor.engines import hf_folder as F
from hybridflow.executor.engines import megatron_model as mm
from hybridflow.executor.engines import weights as W
from hybridflow.executor.spawn import run_ranks
from hybridflow.layout import LayoutError
from hybridflow.simulator.model import load_model
from tests.executor import hf_families as M

LAYOUTS = {"tp1dp2": (1, 1, 2), "tp2": (2, 1, 1), "pp2": (1, 2, 1)}  # tp, pp, dp
TOKENS = 8
ROUTER = "decoder.layers.0.mlp.router.weight"
FC2 = "decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight"


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for name, seed in (("moe", 0), ("other", 1)):  # "other": the same shapes, other weights
        model = M.build("qwen3moe", seed=seed)
        out[name] = (M.save(model, root / name), model)
    return out


# ---- megatron-core: one world of 2 ranks --------------------------------------------------
def _engine(role: str, folder: str, lay: str, trainable: bool):
    from hybridflow.executor.engines.groups import build_role_groups
    from hybridflow.executor.engines.train_engine import EngineConfig, TrainEngine
    from hybridflow.layout import ParallelLayout

    tp, pp, dp = LAYOUTS[lay]
    spec = load_model(folder)
    groups = build_role_groups(role, ParallelLayout(tp=tp, pp=pp, dp=dp), seed=3)
    cfg = EngineConfig(micro_batch_size=2, lr=1e-2, trainable=trainable)
    engine = TrainEngine(role, spec, groups, cfg)
    F.load_rank_weights(engine.model, folder, spec, False, groups.tp_rank, tp)
    return engine


def _megatron_rank(rank: int, world: int, folder: str) -> dict:
    from hybridflow.executor.controller.batch import Batch
    from hybridflow.executor.engines.train_engine import lm_loss

    ids, mask = M.batch()
    out: dict = {}
    for lay in LAYOUTS:
        engine = _engine(f"fwd-{lay}", folder, lay, trainable=False)
        dp, dp_rank = LAYOUTS[lay][2], engine.groups.dp_rank
        got = engine.forward(Batch({"input_ids": ids, "attention_mask": mask}).split(dp)[dp_rank])
        # numpy: tensors would travel as shared memory of a rank that has exited
        out[lay] = (dp_rank, got.numpy()) if engine.is_output_rank else None
    for lay in ("tp1dp2", "tp2"):
        engine = _engine(f"train-{lay}", folder, lay, trainable=True)
        dp, dp_rank = LAYOUTS[lay][2], engine.groups.dp_rank
        metrics = engine.train_step(
            Batch({"input_ids": ids, "attention_mask": mask}).split(dp)[dp_rank], lm_loss
        )
        params = {
            n: p.detach().numpy().copy()
            for n, p in engine.named_local_parameters()
            if n in (ROUTER, FC2)
        }
        out[("train", lay)] = (metrics["grad_norm"], engine.groups.tp_rank, params)
    return out


@pytest.fixture(scope="module")
def megatron(hf) -> list[dict]:
    return run_ranks(_megatron_rank, 2, str(hf["moe"][0]), backend="gloo", timeout_s=900)


def _gathered(ranks: list[dict], lay: str) -> torch.Tensor:
    held = sorted(r[lay] for r in ranks if r[lay] is not None)
    assert [d for d, _ in held] == list(range(LAYOUTS[lay][2])), lay
    return torch.cat([torch.from_numpy(t) for _, t in held])


@pytest.mark.process
@pytest.mark.parametrize("lay", list(LAYOUTS))
def test_megatron_logprobs_equal_transformers(hf, megatron, lay: str) -> None:
    ids, mask = M.batch()
    want = M.logprobs(hf["moe"][1], ids, mask)
    got = _gathered(megatron, lay)[:, :-1]
    real = (mask[:, :-1] * mask[:, 1:]).bool()
    assert want[real].std() > 0.1  # not a flat distribution: a wrong weight shows
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


def _routing(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Each token's top-2 experts in layer 0 (transformers' router, hooked) [tokens, 2]."""
    captured: list[torch.Tensor] = []
    gate = model.model.layers[0].mlp.gate
    handle = gate.register_forward_hook(lambda m, a, out: captured.append(out[2]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return captured[0]


def test_tokens_take_different_experts(hf) -> None:
    """The reference routes tokens to several expert pairs: a misplaced expert shows."""
    ids, _ = M.batch()
    pairs = {tuple(sorted(p)) for p in _routing(hf["moe"][1], ids).tolist()}
    assert len(pairs) >= 4


@pytest.mark.process
def test_tp2_train_step_equals_tp1(hf, megatron) -> None:
    """A TP2 step (experts split over TP, no sequence parallelism) has the TP1 step's
    gradient norm (the experts' weight gradients not counted TP times) and updates the
    replicated router and each expert's shards as it does (to 1e-4 = lr/100: Adam's first
    step, lr * g / (|g| + eps), magnifies rounding where a gradient is near 0)."""
    tp1 = [r[("train", "tp1dp2")] for r in megatron]
    tp2 = sorted((r[("train", "tp2")] for r in megatron), key=lambda x: x[1])
    norm = tp1[0][0]
    assert all(abs(n - norm) < 1e-5 * norm for n, _, _ in tp1 + tp2), (tp1, tp2)
    full = tp1[0][2]
    router = hf["moe"][1].model.layers[0].mlp.gate.weight.detach().numpy()
    assert not np.allclose(full[ROUTER], router)  # it trained
    for _, tp_rank, params in tp2:
        np.testing.assert_allclose(params[ROUTER], full[ROUTER], atol=1e-4, rtol=0)
        half = np.split(full[FC2], 2, axis=1)[tp_rank]  # linear_fc2 splits its columns
        np.testing.assert_allclose(params[FC2], half, atol=1e-4, rtol=0)


# ---- vLLM from megatron shards: one world of 2 ranks ---------------------------------------
def _vllm_rank(rank: int, world: int, folders: dict[str, str]) -> dict:
    from hybridflow.executor.engines.vllm_engine import SamplingConfig, VllmConfig, VllmEngine

    out = {}
    spec = load_model(folders["moe"])
    for groups in (((0, 1),), ((0,), (1,))):
        tp = len(groups[0])
        tp_rank = next(g.index(rank) for g in groups if rank in g)
        cfg = VllmConfig(folders["moe"], groups, load_format="dummy", max_model_len=64)
        engine = VllmEngine(cfg)
        for name in ("other", "moe"):  # a second reload replaces the first's weights
            shapes = W.megatron_shapes(spec)
            shard = F.read_rank_shards(folders[name], spec, shapes, tp, tp_rank, False)
            engine.load_sharded(W.megatron_to_vllm(shard, spec, tp))
            done = engine.generate(M.PROMPTS, SamplingConfig(temperature=0.0, max_tokens=TOKENS))
            out[(name, tp)] = [c.token_ids for c in sorted(done, key=lambda c: c.prompt_index)]
        engine.shutdown()
    return out


@pytest.mark.process
def test_vllm_greedy_from_megatron_shards_equals_transformers(hf) -> None:
    folders = {name: str(folder) for name, (folder, _) in hf.items()}
    ranks = run_ranks(_vllm_rank, 2, folders, backend="gloo", timeout_s=900)
    wants = {name: M.greedy(model, M.PROMPTS, TOKENS) for name, (_, model) in hf.items()}
    assert len(set(wants["moe"])) > 1 and wants["moe"] != wants["other"]
    for name, want in wants.items():
        for tp in (1, 2):
            for r in ranks:
                assert r[(name, tp)] == want, (name, tp)


# ---- names, shapes, per-rank reads, writers (no process) ----------------------------------
def test_names_round_trip_and_ranks_read_their_slices(hf) -> None:
    folder, model = hf["moe"]
    spec = load_model(str(folder))
    state = {n: p.detach() for n, p in model.state_dict().items()}
    full = W.hf_to_megatron(H.load_hf_folder(folder), spec)
    assert {n: tuple(t.shape) for n, t in full.items()} == W.megatron_shapes(spec)
    assert W.megatron_to_hf(full, spec).keys() == H.load_hf_folder(folder).keys()
    assert W.split_kind(ROUTER) == "replicated" and W.split_kind(FC2) == "row"
    fc1 = FC2.replace("linear_fc2", "linear_fc1")
    assert W.split_kind(fc1) == "fc1"
    gate, up = full[fc1].chunk(2)
    experts = model.model.layers[1].mlp.experts.gate_up_proj.detach()[2]  # fused in memory
    assert torch.equal(torch.cat([gate, up]), experts)
    assert torch.equal(full[ROUTER], state["model.layers.0.mlp.gate.weight"])
    for tp_rank in range(2):
        got = F.read_rank_shards(folder, spec, W.megatron_shapes(spec), 2, tp_rank, False)
        want = W.split_tp(full, spec, 2, tp_rank)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in want), tp_rank
    merged = W.merge_tp([W.split_tp(full, spec, 2, r) for r in range(2)])
    assert all(torch.equal(merged[n], full[n]) for n in full)


def test_written_moe_folder_loads_in_transformers(tmp_path: Path) -> None:
    """hf_config_dict writes Qwen3MoeConfig (as built), random_hf_state its tensors."""
    from transformers import AutoModelForCausalLM

    spec = dataclasses.replace(
        load_model(str(M.save(M.build("qwen3moe"), tmp_path / "base"))), name="written"
    )
    state = H.random_hf_state(spec, seed=1)
    out = H.save_hf_model(tmp_path / "m", state, H.hf_config_dict(spec), max_shard_bytes=1 << 16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["norm_topk_prob"]
    assert load_model(str(out)) == dataclasses.replace(spec, name=load_model(str(out)).name)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert torch.equal(
        loaded.model.layers[1].mlp.experts.down_proj.detach()[3],
        state["model.layers.1.mlp.experts.3.down_proj.weight"],
    )
    assert F.check_folder(out, value_head=False).spec.experts == 4


# ---- check_folder and the builder's refusals ----------------------------------------------


def test_check_folder_takes_qwen3_moe(hf) -> None:
    info = F.check_folder(hf["moe"][0], value_head=False)
    assert info.architecture == "Qwen3MoeForCausalLM" and not info.classifier
    assert (info.spec.experts, info.spec.experts_per_token, info.spec.expert_ffn) == (4, 2, 32)
    mm.check_buildable(info.spec)


def test_check_folder_refuses_other_moe_forms(hf, tmp_path: Path) -> None:
    good = hf["moe"][0]
    for arch in ("MixtralForCausalLM", "Qwen2MoeForCausalLM"):
        other = M.copy_folder(good, tmp_path / arch, architectures=[arch])
        M.refused(other, f"{arch!r}", "Qwen3MoeForCausalLM only")
    plain = M.copy_folder(good, tmp_path / "plain", norm_topk_prob=False)
    M.refused(plain, "norm_topk_prob false", "norm_topk_prob true")
    dense_first = M.copy_folder(good, tmp_path / "dense_first", mlp_only_layers=[0])
    M.refused(dense_first, "Qwen3-MoE only", "1 dense (non-MoE) layers")
    in_dense = M.copy_folder(
        hf["moe"][0], tmp_path / "in_dense", architectures=["Qwen3ForCausalLM"]
    )
    M.refused(in_dense, "mixture-of-experts layers cannot be built")


def test_builder_refuses_other_moe_forms(hf) -> None:
    spec = load_model(str(hf["moe"][0]))
    qwen2_moe = dataclasses.replace(spec, qk_norm=False, qkv_bias=True, shared_experts=1)
    with pytest.raises(mm.UnbuildableModel) as e:
        mm.check_buildable(qwen2_moe)
    assert all(w in str(e.value) for w in ("Qwen3-MoE only", "shared experts", "a qkv bias"))
    with pytest.raises(LayoutError, match="Qwen3-MoE only"):
        H.hf_config_dict(qwen2_moe)
