import json

import numpy as np
import pytest
import torch

from benchmarks.zoo import make_workload
from lightning_ac.profiler import CATEGORIES, profile_step

aten = torch.ops.aten


def _profile(name, optimizer="adam", batch=4):
    w = make_workload(name, batch, seq_len=16)
    params = w.model.parameters()
    opt = torch.optim.Adam(params, lr=0.01) if optimizer == "adam" else \
        torch.optim.SGD(params, lr=0.01, momentum=0.9)
    return w, opt, profile_step(w.loss, w.inputs, w.model, opt)


@pytest.fixture(scope="module")
def mlp():
    return _profile("mlp")


def test_mlp_has_three_forward_and_three_weight_gradient_matmuls(mlp):
    _, _, prof = mlp
    nodes = prof.nodes
    fwd_mm = nodes[(nodes.phase == "forward") & nodes.op.isin(["aten.addmm.default", "aten.mm.default"])]
    assert len(fwd_mm) == 3
    bwd_mm = nodes[(nodes.phase == "backward") & (nodes.op == "aten.mm.default")]
    weight_grads = bwd_mm[bwd_mm.category == "gradient"]
    assert len(weight_grads) == 3
    # each weight-gradient matmul has the shape of a weight
    shapes = {tuple(n.meta["val"].shape) for n in weight_grads.node}
    assert shapes == {(10, 64), (64, 64), (64, 32)} or shapes == {(64, 10), (64, 64), (32, 64)}


def test_phases_are_ordered(mlp):
    _, _, prof = mlp
    phases = prof.nodes.phase.tolist()
    call = prof.nodes[prof.nodes.op != "placeholder"].phase.tolist()
    assert call == sorted(call, key=["forward", "backward", "optimizer"].index)
    assert set(phases) == {"forward", "backward", "optimizer"}


def test_memory_rises_through_forward_and_falls_through_backward(mlp):
    _, _, prof = mlp
    act = prof.memory["activation"].to_numpy()
    fwd = (prof.nodes.phase == "forward").to_numpy()
    bwd = (prof.nodes.phase == "backward").to_numpy()
    assert np.all(np.diff(act[fwd]) >= 0) and act[fwd][-1] > act[fwd][0]
    assert np.all(np.diff(act[bwd]) <= 0) and act[bwd][-1] < act[bwd][0]
    assert act[bwd][-1] == 0  # every activation is freed by the end of backward
    grads = prof.memory["gradient"].to_numpy()
    assert grads[fwd].max() == 0 and grads[bwd][-1] > 0  # gradients appear in backward
    total = prof.nodes.active_mem_B.to_numpy()
    assert total[fwd][-1] > total[fwd][0]


def _manual_uses(prof, node):
    """Walk the graph by hand: ranks of the nodes that read node or a view of it (views too)."""
    views = {aten.detach.default, aten.view.default, aten.t.default, aten._unsafe_view.default}
    aliases, frontier = {node}, [node]
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u.op == "call_function" and u.target in views and u not in aliases:
                aliases.add(u)
                frontier.append(u)
    fwd, bwd = [], []
    for n in prof.joint.graph.nodes:
        r = prof.rank.get(n)
        if any(a in n.all_input_nodes for a in aliases):
            (bwd if n.meta.get("partitioner_tag") == "is_backward" else fwd).append(r)
    return fwd, bwd


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_first_and_last_use_match_a_manual_walk(name):
    _, _, prof = _profile(name)
    acts = prof.activations[prof.activations.bytes > 64]
    assert len(acts) >= 3
    for _, row in acts.iterrows():
        fwd, bwd = _manual_uses(prof, row.node)
        if not fwd:
            fwd = [row.created_rank]
        assert row.first_bwd_use_rank == min(bwd), row["name"]
        assert row.last_bwd_use_rank == max(bwd), row["name"]
        assert row.last_fwd_use_rank == max(fwd), row["name"]
        assert row.created_rank == prof.rank[row.node] or row.creator != row["name"]


