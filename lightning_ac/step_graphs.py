"""A step that dynamo splits into several graphs, planned as one step.

Graph breaks (a ``print`` or logger call in ``forward``, ``.item()``, data-dependent control
flow) and modules dynamo leaves to eager (``nn.LSTM``) split a step into graphs G1..Gk with eager
code between them. :class:`StepGraphs` keeps them as one ordered list and plans them together:

1. **The capture call** (the step's first call with these input shapes). Dynamo calls the
   shared backend once per graph (:class:`~lightning_ac.capture.GraphSlot`); each graph is
   captured as a :class:`~lightning_ac.capture.JointGraph` at its first run, with its real inputs,
   and measured there (:func:`~lightning_ac.profiler.measure_joint`). The plan over all graphs
   cannot exist yet (later graphs have not run), so this call runs each graph with a provisional
   partition: every activation saved, or, where the step may not fit un-checkpointed (CUDA with a
   budget), every activation it can swap kept in host memory from the end of its graph's forward.
   What eager code between graphs saves for backward is counted by autograd's saved-tensor hooks,
   and on CUDA the peak it allocates while it runs by the allocator's statistics; the order in
   which the graphs' backwards run is recorded, not assumed.
2. **The next call** assembles the measurements into one :class:`~lightning_ac.profiler.Profile`
   (all forwards in order, the backwards in the recorded order, eager memory, the optimizer
   step), plans it under the budget, and replaces each graph's provisional partition with its
   part of the plan (:class:`~lightning_ac.rewriter.PlannedStep`: no second trace).

A graph that cannot be captured (AOTAutograd fails on it) runs as dynamo traced it, and the plan
summary says so; it is planned as eager code.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from lightning_ac.capture import (
    GraphSlot,
    JointGraph,
    aot_compile,
    compile_graphs,
    running,
    storage_ptr,
)
from lightning_ac.planner import Plan, can_swap_value
from lightning_ac.profiler import (
    EagerMemory,
    GraphProfiler,
    Profile,
    _tensors,
    allocated_bytes,
    is_tensor_node,
    measure_joint,
    profile_graphs,
)
from lightning_ac.report import format_bytes
from lightning_ac.rewriter import PlannedStep, restrict

log = logging.getLogger(__name__)

__all__ = ["MAX_RECAPTURES", "MIN_OFFLOAD_B", "CapturedGraph", "StepGraphs"]

MAX_RECAPTURES = 3
"""How many times a step whose graphs change after its capture call (dynamo compiled a graph
again: a value it had specialized on changed) is captured again before the new graphs are left
to run unplanned."""

MIN_OFFLOAD_B = 1 << 20
"""Saved tensors smaller than this stay on the device when eager code's saves go to the host
(a copy each way costs more than the memory is worth)."""

# Autograd calls the saved-tensor hooks from eager code inside the step's dynamo-compiled call,
# where dynamo would otherwise compile each hook as a frame of its own (and recompile it per
# dtype until its recompile limit: measured on the H200 with an nn.LSTM between graphs).
_not_traced = torch.compiler.disable


@dataclass(eq=False)
class CapturedGraph:
    """One graph of the step, in the order its forward runs."""

    index: int
    slot: GraphSlot
    joint: JointGraph | None = None
    """The joint graph captured and measured at the first run (None: not captured)."""
    measured: GraphProfiler | None = None
    compiled: Callable | None = None
    """AOTAutograd's compiled function that runs it now."""
    planned: PlannedStep | None = None
    """The partition :attr:`compiled` runs, which a new plan replaces in place."""
    plan: Plan | None = None
    """This graph's part of the step's plan, on :attr:`joint`."""
    error: str = ""
    """Why it could not be captured (it then runs as dynamo traced it)."""
    saved_B: int = 0
    """Bytes the running partition's forward saves for backward (by the traced sizes)."""
    input_ptrs: list[int] = field(default_factory=list)
    """Storage addresses of its tensor inputs in the capture call, in order (its primals')."""
    outputs: list[tuple[int, tuple]] = field(default_factory=list)
    """Storage address and shape of each tensor it returned in the capture call."""
    carried: list[tuple[fx.Node, weakref.ref]] = field(default_factory=list)
    """Its carried primals and (weakly) their values, from its capture to the capture call's
    end of forward (:meth:`StepGraphs._resharded`)."""
    returned: list[weakref.ref] = field(default_factory=list)
    """(Weakly) the tensors it returned in the capture call, to its end of forward
    (:meth:`StepGraphs._dropped`)."""


