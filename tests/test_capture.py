import operator

import pytest
import torch
from torch import nn

from benchmarks.zoo import make_workload
from lightning_ac.capture import CaptureError, capture_joint, capture_optimizer_step
from lightning_ac.runtime_ops import replay_random, save_rng_state

aten = torch.ops.aten


def _forward_random(joint, op):
    """Forward nodes running the random ``op`` (through :func:`replay_random`)."""
    return [n for n in joint.graph.nodes if n.target is replay_random and n.args[2] == op
            and not joint.is_backward(n)]


def _state_snapshot(model, optimizer=None):
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    if optimizer is not None:
        for i, s in enumerate(optimizer.state.values()):
            for k, v in s.items():
                snap[f"opt{i}.{k}"] = v.clone() if torch.is_tensor(v) else v
    return snap


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_primals_are_named_by_identity_not_order():
    w = make_workload("cnn", 2)
    joint = capture_joint(w.loss, w.inputs, w.model)
    params = dict(w.model.named_parameters())
    buffers = dict(w.model.named_buffers())
    for role, value in zip(joint.primal_roles, joint.primal_values):
        if role.kind == "parameter":
            assert value is params[role.name]
        elif role.kind == "buffer":
            assert value is buffers[role.name]
    assert sum(r.kind == "input" for r in joint.primal_roles) == 2  # images and labels
    assert {r.name for r in joint.primal_roles if r.kind == "parameter"} == set(params)
    # every parameter has exactly one gradient output
    assert sorted(joint.grad_of.values()) == [
        i for i, r in enumerate(joint.primal_roles) if r.kind == "parameter"]


def test_capture_changes_nothing():
    w = make_workload("cnn", 4)  # BatchNorm: a forward run would update running statistics
    before = _state_snapshot(w.model)
    capture_joint(w.loss, w.inputs, w.model)
    _assert_same(before, _state_snapshot(w.model))
    assert all(p.grad is None for p in w.model.parameters())


def test_graph_break_raises_a_clear_error():
    model = nn.Linear(4, 4)

    def step(x):
        y = model(x)
        if y.sum() > 0:  # data-dependent branch: no single graph
            y = y * 2
        return y.sum()

    with pytest.raises(CaptureError, match=r"could not capture .*step.* as one graph"):
        capture_joint(step, (torch.randn(2, 4),), model)


def test_nothing_requiring_grad_raises():
    model = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(CaptureError, match="nothing in the step requires a gradient"):
        capture_joint(lambda x: model(x).sum(), (torch.randn(2, 4),), model)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-3),
    lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=False),
])
def test_optimizer_capture_leaves_model_and_optimizer_alone(make_opt):
    w = make_workload("mlp", 4)
    opt = make_opt(w.model.parameters())
    # a real step first, so that the optimizer has state that must survive the capture
    w.loss(*w.inputs).backward()
    opt.step()
    before = _state_snapshot(w.model, opt)
    joint = capture_joint(w.loss, w.inputs, w.model)
    og = capture_optimizer_step(opt, joint.primal_values)
    _assert_same(before, _state_snapshot(w.model, opt))
    assert len(og.params) == len(og.grads) == 6
    assert all(joint.primal_roles[i].kind == "parameter" for i in og.param_index)
    n_state = {torch.optim.SGD: 1, torch.optim.Adam: 2, torch.optim.AdamW: 2}[type(opt)]
    assert len(og.states) == 6 * n_state
    assert all(opt.param_groups[0]["params"][i] is p for i, p in enumerate(w.model.parameters()))


def test_repeated_subexpressions_are_computed_once_but_random_draws_are_not():
    lin = nn.Linear(4, 4)

    def step(x):
        a = lin((x * 2).exp())
        b = lin((x * 2).exp())  # the same value again: traced twice, merged at capture
        d = nn.functional.dropout(x, 0.5) + nn.functional.dropout(x, 0.5)  # two draws
        return (a * b).sum() + d.sum()

    joint = capture_joint(step, (torch.randn(3, 4),), lin)
    fwd = [n for n in joint.graph.nodes if n.op == "call_function" and not joint.is_backward(n)]
    assert sum(n.target == aten.exp.default for n in fwd) == 1
    assert len(_forward_random(joint, aten.native_dropout.default)) == 2


