"""Real Hugging Face folders of each family the executor builds (made by transformers):
megatron-core shards read rank by rank give transformers' log-probs and value scores under
TP2xDP2, PP2xDP2 and TP2xPP2; vLLM loaded from the megatron shards generates transformers'
greedy tokens (TP1 and TP2); sharded checkpoints read as the single file; check_folder
refuses each bad folder in one message.

Two spawns: one world of 4 megatron ranks holding every (model, layout) case as a role, one
of 2 vLLM ranks. References are transformers' own forward passes in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hybridflow.executor.engines import hf_checkpoint as H
from hybridflow.executor.engines import hf_folder as F
from hybridflow.executor.engines import weights as W
from hybridflow.executor.spawn import run_ranks
from hybridflow.simulator.model import load_model
from tests.executor import hf_families as M

LAYOUTS = {"tp2dp2": (2, 1, 2), "pp2dp2": (1, 2, 2), "tp2pp2": (2, 2, 1)}  # tp, pp, dp
# (model, layout, value head); every causal LM on every layout
CASES = [(m, lay, False) for m in ("llama", "qwen2", "qwen3") for lay in LAYOUTS] + [
    ("llama3", "tp2pp2", False),
    ("qwen2-cls", "pp2dp2", True),
    ("llama-cls", "tp2pp2", True),
]
TRAIN = [("qwen2", "pp2dp2"), ("qwen3", "tp2dp2")]  # tied copy over PP; q/k norms over TP
TOKENS = 8


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("families")
    out = {}
    for i, name in enumerate(M.MODELS):
        model = M.build(name, seed=i)
        out[name] = (M.save(model, root / name), model)
    return out


# ---- megatron-core: one world of 4 ranks -------------------------------------------------
def _engine(role: str, folder: str, lay: str, value_head: bool, trainable: bool):
    from hybridflow.executor.engines.groups import build_role_groups
    from hybridflow.executor.engines.train_engine import EngineConfig, TrainEngine
    from hybridflow.layout import ParallelLayout

    tp, pp, dp = LAYOUTS[lay]
    spec = load_model(folder)
    groups = build_role_groups(role, ParallelLayout(tp=tp, pp=pp, dp=dp), seed=3)
    cfg = EngineConfig(micro_batch_size=2, lr=1e-2, value_head=value_head, trainable=trainable)
    engine = TrainEngine(role, spec, groups, cfg)
    F.load_rank_weights(engine.model, folder, spec, value_head, groups.tp_rank, tp)
    return engine


def _megatron_rank(rank: int, world: int, folders: dict[str, str]) -> dict:
    from hybridflow.executor.controller.batch import Batch
    from hybridflow.executor.engines.train_engine import lm_loss

    ids, mask = M.batch()
    out: dict = {}
    for name, lay, value_head in CASES:
        engine = _engine(f"{name}-{lay}", folders[name], lay, value_head, trainable=False)
        dp, dp_rank = LAYOUTS[lay][2], engine.groups.dp_rank
        got = engine.forward(Batch({"input_ids": ids, "attention_mask": mask}).split(dp)[dp_rank])
        # numpy: tensors would travel as shared memory of a rank that has exited
        out[(name, lay)] = (dp_rank, got.numpy()) if engine.is_output_rank else None
        rotary = engine.model[0].rotary_pos_emb  # not trainable: no DDP wrapper
        out[("rope", name)] = rotary.inv_freq.numpy().copy()
    for name, lay in TRAIN:
        engine = _engine(f"train-{name}-{lay}", folders[name], lay, False, trainable=True)
        dp, dp_rank = LAYOUTS[lay][2], engine.groups.dp_rank
        batch = Batch({"input_ids": ids, "attention_mask": mask}).split(dp)[dp_rank]
        engine.train_step(batch, lm_loss)
        keep = (W.EMBED, W.OUTPUT, "decoder.layers.0.self_attention.q_layernorm.weight")
        params = {
            n: p.detach().numpy().copy() for n, p in engine.named_local_parameters() if n in keep
        }
        out[("train", name)] = (engine.groups.pp_rank, engine.groups.tp_rank, params)
    return out


@pytest.fixture(scope="module")
def megatron(hf) -> list[dict]:
    folders = {name: str(folder) for name, (folder, _) in hf.items()}
    return run_ranks(_megatron_rank, 4, folders, backend="gloo", timeout_s=900)


def _gathered(ranks: list[dict], case: tuple[str, str]) -> torch.Tensor:
    held = sorted(r[case] for r in ranks if r[case] is not None)
    assert [d for d, _ in held] == list(range(LAYOUTS[case[1]][2])), case
    return torch.cat([torch.from_numpy(t) for _, t in held])


@pytest.mark.process
@pytest.mark.parametrize("name,lay", [(m, lay) for m, lay, v in CASES if not v])
def test_megatron_logprobs_equal_transformers(hf, megatron, name: str, lay: str) -> None:
    ids, mask = M.batch()
    want = M.logprobs(hf[name][1], ids, mask)
    got = _gathered(megatron, (name, lay))[:, :-1]
    real = (mask[:, :-1] * mask[:, 1:]).bool()
    assert want[real].std() > 0.1  # not a flat distribution: a wrong weight shows
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


@pytest.mark.process
def test_llama3_rope_scaling_is_transformers(hf, megatron) -> None:
    """Llama 3.1's scaled RoPE frequencies in megatron-core are transformers' own."""
    want = hf["llama3"][1].model.rotary_emb.inv_freq.float()
    plain = hf["llama"][1].model.rotary_emb.inv_freq.float()
    for rank in megatron:
        got = torch.from_numpy(rank[("rope", "llama3")])
        torch.testing.assert_close(got, want, atol=0, rtol=1e-6)
        assert not torch.allclose(torch.from_numpy(rank[("rope", "llama")]), got)
        torch.testing.assert_close(torch.from_numpy(rank[("rope", "llama")]), plain)


@pytest.mark.process
@pytest.mark.parametrize("name,lay", [(m, lay) for m, lay, v in CASES if v])
def test_value_head_equals_the_score_head(hf, megatron, name: str, lay: str) -> None:
    ids, mask = M.batch()
    want = M.token_scores(hf[name][1], ids, mask)
    got = _gathered(megatron, (name, lay))
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


@pytest.mark.process
def test_training_keeps_tied_and_replicated_weights_equal(hf, megatron) -> None:
    """The tied embedding's copy on the last stage stays the embedding after a step (the
    embedding-group grad sync); the q/k norms, replicated over TP, stay equal."""
    embed = hf["qwen2"][1].model.embed_tokens.weight.detach()
    held = [r[("train", "qwen2")] for r in megatron]
    firsts = [torch.from_numpy(p[W.EMBED]) for s, _, p in held if s == 0]
    lasts = [torch.from_numpy(p[W.OUTPUT]) for s, _, p in held if s == 1]
    assert len(firsts) == len(lasts) == 2 and all(W.EMBED not in p for s, _, p in held if s)
    assert not torch.allclose(firsts[0], embed)  # it trained
    for t in firsts + lasts:
        assert torch.equal(t, firsts[0])
    name = "decoder.layers.0.self_attention.q_layernorm.weight"
    norms = [torch.from_numpy(p[name]) for *_, p in (r[("train", "qwen3")] for r in megatron)]
    q_norm = hf["qwen3"][1].model.layers[0].self_attn.q_norm.weight.detach()
    assert not torch.allclose(norms[0], q_norm)  # it trained
    assert all(torch.equal(n, norms[0]) for n in norms)


# ---- vLLM from megatron shards: one world of 2 ranks ---------------------------------------
def _vllm_rank(rank: int, world: int, folders: dict[str, str]) -> dict:
    from hybridflow.executor.engines.vllm_engine import SamplingConfig, VllmConfig, VllmEngine

    out = {}
    for name, folder in folders.items():
        spec = load_model(folder)
        for groups in (((0, 1),), ((0,), (1,))):
            tp = len(groups[0])
            tp_rank = next(g.index(rank) for g in groups if rank in g)
            engine = VllmEngine(
                VllmConfig(
                    model_dir=folder, tp_groups=groups, load_format="dummy", max_model_len=64
                )
            )
            shard = F.read_rank_shards(folder, spec, W.megatron_shapes(spec), tp, tp_rank, False)
            engine.load_sharded(W.megatron_to_vllm(shard, spec, tp))
            done = engine.generate(M.PROMPTS, SamplingConfig(temperature=0.0, max_tokens=TOKENS))
            out[(name, tp)] = [c.token_ids for c in sorted(done, key=lambda c: c.prompt_index)]
            engine.shutdown()
    return out


@pytest.mark.process
def test_vllm_greedy_from_megatron_shards_equals_transformers(hf) -> None:
    folders = {name: str(hf[name][0]) for name in ("llama", "llama3", "qwen2", "qwen3")}
    ranks = run_ranks(_vllm_rank, 2, folders, backend="gloo", timeout_s=900)
    for name in folders:
        want = M.greedy(hf[name][1], M.PROMPTS, TOKENS)
        assert len(set(want)) > 1  # prompts lead to different tokens
        for tp in (1, 2):
            for r in ranks:
                assert r[(name, tp)] == want, (name, tp)


# ---- folders: sharded checkpoints, per-rank reads, writers (no process) --------------------
def _all_shards(folder: Path, tp: int) -> list[W.StateDict]:
    spec = load_model(str(folder))
    return [
        F.read_rank_shards(folder, spec, W.megatron_shapes(spec), tp, r, False) for r in range(tp)
    ]


def test_sharded_checkpoint_reads_as_the_single_file(hf, tmp_path: Path) -> None:
    folder, model = hf["qwen3"]
    sharded = M.save(model, tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded / H.INDEX).exists() and not (sharded / H.SINGLE).exists()
    info = F.check_folder(sharded, value_head=False)
    assert len(set(info.files.values())) >= 2
    for tp in (1, 2):
        for one, many in zip(_all_shards(folder, tp), _all_shards(sharded, tp)):
            assert one.keys() == many.keys()
            assert all(torch.equal(one[n], many[n]) for n in one)
    full = H.load_hf_folder(sharded)
    assert all(torch.equal(full[n], p) for n, p in model.state_dict().items() if n in full)


def test_a_rank_reads_its_stage_and_its_slices(hf, monkeypatch: pytest.MonkeyPatch) -> None:
    """PP2 x TP2, last stage of the tied Qwen2: layer 1, the norm and the output layer
    (the embedding's rows of this TP rank), nothing of layer 0; shards of megatron's sizes
    equal to slices of the full tensors."""
    folder, _ = hf["qwen2"]
    spec = load_model(str(folder))
    names = W.stage_state(W.megatron_shapes(spec), spec, 2, 1, tied_copy=True)
    read: list[str] = []
    slice_of = F._Reader.slice
    monkeypatch.setattr(F._Reader, "slice", lambda self, n: read.append(n) or slice_of(self, n))
    got = F.read_rank_shards(folder, spec, names, 2, 1, False)
    assert got.keys() == names.keys() and W.OUTPUT in got
    assert not any(n.startswith("model.layers.0.") for n in read)
    full = W.split_tp(W.hf_to_megatron(H.load_hf_folder(folder), spec), spec, 2, 1)
    assert torch.equal(got[W.OUTPUT], full[W.EMBED])
    for n, t in got.items():
        if n != W.OUTPUT:
            assert torch.equal(t, full[n]), n


@pytest.mark.parametrize("qkv_bias,qk_norm,tied", [(0, 0, 0), (1, 0, 1), (0, 1, 0)])
def test_written_folders_load_in_transformers(tmp_path: Path, qkv_bias, qk_norm, tied) -> None:
    """hf_config_dict picks the family's config, random_hf_state its tensors (bias, q/k
    norms, no lm_head when tied), save_hf_model a sharded form transformers loads."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    base = load_model(str(M.save(M.build("llama"), tmp_path / "base")))
    spec = dataclasses.replace(
        base, hidden=128, qkv_bias=bool(qkv_bias), qk_norm=bool(qk_norm), tied_embeddings=bool(tied)
    )
    state = H.random_hf_state(spec, seed=1)
    out = H.save_hf_model(tmp_path / "m", state, H.hf_config_dict(spec), max_shard_bytes=1 << 16)
    assert (out / H.INDEX).exists()
    family = {(0, 0): "Llama", (1, 0): "Qwen2", (0, 1): "Qwen3"}[(qkv_bias, qk_norm)]
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        f"{family}ForCausalLM"
    ]
    back = load_model(str(out))
    assert (back.qkv_bias, back.qk_norm, back.tied_embeddings) == (
        spec.qkv_bias,
        spec.qk_norm,
        spec.tied_embeddings,
    )
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    loaded = model.state_dict()
    if tied:  # transformers' state dict lists the shared lm_head too; the file does not
        assert (
            loaded.pop("lm_head.weight").data_ptr()
            == loaded["model.embed_tokens.weight"].data_ptr()
        )
    assert loaded.keys() == state.keys()  # transformers expects no tensor we did not write
    for name, t in state.items():
        assert torch.equal(loaded[name], t), name
    F.check_folder(out, value_head=False)


