"""Auto-mapping planner: placements x CP-SAT GPU allocation x best layouts -> plan.json."""
from planner.plan import Plan, PlanError
from planner.search import Planner, plan_job, standard_placements

__all__ = ["Plan", "PlanError", "Planner", "plan_job", "standard_placements"]
