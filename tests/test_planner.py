import copy
from unittest import mock

import pytest
import torch
import torch.fx as fx
from torch import nn

from benchmarks.zoo import make_workload
from lightning_ac.planner import plan, rerun_by_op, swappable
from lightning_ac.profiler import is_random_op, profile_step
from lightning_ac.simulator import peak_breakdown, profile_index, recompute_closure, simulate, swap_schedule


def _profile(name, batch=16):
    w = make_workload(name, batch, seq_len=32)
    opt = torch.optim.SGD(w.model.parameters(), lr=0.1, momentum=0.9)
    return w, profile_step(w.loss, w.inputs, w.model, opt)


@pytest.fixture(scope="module", params=["mlp", "cnn", "tiny-bert"])
def profiled(request):
    return _profile(request.param)


def test_simulating_no_plan_reproduces_the_profile(profiled):
    _, prof = profiled
    sim = simulate(prof)
    assert sim.peak_B == prof.peak_bytes
    assert sim.extra_ms == 0 and not sim.recomputed_nodes
    assert sum(peak_breakdown(prof).values()) == prof.peak_bytes


def test_budget_already_met(profiled):
    _, prof = profiled
    p = plan(prof, prof.peak_bytes, headroom=0.0)
    assert p.stop_reason == "already fits" and not p.recomputed and p.predicted_extra_ms == 0
    # with the default headroom a budget at the very peak is not taken as met
    assert plan(prof, prof.peak_bytes).stop_reason != "already fits"
    assert plan(prof, None).stop_reason == "already fits"


def test_on_cuda_the_planner_keeps_a_reserve_below_the_budget(profiled):
    _, prof = profiled
    budget = prof.peak_bytes + (64 << 20)  # fits on the CPU, where nothing unseen is allocated
    assert plan(prof, budget, headroom=0.0).stop_reason == "already fits"
    cuda = copy.copy(prof)
    cuda.summary = {**prof.summary, "device": "cuda:0"}
    assert plan(cuda, budget, headroom=0.0).stop_reason != "already fits"
    assert plan(cuda, budget, headroom=0.0, reserve_B=0).stop_reason == "already fits"


@pytest.mark.parametrize("name", ["cnn", "tiny-bert"])
def test_plan_meets_a_reachable_budget(name):
    _, prof = _profile(name)
    floor = plan(prof, 1)  # as low as it goes
    assert floor.stop_reason == "infeasible" and floor.predicted_peak_B < prof.peak_bytes
    budget = (floor.predicted_peak_B + prof.peak_bytes) // 2
    p = plan(prof, budget)
    assert p.stop_reason == "fits"
    assert p.predicted_peak_B <= budget * (1 - 0.01) < p.baseline_peak_B
    assert simulate(prof, p.recomputed).peak_B == p.predicted_peak_B
    assert p.predicted_extra_ms > 0 and p.recomputed_B > 0
    assert set(p.kept).isdisjoint(p.recomputed)
    assert set(p.kept) | set(p.recomputed) == set(prof.activations["node"])
    # nothing random is re-run, and nothing is rebuilt from a buffer updated in place
    assert not any(is_random_op(n) for n in p.recomputed_nodes)
    buffers = {n for n, r in zip(prof.joint.primals, prof.joint.primal_roles) if r.kind == "buffer"}
    assert not any(inp in buffers for n in p.recomputed_nodes for inp in n.all_input_nodes)
    # every re-run node reads only kept values, inputs, or other re-run nodes
    rerun, sources = recompute_closure(prof, p.recomputed)
    assert rerun == set(p.recomputed_nodes)
    assert sources.isdisjoint(set(p.recomputed))
    # the per-op breakdown accounts for every re-run node and the whole predicted overhead
    by_op = rerun_by_op(p, prof)
    assert by_op["nodes"].sum() == len(p.recomputed_nodes)
    assert by_op["ms"].sum() == pytest.approx(p.predicted_extra_ms, abs=1e-2)


def test_cnn_recomputes_relu_before_convolution():
    """BN+ReLU outputs are cheap to rebuild from conv outputs: they go first.

    Runtimes are set here (convolutions 1 ms, anything else 0.01 ms) so that the test checks the
    heuristic, not how noisy the CPU timings of tiny ops are.
    """
    _, prof = _profile("cnn")
    conv = prof.nodes["op"].str.contains("convolution")
    prof.nodes["runtime_ms"] = conv.map({True: 1.0, False: 0.01})
    p = plan(prof, 1)
    ops = [str(n.target) for n in p.recomputed]
    first_conv = next(i for i, o in enumerate(ops) if "convolution" in o)
    assert all("relu" in o for o in ops[:first_conv]) and first_conv >= 2


