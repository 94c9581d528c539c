"""Apply a plan: partition the profiled joint graph by it and run the result as the forward.

:func:`partition` splits the *same* joint graph the profiler measured and the planner planned on:
the forward saves the kept activations (and whatever primals backward reads), the backward
re-runs the forward nodes it needs to rebuild the dropped ones, each just before its first use,
and the activations the plan swaps wait in host memory (:func:`insert_swaps`).
:func:`compile_with_plan` wraps a function so that on its first call the joint graph is captured,
handed to a planning function, and partitioned by the plan it returns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import operator
import weakref
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

from lightning_ac import _torch_compat as compat
from lightning_ac.capture import JointGraph, compile_joint, node_value
from lightning_ac.codegen import InductorGraph, has_symbolic_sizes
from lightning_ac.errors import CaptureError
from lightning_ac.graph_passes import use_replays
from lightning_ac.planner import Plan

__all__ = ["KERNELS", "PlannedStep", "compile_with_plan", "decode_plan", "empty_saved_tensors", "encode_plan",
           "getitems_after_their_op", "graph_fingerprint", "insert_swaps", "partition",
           "restrict", "retarget", "saved_values"]


def saved_values(joint: JointGraph, plan: Plan) -> list[fx.Node]:
    """What the forward hands to backward: the kept activations, the pinned values (buffer
    copies, generator states), the empty tensors backward reads, and the primals.

    Saved values that backward does not read are dropped by the partition itself; views of kept
    values (``detach``, ``t``) are recomputed for free.
    """
    return list(dict.fromkeys([*plan.kept, *joint.pinned, *empty_saved_tensors(joint),
                               *joint.primals]))


def empty_saved_tensors(joint: JointGraph) -> list[fx.Node]:
    """Forward tensors with no elements that backward reads: cuDNN BatchNorm's reserve space.

    They hold no memory, so the profile has no storage for them and the plan never lists them;
    left unsaved, backward would re-run the whole op that made them (every BatchNorm, +13% step
    time on ResNet-152 with nothing else recomputed, measured on the H100).
    """
    out = []
    for n in joint.graph.nodes:
        val = node_value(n)
        if (n.op == "call_function" and isinstance(val, torch.Tensor) and val.numel() == 0
                and not joint.is_backward(n) and any(joint.is_backward(u) for u in n.users)):
            out.append(n)
    return out


def partition(joint: JointGraph, plan: Plan) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Forward and backward modules for ``plan``, compiled with the boxed calling convention."""
    fwd, bwd = compat.extract_fwd_bwd(joint.gm, saved_values(joint, plan), joint.num_fwd_outputs)
    if plan.recomputed or plan.swapped:
        # each recomputed node, and each view of a saved value (which the partition computes at
        # the start of backward), just before its first use
        bwd = compat.reorder_backward(bwd)
        getitems_after_their_op(bwd)
    use_replays(bwd)  # random ops backward re-runs draw what forward drew
    if plan.swapped:
        insert_swaps(fwd, bwd, plan, joint.graph, joint.num_fwd_outputs)
    return compat.use_boxed_calling_convention(fwd), compat.use_boxed_calling_convention(bwd)


