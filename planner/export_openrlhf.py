"""A plan as OpenRLHF's ``train_ppo_ray`` command line, for the placements it can express.

OpenRLHF 0.11.2 (openrlhf/cli/train_ppo_ray.py) runs vLLM generation on the actor's GPUs
only with ``--train.colocate_all``, which puts every model and the vLLM engines on one
placement group; without it the vLLM engines take GPUs of their own, which is no HybridFlow
plan (the actor generates on its own GPUs). So a plan exports when all its roles share one
set. Training is DeepSpeed: one ZeRO stage and one AutoTP size for every model, no
pipeline parallelism; the command says where that differs from the plan's layouts.

The trained roles' memory settings share one set of flags (--ds.* and
--actor.gradient_checkpointing_enable, which the critic reads too), the most
memory-saving of the actor's and critic's: the distributed optimizer (megatron's, ZeRO-1
like) is OpenRLHF's default ZeRO-2, which shards the gradients as well (no more memory
than the plan), and no distributed optimizer is ZeRO-0; offload is --ds.enable_sleep
(Adam's states, master weights and gradients on the host between the models' stages:
offload_deepspeed_states; not --ds.adam_offload, which runs Adam on the host); full
recompute is gradient checkpointing (selective has no counterpart and runs as full); a
token budget of more than one sequence is --train.dynamic_batch_enable with
--train.max_tokens_per_gpu, which OpenRLHF multiplies by the ring-attention and AutoTP
sizes (openrlhf/utils/seqlen_balancing.py); cp is --ds.ring_attn_size, which needs
--ds.packing_samples.
"""

from __future__ import annotations

import argparse
import shlex

from hybridflow.memory import RECOMPUTE, MemorySettings
from hybridflow.plan import Plan
from hybridflow.planner.export_refdata import OPENRLHF_SOURCE, load_openrlhf_reference
from hybridflow.planner.export_view import (
    ExportError,
    FrameworkExport,
    PlanView,
    node_split,
    parse_plan,
    settings_line,
)

# HybridFlow algorithm -> OpenRLHF --algo.advantage.estimator (ReMax and Safe-RLHF have none)
ESTIMATOR = {"ppo": "gae", "grpo": "group_norm"}
RULE_FN_VAR = "REWARD_FUNC_PATH"


def _check_expressible(v: PlanView) -> None:
    if v.algorithm not in ESTIMATOR:
        raise ExportError(
            f"OpenRLHF has no {v.algorithm} trainer (its advantage estimators: gae, reinforce, "
            f"rloo, reinforce_baseline, group_norm, dr_grpo, flash_reinforce; no greedy-baseline "
            f"ReMax, no cost models); use --export verl or another algorithm"
        )
    if len(v.sets) > 1:
        split = "; ".join(f"[{', '.join(s)}] {g} GPUs" for s, g in zip(v.sets, v.set_gpus))
        raise ExportError(
            f"OpenRLHF cannot express this placement ({split}): it generates on the actor's GPUs "
            f"only with --train.colocate_all, i.e. all models on one GPU set, and otherwise puts "
            f"the vLLM engines on GPUs of their own; export the all-colocated standard placement "
            f"or use --export verl"
        )
    gen = v.roles["actor"].generation
    if gen.pp > 1:
        raise ExportError(
            f"OpenRLHF's vLLM engines take a tensor-parallel size only; this plan "
            f"generates with pipeline parallelism {gen.pp}"
        )


def _shared_settings(v: PlanView) -> tuple[MemorySettings, list[str]]:
    """The one set of memory settings OpenRLHF gives the actor and critic alike: the most
    memory-saving of theirs, noted where they differ."""
    mems = {n: v.roles[n].settings for n in ("actor", "critic") if v.role(n) is not None}
    tokens = [m.micro_batch_tokens or v.seq_len for m in mems.values()]
    shared = MemorySettings(
        any(m.distributed_optimizer for m in mems.values()),
        max((m.recompute for m in mems.values()), key=RECOMPUTE.index),
        any(m.offload for m in mems.values()),
        min(tokens),
    )
    if len(set(mems.values())) == 1:
        return shared, []
    plan = "; ".join(f"{n} {m}" for n, m in mems.items())
    return shared, [
        f"OpenRLHF gives the actor and critic one set of DeepSpeed settings; the plan's "
        f"differ ({plan}), so both get the more memory-saving: {shared}"
    ]


