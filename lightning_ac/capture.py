"""Capture one training iteration as aten-level FX graphs.

Two graphs make the iteration graph:

* the **joint graph**: forward and backward of ``fn(*args)`` (a model's forward, or forward plus
  loss), one ``fx.GraphModule`` from AOTAutograd. Its placeholders are the primals (parameters,
  buffers and batch tensors, lifted by dynamo) and then the tangents; every node is tagged
  forward or backward. The profiler, the planner and the rewriter all work on this one object.
  Right after capture, :func:`lightning_ac.graph_passes.apply_graph_passes` rewrites it so that
  more of it can be recomputed.
* the **optimizer graph**: ``optimizer.step()`` traced with ``make_fx`` over parameters,
  gradients and optimizer state as inputs.

Capturing runs nothing: the dynamo backend stops as soon as AOTAutograd has built the joint graph,
so parameters, buffers (BatchNorm running statistics) and RNG state are left untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import types
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from lightning_ac import _torch_compat as compat
from lightning_ac.errors import CaptureError, describe_capture_failure, unwrap_compile_error
from lightning_ac.graph_passes import apply_graph_passes

log = logging.getLogger(__name__)

__all__ = [
    "CaptureError",
    "GraphSlot",
    "JointGraph",
    "OptimizerGraph",
    "PrimalRole",
    "aot_compile",
    "capture_joint",
    "capture_optimizer_step",
    "compile_graphs",
    "compile_joint",
    "node_value",
    "running",
]


@dataclass(frozen=True)
class PrimalRole:
    """What a joint-graph primal is in the user's program."""

    kind: str
    """``"parameter"``, ``"buffer"``, ``"input"`` (an argument of the step) or ``"carried"``
    (made by an earlier part of the same step that dynamo split)."""
    name: str
    """Qualified name in the module (``"layer1.0.conv1.weight"``) or ``"input<i>"``."""


@dataclass
class JointGraph:
    """The forward+backward graph of one step, with the real tensors it was captured on."""

    gm: fx.GraphModule
    primals: list[fx.Node]
    """Primal placeholders, in call order."""
    primal_values: list[torch.Tensor]
    """The real tensors (parameters are the module's own ``nn.Parameter`` objects)."""
    primal_roles: list[PrimalRole]
    tangents: list[fx.Node]
    num_fwd_outputs: int
    """How many leading outputs belong to the forward (user outputs and mutated buffers)."""
    sizes: list[fx.Node] = field(default_factory=list)
    """Placeholders that are sizes, not tensors (a graph traced with dynamic shapes: the length
    of a batch's sequences), in call order among :attr:`primals`; empty for a static graph."""
    grad_of: dict[fx.Node, int] = field(default_factory=dict)
    """Backward output node → index of the primal whose gradient it is."""
    pinned: list[fx.Node] = field(default_factory=list)
    """Small forward values always saved for backward, so that anything recomputed can read
    them: copies of buffers (:func:`pin_buffers`) and generator states
    (:func:`replayable_random_ops`)."""
    resharded: set[fx.Node] = field(default_factory=set)
    """Carried primals whose memory eager code frees when forward ends and makes again before
    this graph's backward (FSDP's reshard after forward; seen in the capture call: their
    storage was empty once forward had run). Not live in between, even where saved."""
    dropped_outputs: set[fx.Node] = field(default_factory=set)
    """Forward outputs of a graph of a split step that nothing held when forward ended (seen in
    the capture call: an HF model's ``logits`` beside the ``loss`` the step returns); their
    memory lives until then, not through backward, unless something saved aliases it."""

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    @property
    def bindings(self) -> dict:
        """Symbol → size the graph's dynamic sizes stand for: the call it was captured on, or,
        inside :meth:`bound`, a profile's sizes; empty for a static graph. Kept on the graph
        module, so that a node's :func:`node_value` finds it."""
        return self.gm.meta.setdefault(_BINDINGS, {})

    @bindings.setter
    def bindings(self, value: dict) -> None:
        self.gm.meta[_BINDINGS] = dict(value)

    @contextlib.contextmanager
    def bound(self, sizes: dict) -> Iterator[None]:
        """Read node values at ``sizes`` inside the block (a profile scaled to other sizes than
        the capture's: :attr:`~lightning_ac.profiler.Profile.sizes`); nothing changes where
        ``sizes`` is empty."""
        before = dict(self.bindings)
        if sizes:
            self.bindings = sizes
        try:
            yield
        finally:
            self.bindings = before

    @property
    def dynamic(self) -> bool:
        """Whether some sizes in the graph vary from call to call (one graph for all lengths)."""
        return bool(self.sizes)

    def call_args(self, primal_values: Sequence) -> list:
        """The graph's primal arguments in placeholder order: ``primal_values`` (tensors, as
        :attr:`primals`) with the sizes' values (under :attr:`bindings`) in between."""
        values = iter(primal_values)
        sizes = set(self.sizes)
        return [compat.concrete(p.meta["val"], self.bindings) if p in sizes else next(values)
                for p in self.graph.find_nodes(op="placeholder") if not self.is_backward(p)]

    def is_backward(self, node: fx.Node) -> bool:
        """True for nodes of the backward pass (tangents included)."""
        return compat.is_backward_node(node)

    def outputs(self) -> list:
        """The flat list of the joint graph's outputs (forward outputs first, then gradients)."""
        (out,) = self.gm.graph.find_nodes(op="output")
        return list(out.args[0])


