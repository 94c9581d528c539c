"""The rewritten step computes what eager computes, and saves what the plan keeps."""

import contextlib
import dataclasses
import operator
from unittest import mock

import pytest
import torch

from benchmarks.zoo import make_workload
from lightning_ac import _torch_compat as compat
from lightning_ac.measure import saved_tensor_bytes
from lightning_ac.planner import Plan, plan
from lightning_ac.profiler import profile_iteration
from lightning_ac.rewriter import compile_with_plan, partition


def assert_grads_match(model, ref, atol=1e-7):
    """Per tensor: ‖g − g_ref‖ ≤ 1e-6·‖g_ref‖ + atol (see docs/design.md)."""
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad - q.grad).norm() <= 1e-6 * q.grad.norm() + atol, name


def step_both(step, w, ref):
    """One forward and backward of ``step`` on ``w``'s batch and of eager ``ref``, from the same
    RNG state (dropout draws the same masks in both); their losses."""
    rng = torch.get_rng_state()
    loss = step(*w.inputs)
    loss.backward()
    torch.set_rng_state(rng)
    ref_loss = ref.loss(*ref.inputs)
    ref_loss.backward()
    return loss, ref_loss


def _planned(name, share, **kw):
    """A workload compiled with a plan whose budget is `share` of the way from floor to peak
    (``kw``: for compile_with_plan)."""
    w = make_workload(name, 16, seq_len=32)
    made = {}

    def make_plan(joint):
        with compat.real_tensor_mode():
            prof = profile_iteration(joint)
        floor = plan(prof, 1).predicted_peak_B
        made["plan"] = plan(prof, int(floor + share * (prof.peak_bytes - floor)))
        made["profile"] = prof
        return made["plan"]

    return w, compile_with_plan(w.loss, w.model, make_plan, **kw), made


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
        loss, ref_loss = step_both(step, w, ref)
        assert torch.equal(loss.detach(), ref_loss.detach()) or \
            abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item()), i
        assert_grads_match(w.model, ref.model)
        opt.step()
        ref_opt.step()
    if name != "mlp":  # the MLP's peak is its loss: nothing to recompute there
        assert made["plan"].recomputed


