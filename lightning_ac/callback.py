"""``MuTwoAC``: automatic activation checkpointing as a one-line Lightning callback."""

from __future__ import annotations

import functools
import gc
import re
import statistics
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_ac import _torch_compat as compat
from lightning_ac.capture import (
    JointGraph,
    describe_capture_failure,
    unwrap_compile_error,
)
from lightning_ac.measure import peak_memory_B
from lightning_ac.planner import Plan, plan
from lightning_ac.profiler import NodeOutOfMemoryError, Profile, op_name, profile_joint
from lightning_ac.report import format_bytes
from lightning_ac.rewriter import compile_with_plan
from lightning_ac.simulator import peak_breakdown

__all__ = ["BudgetError", "MuTwoAC", "StepMonitor", "device_memory_limit", "parse_budget"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_BUDGET_FORMS = ('an int number of bytes, or a string such as "6GB", "5.5GiB", "800MB" '
                 '(GB = 10^9 bytes, GiB = 2^30), or None for the device\'s memory limit')


class BudgetError(RuntimeError):
    """The memory budget cannot be met even by recomputing every activation that can be."""


def parse_budget(budget: int | str | None) -> int | None:
    """Bytes of a budget given as an int, a string with a unit, or None (no explicit budget).

    Raises:
        MisconfigurationException: for anything else, or a budget that is not positive.
    """
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise MisconfigurationException(
            f"MuTwoAC(budget={budget!r}) is not a valid budget: expected {_BUDGET_FORMS}.")
    if isinstance(budget, int):
        value = budget
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", budget)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise MisconfigurationException(
                f"MuTwoAC(budget={budget!r}) is not a valid budget: expected {_BUDGET_FORMS}.")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise MisconfigurationException(
            f"MuTwoAC(budget={budget!r}) must be positive: expected {_BUDGET_FORMS}.")
    return value


def device_memory_limit(device: torch.device, margin: float = 0.05) -> int | None:
    """Bytes this process may allocate on ``device``, less a safety margin; None on the CPU.

    The smaller of the per-process memory fraction's share of the card and what the card has
    left once other processes' memory is taken out; ``margin`` leaves room for fragmentation
    (the allocator reserves more than it hands out).
    """
    if device.type != "cuda":
        return None
    # torch.cuda's getters want an index: a bare "cuda" is refused by some of them (torch 2.11)
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    others = max(0, (total - free) - torch.cuda.memory_reserved(index))
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = get_fraction(index) if get_fraction else 1.0
    return int(min(total * fraction, total - others) * (1.0 - margin))


