"""The executor: runs a plan on a Ray cluster and measures it.

- ``controller``: the Ray single controller (cluster and resource pools, worker groups,
  transfer protocols, the Batch the controller moves);
- ``engines``: per-rank engines (megatron-core training with its CPU bridge, vLLM generation,
  weight conversion between megatron, Hugging Face and vLLM);
- ``hybrid_engine``: the 3D-HybridEngine that moves the actor between its training and
  generation layouts;
- ``rl``: RL math, losses, the RL worker and the controller's loop per algorithm;
- ``task``: the built-in task (rules, tokenizer, SFT actor, reward and cost models);
- ``run``: the run driver (run directory, checkpoints, summary) and its settings;
- ``profiler``: what ``hybridflow profile`` measures.
"""