def test_nothing_that_draws_from_the_generator_is_rerun():
    _, prof = _profile("tiny-bert")
    p = plan(prof, 1)
    acts = prof.activations.set_index("name")
    for n in p.recomputed:
        assert acts.at[n.name, "recomputable"]
    # random ops re-run only as replays of a saved generator state, never as fresh draws
    assert p.recomputed_nodes and not any(is_random_op(n) for n in p.recomputed_nodes)
    states = [n for n in prof.joint.pinned if is_random_op(n)]
    assert len(states) == 7
    assert not any(is_random_op(n) for n in recompute_closure(prof, set(p.recomputed))[0])


def _with_bandwidth(prof, gbps):
    """A copy of ``prof`` as if profiled on a device with pinned-host copies at ``gbps`` GB/s."""
    out = copy.copy(prof)
    out.summary = {**prof.summary, "host_device_bandwidth_GBps": gbps}
    out.__dict__.pop("_sim_index", None)  # the simulator's lookups read the bandwidth
    return out


@pytest.fixture
def small_swaps():
    """Let the tiny models' activations be swapped (they are all far below 1 MiB), at no host
    cost (their recomputation takes microseconds: any host cost would rule swapping out)."""
    from lightning_ac import planner

    with mock.patch.object(planner, "MIN_SWAP_B", 0), mock.patch.object(planner, "SWAP_HOST_MS", 0):
        yield


