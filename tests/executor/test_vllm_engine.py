"""Greedy and seeded sampled generation from resharded vLLM engines (4 gloo ranks, strided and
consecutive TP groups) equals one vLLM process on the full model."""

import os

import pytest
import torch

from hybridflow.executor.engines import hf_checkpoint as H
from hybridflow.executor.engines import weights as W
from hybridflow.executor.engines.vllm_engine import (
    EngineError,
    SamplingConfig,
    VllmConfig,
    request_seed,
)
from hybridflow.executor.hybrid_engine.reshard_plan import ReshardPlan, split_micro_dp
from hybridflow.executor.spawn import run_ranks
from hybridflow.layout import ParallelLayout
from hybridflow.simulator.model import load_model

pytestmark = pytest.mark.slow

MODEL, SEED = "tiny", 21
PROMPTS = [
    [3, 14, 15, 92, 65],
    [35, 89, 79],
    [32, 38, 46, 26, 43, 38],
    [83, 27],
    [95, 2, 88, 41],
    [97, 16, 93, 99, 37],
    [51, 5, 82],
    [9, 74, 94, 45, 92],
]
GREEDY = SamplingConfig(temperature=0.0, max_tokens=6)
SAMPLED = SamplingConfig(temperature=1.0, max_tokens=6, seed=7)  # one seed per prompt index
LAYOUTS = {
    "t4": ParallelLayout(1, 4, 1),
    "t2d2": ParallelLayout(1, 2, 2),
    "p2t2": ParallelLayout(2, 2, 1),
}
# every hybridengine layout and tg, plus the two reference schemes once
CASES = [
    (n, tg, "hybridengine") for n, lay in LAYOUTS.items() for tg in (1, 2, 4) if lay.tp % tg == 0
] + [("t4", 2, "hybridengine-v"), ("p2t2", 1, "allgather")]


def _reference(rank: int, world: int, ckpt: str) -> list[tuple]:
    """One plain vLLM process on the full checkpoint (no external launcher, no resharding)."""
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    torch.set_num_threads(1)
    llm = LLM(
        model=ckpt,
        enforce_eager=True,
        skip_tokenizer_init=True,
        dtype="float32",
        kv_cache_memory_bytes=32 << 20,
        max_model_len=256,
        seed=0,
    )
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in PROMPTS], GREEDY.to_vllm(), use_tqdm=False
    )
    c = [o.outputs[0] for o in outs]
    greedy = [
        (tuple(x.token_ids), tuple(d[t].logprob for t, d in zip(x.token_ids, x.logprobs)))
        for x in c
    ]
    params = [SAMPLED.to_vllm(seed=request_seed(SAMPLED.seed, i, p)) for i, p in enumerate(PROMPTS)]
    sampled = [
        tuple(o.outputs[0].token_ids)
        for o in llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False
        )
    ]
    return greedy, sampled


def _resharded(rank: int, world: int, ckpt: str) -> dict:
    from hybridflow.executor.engines.vllm_engine import VllmEngine
    from hybridflow.executor.hybrid_engine.engine import HybridEngine

    spec = load_model(MODEL)
    full = W.hf_to_megatron(H.random_hf_state(spec, seed=SEED), spec)
    current: dict = {}

    def factory(groups):  # one engine per group shape, reused across layouts
        key = tuple(map(tuple, groups))
        if current.get("key") != key:
            if current:
                current["engine"].shutdown()
            current.update(
                key=key,
                engine=VllmEngine(VllmConfig(model_dir=ckpt, tp_groups=key, load_format="dummy")),
            )
        return current["engine"]

    results = {}
    plans = sorted(CASES, key=lambda c: str(ReshardPlan(LAYOUTS[c[0]], c[1], c[2]).gen_tp_groups()))
    for name, tg, scheme in plans:
        lay = LAYOUTS[name]
        plan = ReshardPlan(lay, tg, scheme)
        he = HybridEngine(spec, plan, factory)
        c = plan.train.coords(rank)
        s, r, k = c.pp, c.tp, c.dp
        shard = W.split_tp(W.stage_state(full, spec, lay.pp, s), spec, lay.tp, r)
        he.to_generation(shard)
        offset, mine = split_micro_dp(PROMPTS, k, lay.dp)  # the DP split (3D_PROTO's part)
        outs = he.generate(mine, GREEDY)
        ids = range(offset, offset + len(mine))  # the prompts' indices in the whole batch
        sampled = [(c.prompt_index + offset, c.token_ids) for c in he.generate(mine, SAMPLED, ids)]
        he.to_training()
        results[(name, tg, scheme)] = (
            [(c.prompt_index + offset, c.token_ids, c.logprobs) for c in outs],
            sampled,
        )
    current["engine"].shutdown()
    return results


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    spec = load_model(MODEL)
    path = tmp_path_factory.mktemp("tiny_ckpt")
    H.save_hf_checkpoint(
        path,
        spec,
        W.megatron_to_hf(W.hf_to_megatron(H.random_hf_state(spec, seed=SEED), spec), spec),
    )
    return str(path)


@pytest.fixture(scope="module")
def reference(ckpt):
    return run_ranks(_reference, 1, ckpt, backend="gloo", timeout_s=600)[0]


@pytest.fixture(scope="module")
def resharded(ckpt):
    return run_ranks(_resharded, 4, ckpt, backend="gloo", timeout_s=900)


def test_greedy_generation_equals_one_vllm_process(reference, resharded):
    lay_dp = {n: lay.dp for n, lay in LAYOUTS.items()}
    for rank, results in enumerate(resharded):
        assert set(results) == set(CASES)
        for case, (outs, _) in results.items():
            d = lay_dp[case[0]]
            k = rank // LAYOUTS[case[0]].tp % d  # this rank's DP replica
            offset, mine = split_micro_dp(PROMPTS, k, d)
            assert [i for i, _, _ in outs] == list(range(offset, offset + len(mine))), case
            for i, tokens, logprobs in outs:
                want_tokens, want_lp = reference[0][i]
                assert tokens == want_tokens, (rank, case, i)
                assert torch.allclose(torch.tensor(logprobs), torch.tensor(want_lp), atol=1e-4), (
                    rank,
                    case,
                    i,
                )


def test_seeded_sampling_does_not_depend_on_the_layout(reference, resharded):
    """Each prompt's sampling is seeded by its index in the whole batch: every layout and
    replica split draws the same tokens as one process."""
    for results in resharded:
        for case, (_, sampled) in results.items():
            for i, tokens in sampled:
                assert tokens == reference[1][i], (case, i)


def test_sampling_settings_are_validated():
    with pytest.raises(EngineError):
        SamplingConfig(top_p=0)
    with pytest.raises(EngineError):
        SamplingConfig(temperature=0, n=2)
    with pytest.raises(EngineError):
        VllmConfig(model_dir="x", tp_groups=((0, 1), (2,)))
    with pytest.raises(EngineError):
        VllmConfig(model_dir="x", tp_groups=((0, 2), (1, 4)))
    params = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=5, n=3).to_vllm()
    assert (params.temperature, params.top_p, params.max_tokens, params.n) == (0.7, 0.9, 5, 3)
