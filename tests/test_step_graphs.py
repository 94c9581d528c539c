"""A step that dynamo splits into several graphs is planned as one step (lightning_ac.step_graphs)."""

import copy
import logging

import pytest
import torch
from torch import nn

from lightning_ac import State, auto_checkpoint
from lightning_ac.measure import saved_tensor_bytes
from lightning_ac.step_graphs import MAX_RECAPTURES

log = logging.getLogger("a_user_model")


class Block(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Broken(nn.Module):
    """Two stacks of blocks with something dynamo cannot trace between them."""

    def __init__(self, brk: str, d=64):
        super().__init__()
        self.brk = brk
        self.first = nn.Sequential(*[Block(d) for _ in range(3)])
        self.second = nn.Sequential(*[Block(d) for _ in range(3)])
        self.lstm = nn.LSTM(d, d, batch_first=True) if brk == "lstm" else None

    def forward(self, x):
        h = self.first(x)
        if self.brk == "print":
            print("between the stacks", end="\r")
        elif self.brk == "item" and (h.abs().mean() > 1e-9).item():  # data-dependent branch
            h = h * 1.0
        elif self.brk == "logger":
            log.warning("between the stacks")
        elif self.brk == "float" and h.abs().mean().item() > 1e-9:  # dynamo specialises on it
            h = h * 1.0
        elif self.brk == "lstm":
            h, _ = self.lstm(h)
        elif self.brk == "alternate":  # a flag that flips on every call: two graphs, in turn
            self.flag = not getattr(self, "flag", False)
            print(end="")
            h = h * 1.0 if self.flag else h + 0.0
        return self.second(h).pow(2).mean()


def _midway(profile):
    """A budget halfway between the step's floor-ish and its un-checkpointed peak."""
    return int(profile.peak_bytes - 0.5 * profile.summary["activation_B"])


def _broken_and_eager(brk: str):
    """A ``Broken`` model, an eager copy, a batch, and an SGD optimizer for each."""
    torch.manual_seed(0)
    model = Broken(brk)
    ref = copy.deepcopy(model)
    x = torch.randn(4, 32, 64)
    return (model, ref, x, torch.optim.SGD(model.parameters(), lr=0.05),
            torch.optim.SGD(ref.parameters(), lr=0.05))


def _train(model, step, x, opt, steps):
    losses = []
    for _ in range(steps):
        loss = step(x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("brk", ["print", "item", "logger"])
def test_a_step_with_a_break_is_planned_across_it(brk):
    torch.manual_seed(0)
    model = Broken(brk)
    ref = copy.deepcopy(model)
    x = torch.randn(4, 32, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    ac = auto_checkpoint(model, opt, budget=_midway)
    losses = _train(model, model, x, opt, 1)  # the capture call: graphs measured, not planned
    graphs = ac.last.graphs
    assert graphs is not None and len(graphs.captured) == 2
    provisional = [g.saved_B for g in graphs.captured]
    losses += _train(model, model, x, opt, 3)
    assert ac.state is State.ACTIVE and ac.plan.stop_reason == "fits"
    assert ac.profile.summary["graphs"] == 2
    planned = [g.saved_B for g in graphs.captured]
    # both sides of the break recompute something and save less than un-checkpointed
    assert all(g.plan.recomputed for g in graphs.captured)
    assert all(p < q for p, q in zip(planned, provisional)), (planned, provisional)
    assert ac.plan.predicted_peak_B <= ac.plan.budget_B < ac.plan.baseline_peak_B
    assert "2 graphs planned together" in ac.summary()

    ref_losses = _train(ref, ref, x, ref_opt, 4)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

    # the whole step saves less than the same model un-checkpointed
    _, saved = saved_tensor_bytes(model, [x], exclude=list(model.parameters()))
    _, ref_saved = saved_tensor_bytes(ref, [x], exclude=list(ref.parameters()))
    assert saved < ref_saved


def test_eager_code_between_graphs_is_counted():
    """nn.LSTM runs eagerly between two graphs: what it saves for backward and its parameters'
    memory are in the profile, and the plan still covers both graphs."""
    torch.manual_seed(0)
    model = Broken("lstm")
    x = torch.randn(4, 32, 64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ac = auto_checkpoint(model, opt, budget=_midway)
    _train(model, model, x, opt, 3)
    assert ac.state is State.ACTIVE and len(ac.last.graphs.captured) >= 2
    summary = ac.profile.summary
    lstm_params = sum(p.numel() * p.element_size() for p in model.lstm.parameters())
    assert summary["eager_param_B"] == lstm_params
    # what the LSTM saves, measured on its own, less its input and output: the first graph's
    # output and the next graph's input, counted with those graphs
    h = torch.randn(4, 32, 64, requires_grad=True)
    _, lstm_saved = saved_tensor_bytes(lambda t: model.lstm(t)[0].sum(), [h],
                                       exclude=[h, *model.lstm.parameters()])
    lstm_saved -= h.numel() * h.element_size()  # its output, the size of its input here
    assert sum(summary["eager_saved_B"]) == pytest.approx(lstm_saved, rel=0.05)
    # eager memory sits under the plan: the profile's peak counts it
    assert ac.plan.baseline_peak_B > ac.profile.persistent_B + lstm_params + lstm_saved


def test_twenty_fits_in_one_process_all_plan_and_keep_the_users_compiled_functions():
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    @torch.compile(backend=counting_backend)
    def users_own(t):
        return torch.sin(t) * 2

    users_own(torch.randn(8))
    x = torch.randn(4, 32, 64)
    for fit in range(20):
        model = Broken("print")
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ac = auto_checkpoint(model, opt, budget=_midway)
        _train(model, model, x, opt, 2)
        assert ac.state is State.ACTIVE, f"fit {fit}: {ac.summary()}"
        assert len(ac.last.graphs.captured) == 2 and ac.plan.recomputed, f"fit {fit}"
        ac.remove()
    users_own(torch.randn(8))
    assert len(compiles) == 1  # not evicted, not recompiled


def test_a_step_that_is_one_graph_still_plans_on_its_first_call():
    torch.manual_seed(0)
    model = Broken("none")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ac = auto_checkpoint(model, opt, budget=_midway)
    _train(model, model, torch.randn(4, 32, 64), opt, 1)
    assert ac.last.graphs is None and ac.state is State.ACTIVE and ac.plan.recomputed


def test_the_graph_breaks_benchmark_plans_each_split(tmp_path):
    from benchmarks import graph_breaks

    df = graph_breaks.main(["--dim", "32", "--blocks", "4", "--batch-size", "16", "--seq-len", "64",
                            "--graphs", "1", "2", "--steps", "4", "--out", str(tmp_path)])
    assert list(df.graphs) == [1, 2] and list(df.planning_calls) == [1, 2]
    assert (df.max_rel_loss_diff <= 1e-6).all() and (df.saved_B < df.saved_B_no_ac).all()
    assert (tmp_path / "graph_breaks.csv").exists() and "planning_vs_one_graph" in df


def test_a_measured_excess_replans_every_graph_lower():
    torch.manual_seed(0)
    model = Broken("print")
    x = torch.randn(4, 32, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ac = auto_checkpoint(model, opt, budget=_midway)
    _train(model, model, x, opt, 1)
    assert ac.state is State.PLANNING and ac.plan is None  # captured, not planned yet
    _train(model, model, x, opt, 2)
    first, saved = ac.plan, [g.saved_B for g in ac.last.graphs.captured]
    assert ac.observe_peak(first.budget_B + first.budget_B // 10)  # 10% over: plan again
    _train(model, model, x, opt, 1)
    assert ac.replans == 1 and ac.plan.predicted_peak_B < first.predicted_peak_B
    assert sum(g.saved_B for g in ac.last.graphs.captured) < sum(saved)


def test_a_step_whose_graphs_change_is_captured_again_a_bounded_number_of_times():
    """The graph after the break depends on a flag that flips on every call: each planned call
    meets a graph it did not capture, runs it unplanned, and captures the step again at the
    next call, at most MAX_RECAPTURES times; training is eager's throughout."""
    model, ref, x, opt, ref_opt = _broken_and_eager("alternate")
    ac = auto_checkpoint(model, opt, budget=_midway)
    losses = _train(model, model, x, opt, 10)
    assert ac.last.graphs.recaptures == MAX_RECAPTURES
    assert losses == pytest.approx(_train(ref, ref, x, ref_opt, 10), rel=1e-6)


def test_a_value_dynamo_specialised_on_is_traced_as_varying_and_the_step_planned_again():
    """The graph after the break specialises on a float that changes every step. Dynamo traces
    it as varying from its second value on (automatic dynamic sizes, ``compile_graphs``): the
    step is captured again once, then planned and run planned, as eager trains it."""
    model, ref, x, opt, ref_opt = _broken_and_eager("float")
    ac = auto_checkpoint(model, opt, budget=_midway)
    losses = _train(model, model, x, opt, 10)
    assert ac.last.graphs.recaptures == 1 and ac.state is State.ACTIVE and ac.plan.recomputed
    assert not ac.planned_last_call
    assert losses == pytest.approx(_train(ref, ref, x, ref_opt, 10), rel=1e-6)


def test_a_split_step_is_planned_without_tracing_its_graphs_again(monkeypatch):
    """Each graph is traced by AOTAutograd once, in the capture call; the plan, and a re-plan
    after a measured excess, replace the partitions in place (rewriter.PlannedStep)."""
    from lightning_ac import step_graphs

    traced = []
    real = step_graphs.aot_compile
    monkeypatch.setattr(step_graphs, "aot_compile",
                        lambda *a, **k: traced.append(1) or real(*a, **k))
    model, ref, x, opt, ref_opt = _broken_and_eager("print")
    ac = auto_checkpoint(model, opt, budget=_midway)
    losses = _train(model, model, x, opt, 3)
    first = sum(g.saved_B for g in ac.last.graphs.captured)
    assert ac.state is State.ACTIVE and ac.plan.recomputed and len(traced) == 2
    # a measured excess that puts the target below the plan's peak: re-planned
    assert ac.observe_peak(2 * ac.plan.budget_B - ac.plan.predicted_peak_B + 100_000)
    losses += _train(model, model, x, opt, 2)
    assert len(traced) == 2 and sum(g.saved_B for g in ac.last.graphs.captured) < first
    assert losses == pytest.approx(_train(ref, ref, x, ref_opt, 5), rel=1e-6)


def test_a_split_step_over_more_lengths_than_dynamos_recompile_limit_stays_planned():
    """Dynamo compiles the user's frames after a break once per set of sizes, up to its
    recompile limit (8): with static sizes a ninth length left no graph to plan, and AC turned
    off for good. The step's graphs are compiled with automatic dynamic sizes instead; every
    length is captured and planned (AOTAutograd traces each at that call's sizes), a captured
    length is planned at the next call whatever its shape, and training equals eager's
    throughout."""
    model, ref, _, opt, ref_opt = _broken_and_eager("print")
    ac = auto_checkpoint(model, opt, budget=_midway)
    lengths = [32, 24, 40, 16, 48, 20, 28, 36, 44, 12, 44]
    losses, ref_losses = [], []
    for length in lengths:
        x = torch.randn(4, length, 64)
        losses += _train(model, model, x, opt, 1)
        ref_losses += _train(ref, ref, x, ref_opt, 1)
        assert ac.state is not State.OFF, length
        if length == 12:
            # the shape before (44) was planned at this call of another shape, so that it runs
            # planned when it comes again (next call)
            (at_44,) = [p for p in ac.plans.values() if p.shapes[0][1] == 44]
            assert at_44.graphs.plan is not None and at_44.plan.recomputed
    assert ac.state is State.ACTIVE and ac.plan.recomputed and ac.last is at_44
    assert losses == pytest.approx(ref_losses, rel=1e-6)


def test_a_split_step_lets_its_model_go():
    """Dynamo keeps the graphs it compiled on the user's code (the shared backend's slots), but
    they hold dynamo's graph only: a model trained through a split step is freed with it."""
    import gc
    import weakref

    def fit():
        model = Broken("print")
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ac = auto_checkpoint(model, opt, budget=_midway)
        _train(model, model, torch.randn(4, 32, 64), opt, 3)
        assert ac.state is State.ACTIVE
        return weakref.ref(model)

    model = fit()
    gc.collect()
    assert model() is None


def test_each_shape_of_a_split_step_is_planned_without_trying_one_graph_again(monkeypatch):
    from lightning_ac import install

    attempts = []
    real = install.compile_with_plan
    monkeypatch.setattr(install, "compile_with_plan",
                        lambda *a, **k: attempts.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = Broken("print")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ac = auto_checkpoint(model, opt, budget=_midway)
    for length in (32, 24, 32, 24, 24):  # two shapes, each captured then planned
        _train(model, model, torch.randn(4, length, 64), opt, 1)
    assert len(ac.plans) == 2 and all(p.graphs.plan is not None for p in ac.plans.values())
    assert len(attempts) == 1  # the first shape's one-graph attempt only


def test_a_users_compiled_forward_inside_a_split_step_is_planned_and_kept():
    """The user compiled the model's forward (``model.forward = torch.compile(model.forward)``),
    and it has the break: in the step dynamo splits, that function would run as its own frame
    (to inductor) and no graph would reach the step; it is taken off for the step's calls
    (planned, trains as eager) and put back after."""
    torch.manual_seed(0)
    model = Broken("print")
    ref = copy.deepcopy(model)
    compiled = torch.compile(model.forward)
    model.forward = compiled
    x = torch.randn(4, 32, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ac = auto_checkpoint(lambda x: model(x), opt, module=model, budget=_midway)
    losses = _train(model, ac, x, opt, 3)
    assert ac.state is State.ACTIVE and len(ac.last.graphs.captured) == 2
    assert all(g.plan.recomputed for g in ac.last.graphs.captured)
    assert model.forward is compiled  # the user's own, outside the step
    assert losses == pytest.approx(_train(ref, ref, x, ref_opt, 3), rel=1e-6)


def _lstm_step(budget):
    torch.manual_seed(0)
    model = Broken("lstm")
    ref = copy.deepcopy(model)
    x = torch.randn(4, 32, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ac = auto_checkpoint(model, opt, budget=budget, on_infeasible="warn", always_rewrite=True)
    return model, ref, x, opt, ac


def test_an_out_of_reach_budget_plans_eager_codes_saved_tensors_in_host_memory():
    """What eager code between graphs saves (an nn.LSTM's) no recomputation of the graphs can
    lower. Where the budget is out of reach without it, the planner keeps those tensors in
    host memory, the first saved first, as many bytes as the budget needs where copies are
    dear: the predicted peak drops by up to them, their copies out and back are in the
    predicted time, and the summary says so. Not where the budget is reachable, not without
    swapping, and not on a profile without a measured host link."""
    import dataclasses

    from lightning_ac.planner import HEADROOM, offload_eager_saves, plan

    model, _, x, opt, ac = _lstm_step(10**12)
    _train(model, model, x, opt, 2)
    prof = ac.profile
    eager = int(sum(prof.summary["eager_saved_B"]))
    assert eager > 0 and offload_eager_saves(prof) is None  # (CPU: no host link measured)
    def link(gbps):  # the profile with a measured host link of that speed
        return dataclasses.replace(prof, summary={
            **prof.summary, "host_device_bandwidth_GBps": gbps, "to_host_GBps": gbps,
            "to_device_GBps": gbps})

    linked = link(10.0)
    moved, moved_B = offload_eager_saves(linked)
    assert moved_B == eager and simulate_peak(moved) < simulate_peak(linked)
    floor = plan(linked, 1, swap=False).predicted_peak_B
    budget = int((floor - eager // 2) / (1 - HEADROOM))
    assert plan(linked, budget).stop_reason == "infeasible"  # (offload_eager off by default)
    half, half_B = offload_eager_saves(linked, eager // 2)  # the first saved bytes only
    assert half_B == eager // 2
    assert simulate_peak(moved) < simulate_peak(half) < simulate_peak(linked)
    p = plan(linked, budget, offload_eager=True)
    assert p.stop_reason == "fits" and p.predicted_peak_B <= budget
    assert p.offload_eager_B >= eager // 2 and p.predicted_extra_ms >= 2 * p.offload_eager_B / 10e6
    # where copies are dear, as many bytes as the budget needs (about half), not all of them
    slow = plan(link(0.01), budget, offload_eager=True)
    assert slow.stop_reason == "fits" and eager // 2 <= slow.offload_eager_B <= eager * 5 // 8, \
        (slow.offload_eager_B, eager)
    assert "eager code's saved tensors in host memory" in p.summary()
    assert plan(linked, budget, offload_eager=True, swap=False).offload_eager_B == 0
    assert plan(linked, prof.peak_bytes * 2, offload_eager=True).offload_eager_B == 0


def simulate_peak(profile):
    from lightning_ac.simulator import simulate

    return simulate(profile).peak_B


def test_a_plan_with_eager_saves_on_the_host_sends_eager_codes_saves_there_and_trains_the_same():
    """At run time such a plan routes what eager code saves for backward through the host
    hooks (here a spy: the CPU has no pinned host memory), and only that: the graphs' own
    saves are not; the step trains as without AC."""
    from unittest import mock

    from lightning_ac.step_graphs import StepGraphs

    model, ref, x, opt, ac = _lstm_step(10**12)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    _train(model, model, x, opt, 2)
    graphs = ac.last.graphs
    graphs.plan.offload_eager_B = 1  # (as the planner sets it where the budget needs it)
    sent = []

    def spy(self, t):
        sent.append(tuple(t.shape))
        return t

    _train(ref, ref, x, ref_opt, 2)
    with mock.patch.object(StepGraphs, "_to_host", spy):
        losses = _train(model, model, x, opt, 2)
    ref_losses = _train(ref, ref, x, ref_opt, 2)
    assert sent and (4, 32, 64) in sent  # the LSTM's input, saved by the eager LSTM
    assert all(len(s) for s in sent)  # (the graphs' saved handle is a 1-element tensor: not
    assert (1,) not in sent           # sent: their hooks are paused while they run)
    assert losses == pytest.approx(ref_losses, rel=1e-5)


class _Outputs(nn.Module):
    """A split step whose last graph returns a large tensor beside the loss (as HF models return
    their logits), which the step drops."""

    def __init__(self, d=64):
        super().__init__()
        self.first, self.head = Block(d), nn.Linear(d, 512)

    def forward(self, x):
        h = self.first(x)
        print(end="")  # a break
        logits = self.head(h)
        return {"loss": logits.mean() + h.pow(2).mean(), "logits": logits}


def test_a_graph_output_the_step_drops_lives_until_forward_ends_not_through_backward():
    """The last graph returns the logits beside the loss, and the step keeps only the loss:
    seen in the capture call, the logits are marked dropped and the profile frees them when
    forward ends (it kept them through backward, where nothing holds them)."""
    torch.manual_seed(0)
    model = _Outputs()
    x = torch.randn(4, 32, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ac = auto_checkpoint(lambda x: model(x)["loss"], opt, module=model, budget=10**12,
                         always_rewrite=True)
    _train(model, ac, x, opt, 2)
    last = ac.last.graphs.captured[-1].joint
    (dropped,) = last.dropped_outputs
    assert tuple(dropped.meta["val"].shape) == (4, 32, 512)
    prof = ac.profile
    n_forward = int((prof.nodes["phase"] == "forward").sum())
    rows = prof.storages[prof.storages["aliases"].map(lambda a: dropped in a)]
    assert len(rows) == 1 and rows["stop"].iloc[0] <= n_forward - 1