class StepMonitor(Callback):
    """Measure training steps: peak memory and mean step time per epoch, logged under ``mutwo/``.

    Logged at the end of every training epoch (through the trainer's loggers):

    - ``mutwo/peak_memory_B``: the allocator's peak of active bytes over the epoch's measured
      training steps (:func:`lightning_ac.measure.peak_memory_B`; CUDA only)
    - ``mutwo/step_time_ms``: mean time from batch start to batch end (CUDA events on GPU, read
      at epoch end so that no step waits for the GPU); ``mutwo/step_time_median_ms``: its median;
      ``mutwo/measured_steps``: how many steps they cover

    The first ``warmup_steps`` steps of each fit are left out (allocator growth, cuDNN and
    cuBLAS set-up). ``last_epoch`` holds the figures of the last epoch. Subclasses leave more
    steps out by returning False from :meth:`measure_this_step`.

    Args:
        warmup_steps: steps at the start of each fit that are not measured.
    """

    def __init__(self, warmup_steps: int = 1) -> None:
        super().__init__()
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise MisconfigurationException(
                f"StepMonitor(warmup_steps={warmup_steps!r}) must be a non-negative int.")
        self.warmup_steps = warmup_steps
        self._steps_seen = 0
        self._step_start: Any = None
        self._measuring = False
        self._step_ms: list[float] = []
        self._step_events: list = []
        self._epoch_peak = 0
        self.last_epoch: dict[str, float] = {}

    def measure_this_step(self) -> bool:
        return self._steps_seen > self.warmup_steps

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._steps_seen = 0

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._step_ms, self._step_events, self._epoch_peak = [], [], 0

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._steps_seen += 1
        self._measuring = self.measure_this_step()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            self._step_start = torch.cuda.Event(enable_timing=True)
            self._step_start.record()
        else:
            self._step_start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self._measuring or self._step_start is None:
            return
        if pl_module.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._step_events.append((self._step_start, end))  # read at epoch end: no sync here
            self._epoch_peak = max(self._epoch_peak, peak_memory_B(pl_module.device))
        else:
            self._step_ms.append((time.perf_counter() - self._step_start) * 1e3)

    def epoch_metrics(self) -> dict[str, float]:
        """The epoch's figures so far (waits for the GPU once)."""
        if self._step_events:
            self._step_events[-1][1].synchronize()
            self._step_ms += [s.elapsed_time(e) for s, e in self._step_events]
            self._step_events = []
        metrics = {}
        if self._step_ms:
            metrics["mutwo/step_time_ms"] = sum(self._step_ms) / len(self._step_ms)
            metrics["mutwo/step_time_median_ms"] = statistics.median(self._step_ms)
            metrics["mutwo/measured_steps"] = float(len(self._step_ms))
        if self._epoch_peak:
            metrics["mutwo/peak_memory_B"] = float(self._epoch_peak)
        return metrics

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.last_epoch = self.epoch_metrics()
        if self.last_epoch:
            pl_module.log_dict(self.last_epoch, on_step=False, on_epoch=True, sync_dist=False)


