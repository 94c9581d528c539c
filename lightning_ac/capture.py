"""Capture one training iteration as aten-level FX graphs.

Two graphs make the iteration graph:

* the **joint graph**: forward and backward of ``fn(*args)`` (a model's forward, or forward plus
  loss), one ``fx.GraphModule`` from AOTAutograd. Its placeholders are the primals (parameters,
  buffers and batch tensors, lifted by dynamo) and then the tangents; every node is tagged
  forward or backward. The profiler, the planner and the rewriter all work on this one object.
* the **optimizer graph**: ``optimizer.step()`` traced with ``make_fx`` over parameters,
  gradients and optimizer state as inputs.

Capturing runs nothing: the dynamo backend stops as soon as AOTAutograd has built the joint graph,
so parameters, buffers (BatchNorm running statistics) and RNG state are left untouched.
"""

from __future__ import annotations

import contextlib
import operator
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.fx as fx
from torch import nn

from lightning_ac import _torch_compat as compat

__all__ = [
    "CaptureError",
    "batch_norm_without_buffers",
    "count_batches_in_place",
    "compile_joint",
    "describe_capture_failure",
    "increment_counters",
    "unwrap_compile_error",
    "JointGraph",
    "OptimizerGraph",
    "PrimalRole",
    "capture_joint",
    "capture_optimizer_step",
    "is_random_op",
    "pin_buffers",
    "replay_random",
    "replayable_dropout",
    "replayable_random_ops",
    "save_rng_state",
    "update_running_stats",
    "use_replays",
]


class CaptureError(RuntimeError):
    """The step cannot be captured as one graph; the message says why and where."""


@dataclass(frozen=True)
class PrimalRole:
    """What a joint-graph primal is in the user's program."""

    kind: str
    """``"parameter"``, ``"buffer"`` or ``"input"``."""
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
    grad_of: dict[fx.Node, int] = field(default_factory=dict)
    """Backward output node → index of the primal whose gradient it is."""
    pinned: list[fx.Node] = field(default_factory=list)
    """Small forward values always saved for backward, so that anything recomputed can read
    them: copies of buffers (:func:`pin_buffers`) and generator states
    (:func:`replayable_random_ops`)."""

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

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


def _roles(example_inputs: Sequence, module: nn.Module | None) -> list[PrimalRole]:
    """Name each dynamo graph input by identity with the module's parameters and buffers."""
    named: dict[int, PrimalRole] = {}
    if module is not None:
        for name, p in module.named_parameters(remove_duplicate=False):
            named.setdefault(id(p), PrimalRole("parameter", name))
        for name, b in module.named_buffers(remove_duplicate=False):
            named.setdefault(id(b), PrimalRole("buffer", name))
    roles, n_inputs = [], 0
    for t in example_inputs:
        role = named.get(id(t))
        if role is None:
            role = PrimalRole("input", f"input{n_inputs}")
            n_inputs += 1
        roles.append(role)
    return roles


def _build_joint(joint_gm: fx.GraphModule, example_inputs: list, roles: list[PrimalRole],
                 num_fwd_outputs: int) -> JointGraph:
    compat.eliminate_common_subexpressions(joint_gm)
    placeholders = list(joint_gm.graph.find_nodes(op="placeholder"))
    tangents = [p for p in placeholders if compat.is_backward_node(p)]
    primals = [p for p in placeholders if not compat.is_backward_node(p)]
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    if len(primals) != len(tensors):
        raise CaptureError(
            f"the joint graph has {len(primals)} primal inputs but dynamo passed {len(tensors)} "
            "tensors; inputs that are not tensors (or duplicated inputs) are not supported yet"
        )
    for node, t in zip(primals, tensors):
        val = node.meta.get("val")
        if val is not None and tuple(val.shape) != tuple(t.shape):
            raise CaptureError(f"primal {node.name} has shape {tuple(val.shape)} but the example "
                               f"input has {tuple(t.shape)}: inputs were reordered")
    joint = JointGraph(gm=joint_gm, primals=primals, primal_values=tensors,
                       primal_roles=[r for r, t in zip(roles, example_inputs)
                                     if isinstance(t, torch.Tensor)],
                       tangents=tangents, num_fwd_outputs=num_fwd_outputs)
    grads = joint.outputs()[num_fwd_outputs:]
    # AOTAutograd returns one gradient slot per primal, or one per primal that requires grad.
    if len(grads) == len(tensors):
        owners = list(range(len(tensors)))
    else:
        owners = [i for i, t in enumerate(tensors) if t.requires_grad]
    if len(owners) != len(grads):
        raise CaptureError(f"cannot align {len(grads)} gradient outputs with {len(tensors)} primals")
    joint.grad_of = {g: i for g, i in zip(grads, owners) if isinstance(g, fx.Node)}
    batch_norm_without_buffers(joint)
    count_batches_in_place(joint)
    pin_buffers(joint)
    replayable_dropout(joint)
    replayable_random_ops(joint)
    return joint