def test_dropout_output_is_rebuilt_from_its_mask():
    w = make_workload("tiny-bert", 2, seq_len=16)
    joint = capture_joint(w.loss, w.inputs, w.model)
    drops = _forward_random(joint, aten.native_dropout.default)
    assert drops
    for d in drops:  # only the mask is read; the output comes from x * mask * scale
        assert {u.args[1] for u in d.users} == {1}
        (mask,) = d.users
        assert any(u.target == aten.native_dropout_backward.default
                   and not joint.is_backward(u) for u in mask.users)


def test_every_forward_random_op_reads_the_generator_state_just_before_it_runs():
    w = make_workload("tiny-bert", 2, seq_len=16)
    joint = capture_joint(w.loss, w.inputs, w.model)
    assert not any(torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())
                   for n in joint.graph.nodes if not joint.is_backward(n))
    drops = _forward_random(joint, aten.native_dropout.default)
    assert len(drops) == 2 * 3 + 1  # per layer: attention probs, two hidden; embeddings
    for d in drops:
        state = d.args[0]
        assert state.target is save_rng_state and state.next is d


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_replay_draws_again_what_the_op_drew_and_leaves_the_generator_alone(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = torch.device(device)
    x = torch.randn(4096, device=dev)
    state = save_rng_state(dev)
    out, mask = replay_random(state, dev, aten.native_dropout.default, x, 0.5, True)
    after = save_rng_state(dev)
    assert not torch.equal(after, state)  # forward moved the generator on, as eager does
    out2, mask2 = replay_random(state, dev, aten.native_dropout.default, x, 0.5, True, replay=True)
    assert torch.equal(mask, mask2) and torch.equal(out, out2)
    assert torch.equal(save_rng_state(dev), after)
    _, fresh = aten.native_dropout.default(x, 0.5, True)  # an ordinary draw differs
    assert not torch.equal(fresh, mask)


def test_batch_norm_runs_on_cudnn_where_eager_would(force_cudnn_batch_norm):
    """Where eager's BatchNorm runs cuDNN (CUDA only), the graph runs cudnn_batch_norm without
    statistics and cuDNN's backward with the reserve space; forced here on the CPU graph, which
    is partitioned (not run) with every BatchNorm output dropped."""
    from lightning_ac import _torch_compat as compat

    w = make_workload("cnn", 4)
    joint = capture_joint(w.loss, w.inputs, w.model)
    targets = [n.target for n in joint.graph.nodes]
    assert targets.count(aten.cudnn_batch_norm.default) == 4
    assert targets.count(aten.cudnn_batch_norm_backward.default) == 4
    assert aten.native_batch_norm_backward.default not in targets
    assert aten._native_batch_norm_legit.no_stats not in targets
    for n in joint.graph.find_nodes(op="call_function", target=aten.cudnn_batch_norm.default):
        assert n.args[3] is None and n.args[4] is None  # no running statistics
    for n in joint.graph.find_nodes(op="call_function",
                                    target=aten.cudnn_batch_norm_backward.default):
        reserve = n.args[8]
        assert reserve.target is operator.getitem and reserve.args[1] == 3
        assert reserve.args[0].target is aten.cudnn_batch_norm.default
    bn_outs = [u for n in joint.graph.find_nodes(op="call_function",
                                                 target=aten.cudnn_batch_norm.default)
               for u in n.users if u.args[1] == 0]
    relus = {u for o in bn_outs for u in o.users}
    dropped = set(bn_outs) | relus | {u for r in relus for u in r.users  # and views of them
                                      if u.target is aten.detach.default}
    saved = [n for n in joint.graph.nodes if n.op == "call_function" and n not in dropped
             and not joint.is_backward(n) and isinstance(n.meta.get("val"), torch.Tensor)]
    fwd, bwd = compat.extract_fwd_bwd(joint.gm, [*saved, *joint.primals], joint.num_fwd_outputs)
    rerun = [n for n in bwd.graph.nodes if n.target is aten.cudnn_batch_norm.default]
    assert len(rerun) == 4  # recomputed in backward from the saved convolution outputs
    assert all(n.args[3] is None and n.args[4] is None for n in rerun)
