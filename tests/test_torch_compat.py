"""Pin the private torch behaviour that lightning_ac._torch_compat relies on."""

import contextlib

import pytest
import torch
import torch.fx as fx
from torch import nn

from lightning_ac import _torch_compat as compat
from lightning_ac.capture import capture_joint


def _mlp_joint():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    return model, x, capture_joint(lambda x: model(x).sum(), (x,), model)


def test_backward_nodes_are_tagged():
    _, _, joint = _mlp_joint()
    tags = {compat.is_backward_node(n) for n in joint.graph.nodes if n.op == "call_function"}
    assert tags == {True, False}
    assert all(compat.is_backward_node(t) for t in joint.tangents)


def test_extract_fwd_bwd_with_a_chosen_saved_set_matches_eager():
    model, x, joint = _mlp_joint()
    fwd_nodes = [n for n in joint.graph.nodes if n.op == "call_function"
                 and not compat.is_backward_node(n)]
    # Save only the first layer's pre-activation: backward must recompute the ReLU from it.
    (addmm,) = [n for n in fwd_nodes if n.target == torch.ops.aten.addmm.default][:1]
    saved = [addmm] + [p for p in joint.primals]
    fwd, bwd = compat.extract_fwd_bwd(joint.gm, saved, joint.num_fwd_outputs)
    assert isinstance(fwd, fx.GraphModule) and isinstance(bwd, fx.GraphModule)
    bwd_ops = {n.target for n in bwd.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.relu.default in bwd_ops  # recomputed in backward
    with torch.no_grad():
        outs = fwd(*joint.primal_values)
    grads = bwd(*outs[joint.num_fwd_outputs:], torch.ones(()))
    model.zero_grad()
    model(x).sum().backward()
    ref = [model[0].weight.grad, model[0].bias.grad, model[2].weight.grad, model[2].bias.grad]
    got = [g for g in grads if g is not None]
    assert len(got) == 4
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)


def test_boxed_calling_convention_consumes_its_argument_list():
    gm = fx.symbolic_trace(lambda a, b: a * b + a)
    compat.use_boxed_calling_convention(gm)
    args = [torch.ones(2), torch.full((2,), 3.0)]
    out = gm(args)
    torch.testing.assert_close(out, torch.full((2,), 4.0))
    assert args == []  # boxed graphs clear the list so that each input can be freed at last use


def test_active_ddp_module_is_the_ddp_whose_forward_runs(tmp_path):
    import torch.distributed as dist
    from torch import nn

    seen = []

    class Probe(nn.Linear):
        def forward(self, x):
            seen.append(compat.active_ddp_module())
            return super().forward(x)

    assert compat.active_ddp_module() is None
    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"file://{tmp_path / 'store'}")
    try:
        ddp = nn.parallel.DistributedDataParallel(Probe(4, 4))
        ddp(torch.randn(2, 4))
    finally:
        dist.destroy_process_group()
    assert seen == [ddp] and compat.active_ddp_module() is None


def test_one_rank_ddp_turns_dynamos_ddp_optimizer_off_inside_the_context_only(tmp_path):
    """Inside the forward of a one-rank DDP (or given such a module), dynamo's DDP optimizer
    is off within the context and back as it was after; elsewhere it is left alone."""
    import torch.distributed as dist
    from torch import nn

    seen = []

    class Probe(nn.Linear):
        def forward(self, x):
            with compat.one_graph_under_one_rank_ddp():
                seen.append(torch._dynamo.config.optimize_ddp)
            return super().forward(x)

    before = torch._dynamo.config.optimize_ddp
    with compat.one_graph_under_one_rank_ddp(nn.Linear(2, 2)):  # no DDP: untouched
        assert torch._dynamo.config.optimize_ddp == before
    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"file://{tmp_path / 'store'}")
    try:
        ddp = nn.parallel.DistributedDataParallel(Probe(4, 4))
        ddp(torch.randn(2, 4))
        with compat.one_graph_under_one_rank_ddp(ddp):
            seen.append(torch._dynamo.config.optimize_ddp)
    finally:
        dist.destroy_process_group()
    assert seen == [False, False] and torch._dynamo.config.optimize_ddp == before


