"""The swap ops' host buffers: reused from step to step, never shared by two live copies, and
released with the graph that uses them (CPU: the copies are synchronous, the bookkeeping is the
same as on CUDA)."""

import gc

import pytest
import torch

from lightning_ac import _torch_compat as compat
from lightning_ac import swapping


def _round_trip(x, slot):
    host = swapping.swap_out(x, slot)
    swapping.swap_release((x,), slot)
    back = swapping.swap_in(host, slot)
    return host, swapping.swap_wait(back, slot)


def test_the_next_step_reuses_the_host_buffer_the_last_one_gave_back():
    group = swapping.SlotGroup(1)
    (slot,) = group.ids
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    host_a, back_a = _round_trip(a, slot)
    host_b, back_b = _round_trip(b, slot)
    assert host_b.data_ptr() == host_a.data_ptr()  # one buffer, not one per step
    assert torch.equal(back_a, a) and torch.equal(back_b, b)
    # a smaller size (a shorter sequence) views the same buffer; a larger one gets a new
    # buffer, which then serves the smaller sizes too
    c = torch.randn(2, 3)
    host_c, back_c = _round_trip(c, slot)
    assert host_c.shape == (2, 3) and host_c.data_ptr() == host_a.data_ptr()
    d = torch.randn(8, 3)
    host_d, back_d = _round_trip(d, slot)
    assert host_d.data_ptr() != host_a.data_ptr()
    host_e, back_e = _round_trip(a, slot)
    assert host_e.data_ptr() == host_d.data_ptr()
    for x, back in ((c, back_c), (d, back_d), (a, back_e)):
        assert torch.equal(back, x)


def test_a_strided_activation_keeps_its_strides_through_a_reused_buffer():
    group = swapping.SlotGroup(1)
    (slot,) = group.ids
    long = torch.randn(6, 5).t()  # strides (1, 5): not contiguous
    _round_trip(long, slot)
    short = torch.randn(4, 5).t()
    host, back = _round_trip(short, slot)
    assert host.stride() == short.stride() and torch.equal(back, short)


def test_two_forwards_before_their_backwards_use_two_buffers():
    group = swapping.SlotGroup(1)  # (the slots live as long as their group)
    (slot,) = group.ids
    a, b = torch.randn(5), torch.randn(5)
    host_a = swapping.swap_out(a, slot)
    host_b = swapping.swap_out(b, slot)  # the first copy is still needed
    assert host_a.data_ptr() != host_b.data_ptr()
    back_b = swapping.swap_wait(swapping.swap_in(host_b, slot), slot)
    back_a = swapping.swap_wait(swapping.swap_in(host_a, slot), slot)
    assert torch.equal(back_a, a) and torch.equal(back_b, b)


def test_a_buffer_is_reusable_only_once_its_copy_back_was_waited_for():
    group = swapping.SlotGroup(1)
    (slot,) = group.ids
    a = torch.randn(5)
    host_a = swapping.swap_out(a, slot)
    back = swapping.swap_in(host_a, slot)
    host_b = swapping.swap_out(torch.randn(5), slot)  # before swap_wait: a new buffer
    assert host_b.data_ptr() != host_a.data_ptr() and torch.equal(host_a, a)
    swapping.swap_wait(back, slot)
    assert [b.data_ptr() for b in swapping._SLOTS[slot].free] == [host_a.data_ptr()]


def test_the_slots_and_their_buffers_go_with_their_group():
    group = swapping.SlotGroup(2)
    ids = list(group.ids)
    _round_trip(torch.randn(3), ids[0])
    assert all(i in swapping._SLOTS for i in ids)
    del group
    gc.collect()
    assert not any(i in swapping._SLOTS for i in ids)


@pytest.mark.gpu
def test_one_release_for_several_copies_keeps_every_host_copy_intact():
    """CUDA: copies out queue on one stream, so waiting for the last one's event covers the
    others. After one release, kernels that reuse the dropped tensors' memory (and overwrite
    it) must not reach the host copies; copied back, every tensor is what it was."""
    torch.cuda.synchronize()
    group = swapping.SlotGroup(4)
    xs = [torch.randn(1 << 22, device="cuda") * (i + 1) for i in range(4)]  # 16 MiB each
    want = [x.cpu() for x in xs]
    compat.gpu_spin(50_000_000)  # the copies start late: a missing wait would show
    hosts = [swapping.swap_out(x, s) for x, s in zip(xs, group.ids)]
    swapping.swap_release(tuple(xs), group.ids[-1])
    del xs
    junk = [torch.full((1 << 22,), float(i), device="cuda") for i in range(8)]  # reuses the blocks
    backs = [swapping.swap_in(h, s) for h, s in zip(hosts, group.ids)]
    backs = [swapping.swap_wait(b, s) for b, s in zip(backs, group.ids)]
    got = [b.cpu() for b in backs]
    del junk
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(torch.equal(h, w) for h, w in zip(hosts, want))