def test_no_swaps_without_a_measured_bandwidth(profiled, small_swaps):
    _, prof = profiled
    floor = plan(prof, 1).predicted_peak_B
    p = plan(prof, (floor + prof.peak_bytes) // 2)
    assert not p.swapped and not p.prefetch_before and p.swapped_B == 0


@pytest.mark.parametrize("name", ["cnn", "tiny-bert"])
def test_swaps_that_hide_behind_compute_come_before_recomputation(name, small_swaps):
    _, cpu = _profile(name)
    floor = plan(cpu, 1).predicted_peak_B
    budget = (floor + cpu.peak_bytes) // 2
    fast = _with_bandwidth(cpu, 1e6)  # copies take no time: swapping is free
    p = plan(fast, budget)
    assert p.stop_reason == "fits" and p.swapped
    assert p.predicted_extra_ms < plan(fast, budget, swap=False).predicted_extra_ms
    assert set(p.swapped) <= set(p.kept) and set(p.swapped).isdisjoint(p.recomputed)
    assert p.swapped_B == sum(int(b) for n, b in zip(fast.activations["node"],
                                                     fast.activations["bytes"]) if n in p.swapped)
    sim = simulate(fast, p.recomputed, p.swapped)
    assert sim.peak_B == p.predicted_peak_B <= budget
    assert sim.swaps.stall_ms == 0
    # each copy back is issued in backward, before the value is needed
    phase = dict(zip(fast.nodes["node"], fast.nodes["phase"]))
    for n, before in p.prefetch_before.items():
        assert phase[before] == "backward"
        assert fast.rank[before] <= sim.swaps.need_rank[n]
    # copies that cannot hide (a very slow link) are not taken
    assert not plan(_with_bandwidth(cpu, 1e-9), budget).swapped


def test_a_swapping_plan_must_beat_recomputing_alone_by_its_swaps_host_time(small_swaps):
    from lightning_ac import planner

    _, cpu = _profile("tiny-bert")
    fast = _with_bandwidth(cpu, 1e6)
    floor = plan(fast, 1, swap=False).predicted_peak_B
    budget = (floor + cpu.peak_bytes) // 2
    swapping, alone = plan(fast, budget), plan(fast, budget, swap=False)
    assert swapping.swapped and alone.stop_reason == "fits" and not alone.swapped
    assert planner.swap_cost_ms(swapping) < alone.predicted_extra_ms  # free swaps win
    # each swap's host time just over what recomputing alone costs more: recompute only
    per_swap = (alone.predicted_extra_ms - swapping.predicted_extra_ms) / len(swapping.swapped)
    with mock.patch.object(planner, "SWAP_HOST_MS", per_swap * 1.01):
        p = plan(fast, budget)
    assert not p.swapped and p.recomputed == alone.recomputed
    with mock.patch.object(planner, "SWAP_HOST_MS", per_swap * 0.99):
        assert plan(fast, budget).swapped == swapping.swapped


def test_swap_schedule_queues_copies_and_reports_stalls(small_swaps):
    _, cpu = _profile("tiny-bert")
    acts = swappable(_with_bandwidth(cpu, 1e6))[:6]
    fast = swap_schedule(_with_bandwidth(cpu, 1e6), acts)
    last_fwd = dict(zip(cpu.activations["node"], cpu.activations["last_fwd_use_rank"]))
    t0 = profile_index(_with_bandwidth(cpu, 1e6)).start_ms
    for n in acts:  # instant copies: out right after the last forward use, back just in time
        assert last_fwd[n] < fast.out_done_rank[n]
        assert t0[fast.out_done_rank[n] - 1] - t0[last_fwd[n] + 1] < 1e-3  # (0 ms nodes between)
        assert fast.prefetch_rank[n] <= fast.need_rank[n]
        assert t0[fast.prefetch_rank[n] + 1] > t0[fast.need_rank[n]] - 1e-3  # one node ahead
    assert fast.stall_ms == 0
    slow_prof = _with_bandwidth(cpu, 1e-6)
    slow = swap_schedule(slow_prof, acts)
    assert slow.stall_ms > 0
    # the simulator adds the stall to the step's extra time, and a swap that cannot finish
    # its copy out before backward needs the value frees nothing
    sim = simulate(slow_prof, (), acts)
    assert sim.extra_ms == pytest.approx(slow.stall_ms)
    assert sim.peak_B == slow_prof.peak_bytes


def test_the_default_reserve_is_kept_on_cuda_only_for_a_profile_or_a_device():
    from lightning_ac.planner import CUDA_RESERVE_B, default_reserve_B

    assert default_reserve_B(torch.device("cuda", 1)) == CUDA_RESERVE_B
    assert default_reserve_B(torch.device("cpu")) == 0 and default_reserve_B(None) == 0


def test_fused_costs_zero_what_inductor_fuses_and_nothing_else():
    from lightning_ac.planner import fused_costs

    _, prof = _profile("tiny-bert")
    fused = fused_costs(prof)
    assert fused.nodes is not prof.nodes and fused.activations is prof.activations
    by_op = fused.nodes.assign(was=prof.nodes["runtime_ms"],
                               op=fused.nodes.op.str.split(".").str[1])  # aten.<op>.<overload>
    forward = by_op[by_op.phase == "forward"]
    zero = set(forward.op[forward.runtime_ms == 0])
    assert {"native_layer_norm", "gelu", "view"} <= zero
    kept = forward[forward.op.isin(["addmm", "bmm"])]
    assert len(kept) and (kept.runtime_ms == kept.was).all()  # matmuls keep their times
    optimizer = by_op[by_op.phase == "optimizer"]
    assert len(optimizer) and (optimizer.runtime_ms == optimizer.was).all()


def test_a_plan_for_fused_kernels_recomputes_everything_that_costs_nothing_first():
    """With recompute_free, a step that needs a plan drops every activation whose rebuild
    costs no time (on fused kernels: pointwise chains), even those the budget does not need,
    at no predicted cost; without recompute_free the plan drops fewer for the same budget."""
    from lightning_ac.planner import fused_costs

    _, prof = _profile("tiny-bert")
    fused = fused_costs(prof)
    budget = int(simulate(fused).peak_B * 0.97)
    only_needed = plan(fused, budget, swap=False)
    p = plan(fused, budget, swap=False, recompute_free=True)
    assert p.stop_reason == "fits" and p.predicted_peak_B <= budget
    free = [s for s in p.steps if s["marginal_ms"] == 0.0]
    assert len(free) >= 5 and p.predicted_extra_ms == pytest.approx(
        sum(s["marginal_ms"] for s in p.steps), abs=1e-3)
    assert len(p.recomputed) > len(only_needed.recomputed)
    assert p.predicted_peak_B <= only_needed.predicted_peak_B
    assert p.predicted_extra_ms <= only_needed.predicted_extra_ms + 1e-6
    # without a plan needed it stays as it was: the step that fits runs as it is
    assert plan(fused, prof.peak_bytes * 2, recompute_free=True).stop_reason == "already fits"


def _chain_profile():
    """A step whose forward is an mm, a pointwise chain of three ops, and an mm: what fused
    kernels never write is the chain's middle."""
    model = nn.Sequential(nn.Linear(64, 4096), _Chain(), nn.Linear(4096, 8))
    x = torch.randn(32, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return profile_step(lambda x: model(x).square().mean(), [x], model, opt)


class _Chain(nn.Module):
    def forward(self, h):
        return torch.tanh(torch.sigmoid(h * 2.0)) + 1.0


def test_fused_costs_count_no_memory_for_what_fused_kernels_never_write():
    """On fused kernels a value that a fused op makes and only fused ops read takes no memory,
    unless the plan saves it; what such a value reads lives until the kernel it is fused into
    has run; fused ops have no scratch space. The fused step's simulated peak is below the
    eager one's, and a plan still counts what it keeps."""
    from lightning_ac.planner import fused_costs
    from lightning_ac.simulator import phase_peaks

    prof = _chain_profile()
    fused = fused_costs(prof)
    st = fused.storages.assign(op=[c.target.__name__ if callable(c.target) else str(c.target)
                                   for c in fused.storages.creator])
    away = set(st.op[st.fused_away])
    assert away and not any(op.startswith(("mm", "addmm")) for op in away)
    assert not st.fused_away[st.op.str.startswith("addmm")].any()  # a matmul writes its output
    # the chain's input (the first matmul's output) is read by the fused kernel that writes
    # the chain's end: its storage lives until that kernel's rank
    first_mm = next(n for n in fused.nodes.node if str(n.target).startswith("aten.addmm"))
    row = st.index[st.creator == first_mm][0]
    assert fused.storages.stop[row] >= prof.storages.stop[row]
    assert (fused.nodes.done_rank >= fused.nodes["rank"]).all()
    assert (fused.nodes.done_rank > fused.nodes["rank"]).any()
    fused_ops = fused.nodes.node.map(lambda n: n in set(st.creator[st.fused_away]))
    assert (fused.nodes.workspace_B[fused_ops] == 0).all()
    # the chain's activations: kept, they are written (the same step as eager's); dropped,
    # neither forward nor their recomputation writes them, where eager kernels write both
    chain = [n for n in fused.activations.node
             if st.fused_away[fused.storages.node == n].any()]
    assert len(chain) >= 2
    assert simulate(fused).peak_B <= simulate(prof).peak_B
    eager, on_fused = phase_peaks(prof, chain), phase_peaks(fused, chain)
    assert on_fused["forward"] <= eager["forward"]
    assert on_fused["backward"] < eager["backward"]
    assert max(on_fused[p] for p in ("forward", "backward", "optimizer")) \
        == simulate(fused, chain).peak_B
    assert on_fused["after_forward"] <= on_fused["forward"]


def test_padded_operands_count_copies_of_misaligned_cuda_matmul_operands():
    """Inductor pads a CUDA matmul whose sizes are not multiples of 8 (half precision) or 4
    (fp32): a copy of each operand along a padded size, unless a fused kernel writes that
    operand (it writes it padded). Not on the CPU, not for aligned sizes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_ac.planner import padded_operands_B

    def mm(m, k, n, device="cuda", dtype=torch.bfloat16):
        g = fx.Graph()
        a, b = g.placeholder("a"), g.placeholder("b")
        with FakeTensorMode():
            a.meta["val"] = torch.empty(m, k, device=device, dtype=dtype)
            b.meta["val"] = torch.empty(k, n, device=device, dtype=dtype)
        out = g.call_function(torch.ops.aten.mm.default, (a, b))
        g.output(out)
        return out, a, b

    node, a, b = mm(16384, 768, 30522)  # logits: only the weight (k, n) is padded
    assert padded_operands_B(node) == 768 * 30522 * 2
    node, a, b = mm(16384, 30522, 768)  # its input gradient: both operands
    assert padded_operands_B(node) == (16384 + 768) * 30522 * 2
    assert padded_operands_B(node, {a}) == 768 * 30522 * 2  # a fused kernel writes a padded
    assert padded_operands_B(mm(64, 128, 256)[0]) == 0
    assert padded_operands_B(mm(64, 128, 30522, device="cpu")[0]) == 0
    assert padded_operands_B(mm(64, 128, 30522, dtype=torch.float32)[0]) == 128 * 30522 * 4
