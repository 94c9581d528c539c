import copy
import warnings

import lightning.pytorch as L
import pandas as pd
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_ac import BudgetError, MuTwoAC, parse_budget, plan
from tests.lit_models import LitWorkload


@pytest.mark.parametrize("given,expected", [
    ("6GB", 6 * 10**9), ("5.5GiB", int(5.5 * 2**30)), ("800MB", 800 * 10**6),
    ("512 KiB", 512 * 1024), (123456, 123456), ("1000", 1000), (None, None),
])
def test_budget_forms(given, expected):
    assert parse_budget(given) == expected


@pytest.mark.parametrize("bad", ["6 gigs", -1, 0, "0GB", "GB", 1.5, True, "-3MB"])
def test_bad_budgets_are_rejected_with_the_accepted_forms(bad):
    with pytest.raises(MisconfigurationException, match=r"budget=.*(expected|must be positive)"):
        MuTwoAC(budget=bad)


def test_bad_margin_and_warmup_are_rejected():
    with pytest.raises(MisconfigurationException, match="margin"):
        MuTwoAC(margin=1.5)
    with pytest.raises(MisconfigurationException, match="warmup_steps"):
        MuTwoAC(warmup_steps=-1)
    with pytest.raises(MisconfigurationException, match="host_swap"):
        MuTwoAC(host_swap="sometimes")
    with pytest.raises(MisconfigurationException, match="swap="):
        MuTwoAC("1GB", swap="yes")


def _trainer(tmp_path, cb=None, epochs=1, **kw):
    return L.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=[cb] if cb else [],
                     logger=L.loggers.CSVLogger(tmp_path), enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=1, deterministic=True,
                     default_root_dir=tmp_path, **kw)


def _fit(tmp_path, name, cb=None, steps=4, epochs=1, **kw):
    torch.manual_seed(0)
    m = LitWorkload(name)
    t = _trainer(tmp_path, cb, epochs, **kw)
    t.fit(m, m.dataloader(steps), m.dataloader(1))
    return m, t


def _baseline_peak(tmp_path, name):
    cb = MuTwoAC(budget=10**12)
    _fit(tmp_path / "probe", name, cb, steps=1)
    return cb.plan.baseline_peak_B


@pytest.mark.parametrize("name", ["cnn", "tiny-bert"])
def test_training_with_ac_matches_training_without(tmp_path, name):
    budget = int(0.85 * _baseline_peak(tmp_path, name))
    cb = MuTwoAC(budget=budget)
    m, t = _fit(tmp_path / "ac", name, cb, steps=4, epochs=2)
    ref, _ = _fit(tmp_path / "ref", name, None, steps=4, epochs=2)
    assert cb.plan.stop_reason == "fits" and cb.plan.recomputed
    assert cb.plan.predicted_peak_B <= budget
    assert len(m.losses) == len(ref.losses) == 8
    for a, b in zip(m.losses, ref.losses):
        assert abs(a - b) <= 1e-6 * abs(b) + 1e-7
    for p, q in zip(m.parameters(), ref.parameters()):
        assert (p - q).norm() <= 1e-6 * q.norm() + 1e-7
    # metrics reach the logger under mutwo/
    metrics = pd.read_csv(next((tmp_path / "ac").rglob("metrics.csv")))
    for key in ("mutwo/step_time_ms", "mutwo/predicted_peak_B", "mutwo/recomputed_B",
                "mutwo/swapped_B", "mutwo/recompute_overhead_ms", "mutwo/active"):
        assert metrics[key].notna().sum() == 2, key  # once per epoch
    assert metrics["mutwo/active"].dropna().eq(1).all()
    assert metrics["mutwo/graphs"].dropna().eq(1).all()  # one graph: nothing split it
    # the planning step and one warm-up step after it are left out of the first epoch's figures
    assert metrics["mutwo/measured_steps"].dropna().tolist() == [2, 4]
    assert metrics["mutwo/step_time_median_ms"].dropna().gt(0).all()
    assert "forward" not in m.__dict__  # the original forward is back after fit
    assert cb.profile.joint.primal_values == []  # the first batch is not kept alive