def test_backward_keeps_graph_says_whether_retain_graph_was_asked():
    seen = []
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: seen.append(compat.backward_keeps_graph()))
    y.sum().backward(retain_graph=True)
    y.sum().backward()
    assert seen == [True, False]


def test_saved_tensors_hooks_in_effect_are_the_innermost_pair():
    def pack(t):
        return t

    def unpack(t):
        return t

    assert compat.saved_tensors_hooks_in_effect() is None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            assert compat.saved_tensors_hooks_in_effect() == (pack, unpack)
    assert compat.saved_tensors_hooks_in_effect() is None


def test_real_tensor_mode_is_a_context_manager():
    with compat.real_tensor_mode():
        assert torch.ones(2).sum().item() == 2.0


def test_as_fake_makes_a_fake_tensor_of_the_graphs_mode():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        like = torch.empty(3)
    fake = compat.as_fake(torch.arange(4, dtype=torch.uint8), like)
    assert isinstance(fake, FakeTensor) and fake.fake_mode is mode
    assert fake.shape == (4,) and fake.dtype == torch.uint8
    real = torch.ones(2)
    assert compat.as_fake(real, torch.zeros(1)) is real  # outside a fake mode: unchanged


@pytest.mark.gpu
def test_device_memory_trace_sees_an_allocation_and_its_free():
    with compat.device_memory_trace("cuda") as events:
        x = torch.empty(4 << 20, dtype=torch.uint8, device="cuda")
        del x
    sizes = [b for _, b in events]
    assert 4 << 20 in sizes and -(4 << 20) in sizes
    assert [t for t, _ in events] == sorted(t for t, _ in events)


def test_current_cuda_stream_id_is_there():
    assert callable(torch._C._cuda_getCurrentStream)  # (CPU builds have it too)


@pytest.mark.gpu
def test_current_cuda_stream_id_names_the_current_stream_and_device():
    side = torch.cuda.Stream()
    assert compat.current_cuda_stream_id() == (torch.cuda.current_stream().stream_id,
                                               torch.cuda.current_device())
    with torch.cuda.stream(side):
        assert compat.current_cuda_stream_id(torch.cuda.current_device())[0] == side.stream_id
    assert compat.current_cuda_stream_id()[0] != side.stream_id


def _dynamic_joint():
    """The joint graph of a function traced with its input's dim 1 marked dynamic."""
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(2, 5, 8)
    compat.mark_dims_dynamic(x, [1])
    return capture_joint(lambda x: (x @ w).relu().sum(), [x])


def test_a_marked_dimension_is_traced_as_a_size_symbol_and_evaluated_at_bindings():
    joint = _dynamic_joint()
    (x,) = [p for p in joint.primals if p.meta["val"].dim() == 3]
    val = x.meta["val"]
    sym = compat.size_symbol(val.shape[1])
    assert sym is not None and compat.size_symbol(val.shape[0]) is None  # 2: specialized
    assert joint.sizes and joint.bindings == {sym: 5}
    assert compat.concrete(val.shape[1], {sym: 7}) == 7
    meta = compat.concrete(val, {sym: 7})
    assert meta.device.type == "meta" and tuple(meta.shape) == (2, 7, 8) and meta.dtype == val.dtype
    with pytest.raises(KeyError):
        compat.concrete(val.shape[1], {})


def test_forward_sym_nodes_are_the_sizes_backward_may_read():
    from torch.fx.experimental.proxy_tensor import is_sym_node

    joint = _dynamic_joint()
    nodes = compat.forward_sym_nodes(joint.gm)
    assert nodes and all(is_sym_node(n) and not compat.is_backward_node(n) for n in nodes)