def test_batch_norm_statistics_follow_eager_while_batch_norm_is_recomputed():
    """BatchNorm runs without its buffers and one node updates them all (graph_passes.batch_norm_
    without_buffers): after several steps they equal eager's, recomputation included."""
    w, step, made = _planned("cnn", 0.0)
    ref = make_workload("cnn", 16)
    for _ in range(3):
        step(*w.inputs).backward()
        ref.loss(*ref.inputs).backward()
    assert any(n.target == torch.ops.aten._native_batch_norm_legit.no_stats
               for n in made["plan"].recomputed_nodes)
    for (name, b), r in zip(w.model.named_buffers(), ref.model.buffers()):
        if b.is_floating_point():
            torch.testing.assert_close(b, r, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(b, r), name  # num_batches_tracked


def test_batch_norm_reads_no_buffer_and_nothing_copies_them():
    from lightning_ac.capture import capture_joint
    from lightning_ac.runtime_ops import increment_counters, update_running_stats

    w = make_workload("cnn", 4)
    joint = capture_joint(w.loss, w.inputs, w.model)
    aten = torch.ops.aten
    targets = [n.target for n in joint.graph.nodes]
    assert aten._native_batch_norm_legit_functional.default not in targets
    assert targets.count(aten._native_batch_norm_legit.no_stats) == 4
    assert targets.count(update_running_stats) == 1
    assert targets.count(increment_counters) == 1  # all four num_batches_tracked at once
    assert aten.clone.default not in targets and not joint.pinned
    buffers = [p for p, r in zip(joint.primals, joint.primal_roles) if r.kind == "buffer"]
    for buf in buffers:  # read once, by the update (statistics) or the increment (counter)
        assert [u.target for u in buf.users] in ([update_running_stats], [increment_counters])


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


def _drop_dropout_masks(made):
    """A make_plan that keeps every activation but dropout's masks (and the ops that read
    them: the rebuilt outputs), whatever the planner would pick."""

    def make_plan(joint):
        with compat.real_tensor_mode():
            prof = profile_iteration(joint)
        acts = prof.activations
        drop = acts.creator.str.fullmatch(r"native_dropout(_\d+)?_replay")
        made["plan"] = Plan(budget_B=None, baseline_peak_B=prof.peak_bytes,
                            predicted_peak_B=prof.peak_bytes, predicted_extra_ms=0.0,
                            stop_reason="by hand", recomputed=list(acts.node[drop]),
                            kept=list(acts.node[~drop]))
        return made["plan"]

    return make_plan


def test_dropout_masks_are_replayed_without_new_random_draws():
    w, ref = make_workload("tiny-bert", 16, seq_len=32), make_workload("tiny-bert", 16, seq_len=32)
    made = {}
    step = compile_with_plan(w.loss, w.model, _drop_dropout_masks(made))
    for i in range(2):
        for m in (w.model, ref.model):
            m.zero_grad(set_to_none=True)
        torch.manual_seed(3 + i)
        loss = step(*w.inputs)
        loss.backward()
        after = torch.get_rng_state()
        torch.manual_seed(3 + i)
        ref_loss = ref.loss(*ref.inputs)
        ref_loss.backward()
        assert len(made["plan"].recomputed) == 7  # embeddings + 2 layers x 3 dropouts
        # backward drew the masks again from their saved states, and left the generator where
        # one eager step leaves it
        assert torch.equal(after, torch.get_rng_state())
        assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
        assert_grads_match(w.model, ref.model)


def test_without_replay_a_recomputed_mask_would_differ():
    """The check above can fail: a backward that re-runs dropout plainly draws other masks."""
    w, ref = make_workload("tiny-bert", 16, seq_len=32), make_workload("tiny-bert", 16, seq_len=32)
    step = compile_with_plan(w.loss, w.model, _drop_dropout_masks({}))
    with mock.patch("lightning_ac.rewriter.use_replays", lambda gm: 0):
        torch.manual_seed(3)
        step(*w.inputs).backward()
    torch.manual_seed(3)
    ref.loss(*ref.inputs).backward()
    with pytest.raises(AssertionError):
        assert_grads_match(w.model, ref.model)


def _read_by_backward(joint, keep):
    return [n for n in joint.graph.nodes if n.op == "call_function" and not joint.is_backward(n)
            and isinstance(n.meta.get("val"), torch.Tensor) and keep(n.meta["val"])
            and any(joint.is_backward(u) for u in n.users)]


def test_empty_reserve_space_is_saved_not_rebuilt_by_rerunning_batch_norm(force_cudnn_batch_norm):
    """cuDNN BatchNorm's reserve space has no elements, so the profile has no storage for it and
    no plan lists it; the partition must still save it, or backward re-runs every BatchNorm."""
    from lightning_ac.capture import capture_joint

    w = make_workload("cnn", 4)
    joint = capture_joint(w.loss, w.inputs, w.model)
    aten = torch.ops.aten
    kept = _read_by_backward(joint, lambda v: v.numel() > 0)  # what a profile can see
    empty = Plan(None, 0, 0, 0.0, "already fits", kept=kept)
    _, bwd = partition(joint, empty)
    targets = [n.target for n in bwd.graph.nodes]
    assert targets.count(aten.cudnn_batch_norm_backward.default) == 4
    assert aten.cudnn_batch_norm.default not in targets


def test_a_rerun_op_hands_out_all_its_outputs_at_once():
    """The reordering places each node just before its first user, so the getitems of a re-run
    multi-output op can end up far apart, and the op's result tuple keeps every output alive
    until the last of them. After the pass each getitem follows its op directly."""
    import torch.fx as fx

    from lightning_ac.rewriter import getitems_after_their_op

    g = fx.Graph()
    x = g.placeholder("x")
    pair = g.call_function(torch.ops.aten.var_mean.correction, (x,), {"correction": 0})
    var = g.call_function(operator.getitem, (pair, 0))
    big = g.call_function(torch.ops.aten.mul.Tensor, (var, 2.0))
    mean = g.call_function(operator.getitem, (pair, 1))  # taken late, as reordering leaves it
    g.output((big, mean))
    gm = fx.GraphModule(torch.nn.Module(), g)
    t = torch.randn(5)
    before = gm(t)
    getitems_after_their_op(gm)
    assert list(gm.graph.nodes)[1:4] == [pair, var, mean]
    assert all(torch.equal(a, b) for a, b in zip(gm(t), before))


SWAP_AND_RECOMPUTE_GBPS = (0.1, 0.3, 1.0, 3.0)
"""Host links to pretend, slowest first, for a plan that both swaps and recomputes: slow enough
that only some copies hide. Which one gives such a plan depends on the profile's timings (the
CPU's, noisy on a loaded machine): ``_swapping`` takes the first that does."""


@contextlib.contextmanager
def _swapping(w, bandwidth_GBps, budget_of, swap_host_ms=0.0, edit=None, kernels="eager"):
    """``w``'s step compiled with a plan that swaps: the profile's host link pretended to run at
    ``bandwidth_GBps`` (or, given several, the first at which the plan both swaps and
    recomputes), the budget ``budget_of(profile)``, every activation a swap candidate and each
    swap charged ``swap_host_ms``; ``edit(plan)`` may change the plan before the rewrite.
    Yields the step, ``made`` (``plan``) and ``graphs`` (``fwd``/``bwd`` as the swaps went in),
    filled by the first call, which must come inside the block (the patches are held there)."""
    from lightning_ac import planner, rewriter

    made, graphs = {}, {}
    links = bandwidth_GBps if isinstance(bandwidth_GBps, tuple) else (bandwidth_GBps,)

    def make_plan(joint):
        with compat.real_tensor_mode():
            prof = profile_iteration(joint)
        for link in links:
            linked = dataclasses.replace(
                prof, summary={**prof.summary, "host_device_bandwidth_GBps": link})
            made["plan"] = plan(linked, budget_of(linked))
            if made["plan"].swapped and made["plan"].recomputed:
                break
        if edit is not None:
            edit(made["plan"])
        return made["plan"]

    def spy(fwd, bwd, p, joint, *args):
        graphs.update(fwd=fwd, bwd=bwd)
        return real(fwd, bwd, p, joint, *args)

    real = rewriter.insert_swaps
    with mock.patch.object(planner, "MIN_SWAP_B", 0), \
            mock.patch.object(planner, "SWAP_HOST_MS", swap_host_ms), \
            mock.patch.object(rewriter, "insert_swaps", spy):
        yield compile_with_plan(w.loss, w.model, make_plan, kernels=kernels), made, graphs


def _floor(prof):
    """The lowest peak recomputation alone reaches."""
    return plan(prof, 1, swap=False).predicted_peak_B


def _halfway(prof):
    return int(_floor(prof) + 0.5 * (prof.peak_bytes - _floor(prof)))


def test_swapped_activations_are_saved_as_host_copies_and_change_nothing():
    """With a (pretended) host link the plan swaps. The forward saves each swapped activation's
    copy in its place, made after its last forward use, and lets the activation go after that;
    backward copies it back before its first use. On the CPU the copies are plain clones, so
    the result must be eager's."""
    from lightning_ac import swapping

    w, ref = make_workload("tiny-bert", 16, seq_len=32), make_workload("tiny-bert", 16, seq_len=32)

    def buffers():  # the host buffers the swapped activations' slots hold, free for reuse
        return sorted(b.data_ptr() for i in graphs["fwd"].swap_slots.ids
                      for b in swapping._SLOTS[i].free)

    ids, mask, labels = w.inputs
    other = ((ids + 1) % ids.max(), mask, labels.roll(1, 0))  # a second, different batch
    held = []
    # slow enough that only some copies hide: the plan both swaps and recomputes (at this tight
    # budget the swapping plan's predicted time is within noise of recomputing alone, so swaps
    # are credited, not charged, host time: the planner keeps them)
    with _swapping(w, SWAP_AND_RECOMPUTE_GBPS, _floor,
                   swap_host_ms=-float("inf")) as (step, made, graphs):
        # two plain steps, then one whose loss adds two forwards (the first one's host copies
        # must survive the second's)
        for i, batches in enumerate([[w.inputs], [w.inputs], [w.inputs, other]]):
            for m in (w.model, ref.model):
                m.zero_grad(set_to_none=True)
            rng = torch.get_rng_state()
            loss = sum(step(*b) for b in batches)
            loss.backward()
            torch.set_rng_state(rng)
            ref_loss = sum(ref.loss(*b) for b in batches)
            ref_loss.backward()
            assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item()), i
            assert_grads_match(w.model, ref.model)
            held.append(buffers())
    assert held[0] and held[1] == held[0]  # the second step reused the first one's buffers
    assert len(held[2]) == 2 * len(held[0])  # two forwards at once: a second set
    p = made["plan"]
    assert p.swapped and p.recomputed, p.summary()
    fwd, bwd = graphs["fwd"], graphs["bwd"]
    outs = [n for n in fwd.graph.nodes if n.target is swapping.swap_out]
    saved = fwd.graph.output_node().all_input_nodes
    assert sorted(o.args[0].name for o in outs) == sorted(n.name for n in p.swapped)
    assert all(o in saved and o.args[0] not in saved for o in outs)
    f_pos = {n: i for i, n in enumerate(fwd.graph.nodes)}
    releases = set()
    for o in outs:  # after every forward use of the activation; released after that
        (release,) = [u for u in o.args[0].users if u.target is swapping.swap_release]
        assert all(f_pos[u] < f_pos[o] for u in o.args[0].users if u not in (o, release))
        assert f_pos[o] < f_pos[release]
        releases.add(release)
    out_of = {o.args[0]: o for o in outs}
    for r in releases:  # one call per point, waiting for the last copy out before it
        tensors, slot = r.args
        last = max((out_of[t] for t in tensors), key=f_pos.__getitem__)
        assert slot == last.args[1]
        assert r.prev.target is not swapping.swap_release
    assert sum(len(r.args[0]) for r in releases) == len(outs)
    # released where the plan expects the copy to have ended, not all at the end of forward
    assert any(r.next.target != "output" for r in releases)
    b_pos = {n: i for i, n in enumerate(bwd.graph.nodes)}
    ins = [n for n in bwd.graph.nodes if n.target is swapping.swap_in]
    assert len(ins) == len(outs)
    for back in ins:
        held, (ready,) = back.args[0], back.users
        assert held.op == "placeholder" and list(held.users) == [back]
        assert ready.target is swapping.swap_wait
        assert b_pos[back] < b_pos[ready] < min(b_pos[u] for u in ready.users)