def _feeds_backward(node: fx.Node) -> bool:
    """True if a backward node reads ``node``'s value, directly or through forward nodes."""
    seen, stack = set(), [node]
    while stack:
        for u in stack.pop().users:
            if u in seen or u.op == "output":
                continue
            if compat.is_backward_node(u):
                return True
            seen.add(u)
            stack.append(u)
    return False


def pin_buffers(joint: JointGraph) -> None:
    """Make forward nodes that backward may re-run read a copy of each buffer they read.

    AOTAutograd writes updated buffers back into the module in place after forward. A node that
    backward re-runs would read such a buffer after the update, and autograd rejects a saved
    input that was modified. Reading a copy taken in forward lets such nodes be recomputed; the
    copies are always saved. Buffers whose readers feed nothing in backward (BatchNorm's
    statistics after :func:`batch_norm_without_buffers`, ``num_batches_tracked``) need no copy.
    """
    graph = joint.gm.graph
    buffers = [p for p, r in zip(joint.primals, joint.primal_roles) if r.kind == "buffer"]
    anchor = joint.tangents[-1] if joint.tangents else joint.primals[-1]
    for buf in buffers:
        users = [u for u in buf.users if u.op == "call_function" and not compat.is_backward_node(u)
                 and _feeds_backward(u)]
        if not users:
            continue
        with graph.inserting_after(anchor):
            copy = graph.call_function(torch.ops.aten.clone.default, (buf,))
        copy.meta.update(buf.meta)
        copy.meta["partitioner_tag"] = "is_forward"
        for u in users:
            u.replace_input_with(buf, copy)
        joint.pinned.append(copy)
        anchor = copy
    if joint.pinned:
        joint.gm.recompile()


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


def count_batches_in_place(joint: JointGraph) -> int:
    """Increment every buffer that forward only increments by one (BatchNorm's
    ``num_batches_tracked``) with one :func:`increment_counters` node.

    Traced, each increment is an ``add`` of its own whose result AOTAutograd's runtime copies
    back into the buffer after forward: 310 small kernels a step on ResNet-152, where eager runs
    155. Updated in place and returned as themselves, the buffers need no copy back (``copy_``
    onto the same tensor does nothing), so forward runs one kernel for all of them. Returns how
    many counters it folded.
    """
    aten = torch.ops.aten
    graph = joint.gm.graph
    buffers = {p for p, r in zip(joint.primals, joint.primal_roles) if r.kind == "buffer"}
    adds = [n for n in graph.find_nodes(op="call_function", target=aten.add.Tensor)
            if n.args[0] in buffers and n.args[1] == 1 and not n.kwargs
            and len(n.args[0].users) == 1 and all(u.op == "output" for u in n.users)
            and not compat.is_backward_node(n)]
    if len(adds) < 2:
        return 0
    with graph.inserting_after(adds[-1]):
        inc = graph.call_function(increment_counters, ([a.args[0] for a in adds],))
    inc.meta.update(partitioner_tag=adds[-1].meta.get("partitioner_tag"),
                    val=[a.meta["val"] for a in adds])
    _hand_out(graph, inc, [(add, k) for k, add in enumerate(adds)])
    joint.gm.recompile()
    return len(adds)


def _hand_out(graph: fx.Graph, node: fx.Node, replaced: list[tuple[fx.Node, int]]) -> fx.Node:
    """Replace each ``(old, j)`` of ``replaced`` by ``node[j]``, a getitem inserted (in this
    order) right after ``node``, and erase ``old``; returns the last getitem."""
    anchor = node
    for old, j in replaced:
        with graph.inserting_after(anchor):
            item = graph.call_function(operator.getitem, (node, j))
        item.meta.update(old.meta)
        old.replace_all_uses_with(item)
        graph.erase_node(old)
        anchor = item
    return anchor


class _BatchNormStats(NamedTuple):
    """A rewritten BatchNorm, as the update of its running statistics needs it."""

    running_mean: fx.Node
    running_var: fx.Node
    outs: dict[int, fx.Node]
    """The BatchNorm's getitems by output index (1: batch mean, 2: rstd, 3 and 4: the old
    updated statistics, replaced by the update's outputs)."""
    count: int
    """Values per channel (for the unbiased variance)."""