class StepGraphs:
    """The graphs of one step (one set of input shapes) that dynamo split, planned as one step.

    Call it as the step. ``make_plan(profile)`` plans the assembled profile (budget, reserve,
    what to do when infeasible: the caller's policy); ``measure_options`` go to
    :func:`~lightning_ac.profiler.measure_joint` and the profile; ``kernels`` says how the
    planned graphs run (:data:`~lightning_ac.rewriter.KERNELS`).
    """

    def __init__(self, fn: Callable, module: nn.Module, optimizer: torch.optim.Optimizer | None,
                 *, make_plan: Callable[[Profile], Plan], host_swap: bool,
                 measure_options: dict, previous_grads: str, kernels: str = "eager") -> None:
        self.fn, self.module, self.optimizer = fn, module, optimizer
        self.kernels = kernels
        self.make_plan = make_plan
        self.host_swap = host_swap
        self.measure_options = measure_options
        self.previous_grads = previous_grads
        self.compiled = compile_graphs(fn, module)
        self.graphs: list[CapturedGraph] = []
        self._by_slot: dict[tuple[GraphSlot, int], CapturedGraph] = {}
        self._occurrence: dict[GraphSlot, int] = {}
        self.backward_order: list[int] = []
        self.eager: list[EagerMemory] = []
        self.profile: Profile | None = None
        self.plan: Plan | None = None
        self.planning_s = 0.0
        """Wall time of assembling, profiling the optimizer and planning (the second call)."""
        self._registry: dict = {}
        self._capturing = False
        self._lasting: set[int] = set()
        self._eager_saved: dict[int, dict[int, int]] = {}
        self._eager_peak: dict[int, int] = {}
        """Region → the allocator's peak above what was allocated when it began (CUDA)."""
        self._region_base: int | None = None
        self._own_ptrs: set[int] = set()
        self._param_ptrs: frozenset[int] = frozenset()
        """Storages of the module's parameters as the step began: a graph input that is a view
        of one is parameter memory (FSDP1 with one rank), not a value made in the step."""
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._changed = False
        self.recaptures = 0
        """Capture calls after the first (see :data:`MAX_RECAPTURES`)."""

    # -- what it shows ------------------------------------------------------------------------

    @property
    def captured(self) -> list[CapturedGraph]:
        return [g for g in self.graphs if g.joint is not None]

    def describe(self) -> str:
        """Which graphs were planned and what stayed eager, in a line."""
        parts = []
        for g in self.graphs:
            if g.joint is None:
                parts.append(f"graph {g.index + 1} eager ({g.error})")
            else:
                n = sum(1 for _ in g.joint.graph.nodes)
                rec = len(g.plan.recomputed) if g.plan else 0
                swp = len(g.plan.swapped) if g.plan else 0
                parts.append(f"graph {g.index + 1}: {n} nodes, {rec} recomputed"
                             + (f", {swp} swapped" if swp else ""))
        eager = sum(e.saved_B for e in self.eager)
        k = len(self.graphs)
        return ((f"the step runs as {k} graphs planned together (" if k > 1 else
                 "the step runs as 1 graph and eager code (") + "; ".join(parts)
                + f"); eager code {'between them' if k > 1 else 'around it'} saves "
                f"{format_bytes(eager)} for backward (counted in the plan)")

    @property
    def will_capture(self) -> bool:
        """Whether the next call is a capture call (its graphs measured, run unplanned)."""
        return not self.graphs or (self._changed and self.recaptures < MAX_RECAPTURES)

    # -- running ------------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        # one graph dynamo compiled can run several times in a step (the same block's code in
        # each layer): each run is a graph of the step of its own
        self._occurrence = {}
        if self.graphs and self.will_capture:
            self._forget()
            self.recaptures += 1
        if self.profile is None and self.graphs and not self._capturing:
            self.finalize()
        if self.graphs:
            with running(self), forwards_uncompiled(self.module), self._offloading():
                return self.compiled(*args, **kwargs)
        return self._capture_call(args, kwargs)

    @contextlib.contextmanager
    def _offloading(self):
        """Where the plan keeps eager code's saved tensors in host memory
        (``Plan.offload_eager_B``): what eager code saves for backward goes to pinned host
        memory as it is saved and comes back when backward reads it (torch's ``save_on_cpu``,
        less the module's own parameters and buffers, tensors under :data:`MIN_OFFLOAD_B` and
        what the graphs save: their hooks are paused while they run), in the order they are
        saved, until the plan's bytes have gone."""
        if self.plan is None or not self.plan.offload_eager_B or self._capturing:
            yield
            return
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._to_host, _from_host)
        self._offload_left_B = self.plan.offload_eager_B
        try:
            with self._hooks:
                yield
        finally:
            self._hooks = None

    @_not_traced
    def _to_host(self, t: torch.Tensor):
        if type(t) is not torch.Tensor or not t.is_cuda or t.layout != torch.strided \
                or storage_ptr(t) in self._own_ptrs or _nbytes(t) < MIN_OFFLOAD_B \
                or self._offload_left_B <= 0:
            return t  # (a subclass, DTensor's say, has sizes that are not its local memory's)
        # the plan's bytes, the first saved first (as planner.offload_eager_saves counts them)
        self._offload_left_B -= _nbytes(t)
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return t.device, host

    def _forget(self) -> None:
        """Drop the graphs, measurements and plan (their step changed): capture again."""
        log.info("the step's graphs changed after it was planned; capturing it again")
        self.graphs, self._by_slot, self.backward_order, self.eager = [], {}, [], []
        self.profile = self.plan = None
        self._registry, self._eager_saved, self._changed = {}, {}, False
        self._eager_peak = {}

    def _capture_call(self, args, kwargs):
        """The first call: graphs are captured and measured as they run; eager code's saved
        tensors are counted."""
        self._capturing = True
        # what lasts through the step; anything else a graph takes in is made inside it
        self._lasting = {id(t) for t in [*_tensors([*args, *kwargs.values()]),
                                         *self.module.parameters(), *self.module.buffers()]}
        self._own_ptrs = {storage_ptr(t)
                          for t in [*self.module.parameters(), *self.module.buffers()]}
        self._param_ptrs = frozenset(storage_ptr(p) for p in self.module.parameters()) - {0}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._region_starts()
        try:
            with running(self), forwards_uncompiled(self.module), self._hooks:
                out = self.compiled(*args, **kwargs)
            self._region_ends()
            self._resharded()
            self._dropped()
            return out
        finally:
            self._hooks = None
            self._region_base = None
            self._capturing = False
            self._lasting = set()

    def _resharded(self) -> None:
        """Forward has ended: a carried input still referenced (saved for backward) whose
        storage is now empty was freed in place by eager code, to be made again before its
        graph's backward (FSDP reshards gathered parameters so). Marked on its graph."""
        for g in self.graphs:
            for node, ref in g.carried:
                t = ref()
                if t is not None and _nbytes(t) == 0:
                    g.joint.resharded.add(node)
            g.carried = []

    def _dropped(self) -> None:
        """Forward has ended: the outputs of each graph that nothing holds any more (returned
        beside what the step uses, and let go by eager code) are marked on its graph: they
        live until here, not through backward."""
        if any(ref() is not None for g in self.captured for ref in g.returned):
            # dynamo traced the frames between the graphs in this call, and its tracer keeps
            # the real values it saw (an HF model's output object) in reference cycles until
            # the collector runs: only this call (a later step holds nothing of the kind)
            gc.collect()
        for g in self.captured:
            g.joint.dropped_outputs |= {node for i, node in _returned_nodes(g)
                                        if g.returned[i]() is None}
        for g in self.graphs:
            g.returned = []

    def run_graph(self, slot: GraphSlot, args: list):
        """Run one graph of the step (called by its :class:`GraphSlot`)."""
        k = self._occurrence.get(slot, 0)
        self._occurrence[slot] = k + 1
        g = self._by_slot.get((slot, k))
        if g is None:
            if not self._capturing:
                # dynamo compiled a graph the capture call did not see (it specialized on a
                # value that changed, or the code took another path): it runs as traced, and
                # the next call captures the step again
                if not self._changed:
                    log.info("graph %d of the step is new since the capture call; it runs "
                             "unplanned", sum(self._occurrence.values()))
                self._changed = True
                return slot.gm(*args)
            self._region_ends()
            g = CapturedGraph(index=len(self.graphs), slot=slot)
            self.graphs.append(g)
            self._by_slot[slot, k] = g
            with self._paused_hooks():
                self._capture(g, args)
        if g.compiled is None:
            return slot.gm(*args)
        if self._capturing:
            g.input_ptrs = [storage_ptr(t) for t in _tensors(args)]
        with self._paused_hooks():
            out = g.compiled(*args)
        if self._capturing:
            g.outputs = [(storage_ptr(t), tuple(t.shape)) for t in _tensors(out)]
            g.returned = [weakref.ref(t) for t in _tensors(out)]
            self._region_starts()
        return out

    def _region_starts(self) -> None:
        """Eager code begins (the call's start, or a graph has run): on CUDA, measure its peak
        from here. (The capture call's own peak is not a step's: nothing else reads it.)"""
        if self._on_cuda():
            self._region_base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def _region_ends(self) -> None:
        """A graph is about to run: the eager code before it has ended. (After a graph that
        could not be captured, the next region is measured from the same start: that graph ran
        eagerly too.)"""
        if self._region_base is not None:
            region = len(self.graphs) - 1
            peak = torch.cuda.max_memory_allocated() - self._region_base
            self._eager_peak[region] = max(self._eager_peak.get(region, 0), peak)

    def _on_cuda(self) -> bool:
        p = next(self.module.parameters(), None)
        return p is not None and p.is_cuda

    @contextlib.contextmanager
    def _paused_hooks(self):
        """Graphs save through AOTAutograd, which the profile counts: the eager-memory hooks
        stay off while one is compiled or runs."""
        hooks = self._hooks
        if hooks is None:
            yield
            return
        hooks.__exit__(None, None, None)
        try:
            yield
        finally:
            hooks.__enter__()

    @_not_traced
    def _pack(self, t: torch.Tensor):
        ptr = storage_ptr(t)
        if ptr and ptr not in self._own_ptrs:
            self._eager_saved.setdefault(len(self.graphs) - 1, {})[ptr] = _nbytes(t)
        return t

    # -- capture and compile ------------------------------------------------------------------

    def _capture(self, g: CapturedGraph, args: list) -> None:
        def first_partition(joint: JointGraph):
            g.joint = joint
            g.measured = measure_joint(joint, registry=self._registry,
                                       swap=self.host_swap, **self.measure_options)
            # (weakly: whether FSDP empties them when forward ends, _resharded says)
            g.carried = [(p, weakref.ref(v)) for p, v, r in zip(
                joint.primals, joint.primal_values, joint.primal_roles) if r.kind == "carried"]
            joint.primal_values = [v if r.kind == "parameter" else None
                                   for v, r in zip(joint.primal_values, joint.primal_roles)]
            # (op by op: the provisional partition runs for the capture call only)
            g.planned = PlannedStep(joint, _provisional_plan(joint, g.measured, self.host_swap))
            g.saved_B = _saved_bytes(g.planned)
            return g.planned.shells()

        if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            g.error = "no input requires a gradient"
            return
        try:
            g.compiled = aot_compile(g.slot.gm, args, self.module, first_partition,
                                     lasting=self._lasting,
                                     lasting_storages=self._param_ptrs,
                                     on_backward=functools.partial(_backward_ran,
                                                                   weakref.ref(self), g.index))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # this graph stays as dynamo traced it
            g.joint, g.measured, g.compiled, g.planned = None, None, None, None
            g.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}"
            log.info("graph %d of the step could not be captured: %s", g.index + 1, g.error)
        if g.compiled is not None and g.joint is None:
            g.error = "nothing in it needs a gradient"  # AOTAutograd compiled it for inference

    def _backward_ran(self, index: int) -> None:
        if self.profile is None and index not in self.backward_order:
            self.backward_order.append(index)

    # -- planning -----------------------------------------------------------------------------

    def finalize(self) -> None:
        """Assemble the graphs' measurements into the step's profile, plan it, and mark each
        graph to be compiled again with its part of the plan."""
        t0 = time.perf_counter()
        captured = self.captured
        if not captured:
            raise RuntimeError("no graph of the step could be captured")
        self.eager = self._eager_memory()
        params = [p for p in self.module.parameters() if p.requires_grad]
        # by storage: parameters that are views of one storage (FSDP1's flat parameters with
        # use_orig_params) take its bytes once, and none where a graph takes in a view of it
        in_graphs = {storage_ptr(v) or id(v) for g in captured for v in g.joint.primal_values
                     if v is not None}
        eager_param_B = sum({storage_ptr(p) or id(p): _nbytes(p) for p in params
                             if (storage_ptr(p) or id(p)) not in in_graphs}.values())
        order = [i for i in self.backward_order]
        position = {g.index: k for k, g in enumerate(captured)}
        self.profile = profile_graphs(
            [g.joint for g in captured], [g.measured for g in captured], self.optimizer, params,
            backward_order=[position[i] for i in order if i in position],
            handed_on=self._handed_on(), eager=self.eager, eager_param_B=eager_param_B,
            previous_grads=self.previous_grads,
            **{k: v for k, v in self.measure_options.items()
               if k in ("runs", "warmup", "cold_l2")})  # (the rest is for the graphs)
        for g in captured:
            g.measured = None  # the profile has what it measured
        self.use(self.make_plan(self.profile))
        self.planning_s = time.perf_counter() - t0

    def use(self, plan: Plan) -> None:
        """Run ``plan`` (made on :attr:`profile`) from the next call on: each graph's partition
        is replaced in place (:class:`~lightning_ac.rewriter.PlannedStep`)."""
        self.plan = plan
        for g in self.captured:
            g.plan = restrict(plan, g.joint.graph)
            g.planned.kernels = self.kernels
            g.planned.use(g.plan)
            g.saved_B = _saved_bytes(g.planned)

    def _eager_memory(self) -> list[EagerMemory]:
        """What eager code saved for backward, per region, less what graphs hold (their inputs
        and outputs are counted with the graphs)."""
        counted = {p for g in self.graphs for p in [*g.input_ptrs, *(p for p, _ in g.outputs)]}
        position = {g.index: k for k, g in enumerate(self.captured)}
        out = []
        for after in sorted({*self._eager_saved, *self._eager_peak}):
            saved = self._eager_saved.get(after, {})
            nbytes = sum(b for p, b in saved.items() if p not in counted)
            # above what it keeps, what the code allocates while it runs (the next graph's
            # inputs among it: they are not live yet where this is counted)
            peak = max(0, self._eager_peak.get(after, 0) - nbytes)
            # eager code after a graph that was not captured belongs with the last captured one
            k = max((position[i] for i in position if i <= after), default=-1)
            if nbytes or peak:
                out.append(EagerMemory(after_graph=k, saved_B=nbytes, peak_B=peak))
        return out

    def _handed_on(self) -> list[tuple[fx.Node, fx.Node]]:
        """(output of a graph, input of a later graph) pairs that are the same tensor in the
        capture call: one storage, which the profile counts once."""
        made: dict[int, fx.Node] = {}  # storage address -> the forward output that made it
        pairs = []
        for g in self.captured:
            for ptr, primal in zip(g.input_ptrs, g.joint.primals):
                if ptr in made:
                    pairs.append((made[ptr], primal))
            for i, node in _returned_nodes(g):
                made.setdefault(g.outputs[i][0], node)
        return pairs


