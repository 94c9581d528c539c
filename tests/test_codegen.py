"""The planned step on inductor's kernels (codegen): what inductor is given, and what it computes.

The translation (``for_inductor``) is checked on its own, running the translated graphs op by op
(fast); the compiled step itself on the CPU, where inductor compiles C++ (tens of seconds each).
"""

import operator
from unittest import mock

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from benchmarks.zoo import make_workload
from lightning_ac import _torch_compat as compat
from lightning_ac import codegen, rewriter, swapping
from lightning_ac.planner import plan
from lightning_ac.profiler import profile_iteration
from lightning_ac.rewriter import compile_with_plan
from tests.test_rewriter import (
    SWAP_AND_RECOMPUTE_GBPS,
    _drop_dropout_masks,
    _floor,
    _planned,
    _swapping,
    step_both,
)

FUSED_RTOL = 1e-3
"""Gradients of the fused step against eager's, relative to each tensor's norm (fp32): inductor
sums in other orders (the CNN's BatchNorm gradients differ by about 1e-4 on the CPU)."""


def assert_grads_close(model, ref, rtol, atol=1e-6):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad - q.grad).norm() <= rtol * q.grad.norm() + atol, name


def _op_by_op(gm, example_inputs, *, is_backward):
    """In place of inductor: the translated graph run by fx (its semantics, without codegen)."""
    def run(args):
        out = gm(*args)
        args.clear()
        return out
    return run


def _steps(w, ref, step, n=3, rtol=1e-6):
    """``n`` steps of ``step`` and of eager ``ref`` from the same RNG state; losses and
    gradients compared each step."""
    for i in range(n):
        for m in (w.model, ref.model):
            m.zero_grad(set_to_none=True)
        loss, ref_loss = step_both(step, w, ref)
        assert abs(loss.item() - ref_loss.item()) <= 10 * rtol * abs(ref_loss.item()), i
        assert_grads_close(w.model, ref.model, rtol)


def _fused_step(name, share, **kw):
    """``name``'s step planned `share` of the way from floor to peak, on inductor's kernels."""
    steps = []
    w, step, made = _planned(name, share, on_compiled=steps.append, kernels="inductor", **kw)
    return w, step, made, steps


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _only_ops(gm):
    """Every call is an aten/custom op, a higher-order op or a getitem: what inductor lowers."""
    return all(isinstance(t, (torch._ops.OpOverload, torch._ops.HigherOrderOperator))
               or t is operator.getitem for t in _targets(gm))


def test_swaps_batch_norm_and_dropout_replays_become_ops_inductor_keeps():
    """A plan that swaps and recomputes dropout's outputs (tiny BERT) and one that recomputes
    BatchNorm (CNN): the translated graphs call only ops; the swap calls are custom ops tied to
    what they wait for; the BatchNorm update and counters mutate the buffers (declared) and the
    graph returns the buffers; the random draws are torch's RNG ops."""
    mutwo, rng = torch.ops.mutwo, compat.rng_prims()
    w = make_workload("tiny-bert", 16, seq_len=32)
    with _swapping(w, SWAP_AND_RECOMPUTE_GBPS, _floor,
                   swap_host_ms=-float("inf")) as (step, made, graphs):
        step(*w.inputs).backward()
    fwd, bwd = codegen.for_inductor(graphs["fwd"]), codegen.for_inductor(graphs["bwd"])
    assert made["plan"].swapped and made["plan"].recomputed
    assert _only_ops(fwd) and _only_ops(bwd)
    f, b = _targets(fwd), _targets(bwd)
    assert torch.ops.aten.view.default not in f + b  # reshapes: a re-trace may lay values out anew
    assert torch.ops.aten.view.default in _targets(graphs["fwd"])
    n = f.count(mutwo.swap_out.default)
    assert n == len(made["plan"].swapped) and b.count(mutwo.swap_in.default) == n
    assert b.count(mutwo.swap_wait.default) == n and mutwo.swap_release.default in f
    # nothing replays dropout here: the plain random ops, drawn as inductor draws
    assert not {rng.run_and_save_rng_state, rng.run_with_rng_state} & {*f, *b}
    assert torch.ops.aten.native_dropout.default in f
    for release in fwd.graph.find_nodes(op="call_function", target=mutwo.swap_release.default):
        xs, hosts, _ = release.args
        assert [h.args[0] for h in hosts] == xs  # it waits for these copies: after them
    for wait in bwd.graph.find_nodes(op="call_function", target=mutwo.swap_wait.default):
        (back,) = [a for a in wait.args if isinstance(a, torch.fx.Node)]
        pos = {x: i for i, x in enumerate(bwd.graph.nodes)}
        readers = [u for u in back.users if u is not wait]
        assert readers and all(pos[u] > pos[wait] for u in readers)

    w = make_workload("cnn", 16)
    steps = []
    compile_with_plan(w.loss, w.model, lambda joint: _plan_at(joint, 0.0),
                      on_compiled=steps.append)(*w.inputs).backward()
    fwd = codegen.for_inductor(steps[0].forward_graph)
    assert _only_ops(fwd)
    assert _targets(fwd).count(mutwo.update_running_stats.default) == 1
    assert _targets(fwd).count(mutwo.increment_counters.default) == 1
    buffers = {p for p, r in zip(fwd.graph.find_nodes(op="placeholder"),
                                 steps[0].joint.primal_roles) if r.kind == "buffer"}
    returned = set(fwd.graph.output_node().args[0])
    assert buffers and buffers <= returned  # updated in place, handed back as themselves


