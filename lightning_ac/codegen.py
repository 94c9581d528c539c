"""Run the partitioned forward and backward on inductor's fused kernels.

The rewriter's graphs (:func:`lightning_ac.rewriter.partition`) call a few plain Python
functions besides aten ops: the four swap calls (:mod:`lightning_ac.swapping`), the BatchNorm
statistics update and the counter increment, and the RNG save and replay
(:mod:`lightning_ac.runtime_ops`). Inductor compiles aten ops and ``torch.library`` ops only, and
it drops an op whose result nothing reads unless its schema says it mutates something, and may
move an op anywhere its inputs allow. So :func:`for_inductor` rewrites a copy of the graph:

* each swap call becomes a ``mutwo::`` custom op whose schema ties it to the values it must
  come after: ``swap_release`` declares that it writes the host copies (the copy it waits for
  does), ``swap_wait`` that it writes the device tensor the copy back fills, so that inductor
  keeps every reader of those after them;
* the BatchNorm update and the counter increment become custom ops that mutate the module's
  buffers in place (declared), and the graph returns the buffers themselves;
* a random op whose draws backward replays, and the generator state read before it, become
  torch's own ``run_and_save_rng_state`` (one op, so nothing can draw between the two), and its
  replay in backward ``run_with_rng_state``: inductor runs both as they are. A random op that
  nothing replays is left to inductor, which draws as ``torch.compile`` does (its own
  generator, fused into the neighbouring kernels: the draws are not eager's; with inductor's
  ``fallback_random`` they are);
* views by size become reshapes (a re-trace through inductor's decompositions may lay a value
  out otherwise than the first trace did);
* cuDNN's BatchNorm (forward and backward) becomes the native one, which inductor decomposes
  and fuses as ``torch.compile`` does; cuDNN's it could only call as kernels of their own.

:class:`InductorGraph` compiles the result at its first call, with that call's inputs, under
inductor settings that keep the plan's order (no memory-driven reordering: the plan already
placed every recomputation, swap and release where its simulator counted them).
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable

import torch
import torch.fx as fx
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_ac import _torch_compat as compat
from lightning_ac import runtime_ops, swapping

__all__ = ["InductorGraph", "for_inductor", "has_symbolic_sizes"]

log = logging.getLogger(__name__)

_lib = torch.library.Library("mutwo", "FRAGMENT")
_OPS = {
    "swap_out": "swap_out(Tensor x, int slot) -> Tensor",
    "swap_release": "swap_release(Tensor[] xs, Tensor(a!)[] hosts, int slot) -> ()",
    "swap_in": "swap_in(Tensor host, int slot, Device device) -> Tensor",
    "swap_wait": "swap_wait(Tensor(a!) x, int slot) -> ()",
    "update_running_stats": "update_running_stats(Tensor(a!)[] running_means, "
                            "Tensor(b!)[] running_vars, Tensor[] batch_means, "
                            "Tensor[] batch_rstds, float momentum, float eps, int[] counts) -> ()",
    "increment_counters": "increment_counters(Tensor(a!)[] counters) -> ()",
}
for _schema in _OPS.values():
    _lib.define(_schema)


def _swap_release(xs, hosts, slot):
    swapping.swap_release(xs, slot)


def _swap_in(host, slot, device):
    return swapping.swap_in(host, slot)


def _swap_wait(x, slot):
    swapping.swap_wait(x, slot)


def _update_running_stats(means, variances, batch_means, batch_rstds, momentum, eps, counts):
    runtime_ops.update_running_stats(means, variances, batch_means, batch_rstds, momentum, eps,
                                     counts)


def _increment_counters(counters):
    runtime_ops.increment_counters(counters)


_IMPLS = {"swap_out": swapping.swap_out, "swap_release": _swap_release, "swap_in": _swap_in,
          "swap_wait": _swap_wait, "update_running_stats": _update_running_stats,
          "increment_counters": _increment_counters}
for _name, _fn in _IMPLS.items():
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")


def _fake_swap_out(x, slot):
    return torch.empty_like(x, device="cpu")


def _fake_swap_in(host, slot, device):
    return torch.empty_like(host, device=device)


def _fake_nothing(*args):
    return None


_FAKES = {"swap_out": _fake_swap_out, "swap_in": _fake_swap_in, "swap_release": _fake_nothing,
          "swap_wait": _fake_nothing, "update_running_stats": _fake_nothing,
          "increment_counters": _fake_nothing}
for _name, _fn in _FAKES.items():
    torch.library.register_fake(f"mutwo::{_name}", _fn, lib=_lib)

_mutwo = torch.ops.mutwo


def has_symbolic_sizes(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` was traced with dynamic sizes (a size input, or a tensor input of a symbolic
    shape): :class:`InductorGraph` compiles for one set of sizes, so such graphs run op by op."""
    for p in gm.graph.find_nodes(op="placeholder"):
        val = p.meta.get("val")
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return True
        if isinstance(val, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in val.shape):
            return True
    return False


