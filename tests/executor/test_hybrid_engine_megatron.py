"""The 3D-HybridEngine on a megatron-core actor (4 gloo ranks, TP2 x PP2 -> generation TP2):
generation weights equal the megatron model's full weights sliced, vLLM's greedy tokens equal
Hugging Face transformers' on the same weights, and training after generation gives the same
losses as training that never generated."""

import pytest
import torch

from hybridflow.executor.spawn import run_ranks

pytestmark = pytest.mark.slow

MODEL, STEPS, TG = "tiny-4l", 3, 2
PROMPTS = [[7, 3, 99, 24], [15, 8], [230, 11, 42, 5, 64], [1, 2, 3]]


def _batch():
    from hybridflow.executor.controller.batch import Batch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (4, 12), generator=g)
    return Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def _full_from_ranks(named: list[tuple[str, torch.Tensor]], lay) -> dict:
    """Every rank's megatron shards merged into full tensors (the one-process model)."""
    import torch.distributed as dist

    from hybridflow.executor.engines import megatron_model as mm

    mine = [(n, p.detach().clone(), mm.tp_partition(p)) for n, p in named]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (lay.coords(dist.get_rank())[2], mine))
    parts: dict = {}
    for tp_rank, items in everyone:
        for n, p, part in items:
            parts.setdefault(n, {})[tp_rank] = (p, part)
    return {n: mm.merge_shards([d[r][0] for r in sorted(d)], d[0][1]) for n, d in parts.items()}


def _hf_greedy(full: dict, spec, max_tokens: int) -> list[tuple[int, ...]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridflow.executor.engines import hf_checkpoint as H
    from hybridflow.executor.engines import weights as W

    model = LlamaForCausalLM(
        LlamaConfig(
            **{
                k: v
                for k, v in H.hf_config_dict(spec).items()
                if k not in ("architectures", "torch_dtype")
            }
        )
    )
    model.load_state_dict(W.megatron_to_hf(full, spec), strict=True)
    out = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        for _ in range(max_tokens):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        out.append(tuple(ids[0, len(p) :].tolist()))
    return out


def _run(rank: int, world: int, ckpt: str) -> dict:
    from hybridflow.executor.engines import weights as W
    from hybridflow.executor.engines.groups import build_role_groups
    from hybridflow.executor.engines.train_engine import EngineConfig as TrainConfig
    from hybridflow.executor.engines.train_engine import TrainEngine, lm_loss
    from hybridflow.executor.engines.vllm_engine import SamplingConfig, VllmConfig, VllmEngine
    from hybridflow.executor.hybrid_engine.engine import HybridEngine
    from hybridflow.executor.hybrid_engine.reshard_plan import ReshardPlan
    from hybridflow.layout import ParallelLayout
    from hybridflow.simulator.model import load_model

    spec, lay = load_model(MODEL), ParallelLayout(tp=2, pp=2, dp=1)
    cfg = TrainConfig(micro_batch_size=2, lr=1e-2, seed=5)
    plain = TrainEngine("plain", spec, build_role_groups("plain", lay, seed=5), cfg)
    actor = TrainEngine("actor", spec, build_role_groups("actor", lay, seed=5), cfg)
    he = HybridEngine(
        spec,
        ReshardPlan(ParallelLayout(2, 2, 1), TG, "hybridengine"),
        lambda g: VllmEngine(
            VllmConfig(model_dir=ckpt, load_format="dummy", tp_groups=tuple(map(tuple, g)))
        ),
    )
    greedy = SamplingConfig(temperature=0.0, max_tokens=4)
    out = {"plain": [], "actor": [], "bad": [], "tokens": [], "hf": []}
    for _ in range(STEPS):
        out["plain"].append(plain.train_step(_batch(), lm_loss)["loss"])
        named = actor.named_local_parameters()
        full = _full_from_ranks(named, lay)
        he.to_generation({n: p.detach() for n, p in named})
        want = W.split_tp(full, spec, TG, he.gen_tp_rank)
        out["bad"] += [n for n in want if not torch.equal(he.gen_shard[n], want[n])]
        out["tokens"].append([c.token_ids for c in he.generate(PROMPTS, greedy)])
        out["hf"].append(_hf_greedy(full, spec, greedy.max_tokens))
        he.to_training()
        out["actor"].append(actor.train_step(_batch(), lm_loss)["loss"])
    he.engine.shutdown()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from hybridflow.executor.engines import hf_checkpoint as H
    from hybridflow.simulator.model import load_model

    ckpt = H.save_hf_checkpoint(tmp_path_factory.mktemp("cfg"), load_model(MODEL))
    return run_ranks(_run, 4, str(ckpt), backend="gloo", timeout_s=900)


def test_generation_weights_are_slices_of_the_megatron_model(results):
    assert all(r["bad"] == [] for r in results)


def test_vllm_greedy_equals_transformers_on_the_trained_weights(results):
    for r in results:
        assert r["tokens"] == r["hf"]
    assert results[0]["tokens"][0] != results[0]["tokens"][-1]  # the weights did change


def test_training_after_generation_has_the_same_losses(results):
    for r in results:
        assert r["actor"] == r["plain"]
        assert r["plain"][0] != r["plain"][-1]