def test_a_swap_only_plan_copies_back_where_planned_not_at_the_start_of_backward():
    """With nothing recomputed the backward must still be reordered: the partition computes the
    views backward takes of saved values at its start, so without reordering every swapped
    activation was needed there, and all came back at once (BERT-base b32 on the H100: 1.8 GiB
    over the planned peak and +13% step time)."""
    from lightning_ac import swapping

    w = make_workload("tiny-bert", 16, seq_len=32)
    with _swapping(w, 1e6, _halfway) as (step, made, graphs):  # copies hide: swaps only
        step(*w.inputs).backward()
    p = made["plan"]
    assert p.swapped and not p.recomputed, p.summary()
    planned = {x.name: p.prefetch_before[x].name for x in p.swapped}
    for back in (n for n in graphs["bwd"].graph.nodes if n.target is swapping.swap_in):
        after = back.next  # skip the other copies issued (or waited for) before the same node
        while after.target in (swapping.swap_in, swapping.swap_wait) and after.args[0] is not back:
            after = after.next
        assert after.name == planned[back.args[0].name]


def test_activations_released_at_one_point_share_one_release_call():
    """Where the plan releases several swapped activations at once, forward makes one
    ``swap_release`` for them, waiting for the copy out that was started last (the copies out
    queue on one stream, so it ends last); the step is still eager's."""
    from lightning_ac import swapping

    w, ref = make_workload("tiny-bert", 16, seq_len=32), make_workload("tiny-bert", 16, seq_len=32)

    def release_all_at_the_end(p):
        p.release_before = {}

    with _swapping(w, 1e6, _halfway, edit=release_all_at_the_end) as (step, made, graphs):
        rng = torch.get_rng_state()
        step(*w.inputs).backward()
    torch.set_rng_state(rng)
    ref.loss(*ref.inputs).backward()
    assert_grads_match(w.model, ref.model)
    p, fwd = made["plan"], graphs["fwd"]
    assert len(p.swapped) >= 2, p.summary()
    nodes = list(fwd.graph.nodes)
    (release,) = [n for n in nodes if n.target is swapping.swap_release]
    outs = [n for n in nodes if n.target is swapping.swap_out]
    assert release.next.op == "output"
    assert sorted(t.name for t in release.args[0]) == sorted(o.args[0].name for o in outs)
    assert release.args[1] == outs[-1].args[1]  # the slot of the last copy out