def for_inductor(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the partitioned module ``gm`` whose every call is an aten op, a ``mutwo::``
    custom op or one of torch's RNG higher-order ops (see the module's docstring), with the
    default (unboxed) calling convention, as inductor compiles it."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    new = fx.GraphModule(gm, graph)
    g = new.graph
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        rewrite = _REWRITES.get(n.target)
        if rewrite is not None:
            rewrite(g, n)
        elif n.target in _VIEWS:
            # traced again through inductor's decompositions, a value may come out with other
            # strides than AOTAutograd traced (T5: a permuted batch matmul result), which a view
            # cannot take; reshape views where it can and copies where it must (nothing in
            # these graphs writes through a view)
            n.target = torch.ops.aten.reshape.default
    g.eliminate_dead_code(is_impure_node=_is_impure)
    g.lint()
    new.recompile()
    return new


def _is_impure(node: fx.Node) -> bool:
    return node.is_impure() or (node.op == "call_function"
                                and getattr(node.target, "namespace", None) == "mutwo")


def _replace(g: fx.Graph, old: fx.Node, target, args, kwargs=None) -> fx.Node:
    with g.inserting_before(old):
        new = g.call_function(target, tuple(args), kwargs or {})
    new.meta.update(old.meta)
    return new


def _swap_out(g, n):
    x, slot = n.args
    new = _replace(g, n, _mutwo.swap_out.default, (x, slot))
    n.replace_all_uses_with(new)
    g.erase_node(n)


def _swap_release(g, n):
    xs, slot = n.args
    # the host copies of these values: swap_out's result from each (what the release waits for)
    hosts = [next(u for u in x.users if u.target is _mutwo.swap_out.default) for x in xs]
    _replace(g, n, _mutwo.swap_release.default, (list(xs), hosts, slot))
    g.erase_node(n)


def _swap_in(g, n):
    host, slot = n.args
    new = _replace(g, n, _mutwo.swap_in.default, (host, slot, n.meta["val"].device))
    n.replace_all_uses_with(new)
    g.erase_node(n)


def _swap_wait(g, n):
    x, slot = n.args
    _replace(g, n, _mutwo.swap_wait.default, (x, slot))
    n.replace_all_uses_with(x)  # (waited for in place: its readers now come after the wait)
    g.erase_node(n)


def _in_place(target, lists: int):
    """A rewrite of a Python call that updates its first ``lists`` list arguments in place and
    returns them concatenated: the custom op ``target``, and each getitem of the old result
    replaced by the tensor it named."""
    def rewrite(g, n):
        _replace(g, n, target, n.args, n.kwargs)
        updated = [x for lst in n.args[:lists] for x in lst]
        for item in list(n.users):
            if item.op == "call_function" and item.target is operator.getitem:
                item.replace_all_uses_with(updated[item.args[1]])
                g.erase_node(item)
        if n.users:
            raise RuntimeError(f"{n.format_node()} is read other than by getitem")
        g.erase_node(n)
    return rewrite


def _replay_random(g, n):
    state, _device, op, *args = n.args
    kwargs = {k: v for k, v in n.kwargs.items() if k != "replay"}
    rng = compat.rng_prims()
    if n.kwargs.get("replay"):
        new = _replace(g, n, rng.run_with_rng_state, (state, op, *args), kwargs)
        n.replace_all_uses_with(new)
        g.erase_node(n)
        return
    if state.target is not runtime_ops.save_rng_state or len(state.users) > 2:
        raise RuntimeError(f"{n.format_node()} does not follow its own generator state read")
    if len(state.users) == 1:  # backward does not replay it: the plain op, as inductor draws it
        new = _replace(g, n, op, args, kwargs)
        n.replace_all_uses_with(new)
        g.erase_node(n)
        g.erase_node(state)
        return
    # forward: the state read and the draw as one op (nothing else can draw in between)
    both = _replace(g, n, rng.run_and_save_rng_state, (op, *args), kwargs)
    both.meta["val"] = (state.meta["val"], n.meta["val"])
    with g.inserting_after(both):
        new_state = g.call_function(operator.getitem, (both, 0))
    with g.inserting_after(new_state):
        value = g.call_function(operator.getitem, (both, 1))
    new_state.meta.update(state.meta)
    value.meta.update(n.meta)
    n.replace_all_uses_with(value)
    g.erase_node(n)
    state.replace_all_uses_with(new_state)
    g.erase_node(state)


