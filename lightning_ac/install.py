"""Put a plan in place: the one public path from a model (or a step function) to a planned step.

:func:`auto_checkpoint` compiles the target so that its first training call runs the whole
pipeline: capture the step (:mod:`~lightning_ac.capture`), profile it on the device together
with the optimizer step (:mod:`~lightning_ac.profiler`), plan it under the budget
(:mod:`~lightning_ac.planner`) and partition the same graph by the plan
(:mod:`~lightning_ac.rewriter`). Later training calls run the rewritten graphs. A step that
dynamo splits into several graphs (graph breaks, ``nn.LSTM``, FSDP2's hooks) is captured at its
first call and planned as one step at its second (:mod:`~lightning_ac.step_graphs`). The returned
:class:`AutoCheckpoint` shows the plan and puts the original forward back with
:meth:`~AutoCheckpoint.remove`.

The Lightning callback (:class:`~lightning_ac.callback.MuTwoAC`) and every benchmark go through
here; plain PyTorch and Fabric users call it themselves::

    ac = auto_checkpoint(model, optimizer, budget="6GB")
    for x, y in loader:                     # train as usual
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    print(ac.plan.summary())
    ac.remove()
"""

from __future__ import annotations

import enum
import functools
import gc
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_ac import _torch_compat as compat
from lightning_ac.capture import JointGraph
from lightning_ac.codegen import has_symbolic_sizes
from lightning_ac.errors import (
    BudgetError,
    CaptureError,
    describe_capture_failure,
    unwrap_compile_error,
)
from lightning_ac.planner import Plan, default_reserve_B, fused_costs, plan, swap_points
from lightning_ac.profiler import (
    PREVIOUS_GRADS,
    NodeOutOfMemoryError,
    Profile,
    op_name,
    profile_at,
    profile_joint,
)
from lightning_ac.report import format_bytes
from lightning_ac.rewriter import (
    KERNELS,
    PlannedStep,
    compile_with_plan,
    decode_plan,
    encode_plan,
    retarget,
)
from lightning_ac.simulator import peak_breakdown, simulate
from lightning_ac.step_graphs import StepGraphs

__all__ = ["AutoCheckpoint", "Budget", "ShapePlan", "State", "auto_checkpoint",
           "device_memory_limit", "parse_budget"]

log = logging.getLogger(__name__)

Budget = int | str | Callable[[Profile], int] | None
"""A budget: bytes (int), a string with a unit (``"6GB"``, ``"5.5GiB"``), a function of the
profile that returns bytes (``lambda p: int(0.6 * p.peak_bytes)``), or None (the device's
limit)."""

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_BUDGET_FORMS = ('an int number of bytes, or a string such as "6GB", "5.5GiB", "800MB" '
                 '(GB = 10^9 bytes, GiB = 2^30), or None for the device\'s memory limit')


class State(str, enum.Enum):
    """Where an :class:`AutoCheckpoint` stands. (A ``str`` enum: ``State.ACTIVE == "active"``.)"""

    IDLE = "idle"
    """Nothing installed yet (a callback before its first training step)."""
    PLANNING = "planning"
    """Installed; the next training call captures, profiles and plans the step."""
    ACTIVE = "active"
    """Training calls run the rewritten step."""
    OFF = "off"
    """Training calls run the original forward: the step already fits, capture failed, or the
    plan was removed."""

    def __str__(self) -> str:
        return self.value


def parse_budget(budget: int | str | None, owner: str = "MuTwoAC") -> int | None:
    """Bytes of a budget given as an int, a string with a unit, or None (no explicit budget).

    Raises:
        MisconfigurationException: for anything else, or a budget that is not positive. The
            message names ``owner(budget=...)`` and the forms accepted.
    """
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise MisconfigurationException(
            f"{owner}(budget={budget!r}) is not a valid budget: expected {_BUDGET_FORMS}.")
    if isinstance(budget, int):
        value = budget
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", budget)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise MisconfigurationException(
                f"{owner}(budget={budget!r}) is not a valid budget: expected {_BUDGET_FORMS}.")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise MisconfigurationException(
            f"{owner}(budget={budget!r}) must be positive: expected {_BUDGET_FORMS}.")
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


def validate_options(owner: str, *, swap: Any, host_swap: Any, margin: Any,
                     previous_grads: Any = "until_backward", plan_new_shapes: Any = True,
                     max_shapes: Any = 1, dynamic_shapes: Any = True,
                     kernels: Any = "eager") -> None:
    """Check the options :func:`auto_checkpoint` and ``MuTwoAC`` share; the message names
    ``owner(argument=value)`` and what is expected.

    Raises:
        MisconfigurationException: for the first invalid one.
    """
    if not isinstance(swap, bool):
        raise MisconfigurationException(f"{owner}(swap={swap!r}) must be True or False.")
    if host_swap not in (True, False, "auto") or not isinstance(host_swap, (bool, str)):
        raise MisconfigurationException(
            f"{owner}(host_swap={host_swap!r}) must be True, False or \"auto\".")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or \
            not 0.0 <= margin < 1.0:
        raise MisconfigurationException(
            f"{owner}(margin={margin!r}) must be in [0, 1): the share of the device limit kept "
            "free.")
    if previous_grads not in PREVIOUS_GRADS:
        raise MisconfigurationException(
            f"{owner}(previous_grads={previous_grads!r}) must be one of {PREVIOUS_GRADS}.")
    if not isinstance(plan_new_shapes, bool):
        raise MisconfigurationException(
            f"{owner}(plan_new_shapes={plan_new_shapes!r}) must be True or False.")
    if not isinstance(dynamic_shapes, bool):
        raise MisconfigurationException(
            f"{owner}(dynamic_shapes={dynamic_shapes!r}) must be True or False.")
    if not isinstance(max_shapes, int) or isinstance(max_shapes, bool) or max_shapes < 1:
        raise MisconfigurationException(f"{owner}(max_shapes={max_shapes!r}) must be a positive int.")
    if not isinstance(kernels, str) or kernels not in KERNELS:
        raise MisconfigurationException(
            f"{owner}(kernels={kernels!r}) must be one of {', '.join(map(repr, KERNELS))}.")


MAX_SHAPES = 8
"""Input shapes planned at once by default; the least recently used plan goes beyond that."""
MAX_REPLANS = 2
"""Re-plans of one shape after a measured peak over the budget (see
:meth:`AutoCheckpoint.observe_peak`)."""


