"""Measure real training steps: the ground truth that profiles and plans are checked against."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["PhaseMemory", "StepMeasurement", "measure_phases", "measure_steps", "peak_memory_B",
           "saved_tensor_bytes", "train_step"]


def peak_memory_B(device: torch.device | str | None = None) -> int:
    """The CUDA caching allocator's peak of *active* bytes since the last peak reset.

    Active bytes are the allocated blocks plus the freed ones whose memory still waits for work
    on another stream (a block used there through ``record_stream``).
    ``torch.cuda.max_memory_allocated`` drops a block as soon as it is freed, so it leaves out
    memory that cannot be handed out yet; without such blocks the two are equal. (The swap ops
    free in stream order instead, see :mod:`lightning_ac.swapping`; this is what showed why.)
    """
    stats = torch.cuda.memory_stats(device)  # one call: it runs after every training step
    return int(stats.get("active_bytes.all.peak", stats.get("allocated_bytes.all.peak", 0)))


@dataclass
class StepMeasurement:
    """Peak memory and step time of ``steps`` measured training steps after warm-up."""

    peak_B: int | None
    """Peak memory over the measured steps (:func:`peak_memory_B`); None on CPU."""
    step_ms: float
    """Median step time (CUDA events on GPU, ``perf_counter`` on CPU)."""
    step_ms_all: list[float]


def train_step(loss_fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
               optimizer: torch.optim.Optimizer) -> None:
    """One plain training step: zero the gradients (to None), forward, backward, optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss_fn(*inputs).backward()
    optimizer.step()


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
        train_step(loss_fn, inputs, optimizer)

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
    peak = peak_memory_B(device) if cuda else None
    optimizer.zero_grad(set_to_none=True)
    return StepMeasurement(peak_B=peak, step_ms=statistics.median(times), step_ms_all=times)


@dataclass
class PhaseMemory:
    """Memory of one eager step, phase by phase (bytes; allocator figures are None on CPU)."""

    saved_B: int
    """Bytes autograd saves for backward, storages counted once, parameters left out."""
    after_forward_B: int | None
    forward_peak_B: int | None
    backward_peak_B: int | None
    optimizer_peak_B: int | None


def saved_tensor_bytes(loss_fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                       exclude: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, int]:
    """Run ``loss_fn(*inputs)`` and count the bytes autograd saves for backward.

    Counts each storage once (views share it) and leaves out the storages of ``exclude``
    (parameters: they are alive anyway). Returns the loss, so that backward can follow.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(*inputs)
    return loss, sum(seen.values())


def measure_phases(loss_fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                   optimizer: torch.optim.Optimizer) -> PhaseMemory:
    """One eager training step, with the allocator's peak read after each phase.

    Like :func:`measure_steps`, this trains the model by one step.
    """
    device = inputs[0].device
    cuda = device.type == "cuda"
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def peak_since_last():
        if not cuda:
            return None
        torch.cuda.synchronize(device)
        peak = peak_memory_B(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak

    optimizer.zero_grad(set_to_none=True)
    peak_since_last()
    loss, saved = saved_tensor_bytes(loss_fn, inputs, exclude=params)
    fwd = peak_since_last()
    after_fwd = torch.cuda.memory_allocated(device) if cuda else None
    loss.backward()
    del loss
    bwd = peak_since_last()
    optimizer.step()
    opt = peak_since_last()
    optimizer.zero_grad(set_to_none=True)
    return PhaseMemory(saved_B=saved, after_forward_B=after_fwd, forward_peak_B=fwd,
                       backward_peak_B=bwd, optimizer_peak_B=opt)