def _aliases_in(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """``node`` and the nodes of ``gm`` that view its memory (view ops, and getitems of them)."""
    out, stack = [node], [node]
    while stack:
        for u in stack.pop().users:
            view = getattr(u.target, "is_view", False) or (
                u.target is operator.getitem and u.args[0] in out)
            if u.op == "call_function" and view and u not in out:
                out.append(u)
                stack.append(u)
    return out


def insert_swaps(fwd: fx.GraphModule, bwd: fx.GraphModule, plan: Plan, joint: fx.Graph,
                 num_fwd_outputs: int = 0) -> int:
    """Keep ``plan.swapped`` activations in host memory between forward and backward.

    Forward calls :func:`~lightning_ac.swapping.swap_out` after the last use of the activation
    (or of a view of it) and saves the host tensor in its place, and
    :func:`~lightning_ac.swapping.swap_release` before the node the plan says (the first forward
    node at or after it in ``joint``'s order, the graph the plan was made on; one call for all
    the activations released there); backward calls
    :func:`~lightning_ac.swapping.swap_in` before the node the plan says (or before the first
    use, if reordering put that earlier) and :func:`~lightning_ac.swapping.swap_wait` just before
    the first use. Nodes match across the joint, forward and backward graphs by name (the
    partition keeps names). A value the forward also returns (its first ``num_fwd_outputs``
    outputs) is not swapped: its caller holds it on the device anyway. The slots (events, host
    buffers) live as long as either graph. Returns how many activations it swapped.
    """
    from lightning_ac import swapping

    fnodes = {n.name: n for n in fwd.graph.nodes}
    bnodes = {n.name: n for n in bwd.graph.nodes}
    f_out = fwd.graph.output_node()
    j_pos = {n.name: i for i, n in enumerate(joint.nodes)}
    f_by_joint = sorted((j_pos[n.name], n) for n in fwd.graph.nodes
                        if n.name in j_pos and n.op != "placeholder")
    returned = set(f_out.args[0][:num_fwd_outputs])
    slots = swapping.SlotGroup(len(plan.swapped))
    fwd.swap_slots = bwd.swap_slots = slots
    done = 0
    releases: dict[fx.Node, list[tuple[fx.Node, fx.Node, int]]] = {}
    for x, slot in zip(plan.swapped, slots.ids):
        src, held = fnodes.get(x.name), bnodes.get(x.name)
        if src is None or held is None or held.op != "placeholder" or not held.users \
                or src not in f_out.all_input_nodes or src in returned:
            continue  # not saved as planned, or returned as well: nothing to swap
        val = src.meta.get("val")
        f_pos = {n: i for i, n in enumerate(fwd.graph.nodes)}  # (grows with each swap)
        last = max((u for a in _aliases_in(fwd, src) for u in a.users if u.op != "output"),
                   key=f_pos.__getitem__, default=src)
        with fwd.graph.inserting_after(last):
            host = fwd.graph.call_function(swapping.swap_out, (src, slot))
        host.meta["val"] = val
        f_out.replace_input_with(src, host)
        at = j_pos.get(getattr(plan.release_before.get(x), "name", None))
        release = f_out if at is None else \
            next((n for p, n in f_by_joint if p >= at and f_pos[n] > f_pos[last]), f_out)
        releases.setdefault(release, []).append((host, src, slot))

        b_pos = {n: i for i, n in enumerate(bwd.graph.nodes)}
        first = min(held.users, key=b_pos.__getitem__)
        before = bnodes.get(getattr(plan.prefetch_before.get(x), "name", None))
        if before is None or b_pos[before] > b_pos[first]:
            before = first
        with bwd.graph.inserting_before(before):
            back = bwd.graph.call_function(swapping.swap_in, (held, slot))
        with bwd.graph.inserting_before(first):
            ready = bwd.graph.call_function(swapping.swap_wait, (back, slot))
        back.meta["val"] = ready.meta["val"] = val
        held.replace_all_uses_with(ready, delete_user_cb=lambda u, back=back: u is not back)
        done += 1
    # one release per point, waiting for the last copy out before it (they queue on one stream)
    f_pos = {n: i for i, n in enumerate(fwd.graph.nodes)}
    for release, swaps in releases.items():
        _, _, last_slot = max(swaps, key=lambda s: f_pos[s[0]])
        with fwd.graph.inserting_before(release):
            fwd.graph.call_function(swapping.swap_release,
                                    (tuple(src for _, src, _ in swaps), last_slot))
    fwd.recompile()
    bwd.recompile()
    return done


def getitems_after_their_op(gm: fx.GraphModule) -> None:
    """Move every ``getitem`` of a multi-output op to just after the op.

    The reordering places each node just before its first user, so the getitems of a re-run
    BatchNorm can end up far apart; until the last of them runs, the op's result tuple keeps
    *every* output alive. Taking them all at once lets each output die at its own last use, as
    the simulator assumes.
    """
    for n in list(gm.graph.nodes):
        items = [u for u in n.users if u.op == "call_function" and u.target is operator.getitem]
        anchor = n
        for item in items:  # users keep graph order
            anchor.append(item)
            anchor = item
    gm.recompile()


def retarget(plan: Plan, planned_on: fx.Graph, graph: fx.Graph) -> Plan:
    """``plan``, made on the joint graph ``planned_on``, for ``graph``: another trace of the same
    step (same code, same input shapes), so that a plan can be changed without profiling again.

    Nodes correspond by position. The two traces must run the same ops in the same order: each
    pair of nodes is checked (kind, target, and arguments, nodes among them mapped), and a difference
    raises rather than let a plan land on the wrong values (a silent name mapping between two
    traces is what made an earlier attempt at this project fall back to hand-picked blocks).
    Size inputs that nothing reads are left out: dynamo gives a stride a symbol of its own or not
    by the values it meets (a batch of one sliced from a longer one has a stride that is no size).

    Raises:
        CaptureError: the traces differ; the message names the first node that does.
    """
    old, new = ([n for n in g.nodes if not _unread_size(n)] for g in (planned_on, graph))
    if len(old) != len(new):
        raise CaptureError(f"the step traced again has {len(new)} nodes where the planned one "
                           f"had {len(old)}: it cannot take that plan")
    to_new = {}
    for i, (a, b) in enumerate(zip(old, new)):
        try:
            args = fx.node.map_arg((a.args, a.kwargs), to_new.__getitem__)
        except KeyError:  # reads a node that comes later: not the same graph
            args = None
        # (placeholders by position: their names count the inputs left out above; the output
        # without the Nones that stand for those inputs' gradients)
        if a.op == b.op == "output" and args is not None:
            args, b_args = _without_none(args), _without_none((b.args, b.kwargs))
        else:
            b_args = (b.args, b.kwargs)
        same = a.op == b.op and (a.op == "placeholder" or a.target == b.target) \
            and args == b_args
        if not same:
            raise CaptureError(f"the step traced again differs from the planned one at node {i}: "
                               f"{a.format_node()} against {b.format_node()}")
        to_new[a] = b

    return dataclasses.replace(plan, **_map_nodes(vars(plan), to_new.get))


def _without_none(args_kwargs: tuple) -> tuple:
    """An output node's (args, kwargs) with the Nones of its list of results left out."""
    (results, *rest), kwargs = args_kwargs
    if isinstance(results, (list, tuple)):
        results = type(results)(r for r in results if r is not None)
    return (results, *rest), kwargs


def _unread_size(node: fx.Node) -> bool:
    return node.op == "placeholder" and not node.users and \
        isinstance(node.meta.get("val"), torch.SymInt)


def restrict(plan: Plan, graph: fx.Graph) -> Plan:
    """The part of ``plan`` (made on the profile of a step of several graphs) that concerns
    ``graph``: its nodes only. A swap whose release or prefetch point lies in another graph
    releases at the end of this graph's forward and prefetches at its first use."""
    def mine(x):
        return x if x.graph is graph else None

    fields = {f: [x for x in getattr(plan, f) if x.graph is graph] for f in _NODE_LISTS}
    return dataclasses.replace(plan, **{**_map_nodes(fields | {f: getattr(plan, f)
                                                             for f in _NODE_PAIRS}, mine)})


_NODE_LISTS = ("recomputed", "kept", "recomputed_nodes", "swapped")
_NODE_PAIRS = ("release_before", "prefetch_before")
"""The :class:`Plan` fields that hold nodes: lists of them, and node-to-node mappings."""


def _map_nodes(fields: dict, to) -> dict:
    """The node-valued plan ``fields`` with each node ``x`` replaced by ``to(x)``. Every listed
    node must map; a mapping entry whose either end maps to None is left out (a node of a graph
    the plan was not made on, such as the optimizer's)."""
    out = {f: [to(x) for x in fields[f]] for f in _NODE_LISTS}
    if any(x is None for f in _NODE_LISTS for x in out[f]):
        raise CaptureError("the plan names nodes that are not in this graph")
    for f in _NODE_PAIRS:
        pairs = ((to(k), to(v)) for k, v in _items(fields[f]))
        out[f] = {k: v for k, v in pairs if k is not None and v is not None}
    return out


def _items(pairs):
    """A node mapping's pairs, held as a dict (a plan) or as a list of pairs (sent data)."""
    return pairs.items() if isinstance(pairs, dict) else pairs


def graph_fingerprint(graph: fx.Graph) -> str:
    """A digest of what ``graph`` computes, equal for two traces of the same step on any rank:
    each node's kind, target and arguments, nodes written as positions and devices as their
    type (rank 0 traces on ``cuda:0``, rank 1 on ``cuda:1``)."""
    pos = {n: i for i, n in enumerate(graph.nodes)}

    def plain(a):
        if isinstance(a, fx.Node):
            return f"%{pos[a]}"
        if isinstance(a, torch.device):
            return a.type
        if isinstance(a, (list, tuple)):
            return [plain(x) for x in a]
        if isinstance(a, dict):
            return {k: plain(v) for k, v in a.items()}
        return repr(a)

    h = hashlib.sha256()
    for n in graph.nodes:
        target = n.target if isinstance(n.target, str) else \
            getattr(n.target, "__qualname__", None) or str(n.target)
        h.update(repr((n.op, target, plain(n.args), plain(n.kwargs))).encode())
    return h.hexdigest()


def encode_plan(plan: Plan, graph: fx.Graph) -> dict:
    """``plan`` as plain data (node positions in ``graph``, figures), to send to other ranks;
    :func:`decode_plan` rebuilds it on their own trace of the same step."""
    pos = {n: i for i, n in enumerate(graph.nodes)}
    data = _map_nodes(vars(plan), pos.get)
    data.update({f: list(data[f].items()) for f in _NODE_PAIRS})  # (positions as keys: plain data)
    data.update({f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)
                 if f.name not in (*_NODE_LISTS, *_NODE_PAIRS, "steps")})
    data["fingerprint"] = graph_fingerprint(graph)
    return data