def test_ac_turns_itself_off_when_the_step_fits(tmp_path, caplog):
    cb = MuTwoAC()  # CPU: no device limit
    with caplog.at_level("INFO"):
        _fit(tmp_path, "cnn", cb, steps=3)
    assert cb.state == "off" and cb.plan.stop_reason == "already fits"
    said = [r.getMessage() for r in caplog.records if "already fits" in r.getMessage()]
    assert len(said) == 1  # said once, not every step


@pytest.mark.parametrize("dynamic", [True, False])
def test_a_batch_of_another_shape_is_planned_too(tmp_path, dynamic):
    """The last, smaller batch of an epoch is planned at its first step: with the batch size
    traced dynamic and planned for the full batch (the default), or alone
    (``dynamic_shapes=False``); the steps that plan are left out of the step figures."""
    from torch.utils.data import DataLoader, TensorDataset

    budget = int(0.85 * _baseline_peak(tmp_path, "cnn"))
    torch.manual_seed(0)
    m = LitWorkload("cnn")
    x, y = m.w.inputs  # batch 16
    data = TensorDataset(torch.cat([x, x, x[:8]]), torch.cat([y, y, y[:8]]))
    cb = MuTwoAC(budget=budget, dynamic_shapes=dynamic)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path / "ac", cb, epochs=2).fit(m, DataLoader(data, batch_size=16))
    assert not [w for w in caught if "MuTwoAC" in str(w.message)]  # no "runs without AC"
    assert len(cb.ac.plans) == 2 and len(m.losses) == 6
    short = "*" if dynamic else 8
    assert {s.shapes[0] for s in cb.ac.plans.values()} == {(16, 3, 16, 16), (short, 3, 16, 16)}
    metrics = pd.read_csv(next((tmp_path / "ac").rglob("metrics.csv")))
    assert metrics["mutwo/planned_shapes"].dropna().tolist() == [2, 2]
    reasons = {s.shapes[0][0]: s.plan.stop_reason for s in cb.ac.plans.values()}
    if dynamic:  # planned for the largest batch seen, which needs AC
        (varying,) = [s for s in cb.ac.plans.values() if s.dynamic]
        assert list(varying.sizes.values()) == [16]
        assert reasons == {16: "fits", "*": "fits"}
    else:  # the short last batch fits and runs the original forward: the fit is still active
        assert reasons == {16: "fits", 8: "already fits"}
    assert metrics["mutwo/active"].dropna().tolist() == [1, 1]
    assert metrics["mutwo/replans"].dropna().tolist() == [0, 0]


def test_a_batch_of_another_shape_runs_without_ac_when_asked_and_says_so_once(tmp_path):
    """With plan_new_shapes=False the last, smaller batch runs the original forward: its peak is
    not planned, so the callback says so (once, over two epochs), naming both shapes."""
    from torch.utils.data import DataLoader, TensorDataset

    budget = int(0.85 * _baseline_peak(tmp_path, "cnn"))
    torch.manual_seed(0)
    m = LitWorkload("cnn")
    x, y = m.w.inputs  # batch 16
    data = TensorDataset(torch.cat([x, x, x[:8]]), torch.cat([y, y, y[:8]]))
    cb = MuTwoAC(budget=budget, plan_new_shapes=False)
    with pytest.warns(UserWarning, match=r"MuTwoAC: a batch with inputs shaped \[8, .*runs "
                      r"without activation checkpointing: the step was planned for \[16, ") as rec:
        _trainer(tmp_path, cb, epochs=2).fit(m, DataLoader(data, batch_size=16))
    assert cb.state == "active" and len(m.losses) == 6
    assert sum("runs without activation checkpointing" in str(w.message) for w in rec) == 1


def test_infeasible_budget_says_what_the_smallest_peak_is(tmp_path):
    with pytest.raises(BudgetError, match=r"smallest peak .* \(parameter .*activation .*\)"):
        _fit(tmp_path, "cnn", MuTwoAC(budget=1000))


