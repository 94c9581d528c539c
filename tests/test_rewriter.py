"""The rewritten step computes what eager computes, and saves what the plan keeps."""

import pytest
import torch

from lightning_ac import _torch_compat as compat
from lightning_ac.measure import saved_tensor_bytes
from lightning_ac.planner import plan
from lightning_ac.profiler import profile_iteration
from lightning_ac.rewriter import compile_with_plan
from lightning_ac.zoo import make_workload


def assert_grads_match(model, ref, atol=1e-7):
    """Per tensor: ‖g − g_ref‖ ≤ 1e-6·‖g_ref‖ + atol (see DESIGN.md)."""
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad - q.grad).norm() <= 1e-6 * q.grad.norm() + atol, name


def _planned(name, share):
    """A workload compiled with a plan whose budget is `share` of the way from floor to peak."""
    w = make_workload(name, 16, seq_len=32)
    made = {}

    def make_plan(joint):
        with compat.real_tensor_mode():
            prof = profile_iteration(joint)
        floor = plan(prof, 1).predicted_peak_B
        made["plan"] = plan(prof, int(floor + share * (prof.peak_bytes - floor)))
        made["profile"] = prof
        return made["plan"]

    return w, compile_with_plan(w.loss, w.model, make_plan), made


@pytest.mark.parametrize("name", ["mlp", "cnn", "tiny-bert"])
def test_loss_and_gradients_match_eager_over_several_steps(name):
    w, step, made = _planned(name, 0.3)
    ref = make_workload(name, 16, seq_len=32)  # same seed: same weights, same batch
    opt = torch.optim.SGD(w.model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    for i in range(3):
        for o in (opt, ref_opt):
            o.zero_grad(set_to_none=True)
        rng = torch.get_rng_state()
        loss = step(*w.inputs)
        loss.backward()
        torch.set_rng_state(rng)  # dropout draws the same masks in both runs
        ref_loss = ref.loss(*ref.inputs)
        ref_loss.backward()
        assert torch.equal(loss.detach(), ref_loss.detach()) or \
            abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item()), i
        assert_grads_match(w.model, ref.model)
        opt.step()
        ref_opt.step()
    if name != "mlp":  # the MLP's peak is its loss: nothing to recompute there
        assert made["plan"].recomputed


@pytest.mark.parametrize("name", ["cnn", "tiny-bert"])
def test_saved_bytes_drop_to_what_the_plan_keeps(name):
    w, step, made = _planned(name, 0.0)
    params = list(w.model.parameters()) + list(w.model.buffers()) + list(w.inputs)
    _, saved = saved_tensor_bytes(step, w.inputs, exclude=params)
    ref = make_workload(name, 16, seq_len=32)
    _, eager_saved = saved_tensor_bytes(ref.loss, ref.inputs,
                                        exclude=list(ref.model.parameters()) + list(ref.inputs))
    p, prof = made["plan"], made["profile"]
    acts = prof.activations.set_index("name")
    kept_B = int(sum(acts.at[n.name, "bytes"] for n in p.kept))
    dropped_B = p.recomputed_B
    assert dropped_B > 0
    assert saved < eager_saved
    # what the rewritten forward saves is what the plan keeps (plus pinned buffer copies)
    pinned_B = sum(n.meta["val"].numel() * n.meta["val"].element_size() for n in prof.joint.pinned)
    assert kept_B <= saved <= kept_B + pinned_B + 4096


def test_dropout_outputs_are_recomputed_without_new_random_draws():
    w, step, made = _planned("tiny-bert", 0.0)
    ref = make_workload("tiny-bert", 16, seq_len=32)
    torch.manual_seed(3)
    loss = step(*w.inputs)
    loss.backward()
    after = torch.get_rng_state()
    torch.manual_seed(3)
    ref_loss = ref.loss(*ref.inputs)
    ref_loss.backward()
    recomputed_ops = {n.target for n in made["plan"].recomputed_nodes}
    assert torch.ops.aten.native_dropout_backward.default in recomputed_ops
    assert torch.ops.aten.native_dropout.default not in recomputed_ops
    # backward drew nothing: the generator is where one eager step leaves it
    assert torch.equal(after, torch.get_rng_state())
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    assert_grads_match(w.model, ref.model)
