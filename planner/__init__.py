"""Auto-mapping planner: placements x CP-SAT GPU allocation x best layouts -> plan.json.

It knows the simulator's predictions and CP-SAT; nothing of Ray or torch.
"""