@dataclass(eq=False)
class ShapePlan:
    """The planned step for one set of input shapes."""

    shapes: tuple
    """The key: :func:`input_shapes` of the call."""
    compiled: Callable | None = None
    """The rewritten step; None where the step runs the original forward (it fits)."""
    plan: Plan | None = None
    profile: Profile | None = None
    planning_call_s: float | None = None
    """Wall time of the planning call: capture, profile, plan, partition and the step itself."""
    foreign_B: int = 0
    """Device memory allocated when the planning call began that is not the step's own
    (parameters, gradients, optimizer state, this batch): planned around, not in, the budget."""
    excess_B: int = 0
    """The measured peaks' excess over the budget that re-plans have lowered the target by."""
    replans: int = 0
    graphs: StepGraphs | None = None
    """Where dynamo splits the step into several graphs: them, planned together (the plan
    comes at the call after the capture call)."""
    not_one_graph: str = ""
    """Why the step is not one graph (the first graph break), where it is not."""
    tensor_shapes: list[tuple] = field(default_factory=list)
    """The shape of each tensor argument of the call that planned it (:func:`input_tensors`)."""
    varying: frozenset = frozenset()
    """``(tensor index, dim)`` of the dimensions traced as varying sizes: one graph and one plan
    for every call whose shapes differ only there (:attr:`shapes` is their pattern)."""
    sources: dict = field(default_factory=dict)
    """Each size symbol of that graph → the ``(tensor index, dim)`` of the call it reads."""
    sizes: dict = field(default_factory=dict)
    """The sizes (symbol → int) the plan is made for: the largest seen, so that it holds for
    every call up to them (memory grows with each size)."""
    fits: dict = field(default_factory=dict)
    """Smaller sizes seen → whether the step fits the plan's target without AC there."""
    planned: tuple[PlannedStep, Callable] | None = None
    """The partition the compiled step runs, and that step: a new plan replaces the partition
    without compiling again (:class:`~lightning_ac.rewriter.PlannedStep`)."""

    @property
    def dynamic(self) -> bool:
        return bool(self.varying)

    def sizes_of(self, tensors: list[torch.Tensor]) -> dict:
        """The value of each size symbol in a call with these tensor arguments."""
        return {sym: int(tensors[i].shape[d]) for sym, (i, d) in self.sources.items()}