@pytest.mark.parametrize("name,optimizer", [("mlp", "sgd"), ("cnn", "adam"), ("tiny-bert", "adam")])
def test_every_tensor_gets_a_category(name, optimizer):
    _, _, prof = _profile(name, optimizer)
    tensor_nodes = prof.nodes[[isinstance(n.meta.get("val"), torch.Tensor) or
                               (n.op == "placeholder") for n in prof.nodes.node]]
    assert len(tensor_nodes) > 0
    assert tensor_nodes.category.isin(CATEGORIES).all()
    assert prof.nodes.category.dropna().isin(CATEGORIES).all()
    assert set(prof.nodes.category.dropna()) == set(CATEGORIES)


def test_categories_are_right():
    w, opt, prof = _profile("cnn", "adam")
    nodes = prof.nodes
    by_name = dict(zip(nodes.name, nodes.category))
    roles = dict(zip(prof.joint.primals, prof.joint.primal_roles))
    for node, role in roles.items():
        expected = "parameter" if role.kind == "parameter" else "other"
        assert by_name[node.name] == expected, (node.name, role)
    for node in prof.joint.grad_of:
        assert by_name[node.name] == "gradient"
    # Adam's exp_avg / exp_avg_sq are the optimizer graph's state inputs
    states = prof.nodes[prof.nodes.node.isin(prof.optimizer.states)]
    assert len(states) == 2 * len(list(w.model.parameters()))
    assert (states.category == "optimizer_state").all()
    params = prof.nodes[prof.nodes.node.isin(prof.optimizer.params)]
    assert (params.category == "parameter").all()
    # convolution outputs feed BatchNorm's backward: activations
    convs = nodes[(nodes.op == "aten.convolution.default")]
    assert (convs.category == "activation").all()
    # memory: what is persistent is counted once
    n_param_B = sum(p.numel() * p.element_size() for p in w.model.parameters())
    assert prof.summary["persistent_B"]["parameter"] == n_param_B
    assert prof.summary["persistent_B"]["optimizer_state"] >= 2 * n_param_B


def test_activation_records_are_sensible():
    _, _, prof = _profile("tiny-bert")
    acts = prof.activations
    assert (acts.first_bwd_use_rank > acts.last_fwd_use_rank).all()
    assert (acts.last_bwd_use_rank >= acts.first_bwd_use_rank).all()
    assert (acts.inactive_ms >= 0).all() and (acts.recompute_ms > 0).all()
    # dropout is random, but it replays the generator state it read (graph_passes.replayable_
    # random_ops): its masks can be recomputed; its outputs are rebuilt from the masks
    # (graph_passes.replayable_dropout), so they and what follows them can be too
    masks = acts[acts.creator.str.fullmatch(r"native_dropout(_\d+)?_replay")]
    assert len(masks) > 0 and masks.recomputable.all()
    states = prof.nodes[prof.nodes.name.str.endswith("_rng_state")]
    assert len(states) == len(masks) and not acts.creator.isin(states.name).any()
    assert (acts[acts.creator.str.startswith("native_dropout_backward")].recomputable).all()
    assert acts[acts.creator.str.startswith("native_layer_norm")].recomputable.all()
    # sources of a recompute are values that stay available
    names = set(prof.nodes.name)
    for src in " ".join(acts.recompute_sources).split():
        assert src in names


def test_profiling_changes_nothing():
    w = make_workload("cnn", 4)
    opt = torch.optim.Adam(w.model.parameters(), lr=0.01)
    w.loss(*w.inputs).backward()
    opt.step()  # optimizer state exists
    snap = {k: v.clone() for k, v in w.model.state_dict().items()}
    grads = [p.grad.clone() for p in w.model.parameters()]
    state = [v.clone() for s in opt.state.values() for v in s.values()]
    rng = torch.get_rng_state()
    profile_step(w.loss, w.inputs, w.model, opt)
    for k, v in w.model.state_dict().items():
        assert torch.equal(v, snap[k]), k
    for p, g in zip(w.model.parameters(), grads):
        assert torch.equal(p.grad, g)
    assert all(torch.equal(a, b) for a, b in
               zip([v for s in opt.state.values() for v in s.values()], state))
    assert torch.equal(torch.get_rng_state(), rng)


