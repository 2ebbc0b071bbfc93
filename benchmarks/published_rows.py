"""The published RL step times of ../shared/published-calibration.md as data, for
benchmarks/published.py: each row's workload, its own training layout and rollout tp, its
memory settings, placement, published step and phase seconds, and the assumptions made
where the source leaves a number out (`notes`). Rows whose source is ambiguous in a way that
decides the prediction carry `excluded` (built and printed, left out of the goal);
`NOT_BUILT` lists the rows that cannot be rebuilt at all, with the reason.

Conventions (the same for every row):
- DAPO (verl's recipe) is GRPO without a reference model (use_kl_loss and use_kl_in_reward
  are off): the job is GRPO and the reference's prepare seconds are left out
  (`reference=False`); its reward is a rule (the math-answer check).
- The job's prompt: its maximum (memory) and, where the source gives one, its mean
  (compute); without a mean every prompt is the maximum.
- Where the mean response length is not given: response_mean = half the maximum (an
  assumption; no source states the mean of these runs), said in the row's notes.
- FSDP2 with Ulysses sequence parallel sp = context parallel cp = sp (each sequence split
  over sp ranks), dp = GPUs / sp, the memory setting fsdp (weights, gradients and Adam
  sharded over dp x cp).
- A rollout tp above the training tp is a generation group wider than the training one
  (the general resharding; GenLayout.decoupled).
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hybridflow.simulator.hf_config import spec_to_hf_dict
from hybridflow.simulator.model import CATALOG

ONE_STEP = "verl docs/advance/one_step_off.md"
FULLY_ASYNC = "verl docs/advance/fully_async.md"
VERL_LOGS = "verl-data experiment logs (gsm8k)"
OPENRLHF_BENCH = "OpenRLHF benchmark (A800)"
HALF_MAX = "response_mean = half the maximum (assumption: the source gives no mean)"
PROMPT_MAX = "prompt at its maximum (the source gives no mean)"


@dataclass(frozen=True)
class Row:
    """One published measurement and the job and plan that rebuild it."""

    name: str
    source: str
    gpu: str  # profile name
    gpus: int
    algorithm: str
    model: str  # catalog name or a name of MODEL_CONFIGS
    prompt_len: int  # maximum
    response_len: int  # maximum
    batch: int  # prompts per step
    mini_batches: int
    published_s: float
    # the row's training layout (p, t, cp, d; ep for experts) and rollout tp
    pp: int = 1
    tp: int = 1
    cp: int = 1
    dp: int = 1
    ep: int = 1
    rollout_tp: int = 1
    n_samples: int = 1
    prompt_mean: float | None = None
    response_mean: float | None = None  # None: HALF_MAX
    reference: bool = True  # False: DAPO, no reference model
    reward: str = "rule"  # "rule" or "model" (the actor's model)
    offload: bool = False
    fsdp: bool = False  # verl's FSDP2 backend
    recompute: str = "none"
    micro_batch_tokens: int | None = None
    # None: colocated (one set, every GPU role); else {role: GPUs} (OpenRLHF's placement)
    separate: dict[str, int] | None = None
    phases: dict[str, float] = field(default_factory=dict)  # our stage(s) -> seconds
    excluded: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def mean_response(self) -> float:
        return self.response_mean if self.response_mean is not None else self.response_len / 2


def _dapo_7b(name: str, source: str, gpus: int, published: float, **kw) -> Row:
    """Qwen2.5-Math-7B DAPO on H20: 512 prompts x 16, mini-batch 32, prompt 2,048."""
    base = dict(
        source=source,
        gpu="h20",
        gpus=gpus,
        algorithm="grpo",
        model="qwen2.5-math-7b",
        prompt_len=2048,
        batch=512,
        n_samples=16,
        mini_batches=512 // 32,
        published_s=published,
        reference=False,
        offload=True,
        recompute="full",
    )
    return Row(name=name, **{**base, **kw})


_ONE_STEP_NOTES = (
    "16 responses per prompt and offload on: the colocated script "
    "recipe/one_step_off_policy/dapo_7b_math_*_colocate.sh (n_resp_per_prompt=16, "
    "offload=True); the doc's 4_12 scripts (12 responses) ran the overlap rows, and the "
    "colocated update_actor on 16 GPUs equals the 12-GPU one's, as 16 x 512 on 16 does "
    "12 x 512 on 12",
    HALF_MAX,
    PROMPT_MAX,
    "gradient checkpointing on (enable_gradient_checkpointing=True): recompute full",
)
_FULLY_ASYNC_NOTES = (
    "prompt 2,048, offload on, gradient checkpointing, gen_tp 4, sp 4, dynamic batches of "
    "2 x 30,720 tokens per GPU: recipe/fully_async_policy/exp/qwen2-7B-math_128/fsdp2_colocate/"
    "dapo_7b_math_fsdp2_colocate.sh",
    HALF_MAX,
    PROMPT_MAX,
    "rollout tp 4 above the training tp 1 (FSDP): a wider generation group",
)


def _fully_async(
    gpus: int, published: float, gen: float, old: float, update: float, *notes: str
) -> Row:
    return _dapo_7b(
        f"verl-fully-async-colocated-{gpus}",
        FULLY_ASYNC,
        gpus,
        published,
        response_len=28 * 1024,
        cp=4,
        dp=gpus // 4,
        rollout_tp=4,
        micro_batch_tokens=2 * 30720 * 4,  # verl: ppo_max_token_len_per_gpu x sp
        fsdp=True,
        phases={"generate": gen, "prepare": old, "train": update},
        notes=_FULLY_ASYNC_NOTES + notes,
    )


ROWS: tuple[Row, ...] = (
    _dapo_7b(
        "verl-one-step-colocated-megatron",
        ONE_STEP,
        16,
        699.0,
        response_len=8192,
        pp=2,
        tp=2,
        dp=4,
        rollout_tp=2,
        micro_batch_tokens=2 * (2048 + 8192),  # ppo_micro_batch_size_per_gpu=2
        phases={"generate": 207.0, "prepare": 119.0, "train": 344.0},
        notes=_ONE_STEP_NOTES
        + ("gen 207 s (generate_sequences 162 s) compared with our generate",),
    ),
    _dapo_7b(
        "verl-one-step-colocated-fsdp2",
        ONE_STEP,
        16,
        749.0,
        response_len=8192,
        cp=4,
        dp=4,
        rollout_tp=2,
        micro_batch_tokens=2 * (2048 + 8192) * 4,
        fsdp=True,
        phases={"generate": 321.0, "prepare": 88.0, "train": 286.0},
        excluded="maximum response ambiguous: the doc says 20,480 for FSDP2, the script 8,192 "
        "(built with 8,192)",
        notes=_ONE_STEP_NOTES + ("rollout tp 2 above the training tp 1 (FSDP): a wider group",),
    ),
    _fully_async(
        32,
        790.10,
        357.41,
        107.71,
        313.81,
        "update_actor 313.81 s as in the doc's table (the calibration notes swap it with the "
        "16:16 row's 269.80; the doc's step = gen + old_log_prob + update_actor fits 313.81)",
    ),
    _fully_async(64, 365.28, 150.72, 70.26, 133.41),
    _fully_async(128, 356.30, 177.85, 53.92, 113.81),
    Row(
        name="verl-fully-async-colocated-qwen3-30b-a3b",
        source=FULLY_ASYNC,
        gpu="h20",
        gpus=128,
        algorithm="grpo",
        model="qwen3-30b-a3b",
        prompt_len=2048,
        response_len=8192,
        batch=512,
        n_samples=16,
        mini_batches=512 // 128,
        published_s=497.89,
        tp=2,
        cp=2,
        dp=32,
        ep=8,
        rollout_tp=4,
        offload=True,
        phases={"generate": 348.05, "prepare": 28.73 + 20.86, "train": 86.27},
        notes=(
            "prompt not in the doc: 2,048, the maximum of every recipe of that doc (assumption)",
            HALF_MAX,
            "rollout tp 4 above the training tp 2: a wider generation group",
            "GRPO with a reference (the doc gives its ref seconds): prepare = old_log_prob + ref",
        ),
    ),
    Row(
        name="verl-gsm8k-ppo-deepseek-7b",
        source=VERL_LOGS,
        gpu="a100-80gb",
        gpus=4,
        algorithm="ppo",
        model="deepseek-llm-7b-chat",
        prompt_len=512,
        prompt_mean=83,
        response_len=512,
        response_mean=136,
        batch=1024,
        mini_batches=1,
        published_s=145.0,
        tp=4,
        rollout_tp=4,
        phases={"generate": 37.0, "prepare": 11.1 + 10.9 + 15.4, "train": 38.3 + 31.0},
        excluded="GPU kind not stated (built on a100-80gb)",
        notes=(
            "mini-batches not stated: 1",
            "prepare = old_log_prob + ref + values; train = update_critic + update_actor",
        ),
    ),
    Row(
        name="openrlhf-ppo-llama2-7b-a800",
        source=OPENRLHF_BENCH,
        gpu="a800-80gb",
        gpus=8,
        algorithm="ppo",
        model="llama-2-7b",
        prompt_len=1024,
        response_len=1024,
        batch=1024,
        mini_batches=1,
        published_s=885.2,
        dp=1,
        reward="model",
        separate={"reference": 1, "reward": 1, "critic": 2, "actor": 2},
        phases={"generate+prepare": 481.9, "train+reshard": 403.3},
        notes=(
            "1:1:2:2:2 read as reference:reward:critic:actor:vLLM (the order of OpenRLHF's "
            "--*_num_gpus_per_node flags); the simulator generates on the actor's own 2 GPUs "
            "(2 replicas, as 2 vLLM engines of tp 1), so the plan uses 6 of the 8 GPUs",
            HALF_MAX,
            PROMPT_MAX,
            "mini-batches and memory settings not stated: 1 and the defaults (no offload)",
            "OpenRLHF's 'generation' (make_experience) compared with generate + prepare",
        ),
    ),
)

NOT_BUILT: tuple[tuple[str, str, str], ...] = (
    ("verl one-step overlap (FSDP2, Megatron)", ONE_STEP, "asynchronous (another issue)"),
    ("verl fully async 16:16, 32:32, 64:64", FULLY_ASYNC, "asynchronous (another issue)"),
    ("verl staleness sweep at 128 GPUs", FULLY_ASYNC, "asynchronous (another issue)"),
    ("verl Qwen3-30B-A3B fully async 96:32", FULLY_ASYNC, "asynchronous (another issue)"),
    ("verl weight synchronisation", FULLY_ASYNC, "a weight-sync time, not a step; layouts"),
    ("verl DeepSeek-671B", "verl docs/perf/dpsk.md", "the batch is not in the doc"),
    ("verl gsm8k GRPO Qwen2-7B-Instruct", VERL_LOGS, "GPU kind and prompt/max lengths not stated"),
    ("OpenRLHF 34B/7B PPO (ReaLHF #10)", "ReaLHF issue #10", "GPU kind and the split not stated"),
    ("OpenRLHF README 7B-70B", "OpenRLHF README", "lengths not stated"),
)

# Models outside the catalog, as config.json dicts (written to a temporary folder).
_QWEN_MATH = {
    **spec_to_hf_dict(CATALOG["qwen2.5-7b"]),
    "_name_or_path": "qwen2.5-math-7b",
    "rope_theta": 10000.0,
    # Qwen2.5-Math-7B ships 4,096; every script overrides it (override_config) to 32,768
    "max_position_embeddings": 32768,
}
_DEEPSEEK_7B = {
    "_name_or_path": "deepseek-llm-7b-chat",
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 102400,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}
MODEL_CONFIGS = {"qwen2.5-math-7b": _QWEN_MATH, "deepseek-llm-7b-chat": _DEEPSEEK_7B}


@functools.cache
def _config_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="published-models-"))


def model_path(name: str) -> str:
    """A catalog name as it is, or the config.json written for a model of MODEL_CONFIGS."""
    if name not in MODEL_CONFIGS:
        return name
    path = _config_dir() / name / "config.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(MODEL_CONFIGS[name], indent=1))
    return str(path)