class AutoCheckpoint:
    """A step planned under a memory budget: what :func:`auto_checkpoint` returns.

    Call it as the step (for a step function), or let the module call it (for a module, whose
    ``forward`` it replaces). Only training calls (module in training mode, gradients enabled)
    run a rewritten step; everything else runs the original forward. Each set of input shapes
    (a shorter sequence, the last smaller batch) gets a plan of its own at its first training
    call, kept in a bounded cache (:data:`MAX_SHAPES`); a shape whose step fits runs the
    original forward. Where dynamo splits the step, its graphs are captured at the shape's first
    call and planned together at the second (:class:`~lightning_ac.step_graphs.StepGraphs`).

    Attributes:
        plans: the :class:`ShapePlan` of each shape planned, least recently used first.
        last: the plan of the last training call's shapes.
    """

    def __init__(self, fn: Callable, module: nn.Module, optimizer: torch.optim.Optimizer | None,
                 *, budget: Budget, swap: bool, host_swap: bool | str, margin: float,
                 verbose: bool, previous_grads: str, always_rewrite: bool, on_infeasible: str,
                 plan_new_shapes: bool, max_shapes: int, profile_options: dict[str, Any],
                 installed_on: nn.Module | None, dynamic_shapes: bool = True,
                 kernels: str = "eager") -> None:
        self.fn, self.module, self.optimizer = fn, module, optimizer
        self.kernels = kernels
        self.budget = budget
        self.swap, self.host_swap, self.margin = swap, host_swap, margin
        self.verbose, self.previous_grads = verbose, previous_grads
        self.always_rewrite, self.on_infeasible = always_rewrite, on_infeasible
        self.plan_new_shapes, self.max_shapes = plan_new_shapes, max_shapes
        self.dynamic_shapes = dynamic_shapes
        self._ran_original = False
        """Whether the last call ran the original forward: its sizes fit without AC (a plan for
        varying sizes, whose largest need it)."""
        self._static_only = False
        """Set when a step traced with dynamic sizes failed: each shape is then planned alone."""
        self.profile_options = profile_options
        self.plans: OrderedDict[tuple, ShapePlan] = OrderedDict()
        self.last: ShapePlan | None = None
        self.planned_last_call = False
        """Whether the last training call planned (its step time and peak are not a step's)."""
        self.replans = 0
        """Re-plans so far, over all shapes."""
        self._disabled = False  # removed, or the step cannot be captured
        self._unplanned_shape_warned = False
        self._installed_on = installed_on
        functools.update_wrapper(self, fn, updated=())

    # -- what it shows ----------------------------------------------------------------------

    @property
    def state(self) -> State:
        """``PLANNING`` before the first plan; ``ACTIVE`` while the last call's shapes run a
        rewritten step; ``OFF`` when they fit (original forward), after :meth:`remove`, or when
        the step cannot be captured."""
        if self._disabled:
            return State.OFF
        if self.last is None or self.last.plan is None:
            return State.PLANNING  # (or a step of several graphs between capture and plan)
        fits = self.last.compiled is None or self._ran_original
        return State.OFF if fits else State.ACTIVE

    @property
    def active(self) -> bool:
        """Whether any shape planned so far runs a rewritten step (the last call's shapes may
        be one that fits)."""
        return not self._disabled and any(s.compiled is not None for s in self.plans.values())

    @property
    def plan(self) -> Plan | None:
        """The plan of the last training call's shapes (None before the first)."""
        return self.last.plan if self.last is not None else None

    @property
    def profile(self) -> Profile | None:
        """The profile that plan was made from."""
        return self.last.profile if self.last is not None else None

    @property
    def planning_call_s(self) -> float | None:
        """Wall time of the last shapes' planning call."""
        return self.last.planning_call_s if self.last is not None else None

    def summary(self) -> str:
        """The plan line (see :meth:`Plan.summary`), or what the state is before/without one."""
        if self.plan is None:
            return f"MuTwoAC: {self.state}, no plan yet"
        shapes = f" for {len(self.plans)} input shapes" if len(self.plans) > 1 else ""
        graphs = f"; {self.last.graphs.describe()}" if self.last.graphs is not None else ""
        return f"MuTwoAC: {self.state}{shapes}, {self.plan.summary()}{graphs}"

    def __repr__(self) -> str:
        return f"AutoCheckpoint({getattr(self.fn, '__qualname__', self.fn)!r}, state={self.state})"

    # -- the step ---------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        self.planned_last_call = self._ran_original = False
        if self._disabled or not self.module.training or not torch.is_grad_enabled():
            return self.fn(*args, **kwargs)
        shapes = input_shapes(args, kwargs)
        step = self.plans.get(shapes) or self._varying_plan_for(args, kwargs)
        prev = self.last
        if prev is not None and prev is not step and prev.graphs is not None \
                and prev.graphs.profile is None and prev.graphs.graphs \
                and self.plans.get(prev.shapes) is prev:
            # Another shape follows a capture call (its backward has run): plan that one now,
            # so that it runs planned when it comes again; under dynamic padding a shape's own
            # next call may come only after other shapes have pushed it out of the cache.
            self.planned_last_call = True
            if not self._finalize(prev):
                return self.fn(*args, **kwargs)
        if step is None:
            if self.plans and not self.plan_new_shapes:
                self._warn_unplanned_shape(shapes)
                return self.fn(*args, **kwargs)  # another shape, as the user asked: eager
            varying, needed = self._varying_dims(args, kwargs)
            if varying:
                return self._plan_varying(varying, needed, shapes, args, kwargs)
            return self._plan_and_run(shapes, args, kwargs)
        self.plans.move_to_end(step.shapes)
        self.last = step
        if step.dynamic:
            return self._run_varying(step, args, kwargs)
        if step.graphs is not None and step.graphs.profile is None:
            return self._plan_graphs(step, args, kwargs)
        if step.compiled is None:
            return self.fn(*args, **kwargs)  # this shape fits
        if step.graphs is not None and step.graphs.will_capture:
            self.planned_last_call = True  # its graphs changed: a capture call, not a step
        try:
            return step.compiled(*args, **kwargs)
        except torch.cuda.OutOfMemoryError as exc:
            raise torch.cuda.OutOfMemoryError(f"{exc}\n{self._out_of_memory_hint()}") from exc

    def _plan_and_run(self, shapes: tuple, args, kwargs):
        """The first training call of ``shapes``: capture, profile and plan the step, then run it."""
        self._warm_compilers(args, kwargs)
        step = ShapePlan(shapes, foreign_B=self._foreign_bytes(args, kwargs),
                         tensor_shapes=[tuple(t.shape) for t in input_tensors(args, kwargs)])
        split = next((s.not_one_graph for s in self.plans.values() if s.graphs is not None), "")
        if split:  # another shape of a step known not to be one graph: skip the attempt
            step.not_one_graph = split
            return self._capture_graphs(step, args, kwargs)
        step.compiled = compile_with_plan(self.fn, self.module,
                                          functools.partial(self._make_plan, step),
                                          on_compiled=functools.partial(self._compiled, step),
                                          kernels=self.kernels)
        t0 = time.perf_counter()
        try:
            out = step.compiled(*args, **kwargs)
        except Exception as exc:
            _raise_if_memory_error(exc)
            # not one graph: capture the graphs dynamo splits it into, and plan them together
            step.not_one_graph = str(describe_capture_failure(self.fn, exc)).splitlines()[0]
            ddp = compat.active_ddp_module()
            if ddp is not None:
                step.not_one_graph = (
                    "dynamo's DDP optimizer cuts the step at DDP's "
                    f"{format_bytes(getattr(ddp, 'bucket_bytes_cap', 0))} gradient buckets, so "
                    "that each bucket's all-reduce can start under the rest of backward")
            return self._capture_graphs(step, args, kwargs)
        step.planning_call_s = time.perf_counter() - t0
        self._keep(step)
        self._announce(step)
        return out

    def _warm_compilers(self, args, kwargs) -> None:
        """For fused kernels on the GPU: start inductor's kernel-compiling processes before the
        capture and the profile, so that they are up when the planned graphs compile."""
        if self.kernels == "inductor" and any(t.is_cuda for t in input_tensors(args, kwargs)):
            compat.warm_inductor_workers()

    # -- inputs whose sizes vary: one graph traced with dynamic sizes ------------------------

    def _varying_plan_for(self, args, kwargs) -> ShapePlan | None:
        """The plan of varying sizes whose pattern this call's shapes fit, if any."""
        for step in reversed(self.plans.values()):
            if step.dynamic and shapes_pattern(args, kwargs, step.varying) == step.shapes:
                return step
        return None

    def _varying_dims(self, args, kwargs) -> tuple[frozenset, frozenset]:
        """The dimensions to trace as varying for this call (empty: plan its shapes alone), and
        among them those that must be: the dimensions in which it differs from a shape planned
        before as one graph, with the same tensors of the same ranks otherwise (and those of an
        earlier plan of varying sizes); the batch dimensions join them."""
        if not self.dynamic_shapes or self._static_only:
            return frozenset(), frozenset()
        shapes = [tuple(t.shape) for t in input_tensors(args, kwargs)]
        dims: set = set()
        for step in self.plans.values():
            if step.graphs is not None or step.not_one_graph:
                # several graphs: planned per shape (not traced dynamic yet)
                return frozenset(), frozenset()
            known = step.tensor_shapes
            if len(known) != len(shapes) or any(len(a) != len(b) for a, b in zip(known, shapes)):
                continue  # other arguments: not the same step
            dims |= step.varying | {(i, d) for i, (a, b) in enumerate(zip(known, shapes))
                                    for d, (x, y) in enumerate(zip(a, b)) if x != y}
        needed = frozenset(dims)
        if dims:
            # the batch too: an epoch's last, shorter batch then runs the same graph instead of
            # needing a capture and profile of its own (20 s on BERT-base, reports/shapes)
            dims |= {(i, 0) for i, shape in enumerate(shapes) if shape}
        return frozenset(dims), needed

    def _plan_varying(self, varying: frozenset, needed: frozenset, shapes: tuple, args, kwargs):
        """A call whose shapes differ from planned ones in ``needed``: capture the step once with
        the ``varying`` dimensions as dynamic sizes, profile it at this call's sizes, and plan
        it for the largest sizes seen (the profile scaled to them: :func:`~lightning_ac.
        profiler.profile_at`). Where that fails (dynamo keeps a needed dimension static: the
        code branches on it), this shape is planned alone, and so are later ones."""
        tensors = input_tensors(args, kwargs)
        step = ShapePlan(shapes_pattern(args, kwargs, varying),
                         foreign_B=self._foreign_bytes(args, kwargs),
                         tensor_shapes=[tuple(t.shape) for t in tensors], varying=varying)
        step.compiled = compile_with_plan(
            self.fn, self.module,
            functools.partial(self._make_varying_plan, step, tensors, needed), dynamic=True,
            on_compiled=functools.partial(self._compiled, step), kernels=self.kernels)
        t0 = time.perf_counter()
        try:
            with _marked(tensors, varying):
                out = step.compiled(*args, **kwargs)
        except Exception as exc:
            _raise_if_memory_error(exc)
            return self._plan_each_shape(step, exc, args, kwargs)
        step.planning_call_s = time.perf_counter() - t0
        self._keep(step)
        self._announce(step)
        return out

    def _plan_each_shape(self, step: ShapePlan, exc: BaseException, args, kwargs):
        """The step could not be planned (or run) as one graph for varying sizes: drop that plan,
        plan this call's shapes alone, and every later new shape too."""
        self._static_only = True
        if self.plans.get(step.shapes) is step:
            del self.plans[step.shapes]
        why = unwrap_compile_error(exc, (CaptureError,)) or exc
        log.info("could not plan one graph for varying sizes (%s: %s); planning each shape",
                 type(why).__name__, " ".join(str(why).split())[:300])
        return self._plan_and_run(input_shapes(args, kwargs), args, kwargs)

    def _make_varying_plan(self, step: ShapePlan, tensors: list, needed: frozenset,
                           joint: JointGraph) -> Plan:
        """``_make_plan`` for a graph traced with dynamic sizes, planned at the largest sizes."""
        if step.plan is not None:  # (raised out of the call that compiled it again)
            raise CaptureError("dynamo compiled the step again for new sizes (the code checks a "
                               "property of a size, such as its parity)")
        index = {id(t): i for i, t in enumerate(tensors)}
        traced = set()  # (tensor, dim) traced as a size (several can share a symbol)
        strides = set()  # (a stride dynamo traced apart from the sizes: a batch of one's)
        for node, value in zip(joint.primals, joint.primal_values):
            val = node.meta["val"]
            strides.update(filter(None, map(compat.size_symbol, val.stride())))
            for d, size in enumerate(val.shape):
                sym = compat.size_symbol(size)
                if sym is not None and id(value) in index:
                    step.sources.setdefault(sym, (index[id(value)], d))
                    traced.add((index[id(value)], d))
        missing = set(joint.bindings) - set(step.sources) - strides
        if missing:
            raise CaptureError(f"sizes {sorted(map(str, missing))} of the traced step are no "
                               "dimension of its arguments")
        read = {index[id(v)] for v in joint.primal_values if id(v) in index}
        static = {(i, d) for i, d in needed if i in read} - traced  # (of arguments it reads)
        if static:  # each new size would make dynamo compile (and this step plan) again
            raise CaptureError(f"dynamo kept dimensions {sorted(static)} (tensor, dim) static")
        # the largest size of each symbol over this call and the shapes planned before
        largest = {sym: v for sym, v in joint.bindings.items() if sym in step.sources}
        for other in self.plans.values():
            seen = {other.sources[sym]: v for sym, v in other.sizes.items()}  # (varying sizes)
            for sym, (i, d) in step.sources.items():
                if i < len(other.tensor_shapes) and d < len(other.tensor_shapes[i]):
                    largest[sym] = max(largest[sym], other.tensor_shapes[i][d],
                                       seen.get((i, d), 0))
        step.sizes = largest
        result = self._make_plan(step, joint, sizes=largest)
        step.fits = {_sizes_key(largest): result.stop_reason == "already fits"}
        return result

    def _run_varying(self, step: ShapePlan, args, kwargs):
        """A call of a plan for varying sizes: run it, after planning again for larger sizes
        (the profile scaled to them, no new measurement) if this call has any."""
        tensors = input_tensors(args, kwargs)
        sizes = step.sizes_of(tensors)
        if any(v > step.sizes[s] for s, v in sizes.items()):
            self._plan_larger(step, sizes)
        if not self.always_rewrite and self._fits_without_ac(step, sizes):
            self._ran_original = True
            return self.fn(*args, **kwargs)
        try:
            # (marked for a compile: dynamo traces the step again when a guard fails)
            with _marked(tensors, step.varying):
                return step.compiled(*args, **kwargs)
        except torch.cuda.OutOfMemoryError as exc:
            raise torch.cuda.OutOfMemoryError(f"{exc}\n{self._out_of_memory_hint()}") from exc
        except Exception as exc:
            if unwrap_compile_error(exc, (CaptureError,)) is None:
                raise
            return self._plan_each_shape(step, exc, args, kwargs)

    def _plan_larger(self, step: ShapePlan, sizes: dict) -> None:
        """Plan ``step`` again for sizes larger than it was planned for, from its profile scaled
        to them; the step is partitioned again only if the choices change."""
        t0 = time.perf_counter()
        largest = {s: max(v, sizes[s]) for s, v in step.sizes.items()}
        planned_on = step.profile.joint.graph
        profile = profile_at(step.profile, largest)
        new = self._plan_profile(step, profile)
        fits = new.stop_reason == "already fits"
        log.info("sizes %s are larger than planned for (%s): planned again", sizes, step.sizes)
        if not _same_choices(step.plan, new):
            # A new partition costs about a second for BERT-base (and the step's first run with
            # it): where the compiled choices still meet the new target, keep them, with their
            # figures at the new sizes.
            kept = _still_fits(step.plan, new, profile)
            if kept is not None:
                new = kept
            else:
                step.compiled = self._compile_with(step, new, planned_on)
        step.profile, step.plan, step.sizes = profile, new, largest
        # (against the new plan's target; at the planned sizes the plan says it)
        step.fits = {_sizes_key(largest): fits}
        self.planned_last_call = True
        step.planning_call_s = time.perf_counter() - t0

    def _fits_without_ac(self, step: ShapePlan, sizes: dict) -> bool:
        """Whether the step at ``sizes`` (at most the planned ones) fits the plan's target
        without AC, as a shape planned alone would (it then runs the original forward, which
        recomputes nothing): the profile scaled to them, once per set of sizes."""
        key = _sizes_key(sizes)
        for known, fits in step.fits.items():  # memory grows with each size: bound by a known
            below = all(v <= w for (_, v), (_, w) in zip(key, known))
            above = all(v >= w for (_, v), (_, w) in zip(key, known))
            if (fits and below) or (not fits and above):
                return fits
        # (0.08 s for BERT-base on a 2-core CPU: once per set of sizes, not per call)
        target = step.plan.target_B
        step.fits[key] = target is None or profile_at(step.profile, sizes).peak_bytes <= target
        return step.fits[key]

    def _compile_with(self, step: ShapePlan, new: Plan, planned_on: fx.Graph) -> Callable:
        """The step run by ``new``, a plan made on the graph ``planned_on``: the compiled step
        with its partition replaced, or, where there is none to replace, the step compiled
        again (the new trace must be the same graph: :func:`~lightning_ac.rewriter.retarget`)."""
        if step.planned is not None:
            planned, compiled = step.planned
            try:
                planned.use(new if planned_on is planned.joint.graph
                            else retarget(new, planned_on, planned.joint.graph))
                return compiled
            except CaptureError as exc:
                log.debug("could not partition the compiled step again (%s); compiling it", exc)
        return compile_with_plan(self.fn, self.module,
                                 lambda joint: retarget(new, planned_on, joint.graph),
                                 dynamic=step.dynamic,
                                 on_compiled=functools.partial(self._compiled, step),
                                 kernels=self.kernels)

    @staticmethod
    def _compiled(step: ShapePlan, planned: PlannedStep) -> None:
        step.planned = planned, step.compiled

    def _keep(self, step: ShapePlan) -> None:
        self.planned_last_call = True
        self.plans[step.shapes] = self.last = step
        while len(self.plans) > self.max_shapes:  # the least recently used shape goes
            evicted, _ = self.plans.popitem(last=False)
            log.debug("dropped the plan for %s (more than %d shapes)", evicted, self.max_shapes)

    def _capture_graphs(self, step: ShapePlan, args, kwargs):
        """The capture call of a step dynamo splits into several graphs (see
        :mod:`lightning_ac.step_graphs`): each graph is captured and measured as it runs; the
        plan over all of them is made at the next call."""
        step.compiled = step.graphs = StepGraphs(
            self.fn, self.module, self.optimizer,
            make_plan=functools.partial(self._plan_profile, step),
            host_swap=self._profile_swapped(),
            measure_options={**({"runs": 1, "warmup": False} if self.plans else {}),
                             "swap_above_B": self._swap_above_B(), **self.profile_options},
            previous_grads=self.previous_grads, kernels=self.kernels)
        t0 = time.perf_counter()
        try:
            out = step.graphs(*args, **kwargs)
        except Exception as exc:
            _raise_if_memory_error(exc)
            self._give_up(step, "Its graphs could not be captured either: "
                          f"{type(exc).__name__}: {str(exc).strip()[:300]}")
            return self.fn(*args, **kwargs)
        step.planning_call_s = time.perf_counter() - t0
        if not step.graphs.captured:
            self._give_up(step, "No part of the step could be captured as a graph (" + "; ".join(
                f"graph {g.index + 1}: {g.error}" for g in step.graphs.graphs)
                + "), so there is nothing to plan.")
            return out
        self._keep(step)
        log.info("%s; captured %d graphs, planned at the next call", step.not_one_graph,
                 len(step.graphs.graphs))
        return out

    def _give_up(self, step: ShapePlan, why: str) -> None:
        """Turn AC off for the rest of the fit and tell the user why (the step is not one graph,
        and its graphs could not be used either)."""
        self._turn_off()
        rank_zero_warn(f"MuTwoAC: {step.not_one_graph}\n{why}\n"
                       "Training continues without activation checkpointing.")

    def _plan_graphs(self, step: ShapePlan, args, kwargs):
        """The call after a capture call: plan the step's graphs together, then run them."""
        t0 = time.perf_counter()
        if not self._finalize(step):
            return self.fn(*args, **kwargs)
        out = self.fn(*args, **kwargs) if step.compiled is None else \
            step.compiled(*args, **kwargs)
        step.planning_call_s = time.perf_counter() - t0
        self.planned_last_call = True
        return out

    def _finalize(self, step: ShapePlan) -> bool:
        """Plan the graphs ``step``'s capture call measured; False (and AC off) if that fails."""
        try:
            step.graphs.finalize()
        except Exception as exc:
            _raise_if_memory_error(exc)
            self._give_up(step, "Its graphs could not be planned: "
                          f"{type(exc).__name__}: {str(exc).strip()[:300]}")
            return False
        step.plan, step.profile = step.graphs.plan, step.graphs.profile
        self._announce(step)
        return True

    def remove(self) -> None:
        """Put the original forward back and let the compiled graphs go. Idempotent."""
        module = self._installed_on
        if module is not None and module.__dict__.get("forward") is self:
            del module.forward
        self._installed_on = None
        self._turn_off()

    # -- keeping the budget -----------------------------------------------------------------

    def observe_peak(self, peak_B: int) -> bool:
        """Tell it the measured peak of the last training step (the allocator's peak from before
        the forward call to after the optimizer step). If that went over the budget, the last
        call's shapes are planned again with the target lowered by the excess, from the same
        profile (no new capture or profiling), at most :data:`MAX_REPLANS` times per shape.
        Returns whether it re-planned. The callback calls this after every step on CUDA."""
        step = self.last
        if self.planned_last_call or step is None or step.plan is None or self._disabled:
            return False  # a planning step's peak is the profiler's, not the step's
        budget = step.plan.budget_B
        if budget is None or peak_B <= budget:
            return False
        excess = int(peak_B) - budget
        if step.replans >= MAX_REPLANS:
            if step.replans == MAX_REPLANS:
                step.replans += 1  # say it once
                rank_zero_warn(
                    f"MuTwoAC: inputs {describe_shapes(step.shapes)} still peak at "
                    f"{format_bytes(peak_B)}, {format_bytes(excess)} over the budget of "
                    f"{format_bytes(budget)}, after {MAX_REPLANS} re-plans; lower the budget.")
            return False
        new = self._plan(step.profile, budget,
                         reserve_B=default_reserve_B(step.profile) + step.foreign_B
                         + step.excess_B + excess)
        if new.stop_reason == "infeasible":
            step.replans = MAX_REPLANS  # nothing lower to be had
            return self.observe_peak(peak_B)
        if step.graphs is not None:
            step.graphs.use(new)  # each graph is compiled again at its next run
        else:
            step.compiled = self._compile_with(step, new, step.profile.joint.graph)
        step.plan, step.excess_B = new, step.excess_B + excess
        step.fits.clear()  # (against the new target)
        step.replans += 1
        self.replans += 1
        log.info("re-planned %s: measured peak %d B over the budget by %d B; %s",
                 describe_shapes(step.shapes), peak_B, excess, new.summary())
        return True

    # -- one plan on every rank -------------------------------------------------------------

    def plan_message(self) -> dict | None:
        """The last call's plan as plain data, for other ranks' :meth:`adopt` (None if there
        is no rewritten step to share)."""
        step = self.last
        if step is None or step.plan is None or self._disabled or step.graphs is not None \
                or step.dynamic:
            # (a step of several graphs, or of varying sizes, whose plan is made for the largest
            # sizes this rank saw: each rank runs its own plan)
            return None
        return {"shapes": step.shapes,
                "plan": encode_plan(step.plan, step.profile.joint.graph)}

    def adopt(self, message: dict | None) -> bool:
        """Run the plan another rank made (:meth:`plan_message`) for the same shapes, in place
        of this rank's own: under data parallelism every rank then runs the same plan, though
        each profiled its own step (timings differ a little from rank to rank, and so could
        the planner's picks). Returns whether this rank's plan changed.

        Raises:
            CaptureError: this rank's step for those shapes is not the same graph.
        """
        step = self.plans.get(message["shapes"]) if message else None
        if step is None or step.plan is None or self._disabled or step.graphs is not None \
                or step.dynamic:
            return False
        graph = step.profile.joint.graph
        if encode_plan(step.plan, graph) == message["plan"]:
            return False
        new = decode_plan(message["plan"], graph)
        if new.stop_reason == "already fits" and not self.always_rewrite:
            step.compiled = None
        else:
            step.compiled = self._compile_with(step, new, graph)
        step.plan = new
        log.info("adopted another rank's plan for %s: %s", describe_shapes(step.shapes),
                 new.summary())
        return True

    def _foreign_bytes(self, args, kwargs) -> int:
        """Device memory allocated now that is not this step's: not the module's parameters,
        buffers and gradients, the optimizer's state, or the call's tensors (an earlier model
        in a notebook, tensors the user's code keeps). 0 off CUDA."""
        device = self._device()
        if device is None or device.type != "cuda":
            return 0
        own = step_bytes(self.module, self.optimizer, [*args, *kwargs.values()], device)
        return max(0, torch.cuda.memory_allocated(device) - own)

    # -- planning (runs inside the first call's compilation) --------------------------------

    def budget_for(self, profile: Profile | None = None) -> int | None:
        """The budget in bytes for ``profile``'s device (None: no limit)."""
        if callable(self.budget):
            if profile is None:
                return None
            return parse_budget(self.budget(profile), owner="auto_checkpoint")
        if self.budget is not None:
            return parse_budget(self.budget, owner="auto_checkpoint")
        device = self._device()
        return device_memory_limit(device, self.margin) if device is not None else None

    def _device(self) -> torch.device | None:
        p = next(self.module.parameters(), None)
        return p.device if p is not None else None

    def _make_plan(self, step: ShapePlan, joint: JointGraph, sizes: dict | None = None) -> Plan:
        """Profile the captured step and plan it (at ``sizes``: a graph traced with dynamic
        sizes, planned for other sizes than this call's)."""
        t0 = time.perf_counter()
        device = joint.primal_values[0].device
        # the joint graph already holds the casts autocast chose; running it under autocast
        # again would cast twice
        with compat.real_tensor_mode(), torch.autocast(device.type, enabled=False):
            profile = self._profile(joint, device)
        if sizes and {**joint.bindings, **sizes} != joint.bindings:
            profile = profile_at(profile, sizes)
        # The profile stays readable; the tensors it was captured on (parameters, and the first
        # batch, which would otherwise stay allocated) are not needed any more.
        joint.primal_values = []
        if device.type == "cuda":
            # The profile's blocks (and a failed un-swapped attempt's) are cached in a layout
            # the training step does not share; left there they fragment its memory (BERT-base
            # b32 under a 16 GB cap ran out with 2.2 GiB reserved but unallocated).
            gc.collect()
            torch.cuda.empty_cache()
        result = self._plan_profile(step, profile)
        result.planning_s = time.perf_counter() - t0
        step.plan, step.profile = result, profile
        return result

    def _plan(self, profile: Profile, budget: int | None, reserve_B: int) -> Plan:
        """The planner on ``profile`` as the step will run: on inductor's kernels
        (``kernels="inductor"``, a step of fixed sizes) by their costs, every recomputation
        that costs nothing there taken first (:func:`~lightning_ac.planner.fused_costs`).
        Where swapping is allowed and the budget is otherwise out of reach, eager code's saved
        tensors may go to host memory (``Plan.offload_eager_B``)."""
        fused = self.kernels == "inductor" and not any(
            has_symbolic_sizes(j.gm) for j in (profile.graphs or [profile.joint]))
        return plan(fused_costs(profile) if fused else profile, budget, swap=self.swap,
                    reserve_B=reserve_B, recompute_free=fused, offload_eager=self.swap)

    def _plan_profile(self, step: ShapePlan, profile: Profile) -> Plan:
        """Plan ``profile`` (``step``'s) under the budget; an infeasible budget raises or warns,
        as ``on_infeasible`` says."""
        t0 = time.perf_counter()
        budget = self.budget_for(profile)
        result = self._plan(profile, budget, reserve_B=default_reserve_B(profile) + step.foreign_B)
        result.planning_s = time.perf_counter() - t0
        log.debug("planned %d nodes in %.2f s: %s", len(profile.nodes), result.planning_s,
                  result.summary())
        if result.stop_reason == "infeasible":
            if self.on_infeasible == "raise":
                raise BudgetError(infeasible_message(profile, result, step.foreign_B))
            rank_zero_warn(infeasible_message(profile, result, step.foreign_B)
                           + " Training with that plan.")
        return result

    def _profile(self, joint: JointGraph, device: torch.device) -> Profile:
        """Profile the captured step on the device. With ``host_swap="auto"``: with activations
        in host memory where a budget is given (the un-checkpointed step may not fit in it, and
        the step that plans must keep the budget too) or a shape planned before did not fit;
        else on the device, and again swapped if that runs out of memory."""
        # A shape after the first: one timed run per node and no warm-up run (the first shape's
        # profile set up the kernels and the allocator); memory is counted exactly either way,
        # and only the recomputation costs the planner weighs are noisier.
        quick = {"runs": 1, "warmup": False} if self.plans else {}
        profile = functools.partial(profile_joint, joint, self.optimizer,
                                    previous_grads=self.previous_grads,
                                    **{**quick, **self.profile_options})
        if self.host_swap != "auto" or self._profile_swapped():
            swap = self._profile_swapped()
            return profile(swap=swap, swap_above_B=self._swap_above_B() if swap else None)
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

    def _swap_above_B(self) -> int | None:
        """How much device memory a profile with activations in host memory may fill before it
        moves them there: the budget, less what the planner keeps free below it, where the
        budget is known in bytes before the profile (None: move every activation)."""
        if callable(self.budget) or self.budget is None:
            return None
        return max(0, self.budget_for() - default_reserve_B(self._device()))

    def _profile_swapped(self) -> bool:
        """Whether to profile with activations in host memory: as ``host_swap`` says, or with
        ``"auto"`` on CUDA where a budget is given (the un-checkpointed step may not fit in it,
        and the step that plans must keep the budget too) or a shape planned before did not
        fit."""
        if self.host_swap != "auto":
            return bool(self.host_swap)
        device = self._device()
        return device is not None and device.type == "cuda" and (
            isinstance(self.budget, (int, str)) or any(
                s.plan is not None and s.plan.budget_B is not None
                and s.plan.baseline_peak_B > s.plan.budget_B for s in self.plans.values()))

    # -- what the user is told --------------------------------------------------------------

    def _announce(self, step: ShapePlan) -> None:
        p = step.plan
        if p is None:
            return
        which = f" (inputs {describe_shapes(step.shapes)})" if len(self.plans) > 1 else ""
        if p.stop_reason == "already fits" and not self.always_rewrite:
            step.compiled = None  # the original forward runs this shape
            limit = "no limit on the CPU" if p.budget_B is None else \
                f"the budget of {format_bytes(p.budget_B)}"
            rank_zero_info(f"MuTwoAC: the step{which} already fits "
                           f"({format_bytes(p.baseline_peak_B)} peak, {limit}); activation "
                           "checkpointing is off for it.")
            return
        if step.graphs is not None:
            # a graph break is news to the user: say what was planned and what stayed eager
            rank_zero_info(f"MuTwoAC{which}: {p.summary()}; {step.graphs.describe()}. "
                           f"({step.not_one_graph})")
        elif self.verbose:
            rank_zero_info(f"MuTwoAC{which}: {p.summary()}")

    def _turn_off(self) -> None:
        self._disabled = True
        for step in [*self.plans.values(), *([self.last] if self.last else [])]:
            step.compiled = None  # the compiled graphs (and their swap slots) can go; the plans
            # and profiles stay readable

    def _warn_unplanned_shape(self, shapes: tuple) -> None:
        """Say once that a batch of another shape runs without AC (``plan_new_shapes=False``)."""
        if self._unplanned_shape_warned:
            return
        self._unplanned_shape_warned = True
        planned = describe_shapes(next(iter(self.plans)))
        rank_zero_warn(
            f"MuTwoAC: a batch with inputs shaped {describe_shapes(shapes)} runs without "
            f"activation checkpointing: the step was planned for {planned}, and new shapes are "
            "not planned (plan_new_shapes=False). Its peak memory is not planned and may go "
            "over the budget.")

    def _out_of_memory_hint(self) -> str:
        """What the plan expected, and what to try, for an out-of-memory error in its step."""
        p = self.plan
        hint = (f"MuTwoAC: this step was planned for {format_bytes(p.predicted_peak_B)} under a "
                f"budget of {format_bytes(p.budget_B)}.")
        device = self._device()
        if device is not None and device.type == "cuda":
            idle = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            hint += (f" The allocator holds {format_bytes(idle)} reserved but unallocated: if "
                     "that is large, memory is fragmented; set "
                     "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before CUDA starts.")
        return hint + " Otherwise lower the budget (MuTwoAC(budget=...)) or the batch size."


