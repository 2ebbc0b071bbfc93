"""The Ray single controller: resource pools, worker groups of SPMD ranks, transfer protocols."""