def decode_plan(data: dict, graph: fx.Graph) -> Plan:
    """The plan :func:`encode_plan` made, on ``graph``: another trace of the same step.

    Raises:
        CaptureError: ``graph`` is not the step the plan was made for (fingerprints differ).
    """
    if data["fingerprint"] != graph_fingerprint(graph):
        raise CaptureError("the plan was made for another graph than this rank's step")
    at = list(graph.nodes)
    fields = {k: v for k, v in data.items() if k != "fingerprint"}
    return Plan(**{**fields, **_map_nodes(fields, at.__getitem__)})


KERNELS = ("eager", "inductor")
"""How a partitioned step runs: ``"eager"``, op by op on eager kernels (as the profile measured
them); ``"inductor"``, each graph compiled by inductor at its first call
(:mod:`lightning_ac.codegen`)."""


class PlannedStep:
    """The forward and backward AOTAutograd runs for one compiled step, partitioned by a plan
    that :meth:`use` replaces without compiling the step again.

    ``kernels`` (one of :data:`KERNELS`) says how the partitioned graphs run; a graph traced with
    dynamic sizes runs op by op whatever it says (inductor would compile it again for each).

    AOTAutograd fixes at compile time how many values the forward hands to backward. A new plan
    (for longer sequences, or after a measured excess) saves other values, and compiling again
    means a dynamo and AOTAutograd trace: 13 to 19 s for BERT-base with dynamic sizes on the
    H200 (``reports/shapes``), where the partition alone takes about a second. So AOTAutograd is
    shown graphs (:meth:`shells`) whose forward saves a single value, a handle; the values the
    plan saves wait in a table under that handle, with the backward that reads them. A
    backward therefore always runs the partition its forward ran, also across a switch; the
    handle's entry goes when the backward takes it, or when autograd drops the handle (a
    forward whose backward never runs).
    """

    def __init__(self, joint: JointGraph, plan: Plan, *, kernels: str = "eager"):
        if kernels not in KERNELS:
            raise ValueError(f"kernels={kernels!r}: expected one of {KERNELS}")
        self.joint = joint
        self.kernels = kernels
        self.plan: Plan | None = None
        self._fwd: fx.GraphModule | None = None
        self._bwd: fx.GraphModule | None = None
        self.use(plan)

    def use(self, plan: Plan) -> None:
        """Run ``plan`` (made on :attr:`joint`'s graph) from the next forward on."""
        self._fwd, self._bwd = partition(self.joint, plan)
        self._run_fwd, self._run_bwd = self._fwd, self._bwd
        if self.fused:
            self._run_fwd = InductorGraph(self._fwd, is_backward=False)
            self._run_bwd = InductorGraph(self._bwd, is_backward=True, forward=self._run_fwd)
        self.plan = plan
        # The forward returns its saved tensors, then its saved sizes; backward reads the
        # sizes first (AOTAutograd's convention, which extract_fwd_bwd follows).
        saved = self._fwd.graph.output_node().args[0][self.joint.num_fwd_outputs:]
        self._saved_tensors = sum(not isinstance(x.meta.get("val"), _SIZES) for x in saved)

    @property
    def fused(self) -> bool:
        """Whether the graphs run on inductor's kernels."""
        return self.kernels == "inductor" and not has_symbolic_sizes(self.joint.gm)

    @property
    def on_inductor(self) -> bool:
        """Whether both graphs of the current partition have run as inductor's code (False
        before the first backward, and where inductor could not compile them)."""
        return all(isinstance(r, InductorGraph) and r.compiled
                   for r in (self._run_fwd, self._run_bwd))

    @property
    def compile_s(self) -> float:
        """Seconds inductor took so far to compile the current partition (0 op by op)."""
        runs = (self._run_fwd, self._run_bwd)
        return sum(r.compile_s or 0.0 for r in runs if isinstance(r, InductorGraph))

    @property
    def forward_graph(self) -> fx.GraphModule:
        """The partitioned forward the next call runs (its outputs: the user's, then the
        values it saves for backward)."""
        return self._fwd

    def forward(self, args: list) -> list:
        """AOTAutograd's forward (boxed): the user's outputs, then the handle."""
        outs = self._run_fwd(args)
        k, t = self.joint.num_fwd_outputs, self.joint.num_fwd_outputs + self._saved_tensors
        return [*outs[:k], _put_saved([*outs[t:], *outs[k:t]], self._run_bwd)]

    def backward(self, args: list) -> list:
        """AOTAutograd's backward (boxed): the handle, then the tangents."""
        saved, bwd = _take_saved(args[0])
        saved.extend(args[1:])
        args.clear()
        return bwd(saved)  # (which empties ``saved`` as it goes)

    forward._boxed_call = backward._boxed_call = True

    def shells(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        """What AOTAutograd is given as the partition: graphs with the current forward's
        inputs and outputs and backward's tangents and gradients, and one saved value (the
        handle), that stand for :meth:`forward` and :meth:`backward` (each module's
        ``meta["mutwo_runtime"]``) and never run themselves."""
        fwd, bwd, k = self._fwd, self._bwd, self.joint.num_fwd_outputs
        outs = list(fwd.graph.output_node().args[0])
        like = next(p.meta["val"] for p in fwd.graph.find_nodes(op="placeholder")
                    if isinstance(p.meta.get("val"), torch.Tensor))
        handle_val = compat.as_fake(torch.zeros(1, dtype=torch.int64), like)

        f = fx.Graph()
        env = {p: _copy_placeholder(f, p) for p in fwd.graph.find_nodes(op="placeholder")}
        handle = f.call_function(_never_run, ())
        handle.meta["val"] = handle_val
        f.output([*(_stand_in(f, o, env) for o in outs[:k]), handle])

        saved = outs[k:]
        inputs = list(bwd.graph.find_nodes(op="placeholder"))
        if len(inputs) < len(saved):  # (AOTAutograd's order: the saved values, then tangents)
            raise CaptureError("the backward reads fewer inputs than the forward saves")
        b = fx.Graph()
        held = b.placeholder("mutwo_saved")
        held.meta["val"] = handle_val
        env = {p: _copy_placeholder(b, p) for p in inputs[len(saved):]}
        b.output([_stand_in(b, g, env) for g in bwd.graph.output_node().args[0]])

        shells = fx.GraphModule({}, f), fx.GraphModule({}, b)
        # (in ``meta``: AOTAutograd deep-copies the backward module, which keeps only that)
        shells[0].meta["mutwo_runtime"] = _Runtime(self.forward)
        shells[1].meta["mutwo_runtime"] = _Runtime(self.backward)
        return shells


class _Runtime:
    """What a stand-in graph runs as (``.fn``). AOTAutograd deep-copies the backward module
    before compiling it; a copy must still reach the same step, not a copy of it."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __deepcopy__(self, memo):
        return self


_SIZES = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)
_SAVED: dict[int, tuple[list, Callable | None, Callable]] = {}
_HANDLES = itertools.count()


def _put_saved(values: list, bwd: Callable) -> torch.Tensor:
    """Keep ``values`` for ``bwd`` under a new handle. The tensors among them go through the
    ``saved_tensors_hooks`` in effect, as autograd's saved tensors would (offloading hooks, and
    counts of the saved bytes, see them)."""
    key = next(_HANDLES)
    hooks = compat.saved_tensors_hooks_in_effect()
    unpack = None
    if hooks is not None:
        pack, unpack = hooks
        values = [(pack(v),) if isinstance(v, torch.Tensor) else v for v in values]
    _SAVED[key] = list(values), unpack, bwd
    handle = torch.tensor([key], dtype=torch.int64, device="cpu")  # (whatever the default)
    weakref.finalize(handle, _SAVED.pop, key, None)  # a backward that never runs
    return handle


def _take_saved(handle: torch.Tensor) -> tuple[list, Callable]:
    """The values kept under ``handle`` and the backward that reads them. Taken out of the table
    (the backward then frees each at its last use), unless the backward keeps its graph
    (``retain_graph=True``): a later backward reads them again, and they go with the handle."""
    key = int(handle.item())  # (a CPU tensor: no device sync)
    keep = compat.backward_keeps_graph()
    entry = _SAVED.get(key) if keep else _SAVED.pop(key, None)
    if entry is None:
        raise RuntimeError("MuTwoAC: the values this backward reads were freed by an earlier "
                           "backward through the same forward; pass retain_graph=True to it")
    values, unpack, bwd = entry
    values = list(values)
    if unpack is not None:  # (packed tensors are 1-tuples: a packed value may be anything)
        values = [unpack(v[0]) if isinstance(v, tuple) else v for v in values]
    return values, bwd


def _never_run(*args):
    raise RuntimeError("a stand-in graph for AOTAutograd ran; its mutwo_runtime should have")


def _copy_placeholder(graph: fx.Graph, p: fx.Node) -> fx.Node:
    q = graph.placeholder(p.name)
    q.meta = dict(p.meta)
    return q


def _stand_in(graph: fx.Graph, x, env: dict):
    """``x`` (an output of another graph) in ``graph``: its placeholder there, or a node with
    its value's metadata and no computation; None and constants as they are."""
    if not isinstance(x, fx.Node):
        return x
    if x not in env:
        env[x] = graph.call_function(_never_run, ())
        env[x].meta = dict(x.meta)
    return env[x]


def compile_with_plan(fn: Callable, module: nn.Module | None,
                      make_plan: Callable[[JointGraph], Plan], *, dynamic: bool = False,
                      on_compiled: Callable[[PlannedStep], None] | None = None,
                      kernels: str = "eager") -> Callable:
    """Compile ``fn``; its first call captures the joint graph, plans it, and partitions it.

    ``make_plan(joint)`` runs inside compilation with the real primals at hand (use
    :func:`lightning_ac._torch_compat.real_tensor_mode` to run them); errors it raises come out of
    the first call (under dynamo's wrapper; :func:`lightning_ac.errors.unwrap_compile_error`).
    ``dynamic`` as for :func:`~lightning_ac.capture.compile_joint`. ``on_compiled`` receives the
    :class:`PlannedStep` of each graph compiled, through which a new plan replaces the old.
    ``kernels``: how the partitioned graphs run (:data:`KERNELS`).
    """
    def compile_step(joint: JointGraph):
        step = PlannedStep(joint, make_plan(joint), kernels=kernels)
        if on_compiled is not None:
            on_compiled(step)
        return step.shells()

    return compile_joint(fn, module, compile_step, dynamic=dynamic)
