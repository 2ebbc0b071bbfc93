"""The run driver: a plan's job run for some iterations into a run directory."""