def test_a_plan_moves_to_a_retrace_of_the_same_step_and_not_to_another_shapes():
    """retarget: the plan of one trace applied to another trace of the same step (the re-plan
    loop uses it instead of profiling again); a trace of another shape is refused, by node."""
    from lightning_ac.capture import capture_joint
    from lightning_ac.errors import CaptureError
    from lightning_ac.profiler import profile_joint
    from lightning_ac.rewriter import retarget

    w = make_workload("tiny-bert", 4, seq_len=16)
    first, again = (capture_joint(w.loss, w.inputs, w.model) for _ in range(2))
    prof = profile_joint(first, None)
    floor = plan(prof, 1).predicted_peak_B
    p = plan(prof, (floor + prof.peak_bytes) // 2)
    q = retarget(p, first.graph, again.graph)
    assert [n.name for n in q.recomputed] == [n.name for n in p.recomputed] and q.recomputed
    assert all(n.graph is again.graph for n in [*q.kept, *q.recomputed, *q.recomputed_nodes])
    assert q.predicted_peak_B == p.predicted_peak_B
    # the retargeted plan partitions the new trace into a step that computes what eager does
    fwd, bwd = partition(again, q)
    assert fwd is not None and bwd is not None
    other = make_workload("tiny-bert", 8, seq_len=16)
    with pytest.raises(CaptureError, match="differs from the planned one at node"):
        retarget(p, first.graph, capture_joint(other.loss, other.inputs, other.model).graph)


def test_a_value_the_forward_also_returns_is_not_swapped():
    """A swap frees nothing when the caller holds the value too (a graph's output that the next
    graph of a split step takes in): the forward returns it as it is, and only values that are
    saved alone are swapped."""
    from types import SimpleNamespace

    from lightning_ac import swapping

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)

    def step(x):
        h = lin(x).relu()  # returned, and saved for relu's and mul's backward
        return (h * h).sum(), h

    def swap_everything_kept(p):
        p.swapped = [n for n in p.kept if n.meta["val"].numel() > 64]

    w = SimpleNamespace(loss=step, model=lin)
    with _swapping(w, 0.1, lambda prof: prof.peak_bytes, swap_host_ms=-float("inf"),
                   edit=swap_everything_kept) as (compiled, made, graphs):
        x = torch.randn(32, 64)
        loss, h = compiled(x)
    assert any(n.name.startswith("relu") for n in made["plan"].swapped)
    out = graphs["fwd"].graph.output_node().args[0]
    returned = [n for n in out[:2] if isinstance(n, torch.fx.Node)]
    assert returned and not any(n.target is swapping.swap_out for n in returned)
    torch.testing.assert_close(h, lin(x).relu())


