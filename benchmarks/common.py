"""What the benchmark scripts share: a workload's step, rewritten by a plan at a chosen budget."""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from lightning_ac import _torch_compat as compat
from lightning_ac.callback import parse_budget
from lightning_ac.planner import plan
from lightning_ac.profiler import profile_joint
from lightning_ac.rewriter import compile_with_plan

PRECISIONS = ("32-true", "bf16-mixed")
"""Lightning's names for the precisions the benchmarks run."""

SWAP_MODES = {"on": [True], "off": [False], "both": [True, False]}
"""A benchmark's ``--swap`` choice → the planner's ``swap`` settings to run, in order."""


def workload_parser(doc: str | None, model: str, batch_size: int,
                    formatter=argparse.RawDescriptionHelpFormatter) -> argparse.ArgumentParser:
    """A benchmark's argument parser with the workload options they all take: ``--model``,
    ``--batch-size`` and ``--seq-len`` (BERT), with this benchmark's defaults."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=formatter)
    ap.add_argument("--model", default=model)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--seq-len", type=int, default=512)
    return ap


def planned_step(workload, optimizer: torch.optim.Optimizer, budget: str | int | None = None,
                 share: float = 0.5, made: dict | None = None, swap: bool = True) -> Callable:
    """``workload.loss`` compiled so that its first call captures, profiles and plans the step.

    The plan's budget is ``budget`` or, when that is None, ``share`` of the way from the plan's
    floor (everything recomputable dropped) to the un-checkpointed peak, so that something is
    always recomputed; ``swap=False`` plans recomputation only. The plan and the profile land in
    ``made`` (keys ``plan``, ``profile``).
    """
    made = {} if made is None else made

    def make_plan(joint):
        with compat.real_tensor_mode():
            prof = profile_joint(joint, optimizer)
        if budget is not None:
            target = parse_budget(budget)
        else:
            floor = plan(prof, 1).predicted_peak_B
            target = int(floor + share * (prof.peak_bytes - floor))
        made["plan"], made["profile"] = plan(prof, target, swap=swap), prof
        return made["plan"]

    return compile_with_plan(workload.loss, workload.model, make_plan)


def with_precision(fn: Callable, device: torch.device, precision: str) -> Callable:
    """``fn`` run under ``precision`` (one of :data:`PRECISIONS`): bf16 autocast for
    ``bf16-mixed``, as Lightning's ``precision="bf16-mixed"`` does."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "32-true":
        return fn

    def step(*inputs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(*inputs)

    return step


@contextmanager
def gc_pauses() -> Iterator[dict]:
    """Count Python's garbage collections inside the block and time them, by generation:
    ``{"collections": [gen0, gen1, gen2], "ms": [...]}`` (filled when the block ends). A
    collection holds the host up; on a step whose host side has little lead, the GPU waits."""
    stats = {"collections": [0, 0, 0], "ms": [0.0, 0.0, 0.0]}
    started: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            gen = info["generation"]
            stats["collections"][gen] += 1
            stats["ms"][gen] += (time.perf_counter() - started.pop()) * 1e3

    gc.callbacks.append(callback)
    try:
        yield stats
    finally:
        gc.callbacks.remove(callback)
        stats["ms"] = [round(x, 2) for x in stats["ms"]]
