"""Profile every node of a captured training iteration on the real device.

:class:`GraphProfiler` is an ``fx.Interpreter`` that runs the joint graph and then the optimizer
graph on real tensors, and for every node records its runtime (median of several runs after a
warm-up; CUDA events on GPU, ``perf_counter`` on CPU), the memory it allocates, and the storages
its outputs live in. Memory is accounted per *storage*, not per node: a view, a ``detach`` or a
``getitem`` shares its base's storage and costs nothing, and a storage lives from the node that
allocates it to the last use of any node that aliases it.

:func:`profile_iteration` turns that record into a :class:`Profile`: a ``nodes`` table (one row per
node, keyed by ``fx.Node``), an ``activations`` table (one row per forward storage that backward
reads: lifetime, recompute sources and cost, swap cost), and a summary.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import statistics
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
import torch.fx as fx
from torch import nn

from lightning_ac import _torch_compat as compat
from lightning_ac.capture import (
    JointGraph,
    OptimizerGraph,
    capture_joint,
    capture_optimizer_step,
    node_value,
)
from lightning_ac.graph_passes import is_random_op

__all__ = [
    "CATEGORIES",
    "PHASES",
    "allocated_bytes",
    "EagerMemory",
    "GraphProfiler",
    "Profile",
    "is_random_op",
    "is_tensor_node",
    "live_bytes",
    "measure_host_device_bandwidth",
    "measure_joint",
    "profile_graphs",
    "recompute_chain",
    "profile_iteration",
    "profile_joint",
    "profile_step",
]

log = logging.getLogger(__name__)

PHASES = ("forward", "backward", "optimizer")
CATEGORIES = ("parameter", "gradient", "activation", "optimizer_state", "other")
_CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to this many bytes


def allocated_bytes(nbytes: int, cuda: bool) -> int:
    """What a storage of ``nbytes`` takes from the allocator: on CUDA, rounded up to its block."""
    return -(-nbytes // _CUDA_BLOCK) * _CUDA_BLOCK if cuda else nbytes


def is_tensor_node(node: fx.Node) -> bool:
    """True for nodes whose value is one tensor (not a tuple of them, not a scalar)."""
    return isinstance(node.meta.get("val"), torch.Tensor)


@dataclass(eq=False)
class _Storage:
    """One allocation, and every node whose output lives in it."""

    nbytes: int
    creator: fx.Node
    aliases: list[fx.Node] = field(default_factory=list)
    persistent: bool = False
    """Alive for the whole iteration (parameters, buffers, batch, optimizer state)."""
    mirror: bool = False
    """Stands for memory counted elsewhere (the optimizer graph's parameter copies)."""
    category: str = "other"


class GraphProfiler(fx.Interpreter):
    """Run a graph on real tensors and measure each node.

    After :meth:`run`, ``runtime_ms[node]`` is the median runtime, ``peak_delta[node]`` the
    allocator peak during the node above what was allocated before it (CUDA only), and
    ``storages`` / ``storage_of[node]`` say which allocations each node's outputs live in.
    Storages are shared across the graphs run with the same ``registry`` (gradients made by the
    joint graph are the optimizer graph's inputs).
    """

    def __init__(self, gm: fx.GraphModule, *, runs: int = 3,
                 registry: dict[int, tuple[_Storage, list]] | None = None,
                 swap: bool = False, min_swap_B: int = 64 << 10, cold_l2: bool = False,
                 swap_above_B: int | None = None):
        super().__init__(gm, garbage_collect_values=True)
        self.runs = max(1, runs)
        self.cold_l2 = cold_l2
        """Evict the GPU's L2 cache before each timed run, so that a node reads its inputs from
        device memory, as backward's recomputation reads activations saved long before."""
        self._l2_flush: torch.Tensor | None = None
        self.swap = swap
        """Move each activation to host memory after its last forward use, and back before its
        next use (μ-TWO's way of profiling a step whose activations do not fit)."""
        self.min_swap_B = min_swap_B
        self.swap_above_B = swap_above_B
        """With ``swap``: move activations to the host only while the device's allocated bytes
        plus the largest allocation a node has made in this run exceed this (the oldest first:
        backward reads them last); None: each one as soon as the forward is done with it.
        Pinning host memory and copying cost seconds per GiB, so a step that needs only part of
        its activations moved to stay under the budget moves only that part."""
        self._pending: dict[_Storage, None] = {}  # (an ordered set: the oldest first)
        self._largest_B = 0
        self.swapped_B = 0
        """Bytes moved to the host and back during the last run."""
        self._position = {n: i for i, n in enumerate(gm.graph.nodes)}
        self._on_host: dict[_Storage, tuple[torch.Tensor, torch.device]] = {}
        self.runtime_ms: dict[fx.Node, float] = {}
        self.peak_delta: dict[fx.Node, int] = {}
        self.storage_of: dict[fx.Node, list[_Storage]] = {}
        self.storages: list[_Storage] = []
        # data_ptr -> (storage, weakrefs to tensors seen in it). A pointer is an alias of a known
        # storage only while one of those tensors lives: allocators hand freed addresses out again.
        self._registry = {} if registry is None else registry
        self._measuring = False

    def run(self, *args, measure: bool = True):
        """Run on flat arguments (one per placeholder) and return the flat list of outputs."""
        self._measuring = measure
        self.swapped_B = 0
        self._pending, self._largest_B = {}, 0
        kept = None
        if self.swap and not measure:  # swapping needs storages: track this run's apart
            kept = self.storages, self.storage_of, self._registry
            self.storages, self.storage_of, self._registry = [], {}, dict(self._registry)
        try:
            return super().run(*args, enable_io_processing=False)
        finally:
            self._measuring = False
            self._on_host.clear()
            self._pending = {}
            if kept is not None:
                self.storages, self.storage_of, self._registry = kept

    def run_node(self, n: fx.Node):
        if self.swap:
            self._swap_in(n)
        cuda = self.swap_above_B is not None and _on_cuda(n, self.env)
        if cuda:
            before = _allocated_B()
            if not self._measuring:  # (a measured run reads the node's own peak: peak_delta)
                torch.cuda.reset_peak_memory_stats()
        try:
            out = self._run_and_measure(n)
        except torch.cuda.OutOfMemoryError as exc:
            raise NodeOutOfMemoryError(n, exc) from exc
        if self.swap and n.op == "call_function":
            if self.swap_above_B is not None:
                if cuda:
                    made = self.peak_delta[n] if self._measuring else _peak_allocated_B() - before
                else:
                    made = sum(st.nbytes for st in self.storage_of.get(n, ()) if st.creator is n)
                self._largest_B = max(self._largest_B, made)
            self.env[n] = out  # so that a swap-out right now also sees n's own output
            self._swap_out_after(n, cuda)
            out = self.env.pop(n)
        return out

    # -- host swap ---------------------------------------------------------------------------

    def _swap_out_after(self, n: fx.Node, cuda: bool) -> None:
        """Move to the host every storage read by ``n`` whose forward users have all run (with
        :attr:`swap_above_B`: as many of them as keep the device under it)."""
        here = self._position[n]
        for inp in n.all_input_nodes:
            for st in self.storage_of.get(inp, ()):
                if st in self._on_host or st.nbytes < self.min_swap_B or \
                        st.creator.op in ("placeholder", "get_attr"):
                    continue
                later = [u for a in st.aliases for u in a.users if self._position[u] > here]
                # something still reads it, and it is not the forward
                if later and all(u.op == "output" or compat.is_backward_node(u) for u in later):
                    if self.swap_above_B is None:
                        self._to_host(st)
                    else:
                        self._pending[st] = None
        if self.swap_above_B is not None and self._pending:
            self._spill(cuda)

    def _spill(self, cuda: bool) -> None:
        """Move pending activations to the host, the oldest first, until the device has room
        for the largest allocation a node has made (:attr:`swap_above_B`)."""
        limit = self.swap_above_B - self._largest_B
        while self._pending and (_allocated_B() if cuda else self._live_B()) > limit:
            st = next(iter(self._pending))
            del self._pending[st]
            if st not in self._on_host:
                self._to_host(st)

    def _live_B(self) -> int:
        """Bytes of the storages this run holds on the device (off CUDA, where there is no
        allocator to ask)."""
        return sum(st.nbytes for st, refs in self._registry.values()
                   if st not in self._on_host and any(r() is not None for r in refs))

    def _env_items(self, node: fx.Node) -> list:
        """``(index, value)`` for each element of ``node``'s value in ``env`` (index None for a
        single value); nothing once the interpreter has dropped it."""
        if node not in self.env:
            return []
        value = self.env[node]
        return list(enumerate(value)) if isinstance(value, (tuple, list)) else [(None, value)]

    def _alias_values(self, st: _Storage):
        """(node, index or None, tensor) for every tensor in ``env`` that lives in ``st``."""
        for a in st.aliases:
            for i, t in self._env_items(a):
                if isinstance(t, torch.Tensor):
                    entry = self._registry.get(t.untyped_storage().data_ptr())
                    if entry is not None and entry[0] is st:
                        yield a, i, t

    def _set(self, node: fx.Node, index, value) -> None:
        if index is None:
            self.env[node] = value
        else:
            old = self.env[node]
            self.env[node] = type(old)(value if i == index else v for i, v in enumerate(old))

    def _to_host(self, st: _Storage) -> None:
        found = list(self._alias_values(st))
        if not found:
            return
        device_bytes = torch.empty(0, dtype=torch.uint8, device=found[0][2].device).set_(
            found[0][2].untyped_storage())
        host = torch.empty(device_bytes.shape, dtype=torch.uint8,
                           pin_memory=device_bytes.is_cuda)
        host.copy_(device_bytes)
        self._on_host[st] = host, device_bytes.device
        for node, i, t in found:
            self._set(node, i, _OnHost(st, t.dtype, tuple(t.shape), t.stride(), t.storage_offset()))
        self.swapped_B += host.numel()

    def _swap_in(self, n: fx.Node) -> None:
        """Bring back every storage that ``n`` reads and that is on the host."""
        for inp in n.all_input_nodes:
            for _, v in self._env_items(inp):
                if isinstance(v, _OnHost) and v.storage in self._on_host:
                    self._from_host(v.storage)

    def _from_host(self, st: _Storage) -> None:
        host, device = self._on_host.pop(st)
        back = host.to(device)
        refs = []
        for a in st.aliases:
            for i, v in self._env_items(a):
                if isinstance(v, _OnHost) and v.storage is st:
                    t = torch.empty(0, dtype=v.dtype, device=back.device).set_(
                        back.untyped_storage(), v.offset, v.shape, v.stride)
                    self._set(a, i, t)
                    refs.append(weakref.ref(t))
        # the storage is the same allocation to the accounting, at its new address
        self._registry[back.untyped_storage().data_ptr()] = (st, refs)

    # -- measurement -------------------------------------------------------------------------

    def _run_and_measure(self, n: fx.Node):
        if not self._measuring:
            out = super().run_node(n)
            if self.swap and n.op != "output":
                self._register(n, out)
            return out
        if n.op in ("placeholder", "get_attr", "output"):
            out = super().run_node(n)
            self.runtime_ms[n] = 0.0
        else:
            out = self._measure(n)
        if n.op != "output":
            self._register(n, out)
        return out

    def _measure(self, n: fx.Node):
        if _on_cuda(n, self.env):
            return self._measure_cuda(n)
        times, out = [], None
        for _ in range(self.runs):
            out = None  # drop the previous result first, so a re-run does not double memory
            t0 = time.perf_counter()
            out = super().run_node(n)
            times.append((time.perf_counter() - t0) * 1e3)
        self.runtime_ms[n] = statistics.median(times)
        return out

    def _measure_cuda(self, n: fx.Node):
        """One untimed run (allocator peak, host launch time), then ``runs`` timed runs.

        Before each timed run the GPU spins for longer than the host takes to launch the op, so
        the events around the op time its kernels and not the launch latency of an idle GPU.
        """
        before = _allocated_B()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = super().run_node(n)
        launch_ms = (time.perf_counter() - t0) * 1e3
        self.peak_delta[n] = _peak_allocated_B() - before
        spin = int(max(0.05, 2.0 * launch_ms) * _spin_cycles_per_ms())
        events = []
        for _ in range(self.runs):
            out = None  # drop the previous result first, so a re-run does not double memory
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if self.cold_l2:
                self._evict_l2()
            compat.gpu_spin(spin)
            start.record()
            out = super().run_node(n)
            end.record()
            events.append((start, end))
        events[-1][1].synchronize()
        self.runtime_ms[n] = statistics.median(s.elapsed_time(e) for s, e in events)
        return out

    def _evict_l2(self) -> None:
        """Overwrite twice the L2 cache's size (what triton's ``do_bench`` does before a run)."""
        if self._l2_flush is None:
            l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                         "L2_cache_size", 0) or (64 << 20)
            self._l2_flush = torch.empty(2 * l2, dtype=torch.int8, device="cuda")
        self._l2_flush.zero_()

    def _register(self, n: fx.Node, out) -> None:
        found: list[_Storage] = []
        for t in _tensors(out):
            if hasattr(t, "to_local"):  # a DTensor (FSDP2's sharded parameters): its shard
                t = t.to_local()
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
            if ptr == 0 or nbytes == 0:
                continue
            nbytes = allocated_bytes(nbytes, t.is_cuda)
            entry = self._registry.get(ptr)
            # (the same storage, not another made at an address a live one gave back: FSDP
            # frees a gathered parameter's storage in place while views of it wait for backward)
            sid = compat.storage_id(t)
            if entry is not None and any(r() is not None and compat.storage_id(r()) == sid
                                         for r in entry[1]):
                storage = entry[0]
                entry[1].append(weakref.ref(t))
            else:
                storage = _Storage(nbytes=nbytes, creator=n)
                self.storages.append(storage)
                self._registry[ptr] = (storage, [weakref.ref(t)])
            if n not in storage.aliases:
                storage.aliases.append(n)
            if storage not in found:
                found.append(storage)
        self.storage_of[n] = found