def _returned_nodes(g: CapturedGraph) -> Iterator[tuple[int, fx.Node]]:
    """(index among the tensors ``g`` returned in the capture call, the joint graph's forward
    output it is). The compiled function returns the user outputs, which AOTAutograd puts last
    among the forward outputs (after updated buffers); shapes must agree."""
    fwd_outputs = g.joint.outputs()[:g.joint.num_fwd_outputs]
    for i, node in zip(reversed(range(len(g.outputs))), reversed(fwd_outputs)):
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(val, torch.Tensor) and tuple(val.shape) == g.outputs[i][1]:
            yield i, node


@contextlib.contextmanager
def forwards_uncompiled(module: nn.Module):
    """Run the step with the user's own ``torch.compile`` of submodules' ``forward`` (an instance
    attribute: ``m.forward = torch.compile(m.forward)``) taken off: dynamo inlines a compiled
    function into a graph that has no breaks, but a step it splits would call the user's compiled
    function as its own frame, whose graphs go to inductor and none to this step (on GPT-2 no
    graph reached it, and AC turned off). The step's graphs then contain that code, planned."""
    taken = []
    for m in module.modules():
        f = m.__dict__.get("forward")
        orig = getattr(f, "_torchdynamo_orig_callable", None)
        if orig is None:
            continue
        taken.append((m, f))
        if getattr(orig, "__func__", orig) is type(m).forward:
            del m.forward  # the class's own forward
        else:
            m.forward = orig
    try:
        yield
    finally:
        for m, f in taken:
            m.forward = f


