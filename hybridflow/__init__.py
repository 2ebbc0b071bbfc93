"""HybridFlow: an RLHF placement planner and executor (arXiv 2409.19256).

The installed package ``hybridflow`` maps onto the repository's top-level folders:

    hybridflow            hybridflow/   the shared vocabulary, layouts, plan schema, errors
    hybridflow.cli        hybridflow/cli/      the ``hybridflow`` command
    hybridflow.report     hybridflow/report/   code that writes reports/ (run and compare reports)
    hybridflow.simulator  simulator/    predicted seconds and memory, as named terms
    hybridflow.planner    planner/      the auto-mapping: placements x CP-SAT x layouts
    hybridflow.executor   executor/     Ray controller, engines, 3D-HybridEngine, RL loops
    hybridflow.profiles   profiles/     hardware profiles, shipped as package data

Data flows one way: profiles -> simulator -> planner -> plan.json -> executor -> run dir ->
report. The modules here import nothing of the packages below them but the simulator's nouns
(job, cluster) that a plan holds.
"""

__version__ = "0.1.0"
