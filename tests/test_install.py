"""The public path to a plan: ``auto_checkpoint`` on a module or a step function (no Lightning)."""

import copy

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from benchmarks.zoo import make_workload
from lightning_ac import AutoCheckpoint, BudgetError, State, auto_checkpoint, plan
from lightning_ac.measure import saved_tensor_bytes


def _train(model, step, inputs, opt, steps=3):
    losses = []
    for _ in range(steps):
        loss = step(*inputs)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _baseline_peak(name, **kw):
    w = make_workload(name, 8, seq_len=16)
    ac = auto_checkpoint(w.loss, None, module=w.model, budget=10**12, **kw)
    w.loss(*w.inputs)  # plain eager: the probe below is the planned call
    ac(*w.inputs).backward()
    return ac.plan.baseline_peak_B


@pytest.mark.parametrize("name", ["cnn", "tiny-bert"])
def test_a_step_function_trains_as_eager_with_less_saved(name):
    torch.manual_seed(0)
    w = make_workload(name, 8, seq_len=16)
    ref_model = copy.deepcopy(w.model)
    opt = torch.optim.SGD(w.model.parameters(), lr=0.05, momentum=0.9)
    ac = auto_checkpoint(w.loss, opt, module=w.model, budget=_midway)
    assert isinstance(ac, AutoCheckpoint) and ac.state is State.PLANNING and ac.plan is None
    torch.manual_seed(1)
    losses = _train(w.model, ac, w.inputs, opt)
    assert ac.state is State.ACTIVE and ac.plan.stop_reason == "fits" and ac.plan.recomputed
    assert ac.plan.predicted_peak_B <= ac.plan.budget_B < ac.plan.baseline_peak_B

    ref = make_workload(name, 8, seq_len=16)
    ref.model.load_state_dict(ref_model.state_dict())
    ref_opt = torch.optim.SGD(ref.model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    ref_losses = _train(ref.model, ref.loss, w.inputs, ref_opt)
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-6 * abs(b) + 1e-7
    for p, q in zip(w.model.parameters(), ref.model.parameters()):
        assert (p - q).norm() <= 1e-6 * q.norm() + 1e-7
    params = list(w.model.parameters())
    _, saved = saved_tensor_bytes(ac, w.inputs, exclude=params)
    _, saved_ref = saved_tensor_bytes(ref.loss, w.inputs, exclude=list(ref.model.parameters()))
    assert saved < saved_ref


def test_a_module_is_planned_in_training_and_runs_its_forward_otherwise():
    torch.manual_seed(0)
    w = make_workload("cnn", 8)
    model, (x, y) = w.model, w.inputs
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay comparable
    ac = auto_checkpoint(model, opt, budget=_midway, verbose=True)
    assert model.forward is ac  # installed
    with torch.no_grad():  # no gradients: the original forward, nothing planned
        assert torch.equal(model(x), plain(x)) and ac.state is State.PLANNING
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert ac.state is State.ACTIVE and ac.plan.recomputed
    assert "recomputed" in ac.summary() and "active" in ac.summary()
    plain(x)  # the same update of BatchNorm's running statistics (the weights stay: lr 0)
    model.eval()
    with torch.no_grad():
        plain.eval()
        torch.testing.assert_close(model(x), plain(x))
    ac.remove()
    assert "forward" not in model.__dict__ and ac.state is State.OFF
    ac.remove()  # idempotent
    assert list(model.state_dict()) == list(plain.state_dict())
    auto_checkpoint(model, opt, budget=_midway).remove()  # can be installed again after removal


def test_a_budget_can_be_a_function_of_the_profile():
    w = make_workload("cnn", 8)
    seen = []

    def sixty_percent(profile):
        seen.append(profile.peak_bytes)
        return int(0.9 * profile.peak_bytes)

    ac = auto_checkpoint(w.loss, None, module=w.model, budget=sixty_percent)
    ac(*w.inputs).backward()
    assert ac.plan.budget_B == int(0.9 * seen[0]) and ac.plan.predicted_peak_B <= ac.plan.budget_B


def test_a_step_that_fits_runs_the_original_unless_asked_to_rewrite():
    w = make_workload("mlp", 4)
    ac = auto_checkpoint(w.loss, None, module=w.model)  # CPU, no budget: no limit
    ac(*w.inputs).backward()
    assert ac.plan.stop_reason == "already fits" and ac.state is State.OFF
    ac = auto_checkpoint(w.loss, None, module=w.model, budget=10**12, always_rewrite=True)
    ac(*w.inputs).backward()
    assert ac.plan.stop_reason == "already fits" and ac.state is State.ACTIVE


def test_an_unreachable_budget_raises_or_runs_the_smallest_plan_as_asked():
    w = make_workload("cnn", 8)
    with pytest.raises(BudgetError, match=r"cannot meet the budget of 1000 B, planned to .* to "
                                          r"leave room .*: the smallest peak"):
        auto_checkpoint(w.loss, None, module=w.model, budget=1000)(*w.inputs)
    ac = auto_checkpoint(w.loss, None, module=w.model, budget=1000, on_infeasible="warn")
    with pytest.warns(UserWarning, match="Training with that plan"):
        ac(*w.inputs).backward()
    assert ac.plan.stop_reason == "infeasible" and ac.state is State.ACTIVE


def test_a_step_with_nothing_to_capture_warns_and_runs_the_original():
    class Recurrent(nn.Module):  # dynamo leaves nn.LSTM to eager: no graph to plan
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 4)

        def forward(self, x):
            return self.rnn(x)[0]

    m = Recurrent()
    ac = auto_checkpoint(m, None, budget=1)
    # the message names the user's function, and no frame of this library as the place
    with pytest.warns(UserWarning, match=r"could not capture .*Recurrent.forward.* as one graph"
                                         r"(.|\n)*nothing to plan") as caught:
        out = m(torch.ones(2, 3, 4))
    assert "lightning_ac/install.py" not in str(caught[0].message)
    assert ac.state is State.OFF and out.shape == (2, 3, 4)
    assert m(torch.ones(2, 3, 4)).shape == (2, 3, 4)  # and keeps running the original