class _Branchy(LitWorkload):
    def forward(self, x, y):
        out = self.model(x)
        if out.sum() > 0:  # data-dependent branch: a graph break
            out = out * 1.0
        return out


def test_a_graph_break_is_planned_across_it(tmp_path):
    budget = int(0.85 * _baseline_peak(tmp_path, "cnn"))
    cb = MuTwoAC(budget=budget)
    torch.manual_seed(0)
    m = _Branchy("cnn")
    t = _trainer(tmp_path / "ac", cb)
    t.fit(m, m.dataloader(4), m.dataloader(1))
    assert cb.state == "active" and cb.plan.stop_reason == "fits" and cb.plan.recomputed
    assert cb.ac.last.graphs is not None  # planned as the graphs dynamo split the step into
    metrics = pd.read_csv(next((tmp_path / "ac").rglob("metrics.csv")))
    assert metrics["mutwo/graphs"].dropna().tolist() == [len(cb.ac.last.graphs.captured)]
    torch.manual_seed(0)
    ref = _Branchy("cnn")
    _trainer(tmp_path / "ref").fit(ref, ref.dataloader(4), ref.dataloader(1))
    assert m.losses == pytest.approx(ref.losses, rel=1e-6)


def test_checkpoint_loads_into_a_plain_model(tmp_path):
    budget = int(0.85 * _baseline_peak(tmp_path, "cnn"))
    m, t = _fit(tmp_path / "ac", "cnn", MuTwoAC(budget=budget), steps=3)
    path = tmp_path / "ac.ckpt"
    t.save_checkpoint(path)
    plain = LitWorkload("cnn")
    state = torch.load(path, weights_only=False)["state_dict"]
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state)
    for p, q in zip(plain.parameters(), m.parameters()):
        assert torch.equal(p, q)
    assert list(dict(m.named_parameters())) == list(dict(plain.named_parameters()))


def test_validation_and_predict_use_the_original_forward(tmp_path):
    budget = int(0.85 * _baseline_peak(tmp_path, "cnn"))
    cb = MuTwoAC(budget=budget)
    m = LitWorkload("cnn")
    t = _trainer(tmp_path, cb)
    t.fit(m, m.dataloader(2), m.dataloader(1))
    plain = copy.deepcopy(m)
    x = m.w.inputs[0]
    with torch.no_grad():
        m.eval(), plain.eval()
        assert torch.equal(m(x, None), plain(x, None))
    preds = t.predict(m, m.dataloader(1))
    with torch.no_grad():
        assert torch.equal(preds[0], plain(*[b for b in m.w.inputs]))
    assert "forward" not in m.__dict__


def test_bf16_mixed_precision(tmp_path):
    budget = int(0.85 * _baseline_peak(tmp_path, "cnn"))
    cb = MuTwoAC(budget=budget)
    m, _ = _fit(tmp_path / "bf16", "cnn", cb, steps=3, precision="bf16-mixed")
    assert cb.plan is not None and cb.plan.stop_reason in ("fits", "already fits")
    assert all(torch.isfinite(torch.tensor(m.losses)))