class NodeOutOfMemoryError(torch.cuda.OutOfMemoryError):
    """The device ran out of memory while the profiler ran ``node``; the message names it and
    the bytes its outputs need, so that a step one op of which cannot fit can say so."""

    def __init__(self, node: fx.Node, cause: BaseException):
        self.node = node
        self.out_B = sum(t.numel() * t.element_size() for t in _tensors(node_value(node)))
        super().__init__(f"{cause}\n(profiling node {node.name}, {op_name(node)}, whose "
                         f"outputs take {self.out_B / 2**30:.2f} GiB)")


@dataclass(frozen=True, eq=False)
class _OnHost:
    """Stands in the interpreter's environment for a tensor whose storage is on the host."""

    storage: _Storage
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    offset: int


@functools.cache
def _spin_cycles_per_ms() -> float:
    """How many ``gpu_spin`` cycles the current GPU runs per millisecond (measured once)."""
    cycles = 2_000_000
    compat.gpu_spin(cycles // 10)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    compat.gpu_spin(cycles)
    end.record()
    end.synchronize()
    return cycles / max(start.elapsed_time(end), 1e-3)


def live_bytes(start, stop, nbytes, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes live after and during each of ``n_nodes`` nodes, for allocations live [start, stop].

    An allocation counts *during* every node from ``start`` to ``stop`` and *after* every node
    from ``start`` to ``stop - 1`` (it is freed once node ``stop`` has run).
    """
    start, stop = np.asarray(start, dtype=np.int64), np.asarray(stop, dtype=np.int64)
    nbytes = np.asarray(nbytes, dtype=np.int64)
    after = np.zeros(n_nodes + 1, dtype=np.int64)
    during = np.zeros(n_nodes + 1, dtype=np.int64)
    np.add.at(after, start, nbytes)
    np.add.at(after, stop, -nbytes)
    np.add.at(during, start, nbytes)
    np.add.at(during, stop + 1, -nbytes)
    return np.cumsum(after)[:n_nodes], np.cumsum(during)[:n_nodes]


def _allocated_B() -> int:
    """The current CUDA device's allocated bytes. (``torch.cuda.memory_allocated`` flattens and
    sorts every allocator statistic first: 0.3 ms, paid twice per node of a profile.)"""
    return torch.cuda.memory_stats_as_nested_dict()["allocated_bytes"]["all"]["current"]


def _peak_allocated_B() -> int:
    """The current CUDA device's peak of allocated bytes since the last reset."""
    return torch.cuda.memory_stats_as_nested_dict()["allocated_bytes"]["all"]["peak"]


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def _on_cuda(n: fx.Node, env: dict) -> bool:
    """Whether ``n`` runs on a GPU (then it is timed by CUDA events): any CUDA tensor among its
    inputs or outputs. Not only the first input: ``replay_random``'s first input is the generator
    state, a CPU tensor, and timing its SDPA by the host clock measured the launch alone (0.03 ms
    against 1.3 ms of kernels on BERT-base b32), so the planner took attention for free."""
    if any(t.is_cuda for inp in n.all_input_nodes for t in _tensors(env.get(inp))):
        return True
    return any(t.is_cuda for t in _tensors(n.meta.get("val")))


def measure_host_device_bandwidth(device: torch.device, nbytes: int = 256 << 20
                                  ) -> dict[str, float] | None:
    """Measured pinned-host copy bandwidth in bytes/ms, per direction (``"to_device"``,
    ``"to_host"``); None on CPU."""
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = {}
    for direction, src, dst in (("to_device", host, dev), ("to_host", dev, host)):
        dst.copy_(src, non_blocking=True)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        out[direction] = nbytes / (start.elapsed_time(end) / 3)
    return out


@dataclass(eq=False)
class _Measured:
    """A profile's measurements (per node and per storage) and how they were put together."""

    profilers: list[_Figures]
    """The joint graphs' measured figures, in order."""
    optimizer: OptimizerGraph | None
    op: _Figures | None
    bandwidth: dict | None
    previous_grads: str
    bindings: dict
    """The sizes they were measured at (symbol → int)."""


@dataclass
class Profile:
    """What one profiled training iteration looks like.

    ``nodes`` has one row per node of the joint graph then the optimizer graph, in execution
    order (``rank``), with the ``fx.Node`` itself in column ``node``; ``activations`` has one row
    per activation storage; ``memory`` has the live bytes per category after each node.
    """

    nodes: pd.DataFrame
    activations: pd.DataFrame
    memory: pd.DataFrame
    summary: dict
    joint: JointGraph
    optimizer: OptimizerGraph | None = None
    rank: dict[fx.Node, int] = field(default_factory=dict)
    """``fx.Node`` → row of ``nodes``."""
    graphs: list[JointGraph] = field(default_factory=list)
    """The step's joint graphs in the order their forwards run: ``[joint]``, or several where
    dynamo split the step (:mod:`lightning_ac.step_graphs`)."""
    storages: pd.DataFrame | None = None
    """Every non-persistent allocation: creator node, alias nodes, bytes, category, and the ranks
    ``start``/``stop`` between which it is live (the simulator replays these with a plan)."""
    measured: _Measured | None = field(default=None, repr=False)
    """What the tables were assembled from, for :func:`profile_at`."""
    sizes: dict = field(default_factory=dict)
    """Symbol → size of the joint graph's dynamic sizes that the tables are at (empty for a
    static graph): read node values under ``joint.bound(sizes)``."""

    @property
    def persistent_B(self) -> int:
        """Bytes live through the whole iteration (parameters, buffers, batch, optimizer state)."""
        return sum(self.summary["persistent_B"].values())

    @property
    def peak_bytes(self) -> int:
        return int(self.summary["predicted_peak_B"])

    def to_csv(self, directory) -> list:
        """Write ``nodes.csv``, ``activations.csv`` and ``memory.csv`` into ``directory``."""
        from lightning_ac.report import write_csv

        return write_csv(self, directory)

    def to_json(self, path) -> None:
        """Write the summary (and the peak-memory breakdown) as JSON."""
        from lightning_ac.report import write_json

        write_json(self, path)

    def plot(self, directory) -> list:
        """Write the memory-over-the-iteration and peak-breakdown PNGs into ``directory``."""
        from lightning_ac.report import plot_profile

        return plot_profile(self, directory)


PREVIOUS_GRADS = ("freed", "until_backward", "through_step")
"""Where the previous step's gradients die: before this step (``zero_grad(set_to_none=True)``
before forward), when backward starts (Lightning's automatic optimization zeroes them between
``training_step`` and backward), or never (gradient accumulation)."""


@contextlib.contextmanager
def _preserved_rng(device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        yield


def profile_iteration(joint: JointGraph, optimizer: OptimizerGraph | None = None, *,
                      runs: int = 3, warmup: bool = True, swap: bool = False,
                      min_swap_B: int = 64 << 10, swap_above_B: int | None = None,
                      cold_l2: bool = False, previous_grads: str = "freed") -> Profile:
    """Run and measure the captured iteration; nothing of the model or optimizer changes.

    Args:
        joint: the captured forward+backward graph (its real primals are used as inputs).
        optimizer: the captured optimizer step, if any; it runs on its own shadow copies, which
            stay allocated until ``optimizer.release()``.
        runs: timed runs per node (the median is kept); at least 3 for reported figures.
        warmup: run each graph once, unmeasured, first (cuDNN/cuBLAS set-up, allocator growth).
        swap: move each activation (of at least ``min_swap_B`` bytes) to host memory after its
            last forward use and back before backward reads it, so that a step whose activations
            do not fit on the device can still be profiled. The profile is the same either way:
            memory is accounted per storage, as if nothing had moved; node times leave the
            copies out.
        swap_above_B: with ``swap``, move only as many activations as keep the device's
            allocated bytes under this (:attr:`GraphProfiler.swap_above_B`); None: all of them.
        cold_l2: on CUDA, evict the L2 cache before each timed run (see
            :attr:`GraphProfiler.cold_l2`). Off by default: each node's repeated runs then find
            inputs of up to the L2's size (50 MB on an H100) in cache, which a recomputation in
            backward does not; whether that explains BERT's under-predicted recompute time is
            to be measured.
        previous_grads: how long the previous step's gradients stay allocated, which depends on
            where the training loop zeroes them (see :data:`PREVIOUS_GRADS`). ``"freed"``:
            ``zero_grad(set_to_none=True)`` before the forward pass (the benchmarks' loop).
            ``"until_backward"``: Lightning's automatic optimization, which runs
            ``training_step``, then ``zero_grad``, then backward, so last step's gradients are
            live through the whole forward pass. ``"through_step"``: gradient accumulation, where
            they are never freed.
    """
    if previous_grads not in PREVIOUS_GRADS:
        raise ValueError(f"previous_grads={previous_grads!r}: expected one of {PREVIOUS_GRADS}")
    t_start = time.perf_counter()
    device = joint.primal_values[0].device
    registry: dict = {}
    with torch.no_grad(), _preserved_rng(device):
        jp, outs = _run_joint(joint, registry=registry, runs=runs, warmup=warmup, swap=swap,
                              min_swap_B=min_swap_B, swap_above_B=swap_above_B, cold_l2=cold_l2)
        grads_by_primal = {joint.grad_of[node]: val for node, val in zip(joint.outputs(), outs)
                           if node in joint.grad_of}
        op = None
        if optimizer is not None:
            grads = [grads_by_primal.get(i) for i in optimizer.param_index]
            op = _run_optimizer(optimizer, grads, registry=registry, runs=runs, warmup=warmup,
                                cold_l2=cold_l2)
        del outs, grads_by_primal
    bandwidth = measure_host_device_bandwidth(device)
    profile = _assemble([joint], [jp], optimizer, op, bandwidth, previous_grads)
    if joint.dynamic:  # kept to scale the profile to other sizes (profile_at)
        profile.sizes = dict(joint.bindings)
        profile.measured = _Measured([_figures(jp)], optimizer, _figures(op), bandwidth,
                                     previous_grads, profile.sizes)
    log.debug("profiled %d nodes on %s in %.2f s (host swap: %s)", len(profile.nodes), device,
              time.perf_counter() - t_start, swap)
    profile.summary.update(device=str(device), device_name=_device_name(device),
                           torch_version=torch.__version__, runs_per_node=runs,
                           profile_s=round(time.perf_counter() - t_start, 3),
                           optimizer_note=optimizer.note if optimizer else "",
                           host_swap=swap, swapped_B=jp.swapped_B, cold_l2=cold_l2,
                           previous_grads=previous_grads)
    return profile


def _run_joint(joint: JointGraph, *, registry: dict, runs: int, warmup: bool, swap: bool,
               min_swap_B: int, cold_l2: bool,
               swap_above_B: int | None = None) -> tuple[GraphProfiler, list]:
    """Run ``joint`` on its real primals and tangents of ones, measuring every node (call under
    ``torch.no_grad()``). Returns the profiler and the joint graph's outputs."""
    device = joint.primal_values[0].device
    tangents = [torch.ones(node_value(t).shape, dtype=t.meta["val"].dtype, device=device)
                for t in joint.tangents]
    # The graph updates buffers in place (BatchNorm statistics, graph_passes.batch_norm_without_
    # buffers): the profile runs on copies of them, so the model is left as it was.
    primals = [v.clone() if r.kind == "buffer" else v
               for v, r in zip(joint.primal_values, joint.primal_roles)]
    jp = GraphProfiler(joint.gm, runs=runs, registry=registry, swap=swap,
                       min_swap_B=min_swap_B, swap_above_B=swap_above_B, cold_l2=cold_l2)
    args = [*joint.call_args(primals), *tangents]
    if warmup:
        jp.run(*args, measure=False)
    return jp, jp.run(*args)


def _run_optimizer(optimizer: OptimizerGraph, grads: list, *, registry: dict, runs: int,
                   warmup: bool, cold_l2: bool) -> GraphProfiler:
    """Run the optimizer graph on its shadow copies with ``grads`` (None: zeros), measuring
    every node (call under ``torch.no_grad()``)."""
    grads = [g if g is not None else torch.zeros_like(p)
             for g, p in zip(grads, optimizer.param_values)]
    # make_fx flattens its list arguments into one placeholder per tensor
    args = (*optimizer.param_values, *grads, *optimizer.state_values)
    op = GraphProfiler(optimizer.gm, runs=runs, registry=registry, cold_l2=cold_l2)
    if warmup:
        op.run(*args, measure=False)
    op.run(*args)
    return op


def measure_joint(joint: JointGraph, *, registry: dict, runs: int = 3, warmup: bool = True,
                  swap: bool = False, min_swap_B: int = 64 << 10,
                  swap_above_B: int | None = None, cold_l2: bool = False) -> GraphProfiler:
    """Measure one graph of a step that dynamo split, as :func:`profile_iteration` measures a
    whole one (same arguments); :func:`profile_graphs` assembles the graphs' measurements.
    Pass the step's graphs one ``registry``, so that a tensor two graphs read (a parameter,
    the batch) is one storage."""
    device = joint.primal_values[0].device
    with torch.no_grad(), _preserved_rng(device), compat.real_tensor_mode(), \
            torch.autocast(device.type, enabled=False):
        jp, outs = _run_joint(joint, registry=registry, runs=runs, warmup=warmup, swap=swap,
                              min_swap_B=min_swap_B, swap_above_B=swap_above_B, cold_l2=cold_l2)
        del outs
    return jp


def profile_graphs(joints: list[JointGraph], profilers: list[GraphProfiler],
                   optimizer: torch.optim.Optimizer | None, params: list[torch.Tensor], *,
                   backward_order: Sequence[int],
                   handed_on: Sequence[tuple[fx.Node, fx.Node]] = (),
                   eager: Sequence[EagerMemory] = (), eager_param_B: int = 0,
                   runs: int = 3, warmup: bool = True, cold_l2: bool = False,
                   previous_grads: str = "freed") -> Profile:
    """The profile of a step that runs as several graphs (:mod:`lightning_ac.step_graphs`):
    the graphs' measurements (:func:`measure_joint`, in forward order) on one timeline, with
    their backwards in ``backward_order``, eager code's memory, and ``optimizer``'s step over
    ``params`` (traced and measured here, on shadow copies)."""
    t_start = time.perf_counter()
    device = params[0].device
    opt = capture_optimizer_step(optimizer, params) if optimizer is not None else None
    capture_s = time.perf_counter() - t_start
    try:
        op = None
        if opt is not None:
            with torch.no_grad(), _preserved_rng(device):
                op = _run_optimizer(opt, [None] * len(opt.param_values), registry={},
                                    runs=runs, warmup=warmup, cold_l2=cold_l2)
        bandwidth = measure_host_device_bandwidth(device)
        profile = _assemble(joints, profilers, opt, op, bandwidth, previous_grads,
                            backward_order=backward_order, handed_on=handed_on, eager=eager,
                            eager_param_B=eager_param_B)
    finally:
        if opt is not None:
            opt.release()
    profile.summary.update(device=str(device), device_name=_device_name(device),
                           torch_version=torch.__version__, runs_per_node=runs,
                           profile_s=round(time.perf_counter() - t_start, 3),
                           optimizer_note=opt.note if opt else "",
                           optimizer_capture_s=round(capture_s, 3),
                           host_swap=any(p.swap for p in profilers),
                           swapped_B=sum(p.swapped_B for p in profilers), cold_l2=cold_l2,
                           previous_grads=previous_grads)
    return profile


def profile_joint(joint: JointGraph, optimizer: torch.optim.Optimizer | None = None,
                  **kwargs) -> Profile:
    """Profile a captured joint graph together with ``optimizer``'s step.

    Traces the optimizer step over shadow copies, profiles the iteration
    (:func:`profile_iteration`'s keyword arguments apply) and frees the copies again. The
    summary's ``optimizer_capture_s`` is the time the optimizer trace took.
    """
    t0 = time.perf_counter()
    opt = capture_optimizer_step(optimizer, joint.primal_values) if optimizer is not None else None
    capture_s = time.perf_counter() - t0
    try:
        profile = profile_iteration(joint, opt, **kwargs)
    finally:
        if opt is not None:
            opt.release()  # the shadow copies were only needed to run the step once
    profile.summary["optimizer_capture_s"] = round(capture_s, 3)
    return profile


def profile_step(fn: Callable, inputs: Sequence, module: nn.Module,
                 optimizer: torch.optim.Optimizer | None = None, *, runs: int = 3) -> Profile:
    """Capture and profile one training iteration of ``fn(*inputs)`` → loss, plus ``optimizer``.

    ``module`` is the model whose parameters ``fn`` uses; ``inputs`` are tensors on the device
    the step should be profiled on.
    """
    t0 = time.perf_counter()
    joint = capture_joint(fn, inputs, module)
    capture_s = time.perf_counter() - t0
    profile = profile_joint(joint, optimizer, runs=runs)
    profile.summary["capture_s"] = round(capture_s + profile.summary["optimizer_capture_s"], 3)
    return profile


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------
# From the measured run to tables
# --------------------------------------------------------------------------------------------


def _classify(joints: list[JointGraph], optimizer: OptimizerGraph | None,
              storages: list[_Storage], phase: dict[fx.Node, str]) -> None:
    """Give every storage a category and mark the ones that live through the iteration."""
    role = {p: r for j in joints for p, r in zip(j.primals, j.primal_roles)}
    opt_params = set(optimizer.params) if optimizer else set()
    opt_grads = set(optimizer.grads) if optimizer else set()
    opt_states = set(optimizer.states) if optimizer else set()
    grads = {g for j in joints for g in j.grad_of}
    handed = _grads_handed_on(joints)
    pinned = {n for j in joints for n in j.pinned}
    for s in storages:
        c = s.creator
        if c.op == "placeholder":
            if c in role and role[c].kind == "carried":
                s.category = "other"  # another graph's output: live until its last use here
            elif c in role:  # joint-graph primal
                s.persistent = True
                s.category = "parameter" if role[c].kind == "parameter" else "other"
            elif c in opt_params:
                s.persistent, s.mirror, s.category = True, True, "parameter"
            elif c in opt_grads:  # gradients the joint graphs did not make (zeros stand in)
                s.persistent, s.mirror, s.category = True, True, "gradient"
            elif c in opt_states:
                s.persistent, s.category = True, "optimizer_state"
            else:  # tangents
                s.category = "other"
        elif c in pinned:  # buffer copies, RNG states: saved for the whole step, tiny, persistent
            s.persistent, s.category = True, "other"
        elif c.op == "get_attr":  # constants lifted by make_fx: the optimizer's step counters
            s.persistent, s.category = True, ("optimizer_state" if c in phase and
                                              phase[c] == "optimizer" else "other")
        elif phase[c] == "forward":
            reads_in_bwd = any(phase.get(u) == "backward" for a in s.aliases for u in a.users)
            s.category = "activation" if reads_in_bwd else "other"
        elif phase[c] == "backward":  # (gradients of carried inputs are handed on: not kept)
            s.category = "gradient" if any(a in grads and a not in handed for a in s.aliases) \
                else "other"
        else:
            s.category = "other"  # optimizer temporaries


def _grads_handed_on(joints: list[JointGraph]) -> set[fx.Node]:
    """Gradients of carried inputs (values made earlier in the step, FSDP2's gathered
    parameters): eager code takes them when the graph's backward ends (autograd, to the graph
    that made the value; FSDP2, to reduce-scatter), so they are not the step's to keep."""
    return {g for j in joints for g, i in j.grad_of.items()
            if j.primal_roles[i].kind == "carried"}


@dataclass(frozen=True)
class EagerMemory:
    """Memory of a step's code that runs outside the captured graphs (between two graphs of a
    step that dynamo split, or a module it does not trace, such as ``nn.LSTM``)."""

    after_graph: int
    """Index (forward order) of the graph the eager code runs after; -1: before the first."""
    saved_B: int
    """Bytes autograd saved for backward in that code (parameters and graph inputs/outputs
    excluded: they are counted elsewhere). Live from the code until its backward, which runs
    just before the backward of the graph it follows."""
    peak_B: int = 0
    """What the code allocates while it runs above what it saves (CUDA: the allocator's peak
    during it), counted at the end of the forward of the graph it follows."""


def _assemble(joints: list[JointGraph], profilers: list[GraphProfiler],
              optimizer: OptimizerGraph | None, op: GraphProfiler | None,
              bandwidth: dict[str, float] | None, previous_grads: str = "freed", *,
              backward_order: Sequence[int] | None = None,
              handed_on: Sequence[tuple[fx.Node, fx.Node]] = (),
              eager: Sequence[EagerMemory] = (), eager_param_B: int = 0) -> Profile:
    """The iteration's tables from the graphs' measurements.

    ``joints`` are the step's graphs in the order their forwards ran (usually one); their
    backwards run in ``backward_order`` (default: the reverse). ``handed_on`` pairs a forward
    output with the input of a later graph that is the same tensor: one storage, live until the
    last use of either, and no candidate to drop or swap (the later graph holds it); ``eager`` and
    ``eager_param_B`` (parameters only eager code uses, and their gradients) are memory no
    graph holds.
    """
    profilers = profilers + ([op] if op else [])
    # Execution order of the iteration: every graph's forward, then each graph's backward in the
    # order autograd ran them (its tangents first: a graph's output gradients appear when its
    # backward starts), then the optimizer step. Forward nodes never depend on backward ones, so
    # this is a topological order of every joint graph.
    phase: dict[fx.Node, str] = {}
    for j in joints:
        for node in j.graph.nodes:
            if node.op != "output":
                phase[node] = "backward" if j.is_backward(node) else "forward"
    order = [n for j in joints for n in j.graph.nodes if phase.get(n) == "forward"]
    fwd_end, count = {}, 0  # each graph's last forward rank
    for j in joints:
        count += sum(1 for n in j.graph.nodes if phase.get(n) == "forward")
        fwd_end[j.graph] = count - 1
    bw = list(backward_order) if backward_order is not None else []
    bw += [k for k in reversed(range(len(joints))) if k not in bw]
    bwd_start, bwd_end = {}, {}
    for k in bw:
        j = joints[k]
        bwd_start[j.graph] = len(order)
        order += j.tangents + [n for n in j.graph.nodes
                               if phase.get(n) == "backward" and n.op != "placeholder"]
        bwd_end[j.graph] = len(order) - 1
    if optimizer is not None:
        for node in optimizer.graph.nodes:
            if node.op != "output":
                order.append(node)
                phase[node] = "optimizer"
    rank = {n: i for i, n in enumerate(order)}
    n_joint = sum(1 for n in order if phase[n] != "optimizer")
    n_forward = sum(1 for n in order if phase[n] == "forward")
    end = len(order) - 1
    storages = [s for p in profilers for s in p.storages]
    storage_of = {n: s for p in profilers for n, s in p.storage_of.items()}
    runtime = {n: t for p in profilers for n, t in p.runtime_ms.items()}
    peak_delta = {n: d for p in profilers for n, d in p.peak_delta.items()}
    _classify(joints, optimizer, storages, phase)
    handed_grads = _grads_handed_on(joints)
    resharded = {p for j in joints for p in j.resharded}
    dropped = {n for j in joints for n in j.dropped_outputs}
    grads = {g for j in joints for g in j.grad_of} - handed_grads
    handed = set()
    for out, inp in handed_on:
        mine, theirs = storage_of.get(out, []), storage_of.get(inp, [])
        if len(mine) == 1 and len(theirs) == 1 and mine[0] is not theirs[0]:
            mine[0].aliases += [a for a in theirs[0].aliases if a not in mine[0].aliases]
            theirs[0].persistent = theirs[0].mirror = True  # counted in mine
            mine[0].category = "other"
            handed.add(out)

    def last_use(n: fx.Node) -> int:
        users = [rank[u] for u in n.users if u in rank]
        if any(u.op == "output" for u in n.users):  # a graph output
            if n in grads:
                users.append(end)  # gradients live until the optimizer has used them
            elif n in handed:
                pass  # the later graph's uses (its aliases) say how long it lives
            elif n in handed_grads:
                users.append(bwd_end[n.graph])  # eager code takes it when the backward ends
            elif n in dropped:
                users.append(n_forward - 1)  # nothing held it once forward had ended
            else:
                users.append(n_joint - 1 if phase[n] != "optimizer" else end)
        return max(users, default=rank[n])

    # Storage lifetimes [start, stop]: a storage is allocated by its creator and freed after the
    # last use of any node that aliases it. Persistent storages form the base under everything.
    n_nodes = len(order)
    base = {c: 0 for c in CATEGORIES}
    base["parameter"] += eager_param_B
    created_B = np.zeros(n_nodes, dtype=np.int64)
    records = []
    for s in storages:
        if s.persistent:
            if not s.mirror:
                base[s.category] += s.nbytes
            continue
        start, stop = rank[s.creator], max(last_use(a) for a in s.aliases)
        created_B[start] += s.nbytes
        record = {"node": _representative(s), "creator": s.creator, "aliases": tuple(s.aliases),
                  "bytes": s.nbytes, "category": s.category, "start": start, "stop": stop}
        again = bwd_start.get(s.creator.graph) if s.creator in resharded else None
        if again is not None and stop >= again:
            # freed when forward ends and made again before its graph's backward (FSDP's
            # reshard): two lifetimes, the second the one a recomputation in backward reads
            forward_uses = [rank[u] for a in s.aliases for u in a.users
                            if u in rank and rank[u] < n_forward]
            records.append({**record, "stop": max(forward_uses, default=start)})
            record["start"] = again
        records.append(record)
    # Memory no graph node makes (it aliases no node, so the simulator never maps one to it):
    # what eager code between graphs saves for its backward, and the gradients of parameters
    # only eager code uses (made during backward, used by the optimizer).
    for e in eager:
        j = joints[e.after_graph] if e.after_graph >= 0 else None
        start = fwd_end[j.graph] if j is not None else 0
        stop = bwd_start[j.graph] if j is not None else n_joint - 1
        records.append({"node": order[start], "creator": order[start], "aliases": (),
                        "bytes": e.saved_B, "category": "other", "start": start, "stop": stop,
                        "eager_saved": True})
        if e.peak_B:
            records.append({"node": order[start], "creator": order[start], "aliases": (),
                            "bytes": e.peak_B, "category": "other", "start": start,
                            "stop": start})
    if eager_param_B:
        records.append({"node": order[n_forward], "creator": order[n_forward], "aliases": (),
                        "bytes": eager_param_B, "category": "gradient", "start": n_forward,
                        "stop": end})
    if previous_grads != "freed":
        # The previous step's gradients, where the loop frees them late: same sizes as this
        # step's, live from the start of the step. They alias no node of this step (so the
        # simulator never maps a node to them), and nothing can recompute them.
        last = n_forward - 1 if previous_grads == "until_backward" else end
        records += [{**r, "aliases": (), "start": 0, "stop": last}
                    for r in records if r["category"] == "gradient"]
    table = pd.DataFrame(records, columns=["node", "creator", "aliases", "bytes", "category",
                                           "start", "stop", "eager_saved"])
    # (eager_saved: what eager code between graphs saves for its backward, which the step can
    # keep in host memory instead: planner.offload_eager_saves)
    table["eager_saved"] = table["eager_saved"].eq(True)
    after, during = {}, {}
    for c in CATEGORIES:
        sel = table[table["category"] == c]
        after[c], during[c] = live_bytes(sel["start"], sel["stop"], sel["bytes"], n_nodes)
    memory = pd.DataFrame({c: after[c] + base[c] for c in CATEGORIES})
    active = memory.sum(axis=1).to_numpy()
    live_during = {c: during[c] + base[c] for c in CATEGORIES}
    live_during_total = sum(live_during.values())

    rows = []
    for n in order:
        r = rank[n]
        own = storage_of.get(n, [])
        workspace = max(0, peak_delta.get(n, 0) - int(created_B[r]))
        largest = max(own, key=lambda s: s.nbytes, default=None)
        val = n.meta.get("val")
        rows.append({
            "rank": r, "name": n.name, "phase": phase[n], "op": op_name(n),
            "node": n,
            "runtime_ms": runtime.get(n, 0.0),
            "active_mem_B": int(active[r]),
            "peak_mem_B": int(live_during_total[r]) + workspace,
            "out_B": int(created_B[r]),
            "workspace_B": workspace,
            "category": largest.category if largest else
            ("other" if isinstance(val, torch.Tensor) else None),
            "aliases": largest.creator.name if largest and largest.creator is not n else "",
            "last_use_rank": last_use(n),
        })
    nodes = pd.DataFrame(rows).set_index("rank", drop=False)
    nodes.index.name = None

    # Buffers may be written back in place after forward (BatchNorm's running statistics), so a
    # value rebuilt from one in backward would read the new value: such values are never dropped.
    mutable = {p for j in joints for p, r in zip(j.primals, j.primal_roles) if r.kind == "buffer"}
    slower = min(bandwidth.values()) if bandwidth else None
    activations = _activation_table(storages, phase, rank, runtime, nodes, slower, mutable)
    peak_rank = int(nodes["peak_mem_B"].idxmax())
    phase_ms = nodes.groupby("phase")["runtime_ms"].sum()
    summary = {
        "predicted_peak_B": int(nodes.at[peak_rank, "peak_mem_B"]),
        "peak_rank": peak_rank,
        "peak_node": nodes.at[peak_rank, "name"],
        "peak_phase": nodes.at[peak_rank, "phase"],
        # what is live while the peak node runs; its scratch space (workspace) counts as other
        "peak_breakdown_B": {c: int(live_during[c][peak_rank]) + (
            int(nodes.at[peak_rank, "workspace_B"]) if c == "other" else 0) for c in CATEGORIES},
        "persistent_B": {c: int(v) for c, v in base.items() if v},
        "activation_B": int(activations["bytes"].sum()) if len(activations) else 0,
        "n_nodes": {p: int((nodes["phase"] == p).sum()) for p in PHASES},
        "n_activations": len(activations),
        "runtime_ms": {p: round(float(phase_ms.get(p, 0.0)), 3) for p in PHASES},
        "sum_runtime_ms": round(float(nodes["runtime_ms"].sum()), 3),
        # the slower direction, and each direction (the swap schedule uses these)
        "host_device_bandwidth_GBps": round(slower / 1e6, 2) if slower else None,
        **{f"{k}_GBps": round(v / 1e6, 2) for k, v in (bandwidth or {}).items()},
        "graphs": len(joints),
        "eager_saved_B": [int(e.saved_B) for e in eager],
        "eager_peak_B": [int(e.peak_B) for e in eager],
        "eager_param_B": int(eager_param_B),
    }
    return Profile(nodes=nodes, activations=activations, memory=memory, summary=summary,
                   joint=joints[0], optimizer=optimizer, rank=rank, storages=table,
                   graphs=list(joints))


def op_name(n: fx.Node) -> str:
    """The aten overload a node calls (``aten.addmm.default``), else its target's or op's name."""
    if n.op == "call_function":
        name = getattr(n.target, "__name__", str(n.target))
        return str(n.target) if hasattr(n.target, "_schema") else name
    return n.op


def _activation_table(storages, phase, rank, runtime, nodes, bandwidth, mutable) -> pd.DataFrame:
    acts = [s for s in storages if s.category == "activation"]
    # Values that stay available when an activation is dropped: other activations (kept unless
    # the planner says otherwise), and anything persistent or a view of it (parameters, batch).
    # Only tensor-valued nodes can be saved: a multi-output op is re-run even when some of its
    # outputs are kept (its getitems are what is saved).
    kept = {a: s for s in storages if s.category == "activation" or s.persistent
            for a in s.aliases if is_tensor_node(a)}
    cum_ms = np.concatenate([[0.0], np.cumsum(nodes["runtime_ms"].to_numpy())])
    rows = []
    for s in acts:
        node = _representative(s)
        fwd_users = [rank[u] for a in s.aliases for u in a.users if phase.get(u) == "forward"]
        bwd_users = [rank[u] for a in s.aliases for u in a.users if phase.get(u) == "backward"]
        last_fwd = max(fwd_users, default=rank[s.creator])
        first_bwd, last_bwd = min(bwd_users), max(bwd_users)
        # with every activation kept: rebuilt from inputs, persistent values, other activations
        sources, chain = recompute_chain(
            s.creator, lambda n, s=s: n.op == "placeholder" or kept.get(n) not in (None, s))
        random = any(is_random_op(n) for n in chain)
        recompute_ms = sum(runtime.get(n, 0.0) for n in chain)
        rows.append({
            "name": node.name, "node": node, "creator": s.creator.name,
            "bytes": s.nbytes,
            "created_rank": rank[s.creator],
            "last_fwd_use_rank": last_fwd,
            "first_bwd_use_rank": first_bwd,
            "last_bwd_use_rank": last_bwd,
            "inactive_ms": float(cum_ms[first_bwd] - cum_ms[last_fwd + 1]),
            "recompute_sources": " ".join(n.name for n in sources),
            "recompute_nodes": len(chain),
            "recompute_ms": recompute_ms,
            "recompute_ratio_B_per_ms": s.nbytes / max(recompute_ms, 1e-6),
            "recomputable": not random and not any(src in mutable for src in sources),
            "swap_ms": s.nbytes / bandwidth if bandwidth else float("nan"),
            "aliases": " ".join(a.name for a in s.aliases if a is not node),
        })
    columns = ["name", "node", "creator", "bytes", "created_rank", "last_fwd_use_rank",
               "first_bwd_use_rank", "last_bwd_use_rank", "inactive_ms", "recompute_sources",
               "recompute_nodes", "recompute_ms", "recompute_ratio_B_per_ms", "recomputable",
               "swap_ms", "aliases"]
    return pd.DataFrame(rows, columns=columns)


@dataclass(eq=False)
class _Figures:
    """What ``_assemble`` reads of a :class:`GraphProfiler`: as measured, or scaled to other
    sizes by :func:`profile_at`."""

    storages: list
    storage_of: dict
    runtime_ms: dict
    peak_delta: dict


def _figures(p: GraphProfiler | None) -> _Figures | None:
    """What ``_assemble`` reads of a profiler, and nothing else: a profiler keeps the arguments
    of its last run (the interpreter's argument iterator), which for the optimizer are shadow
    copies of the parameters and optimizer state (1.8 GB on BERT-base, held between steps when
    a profile kept its profilers: measured on the H200)."""
    if p is None:
        return None
    return _Figures(list(p.storages), dict(p.storage_of), dict(p.runtime_ms), dict(p.peak_delta))


def profile_at(profile: Profile, bindings: dict) -> Profile:
    """``profile`` (of a joint graph traced with dynamic sizes) at other sizes, without running
    anything: each storage's bytes follow its traced size (exact for one dense tensor; scaled by
    the same ratio otherwise), each node's time and scratch memory the ratio of its largest
    tensor's elements, and the tables are assembled again. The result's :attr:`Profile.sizes`
    are ``bindings`` (with the measured ones for symbols it does not give).

    Raises:
        ValueError: ``profile`` was not measured on a graph with dynamic sizes.
    """
    m, joint = profile.measured, profile.joint
    if m is None or not joint.dynamic:
        raise ValueError("profile_at needs the profile of a graph traced with dynamic sizes")
    old = m.bindings
    new = {**old, **bindings}
    cuda = (profile.summary.get("device") or "").startswith("cuda")

    def numel(t: torch.Tensor, bindings: dict) -> int:
        return math.prod(compat.concrete(x, bindings) for x in t.shape)

    ratios: dict[fx.Node, float] = {}  # (a node's is read once per reader: BERT-base, 16k)

    def ratio(node: fx.Node) -> float:
        """Elements of the largest tensor with dynamic sizes of ``node``'s value at the new
        sizes over the old (1 where it has none)."""
        if node not in ratios:
            sized = [(numel(t, old), t) for t in _tensors(node.meta.get("val"))
                     if any(isinstance(x, torch.SymInt) for x in t.shape)]
            before, largest = max(sized, key=lambda nt: nt[0], default=(0, None))
            ratios[node] = numel(largest, new) / before if before else 1.0
        return ratios[node]

    swapped: dict[_Storage, _Storage] = {}
    for p in m.profilers:
        for st in p.storages:
            r = ratio(_representative(st))
            if r != 1.0:
                swapped[st] = replace(st, nbytes=allocated_bytes(int(st.nbytes * r), cuda))

    def scaled(p: _Figures) -> _Figures:
        node_ratio = {n: max((ratio(v) for v in (n, *n.all_input_nodes)), default=1.0)
                      for n in p.runtime_ms}
        return _Figures([swapped.get(st, st) for st in p.storages],
                       {n: [swapped.get(st, st) for st in sts] for n, sts in p.storage_of.items()},
                       {n: t * node_ratio[n] for n, t in p.runtime_ms.items()},
                       {n: int(d * node_ratio.get(n, 1.0)) for n, d in p.peak_delta.items()})

    profilers = [scaled(p) for p in m.profilers]
    op = scaled(m.op) if m.op is not None else None
    out = _assemble(profile.graphs or [joint], profilers, m.optimizer, op, m.bandwidth,
                    m.previous_grads)
    out.summary = {**profile.summary, **out.summary, "sizes": {str(k): v for k, v in new.items()}}
    out.measured = m  # (the measured figures, not the scaled ones: scale from them again)
    out.sizes = new
    return out


def _representative(s: _Storage) -> fx.Node:
    """The node that stands for a storage: its first alias with a tensor value (the creator,
    or for a multi-output op the ``getitem`` that extracts this output)."""
    return next((a for a in s.aliases if isinstance(a.meta.get("val"), torch.Tensor)), s.aliases[0])


def recompute_chain(node: fx.Node, available) -> tuple[list[fx.Node], list[fx.Node]]:
    """Walk back from ``node`` to the values it can be rebuilt from.

    ``available(n)`` says whether the value of ``n`` is there without re-running anything.
    Returns the sources (available values read) and the chain (nodes to re-run, ``node`` first),
    each in the order the walk meets them. The profiler and the planner share this walk.
    """
    sources: dict[fx.Node, None] = {}
    chain: dict[fx.Node, None] = {node: None}
    stack = [node]
    while stack:
        n = stack.pop()
        for inp in n.all_input_nodes:
            if inp in chain or inp in sources:
                continue
            if available(inp):
                sources[inp] = None
            else:
                chain[inp] = None
                stack.append(inp)
    return list(sources), list(chain)
