"""Jobs practitioners run, planned as today's RL frameworks configure training: the
distributed optimizer, recomputation, offload and uneven pipelines decide what fits."""

import copy
import dataclasses

import pytest

from hybridflow.layout import ParallelLayout
from hybridflow.plan import Plan
from hybridflow.planner.search import plan_job
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.costs import DoesNotFit
from hybridflow.simulator.job import Job
from hybridflow.simulator.predict import predict_plan
from hybridflow.simulator.profile import load_profile
from hybridflow.simulator.train_memory import stage_split
from hybridflow.simulator.training import train_cost

PIPELINE_TERMS = ("pp_bubble", "pp_p2p", "pp_imbalance")


def _layout_plan(job: Job, gpus: int, gpu: str, layout: dict, distopt: bool = True) -> Plan:
    """Every GPU role colocated on `gpus` with the same train/infer layout."""
    lay = {r: {"infer": layout} for r in job.gpu_roles}
    lay["actor"] = {"train": layout, "generate": {"pp": 1, "tp": layout["tp"], "micro_dp": 1}}
    mem = {"actor": {"distributed_optimizer": distopt}}
    sets = [{"models": list(job.gpu_roles), "gpus": gpus, "layouts": lay, "memory": mem}]
    cluster = Cluster.from_gpus(gpu, gpus).to_dict()
    return Plan.from_dict({"version": 1, "cluster": cluster, "job": job.to_dict(), "sets": sets})


def test_llama_8b_grpo_trains_data_parallel_on_8_h100():
    """NeMo-RL's published Llama-3.1-8B GRPO run: 8 H100, data parallel."""
    job = Job.create("grpo", "llama-3.1-8b", 1024, 1024, 256, n_samples=4, reward="rule")
    for tp in (1, 2):
        layout = {"pp": 1, "tp": tp, "dp": 8 // tp}
        if tp == 1:  # the whole model per GPU: Adam sharded, activations recomputed
            plan = _layout_plan(job, 8, "h100-80gb", layout)
            d = plan.to_dict()
            d["sets"][0]["memory"]["actor"]["recompute"] = "full"
            plan = Plan.from_dict(d)
        else:
            plan = _layout_plan(job, 8, "h100-80gb", layout)
        assert predict_plan(plan).iteration_s > 0
    # without the distributed optimizer every rank would hold the whole fp32 Adam state
    with pytest.raises(DoesNotFit, match="needs"):
        predict_plan(_layout_plan(job, 8, "h100-80gb", {"pp": 1, "tp": 1, "dp": 8}, False))
    best = plan_job(Cluster.from_gpus("h100-80gb", 8), job)[0]
    train = best.set_of("actor").layout("actor")
    assert train.pp == 1 and train.tp <= 2  # the planner's own answer is data parallel too
    mem = best.set_of("actor").settings("actor")
    assert mem.distributed_optimizer or mem.fsdp


def test_70b_ppo_fits_16_a100_with_offload():
    """OpenRLHF's 16-GPU 70B PPO script (Adam offload)."""
    job = Job.create("ppo", "llama-3.1-70b", 1024, 1024, 256, mini_batches=4)
    cluster = Cluster.from_gpus("a100-80gb", 16)
    best = plan_job(cluster, job)[0]
    assert best.gpus == 16
    assert any(s.settings(r).offload for s in best.sets for r in s.memory)
    no_host = dataclasses.replace(load_profile("a100-80gb"), host_bandwidth=0.0)
    with pytest.raises(DoesNotFit, match="smallest GPU count"):
        plan_job(cluster, job, no_host)


def test_deepseek_v3_plans_on_256_h100():
    """61 layers: any pipeline degree, the stages uneven."""
    job = Job.create(
        "grpo", "deepseek-v3", 1024, 2048, 64, n_samples=4, mini_batches=4, reward="rule"
    )
    best = plan_job(Cluster.from_gpus("h100-80gb", 256), job)[0]
    assert best.gpus <= 256 and best.prediction["iteration_s"] > 0
    # a pipeline that does not divide 61 layers is costed, not refused
    spec, lay = job.spec("actor"), ParallelLayout(pp=16, tp=8, dp=2, ep=2)
    split = stage_split(spec, 16)
    assert sum(split) == 61 and split[-1] < split[1]  # the LM head's stage gets fewer
    terms = train_cost(job, "actor", lay, load_profile("h100-80gb"), 8).as_dict()
    assert terms["pp_bubble"] > 0 and terms["pp_imbalance"] >= 0


@pytest.mark.parametrize("model", ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b"])
@pytest.mark.parametrize("gpus", [8, 16, 64])
def test_small_models_pipeline_only_where_it_is_faster(model, gpus):
    """A model of 3B or less gets pipeline parallelism on 64 GPUs or fewer only where the
    simulator shows it faster, term by term: the same plan with pp folded into dp is slower,
    by more in its data-parallel terms than the pipeline's own terms cost."""
    job = Job.create("ppo", model, 1024, 1024, 256, mini_batches=4)
    best = plan_job(Cluster.from_gpus("h100-80gb", gpus), job)[0]
    d = best.to_dict()
    d.pop("predicted")
    piped = False
    for s in d["sets"]:
        for lay in s["layouts"].values():
            for kind, v in lay.items():
                if kind != "generate" and v["pp"] > 1:
                    piped = True
                    v["dp"], v["pp"] = v["dp"] * v["pp"], 1
            if "generate" in lay:
                lay["generate"].update(pp=1, micro_dp=lay["train"]["tp"] // lay["generate"]["tp"])
    if not piped:
        return
    pp_pred = predict_plan(best)
    flat = predict_plan(Plan.from_dict(copy.deepcopy(d)))
    assert flat.iteration_s > pp_pred.iteration_s
    a, b = pp_pred.to_dict()["terms"], flat.to_dict()["terms"]
    pipeline_cost = sum(a[r][st].get(t, 0.0) for r in a for st in a[r] for t in PIPELINE_TERMS)
    dp_saving = sum(
        b[r][st].get("dp_grad_sync", 0.0) - a[r][st].get("dp_grad_sync", 0.0)
        for r in a
        for st in a[r]
    )
    assert dp_saving > pipeline_cost