def _cudnn_batch_norm(g, n):
    """cuDNN's training BatchNorm without running statistics (what
    :func:`~lightning_ac.graph_passes.batch_norm_without_buffers` picks where eager runs cuDNN)
    becomes ``_native_batch_norm_legit.no_stats``, which inductor decomposes and fuses with its
    neighbours (ReLU, the residual add), as ``torch.compile`` does; cuDNN's op it could only
    call as a kernel of its own. Its reserve space becomes an empty tensor (a saved value of
    the forward may be it): the backward no longer reads it (:func:`_cudnn_batch_norm_backward`)."""
    x, w, b, rm, rv, training, momentum, eps = n.args
    if rm is not None or rv is not None:
        return  # (running statistics: not one of ours)
    for u in list(n.users):
        if u.target is operator.getitem and u.args[1] == 3:
            with g.inserting_before(u):
                empty = g.call_function(torch.ops.aten.new_empty.default, (x, [0]),
                                        {"dtype": torch.uint8})
            if "val" in u.meta:
                empty.meta["val"] = u.meta["val"].new_empty([0])
            u.replace_all_uses_with(empty)
            g.erase_node(u)
    new = _replace(g, n, torch.ops.aten._native_batch_norm_legit.no_stats,
                   (x, w, b, training, momentum, eps))
    if "val" in n.meta:
        new.meta["val"] = tuple(n.meta["val"][:3])
    n.replace_all_uses_with(new)
    g.erase_node(n)


def _cudnn_batch_norm_backward(g, n):
    """cuDNN's BatchNorm backward becomes the native one (same saved mean and inverse standard
    deviation), which inductor decomposes: see :func:`_cudnn_batch_norm`."""
    x, grad, w, rm, rv, mean, invstd, eps, _reserve = n.args
    affine = w is not None
    new = _replace(g, n, torch.ops.aten.native_batch_norm_backward.default,
                   (grad, x, w, rm, rv, mean, invstd, True, eps, [True, affine, affine]))
    n.replace_all_uses_with(new)
    g.erase_node(n)


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)

_REWRITES: dict[Callable, Callable] = {
    swapping.swap_out: _swap_out,
    swapping.swap_release: _swap_release,
    swapping.swap_in: _swap_in,
    swapping.swap_wait: _swap_wait,
    runtime_ops.update_running_stats: _in_place(_mutwo.update_running_stats.default, 2),
    runtime_ops.increment_counters: _in_place(_mutwo.increment_counters.default, 1),
    runtime_ops.replay_random: _replay_random,
    torch.ops.aten.cudnn_batch_norm.default: _cudnn_batch_norm,
    torch.ops.aten.cudnn_batch_norm_backward.default: _cudnn_batch_norm_backward,
}


class InductorGraph:
    """A partitioned forward or backward module run on inductor's kernels: compiled at its first
    call for that call's inputs (boxed, as AOTAutograd calls it).

    Where inductor cannot compile a forward, it and its backward (``forward=`` it) run op by op,
    with a warning that says why. A backward whose forward ran compiled must run compiled too:
    the two sides agree on what the saved values hold only within one kind of kernels (cuDNN's
    BatchNorm backward reads statistics and a reserve space that inductor's BatchNorm forward
    does not make), so a backward inductor cannot compile then raises.
    """

    _boxed_call = True

    def __init__(self, gm: fx.GraphModule, *, is_backward: bool,
                 forward: InductorGraph | None = None):
        self.gm = gm  # (keeps what the graph's calls use alive: its swap slots)
        self.is_backward = is_backward
        self.forward = forward
        self._run: Callable | None = None
        self.compile_s: float | None = None
        """Seconds the compilation took (None before the first call)."""

    @property
    def compiled(self) -> bool:
        """Whether it runs inductor's code (False before its first call and op by op)."""
        return self._run is not None and self._run is not self.gm

    def __call__(self, args: list):
        if self._run is None:
            self._run = self._compile(args)
        return self._run(args)

    def _compile(self, args: list) -> Callable:
        if self.forward is not None and not self.forward.compiled:
            return self.gm  # (its forward runs op by op)
        what = "backward" if self.is_backward else "forward"
        t0 = time.perf_counter()
        try:
            return compat.inductor_compile(for_inductor(self.gm), list(args),
                                           is_backward=self.is_backward)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # (inductor's errors have no common base)
            log.debug("inductor failed on the planned %s", what, exc_info=True)
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            if self.forward is not None:
                raise RuntimeError(
                    f"MuTwoAC: inductor compiled the planned forward but not its backward "
                    f"({type(exc).__name__}: {first}); train with kernels=\"eager\"") from exc
            rank_zero_warn(f"MuTwoAC: inductor could not compile the planned {what} "
                           f"({type(exc).__name__}: {first}); it runs op by op.")
            return self.gm
        finally:
            self.compile_s = time.perf_counter() - t0