# ---- check_folder refusals ----------------------------------------------------------------


def test_good_folders_pass(hf) -> None:
    for name in ("llama", "qwen2", "qwen3", "mistral", "llama3"):
        info = F.check_folder(hf[name][0], value_head=False)
        assert not info.classifier and info.spec.layers == 2
    assert F.check_folder(hf["qwen2-cls"][0], value_head=True).classifier
    assert not F.check_folder(hf["qwen2"][0], value_head=True, critic=True).classifier


def test_check_folder_refuses_each_bad_folder(hf, tmp_path: Path) -> None:
    good = hf["qwen2"][0]
    M.refused(tmp_path / "nowhere", "does not exist")
    no_config = M.copy_folder(good, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    M.refused(no_config, "has no config.json")
    no_weights = M.copy_folder(good, tmp_path / "no_weights")
    (no_weights / H.SINGLE).rename(no_weights / "pytorch_model.bin")
    M.refused(no_weights, "has no weights", H.SINGLE, H.INDEX, "safetensors only")
    alien = M.copy_folder(good, tmp_path / "alien", architectures=["GPT2LMHeadModel"])
    M.refused(alien, "'GPT2LMHeadModel'", *F.BUILDABLE)
    moe = M.copy_folder(
        good, tmp_path / "moe", architectures=["MixtralForCausalLM"], num_local_experts=8
    )
    M.refused(moe, "'MixtralForCausalLM'", "Qwen3MoeForCausalLM only")
    M.refused(good, "value-head role", "score.weight", value_head=True)
    M.refused(hf["llama-cls"][0], "sequence classifier", "causal-LM role")
    scaled = M.copy_folder(
        good, tmp_path / "scaled", rope_parameters={"rope_type": "llama3", "factor": 8.0}
    )
    M.refused(scaled, "llama3 rope scaling with {'low_freq_factor': None")
    yarn = M.copy_folder(
        good, tmp_path / "yarn", rope_parameters={"rope_type": "yarn", "factor": 4.0}
    )
    M.refused(yarn, "rope scaling 'yarn'", "plain RoPE and llama3 only")
    sliding = M.copy_folder(hf["mistral"][0], tmp_path / "sliding", sliding_window=32)
    M.refused(sliding, "sliding-window attention", "32")


def test_check_folder_names_the_tensor_that_does_not_fit(hf, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bad = M.copy_folder(hf["qwen3"][0], tmp_path / "bad")
    state = load_file(str(bad / H.SINGLE))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 64)
    save_file(state, str(bad / H.SINGLE))
    M.refused(bad, "'model.layers.1.mlp.up_proj.weight'", "[64, 64]", "[128, 64]")
    del state["model.layers.0.self_attn.k_norm.weight"]
    save_file(state, str(bad / H.SINGLE))
    M.refused(bad, "lack 'model.layers.0.self_attn.k_norm.weight'", "[32]")
    wider = M.copy_folder(hf["llama"][0], tmp_path / "wider", intermediate_size=256)
    M.refused(wider, "'model.layers.0.mlp.gate_proj.weight'", "[128, 64]", "[256, 64]")
    sharded = M.save(hf["qwen3"][1], tmp_path / "sharded", max_shard_size="100KB")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    M.refused(sharded, H.INDEX, "model-00002-")