class _Captured(Exception):
    """Raised inside the backend to stop compilation once the joint graph is in hand."""

    def __init__(self, joint: JointGraph):
        super().__init__("captured")
        self.joint = joint


def _roles(example_inputs: Sequence, module: nn.Module | None,
           lasting: set[int] | None = None,
           lasting_storages: frozenset[int] = frozenset()) -> list[PrimalRole]:
    """Name each dynamo graph input by identity with the module's parameters and buffers. With
    ``lasting`` (ids of the tensors that last through the step: its arguments, and the module's
    parameters and buffers as the step began), any other input is ``"carried"``: a value made
    inside the same step, by an earlier graph, by eager code, or by FSDP gathering a sharded
    parameter for this graph (a module parameter while it runs, gone after); except a view of
    a storage in ``lasting_storages`` (the parameters' storages), which is a ``"parameter"``:
    FSDP1 with one rank hands its graphs views of the flat parameter itself, memory that
    lasts (counted as carried, it was counted twice)."""
    named: dict[int, PrimalRole] = {}
    if module is not None:
        for name, p in module.named_parameters(remove_duplicate=False):
            named.setdefault(id(p), PrimalRole("parameter", name))
        for name, b in module.named_buffers(remove_duplicate=False):
            named.setdefault(id(b), PrimalRole("buffer", name))
    roles, n_inputs = [], 0
    for t in example_inputs:
        if not isinstance(t, torch.Tensor):  # a dynamic size: not a primal (JointGraph.sizes)
            roles.append(PrimalRole("size", ""))
            continue
        role = named.get(id(t))
        if lasting is not None and id(t) not in lasting:
            if lasting_storages and storage_ptr(t) in lasting_storages:
                role = PrimalRole("parameter", f"view{n_inputs}")
            else:
                role = PrimalRole("carried", f"carried{n_inputs}")
            n_inputs += 1
        elif role is None:
            role = PrimalRole("input", f"input{n_inputs}")
            n_inputs += 1
        roles.append(role)
    return roles


def storage_ptr(t: torch.Tensor) -> int:
    """Address of the storage that holds ``t``'s memory on this rank (a DTensor's local
    shard's); 0 where it has none (a tensor subclass without a storage of its own)."""
    try:
        return (t.to_local() if hasattr(t, "to_local") else t).untyped_storage().data_ptr()
    except RuntimeError:
        return 0