def test_as_fake_keeps_the_real_sizes_under_dynamic_shapes():
    joint = _dynamic_joint()
    like = joint.primals[-1].meta["val"]
    fake = compat.as_fake(torch.zeros(3, 4), like)
    assert tuple(fake.shape) == (3, 4) and all(isinstance(s, int) for s in fake.shape)


def test_dims_marked_dynamic_for_a_call_only_leaving_the_tensors_as_they_were():
    x = torch.randn(2, 5, 8)
    with compat.dims_marked_dynamic([(x, 1)]):
        assert capture_joint(lambda x: (x * w_static).sum(), [x]).dynamic
    assert not hasattr(x, "_dynamo_weak_dynamic_indices")
    assert not hasattr(x, "_has_dynamo_dim_marking")
    assert not capture_joint(lambda x: (x * w_static).sum(), [x]).dynamic
    # a mark of the user's own stays
    y = torch.randn(2, 5, 8)
    torch._dynamo.maybe_mark_dynamic(y, 0)
    with compat.dims_marked_dynamic([(y, 1)]):
        assert y._dynamo_weak_dynamic_indices == {0, 1}
    assert y._dynamo_weak_dynamic_indices == {0} and y._has_dynamo_dim_marking


w_static = torch.randn(8, requires_grad=True)


def test_graph_signature_is_the_same_for_the_same_graph_and_differs_with_the_inputs():
    from torch import nn

    signatures = []

    def backend(gm, _inputs):
        signatures.append(compat.graph_signature(gm))
        return gm.forward

    lin = nn.Linear(4, 4)
    step = torch.compile(lambda x: lin(x).relu(), backend=backend, dynamic=False)
    step(torch.randn(2, 4))
    step(torch.randn(3, 4))  # another batch size: another graph input
    torch.compile(lambda x: lin(x).relu(), backend=backend, dynamic=False)(torch.randn(2, 4))
    torch.compile(lambda x: lin(x).tanh(), backend=backend, dynamic=False)(torch.randn(2, 4))
    assert signatures[0] == signatures[2]
    assert len({signatures[0], signatures[1], signatures[3]}) == 3


def test_rng_prims_save_the_state_they_drew_from_and_replay_it():
    rng = compat.rng_prims()
    x = torch.ones(1000)
    state, (out, mask) = rng.run_and_save_rng_state(torch.ops.aten.native_dropout.default, x,
                                                     0.5, True)
    after = torch.get_rng_state()
    again, mask2 = rng.run_with_rng_state(state, torch.ops.aten.native_dropout.default, x, 0.5,
                                          True)
    assert torch.equal(mask, mask2) and torch.equal(out, again)
    assert torch.equal(torch.get_rng_state(), after)  # the replay leaves the generator alone


def test_inductor_compile_compiles_an_aten_graph_boxed_with_a_mutating_custom_op():
    """An aten graph whose custom op mutates an input (declared) and returns nothing: inductor
    keeps the op, computes the rest, and the result takes its inputs as a list it empties."""
    from lightning_ac import codegen  # noqa: F401  (defines the mutwo ops)

    aten = torch.ops.aten
    g = fx.Graph()
    x, counter = g.placeholder("x"), g.placeholder("counter")
    y = g.call_function(aten.relu.default, (g.call_function(aten.mul.Tensor, (x, 2.0)),))
    g.call_function(torch.ops.mutwo.increment_counters.default, ([counter],))
    g.output([y, counter])
    gm = fx.GraphModule({}, g)
    inputs = [torch.randn(8), torch.zeros((), dtype=torch.int64)]
    run = compat.inductor_compile(gm, list(inputs), is_backward=False)
    args = [inputs[0], inputs[1]]
    y_out, c_out = run(args)
    assert args == []
    torch.testing.assert_close(y_out, inputs[0].mul(2).relu())
    assert int(inputs[1]) == 1 and int(c_out) == 1  # incremented in place, once