class MuTwoAC(StepMonitor):
    r"""Train within a memory budget by keeping activations in host memory between forward and
    backward where the copies hide behind compute, and recomputing the cheapest of the rest.

    On the first training step the module's forward and backward are captured as one aten graph,
    every node is profiled on the device (with the optimizer step), the μ-TWO planner picks the
    activations to swap and to recompute so that the simulated peak of the whole step is within
    ``budget``, and the module's forward is replaced by the rewritten graph. Validation, test and predict
    (and any call without gradients) use the original forward. ``state_dict()`` and the
    parameters are untouched.

    Args:
        budget: peak memory of a training step, in bytes (int) or as a string with a unit:
            ``"6GB"``, ``"5.5GiB"``, ``"800MB"`` (GB = 10^9 bytes, GiB = 2^30). ``None``: the
            device's limit (see :func:`device_memory_limit`); on the CPU there is none, so AC
            turns itself off.
        margin: share of the device limit left free when ``budget`` is None.
        verbose: print the plan summary.
        warmup_steps: steps after the planning step left out of the step figures (the
            planning step always is).
        host_swap: how the first step is profiled. ``"auto"``: on the device, and if that runs
            out of memory (a batch that only fits with AC), again with every activation moved
            to pinned host memory between its last forward and first backward use. ``True``:
            always swap; ``False``: never.
        swap: let the plan keep activations in pinned host memory between forward and backward
            (copied on side streams, only where the copies hide behind compute); ``False``:
            recompute only.

    Logged at the end of every training epoch (through the trainer's loggers):

    - ``mutwo/peak_memory_B``, ``mutwo/step_time_ms``: as :class:`StepMonitor`, the planning
      step left out
    - ``mutwo/predicted_peak_B``: the plan's simulated peak
    - ``mutwo/recomputed_B``: bytes of the activations recomputed
    - ``mutwo/swapped_B``: bytes of the activations kept in host memory
    - ``mutwo/recompute_overhead_ms``: predicted time added to each step by recomputation (and
      by waiting for copies back, if any)
    - ``mutwo/active``: 1 while the rewritten forward is in use, 0 otherwise

    Raises:
        MisconfigurationException: for an invalid ``budget`` or ``margin``.
        BudgetError: on the first step, if no plan reaches the budget; the message gives the
            smallest peak found and what it consists of.

    Warns once, at the end of an epoch whose measured peak went over the budget (memory the
    profile did not see), with the budget that would have kept it within.
    """

    def __init__(self, budget: int | str | None = None, *, margin: float = 0.05,
                 verbose: bool = True, warmup_steps: int = 1,
                 host_swap: bool | str = "auto", swap: bool = True) -> None:
        super().__init__(warmup_steps=warmup_steps)
        self.budget_B = parse_budget(budget)
        if not isinstance(swap, bool):
            raise MisconfigurationException(f"MuTwoAC(swap={swap!r}) must be True or False.")
        self.swap = swap
        if host_swap not in (True, False, "auto"):
            raise MisconfigurationException(
                f"MuTwoAC(host_swap={host_swap!r}) must be True, False or \"auto\".")
        self.host_swap = host_swap
        if not 0.0 <= margin < 1.0:
            raise MisconfigurationException(
                f"MuTwoAC(margin={margin!r}) must be in [0, 1): the share of the device limit "
                "kept free.")
        self.margin = margin
        self.verbose = verbose
        self.plan: Plan | None = None
        self.profile: Profile | None = None
        self.state = "idle"
        """``idle`` (not installed yet), ``planning`` (first step), ``active``, ``off`` (the step
        fits, or capture failed). It keeps its value after fit."""
        self._module: LightningModule | None = None
        self._planned_shapes: tuple | None = None
        self._planning_step = 0
        self._over_budget_warned = False
        self._unplanned_shape_warned = False

    # -- installing the rewritten forward ------------------------------------------------------

    def _budget_for(self, device: torch.device) -> int | None:
        return self.budget_B if self.budget_B is not None else \
            device_memory_limit(device, self.margin)

    def _profile(self, joint: JointGraph, optimizer, device: torch.device,
                 previous_grads: str) -> Profile:
        """Profile the captured step, with host swap if so configured or if it does not fit."""
        profile = functools.partial(profile_joint, joint, optimizer, previous_grads=previous_grads)
        if self.host_swap != "auto":
            return profile(swap=bool(self.host_swap))
        try:
            return profile(swap=False)
        except torch.cuda.OutOfMemoryError:
            pass  # leave the except block first, so that the failed attempt's tensors are freed
        gc.collect()
        torch.cuda.empty_cache()
        rank_zero_info("MuTwoAC: the step does not fit un-checkpointed; profiling it again with "
                       "activations swapped to host memory")
        try:
            return profile(swap=True)
        except torch.cuda.OutOfMemoryError as exc:
            # Every activation was on the host: what did not fit is one op's own inputs,
            # outputs and scratch space (a logits matrix over a large vocabulary, say). No plan
            # can help; say so instead of an out-of-memory error from inside the profiler.
            where = f" {exc.node.name} ({op_name(exc.node)}, outputs of " \
                f"{format_bytes(exc.out_B)})" if \
                isinstance(exc, NodeOutOfMemoryError) else " one op"
            limit = device_memory_limit(device, 0.0)
            raise BudgetError(
                "MuTwoAC cannot run this step on the device even with every activation swapped "
                f"to host memory:{where} needs more than is free next to the parameters and "
                "optimizer state" + (f" (device limit {format_bytes(limit)})" if limit else "")
                + ". Lower the batch size.\n" + str(exc).splitlines()[0]) from None

    def _make_plan(self, trainer: Trainer, device: torch.device, joint: JointGraph) -> Plan:
        t0 = time.perf_counter()
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        # the joint graph already holds the casts autocast chose; running it under autocast again
        # would cast twice
        with compat.real_tensor_mode(), torch.autocast(device.type, enabled=False):
            profile = self._profile(joint, optimizer, device, _previous_grads(trainer))
        # The profile stays readable on the callback; the tensors it was captured on (parameters,
        # and the first batch, which would otherwise stay allocated) are not needed any more.
        joint.primal_values = []
        if device.type == "cuda":
            # The profile's blocks (and a failed un-swapped attempt's) are cached in a layout
            # the training step does not share; left there they fragment its memory (BERT-base
            # b32 under a 16 GB cap ran out with 2.2 GiB reserved but unallocated).
            gc.collect()
            torch.cuda.empty_cache()
        budget = self._budget_for(device)
        result = plan(profile, budget, swap=self.swap)
        result.planning_s = time.perf_counter() - t0
        self.plan, self.profile = result, profile
        if result.stop_reason == "infeasible":
            parts = peak_breakdown(profile, result.recomputed, result.swapped)
            raise BudgetError(
                f"MuTwoAC cannot meet the budget of {format_bytes(budget)}: the smallest peak "
                f"the planner reaches is {format_bytes(result.predicted_peak_B)} ("
                + ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in parts.items())
                + f") with {len(result.recomputed)} activations recomputed and "
                f"{len(result.swapped)} kept in host memory. Raise the budget, "
                "lower the batch size, or use an optimizer with less state.")
        return result

    def _install(self, trainer: Trainer, module: LightningModule) -> None:
        original = module.forward
        device = module.device
        compiled = compile_with_plan(original, module,
                                     lambda joint: self._make_plan(trainer, device, joint))
        callback = self

        def forward(*args, **kwargs):
            if callback.state in ("planning", "active") and module.training and \
                    torch.is_grad_enabled():
                shapes = _shapes(args, kwargs)
                if callback.state == "active" and shapes != callback._planned_shapes:
                    callback._warn_unplanned_shape(shapes)
                    return original(*args, **kwargs)  # another shape (last batch): plain eager
                try:
                    out = compiled(*args, **kwargs)
                except torch.cuda.OutOfMemoryError as exc:
                    if callback.state != "active":
                        raise
                    raise torch.cuda.OutOfMemoryError(
                        f"{exc}\n{callback._out_of_memory_hint(device)}") from exc
                except Exception as exc:
                    if callback.state != "planning":
                        raise
                    budget_error = unwrap_compile_error(exc, (BudgetError,))
                    if budget_error is not None:
                        raise budget_error from None
                    callback.state = "off"
                    rank_zero_warn(f"MuTwoAC: {describe_capture_failure(original, exc)}\n"
                                   "Training continues without activation checkpointing.")
                    return original(*args, **kwargs)
                if callback.state == "planning":
                    callback._planned_shapes = shapes
                    callback._announce(device)
                return out
            return original(*args, **kwargs)

        module.forward = forward
        self._module = module
        self.state = "planning"

    def _warn_unplanned_shape(self, shapes: tuple) -> None:
        """Say once that a batch of another shape than the planned one runs without AC: its peak
        is not planned, and a batch only a little smaller than the planned one can still go
        over the budget without checkpointing."""
        if self._unplanned_shape_warned:
            return
        self._unplanned_shape_warned = True
        rank_zero_warn(
            f"MuTwoAC: a batch with inputs shaped {_describe(shapes)} runs without activation "
            f"checkpointing: the step was planned for {_describe(self._planned_shapes)}. Its peak "
            "memory is not planned and may go over the budget; to keep every step planned, give "
            "every batch one shape (DataLoader(drop_last=True), padding to a fixed length).")

    def _out_of_memory_hint(self, device: torch.device) -> str:
        """What the plan expected, and what to try, for an out-of-memory error in its step."""
        p = self.plan
        hint = (f"MuTwoAC: this step was planned for {format_bytes(p.predicted_peak_B)} under a "
                f"budget of {format_bytes(p.budget_B)}.")
        if device.type == "cuda":
            idle = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            hint += (f" The allocator holds {format_bytes(idle)} reserved but unallocated: if "
                     "that is large, memory is fragmented; set "
                     "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before CUDA starts.")
        return hint + " Otherwise lower the budget (MuTwoAC(budget=...)) or the batch size."

    def _announce(self, device: torch.device) -> None:
        p = self.plan
        if p is None:
            return
        if p.stop_reason == "already fits":
            self.state = "off"
            limit = "no limit on the CPU" if p.budget_B is None else \
                f"the budget of {format_bytes(p.budget_B)}"
            rank_zero_info(f"MuTwoAC: the step already fits ({format_bytes(p.baseline_peak_B)} "
                           f"peak, {limit}); activation checkpointing is off.")
            return
        self.state = "active"
        if self.verbose:
            rank_zero_info(f"MuTwoAC: {p.summary()}")

    def _restore(self) -> None:
        if self._module is not None and "forward" in self._module.__dict__:
            del self._module.forward
        self._module = None

    # -- Lightning hooks -------------------------------------------------------------------------

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._module is None and self.state != "off":  # first step of this fit
            self._install(trainer, pl_module)
            self._planning_step = self._steps_seen + 1  # the step about to run
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def measure_this_step(self) -> bool:
        # The planning step profiles the whole graph: not a training step's figure. The warm-up
        # steps count from the step after it, which starts on an emptied allocator cache (and,
        # when the step fits, is the first eager step).
        return self.state != "planning" and \
            self._steps_seen - self._planning_step > self.warmup_steps

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = self.epoch_metrics()
        metrics["mutwo/active"] = float(self.state == "active")
        if self.plan is not None:
            active = self.state == "active"
            metrics.update({
                "mutwo/predicted_peak_B": float(self.plan.predicted_peak_B),
                "mutwo/recomputed_B": float(self.plan.recomputed_B if active else 0),
                "mutwo/swapped_B": float(self.plan.swapped_B if active else 0),
                "mutwo/recompute_overhead_ms": float(self.plan.predicted_extra_ms if active else 0),
            })
        self.last_epoch = metrics
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False)
        self._check_budget(metrics.get("mutwo/peak_memory_B"))

    def _check_budget(self, peak_B: float | None) -> None:
        """Warn once if a measured peak went over the budget: the plan is not corrected during
        training, so the user has to lower the budget to get what was asked for."""
        p = self.plan
        if self._over_budget_warned or self.state != "active" or p is None or not peak_B \
                or p.budget_B is None or peak_B <= p.budget_B:
            return
        self._over_budget_warned = True
        over = int(peak_B) - p.budget_B
        rank_zero_warn(
            f"MuTwoAC: the measured peak {format_bytes(peak_B)} is over the budget of "
            f"{format_bytes(p.budget_B)} by {format_bytes(over)} (planned "
            f"{format_bytes(p.predicted_peak_B)}): the step uses memory the profile did not see. "
            f"For a peak within the budget, pass one lower by that much: "
            f"MuTwoAC(budget={p.budget_B - over})."
        )

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()  # the state stays readable after fit; a later fit plans again

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"budget_B": self.budget_B}


