import copy

import pytest
import torch

from lightning_ac.planner import plan, rerun_by_op
from lightning_ac.profiler import is_random_op, profile_step
from lightning_ac.simulator import peak_breakdown, recompute_closure, simulate
from lightning_ac.zoo import make_workload


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
