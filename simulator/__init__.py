"""Cost simulator: predicted seconds and memory of RLHF stages as sums of named terms.

It knows models, layouts and profiles; nothing of Ray, CP-SAT or torch.
"""
