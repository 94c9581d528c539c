"""``MuTwoAC``: automatic activation checkpointing as a one-line Lightning callback."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_ac.errors import BudgetError
from lightning_ac.install import (
    MAX_SHAPES,
    AutoCheckpoint,
    State,
    auto_checkpoint,
    device_memory_limit,
    parse_budget,
    validate_options,
)
from lightning_ac.measure import peak_memory_B
from lightning_ac.planner import Plan
from lightning_ac.profiler import Profile

__all__ = ["BudgetError", "MuTwoAC", "StepMonitor", "device_memory_limit", "parse_budget"]


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
        self.last_step_peak_B: int | None = None
        """The allocator's peak over the last training step (CUDA; None elsewhere)."""
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
        cuda = pl_module.device.type == "cuda"
        self.last_step_peak_B = peak_memory_B(pl_module.device) if cuda else None
        if not self._measuring or self._step_start is None:
            return
        if cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._step_events.append((self._step_start, end))  # read at epoch end: no sync here
            self._epoch_peak = max(self._epoch_peak, self.last_step_peak_B)
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
            _log(trainer, pl_module, self.last_epoch)


class MuTwoAC(StepMonitor):
    r"""Train within a memory budget by keeping activations in host memory between forward and
    backward where the copies hide behind compute, and recomputing the cheapest of the rest.

    On the first training step the module's forward and backward are captured as one aten graph,
    every node is profiled on the device (with the optimizer step), the μ-TWO planner picks the
    activations to swap and to recompute so that the simulated peak of the whole step is within
    ``budget``, and the module's forward is replaced by the rewritten graph
    (:func:`lightning_ac.auto_checkpoint` does this; the callback drives it from Lightning's
    hooks). Validation, test and predict (and any call without gradients) use the original
    forward. ``state_dict()`` and the parameters are untouched.

    Under DDP (``strategy="ddp"``) the budget is per rank: each rank's step must fit in it on its
    own device. Each rank profiles its step; after the first step every rank runs rank 0's plan
    (one graph; a step split into several graphs keeps each rank's own), and the logged figures
    are the maximum over the ranks. Under FSDP (``FSDPStrategy``, or ``ModelParallelStrategy``
    with ``fully_shard``) the budget is per rank too, each rank counting its own shards, and each
    rank plans the graphs between FSDP's gathering hooks as its own step.

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
        plan_new_shapes: plan each new set of input shapes (another sequence length, the last
            smaller batch) at its first step; ``False``: such batches run without AC, with a
            warning.
        max_shapes: plans kept at once (the least recently used goes beyond that).
        dynamic_shapes: once batches differ only in some sizes (sequence length, the last short
            batch), trace the step with those sizes dynamic and plan it once for the largest
            seen: later sizes need no new capture or profile. ``False``: plan each shape alone.
        kernels: ``"eager"``: the planned step runs op by op on eager kernels; ``"inductor"``:
            its forward and backward are compiled by inductor (fused kernels) with the plan's
            swaps, recomputation and order kept (steps traced with dynamic sizes stay op by op).

    Logged at the end of every training epoch (through the trainer's loggers):

    - ``mutwo/peak_memory_B``, ``mutwo/step_time_ms``, ``mutwo/step_time_median_ms``,
      ``mutwo/measured_steps``: as :class:`StepMonitor`, the planning step left out
    - ``mutwo/budget_B``: the budget planned for, in bytes (absent without a limit);
      ``mutwo/peak_to_budget``: the measured peak over it (CUDA)
    - ``mutwo/replans``: re-plans so far, each after a step whose measured peak went over the
      budget; ``mutwo/excess_B``: the largest such excess in the epoch (0 if none)
    - ``mutwo/planned_shapes``: input shapes with a plan (each new shape is planned at its
      first step; the steps that plan are left out of the step figures)
    - ``mutwo/predicted_peak_B``: the plan's simulated peak
    - ``mutwo/recomputed_B``: bytes of the activations recomputed
    - ``mutwo/swapped_B``: bytes of the activations kept in host memory
    - ``mutwo/recompute_overhead_ms``: predicted time added to each step by recomputation (and
      by waiting for copies back, if any)
    - ``mutwo/active``: 1 while a rewritten step is in use (for any of the shapes planned), 0
      otherwise

    Raises:
        MisconfigurationException: for an invalid ``budget``, ``margin``, ``swap``,
            ``host_swap`` or ``warmup_steps``.
        BudgetError: on the first step, if no plan reaches the budget; the message gives the
            smallest peak found and what it consists of.

    After each step on CUDA the measured peak goes to :meth:`AutoCheckpoint.observe_peak`: a step
    over the budget (memory the profile did not see) makes it plan that shape again with the
    target lowered by the excess; it warns only if that cannot get within. Warns in ``setup`` if
    the strategy is one it cannot plan under yet (then it stays off).
    """

    def __init__(self, budget: int | str | None = None, *, margin: float = 0.05,
                 verbose: bool = True, warmup_steps: int = 1,
                 host_swap: bool | str = "auto", swap: bool = True, plan_new_shapes: bool = True,
                 max_shapes: int = MAX_SHAPES, dynamic_shapes: bool = True,
                 kernels: str = "eager") -> None:
        super().__init__(warmup_steps=warmup_steps)
        self.budget_B = parse_budget(budget)
        validate_options("MuTwoAC", swap=swap, host_swap=host_swap, margin=margin,
                         plan_new_shapes=plan_new_shapes, max_shapes=max_shapes,
                         dynamic_shapes=dynamic_shapes, kernels=kernels)
        self.kernels = kernels
        self.plan_new_shapes, self.max_shapes = plan_new_shapes, max_shapes
        self.dynamic_shapes = dynamic_shapes
        self.swap, self.host_swap, self.margin = swap, host_swap, margin
        self.verbose = verbose
        self.ac: AutoCheckpoint | None = None
        """The planned step of the current (or last) fit."""
        self._disabled: str | None = None  # why setup() turned the callback off for this fit
        self._final_state: State | None = None  # the state when the fit ended
        self._planning_step = 0
        self._epoch_excess = 0
        self._shared = False  # whether rank 0's plan went to every rank in this fit

    @property
    def state(self) -> State:
        """A :class:`~lightning_ac.State`: ``IDLE`` before the first training step of a fit,
        then the planned step's state. It keeps its value after fit."""
        if self._disabled is not None:
            return State.OFF
        if self._final_state is not None:
            return self._final_state
        return self.ac.state if self.ac is not None else State.IDLE

    @property
    def plan(self) -> Plan | None:
        """The plan of the current (or last) fit; None before its first training step."""
        return self.ac.plan if self.ac is not None else None

    @property
    def profile(self) -> Profile | None:
        """The profile the plan was made from."""
        return self.ac.profile if self.ac is not None else None

    # -- Lightning hooks -------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check, before the first batch, that this fit is one MuTwoAC can plan: on one device,
        under data parallelism (DDP), or under FSDP (``FSDPStrategy`` with its default
        ``use_orig_params=True``, or ``ModelParallelStrategy`` with ``fully_shard``: each rank
        plans its step, the gathering hooks running eagerly between its graphs); not under
        DeepSpeed."""
        self._disabled = None
        if stage != "fit":
            return
        strategy = trainer.strategy
        supported = isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, FSDPStrategy,
                                          ModelParallelStrategy)) and \
            not isinstance(strategy, DeepSpeedStrategy)
        if not supported:
            self._disabled = f"{type(strategy).__name__}"
            rank_zero_warn(
                f"MuTwoAC does not plan under {self._disabled} yet (its parameters are sharded "
                "and gathered per unit); training continues without activation checkpointing.")
        elif isinstance(strategy, FSDPStrategy) and \
                not getattr(strategy, "kwargs", {}).get("use_orig_params", True):
            # (dynamo cannot trace FSDP1's flat parameters without their original views)
            self._disabled = "FSDPStrategy(use_orig_params=False)"
            rank_zero_warn(
                "MuTwoAC plans under FSDPStrategy only with use_orig_params=True (its default): "
                "the step cannot be captured through flat parameters alone; training continues "
                "without activation checkpointing.")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.ac, self._final_state = None, None  # a new fit plans its own step (of another model?)
        self._shared = False
        if self._disabled is None and len(trainer.optimizers) > 1:
            rank_zero_warn(
                f"MuTwoAC: this fit has {len(trainer.optimizers)} optimizers; the plan counts "
                "the first one's step and state only.")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.ac is None and self._disabled is None:  # first step of this fit
            self.ac = auto_checkpoint(
                pl_module, trainer.optimizers[0] if trainer.optimizers else None,
                budget=self.budget_B, swap=self.swap, host_swap=self.host_swap,
                margin=self.margin, verbose=self.verbose,
                previous_grads=_previous_grads(trainer), plan_new_shapes=self.plan_new_shapes,
                max_shapes=self.max_shapes, dynamic_shapes=self.dynamic_shapes,
                kernels=self.kernels)
            self._planning_step = self._steps_seen + 1  # the step about to run
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def measure_this_step(self) -> bool:
        # The planning step profiles the whole graph: not a training step's figure. The warm-up
        # steps count from the step after it, which starts on an emptied allocator cache (and,
        # when the step fits, is the first eager step).
        return self.state is not State.PLANNING and \
            self._steps_seen - self._planning_step > self.warmup_steps

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        planned = self.ac is not None and self.ac.planned_last_call
        if planned:
            self._measuring = False  # a step that planned is the profiler's, not a training step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.ac is not None and not self._shared and trainer.world_size > 1:
            # Every rank ends its first step here, planned: rank 0's plan goes to all (a
            # collective that each rank calls exactly once per fit, so none waits for another).
            self._shared = True
            message = self.ac.plan_message() if trainer.is_global_zero else None
            self.ac.adopt(trainer.strategy.broadcast(message, src=0))
        if self.ac is not None and not planned and self.last_step_peak_B is not None:
            p = self.plan
            if p is not None and p.budget_B is not None and self.last_step_peak_B > p.budget_B:
                self._epoch_excess = max(self._epoch_excess, self.last_step_peak_B - p.budget_B)
            self.ac.observe_peak(self.last_step_peak_B)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._epoch_excess = 0

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = self.epoch_metrics()
        # (a shape that fits, such as a short last batch, does not make the whole fit inactive)
        active = self.state is State.ACTIVE or (self.ac is not None and self.ac.active
                                                and self._final_state is None)
        metrics["mutwo/active"] = float(active)
        if self.ac is not None:
            metrics["mutwo/replans"] = float(self.ac.replans)
            metrics["mutwo/excess_B"] = float(self._epoch_excess)
            metrics["mutwo/planned_shapes"] = float(len(self.ac.plans))
            last = self.ac.last
            if last is not None and last.plan is not None:  # how many graphs the step runs as
                metrics["mutwo/graphs"] = float(len(last.graphs.captured) if last.graphs else 1)
        if self.plan is not None:
            if self.plan.budget_B is not None:
                metrics["mutwo/budget_B"] = float(self.plan.budget_B)
                if "mutwo/peak_memory_B" in metrics:
                    metrics["mutwo/peak_to_budget"] = \
                        metrics["mutwo/peak_memory_B"] / self.plan.budget_B
            metrics.update({
                "mutwo/predicted_peak_B": float(self.plan.predicted_peak_B),
                "mutwo/recomputed_B": float(self.plan.recomputed_B if active else 0),
                "mutwo/swapped_B": float(self.plan.swapped_B if active else 0),
                "mutwo/recompute_overhead_ms": float(self.plan.predicted_extra_ms if active else 0),
            })
        self.last_epoch = metrics
        _log(trainer, pl_module, metrics)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # the original forward is back; the state and plan stay readable; a later fit plans again
        if self.ac is not None and self._final_state is None:
            self._final_state = self.ac.state
            self.ac.remove()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"budget_B": self.budget_B}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the budget a checkpoint was trained under (the plan is made anew on the first
        step after resuming: it depends on the device and the batch)."""
        budget = state_dict.get("budget_B")
        self.budget_B = parse_budget(budget)


def _log(trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float]) -> None:
    """Log the epoch's figures once. Over several ranks each is the maximum over the ranks: the
    peak that has to fit on every device, the slowest rank's step, which sets the pace. (Synced
    wherever a process group exists, as Lightning asks: DDP on one device has one, too.)"""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    pl_module.log_dict(metrics, on_step=False, on_epoch=True,
                       sync_dist=distributed or (trainer is not None and trainer.world_size > 1),
                       reduce_fx="max")


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