def _build_joint(joint_gm: fx.GraphModule, example_inputs: list, roles: list[PrimalRole],
                 num_fwd_outputs: int) -> JointGraph:
    compat.eliminate_common_subexpressions(joint_gm)
    placeholders = list(joint_gm.graph.find_nodes(op="placeholder"))
    tangents = [p for p in placeholders if compat.is_backward_node(p)]
    # (a size dynamo traced as varying is a SymInt here, or a plain int where AOTAutograd
    # traced the graph outside dynamo, on one call's values: a step of several graphs)
    sizes = [p for p in placeholders if not compat.is_backward_node(p)
             and isinstance(p.meta.get("val"), (torch.SymInt, int))]
    primals = [p for p in placeholders if not compat.is_backward_node(p) and p not in sizes]
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    if len(primals) != len(tensors):
        raise CaptureError(
            f"the joint graph has {len(primals)} primal inputs but dynamo passed {len(tensors)} "
            "tensors; inputs that are not tensors (or duplicated inputs) are not supported yet"
        )
    bindings = _bindings(primals, tensors)
    for node, t in zip(primals, tensors):
        val = node.meta.get("val")
        if val is not None and list(compat.concrete(tuple(val.shape), bindings)) != list(t.shape):
            raise CaptureError(f"primal {node.name} has shape {tuple(val.shape)} but the example "
                               f"input has {tuple(t.shape)}: inputs were reordered")
    joint = JointGraph(gm=joint_gm, primals=primals, primal_values=tensors,
                       primal_roles=[r for r, t in zip(roles, example_inputs)
                                     if isinstance(t, torch.Tensor)],
                       tangents=tangents, num_fwd_outputs=num_fwd_outputs, sizes=sizes)
    joint.bindings = bindings
    grads = joint.outputs()[num_fwd_outputs:]
    # AOTAutograd returns one gradient slot per primal (sizes too: theirs is None), or one per
    # primal that requires grad.
    tensor_index = iter(range(len(tensors)))
    inputs = [p for p in placeholders if not compat.is_backward_node(p)]
    if len(grads) == len(inputs) and sizes:
        owners = [None if p in sizes else next(tensor_index) for p in inputs]
    elif len(grads) == len(tensors):
        owners = list(range(len(tensors)))
    else:
        owners = [i for i, t in enumerate(tensors) if t.requires_grad]
    if len(owners) != len(grads):
        raise CaptureError(f"cannot align {len(grads)} gradient outputs with {len(tensors)} primals")
    joint.grad_of = {g: i for g, i in zip(grads, owners)
                     if isinstance(g, fx.Node) and i is not None}
    apply_graph_passes(joint)
    log.debug("captured a joint graph of %d nodes (%d primals, %d forward outputs)",
              len(joint_gm.graph.nodes), len(primals), num_fwd_outputs)
    return joint


def _bindings(primals: list[fx.Node], tensors: list[torch.Tensor]) -> dict:
    """The value of each dynamic size of a graph in this call: read off the real inputs,
    dimension by dimension (every size symbol dynamo makes stands for some input's dimension or
    stride, such as the stride of a batch of one; one that does not is unbound, and reading a
    value that needs it raises ``KeyError``)."""
    out = {}
    for node, t in zip(primals, tensors):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            for size, real in (*zip(val.stride(), t.stride()), *zip(val.shape, t.shape)):
                sym = compat.size_symbol(size)
                if sym is not None:
                    out[sym] = int(real)
    return out


_BINDINGS = "mutwo_bindings"


def node_value(node: fx.Node):
    """``node``'s traced value (``meta["val"]``), with dynamic sizes at the values its joint graph
    is profiled at (:attr:`JointGraph.bindings`): what the profiler, planner and rewriter read
    to count bytes. Other graphs' values as they are."""
    val = node.meta.get("val")
    gm = node.graph.owning_module
    bindings = gm.meta.get(_BINDINGS) if gm is not None else None
    return compat.concrete(val, bindings) if bindings else val


