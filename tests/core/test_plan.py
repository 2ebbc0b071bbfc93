"""plan.json: exact keys, round trip, validation on load."""

import copy
import json

import pytest

from hybridflow.layout import LayoutError
from hybridflow.plan import Plan, PlanError
from hybridflow.planner.search import plan_job
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job


@pytest.fixture(scope="module")
def plan() -> Plan:
    job = Job.create("ppo", "tiny", 64, 64, 8, mini_batches=2)
    return plan_job(Cluster("local-cpu", 1, 4), job)[0]


def test_keys_are_the_issue_format(plan):
    d = plan.to_dict()
    assert list(d) == ["version", "cluster", "job", "models", "sets", "predicted"]
    assert d["version"] == 1 and set(d["cluster"]) == {"gpu", "nodes", "gpus_per_node"}
    assert set(d["job"]) == {
        "algorithm",
        "models",
        "prompt_len",
        "response_len",
        "global_batch",
        "ppo_epochs",
        "mini_batches",
    }
    for s in d["sets"]:
        assert set(s) - {"memory"} == {"models", "gpus", "layouts"}
        trained = [r for r in s["models"] if r in ("actor", "critic")]
        assert sorted(s.get("memory", {})) == sorted(trained)
        for role, lay in s["layouts"].items():
            if role == "actor":
                assert set(lay) == {"train", "generate"} and set(lay["generate"]) == {
                    "pp",
                    "tp",
                    "micro_dp",
                }
            else:
                assert set(lay) == ({"train"} if role == "critic" else {"infer"})
    assert set(d["predicted"]) == {
        "iteration_s",
        "tokens_per_s",
        "stages",
        "terms",
        "peak_memory_gib",
    }
    assert set(d["predicted"]["stages"]) == {"generate", "prepare", "train", "reshard"}


def test_round_trip(plan, tmp_path):
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again == plan and again.to_dict() == plan.to_dict()
    assert json.loads(path.read_text()) == plan.to_dict()


def _broken(plan, edit):
    d = copy.deepcopy(plan.to_dict())
    edit(d)
    return d


@pytest.mark.parametrize(
    "edit,err,match",
    [
        (lambda d: d.update(version=2), PlanError, "version"),
        (lambda d: d.update(extra=1), PlanError, "expected keys"),
        (lambda d: d["sets"].append(d["sets"][0]), PlanError, "overlap|placed more than once"),
        (
            lambda d: d["sets"][0]["models"].append(
                next(r for r in ("critic", "actor") if r not in d["sets"][0]["models"])
            ),
            LayoutError,
            "layouts must name exactly",
        ),
        (lambda d: d["cluster"].update(nodes=0), ValueError, "nodes"),
        (lambda d: d["job"]["models"].pop("reward"), ValueError, "needs exactly the roles"),
        (lambda d: d["sets"][0].update(gpus=d["sets"][0]["gpus"] * 3), LayoutError, "uses"),
        (
            lambda d: next(s for s in d["sets"] if "actor" in s["models"])["layouts"]["actor"][
                "generate"
            ].update(tp=3),
            LayoutError,
            "generation",
        ),
    ],
)
def test_invalid_plans_are_refused(plan, edit, err, match):
    with pytest.raises(err, match=match):
        Plan.from_dict(_broken(plan, edit))


def test_more_gpus_than_the_cluster(plan):
    d = _broken(plan, lambda d: d["cluster"].update(gpus_per_node=1))
    with pytest.raises(PlanError, match="cluster has 1"):
        Plan.from_dict(d)


def test_load_errors(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(bad)