def _zero_stage(uniform: bool, mem: MemorySettings) -> tuple[int, list[str]]:
    """ZeRO-3 where the layouts need it (the layout note says why), else 2 or 0 for the
    distributed optimizer (AutoTP trains with ZeRO 0-2 only)."""
    if not uniform:
        return 3, []
    if mem.fsdp:
        return 3, ["fsdp: ZeRO-3 shards weights, gradients and Adam's states over dp"]
    notes = []
    if mem.offload:
        notes.append(
            "--ds.enable_sleep below ZeRO-3 needs DeepSpeed > 0.17.5 "
            "(openrlhf/utils/deepspeed/deepspeed_utils.py, offload_deepspeed_states)"
        )
    if mem.distributed_optimizer:
        return 2, notes + [
            "distributed optimizer: ZeRO-2 (OpenRLHF's default) shards Adam's states and "
            "master weights as megatron's distributed optimizer does, and the gradients too"
        ]
    return 0, notes + ["no distributed optimizer: ZeRO-0, every rank holds all Adam's states"]


def _memory_args(v: PlanView, mem: MemorySettings, tp: int, cp: int) -> tuple[list, list]:
    """The flags and notes of the shared memory settings and context parallelism."""
    args, notes = [], []
    if mem.recompute != "none":
        args.append("--actor.gradient_checkpointing_enable")  # the critic reads it too
    if mem.recompute == "selective":
        notes.append(
            "OpenRLHF 0.11.2 has no selective recomputation (the Hugging Face gradient "
            "checkpointing recomputes whole layers): recompute=selective runs as full, "
            "slower than predicted"
        )
    if mem.offload:
        args.append("--ds.enable_sleep")
        notes.append(
            "offload: --ds.enable_sleep moves Adam's states, master weights and gradients to "
            "the host between the models' stages; the bf16 weights stay on the GPU and Adam's "
            "step runs there (the simulator prices it on the host); --ds.adam_offload "
            "(ZeRO-Offload: Adam on the host every step; it turns the sleep offload off) is "
            "not the plan's offload and is left off"
        )
    tokens = mem.micro_batch_tokens or v.seq_len
    if cp > 1 or tokens > v.seq_len:
        args.append("--ds.packing_samples")  # ring attention needs it too
    if cp > 1:
        args += ["--ds.ring_attn_size", str(cp)]
    if tokens > v.seq_len:
        per_gpu = -(-tokens // (cp * tp))  # OpenRLHF multiplies it by ring x AutoTP sizes
        args += ["--train.dynamic_batch_enable", "--train.max_tokens_per_gpu", str(per_gpu)]
        notes.append(
            f"micro-batches packed to {tokens} tokens (--train.max_tokens_per_gpu {per_gpu} "
            f"x ring_attn_size {cp} x tensor_parallel_size {tp}); the forward passes' "
            f"--rollout.max_tokens_per_gpu follows it"
        )
    else:
        notes.append(
            f"micro-batches of {v.micro_batch} sequence(s) per GPU, as the simulator "
            f"predicts; larger ones may be faster where memory allows"
        )
    return args, notes


def _deepspeed(v: PlanView) -> tuple[list[str], list[str]]:
    """ZeRO stage, AutoTP and ring-attention sizes and memory flags for all models, and
    notes where they differ from the plan."""
    layouts = {r.name: r.compute for r in v.roles.values()}
    tps, cps = {lay.tp for lay in layouts.values()}, {lay.cp for lay in layouts.values()}
    experts = v.expert_parallel
    uniform = len(tps) == len(cps) == 1 and all(lay.pp == 1 for lay in layouts.values())
    uniform = uniform and not experts
    mem, notes = _shared_settings(v)
    tp, cp = (next(iter(tps)) if uniform else 1), max(cps)
    stage, stage_notes = _zero_stage(uniform, mem)
    args = ["--ds.zero_stage", str(stage)]
    if tp > 1:
        args += ["--ds.tensor_parallel_size", str(tp)]
    mem_args, mem_notes = _memory_args(v, mem, tp, cp)
    args += mem_args
    notes += stage_notes + mem_notes
    if uniform:
        return args, notes
    return args, notes + _layout_notes(v, layouts, cp)


def _layout_notes(v: PlanView, layouts: dict, cp: int) -> list[str]:
    experts = v.expert_parallel
    described = ", ".join(
        f"{name} pp{lay.pp} tp{lay.tp}"
        + (f" cp{lay.cp}" if lay.cp > 1 else "")
        + f" dp{lay.dp}"
        + (f" ep{lay.ep}" if lay.ep > 1 else "")
        for name, lay in layouts.items()
    )
    ring = f" with ring attention {cp} for all" if cp > 1 else ""
    note = (
        f"DeepSpeed has no pipeline parallelism and one AutoTP size for all models; the plan's "
        f"layouts ({described}) become ZeRO-3 sharding over the set's {v.set_gpus[0]} GPUs"
        f"{ring}, so time and memory differ from the prediction"
    )
    notes = [note]
    if experts:
        notes.append(
            f"OpenRLHF 0.11.2 has no expert parallelism (train_ppo_ray has no such argument; "
            f"--ds.experts_implementation picks a kernel): the experts of "
            f"{', '.join(f'{n} (ep {e})' for n, e in experts.items())} are ZeRO-3 sharded with "
            f"the other weights and the vLLM engines run without expert parallelism"
        )
    return notes


def _placement(v: PlanView) -> list[str]:
    nodes, per_node = node_split(v.set_gpus[0], v.gpus_per_node)
    gen = v.roles["actor"].generation
    args = [
        "--train.colocate_all",
        "--vllm.enable_sleep",
        "--vllm.num_engines",
        str(v.set_gpus[0] // gen.tp),
        "--vllm.tensor_parallel_size",
        str(gen.tp),
    ]
    for name, flag in (
        ("actor", "actor"),
        ("reference", "ref"),
        ("critic", "critic"),
        ("reward", "reward"),
    ):
        if v.role(name) is not None:  # a rule reward has no GPUs
            args += [
                f"--{flag}.num_nodes",
                str(nodes),
                f"--{flag}.num_gpus_per_node",
                str(per_node),
            ]
    return args


def _batches(v: PlanView) -> list[str]:
    n = v.samples_per_prompt
    args = [
        "--rollout.batch_size",
        str(v.global_batch),
        "--rollout.n_samples_per_prompt",
        str(n),
        "--train.batch_size",
        str(v.mini_batch * n),
        "--train.max_epochs",
        str(v.ppo_epochs),
        "--train.micro_batch_size",
        str(v.micro_batch),
        "--rollout.micro_batch_size",
        str(v.micro_batch),
        "--data.max_len",
        str(v.prompt_len + v.response_len),
        "--rollout.max_new_tokens",
        str(v.response_len),
        "--algo.advantage.estimator",
        ESTIMATOR[v.algorithm],
    ]
    if v.role("reference") is None:
        args += ["--algo.kl.init_coef", "0"]  # OpenRLHF builds the reference when this is > 0
    elif v.algorithm == "grpo":
        args += ["--algo.kl.use_loss", "--algo.kl.estimator", "k3"]
    return args


def _models(v: PlanView) -> tuple[list[str], list[tuple[str, str]]]:
    args, env = [], []
    for name in ("actor", "critic", "reward"):
        role = v.role(name)
        if role is None:
            continue
        var = f"{name.upper()}_MODEL_PATH"
        args += [f"--{name}.model_name_or_path", f'"${var}"']
        env.append((var, f"Hugging Face checkpoint of {role.model}"))
    if v.is_rule("reward"):
        args += ["--reward.remote_url", f'"${RULE_FN_VAR}"']
        env.append(
            (
                RULE_FN_VAR,
                "Python file defining reward_func, the rule reward (or the URL of a reward server)",
            )
        )
    return args, env + [("PROMPT_DATA", "prompt dataset (--data.prompt_dataset)")]


def to_openrlhf(plan: Plan | dict) -> FrameworkExport:
    """The plan as an OpenRLHF command; ExportError for a plan OpenRLHF cannot express."""
    v = parse_plan(plan)
    _check_expressible(v)
    ref = load_openrlhf_reference()
    ds_args, notes = _deepspeed(v)
    model_args, env = _models(v)
    args = (
        _placement(v)
        + ds_args
        + _batches(v)
        + model_args
        + ["--data.prompt_dataset", '"$PROMPT_DATA"']
    )
    notes.append(
        "OpenRLHF syncs weights by gathering each parameter on rank 0 and broadcasting "
        "it to the vLLM engines (consecutive TP groups), not by the 3D-HybridEngine's "
        "in-place reshard: compare `hybridflow simulate --reshard allgather`"
    )
    reference, actor = v.role("reference"), v.roles["actor"]
    if reference is not None and reference.model != actor.model:
        notes.append(f"OpenRLHF loads the reference from the actor's path, not {reference.model}")
    if v.is_rule("reward"):
        notes.append(
            f"the reward is a rule: no reward model; OpenRLHF scores responses with "
            f"reward_func from ${RULE_FN_VAR} (--reward.remote_url takes a .py file or "
            f"an HTTP URL); pass the answers' dataset key with --data.label_key"
        )
    words = [a if a.startswith('"$') else shlex.quote(a) for a in args]
    check_constraints(parse_command(args, ref))  # flags of the named version, and its checks
    header = [f"{v.algorithm} on {v.total_gpus} x {v.gpu}: all models on {v.set_gpus[0]} GPUs"]
    header += [settings_line(v)] if settings_line(v) else []
    if v.tokens_per_s:
        header.append(f"predicted {v.tokens_per_s:,.0f} tokens/s, {v.iteration_s:.1f} s/iteration")
    return FrameworkExport(
        "OpenRLHF",
        ref["version"],
        OPENRLHF_SOURCE,
        ref["entry_point"],
        tuple(_pair_words(words)),
        tuple(env),
        tuple(header),
        tuple(notes),
    )


def _pair_words(words: list[str]) -> list[str]:
    """Join each flag with its value so the rendered command has one flag per line."""
    out: list[str] = []
    for w in words:
        if out and not w.startswith("--") and out[-1].startswith("--") and " " not in out[-1]:
            out[-1] += f" {w}"
        else:
            out.append(w)
    return out


def build_parser(ref: dict | None = None) -> argparse.ArgumentParser:
    """An argparse parser with OpenRLHF's argument names, types and choices of that version."""
    ref = ref or load_openrlhf_reference()
    types = {"int": int, "float": float, "str": str, None: None}
    parser = argparse.ArgumentParser(
        prog=ref["entry_point"], allow_abbrev=False, exit_on_error=False
    )
    for a in ref["arguments"]:
        if a["action"] in ("store_true", "store_false"):
            parser.add_argument(*a["flags"], dest=a["dest"], action=a["action"])
            continue
        kw = {"dest": a["dest"], "type": types[a["type"]], "default": a["default"]}
        if a["nargs"] is not None:
            kw["nargs"] = a["nargs"]
        if a["choices"] is not None:
            kw["choices"] = a["choices"]
        parser.add_argument(*a["flags"], **kw)
    return parser


def parse_command(args: list[str], ref: dict | None = None) -> argparse.Namespace:
    """Parse argument words as OpenRLHF would; shell variables stand for paths."""
    words = [("/path" if a.startswith('"$') else a) for a in args]
    try:
        ns, unknown = build_parser(ref).parse_known_args(words)
    except argparse.ArgumentError as e:
        raise AssertionError(f"OpenRLHF rejects the exported command: {e}") from e
    assert not unknown, f"OpenRLHF has no arguments {unknown}"
    return ns


def check_constraints(ns: argparse.Namespace) -> None:
    """The checks train_ppo_ray.py (0.11.2) and DeepSpeed make before training starts."""
    g = lambda name: getattr(ns, name)  # noqa: E731 (dests contain dots)
    actor_gpus = g("actor.num_nodes") * g("actor.num_gpus_per_node")
    if g("train.colocate_all") and actor_gpus != g("vllm.num_engines") * g(
        "vllm.tensor_parallel_size"
    ):
        raise ExportError(
            f"OpenRLHF needs actor GPUs ({actor_gpus}) = vLLM engines x TP with "
            f"--train.colocate_all"
        )
    if g("algo.kl.init_coef") > 0 and (g("train.colocate_all") or g("train.colocate_actor_ref")):
        if (g("ref.num_nodes"), g("ref.num_gpus_per_node")) != (
            g("actor.num_nodes"),
            g("actor.num_gpus_per_node"),
        ):
            raise ExportError(
                "OpenRLHF needs the colocated reference on the actor's nodes and GPUs"
            )
    estimator, n = g("algo.advantage.estimator"), g("rollout.n_samples_per_prompt")
    if estimator in ("rloo", "reinforce_baseline", "group_norm", "dr_grpo") and n <= 1:
        raise ExportError(f"OpenRLHF's {estimator} needs more than one sample per prompt, got {n}")
    dp = actor_gpus // g("ds.ring_attn_size") // g("ds.tensor_parallel_size")
    if n * g("rollout.batch_size") // g("rollout.micro_batch_size") < dp:
        raise ExportError(
            f"OpenRLHF needs at least {dp} rollout micro-batches (one per actor rank)"
        )
    if g("train.batch_size") % (g("train.micro_batch_size") * dp):
        raise ExportError(
            f"DeepSpeed needs --train.batch_size {g('train.batch_size')} to be a "
            f"multiple of micro-batch {g('train.micro_batch_size')} x data-parallel {dp}"
        )