def _dropout_graph():
    """A decomposed aten graph with a dropout, as inductor_compile hands it on."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w):
        return torch.ops.aten.native_dropout.default(x @ w, 0.5, True)[0].sum()

    return make_fx(f, decomposition_table=select_decomp_table(), tracing_mode="fake")(
        torch.randn(8, 16), torch.randn(16, 4))


@pytest.mark.parametrize("passes_fail", [False, True])
def test_inductor_graph_passes_make_random_ops_inductors_or_fall_back_to_that_alone(passes_fail):
    from unittest import mock

    from torch._inductor.fx_passes import joint_graph

    gm = _dropout_graph()
    assert not any("inductor_random" in str(n.target) for n in gm.graph.nodes)

    def fail(graph, *a, **k):
        raise RuntimeError("a pass failed")

    with mock.patch.object(joint_graph, "joint_graph_passes", fail) if passes_fail \
            else contextlib.nullcontext():
        out = compat.inductor_graph_passes(gm)
    assert (out is gm) == passes_fail  # on a copy, kept only if the passes went through
    targets = [str(n.target) for n in out.graph.nodes]
    assert any("inductor_random" in t or "inductor_seed" in t for t in targets), targets
    assert not any(t.startswith("aten.native_dropout") for t in targets)


def test_inductor_compile_asks_inductor_for_every_output_at_its_traced_strides():
    """A saved value must reach the other graph laid out as traced (a channels-last one made
    ConvNeXt's backward fail, CPU coverage run): every tensor output is marked as torch.compile
    marks a module's own outputs, with its traced strides."""
    from unittest import mock

    from torch._inductor import compile_fx
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x):
        return [torch.ops.aten.permute.default(x * 2, [1, 0]) + 1, x.sum()]

    x = torch.randn(64, 32)
    gm = make_fx(f, tracing_mode="fake")(x)
    seen = {}

    def capture(graph, inputs, **kw):
        seen["meta"] = dict(graph.graph.output_node().meta)
        return lambda args: f(*args)

    with mock.patch.object(compile_fx, "compile_fx_inner", capture):
        compat.inductor_compile(gm, [x], is_backward=False)
    assert seen["meta"]["user_visible_output_idxs"] == [0, 1]
    assert seen["meta"]["original_output_strides"] == [(1, 32), ()]


def test_inductor_compile_uses_inductors_fx_graph_cache():
    """The same graph compiled twice: the second compile is a hit of inductor's FX graph cache
    (compiled under a tracing context with the graph's fake mode; without one, inductor
    bypasses the cache for want of a shape environment), and both results compute the same."""
    from torch._dynamo.utils import counters
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w):
        return [torch.relu(x @ w) * 3 - 1, (x @ w).sum()]

    x, w = torch.randn(16, 8), torch.randn(8, 4)
    before = dict(counters["inductor"])
    runs = [compat.inductor_compile(make_fx(f, tracing_mode="fake")(x, w), [x, w],
                                    is_backward=False) for _ in range(2)]
    after = counters["inductor"]
    assert after["fxgraph_cache_bypass"] == before.get("fxgraph_cache_bypass", 0)
    assert after["fxgraph_cache_hit"] >= before.get("fxgraph_cache_hit", 0) + 1
    for run in runs:
        out = run([x, w])
        torch.testing.assert_close(out[0], torch.relu(x @ w) * 3 - 1)


def test_warm_inductor_workers_starts_torch_compiles_worker_pool():
    """It calls what torch.compile's inductor backend calls when created (maybe_warm_pool)."""
    from unittest import mock

    from torch._inductor import async_compile

    with mock.patch.object(async_compile, "maybe_warm_pool") as warm:
        compat.warm_inductor_workers()
    warm.assert_called_once_with()


def test_storage_id_names_the_storage_not_the_address():
    """Views share their storage's id, and keep it when the storage is freed in place (FSDP's
    reshard); another tensor's storage has another id."""
    a = torch.zeros(1024)
    view = a[16:]
    before = compat.storage_id(a)
    assert compat.storage_id(view) == before
    a.untyped_storage().resize_(0)
    assert compat.storage_id(view) == before and view.untyped_storage().nbytes() == 0
    assert compat.storage_id(torch.zeros(1024)) != before