def _previous_grads(trainer: Trainer) -> str:
    """How long last step's gradients stay allocated in this training loop.

    Lightning's loops (automatic optimization, and the usual manual pattern
    ``opt.zero_grad(); self.manual_backward(loss)``) zero the gradients after ``training_step``,
    just before backward: the previous step's gradients are live through the forward pass, and
    a plan whose peak falls in forward must count them (a ResNet-152 b128 recipe run under a
    16 GB cap peaked 0.29 GiB above a prediction that left out its 0.21 GiB of gradients). With
    gradient accumulation they live through the whole step.
    """
    return "through_step" if trainer.accumulate_grad_batches > 1 else "until_backward"


def _shapes(args, kwargs) -> tuple:
    def shape(v):
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    return tuple(shape(a) for a in args) + tuple((k, shape(v)) for k, v in sorted(kwargs.items()))


def _describe(shapes: tuple) -> str:
    """The tensor shapes in a :func:`_shapes` key, for a message: "[8, 3, 32, 32], mask=[8, 64]"."""
    parts = []
    for s in shapes:
        if s and isinstance(s[0], str):  # a keyword argument: (name, shape or None)
            if s[1] is not None:
                parts.append(f"{s[0]}={list(s[1])}")
        elif s is not None:
            parts.append(str(list(s)))
    return ", ".join(parts)
