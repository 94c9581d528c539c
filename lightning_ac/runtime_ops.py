"""The functions the compiled graphs call at run time.

The graph passes (:mod:`lightning_ac.graph_passes`) put calls to these into the captured joint
graph; the partitioned forward and backward modules then call them on every training step. They
are plain Python functions over tensors, so that they run the same in the profiler's
interpreter and in the compiled modules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["increment_counters", "replay_random", "save_rng_state", "update_running_stats"]


def update_running_stats(running_means: list[torch.Tensor], running_vars: list[torch.Tensor],
                         batch_means: list[torch.Tensor], batch_rstds: list[torch.Tensor],
                         momentum: float, eps: float, counts: list[int]) -> list[torch.Tensor]:
    """Update BatchNorm running statistics in place from the batch statistics of training-mode
    BatchNorms, all of them in a few kernels; returns the updated tensors.

    ``running = (1 - momentum) * running + momentum * batch``, with the batch variance rebuilt
    from the saved inverse standard deviation (``1 / rstd² - eps``, in float64) and made unbiased
    (``n / (n - 1)`` for ``n`` values per channel), as BatchNorm's own kernels update them. The
    variances of all BatchNorms are computed as one concatenated vector: per BatchNorm casts
    cost 310 small kernels and host calls a step on ResNet-152.
    """
    with torch.no_grad():
        torch._foreach_lerp_(running_means, [m.to(r.dtype) for m, r in
                                             zip(batch_means, running_means)], momentum)
        sizes = [r.numel() for r in batch_rstds]
        var = torch.cat([r.reshape(-1) for r in batch_rstds]).double().pow_(-2).sub_(eps)
        torch._foreach_mul_(list(var.split(sizes)), [n / max(n - 1, 1) for n in counts])
        dtypes = {r.dtype for r in running_vars}
        if len(dtypes) == 1:
            parts = list(var.to(dtypes.pop()).split(sizes))
        else:
            parts = [v.to(r.dtype) for v, r in zip(var.split(sizes), running_vars)]
        torch._foreach_lerp_(running_vars, parts, momentum)
    return [*running_means, *running_vars]


def increment_counters(counters: list[torch.Tensor]) -> list[torch.Tensor]:
    """Add one to every counter in place, in one kernel; returns them (the same tensors)."""
    with torch.no_grad():
        torch._foreach_add_(counters, 1)
    return counters


def save_rng_state(device: torch.device) -> torch.Tensor:
    """The state of ``device``'s default generator, as a CPU tensor (16 bytes on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


save_rng_state.reads_rng = True  # never recomputed: re-reading it later gives another state


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def replay_random(state: torch.Tensor, device: torch.device, op: Callable, *args,
                  replay: bool = False, **kwargs):
    """Run the random ``op``; with ``replay``, draw what it drew when the generator was at
    ``state``, and leave the generator where it was.

    In forward ``replay`` is False: the node runs right after :func:`save_rng_state` read the
    generator, so it draws what eager draws and moves the generator on as eager does. Backward's
    copies (recomputation, see :func:`use_replays`) set ``replay`` and so rebuild the same values
    (dropout masks, SDPA's philox seed and offset) without touching the generator's sequence.
    """
    if not replay:
        return op(*args, **kwargs)
    current = save_rng_state(device)  # only this device's generator: the op draws from it
    _set_rng_state(device, state)
    try:
        return op(*args, **kwargs)
    finally:
        _set_rng_state(device, current)
