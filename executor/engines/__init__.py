"""Per-rank engines: megatron-core training (with the CPU bridge), vLLM generation, weights."""
