"""Measuring code of `hybridflow profile`: operator, collective, vLLM and train-layer tables
(ops, collectives, vllm_steps, train_layer), the run over a machine (machine) and the YAML
profile in the simulator's format (writer)."""