def _backward_ran(step: weakref.ref, index: int) -> None:
    """What a graph's compiled backward calls. It holds the step weakly: AOTAutograd's compiled
    function (now the runtime of every step, see :class:`~lightning_ac.rewriter.PlannedStep`)
    survives the first garbage collection after the step is dropped, and through a strong
    reference the model did too (``test_a_split_step_lets_its_model_go``)."""
    s = step()
    if s is not None:
        s._backward_ran(index)


def _saved_bytes(planned: PlannedStep) -> int:
    return _forward_saves_B(planned.forward_graph, planned.joint.num_fwd_outputs)


def _forward_saves_B(fwd: fx.GraphModule, num_fwd_outputs: int) -> int:
    """Bytes a partitioned forward hands to backward (by the traced sizes)."""
    (out,) = fwd.graph.find_nodes(op="output")
    return sum(_value_bytes(n) for n in out.args[0][num_fwd_outputs:] if isinstance(n, fx.Node))


def _value_bytes(n: fx.Node) -> int:
    val = n.meta.get("val")
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0


def _provisional_plan(joint: JointGraph, measured: GraphProfiler, swap: bool) -> Plan:
    """The capture call's partition of one graph: every activation saved; with ``swap``, each
    one that can be kept in host memory until backward is (the step's plan does not exist yet,
    and the un-checkpointed step may not fit)."""
    kept = [n for n in joint.graph.nodes
            if n.op == "call_function" and not joint.is_backward(n) and is_tensor_node(n)
            and any(joint.is_backward(u) for u in n.users)]
    swapped = []
    if swap:
        # a saved value frees its memory when swapped if it alone covers one storage the graph
        # made (often a view of an op's output: the op's result itself is not saved)
        holders = Counter(id(st) for n in kept for st in measured.storage_of.get(n, []))
        for n in kept:
            storages = measured.storage_of.get(n, [])
            if len(storages) == 1 and holders[id(storages[0])] == 1 \
                    and not storages[0].persistent and storages[0].creator is not None \
                    and storages[0].creator.op != "placeholder" \
                    and can_swap_value(n, storages[0].nbytes):
                swapped.append(n)
    return Plan(budget_B=None, baseline_peak_B=0, predicted_peak_B=0, predicted_extra_ms=0.0,
                stop_reason="capture call", kept=kept, swapped=swapped,
                release_before=_one_behind(joint, swapped))


