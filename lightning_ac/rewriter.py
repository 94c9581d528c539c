"""Apply a plan: partition the profiled joint graph by it and run the result as the forward.

:func:`partition` splits the *same* joint graph the profiler measured and the planner planned on:
the forward saves the kept activations (and whatever primals backward reads), the backward
re-runs the forward nodes it needs to rebuild the dropped ones, each just before its first use.
:func:`compile_with_plan` wraps a function so that on its first call the joint graph is captured,
handed to a planning function, and partitioned by the plan it returns.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

from lightning_ac import _torch_compat as compat
from lightning_ac.capture import JointGraph, compile_joint, use_replays
from lightning_ac.planner import Plan

__all__ = ["compile_with_plan", "empty_saved_tensors", "getitems_after_their_op",
           "partition", "saved_values"]


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
        val = n.meta.get("val")
        if (n.op == "call_function" and isinstance(val, torch.Tensor) and val.numel() == 0
                and not joint.is_backward(n) and any(joint.is_backward(u) for u in n.users)):
            out.append(n)
    return out


def partition(joint: JointGraph, plan: Plan) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Forward and backward modules for ``plan``, compiled with the boxed calling convention."""
    fwd, bwd = compat.extract_fwd_bwd(joint.gm, saved_values(joint, plan), joint.num_fwd_outputs)
    if plan.recomputed:
        bwd = compat.reorder_backward(bwd)
        getitems_after_their_op(bwd)
    use_replays(bwd)  # random ops backward re-runs draw what forward drew
    return compat.use_boxed_calling_convention(fwd), compat.use_boxed_calling_convention(bwd)


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


def compile_with_plan(fn: Callable, module: nn.Module | None,
                      make_plan: Callable[[JointGraph], Plan]) -> Callable:
    """Compile ``fn``; its first call captures the joint graph, plans it, and partitions it.

    ``make_plan(joint)`` runs inside compilation with the real primals at hand (use
    :func:`lightning_ac._torch_compat.real_tensor_mode` to run them); errors it raises come out of
    the first call (under dynamo's wrapper; :func:`lightning_ac.capture.unwrap_compile_error`).
    """
    return compile_joint(fn, module, lambda joint: partition(joint, make_plan(joint)))