def test_a_value_the_forward_also_returns_is_no_swap_candidate():
    from lightning_ac import planner
    from lightning_ac.capture import capture_joint

    lin = torch.nn.Linear(64, 64)

    def step(x):
        h = lin(x).sin().relu()  # sin saves its input: a candidate; relu's output is returned
        return (h * h).sum(), h

    joint = capture_joint(step, [torch.randn(32, 64)], lin)
    with compat.real_tensor_mode():
        prof = profile_iteration(joint)
    with mock.patch.object(planner, "MIN_SWAP_B", 0):
        candidates = planner.swappable(prof)
    relu = next(n for n in prof.activations["node"] if n.name.startswith("relu"))
    assert candidates and relu not in candidates


def test_a_new_plan_replaces_the_partition_without_compiling_again():
    """PlannedStep.use: the compiled step runs the new plan from its next forward (less saved,
    the same gradients), with no second trace; a backward runs the partition its own forward
    ran, across a switch; a forward whose backward never runs leaves nothing kept."""
    import gc

    from lightning_ac import rewriter

    w = make_workload("tiny-bert", 16, seq_len=32)
    ref = make_workload("tiny-bert", 16, seq_len=32)
    made, steps = [], []

    def make_plan(joint):
        with compat.real_tensor_mode():
            prof = profile_iteration(joint)
        made.append(prof)
        return plan(prof, prof.peak_bytes * 2)  # fits: nothing recomputed

    step = compile_with_plan(w.loss, w.model, make_plan, on_compiled=steps.append)
    exclude = list(w.model.parameters()) + list(w.model.buffers()) + list(w.inputs)
    loss, saved_all = saved_tensor_bytes(step, w.inputs, exclude=exclude)
    loss.backward()
    (planned,) = steps
    prof = made[0]
    lowest = plan(prof, 1)
    assert lowest.recomputed

    def run_and_compare(after_forward=None):
        for m in (w.model, ref.model):
            m.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # dropout draws the same masks in both runs
        loss, saved = saved_tensor_bytes(step, w.inputs, exclude=exclude)
        if after_forward is not None:
            after_forward()
        loss.backward()
        torch.manual_seed(1)
        ref.loss(*ref.inputs).backward()
        assert_grads_match(w.model, ref.model)
        return saved

    planned.use(lowest)
    assert run_and_compare() < saved_all
    assert len(made) == 1 and len(steps) == 1  # no second capture, profile or partition
    # switched between a forward and its backward: the backward still reads what it saved
    full = plan(prof, prof.peak_bytes * 2)
    assert run_and_compare(after_forward=lambda: planned.use(full)) < saved_all
    before = len(rewriter._SAVED)
    loss = step(*w.inputs)
    assert len(rewriter._SAVED) == before + 1
    del loss
    gc.collect()
    assert len(rewriter._SAVED) == before


def test_a_backward_that_keeps_its_graph_leaves_the_saved_values_for_the_next():
    """retain_graph=True (possible where AOTAutograd's donated buffers are off, which otherwise
    refuse it for any compiled step): the next backward reads the same values, gets the same
    gradients, and takes them."""
    from lightning_ac import rewriter

    w = make_workload("mlp", 16)

    def make_plan(joint):
        with compat.real_tensor_mode():
            prof = profile_iteration(joint)
        return plan(prof, 1)

    with torch._functorch.config.patch(donated_buffer=False):
        step = compile_with_plan(w.loss, w.model, make_plan)
        before = len(rewriter._SAVED)
        loss = step(*w.inputs)
        loss.backward(retain_graph=True)
        first = [p.grad.clone() for p in w.model.parameters()]
        assert len(rewriter._SAVED) == before + 1
        w.model.zero_grad(set_to_none=True)
        loss.backward()
    assert len(rewriter._SAVED) == before
    for p, g in zip(w.model.parameters(), first):
        assert torch.equal(p.grad, g)