def _one_behind(joint: JointGraph, swapped: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Release points that keep at most two swapped activations on the device at once: each
    one's device memory is given back once the next one's copy out has been issued (so compute
    waits only for a copy already under way). Released at the forward's end instead, a graph's
    activations would all be on the device together, as without AC."""
    order = {n: i for i, n in enumerate(joint.graph.nodes)}

    def last_forward_use(n: fx.Node) -> int:
        return max((order[u] for u in n.users if not joint.is_backward(u) and u.op != "output"),
                   default=order[n])

    nodes = list(joint.graph.nodes)
    by_last_use = sorted(swapped, key=last_forward_use)
    release = {}
    for x, after in zip(by_last_use, by_last_use[1:]):
        at = last_forward_use(after) + 1
        if at < len(nodes) and not joint.is_backward(nodes[at]):
            release[x] = nodes[at]
    return release


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor that holds ``t``'s memory on this rank (a DTensor's local shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t: torch.Tensor) -> int:
    try:
        return allocated_bytes(_local(t).untyped_storage().nbytes(), t.is_cuda)
    except RuntimeError:
        return 0


@_not_traced
def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


@_not_traced
def _from_host(packed):
    """A saved tensor as backward reads it: back on its device if it went to the host."""
    if isinstance(packed, tuple):
        device, host = packed
        return host.to(device, non_blocking=True)
    return packed