def test_outputs_are_written(mlp, tmp_path):
    _, _, prof = mlp
    paths = prof.to_csv(tmp_path)
    prof.to_json(tmp_path / "summary.json")
    pngs = prof.plot(tmp_path)
    for p in paths + pngs:
        assert p.exists() and p.stat().st_size > 0
    import pandas as pd

    nodes = pd.read_csv(tmp_path / "nodes.csv")
    assert {"rank", "phase", "op", "runtime_ms", "active_mem_B", "peak_mem_B", "category"} <= set(nodes)
    assert len(nodes) == len(prof.nodes)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["predicted_peak_B"] == prof.peak_bytes > 0
    assert sum(summary["peak_breakdown_B"].values()) == prof.peak_bytes


def test_command_line(tmp_path):
    from benchmarks.profile_step import main

    assert main(["--model", "mlp", "--batch-size", "4", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == "mlp" and summary["eager_step_ms"] > 0
    assert (tmp_path / "memory.png").exists()


@pytest.mark.parametrize("name", ["cnn", "tiny-bert"])
def test_host_swap_profiles_the_same_step(name):
    """Swapping activations out after forward changes where they live, not the profile."""
    from lightning_ac import _torch_compat as compat
    from lightning_ac.capture import capture_joint
    from lightning_ac.profiler import profile_joint

    w = make_workload(name, 8, seq_len=32)
    opt = torch.optim.Adam(w.model.parameters(), lr=0.01)
    joint = capture_joint(w.loss, w.inputs, w.model)
    profiles = {}
    for swap in (False, True):
        with compat.real_tensor_mode():
            profiles[swap] = profile_joint(joint, opt, runs=1, swap=swap, min_swap_B=1)
    plain, swapped = profiles[False], profiles[True]
    assert plain.summary["swapped_B"] == 0
    # most activation bytes went to the host and came back (tiny views stay)
    assert swapped.summary["swapped_B"] >= 0.5 * plain.activations.bytes.sum()
    assert swapped.peak_bytes == plain.peak_bytes
    cols = ["bytes", "start", "stop", "category"]
    pd_plain, pd_swapped = plain.storages[cols], swapped.storages[cols]
    assert pd_plain.reset_index(drop=True).equals(pd_swapped.reset_index(drop=True))
    a, b = plain.activations, swapped.activations
    assert list(a.name) == list(b.name) and list(a.recomputable) == list(b.recomputable)


def test_host_swap_above_a_limit_moves_only_what_keeps_the_device_under_it():
    """With ``swap_above_B``, activations go to the host only while the device holds more than
    the limit: none under a limit above the step's peak, all of them under a limit of zero, part
    of them between; the profile is the same every time."""
    from lightning_ac import _torch_compat as compat
    from lightning_ac.capture import capture_joint
    from lightning_ac.profiler import profile_joint

    w = make_workload("tiny-bert", 8, seq_len=32)
    opt = torch.optim.Adam(w.model.parameters(), lr=0.01)
    joint = capture_joint(w.loss, w.inputs, w.model)
    param_B = sum(p.numel() * p.element_size() for p in w.model.parameters())

    def run(**kw):
        with compat.real_tensor_mode():
            return profile_joint(joint, opt, runs=1, swap=True, min_swap_B=1, **kw)

    full = run()
    act_B = full.activations.bytes.sum()
    none = run(swap_above_B=10 * (param_B + act_B))
    zero = run(swap_above_B=0)
    part = run(swap_above_B=param_B + act_B // 2)
    assert none.summary["swapped_B"] == 0
    assert zero.summary["swapped_B"] == full.summary["swapped_B"] > 0
    assert 0 < part.summary["swapped_B"] < full.summary["swapped_B"]
    cols = ["bytes", "start", "stop", "category"]
    for p in (none, zero, part):
        assert p.peak_bytes == full.peak_bytes
        assert p.storages[cols].reset_index(drop=True).equals(
            full.storages[cols].reset_index(drop=True))


def test_previous_gradients_are_live_where_the_loop_frees_them():
    """Lightning zeroes gradients between training_step and backward: last step's gradients are
    live through forward ("until_backward"); with accumulation, through the whole step."""
    from lightning_ac.capture import capture_joint
    from lightning_ac.profiler import profile_joint

    w = make_workload("mlp", 4)
    opt = torch.optim.Adam(w.model.parameters(), lr=0.01)
    joint = capture_joint(w.loss, w.inputs, w.model)
    grad_B = sum(p.numel() * p.element_size() for p in w.model.parameters())
    runs = {mode: profile_joint(joint, opt, previous_grads=mode)
            for mode in ("freed", "until_backward", "through_step")}
    phase = runs["freed"].nodes.phase.to_numpy()
    fwd, opt_phase = phase == "forward", phase == "optimizer"
    freed, until, through = (runs[m].memory["gradient"].to_numpy() for m in
                             ("freed", "until_backward", "through_step"))
    assert freed[fwd].max() == 0
    # all of them through forward (the table is what is live *after* each node: they are set to
    # None once the last forward node has run) and none once backward starts
    assert np.all(until[fwd][:-1] == grad_B) and until[fwd][-1] == 0
    assert np.array_equal(until[~fwd], freed[~fwd])
    assert np.array_equal(through[:-1], freed[:-1] + grad_B)
    assert runs["through_step"].peak_bytes >= runs["freed"].peak_bytes + grad_B
    assert runs["until_backward"].summary["previous_grads"] == "until_backward"
    assert opt_phase.any()
    with pytest.raises(ValueError, match="previous_grads"):
        profile_joint(joint, opt, previous_grads="sometimes")


def test_a_node_with_any_cuda_tensor_is_timed_on_the_gpu():
    """replay_random(state, device, op, q, k, v): the first input is the generator state, a CPU
    tensor; the op's kernels run on the GPU and must be timed by CUDA events."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_ac.profiler import _on_cuda
    from lightning_ac.runtime_ops import replay_random

    g = torch.fx.Graph()
    state, q = g.placeholder("state"), g.placeholder("q")
    n = g.call_function(replay_random, (state, torch.device("cuda"), aten.mul.Tensor, q, q))
    host_only = g.call_function(aten.add.Tensor, (state, state))
    with FakeTensorMode():
        env = {state: torch.zeros(8, dtype=torch.uint8), q: torch.empty(4, device="cuda")}
        n.meta["val"] = torch.empty(4, device="cuda")
        host_only.meta["val"] = torch.empty(8, dtype=torch.uint8)
    assert _on_cuda(n, env)
    assert not _on_cuda(host_only, env)
    del env[q]  # inputs not in the environment (freed): the output decides
    assert _on_cuda(n, env)


def test_out_of_memory_names_the_node_being_profiled(monkeypatch):
    from lightning_ac.capture import capture_joint
    from lightning_ac.profiler import GraphProfiler, NodeOutOfMemoryError, profile_iteration

    w = make_workload("mlp", 4)
    joint = capture_joint(w.loss, w.inputs, w.model)
    victim = next(n for n in joint.graph.nodes if n.target is aten.addmm.default)
    real = GraphProfiler._run_and_measure

    def run(self, n):
        if n is victim:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(self, n)

    monkeypatch.setattr(GraphProfiler, "_run_and_measure", run)
    with pytest.raises(NodeOutOfMemoryError, match=rf"(?s)Tried to allocate.*{victim.name}") as e:
        profile_iteration(joint)
    assert e.value.node is victim and e.value.out_B == 4 * 64 * 4
    assert isinstance(e.value, torch.cuda.OutOfMemoryError)  # callers' except clauses still work