def batch_norm_without_buffers(joint: JointGraph) -> int:
    """Run training-mode BatchNorm without its running statistics, and update them all at once.

    AOTAutograd traces BatchNorm as ``_native_batch_norm_legit_functional``, which clones both
    running statistics, updates the clones and returns them; AOT's runtime then copies them back
    into the module, and :func:`pin_buffers` had to copy the statistics first so that a
    recomputed BatchNorm would not read them updated. On ResNet-152 that is 1,550 small copies a
    step (the H100 profile in ``reports/host``), each costing host time. In training mode the
    output does not depend on the running statistics, so each BatchNorm becomes
    ``_native_batch_norm_legit.no_stats`` (pure: recomputable as it is, reads no buffer), or
    ``cudnn_batch_norm`` without statistics where eager would run cuDNN (its kernels are faster:
    19 ms a step on ResNet-152 at batch 128 on the H100), its backward reads no statistics
    (``None``, unused in training; cuDNN's backward also takes the reserve space), and one
    :func:`update_running_stats` node after the last of them updates every running statistic in
    place. Its outputs are the module's own buffers, so AOT's copy-back copies each onto itself,
    which ``copy_`` skips. Returns how many BatchNorms were rewritten.
    """
    aten = torch.ops.aten
    graph = joint.gm.graph
    groups: dict[tuple[float, float], list[tuple]] = {}
    for bn in list(graph.find_nodes(op="call_function",
                                    target=aten._native_batch_norm_legit_functional.default)):
        x, w, b, rm, rv, training, momentum, eps = (list(bn.args) + [None] * 8)[:8]
        outs = {u.args[1]: u for u in bn.users if u.target is operator.getitem}
        if (compat.is_backward_node(bn) or training is not True or not isinstance(momentum, float)
                or not isinstance(eps, float) or 3 not in outs or 4 not in outs
                or any(u.op == "call_function" and not _reads_stats_unused(u)
                       for o in (outs[3], outs[4]) for u in o.users)):
            continue
        for i in (3, 4):  # backward's BatchNorm reads them but does not use them in training
            for u in list(outs[i].users):
                if u.op == "call_function":
                    u.replace_input_with(outs[i], None)
        reserve = _cudnn_reserve(x, w, b, rm, rv, eps)
        with graph.inserting_before(bn):
            if reserve is None:
                pure = graph.create_node("call_function", aten._native_batch_norm_legit.no_stats,
                                         (x, w, b, True, momentum, eps), name="batch_norm")
            else:  # eager's kernels: cuDNN, without running statistics
                pure = graph.create_node("call_function", aten.cudnn_batch_norm.default,
                                         (x, w, b, None, None, True, momentum, eps),
                                         name="cudnn_batch_norm")
        pure.meta.update(bn.meta, val=(*bn.meta["val"][:3], *([reserve] if reserve is not None
                                                                else [])))
        bn.replace_all_uses_with(pure)
        graph.erase_node(bn)
        if reserve is not None:
            _use_cudnn_backward(graph, pure, outs)
        shape = x.meta["val"].shape
        groups.setdefault((momentum, eps), []).append(
            _BatchNormStats(rm, rv, outs, shape.numel() // shape[1]))
    if not groups:
        return 0
    position = {n: i for i, n in enumerate(graph.nodes)}
    # after every BatchNorm's statistics exist; nothing else in forward reads the buffers
    anchor = max((o for group in groups.values() for bn in group for o in bn.outs.values()),
                 key=position.__getitem__)
    for (momentum, eps), group in groups.items():
        means = [bn.running_mean for bn in group]
        variances = [bn.running_var for bn in group]
        with graph.inserting_after(anchor):
            upd = graph.call_function(update_running_stats, (
                means, variances, [bn.outs[1] for bn in group], [bn.outs[2] for bn in group],
                momentum, eps, [bn.count for bn in group]))
        upd.meta.update(partitioner_tag=group[0].outs[1].meta.get("partitioner_tag"),
                        val=[*(m.meta["val"] for m in means), *(v.meta["val"] for v in variances)])
        anchor = _hand_out(graph, upd, [(bn.outs[i], j) for k, bn in enumerate(group)
                                        for i, j in ((3, k), (4, len(group) + k))])
    joint.gm.recompile()
    return sum(len(g) for g in groups.values())


def _cudnn_reserve(x, w, b, rm, rv, eps) -> torch.Tensor | None:
    """The fake reserve-space tensor if eager would run this BatchNorm on cuDNN, else None."""
    vals = [n.meta.get("val") if isinstance(n, fx.Node) else None for n in (x, w, b, rm, rv)]
    if not isinstance(vals[0], torch.Tensor) or vals[0].device.type != "cuda":
        return None
    try:
        if compat.batch_norm_backend(*vals, eps) != "cudnn":
            return None
        size = compat.cudnn_batch_norm_reserve_bytes(vals[0])
        with compat.real_tensor_mode():
            real = torch.empty(size, dtype=torch.uint8, device=vals[0].device)
        return compat.as_fake(real, vals[0])
    except (RuntimeError, AttributeError):  # no cuDNN, or a torch without these calls
        return None


def _use_cudnn_backward(graph: fx.Graph, bn: fx.Node, outs: dict[int, fx.Node]) -> None:
    """Point the backward of the cuDNN BatchNorm ``bn`` at cuDNN's backward, with its reserve."""
    aten = torch.ops.aten
    with graph.inserting_after(outs.get(2, bn)):
        reserve = graph.call_function(operator.getitem, (bn, 3))
    reserve.meta.update(bn.meta, val=bn.meta["val"][3])
    mean = outs.get(1)
    for back in list(mean.users if mean is not None else ()):
        if back.target is not aten.native_batch_norm_backward.default:
            continue
        grad, x, w, _, _, saved_mean, invstd, train, eps, _mask = back.args
        if saved_mean is not mean or invstd is not outs.get(2) or train is not True:
            continue
        with graph.inserting_before(back):
            new = graph.create_node("call_function", aten.cudnn_batch_norm_backward.default,
                                    (x, grad, w, None, None, mean, invstd, eps, reserve),
                                    name="cudnn_batch_norm_backward")
        new.meta.update(back.meta)
        back.replace_all_uses_with(new)
        graph.erase_node(back)


def _reads_stats_unused(node: fx.Node) -> bool:
    """A reader of a BatchNorm's updated statistics that does not need their values: the
    training-mode backward (it ignores running statistics)."""
    return (node.target is torch.ops.aten.native_batch_norm_backward.default
            and node.args[7] is True)


def _dropout_scale(p: float, device: torch.device) -> float:
    """The factor dropout multiplies kept values by, rounded as the device's kernel rounds it.

    The CUDA kernel computes ``1 / p_keep`` with ``p_keep`` already cast to float32; the CPU
    kernel divides in double. ``native_dropout_backward`` then rounds the factor to the tensor's
    compute type, so with these factors it reproduces dropout's output bit for bit.
    """
    keep = 1.0 - p
    if device.type == "cuda":
        keep = float(torch.tensor(keep, dtype=torch.float32))
    return 1.0 / keep


def replayable_dropout(joint: JointGraph) -> int:
    """Rebuild each dropout's output from its mask, so that what follows it can be recomputed.

    ``native_dropout`` draws a fresh mask each time it runs, so nothing downstream of it could be
    recomputed (on BERT-base that leaves most activations non-recomputable). Here the forward
    still runs ``native_dropout`` (the same random draws as eager), keeps only its mask, and
    makes the output as ``native_dropout_backward(x, mask, scale)``, i.e. ``x * mask * scale``,
    the same values as dropout's own output. Backward needs the mask anyway; re-running that
    product from ``x`` and the mask is deterministic. Returns how many dropouts were rewritten.
    """
    aten = torch.ops.aten
    graph = joint.gm.graph
    rewritten = 0
    for drop in list(graph.find_nodes(op="call_function", target=aten.native_dropout.default)):
        x, p = drop.args[0], drop.args[1]
        train = drop.args[2] if len(drop.args) > 2 else drop.kwargs.get("train")
        if compat.is_backward_node(drop) or train is False or not 0.0 < p < 1.0:
            continue
        outs = {u.args[1]: u for u in drop.users if u.target is operator.getitem}
        if 0 not in outs or not outs[0].users:
            continue
        # mask and output right after the dropout itself: before every reader of either
        if 1 not in outs:
            with graph.inserting_after(drop):
                outs[1] = graph.call_function(operator.getitem, (drop, 1))
            outs[1].meta.update(drop.meta, val=drop.meta["val"][1])
        else:
            drop.append(outs[1])
        with graph.inserting_after(outs[1]):
            out = graph.call_function(aten.native_dropout_backward.default,
                                      (x, outs[1], _dropout_scale(p, x.meta["val"].device)))
        out.meta.update(outs[0].meta)
        outs[0].replace_all_uses_with(out)
        graph.erase_node(outs[0])
        rewritten += 1
    if rewritten:
        joint.gm.recompile()
    return rewritten


def is_random_op(node: fx.Node) -> bool:
    """True for nodes whose result depends on the RNG (dropout, rand, SDPA's attention dropout
    …) and for the nodes that read the generator's state (:func:`save_rng_state`)."""
    if getattr(node.target, "reads_rng", False):
        return True
    return torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


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


def _tensor_values(node: fx.Node) -> list[torch.Tensor]:
    vals = node.meta.get("val")
    return [v for v in (vals if isinstance(vals, (tuple, list)) else (vals,))
            if isinstance(v, torch.Tensor)]


def replayable_random_ops(joint: JointGraph) -> int:
    """Make every forward random op recomputable by replaying the generator's state.

    Each random op ``r = op(*args)`` becomes ``s = save_rng_state(device)`` followed by
    ``r = replay_random(s, device, op, *args)``. ``s`` is a few bytes and always kept (it joins
    ``joint.pinned``), and ``r`` is a deterministic function of ``s`` and ``args``, so the planner
    can drop dropout masks and attention outputs (SDPA draws its dropout from the generator)
    like any other activation: torch.utils.checkpoint's RNG replay, per op. Returns how many ops
    were rewritten.
    """
    graph = joint.gm.graph
    rewritten = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or compat.is_backward_node(n) or not is_random_op(n):
            continue
        values = _tensor_values(n)
        if not values:
            continue
        device = values[0].device
        with graph.inserting_before(n):
            state = graph.create_node("call_function", save_rng_state, (device,),
                                      name=f"{n.name}_rng_state")
            replayed = graph.create_node("call_function", replay_random,
                                         (state, device, n.target, *n.args),
                                         {**n.kwargs, "replay": False}, name=f"{n.name}_replay")
        with compat.real_tensor_mode():  # capture runs under FakeTensorMode
            example = save_rng_state(device)
        state.meta.update(partitioner_tag=n.meta.get("partitioner_tag"),
                          val=compat.as_fake(example, values[0]))
        joint.pinned.append(state)
        replayed.meta.update(n.meta)
        n.replace_all_uses_with(replayed)
        graph.erase_node(n)
        rewritten += 1
    if rewritten:
        joint.gm.recompile()
    return rewritten


def use_replays(gm: fx.GraphModule) -> int:
    """Switch ``gm``'s random ops to replay (for a backward module: they are recomputations)."""
    nodes = list(gm.graph.find_nodes(op="call_function", target=replay_random))
    for n in nodes:
        n.kwargs = {**n.kwargs, "replay": True}
    if nodes:
        gm.recompile()
    return len(nodes)


def compile_joint(fn: Callable, module: nn.Module | None,
                  partition: Callable[[JointGraph], tuple[fx.GraphModule, fx.GraphModule]]
                  ) -> Callable:
    """``torch.compile`` ``fn`` so that ``partition(joint)`` decides its forward/backward split.

    On the first call, dynamo traces ``fn`` with the real arguments, AOTAutograd builds the joint
    graph, and ``partition`` receives it as a :class:`JointGraph` (with the real primals) and
    returns the forward and backward modules to run, compiled with the boxed calling convention.
    Later calls with the same shapes run those modules. A graph break raises at the first call.
    """

    def backend(gm: fx.GraphModule, example_inputs: list):
        roles = _roles(example_inputs, module)

        def partition_fn(joint_gm, joint_inputs, *, num_fwd_outputs, **kwargs):
            return partition(_build_joint(joint_gm, example_inputs, roles, num_fwd_outputs))

        def already_compiled(gm, _inputs):  # partition returns ready-to-run boxed modules
            return gm

        return compat.aot_backend(partition_fn, already_compiled, already_compiled)(gm, example_inputs)

    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)


def unwrap_compile_error(exc: BaseException, types: tuple[type, ...]) -> BaseException | None:
    """The first exception of one of ``types`` in the chain under a dynamo/compile error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, types):
            return exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
    return None


def describe_capture_failure(fn: Callable, exc: BaseException) -> CaptureError:
    """A :class:`CaptureError` that says which function could not be captured, where and why."""
    where = _user_frame(exc)
    return CaptureError(
        f"could not capture {getattr(fn, '__qualname__', fn)!r} as one graph"
        f"{' at ' + where if where else ''}: {type(exc).__name__}: {_first_lines(exc)}"
    )


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


def _first_lines(exc: BaseException, n: int = 6) -> str:
    return "\n".join(str(exc).strip().splitlines()[:n])


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch, as 'file:line in func'."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}"


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
