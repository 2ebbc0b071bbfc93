"""RL on the worker groups: algorithm math, losses, the RL worker, one loop per algorithm."""