def test_a_step_that_does_not_fit_is_profiled_again_with_host_swap(tmp_path, monkeypatch, caplog):
    """The device runs out of memory profiling the un-checkpointed step: MuTwoAC profiles it
    again with activations on the host, plans, and trains as without AC."""
    from lightning_ac import install

    real, calls = install.profile_joint, []

    def short_of_memory(joint, opt=None, **kw):
        calls.append(kw.get("swap", False))
        if not kw.get("swap"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(joint, opt, **kw)

    monkeypatch.setattr(install, "profile_joint", short_of_memory)
    budget = int(0.85 * _baseline_peak(tmp_path, "cnn"))
    cb = MuTwoAC(budget=budget)
    with caplog.at_level("INFO"):
        m, _ = _fit(tmp_path / "ac", "cnn", cb, steps=3)
    assert calls[-2:] == [False, True]
    assert cb.profile.summary["host_swap"] and cb.profile.summary["swapped_B"] > 0
    assert cb.state == "active" and cb.plan.recomputed
    assert any("swapped to host memory" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(install, "profile_joint", real)
    ref, _ = _fit(tmp_path / "ref", "cnn", None, steps=3)
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_out_of_memory_in_a_planned_step_says_what_was_planned(tmp_path, monkeypatch):
    """An OOM in the rewritten step (BERT-base b32 under a 16 GB cap hit one, with 2.2 GiB
    fragmented) comes out with the plan's figures and what to try."""
    from lightning_ac import install

    real = install.compile_with_plan

    def failing_after_planning(fn, module, make_plan, **kwargs):
        compiled = real(fn, module, make_plan, **kwargs)
        calls = []

        def run(*args, **kwargs):
            calls.append(1)
            if len(calls) > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
            return compiled(*args, **kwargs)

        return run

    monkeypatch.setattr(install, "compile_with_plan", failing_after_planning)
    budget = int(0.85 * _baseline_peak(tmp_path, "cnn"))
    with pytest.raises(torch.cuda.OutOfMemoryError,
                       match=r"(?s)Tried to allocate.*MuTwoAC: this step was planned for .* "
                             r"under a budget of .*lower the budget"):
        _fit(tmp_path / "ac", "cnn", MuTwoAC(budget=budget), steps=3)


def test_lightning_frees_gradients_after_the_forward_pass(tmp_path):
    """What the callback's memory model assumes of Lightning's loop: the previous step's
    gradients still exist while training_step runs, and zero_grad sets them to None before
    backward. If Lightning changes this order, _previous_grads must change with it."""

    class Probe(LitWorkload):
        def training_step(self, batch, batch_idx):
            self.seen.append(all(p.grad is not None for p in self.parameters()))
            return super().training_step(batch, batch_idx)

        def on_before_backward(self, loss):
            self.before_bwd.append(any(p.grad is not None for p in self.parameters()))

    torch.manual_seed(0)
    m = Probe("mlp")
    m.seen, m.before_bwd = [], []
    _trainer(tmp_path).fit(m, m.dataloader(3), m.dataloader(1))
    assert m.seen == [False, True, True]
    assert m.before_bwd == [False, False, False]


@pytest.mark.parametrize("accumulate,expected", [(1, "until_backward"), (2, "through_step")])
def test_the_plan_counts_the_previous_steps_gradients(tmp_path, accumulate, expected):
    cb = MuTwoAC(budget=10**12)
    m, _ = _fit(tmp_path, "mlp", cb, steps=2, accumulate_grad_batches=accumulate)
    assert cb.profile.summary["previous_grads"] == expected
    grads_B = sum(p.numel() * p.element_size() for p in m.parameters())
    fwd = (cb.profile.nodes.phase == "forward").to_numpy()
    assert cb.profile.memory["gradient"].to_numpy()[fwd][:-1].min() == grads_B


def test_a_step_that_does_not_fit_even_swapped_raises_a_budget_error(tmp_path, monkeypatch):
    """Out of memory again with every activation on the host (one op's own working set is too
    big): a BudgetError that names the op and says to lower the batch size, not an OOM."""
    from lightning_ac import install
    from lightning_ac.profiler import NodeOutOfMemoryError

    def short_of_memory(joint, opt=None, **kw):
        if not kw.get("swap"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        node = next(n for n in joint.graph.nodes if n.op == "call_function")
        raise NodeOutOfMemoryError(node, torch.cuda.OutOfMemoryError("CUDA out of memory. "
                                                                     "Tried to allocate 8 GiB"))

    monkeypatch.setattr(install, "profile_joint", short_of_memory)
    with pytest.raises(BudgetError, match=r"(?s)even with every activation swapped to host "
                                          r"memory: \S+ \(aten\..*outputs of .*Lower the batch "
                                          r"size.*Tried to allocate 8 GiB"):
        _fit(tmp_path, "cnn", MuTwoAC(budget=10**6), steps=2)


def test_setup_plans_under_ddp_and_fsdp_and_turns_it_off_where_it_cannot():
    """Checked in setup(), before anything is captured: one device, DDP and FSDP (with its
    default use_orig_params=True, which dynamo needs) are planned; FSDP over flat parameters
    alone and DeepSpeed are not, and the warning says why."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        SingleDeviceStrategy,
    )

    cb = MuTwoAC(budget="1GB")
    for strategy in (DDPStrategy(), SingleDeviceStrategy("cpu"), FSDPStrategy()):
        cb.setup(SimpleNamespace(strategy=strategy, world_size=2), None, "fit")
        assert cb.state == "idle", type(strategy).__name__
    with pytest.warns(UserWarning, match="only with use_orig_params=True"):
        cb.setup(SimpleNamespace(strategy=FSDPStrategy(use_orig_params=False), world_size=2),
                 None, "fit")
    assert cb.state == "off"
    deepspeed = object.__new__(DeepSpeedStrategy)  # (without the deepspeed package)
    with pytest.warns(UserWarning, match="does not plan under DeepSpeedStrategy yet"):
        cb.setup(SimpleNamespace(strategy=deepspeed, world_size=2), None, "fit")
    assert cb.state == "off"


def test_the_budget_round_trips_through_a_checkpoint():
    cb = MuTwoAC(budget="6GB")
    other = MuTwoAC()
    other.load_state_dict(cb.state_dict())
    assert other.budget_B == 6 * 10**9
    other.load_state_dict({"budget_B": None})
    assert other.budget_B is None


def test_twenty_fits_in_one_process_each_plan_their_own_model(tmp_path):
    """Hyper-parameter searches, k-fold and notebooks fit fresh models in one process: each fit
    plans (dynamo's per-code recompile limit must not turn AC off after a few fits)."""
    compiled = []

    def counting(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    users_own = torch.compile(lambda x: torch.sin(x) * 2, backend=counting)
    x = torch.ones(3)
    probe = MuTwoAC(budget=10**12)
    _fit(tmp_path / "probe", "cnn", probe, steps=1)
    floor = plan(probe.profile, 1).predicted_peak_B  # everything recomputable dropped
    # (three quarters of the way up: each fit's profile has its own timings, and a greedy
    # that picks in another order can stop above the probe's floor; seen once at halfway)
    budget = floor + 3 * (probe.plan.baseline_peak_B - floor) // 4
    users_own(x)  # (after a fit: Trainer(deterministic=True) changes a global its guards read)
    for i in range(20):
        cb = MuTwoAC(budget=budget, verbose=False)
        _fit(tmp_path / str(i), "cnn", cb, steps=1)
        assert cb.state == "active", f"fit {i}: {cb.state}"
    users_own(x)
    assert len(compiled) == 1  # the user's compiled function was not recompiled


def test_dynamic_padding_under_the_callback_plans_once_for_all_lengths(tmp_path):
    """Batches padded to different lengths, as a collator with dynamic padding makes them: the
    second length traces the step with the sizes dynamic, later lengths plan nothing new, and
    training is as without AC; no warning."""
    from torch.utils.data import DataLoader

    def fit(cb, root):
        torch.manual_seed(0)
        m = LitWorkload("tiny-bert")
        batches = [tuple(t[:, :n].contiguous() for t in m.w.inputs) for n in (32, 16, 24, 8, 32)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _trainer(root, cb).fit(m, DataLoader(batches, batch_size=None))
        return m, [w for w in caught if "MuTwoAC" in str(w.message)]

    budget = int(0.85 * _baseline_peak(tmp_path, "tiny-bert"))
    cb = MuTwoAC(budget=budget)
    m, said = fit(cb, tmp_path / "ac")
    ref, _ = fit(None, tmp_path / "ref")
    assert not said
    assert len(cb.ac.plans) == 2 and any(s.dynamic for s in cb.ac.plans.values())
    for a, b in zip(m.losses, ref.losses, strict=True):
        assert abs(a - b) <= 1e-6 * abs(b) + 1e-7
    metrics = pd.read_csv(next((tmp_path / "ac").rglob("metrics.csv")))
    assert metrics["mutwo/planned_shapes"].dropna().tolist() == [2]
