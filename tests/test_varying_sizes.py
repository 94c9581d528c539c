"""Inputs whose sizes vary (dynamic padding, the last short batch): one graph traced with dynamic
sizes, profiled once, planned for the largest sizes seen (``AutoCheckpoint._plan_varying``)."""

import copy

import torch

from benchmarks.zoo import make_workload
from lightning_ac import State, auto_checkpoint
from lightning_ac import install as install_module
from lightning_ac.profiler import profile_at
from tests.test_install import _grads, bert_loss_of, train_lengths_as_eager


def _midway(profile):
    return int(profile.peak_bytes - 0.5 * profile.summary["activation_B"])


def _counting_profiles(monkeypatch) -> list:
    """Record each profile measured (each capture's), by wrapping AutoCheckpoint._profile."""
    calls = []
    orig = install_module.AutoCheckpoint._profile

    def counted(self, joint, device):
        calls.append(joint)
        return orig(self, joint, device)

    monkeypatch.setattr(install_module.AutoCheckpoint, "_profile", counted)
    return calls


def test_varying_lengths_share_one_capture_and_train_as_eager(monkeypatch):
    """The second length traces the step with the length dynamic and plans it for the longer of
    the two; every later length up to it runs that plan with no capture or profile; a longer one
    is planned again from the same profile, scaled. Every step saves less than eager and computes
    eager's gradients."""
    profiles = _counting_profiles(monkeypatch)
    torch.manual_seed(0)
    w = make_workload("tiny-bert", 4, seq_len=40)
    ref = copy.deepcopy(w.model)
    # (where this tiny model's floor falls against a midway budget depends on CPU timings)
    ac = auto_checkpoint(bert_loss_of(w.model), None, module=w.model, budget=_midway,
                         on_infeasible="warn")
    lengths = (32, 16, 24, 16, 32, 8, 40, 20)
    planned, active = train_lengths_as_eager(ac, w, ref, lengths)
    # the plan is made for the longest length; shorter ones whose step fits the plan's target
    # without AC run the original forward (as a length planned alone would)
    ran = dict(zip(lengths, active))
    assert ran[40] and ran[32] and not ran[8], ran
    # profiled twice: the first shape alone, then once with the length dynamic
    assert len(profiles) == 2 and profiles[1].dynamic and not profiles[0].dynamic
    # planned: 32 (alone), 16 (traced dynamic, planned for 32), 40 (longer: planned again)
    assert planned == [True, True, False, False, False, False, True, False]
    (varying,) = [s for s in ac.plans.values() if s.dynamic]
    assert max(varying.sizes.values()) == 40 and ac.last is varying
    # the sizes checked since the last re-plan (at 40), once each, agree with what ran
    checked = {max(v for _, v in key): fits for key, fits in varying.fits.items()}
    assert checked and {n: not ran[n] for n in checked} == checked
    # the batch dimension is traced as a size too (the last batch of an epoch is often shorter)
    assert varying.shapes[:2] == (("*", "*"), ("*", "*"))
    assert "[*, *], [*, *]" in install_module.describe_shapes(varying.shapes)
    # planned for the largest sizes this rank saw: not shared with, or taken from, other ranks
    assert ac.plan_message() is None
    assert not ac.adopt({"shapes": varying.shapes, "plan": {}})