def _plan_at(joint, share):
    with compat.real_tensor_mode():
        prof = profile_iteration(joint)
    floor = plan(prof, 1).predicted_peak_B
    return plan(prof, int(floor + share * (prof.peak_bytes - floor)))


def test_cudnn_batch_norm_becomes_the_native_one_inductor_fuses():
    """The cuDNN BatchNorm the graph passes pick on CUDA (no running statistics, a reserve
    space for backward) is translated to the native forward and backward, which inductor
    decomposes and fuses: same output and gradients as autograd's BatchNorm (run here on the
    CPU, where cuDNN's ops themselves cannot)."""
    aten = torch.ops.aten
    g = torch.fx.Graph()
    x, w, b, grad = (g.placeholder(n) for n in ("x", "w", "b", "grad"))
    bn = g.call_function(aten.cudnn_batch_norm.default, (x, w, b, None, None, True, 0.1, 1e-5))
    out, mean, invstd, reserve = (g.call_function(operator.getitem, (bn, i)) for i in range(4))
    back = g.call_function(aten.cudnn_batch_norm_backward.default,
                           (x, grad, w, None, None, mean, invstd, 1e-5, reserve))
    grads = [g.call_function(operator.getitem, (back, i)) for i in range(3)]
    g.output([out, reserve, *grads])
    new = codegen.for_inductor(torch.fx.GraphModule(torch.nn.Module(), g))
    targets = {n.target for n in new.graph.nodes if n.op == "call_function"}
    assert aten.cudnn_batch_norm.default not in targets
    assert aten.cudnn_batch_norm_backward.default not in targets
    assert {aten._native_batch_norm_legit.no_stats, aten.native_batch_norm_backward.default} \
        <= targets

    torch.manual_seed(0)
    xs = torch.randn(4, 3, 5, 5, requires_grad=True)
    ws, bs = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    dy = torch.randn(4, 3, 5, 5)
    y, r, dx, dw, db = new(xs.detach(), ws.detach(), bs.detach(), dy)
    ref = torch.nn.functional.batch_norm(xs, None, None, ws, bs, training=True, eps=1e-5)
    ref.backward(dy)
    assert r.numel() == 0
    for a, e in ((y, ref), (dx, xs.grad), (dw, ws.grad), (db, bs.grad)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("name", ["cnn", "tiny-bert"])
def test_translated_graphs_compute_what_eager_computes(name):
    """The translated graphs, run op by op in place of inductor's code: the same losses,
    gradients and BatchNorm statistics as eager, with recomputation and dropout replays."""
    with mock.patch.object(compat, "inductor_compile", _op_by_op):
        w, step, made, steps = _fused_step(name, 0.2)
        ref = make_workload(name, 16, seq_len=32)
        _steps(w, ref, step)
    assert made["plan"].recomputed and steps[0].fused
    for b, r in zip(w.model.buffers(), ref.model.buffers()):
        torch.testing.assert_close(b, r, rtol=1e-6, atol=1e-7)


def test_recomputed_dropout_replays_its_draws_translated():
    """Dropout's masks dropped and rebuilt in backward: torch's ``run_with_rng_state`` replays
    the state ``run_and_save_rng_state`` saved, so the gradients are eager's."""
    w, ref = make_workload("tiny-bert", 16, seq_len=32), make_workload("tiny-bert", 16, seq_len=32)
    made, steps = {}, []
    with mock.patch.object(compat, "inductor_compile", _op_by_op):
        step = compile_with_plan(w.loss, w.model, _drop_dropout_masks(made),
                                 on_compiled=steps.append, kernels="inductor")
        _steps(w, ref, step, n=2)
    fwd, bwd = (codegen.for_inductor(g) for g in (steps[0]._fwd, steps[0]._bwd))
    rng = compat.rng_prims()
    assert rng.run_and_save_rng_state in _targets(fwd) and rng.run_with_rng_state in _targets(bwd)


def test_a_swapping_plan_runs_translated():
    """Swaps (host copies on the CPU) through the custom ops: the same as eager, and the host
    buffers are reused from step to step as the op-by-op step reuses them."""
    w, ref = make_workload("tiny-bert", 16, seq_len=32), make_workload("tiny-bert", 16, seq_len=32)
    with mock.patch.object(compat, "inductor_compile", _op_by_op):
        with _swapping(w, SWAP_AND_RECOMPUTE_GBPS, _floor, swap_host_ms=-float("inf"),
                       kernels="inductor") as (step, made, graphs):
            _steps(w, ref, step, n=1)
        _steps(w, ref, step, n=2)
    ids = graphs["fwd"].swap_slots.ids
    assert made["plan"].swapped
    assert all(len(swapping._SLOTS[i].free) == 1 for i in ids)  # one buffer each, reused


def test_the_fused_step_runs_inductor_kernels_and_matches_eager():
    """The CNN (BatchNorm recomputed, statistics updated in place) compiled by inductor for
    real: same losses and gradients within FUSED_RTOL, statistics within float tolerance; the
    compiled code (not the fx graph) runs, and a new plan compiles again at its next call."""
    w, step, made, steps = _fused_step("cnn", 0.0)
    ref = make_workload("cnn", 16)
    _steps(w, ref, step, n=2, rtol=FUSED_RTOL)
    (planned,) = steps
    assert made["plan"].recomputed and planned.fused and planned.compile_s > 0
    assert planned.on_inductor
    fwd = planned._run_fwd
    assert isinstance(fwd, codegen.InductorGraph) and not isinstance(fwd._run, torch.fx.GraphModule)
    for (name, b), r in zip(w.model.named_buffers(), ref.model.buffers()):
        torch.testing.assert_close(b, r, rtol=1e-4, atol=1e-5, msg=name)
    planned.use(plan(made["profile"], 10**12))  # nothing recomputed
    assert planned.compile_s == 0
    _steps(w, ref, step, n=1, rtol=FUSED_RTOL)
    assert planned.compile_s > 0


def test_graphs_of_dynamic_sizes_stay_op_by_op():
    """A step traced with dynamic sizes runs its partition op by op (inductor would specialize
    it to the first sizes it sees), and still runs."""
    w = make_workload("mlp", 16)
    steps = []
    step = compile_with_plan(w.loss, w.model, lambda joint: _plan_at(joint, 0.0), dynamic=True,
                             on_compiled=steps.append, kernels="inductor")
    x, y = w.inputs
    compat.mark_dims_dynamic(x, [0])
    for n in (16, 12):
        step(x[:n], y[:n]).backward()
    dynamic = [s for s in steps if codegen.has_symbolic_sizes(s.joint.gm)]
    assert dynamic and not any(s.fused for s in dynamic)


def test_kernels_is_validated():
    from lightning_ac import MuTwoAC, auto_checkpoint

    with pytest.raises(MisconfigurationException, match="kernels='triton'"):
        MuTwoAC(kernels="triton")
    with pytest.raises(MisconfigurationException, match="kernels=None"):
        auto_checkpoint(make_workload("mlp", 4).model, kernels=None)
    with pytest.raises(ValueError, match="kernels"):
        rewriter.PlannedStep(None, None, kernels="fused")


def test_a_forward_inductor_cannot_compile_runs_op_by_op_with_its_backward_and_a_warning():
    calls = []

    def refuse(gm, example_inputs, *, is_backward):
        calls.append(is_backward)
        raise RuntimeError("no lowering for this op")

    with mock.patch.object(compat, "inductor_compile", refuse), \
            pytest.warns(UserWarning, match="inductor could not compile the planned forward "
                                            r"\(RuntimeError: no lowering for this op\)"):
        w, step, made, steps = _fused_step("mlp", 0.0)
        _steps(w, make_workload("mlp", 16, seq_len=32), step, n=2)
    assert calls == [False]  # the backward was not tried: it runs op by op with its forward
    assert not steps[0]._run_fwd.compiled and not steps[0]._run_bwd.compiled
    assert steps[0].fused and not steps[0].on_inductor


def test_a_backward_inductor_cannot_compile_after_its_forward_did_raises():
    """The saved values of a compiled forward are not an op-by-op backward's (cuDNN BatchNorm):
    no silent mix."""
    def backward_refused(gm, example_inputs, *, is_backward):
        if is_backward:
            raise RuntimeError("no lowering for this op")
        return _op_by_op(gm, example_inputs, is_backward=is_backward)

    with mock.patch.object(compat, "inductor_compile", backward_refused):
        w, step, made, steps = _fused_step("mlp", 0.0)
        loss = step(*w.inputs)
        with pytest.raises(RuntimeError, match="compiled the planned forward but not its "
                                               "backward .*kernels=\"eager\""):
            loss.backward()


def test_a_fused_step_with_swaps_and_dropout_matches_eager_with_eager_draws():
    """Tiny BERT compiled for real, with a plan that swaps and recomputes: with inductor's
    ``fallback_random`` (eager's random kernels) the losses and gradients are eager's within
    FUSED_RTOL; without it inductor draws its own dropout masks (as torch.compile does)."""
    from torch._inductor import config

    w, ref = make_workload("tiny-bert", 16, seq_len=32), make_workload("tiny-bert", 16, seq_len=32)
    with config.patch(fallback_random=True):
        with _swapping(w, SWAP_AND_RECOMPUTE_GBPS, _floor, swap_host_ms=-float("inf"),
                       kernels="inductor") as (step, made, graphs):
            _steps(w, ref, step, n=1, rtol=FUSED_RTOL)
        _steps(w, ref, step, n=1, rtol=FUSED_RTOL)
    assert made["plan"].swapped and made["plan"].recomputed


def test_dropout_nothing_replays_is_drawn_by_inductor():
    """Dropout whose draws backward does not replay is left to inductor (drawn as torch.compile
    draws, in its own kernels): the forward compiles, and the step trains on other masks than
    eager's (the loss near eager's, not equal)."""
    w, step, made, steps = _fused_step("tiny-bert", 1.0)  # at the peak: nothing recomputed
    ref = make_workload("tiny-bert", 16, seq_len=32)
    loss = step(*w.inputs)
    loss.backward()
    ref_loss = ref.loss(*ref.inputs)
    assert steps[0]._run_fwd.compiled and steps[0]._run_bwd.compiled
    assert loss.item() != ref_loss.item() and abs(loss.item() - ref_loss.item()) < 0.1 * ref_loss.item()
    assert all(torch.isfinite(p.grad).all() for p in w.model.parameters() if p.grad is not None)


def test_auto_checkpoint_plans_fused_steps_by_fused_costs():
    """kernels="inductor" plans with fused_costs and free recomputation first: more recomputed
    than the op-by-op plan at the same budget, at no predicted cost, and the same gradients."""
    from lightning_ac import auto_checkpoint

    plans = {}
    for kernels in ("eager", "inductor"):
        w, ref = (make_workload("tiny-bert", 16, seq_len=32) for _ in range(2))
        ac = auto_checkpoint(w.loss, module=w.model, kernels=kernels, always_rewrite=True,
                             budget=lambda prof: int(prof.peak_bytes * 0.9))  # (below both peaks)
        with mock.patch.object(compat, "inductor_compile", _op_by_op):
            _steps(w, ref, ac, n=2)
        plans[kernels] = ac.plan
    eager, fused = plans["eager"], plans["inductor"]
    assert len(fused.recomputed) > len(eager.recomputed)
    assert sum(s["marginal_ms"] == 0.0 for s in fused.steps) >= 5
    assert fused.predicted_extra_ms <= eager.predicted_extra_ms


@pytest.mark.parametrize("kernels,cuda,warmed", [("inductor", True, True),
                                                 ("inductor", False, False),
                                                 ("eager", True, False)])
def test_a_new_shape_on_fused_gpu_kernels_starts_inductors_compile_workers_first(
        kernels, cuda, warmed):
    """Before the capture and profile of a new shape, fused kernels on the GPU start inductor's
    kernel-compiling processes (as torch.compile's backend does when created), so that the
    planned graphs compile in parallel; not on the CPU, nor for eager kernels."""
    from lightning_ac import auto_checkpoint

    w = make_workload("mlp", 4)
    ac = auto_checkpoint(w.loss, module=w.model, kernels=kernels, budget="1GB")
    x = mock.Mock(spec=torch.Tensor, is_cuda=cuda)
    with mock.patch.object(compat, "warm_inductor_workers") as warm, \
            mock.patch("lightning_ac.install.input_tensors", return_value=[x]):
        ac._warm_compilers((x,), {})
    assert warm.called == warmed