def _sizes_key(sizes: dict) -> tuple:
    """Sizes (symbol → int) as a key, in one order of the symbols."""
    return tuple(sorted((str(sym), v) for sym, v in sizes.items()))


def _still_fits(old: Plan, new: Plan, profile: Profile) -> Plan | None:
    """``old``'s choices, with their figures on ``profile`` (the step at larger sizes), where
    they meet ``new``'s target there and move the swapped values at the same points (the
    compiled step has those points in place); else None."""
    if new.target_B is None:
        return None
    sim = simulate(profile, old.recomputed, old.swapped)
    if sim.peak_B > new.target_B:
        return None
    if swap_points(profile, sim) != (old.release_before, old.prefetch_before):
        return None
    return replace(old, budget_B=new.budget_B, baseline_peak_B=new.baseline_peak_B,
                   predicted_peak_B=sim.peak_B, predicted_extra_ms=sim.extra_ms,
                   stop_reason="fits", recomputed_nodes=sim.recomputed_nodes,
                   target_B=new.target_B, steps=[])


def _same_choices(a: Plan, b: Plan) -> bool:
    """Whether two plans of one graph recompute and swap the same values in the same way."""
    return (set(a.recomputed) == set(b.recomputed) and set(a.swapped) == set(b.swapped)
            and a.release_before == b.release_before and a.prefetch_before == b.prefetch_before)