def test_a_profile_scaled_to_another_length_is_the_one_measured_there():
    """``profile_at`` gives, without running anything, the memory a profile measured at that
    length has: peak and activation bytes within 1%, and the same storages."""
    from lightning_ac import _torch_compat as compat
    from lightning_ac.capture import capture_joint
    from lightning_ac.profiler import profile_joint

    torch.manual_seed(0)
    w = make_workload("tiny-bert", 4, seq_len=48)
    step = bert_loss_of(w.model)

    def profiled(length):
        inputs = [t[:, :length].contiguous() for t in w.inputs]
        for t in inputs:
            compat.mark_dims_dynamic(t, [1])
        joint = capture_joint(step, inputs, w.model)
        assert joint.dynamic
        with compat.real_tensor_mode():
            return profile_joint(joint, None, runs=1, warmup=False)

    short, long = profiled(16), profiled(48)
    (sym,) = short.joint.bindings
    scaled = profile_at(short, {sym: 48})
    assert len(scaled.storages) == len(long.storages)
    for key in ("predicted_peak_B", "activation_B"):
        assert abs(scaled.summary[key] - long.summary[key]) <= 0.01 * long.summary[key], key
    assert scaled.summary["activation_B"] > 2 * short.summary["activation_B"]
    # and back: the measured figures are what it scales from, not the last scaled ones
    again = profile_at(scaled, {sym: 16})
    assert again.summary["predicted_peak_B"] == short.summary["predicted_peak_B"]


def test_dynamic_shapes_off_plans_each_shape_alone():
    w = make_workload("mlp", 16)
    ac = auto_checkpoint(w.loss, None, module=w.model, budget=10**12, always_rewrite=True,
                         dynamic_shapes=False)
    x, y = w.inputs
    for n in (16, 8):
        ac(x[:n], y[:n]).backward()
    assert not any(s.dynamic for s in ac.plans.values()) and len(ac.plans) == 2


def test_a_last_short_batch_joins_the_varying_sizes(monkeypatch):
    """Batch size varying as well as length: the graph traced for varying lengths has the batch
    dynamic too, so a shorter batch needs no capture or profile of its own, and the plan holds
    for the largest of each."""
    profiles = _counting_profiles(monkeypatch)
    torch.manual_seed(0)
    w = make_workload("tiny-bert", 4, seq_len=32)
    ac = auto_checkpoint(bert_loss_of(w.model), None, module=w.model, budget=_midway,
                         on_infeasible="warn")  # (structure, not the floor, is tested here)
    for rows, length in ((4, 32), (4, 16), (2, 24), (4, 8)):
        ids, mask, labels = (t[:rows, :length].contiguous() if t.dim() > 1 else t[:rows]
                             for t in w.inputs)
        ac(ids, mask, labels).backward()
        # (a plan, or the original forward where the step fits the plan's target without AC)
        assert ac.state in (State.ACTIVE, State.OFF) and ac.plan is not None, (rows, length)
    varying = ac.last
    assert varying.dynamic and set(varying.sizes.values()) == {4, 32}
    assert len(profiles) == 2 and len(ac.plans) == 2
    assert varying.shapes[:2] == (("*", "*"), ("*", "*"))


def test_a_batchnorm_cnn_over_varying_batch_sizes_trains_as_eager():
    """A dynamic batch size reaches BatchNorm (left as traced: its statistics' count varies):
    gradients and running statistics stay eager's."""
    torch.manual_seed(0)
    w = make_workload("cnn", 16)
    ref = copy.deepcopy(w.model)
    # (BatchNorm as traced reads its buffers: less can be recomputed, and where the floor of
    # this tiny model lies against the budget depends on the CPU's timings)
    ac = auto_checkpoint(w.loss, None, module=w.model, budget=_midway, on_infeasible="warn")
    x, y = w.inputs
    for n in (16, 8, 12, 16):
        loss = ac(x[:n], y[:n])
        ref_loss = torch.nn.functional.cross_entropy(ref(x[:n]), y[:n])
        loss.backward()
        ref_loss.backward()
        assert ac.state is State.ACTIVE, n
        for g, r in zip(_grads(w.model), _grads(ref)):
            assert (g - r).norm() <= 1e-5 * r.norm() + 1e-7, n
        for b, r in zip(w.model.buffers(), ref.buffers()):
            torch.testing.assert_close(b, r)
        w.model.zero_grad(), ref.zero_grad()
    (varying,) = [s for s in ac.plans.values() if s.dynamic]  # (16 runs its own exact plan)
    assert list(varying.sizes.values()) == [16] and varying.plan.recomputed


