"""The ops a rewritten step calls to keep activations in host memory between forward and backward.

The planner swaps an activation when copying it out after its last forward use and back before
its first backward use hides behind compute (:func:`lightning_ac.simulator.swap_schedule`); the
rewriter (:func:`lightning_ac.rewriter.insert_swaps`) puts four calls into the partitioned
graphs:

* forward, after the activation's last use: :func:`swap_out` starts the copy into pinned host
  memory on a side stream and returns the host tensor, which the forward saves *instead* of the
  device one;
* forward, where the plan expects the copy to have ended: :func:`swap_release` makes the compute
  stream wait for it, and the device tensor is dropped right after. Its memory goes back to the
  caching allocator in stream order, where the simulator frees it. (``record_stream`` would be
  the usual tool, but the allocator then hands the block out again only once the host *sees*
  the copy finished; the host runs ahead of the GPU, so on BERT-base that kept 2.6 GiB more
  allocated at the peak than planned, measured on the H100.) One call releases every
  activation the plan releases at that point: copies out queue on one stream, so waiting for
  the last of them covers the others;
* backward, early enough: :func:`swap_in` allocates the device tensor on the compute stream (at
  that point of the step, as the simulator counts it) and fills it on a second side stream;
* backward, before the first use: :func:`swap_wait` makes the compute stream wait for that copy.

The calls are host time on every step, and a step whose host has little lead on the GPU pays
for it in step time (the planner charges :data:`lightning_ac.planner.SWAP_HOST_MS` per swap).
So they do little: each swapped activation has a *slot* (an int in the graph) that keeps, from
step to step, its side streams, its copies' events, its pinned host buffers and the compute
stream's ``Stream`` object, checked by id (``compat.current_cuda_stream_id``), for
``torch.cuda.current_stream()`` builds a new one: 8 µs a call on the H100 machine;
the copies are queued by switching the current stream (``torch.cuda.set_stream``, 2.6 µs for
both switches) rather than through the ``torch.cuda.stream`` context manager (15 µs).
``benchmarks/swap_calls.py`` times the calls.

A buffer is taken by :func:`swap_out` and given back by :func:`swap_wait`, once the compute
stream has waited for the copy back: every later use of it is queued behind that. From the
second step on no pinned memory is allocated and no event created; a slot whose activation's
size varies (a plan for varying sequence lengths) views one buffer of the largest size seen.
(Asking PyTorch's caching host allocator for a new pinned tensor on every step instead, traced
steps on the H200 found no free block and called ``cudaHostAlloc``: 90 to 300 ms of host time in
one call.) Two forwards before their backwards take two buffers. The slots of a rewritten graph
are dropped with it (:class:`SlotGroup`).

On the CPU the calls copy synchronously, through the same buffers, so that the rewrite can be
tested there.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

import torch

from lightning_ac import _torch_compat as compat

__all__ = ["SlotGroup", "swap_in", "swap_out", "swap_release", "swap_wait"]


class _Slot:
    """What one swapped activation keeps from step to step."""

    __slots__ = ("free", "returning", "device", "index", "out_stream", "in_stream", "compute",
                 "mark", "out", "back")

    def __init__(self):
        self.free: list[torch.Tensor] = []
        """Host buffers no copy reads or writes any more: the next :func:`swap_out` takes one."""
        self.returning: list[torch.Tensor] = []
        """Buffers handed to :func:`swap_in`, given back by :func:`swap_wait`."""
        # Set at the first copy out of a CUDA tensor (they stay None on the CPU): its device, the
        # side streams, the last compute stream seen, and events recorded again on every call:
        # the compute stream at a swap call, the end of the copy out, the end of the copy back.
        self.device: torch.device | None = None
        self.index = -1
        self.out_stream = self.in_stream = self.compute = None
        self.mark = self.out = self.back = None

    def use_cuda(self, device: torch.device) -> None:
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.out_stream, self.in_stream = _side_stream(device, "out"), _side_stream(device, "in")
        self.mark, self.out, self.back = (torch.cuda.Event() for _ in range(3))

    def compute_stream(self, stream_id: int | None = None) -> torch.cuda.Stream:
        """The current stream of the slot's device (``stream_id``, if the caller has read it):
        the object kept from the last call while it is still the one."""
        if stream_id is None:
            stream_id, _ = compat.current_cuda_stream_id(self.index)
        if self.compute is None or self.compute.stream_id != stream_id:
            self.compute = torch.cuda.current_stream(self.index)
        return self.compute


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


def _host_buffer(state: _Slot, x: torch.Tensor) -> torch.Tensor:
    """A host tensor with ``x``'s shape, strides and dtype: a view of a free buffer large enough,
    or of a new one (pinned for CUDA). Sizes that vary from step to step (a plan for varying
    sequence lengths) thus reuse one buffer, of the largest size, instead of asking the caching
    host allocator for pinned memory at each new size (``cudaHostAlloc`` when it has no block:
    90 to 300 ms a call on the H200)."""
    meta = torch.empty_like(x, device="meta")  # (the strides ``empty_like`` gives on the host)
    need = x.element_size() * (1 + sum((n - 1) * st for n, st in zip(meta.shape, meta.stride()))) \
        if x.numel() else 0
    fits = [i for i, buf in enumerate(state.free) if buf.numel() >= need]
    if fits:
        flat = state.free.pop(min(fits, key=lambda i: state.free[i].numel()))
    else:
        state.free.clear()  # all smaller than this size: the new buffer serves them too
        flat = torch.empty(need, dtype=torch.uint8, pin_memory=x.is_cuda)
    return flat[:need].view(x.dtype).as_strided(meta.shape, meta.stride())


def _whole(host: torch.Tensor) -> torch.Tensor:
    """The whole buffer a host tensor of :func:`_host_buffer` views, as flat bytes."""
    return torch.empty(0, dtype=torch.uint8).set_(host.untyped_storage())


def _side_stream(device: torch.device, direction: str) -> torch.cuda.Stream:
    """One stream per device and direction: copies out queue behind each other, as the simulator
    assumes, and so do copies in, while the two directions overlap."""
    key = (device, direction)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device)
    return _STREAMS[key]


def _copy_on(state: _Slot, side: torch.cuda.Stream, dst: torch.Tensor, src: torch.Tensor,
             done: torch.cuda.Event) -> None:
    """Queue ``dst.copy_(src)`` on ``side`` behind what the compute stream (the current stream
    of the slot's device) has queued so far, and record ``done`` after it."""
    stream_id, current = compat.current_cuda_stream_id()
    if current != state.index:
        with torch.cuda.device(state.index):  # (set_stream would switch devices for good)
            return _copy_on(state, side, dst, src, done)
    compute = state.compute_stream(stream_id)
    state.mark.record(compute)
    side.wait_event(state.mark)
    torch.cuda.set_stream(side)
    try:
        dst.copy_(src, non_blocking=True)
    finally:
        torch.cuda.set_stream(compute)
    done.record(side)


def swap_out(x: torch.Tensor, slot: int) -> torch.Tensor:
    """Start copying ``x`` to pinned host memory; returns the host tensor (filled once the copy
    ends, which :func:`swap_release` and :func:`swap_in` wait for). ``x`` must stay referenced
    until :func:`swap_release`."""
    state = _SLOTS[slot]
    host = _host_buffer(state, x)
    if not x.is_cuda:
        return host.copy_(x)
    if state.out is None:
        state.use_cuda(x.device)
    _copy_on(state, state.out_stream, host, x, state.out)
    return host


def swap_release(xs: Sequence[torch.Tensor], slot: int) -> None:
    """Make the compute stream wait until the copies of ``xs`` to the host have ended, so that
    the caller can drop them: kernels queued after this point may reuse their memory. ``slot``
    is that of the last of them to be swapped out: the copies out queue on one stream."""
    state = _SLOTS[slot]
    if state.out is not None:
        state.compute_stream().wait_event(state.out)


def swap_in(host: torch.Tensor, slot: int) -> torch.Tensor:
    """Start copying ``host`` back to the device :func:`swap_out` found it on; returns the
    device tensor (filled once :func:`swap_wait` returns)."""
    state = _SLOTS[slot]
    state.returning.append(host)
    if state.out is None:  # swapped out on the CPU
        return host.clone()
    # Allocated from the compute stream's pool: the block may still be read by kernels queued
    # before this point, so the copy waits for them (_copy_on); it also waits for the copy out
    # (an event recorded again since names a later copy on the same queue: also done by then).
    out = torch.empty_like(host, device=state.device)
    state.in_stream.wait_event(state.out)
    _copy_on(state, state.in_stream, out, host, state.back)
    return out


def swap_wait(x: torch.Tensor, slot: int) -> torch.Tensor:
    """Make the compute stream wait until :func:`swap_in` has filled ``x``; returns ``x``. The
    host buffer is free from here: whatever writes it next is queued behind this wait."""
    state = _SLOTS[slot]
    if state.back is not None:
        state.compute_stream().wait_event(state.back)
    if state.returning:
        state.free.append(_whole(state.returning.pop()))
    return x