def compile_joint(fn: Callable, module: nn.Module | None,
                  partition: Callable[[JointGraph], tuple[fx.GraphModule, fx.GraphModule]],
                  *, dynamic: bool = False) -> Callable:
    """``torch.compile`` ``fn`` so that ``partition(joint)`` decides its forward/backward split.

    On the first call, dynamo traces ``fn`` with the real arguments, AOTAutograd builds the joint
    graph, and ``partition`` receives it as a :class:`JointGraph` (with the real primals) and
    returns the forward and backward modules to run, compiled with the boxed calling convention.
    Later calls with the same shapes run those modules. A graph break raises at the first call.

    Dynamo keeps what it compiles on the code object it starts from, and stops compiling one
    code object after a few entries (its recompile limit, 8): compiling a fresh model's
    ``forward`` for the 9th fit in a process (a hyper-parameter search, k-fold, a notebook)
    would fail, and the user's own compiled ``forward`` would share our entries. So dynamo
    starts from an entry function of our own, with a code object made for this call only, and
    inlines ``fn`` into it; its compiled code goes when the returned function goes.

    Dynamo also keeps every backend it was given until ``torch._dynamo.reset()``, and AOTAutograd
    (on torch 2.11) the partition function with the compiled step. Ours reach ``module`` and
    ``partition`` (the planner, its profile) only through the returned function, by a weak
    reference, so that a model whose plan is dropped can be freed.

    With ``dynamic``, the dimensions of the arguments marked with
    :func:`~lightning_ac._torch_compat.mark_dims_dynamic` before the first call are traced as
    sizes that vary: one graph, and one partition, for every length.
    """
    needs = _BackendNeeds(module, partition)
    needs_ref = weakref.ref(needs)

    def backend(gm: fx.GraphModule, example_inputs: list):
        needs = needs_ref()
        if needs is None:
            raise CaptureError("the planned step was removed; nothing to compile it for")
        key = _compile_key(gm)
        if key in needs.compiled:
            # Dynamo traced the step again (a guard on Python state the first call changed,
            # such as the `config.problem_type` HF's classifiers set) into the same graph: the
            # step compiled and planned for it serves, without a second capture and profile.
            log.debug("dynamo traced the step again into the same graph: reusing its plan")
            return needs.compiled[key]
        module = needs.module
        del needs

        def partition_now(joint: JointGraph):
            needs = needs_ref()
            if needs is None:
                raise CaptureError("the planned step was removed; nothing to partition it for")
            return needs.partition(joint)

        compiled = aot_compile(gm, example_inputs, module, partition_now)
        needs = needs_ref()
        if needs is not None:
            needs.compiled[key] = compiled
        return compiled

    step = _one_graph_under_one_rank_ddp(
        torch.compile(own_entry(fn), backend=backend, fullgraph=True,
                      dynamic=None if dynamic else False), module)
    step.mutwo_backend_needs = needs  # what keeps them alive
    return step


def aot_compile(gm: fx.GraphModule, example_inputs: list, module: nn.Module | None,
                partition: Callable[[JointGraph], tuple[fx.GraphModule, fx.GraphModule]], *,
                lasting: set[int] | None = None, lasting_storages: frozenset[int] = frozenset(),
                on_backward: Callable[[], None] | None = None) -> Callable:
    """Compile dynamo's graph ``gm`` with AOTAutograd, ``partition(joint)`` choosing the forward
    and backward modules (boxed, ready to run) from the :class:`JointGraph` built on
    ``example_inputs`` (real tensors; ``lasting`` and ``lasting_storages`` as for the primals'
    roles, see :func:`_roles`).
    ``on_backward`` is called each time the backward runs.
    Returns AOTAutograd's compiled function."""
    roles = _roles(example_inputs, module, lasting, lasting_storages)
    # What AOTAutograd keeps of partition_fn (torch 2.11 keeps it with the compiled step) must
    # not hold the real tensors (parameters, the first batch): they are reached through a list
    # emptied once the partition is done.
    pending = [example_inputs]

    def partition_fn(joint_gm, joint_inputs, *, num_fwd_outputs, **kwargs):
        if not pending:
            raise CaptureError("the step was compiled already; nothing to partition")
        try:
            return partition(_build_joint(joint_gm, pending[0], roles, num_fwd_outputs))
        finally:
            pending.clear()

    def already_compiled(gm, _inputs):  # partition returns ready-to-run boxed modules
        runtime = gm.meta.get("mutwo_runtime")  # (or stand-ins for them: PlannedStep)
        return gm if runtime is None else runtime.fn

    def announcing(gm, _inputs):
        run = already_compiled(gm, _inputs)

        def backward(args):
            on_backward()
            return run(args)

        backward._boxed_call = True
        return backward

    return compat.aot_backend(partition_fn, already_compiled,
                              already_compiled if on_backward is None else announcing
                              )(gm, example_inputs)