def test_when_the_dynamic_trace_fails_each_shape_is_planned_alone(monkeypatch):
    """A step that cannot be planned with dynamic sizes falls back to a plan per shape, traced
    static (the dimensions it marked are unmarked), for the rest of the fit."""
    from lightning_ac.errors import CaptureError

    def refuse(self, step, tensors, needed, joint):
        raise CaptureError("refused for the test")

    monkeypatch.setattr(install_module.AutoCheckpoint, "_make_varying_plan", refuse)
    profiles = _counting_profiles(monkeypatch)
    torch.manual_seed(0)
    w = make_workload("mlp", 16)
    ac = auto_checkpoint(w.loss, None, module=w.model, budget=10**12, always_rewrite=True)
    x, y = w.inputs
    for n in (16, 8, 4):
        ac(x[:n], y[:n]).backward()
    assert ac._static_only and not any(s.dynamic for s in ac.plans.values())
    assert len(ac.plans) == 3 and not any(j.dynamic for j in profiles)


class _BranchesOnLength(torch.nn.Module):
    """Python control flow on the sequence length: dynamo must keep it static."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        if x.shape[1] % 2 == 0:
            h = h * 2
        return h.relu().sum()


def test_a_length_the_code_branches_on_is_planned_per_shape():
    """The code branches on a property of the length (its parity): dynamo would compile the step
    again for a length on the other side, under the same plan. The step is then planned per
    shape instead of being traced (and profiled) again under one plan."""
    torch.manual_seed(0)
    model = _BranchesOnLength()
    ac = auto_checkpoint(model, None, budget=10**12, always_rewrite=True)
    for n in (6, 4, 5, 8):
        ac.module(torch.randn(2, n, 8)).backward()
    # 4 ran under a plan for varying lengths; 5 (odd) made dynamo compile again, which drops
    # that plan: 5 and every later length are planned alone
    assert ac._static_only and [s.shapes[0][1] for s in ac.plans.values()] == [6, 5, 8]
    assert not any(s.dynamic for s in ac.plans.values())


def test_a_step_traced_again_into_the_same_graph_keeps_its_plan(monkeypatch):
    """A forward that changes Python state on its first call (HF's classifiers set
    ``config.problem_type``) makes dynamo trace the step again at the second call; the graph is
    the same, so its compiled plan serves: no second capture, profile or plan."""
    from torch import nn

    profiles = _counting_profiles(monkeypatch)

    class SetsOnFirstCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                     nn.Linear(64, 1))
            self.problem_type = None

        def forward(self, x):
            if self.problem_type is None:
                self.problem_type = "regression"
            return self.net(x).square().mean()

    torch.manual_seed(0)
    model = SetsOnFirstCall()
    ref = copy.deepcopy(model)
    ac = auto_checkpoint(model, None, budget=_midway, always_rewrite=True, on_infeasible="warn")
    x = torch.randn(32, 16)
    for _ in range(3):
        ac(x).backward()
        ref(x).backward()
    assert len(profiles) == 1 and len(ac.plans) == 1 and ac.state is State.ACTIVE
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad)


def test_varying_sizes_leave_no_dynamo_marks_on_the_callers_tensors(monkeypatch):
    """The dimensions traced as varying are marked for dynamo only during the call: left on the
    caller's tensors (a batch reused, a labels tensor passed again), they would make dynamo
    compile the first shape's plan again, and the user's own compiled functions."""
    profiles = _counting_profiles(monkeypatch)
    torch.manual_seed(0)
    w = make_workload("tiny-bert-cls", 4, seq_len=32)
    ac = auto_checkpoint(bert_loss_of(w.model), None, module=w.model, budget=_midway,
                         always_rewrite=True, on_infeasible="warn")
    ids, mask, labels = w.inputs  # labels (4,): the same tensor at every call
    for length in (32, 16, 32, 24):
        ac(ids[:, :length].contiguous(), mask[:, :length].contiguous(), labels).backward()
        assert not hasattr(labels, "_dynamo_weak_dynamic_indices"), length
    assert len(profiles) == 2  # 32 alone, then once traced dynamic: 32 did not compile again


def test_a_batch_of_one_over_varying_lengths_shares_one_capture(monkeypatch):
    """With one sample per batch dynamo traces the batch dimension's stride as a symbol of its
    own or not, by the values it meets (a batch sliced from a longer one has a stride that is no
    size); such a symbol is bound from the call, not taken for a size the plan must follow, and
    a re-plan takes the plan whether it has one or not. So varying lengths share one dynamic
    graph, partitioned again for a longer length (forced here) without a new profile or trace,
    and train as eager."""
    from lightning_ac import capture as capture_module

    profiles = _counting_profiles(monkeypatch)
    traced = []
    orig_aot = capture_module.aot_compile
    monkeypatch.setattr(capture_module, "aot_compile",
                        lambda *a, **k: traced.append(1) or orig_aot(*a, **k))
    monkeypatch.setattr(install_module, "_same_choices", lambda a, b: False)
    monkeypatch.setattr(install_module, "_still_fits", lambda *a: None)
    torch.manual_seed(0)
    w = make_workload("tiny-bert-cls", 1, seq_len=48)
    ref = copy.deepcopy(w.model)
    ac = auto_checkpoint(bert_loss_of(w.model), None, module=w.model, budget=_midway,
                         always_rewrite=True, on_infeasible="warn")
    for length in (32, 16, 48, 24):
        ids, mask, labels = (t[:, :length].contiguous() if t.dim() > 1 else t for t in w.inputs)
        for step in (ac, bert_loss_of(ref)):
            torch.manual_seed(length)
            step(ids, mask, labels).backward()
        for p, r in zip(w.model.parameters(), ref.parameters()):
            assert (p.grad - r.grad).norm() <= 1e-6 * r.grad.norm() + 1e-7, length
        w.model.zero_grad(), ref.zero_grad()
    assert len(profiles) == 2 and ac.last.dynamic and not ac._static_only
    assert set(ac.last.sizes.values()) == {48} and ac.state is State.ACTIVE
    # two AOTAutograd traces (32 alone; dynamic at 16): the re-plan at 48 traced nothing
    assert len(traced) == 2 and ac.last.planned is not None


def test_a_plan_whose_choices_still_fit_larger_sizes_is_kept_without_compiling_again():
    """A re-plan for larger sizes keeps the compiled choices where they still meet the new
    target (compiling again is a dynamo and AOTAutograd trace), with their figures at the new
    sizes; where they do not, it gives way to the new plan."""
    from dataclasses import replace

    from lightning_ac import _torch_compat as compat
    from lightning_ac.capture import capture_joint
    from lightning_ac.install import _still_fits
    from lightning_ac.planner import plan
    from lightning_ac.profiler import profile_joint
    from lightning_ac.simulator import simulate

    torch.manual_seed(0)
    w = make_workload("tiny-bert", 4, seq_len=48)
    inputs = [t[:, :32].contiguous() for t in w.inputs]
    with compat.dims_marked_dynamic([(t, 1) for t in inputs]):
        joint = capture_joint(bert_loss_of(w.model), inputs, w.model)
    with compat.real_tensor_mode():
        short = profile_joint(joint, None, runs=1, warmup=False)
    (sym,) = joint.bindings
    # (a quarter of the activations to drop: within reach whatever order the timings give)
    old = plan(short, int(short.peak_bytes - 0.25 * short.summary["activation_B"]), swap=False,
               headroom=0.0)
    assert old.recomputed and old.stop_reason == "fits"
    longer = profile_at(short, {sym: 40})
    at_40 = simulate(longer, old.recomputed).peak_B
    assert at_40 > old.predicted_peak_B  # the same choices need more memory at 40
    roomy = replace(plan(longer, None), target_B=at_40, budget_B=at_40 * 2)
    kept = _still_fits(old, roomy, longer)
    assert kept is not None and kept.recomputed == old.recomputed
    assert kept.predicted_peak_B == at_40 and kept.target_B == at_40 and kept.stop_reason == "fits"
    assert _still_fits(old, replace(roomy, target_B=at_40 - 1), longer) is None
