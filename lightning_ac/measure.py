"""Measure real training steps: the ground truth that profiles and plans are checked against."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["StepMeasurement", "measure_steps"]


@dataclass
class StepMeasurement:
    """Peak memory and step time of ``steps`` measured training steps after warm-up."""

    peak_B: int | None
    """``torch.cuda.max_memory_allocated`` over the measured steps; None on CPU."""
    step_ms: float
    """Median step time (CUDA events on GPU, ``perf_counter`` on CPU)."""
    step_ms_all: list[float]


def measure_steps(loss_fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                  optimizer: torch.optim.Optimizer, *, steps: int = 5,
                  warmup: int = 2) -> StepMeasurement:
    """Run ``warmup + steps`` plain training steps (zero_grad, forward, backward, step).

    This trains the model: call it on a copy, or after everything that must see the initial
    weights. The warm-up steps create the optimizer state, so the measured steps are steady
    state, as the profile assumes.
    """
    device = inputs[0].device
    cuda = device.type == "cuda"

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(*inputs).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    times = []
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    optimizer.zero_grad(set_to_none=True)
    return StepMeasurement(peak_B=peak, step_ms=statistics.median(times), step_ms_all=times)