def _marked(tensors: list[torch.Tensor], dims: frozenset):
    """The varying dimensions (``(tensor index, dim)``) of a call's tensors marked for dynamo
    during the call; the caller's tensors are left as they were."""
    return compat.dims_marked_dynamic([(tensors[i], d) for i, d in sorted(dims)])


def _raise_if_memory_error(exc: BaseException) -> None:
    """Re-raise an out-of-memory error, or the :class:`BudgetError` under a compile error: those
    are the user's to see; any other failure to capture or plan turns AC off with a warning."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        raise exc
    budget_error = unwrap_compile_error(exc, (BudgetError,))
    if budget_error is not None:
        raise budget_error from None


def infeasible_message(profile: Profile, result: Plan, foreign_B: int = 0) -> str:
    """Why ``result`` (stopped ``"infeasible"``) does not meet its budget, and what to do."""
    parts = peak_breakdown(profile, result.recomputed, result.swapped)
    smallest = (f"the smallest peak the planner reaches is {format_bytes(result.predicted_peak_B)} ("
                + ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in parts.items())
                + f") with {len(result.recomputed)} activations recomputed and "
                f"{len(result.swapped)} kept in host memory"
                + (f", eager code's saved tensors in host memory "
                   f"({format_bytes(result.offload_eager_B)})" if result.offload_eager_B else ""))
    if result.target_B is not None and result.target_B <= 0:
        # nothing is left for the step: say what took it, not "planned to -1.81 GiB"
        held = f"tensors allocated before the step began take {format_bytes(foreign_B)}" \
            if foreign_B else "memory the profile does not see takes"
        return (f"MuTwoAC cannot meet the budget of {format_bytes(result.budget_B)}: {held} "
                f"(with workspaces and allocator rounding, "
                f"{format_bytes(result.budget_B - result.target_B)}), which leaves the step "
                f"nothing; {smallest}. Free what an earlier model or your code still holds "
                "(del, gc.collect(), torch.cuda.empty_cache()), or raise the budget.")
    aim = ""
    if result.target_B is not None and result.target_B != result.budget_B:
        # the comparison the planner made: say it, or "budget 3.35 MiB, smallest 3.35 MiB" reads
        # as if it fitted
        others = f", of which {format_bytes(foreign_B)} already allocated by other tensors " \
            "when the step began" if foreign_B else ""
        aim = (f", planned to {format_bytes(result.target_B)} to leave room for memory the "
               f"profile does not see ({format_bytes(result.budget_B - result.target_B)}"
               f"{others})")
    return (f"MuTwoAC cannot meet the budget of {format_bytes(result.budget_B)}{aim}: "
            f"{smallest}. Raise the budget, lower the batch size, or use an optimizer with less "
            "state.")


def auto_checkpoint(target: nn.Module | Callable, optimizer: torch.optim.Optimizer | None = None,
                    *, budget: Budget = None, module: nn.Module | None = None, swap: bool = True,
                    host_swap: bool | str = "auto", margin: float = 0.05, verbose: bool = False,
                    previous_grads: str = "until_backward", always_rewrite: bool = False,
                    on_infeasible: str = "raise", plan_new_shapes: bool = True,
                    max_shapes: int = MAX_SHAPES, dynamic_shapes: bool = True,
                    kernels: str = "eager",
                    profile_options: dict[str, Any] | None = None) -> AutoCheckpoint:
    """Plan ``target``'s training step under a memory budget on its first training call.

    Args:
        target: an ``nn.Module`` (its ``forward`` is replaced until :meth:`AutoCheckpoint.remove`)
            or a step function, such as one that returns the loss (call the returned object
            instead of it; pass ``module``).
        optimizer: the optimizer that steps the module's parameters: its step (and its state)
            is part of the step's memory. None: forward and backward only.
        budget: the peak memory of the whole training step (forward, backward and optimizer
            step, as ``torch.cuda.max_memory_allocated`` counts it), as bytes, a string with a
            unit (``"6GB"`` = 6·10⁹ bytes, ``"5.5GiB"`` = 5.5·2³⁰), a function of the profile
            returning bytes, or None: the device's limit less ``margin`` (on the CPU there is
            none, so nothing is planned).
        module: the module whose parameters a step function uses (default: ``target`` itself).
        swap: let the plan keep activations in pinned host memory between forward and backward
            (where the copies hide behind compute); False: recompute only.
        host_swap: how the first step is profiled: ``"auto"`` on the device, and again with
            activations in host memory if that runs out of memory; True: always; False: never.
        margin: share of the device's limit kept free when ``budget`` is None.
        verbose: say the plan line when the step is planned.
        previous_grads: when the training loop frees the previous step's gradients:
            ``"until_backward"`` (the default: zero_grad after the forward pass, or not known),
            ``"freed"`` (``zero_grad(set_to_none=True)`` before the forward pass),
            ``"through_step"`` (gradient accumulation).
        always_rewrite: run the captured step even when the step already fits (to measure the
            rewritten step itself); by default a step that fits runs the original forward.
        on_infeasible: what to do when no plan reaches the budget: ``"raise"`` a
            :class:`~lightning_ac.BudgetError` from the first training call, or ``"warn"`` and
            train with the lowest-peak plan found.
        plan_new_shapes: plan each new set of input shapes at its first training call (the
            default); False: shapes other than the first run the original forward, with a
            warning.
        max_shapes: plans kept at once; beyond that the least recently used one goes (and is
            made again if its shapes come back).
        dynamic_shapes: when a call's shapes differ from a planned one's only in some sizes (a
            sequence length, the last short batch), trace the step once with those sizes
            dynamic and plan it for the largest sizes seen: every later size up to them runs
            with no new capture or profile, and a larger one is planned again from the same
            profile scaled to it. False: each set of shapes is captured, profiled and planned
            on its own.
        kernels: how the planned step runs: ``"eager"``, op by op on eager kernels (the kernels
            the profile measured); ``"inductor"``, each partitioned forward and backward
            compiled by inductor (fused kernels) at its first call, with the plan's swaps,
            recomputation and order kept. A step traced with dynamic sizes runs op by op.
        profile_options: keyword arguments for :func:`~lightning_ac.profiler.profile_iteration`
            (``runs``, ``cold_l2``).

    Returns:
        An :class:`AutoCheckpoint`, in state ``PLANNING``.

    Raises:
        MisconfigurationException: for invalid arguments, here.
        BudgetError: from the first training call, if no plan reaches the budget.
    """
    if not callable(budget):
        parse_budget(budget, owner="auto_checkpoint")
    validate_options("auto_checkpoint", swap=swap, host_swap=host_swap, margin=margin,
                     previous_grads=previous_grads, plan_new_shapes=plan_new_shapes,
                     max_shapes=max_shapes, dynamic_shapes=dynamic_shapes, kernels=kernels)
    if on_infeasible not in ("raise", "warn"):
        raise MisconfigurationException(
            f"auto_checkpoint(on_infeasible={on_infeasible!r}) must be \"raise\" or \"warn\".")
    installed_on = None
    if isinstance(target, nn.Module):
        if module is not None and module is not target:
            raise MisconfigurationException(
                "auto_checkpoint(module=...) is for a step function: the target is already a "
                "module.")
        if isinstance(target.__dict__.get("forward"), AutoCheckpoint):
            raise MisconfigurationException(
                f"auto_checkpoint: {type(target).__name__} already has a plan installed; call "
                "its remove() first.")
        module, fn, installed_on = target, target.forward, target
    elif callable(target):
        if not isinstance(module, nn.Module):
            raise MisconfigurationException(
                "auto_checkpoint(step_fn, ...) needs module=<the nn.Module whose parameters "
                f"the step uses>; got module={module!r}.")
        fn = target
    else:
        raise MisconfigurationException(
            f"auto_checkpoint(target={target!r}): expected an nn.Module or a callable.")
    ac = AutoCheckpoint(fn, module, optimizer, budget=budget, swap=swap, host_swap=host_swap,
                        margin=margin, verbose=verbose, previous_grads=previous_grads,
                        always_rewrite=always_rewrite, on_infeasible=on_infeasible,
                        plan_new_shapes=plan_new_shapes, max_shapes=max_shapes,
                        profile_options=dict(profile_options or {}),
                        installed_on=installed_on, dynamic_shapes=dynamic_shapes,
                        kernels=kernels)
    if installed_on is not None:
        installed_on.forward = ac
    return ac


def step_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None, inputs,
               device: torch.device) -> int:
    """Bytes on ``device`` that a training step of ``module`` owns before it starts: parameters,
    buffers, their gradients, the optimizer's state and the ``inputs`` tensors, each storage
    counted once (a view of an input is not counted twice)."""
    own: dict[int, int] = {}
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [t.grad for t in tensors]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values()]
    for t in [*tensors, *inputs]:
        if isinstance(t, torch.Tensor) and t.device == device:
            st = t.untyped_storage()
            own[st.data_ptr()] = st.nbytes()
    return sum(own.values())


def _walk(args, kwargs, leaf: Callable[[torch.Tensor], Any]) -> tuple:
    """A call's arguments as a hashable key: ``leaf(t)`` for each tensor (inside lists, tuples
    and dicts too: a batch passed as one dict), None for anything else; tensors are visited in
    one fixed order (:func:`input_tensors`'s)."""
    def walk(v):
        if isinstance(v, torch.Tensor):
            return leaf(v)
        if isinstance(v, (list, tuple)):
            return tuple(walk(x) for x in v)
        if isinstance(v, dict):
            return tuple((str(k), walk(x)) for k, x in sorted(v.items(), key=lambda kv: str(kv[0])))
        return None

    return tuple(walk(a) for a in args) + tuple((k, walk(v)) for k, v in sorted(kwargs.items()))


def input_shapes(args, kwargs) -> tuple:
    """The shapes of a call's tensor arguments, inside lists, tuples and dicts too (a batch
    passed as one dict), with None for other arguments, as a hashable key."""
    return _walk(args, kwargs, lambda t: tuple(t.shape))


def input_tensors(args, kwargs) -> list[torch.Tensor]:
    """A call's tensor arguments in the order :func:`input_shapes` lists their shapes."""
    out: list[torch.Tensor] = []
    _walk(args, kwargs, out.append)
    return out


VARYING = "*"
"""Stands for a dimension whose size varies in a :func:`shapes_pattern`."""


def shapes_pattern(args, kwargs, dims: frozenset) -> tuple:
    """:func:`input_shapes` with the dimensions ``dims`` (``(tensor index, dim)`` pairs, in
    :func:`input_tensors`'s order) written :data:`VARYING`: the key of a plan for all their
    sizes."""
    count = iter(range(1 << 62))

    def leaf(t: torch.Tensor) -> tuple:
        i = next(count)
        return tuple(VARYING if (i, d) in dims else size for d, size in enumerate(t.shape))

    return _walk(args, kwargs, leaf)


def describe_shapes(shapes: tuple) -> str:
    """The tensor shapes in an :func:`input_shapes` key, for a message:
    "[8, 3, 32, 32], mask=[8, 64]"."""
    parts = []
    for s in shapes:
        if s and isinstance(s[0], str) and s[0] != VARYING:  # a keyword argument: (name, shape)
            if s[1] is not None:
                parts.append(f"{s[0]}={list(s[1])}".replace(repr(VARYING), VARYING))
        elif s is not None:
            parts.append(str(list(s)).replace(repr(VARYING), VARYING))
    return ", ".join(parts)