# --------------------------------------------------------------------------------------------
# A step dynamo splits into several graphs
# --------------------------------------------------------------------------------------------

_running_step: contextvars.ContextVar = contextvars.ContextVar("lightning_ac_step", default=None)


class GraphSlot:
    """One graph of a step that dynamo splits (graph breaks, modules it leaves to eager), as
    dynamo caches it: on the user's code objects, under its guards.

    Every step compiled by :func:`compile_graphs` shares one backend, so that dynamo reuses its
    graphs across fits and models of the same code, and a 9th fit does not hit its per-code
    recompile limit (a new backend per fit would: backends are part of dynamo's guards). Which
    compiled version of the graph runs is the running step's choice, per call
    (``step.run_graph(slot, args)``); outside a step the graph runs as dynamo traced it.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm

    def __call__(self, *args):
        step = _running_step.get()
        if step is None:
            return self.gm(*args)
        return step.run_graph(self, list(args))


def _graph_backend(gm: fx.GraphModule, example_inputs: list) -> GraphSlot:
    """The one backend of :func:`compile_graphs`: compiles nothing until a step runs the graph
    (the real inputs then are what capture and profiling need)."""
    return GraphSlot(gm)


def compile_graphs(fn: Callable, module: nn.Module | None = None) -> Callable:
    """``torch.compile`` ``fn`` into as many graphs as dynamo needs; call the result inside
    :func:`running` so that each graph goes to that step's ``run_graph``.

    With automatic dynamic sizes: the frames after a graph break are the user's own, and dynamo
    compiles a frame once per set of static sizes up to its recompile limit (8), after which it
    runs the frame uncompiled and no graph of it reaches a step (a ninth sequence length turned
    AC off). A size that changes is traced as varying from its second value on; each step still
    captures its graphs at its own call's sizes (AOTAutograd traces them outside dynamo, the
    sizes as plain ints). Under a DDP of one rank (``module``, or the DDP whose forward is
    running) it is not cut at DDP's buckets (:func:`~lightning_ac._torch_compat.
    one_graph_under_one_rank_ddp`)."""
    return _one_graph_under_one_rank_ddp(
        torch.compile(own_entry(fn), backend=_graph_backend, dynamic=None), module)


def _one_graph_under_one_rank_ddp(compiled: Callable, module: nn.Module | None) -> Callable:
    """``compiled``, called with dynamo's DDP optimizer off where DDP has one rank (the module
    reached by a weak reference: the returned function must not keep it alive)."""
    module_ref = weakref.ref(module) if module is not None else lambda: None

    def step(*args, **kwargs):
        with compat.one_graph_under_one_rank_ddp(module_ref()):
            return compiled(*args, **kwargs)

    return step


@contextlib.contextmanager
def running(step) -> Iterator[None]:
    """Make ``step`` the one whose ``run_graph`` the graphs of :func:`compile_graphs` call."""
    token = _running_step.set(step)
    try:
        yield
    finally:
        _running_step.reset(token)


@dataclass(eq=False)
class _BackendNeeds:
    """What :func:`compile_joint`'s backend reads, held by the compiled function alone."""

    module: nn.Module | None
    partition: Callable[[JointGraph], tuple[fx.GraphModule, fx.GraphModule]]
    compiled: dict[str, Callable] = field(default_factory=dict)
    """Each graph compiled so far (:func:`_compile_key`) → AOTAutograd's compiled step."""


def _compile_key(gm: fx.GraphModule) -> str:
    """What the step AOTAutograd compiles from dynamo's graph ``gm`` depends on: the graph and
    its inputs (:func:`~lightning_ac._torch_compat.graph_signature`), and the autocast and
    grad-mode state it is traced under."""
    state = [torch.is_grad_enabled()]
    for device in ("cpu", "cuda"):
        state += [torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)]
    return f"{state}\n{compat.graph_signature(gm)}"


def _calling(fn: Callable) -> Callable:
    def entry(*args, **kwargs):
        return fn(*args, **kwargs)

    return entry


_entries = itertools.count()


def own_entry(fn: Callable) -> Callable:
    """A function that calls ``fn``, with a code object no other function has (see
    :func:`compile_joint`: dynamo's caches and recompile limits are per code object)."""
    shared = _calling(fn)  # its code object is the same for every call of _calling
    code = shared.__code__.replace(co_name=f"mutwo_step_{next(_entries)}")
    entry = types.FunctionType(code, shared.__globals__, code.co_name, None, shared.__closure__)
    entry.__qualname__ = f"{getattr(fn, '__qualname__', code.co_name)} (MuTwoAC)"
    entry.__wrapped__ = fn
    return entry


def capture_joint(fn: Callable, args: Sequence, module: nn.Module | None = None) -> JointGraph:
    """Capture ``fn(*args)``'s forward and backward as one aten-level joint graph.

    Nothing runs: compilation stops as soon as the joint graph exists.

    Args:
        fn: the function to capture: a module's forward, or a closure computing the loss.
        args: example arguments; tensors of the real batch, on the real device.
        module: the module whose parameters and buffers ``fn`` uses, to name the primals.

    Raises:
        CaptureError: ``fn`` does not trace as one graph (graph break, data-dependent control
            flow, unsupported op), or nothing in it requires a gradient.
    """

    def stop(joint: JointGraph):
        raise _Captured(joint)

    try:
        compile_joint(fn, module, stop)(*args)
    except Exception as exc:  # dynamo wraps backend errors; find ours underneath
        found = unwrap_compile_error(exc, (_Captured, CaptureError))
        if isinstance(found, _Captured):
            return found.joint
        if found is not None:
            raise found from exc
        raise describe_capture_failure(fn, exc) from exc
    raise CaptureError(
        "no joint graph was produced: nothing in the step requires a gradient "
        "(are the parameters frozen, or is this running under torch.no_grad()?)"
    )




# --------------------------------------------------------------------------------------------
# Optimizer step
# --------------------------------------------------------------------------------------------


@dataclass
class OptimizerGraph:
    """``optimizer.step()`` traced over (parameters, gradients, state tensors) as inputs."""

    gm: fx.GraphModule
    params: list[fx.Node]
    grads: list[fx.Node]
    states: list[fx.Node]
    param_values: list[torch.Tensor]
    """Shadow copies of the parameters: running the graph updates these, never the model."""
    state_values: list[torch.Tensor]
    param_index: list[int]
    """For each parameter placeholder, the index in the ``params`` list passed at capture."""
    note: str = ""

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def release(self) -> None:
        """Free the shadow parameters and state (as large as parameters + optimizer state)."""
        self.param_values, self.state_values = [], []


@contextlib.contextmanager
def _swapped_into(optimizer: torch.optim.Optimizer, groups: list[list[torch.Tensor]],
                  state: dict) -> Iterator[None]:
    """Point ``optimizer`` at other parameter tensors and state for the duration."""
    saved = [g["params"] for g in optimizer.param_groups], optimizer.state
    try:
        for g, ps in zip(optimizer.param_groups, groups):
            g["params"] = ps
        optimizer.state = state
        yield
    finally:
        for g, ps in zip(optimizer.param_groups, saved[0]):
            g["params"] = ps
        optimizer.state = saved[1]


def _is_state_tensor(v) -> bool:
    # 0-dim step counters stay Python-side constants: the single-tensor Adam reads them with
    # .item(), which make_fx cannot trace when they are graph inputs.
    return isinstance(v, torch.Tensor) and v.dim() > 0


def capture_optimizer_step(optimizer: torch.optim.Optimizer,
                           params: Sequence[torch.Tensor]) -> OptimizerGraph:
    """Trace one ``optimizer.step()`` as an aten graph over parameters, gradients and state.

    Works on shadow copies: parameters are cloned and the optimizer state is initialised on the
    clones by one real step, so neither the model nor the optimizer's state changes. The step is
    traced as the optimizer is configured; if that cannot be traced (the single-tensor Adam reads
    its step counter on the host), it is traced with ``foreach=True`` and ``note`` says so.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        params: the tensors that will get gradients, in order (the joint graph's primals);
            parameters of the optimizer not in this list are left out.
    """
    index_of = {id(p): i for i, p in enumerate(params)}
    groups = [[p for p in g["params"] if id(p) in index_of] for g in optimizer.param_groups]
    flat = [p for g in groups for p in g]
    if not flat:
        raise CaptureError("the optimizer holds none of the captured parameters")
    shadows = [p.detach().clone() for p in flat]
    grads = [torch.ones_like(p) for p in flat]
    shadow_groups, k = [], 0
    for g in groups:
        shadow_groups.append(shadows[k:k + len(g)])
        k += len(g)

    shadow_state: dict = defaultdict(dict)
    with _swapped_into(optimizer, shadow_groups, shadow_state), torch.no_grad():
        for s, g in zip(shadows, grads):
            s.grad = g
        optimizer.step()  # initialises the state (on the shadows) as a first real step would
        for s in shadows:
            s.grad = None
    state_keys = [(i, key) for i, s in enumerate(shadows)
                  for key, v in shadow_state[s].items() if _is_state_tensor(v)]
    state_values = [shadow_state[shadows[i]][key] for i, key in state_keys]

    def step(ps, gs, ss):
        state: dict = defaultdict(dict)
        for i, p in enumerate(ps):  # constants (step counters, flags) carried over as they are
            state[p].update({k: v for k, v in shadow_state[shadows[i]].items()
                             if not _is_state_tensor(v)})
        for (i, key), t in zip(state_keys, ss):
            state[ps[i]][key] = t
        pg, j = [], 0
        for g in groups:
            pg.append(list(ps[j:j + len(g)]))
            j += len(g)
        with _swapped_into(optimizer, pg, state):
            for p, g in zip(ps, gs):
                p.grad = g
            optimizer.step()
            for p in ps:
                p.grad = None

    from torch.fx.experimental.proxy_tensor import make_fx

    note = ""
    try:
        gm = make_fx(step)(shadows, grads, state_values)
    except RuntimeError as exc:
        if "foreach" not in optimizer.defaults:
            raise CaptureError(f"cannot trace {type(optimizer).__name__}.step(): {exc}") from exc
        saved = [g.get("foreach") for g in optimizer.param_groups]
        try:
            for g in optimizer.param_groups:
                g["foreach"] = True
            gm = make_fx(step)(shadows, grads, state_values)
        finally:
            for g, f in zip(optimizer.param_groups, saved):
                g["foreach"] = f
        note = ("traced with foreach=True: the configured single-tensor step reads its step "
                "counter on the host and cannot be traced")
    _drop_profiler_markers(gm)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    n = len(flat)
    return OptimizerGraph(
        gm=gm, params=placeholders[:n], grads=placeholders[n:2 * n],
        states=placeholders[2 * n:], param_values=shadows, state_values=state_values,
        param_index=[index_of[id(p)] for p in flat], note=note,
    )


def _drop_profiler_markers(gm: fx.GraphModule) -> None:
    """Remove ``record_function`` enter/exit nodes that ``optimizer.step()`` leaves in a trace.

    Walking backwards erases each exit node before the enter node it consumes.
    """
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "call_function" and "profiler" in str(node.target) and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
