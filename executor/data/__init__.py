"""A user's job's inputs: prompt files and reward rules."""
