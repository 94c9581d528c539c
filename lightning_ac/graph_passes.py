"""Rewrites of the captured joint graph that make more of it recomputable, or cheaper to run.

Each pass takes the :class:`~lightning_ac.capture.JointGraph` right after capture and edits its
``fx.Graph`` in place (the profiler, planner and rewriter then all see the rewritten graph):

* :func:`batch_norm_without_buffers`: training BatchNorm without its running statistics (pure,
  so recomputable), with one update of all statistics after the last BatchNorm;
* :func:`count_batches_in_place`: every ``num_batches_tracked`` incremented in one kernel;
* :func:`pin_buffers`: forward nodes that backward may re-run read a copy of the buffers;
* :func:`replayable_dropout` and :func:`replayable_random_ops`: random ops recomputable by
  replaying the generator's state.

:func:`apply_graph_passes` runs them in the order capture needs.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.fx as fx

from lightning_ac import _torch_compat as compat
from lightning_ac.runtime_ops import (
    increment_counters,
    replay_random,
    save_rng_state,
    update_running_stats,
)

if TYPE_CHECKING:
    from lightning_ac.capture import JointGraph

__all__ = [
    "apply_graph_passes",
    "batch_norm_without_buffers",
    "count_batches_in_place",
    "is_random_op",
    "pin_buffers",
    "replayable_dropout",
    "replayable_random_ops",
    "use_replays",
]


def apply_graph_passes(joint: JointGraph) -> None:
    """Run every pass on a freshly captured joint graph, in the order they depend on:
    BatchNorm first (it removes buffer reads that :func:`pin_buffers` would otherwise copy),
    the RNG passes last (dropout keeps its mask, then every remaining random op replays)."""
    batch_norm_without_buffers(joint)
    count_batches_in_place(joint)
    pin_buffers(joint)
    replayable_dropout(joint)
    replayable_random_ops(joint)


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
                       for o in (outs[3], outs[4]) for u in o.users)
                or _has_dynamic_size(x)):  # (its count per channel would vary: left as traced)
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


def _has_dynamic_size(n) -> bool:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(val, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in val.shape)


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
