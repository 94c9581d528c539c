"""The ops a rewritten step calls to keep activations in host memory between forward and backward.

The planner swaps an activation when copying it out after its last forward use and back before
its first backward use hides behind compute (:func:`lightning_ac.simulator.swap_schedule`); the
rewriter (:func:`lightning_ac.rewriter.insert_swaps`) puts three calls into the partitioned
graphs:

* forward, after the activation's last use: :func:`swap_out` starts the copy into pinned host
  memory on a side stream and returns the host tensor, which the forward saves *instead* of the
  device one;
* forward, where the plan expects the copy to have ended: :func:`swap_release` makes the compute
  stream wait for it, and the device tensor is dropped right after. Its memory goes back to the
  caching allocator in stream order, where the simulator frees it. (``record_stream`` would be
  the usual tool, but the allocator then hands the block out again only once the host *sees*
  the copy finished; the host runs ahead of the GPU, so on BERT-base that kept 2.6 GiB more
  allocated at the peak than planned, measured on the H100.)
* backward, early enough: :func:`swap_in` allocates the device tensor on the compute stream (at
  that point of the step, as the simulator counts it) and fills it on a second side stream;
* backward, before the first use: :func:`swap_wait` makes the compute stream wait for that copy.

Each swapped activation has a *slot* (an int in the graph) that keeps, between calls, the
copies' events and the activation's pinned host buffers. A buffer is taken by
:func:`swap_out` and given back by :func:`swap_wait`, once the compute stream has waited for
the copy back: every later use of it is queued behind that. From the second step on no pinned
memory is allocated and no event created. (Asking PyTorch's caching host allocator for a new
pinned tensor on every step instead, traced steps on the H200 found no free block and called
``cudaHostAlloc``: 90 to 300 ms of host time in one call.) Two forwards before their
backwards take two buffers. The slots of a rewritten graph are dropped with it
(:class:`SlotGroup`).

On the CPU the calls copy synchronously, through the same buffers, so that the rewrite can be
tested there.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

import torch

__all__ = ["SlotGroup", "swap_in", "swap_out", "swap_release", "swap_wait"]


@dataclass
class _Slot:
    free: list[torch.Tensor] = field(default_factory=list)
    """Host buffers no copy reads or writes any more: the next :func:`swap_out` takes one."""
    returning: list[torch.Tensor] = field(default_factory=list)
    """Buffers handed to :func:`swap_in`, given back by :func:`swap_wait`."""
    events: dict[str, torch.cuda.Event] = field(default_factory=dict)
    """``mark`` (the compute stream at a swap call), ``out``, ``in`` (the copies' ends):
    created at their first record, recorded again on every call."""


_SLOTS: dict[int, _Slot] = {}
_NEXT = itertools.count()
_STREAMS: dict[tuple[torch.device, str], torch.cuda.Stream] = {}


class SlotGroup:
    """``n`` fresh slots (ids in ``.ids``) for the swapped activations of one rewritten graph.

    Keep the group referenced from the graphs that use the ids: when it is collected, the slots
    and their host buffers are released."""

    def __init__(self, n: int):
        self.ids = [next(_NEXT) for _ in range(n)]
        for i in self.ids:
            _SLOTS[i] = _Slot()
        weakref.finalize(self, _drop, list(self.ids))


def _drop(ids: list[int]) -> None:
    for i in ids:
        _SLOTS.pop(i, None)


def _event(state: _Slot, name: str) -> torch.cuda.Event:
    ev = state.events.get(name)
    if ev is None:
        ev = state.events[name] = torch.cuda.Event()
    return ev


def _host_buffer(state: _Slot, x: torch.Tensor) -> torch.Tensor:
    """A free buffer of ``x``'s shape, strides and dtype, or a new one (pinned for CUDA)."""
    for i, buf in enumerate(state.free):
        if buf.shape == x.shape and buf.stride() == x.stride() and buf.dtype == x.dtype:
            return state.free.pop(i)
    state.free.clear()  # another shape (a recompiled graph would have new slots): not reused
    return torch.empty_like(x, device="cpu", pin_memory=x.is_cuda)


def _side_stream(device: torch.device, direction: str) -> torch.cuda.Stream:
    """One stream per device and direction: copies out queue behind each other, as the simulator
    assumes, and so do copies in, while the two directions overlap."""
    key = (device, direction)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device)
    return _STREAMS[key]


def swap_out(x: torch.Tensor, slot: int) -> torch.Tensor:
    """Start copying ``x`` to pinned host memory; returns the host tensor (filled once the copy
    ends, which :func:`swap_release` and :func:`swap_in` wait for). ``x`` must stay referenced
    until :func:`swap_release`."""
    state = _SLOTS[slot]
    host = _host_buffer(state, x)
    if not x.is_cuda:
        return host.copy_(x)
    dev = x.device
    mark, done = _event(state, "mark"), _event(state, "out")
    side = _side_stream(dev, "out")
    mark.record(torch.cuda.current_stream(dev))
    side.wait_event(mark)  # x has been written
    with torch.cuda.stream(side):
        host.copy_(x, non_blocking=True)
        done.record(side)
    return host


def swap_release(x: torch.Tensor, slot: int) -> None:
    """Make the compute stream wait until the copy of ``x`` to the host has ended, so that the
    caller can drop ``x``: kernels queued after this point may reuse its memory."""
    done = _SLOTS[slot].events.get("out")
    if x.is_cuda and done is not None:
        torch.cuda.current_stream(x.device).wait_event(done)


def swap_in(host: torch.Tensor, slot: int, device: str) -> torch.Tensor:
    """Start copying ``host`` back to ``device``; returns the device tensor (filled once
    :func:`swap_wait` returns)."""
    dev = torch.device(device)
    state = _SLOTS[slot]
    state.returning.append(host)
    if dev.type != "cuda":
        return host.clone()
    compute = torch.cuda.current_stream(dev)
    side = _side_stream(dev, "in")
    # Allocated from the compute stream's pool: the block may still be read by kernels queued
    # before this point, so the copy waits for them; it also waits for the copy out (an event
    # recorded again since names a later copy on the same queue: also done by then).
    out = torch.empty_like(host, device=dev)
    mark, done = _event(state, "mark"), _event(state, "in")
    mark.record(compute)
    side.wait_event(mark)
    if "out" in state.events:
        side.wait_event(state.events["out"])
    with torch.cuda.stream(side):
        out.copy_(host, non_blocking=True)
        done.record(side)
    return out


def swap_wait(x: torch.Tensor, slot: int) -> torch.Tensor:
    """Make the compute stream wait until :func:`swap_in` has filled ``x``; returns ``x``. The
    host buffer is free from here: whatever writes it next is queued behind this wait."""
    state = _SLOTS[slot]
    if x.is_cuda and "in" in state.events:
        torch.cuda.current_stream(x.device).wait_event(state.events["in"])
    if state.returning:
        state.free.append(state.returning.pop())
    return x