@pytest.mark.parametrize("kwargs,match", [
    ({"budget": "6 gigs"}, r"auto_checkpoint\(budget='6 gigs'\)"),
    ({"swap": "yes"}, r"auto_checkpoint\(swap='yes'\)"),
    ({"host_swap": "sometimes"}, r"auto_checkpoint\(host_swap='sometimes'\)"),
    ({"margin": 1.5}, r"auto_checkpoint\(margin=1.5\)"),
    ({"previous_grads": "never"}, r"previous_grads='never'"),
    ({"on_infeasible": "ignore"}, r"on_infeasible='ignore'"),
])
def test_bad_arguments_are_refused_at_once(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        auto_checkpoint(nn.Linear(2, 2), None, **kwargs)


def test_a_step_function_needs_its_module_and_a_module_one_plan():
    with pytest.raises(MisconfigurationException, match="needs module="):
        auto_checkpoint(lambda x: x, None)
    with pytest.raises(MisconfigurationException, match="expected an nn.Module or a callable"):
        auto_checkpoint(42, None)
    m = nn.Linear(2, 2)
    auto_checkpoint(m, None)
    with pytest.raises(MisconfigurationException, match="already has a plan installed"):
        auto_checkpoint(m, None)


def test_states_read_as_their_names():
    assert State.ACTIVE == "active" and str(State.OFF) == "off"
    assert [s.value for s in State] == ["idle", "planning", "active", "off"]


def test_a_removed_plan_lets_the_model_be_freed():
    """Dynamo keeps every backend until torch._dynamo.reset(); ours must not keep the model (and
    its parameters, on the GPU) alive once its plan is removed: a notebook or a sweep fits many."""
    import gc
    import weakref

    w = make_workload("cnn", 8)
    ac = auto_checkpoint(w.model, None, budget=10**12, always_rewrite=True)
    x, y = w.inputs
    for _ in range(2):
        nn.functional.cross_entropy(w.model(x), y).backward()
    assert ac.state is State.ACTIVE
    model = weakref.ref(w.model)
    ac.remove()
    del ac, w
    gc.collect()
    assert model() is None


def test_library_detail_goes_to_logging_not_to_the_user(caplog, capsys):
    w = make_workload("mlp", 4)
    with caplog.at_level("DEBUG", logger="lightning_ac"):
        ac = auto_checkpoint(w.loss, None, module=w.model, budget=10**12, always_rewrite=True)
        ac(*w.inputs).backward()
    said = {r.name: r.getMessage() for r in caplog.records if r.name.startswith("lightning_ac")}
    assert "captured a joint graph" in said["lightning_ac.capture"]
    assert "profiled" in said["lightning_ac.profiler"] and "planned" in said["lightning_ac.install"]
    assert "captured" not in capsys.readouterr().out  # nothing printed (verbose is off)


def _midway(profile):
    """A budget halfway between the plan's floor and the un-checkpointed peak, for any shape."""
    return (plan(profile, 1).predicted_peak_B + profile.peak_bytes) // 2


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _assert_trains_as_eager(step, w, ref):
    """One step of the classifier workload ``w`` through ``step`` against eager ``ref``: same
    loss, gradients to 1e-5."""
    w.model.zero_grad()
    x, y = w.inputs
    loss = step(x, y)
    loss.backward()
    ref_loss = nn.functional.cross_entropy(ref(x), y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(_grads(w.model), _grads(ref)):
        assert (g - r).norm() <= 1e-5 * r.norm() + 1e-7


def bert_loss_of(model):
    def loss(ids, mask, labels):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    return loss


def train_lengths_as_eager(ac, w, ref, lengths) -> tuple[list[bool], list[bool]]:
    """Run ``ac`` (planned on ``w``'s tiny BERT) and the eager ``ref`` over batches cut to each
    length: every step must compute eager's gradients, and save less for backward than eager
    where it runs a plan (as much where it fits and runs the original forward). Returns, per
    step, whether it planned and whether it ran a plan."""
    params, ref_params = list(w.model.parameters()), list(ref.parameters())
    planned, active = [], []
    for length in lengths:
        ids, mask, labels = (t[:, :length].contiguous() for t in w.inputs)
        torch.manual_seed(length)  # the same dropout masks in both
        loss = ac(ids, mask, labels)
        planned.append(ac.planned_last_call)
        torch.manual_seed(length)
        _, saved = saved_tensor_bytes(ac, (ids, mask, labels), exclude=params)
        active.append(ac.state is State.ACTIVE)  # (of the call just measured)
        torch.manual_seed(length)
        _, saved_ref = saved_tensor_bytes(bert_loss_of(ref), (ids, mask, labels),
                                          exclude=ref_params)
        if active[-1]:
            assert ac.plan.recomputed and saved < saved_ref, (length, saved, saved_ref)
        else:
            assert ac.state is State.OFF and saved == saved_ref, length
        torch.manual_seed(length)
        ref_loss = bert_loss_of(ref)(ids, mask, labels)
        loss.backward()
        ref_loss.backward()
        for g, r in zip(_grads(w.model), _grads(ref)):
            assert (g - r).norm() <= 1e-6 * r.norm() + 1e-7, length
        w.model.zero_grad(), ref.zero_grad()
    return planned, active


def test_every_sequence_length_is_planned_and_trains_as_eager():
    """With ``dynamic_shapes=False``, batches padded to different lengths (HF's dynamic
    padding): each length gets its own plan at its first step; every step saves less for
    backward than eager and computes the same gradients, and a length seen before reuses its
    plan."""
    torch.manual_seed(0)
    w = make_workload("tiny-bert", 4, seq_len=32)
    ref = copy.deepcopy(w.model)
    ac = auto_checkpoint(bert_loss_of(w.model), None, module=w.model, budget=_midway,
                         dynamic_shapes=False)
    _, active = train_lengths_as_eager(ac, w, ref, (32, 16, 24, 16, 32, 8))
    assert all(active)
    assert [s.shapes[0][1] for s in ac.plans.values()] == [24, 16, 32, 8]  # least recent first
    # the first shape's profile times each node 3 times after a warm-up run; later ones once
    runs = {s.shapes[0][1]: s.profile.summary["runs_per_node"] for s in ac.plans.values()}
    assert runs == {32: 3, 24: 1, 16: 1, 8: 1}


def test_the_plan_cache_is_bounded_and_a_shape_that_comes_back_is_planned_again():
    w = make_workload("mlp", 16)
    ac = auto_checkpoint(w.loss, None, module=w.model, budget=10**12, always_rewrite=True,
                         max_shapes=2, dynamic_shapes=False)
    x, y = w.inputs
    for n in (16, 8, 4):
        ac(x[:n], y[:n]).backward()
    assert [s.shapes[0] for s in ac.plans.values()] == [(8, 32), (4, 32)]
    ac(x, y).backward()
    assert ac.planned_last_call and [s.shapes[0] for s in ac.plans.values()] == [(4, 32), (16, 32)]
    ac(x[:4], y[:4]).backward()
    assert not ac.planned_last_call  # still cached


def test_a_peak_over_the_budget_is_planned_again_lower_until_it_cannot_be():
    """The closed loop: a measured peak over the budget (memory the profile did not see) makes
    the shape be planned again with the target lowered by the excess, from the same profile, at
    most MAX_REPLANS times; the re-planned step trains as eager; then it warns once. (Excesses
    are set from this profile's own floor: where the planner's floor lies varies with the
    timings a CPU profile measures.)"""
    from lightning_ac.install import MAX_REPLANS
    from lightning_ac.planner import HEADROOM

    torch.manual_seed(0)
    w = make_workload("cnn", 8)
    ref = copy.deepcopy(w.model)
    # a target just under the un-checkpointed peak: the first plan recomputes little, and leaves
    # room between it and the floor for re-plans to go lower
    ac = auto_checkpoint(w.loss, None, module=w.model,
                         budget=lambda p: int(p.peak_bytes / (1 - HEADROOM)) - 1024)
    ac(*w.inputs).backward()
    first, budget = ac.plan, ac.plan.budget_B
    floor = plan(ac.profile, 1).predicted_peak_B
    assert first.stop_reason == "fits" and floor < first.predicted_peak_B
    assert not ac.observe_peak(budget + 1)  # the planning step's peak is the profiler's
    w.model.zero_grad()
    ac(*w.inputs).backward()
    assert not ac.observe_peak(budget)  # within: nothing to do
    profile = ac.profile
    excess = (first.target_B - first.predicted_peak_B) + (first.predicted_peak_B - floor) // 3
    assert ac.observe_peak(budget + excess)  # over: planned again, lower
    second = ac.plan
    assert ac.replans == 1 and ac.profile is profile  # no new profile
    assert second.target_B == first.target_B - excess
    assert second.predicted_peak_B <= second.target_B < first.predicted_peak_B
    assert len(second.recomputed) > len(first.recomputed)
    _assert_trains_as_eager(ac, w, ref)
    assert ac.observe_peak(budget + (second.target_B - floor) // 3 + 1)
    assert ac.replans == MAX_REPLANS == 2
    with pytest.warns(UserWarning, match=r"still peak at .* over the budget .* lower the budget"):
        assert not ac.observe_peak(budget + 1)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not ac.observe_peak(budget + 1)  # said once


def test_a_plan_made_elsewhere_is_adopted_for_the_same_shapes():
    """What ranks do under DDP: one rank's plan (as plain data) replaces another's own plan for
    the same shapes; the step then runs it and trains as eager."""
    torch.manual_seed(0)
    w = make_workload("cnn", 8)
    ref = copy.deepcopy(w.model)
    other = make_workload("cnn", 8)  # another rank's copy of the model
    # budgets from each one's own profile (where the floor lies varies with CPU timings): a
    # quarter of the way up from the floor, and seven eighths
    low = auto_checkpoint(other.loss, None, module=other.model,
                          budget=lambda p: (3 * plan(p, 1).predicted_peak_B + p.peak_bytes) // 4)
    here = auto_checkpoint(w.loss, None, module=w.model,
                           budget=lambda p: (plan(p, 1).predicted_peak_B + 7 * p.peak_bytes) // 8)
    x, y = w.inputs
    low(x, y).backward()
    here(x, y).backward()
    message = low.plan_message()
    assert len(low.plan.recomputed) > len(here.plan.recomputed)
    assert here.adopt(message) and not here.adopt(message)  # the second time: nothing to change
    assert [n.name for n in here.plan.recomputed] == [n.name for n in low.plan.recomputed]
    assert not here.adopt({**message, "shapes": ((1, 2),)})  # shapes it has no plan for
    _assert_trains_as_eager(here, w, ref)


def test_the_steps_own_bytes_count_each_storage_once():
    from lightning_ac.install import step_bytes

    model = nn.Linear(4, 8)
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(16, 4)
    params_B = sum(p.numel() * 4 for p in model.parameters())
    cpu = torch.device("cpu")
    assert step_bytes(model, opt, [x, x[:2], 3], cpu) == params_B + x.numel() * 4
    model(x).sum().backward()
    opt.step()  # gradients, and Adam's two moments (and its step counters)
    counted = step_bytes(model, opt, [x], cpu)
    assert counted >= 4 * params_B + x.numel() * 4
    assert step_bytes(model, opt, [x], torch.device("meta")) == 0  # another device: none


def test_memory_others_hold_when_a_shape_is_planned_lowers_its_target(monkeypatch):
    """An earlier model in a notebook, tensors the user keeps: what is allocated when the step
    starts and is not the step's own is planned around, and the infeasible message says so."""
    from lightning_ac import install
    from lightning_ac.planner import HEADROOM

    w = make_workload("cnn", 8)
    monkeypatch.setattr(install.AutoCheckpoint, "_foreign_bytes", lambda *_: 100 << 10)
    held = auto_checkpoint(w.loss, None, module=w.model,
                           budget=lambda p: _midway(p) + (100 << 10))
    held(*w.inputs).backward()
    assert held.last.foreign_B == 100 << 10
    assert held.plan.target_B == int(held.plan.budget_B * (1 - HEADROOM)) - (100 << 10)
    assert held.plan.stop_reason == "fits"
    assert held.plan.predicted_peak_B <= held.plan.target_B
    budget = held.plan.budget_B
    monkeypatch.setattr(install.AutoCheckpoint, "_foreign_bytes", lambda *_: budget)
    with pytest.raises(BudgetError, match="tensors allocated before the step began take .* "
                                          "which leaves the step nothing"):
        auto_checkpoint(w.loss, None, module=w.model, budget=budget)(*w.inputs)
    # some left for the step, not enough: the comparison the planner made, and why
    monkeypatch.setattr(install.AutoCheckpoint, "_foreign_bytes", lambda *_: budget // 2)
    with pytest.raises(BudgetError, match="planned to .* of which .* already allocated by "
                                          "other tensors"):
        auto_checkpoint(w.loss, None, module=w.model, budget=budget)(*w.inputs)


def test_shapes_inside_a_batch_passed_as_one_dict_or_list_key_their_own_plans():
    from lightning_ac.install import describe_shapes, input_shapes

    a = input_shapes(({"x": torch.ones(4, 8), "n": 3},), {})
    b = input_shapes(({"x": torch.ones(4, 6), "n": 3},), {})
    c = input_shapes(([torch.ones(4, 8), torch.ones(4)],), {"mask": torch.ones(4, 8)})
    assert a != b and hash(a) != hash(b) and hash(c)
    assert "mask=[4, 8]" in describe_shapes(c)

    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 8))

        def forward(self, batch):
            return self.lin(batch["x"]).pow(2).mean()

    m = DictModel()
    ac = auto_checkpoint(m, None, budget=10**12, always_rewrite=True)
    for n in (16, 12, 16):
        m({"x": torch.randn(n, 8)}).backward()
    assert len(ac.plans) == 2


def test_a_budget_that_tensors_held_before_the_step_already_fill_says_so():
    """Where memory allocated before the step (an earlier model in a notebook) takes the whole
    budget, the message says that, not a negative target."""
    from dataclasses import replace

    from lightning_ac.capture import capture_joint
    from lightning_ac.install import infeasible_message
    from lightning_ac.profiler import profile_joint

    w = make_workload("cnn", 8)
    prof = profile_joint(capture_joint(w.loss, w.inputs, w.model), None)
    result = replace(plan(prof, 1000), budget_B=10_000, target_B=-5_000)
    said = infeasible_message(prof, result, foreign_B=12_000)
    assert "tensors allocated before the step began take 11.72 KiB (with workspaces and " \
           "allocator rounding, 14.65 KiB), which leaves the step nothing" in said
    assert "planned to" not in said and "the smallest peak the planner reaches" in said
