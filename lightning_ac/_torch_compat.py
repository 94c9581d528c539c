"""Every private PyTorch API this package touches, in one place.

The capture → profile → plan → rewrite pipeline leans on AOTAutograd internals that are not
public and that changed between the torch versions we support (2.11 … 2.14). Nothing outside
this module imports ``torch._*``; ``tests/test_torch_compat.py`` pins the behaviour each function
relies on, so a torch upgrade that breaks one fails there first, with a clear name.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import operator
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.fx as fx

log = logging.getLogger(__name__)

__all__ = [
    "aot_backend",
    "as_fake",
    "concrete",
    "dims_marked_dynamic",
    "forward_sym_nodes",
    "graph_signature",
    "mark_dims_dynamic",
    "size_symbol",
    "batch_norm_backend",
    "cudnn_batch_norm_reserve_bytes",
    "current_cuda_stream_id",
    "device_memory_trace",
    "eliminate_common_subexpressions",
    "extract_fwd_bwd",
    "fuses_into_neighbours",
    "gpu_spin",
    "inductor_compile",
    "inductor_graph_passes",
    "is_backward_node",
    "real_tensor_mode",
    "reorder_backward",
    "rng_prims",
    "storage_id",
    "use_boxed_calling_convention",
    "warm_inductor_workers",
]


def aot_backend(
    partition_fn: Callable[..., tuple[fx.GraphModule, fx.GraphModule]],
    fw_compiler: Callable,
    bw_compiler: Callable,
) -> Callable:
    """Return a dynamo backend that hands the aten-level joint graph to ``partition_fn``.

    ``partition_fn(joint_module, joint_inputs, *, num_fwd_outputs, **kw)`` sees the joint
    forward+backward graph with FakeTensors in ``node.meta['val']``; placeholders are the primals
    (in the order of the dynamo graph's example inputs), then the tangents.
    """
    from torch._dynamo.backends.common import aot_autograd

    return aot_autograd(fw_compiler=fw_compiler, bw_compiler=bw_compiler, partition_fn=partition_fn)


def active_ddp_module() -> torch.nn.Module | None:
    """The ``DistributedDataParallel`` module whose forward is running, where dynamo's DDP
    optimizer is on (it then cuts what it compiles there at DDP's gradient buckets), else
    None."""
    from torch.nn.parallel import DistributedDataParallel

    if not torch._dynamo.config.optimize_ddp:
        return None
    return DistributedDataParallel._get_active_ddp_module()


@contextlib.contextmanager
def one_graph_under_one_rank_ddp(module: torch.nn.Module | None = None) -> Iterator[None]:
    """Inside the forward of a ``DistributedDataParallel`` whose process group has one rank (or
    calling ``module``, such a DDP module), dynamo's DDP optimizer off for what compiles in the
    context. It cuts the step at gradient buckets so that each bucket's all-reduce can run
    under the rest of backward; with one rank
    there is nothing to overlap, and the cuts only split what the planner sees (BERT-base under
    Lightning's DDP on one H200: the plan's floor rose from within a 7.45 GiB budget to 8.00 GiB).
    Scoped to our own compilation: the user's settings and compiled functions are untouched."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = active_ddp_module() or (module if isinstance(module, DistributedDataParallel) else None)
    if ddp is None or torch.distributed.get_world_size(ddp.process_group) > 1:
        yield
        return
    with torch._dynamo.config.patch(optimize_ddp=False):
        yield


def backward_keeps_graph() -> bool:
    """Inside a backward: whether it was asked to keep the graph (``retain_graph=True``, or
    ``create_graph``), so that what it reads must stay for another backward (AOTAutograd's own
    runtime asks the same). True outside a backward."""
    return torch._C._autograd._get_current_graph_task_keep_graph()


def saved_tensors_hooks_in_effect() -> tuple[Callable, Callable] | None:
    """The ``(pack, unpack)`` pair of the innermost ``torch.autograd.graph.saved_tensors_hooks``
    in effect, or None: for values kept for backward outside autograd's own saving (as
    ``torch.utils.checkpoint`` reads them)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


@contextlib.contextmanager
def real_tensor_mode() -> Iterator[None]:
    """Leave the FakeTensor mode that AOTAutograd runs partitioners under, so real tensors run."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield


def as_fake(real: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``real`` as a FakeTensor of the fake mode ``like`` belongs to (for a new node's
    ``meta['val']``: AOTAutograd counts saved tensors by their fake values), with ``real``'s
    sizes (under dynamic shapes the mode would otherwise give each size a new symbol)."""
    mode = getattr(like, "fake_mode", None)
    return real if mode is None else mode.from_tensor(real, static_shapes=True)


def batch_norm_backend(input: torch.Tensor, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, running_mean: torch.Tensor | None,
                       running_var: torch.Tensor | None, eps: float) -> str:
    """``"cudnn"``, ``"native"`` or ``"miopen"``: the kernels eager's training BatchNorm picks
    for these tensors (fake ones work: only their metadata is read)."""
    backend = torch._C._select_batch_norm_backend(input, weight, bias, running_mean, running_var,
                                                  True, eps)
    return backend.name.lower()


def cudnn_batch_norm_reserve_bytes(input: torch.Tensor) -> int:
    """Bytes of the reserve space cuDNN's training BatchNorm hands from forward to backward."""
    return int(torch._C._get_cudnn_batch_norm_reserve_space_size(input, True))


def is_backward_node(node: fx.Node) -> bool:
    """True for joint-graph nodes that AOTAutograd tagged as belonging to the backward pass."""
    return node.meta.get("partitioner_tag") == "is_backward"


def extract_fwd_bwd(
    joint: fx.GraphModule, saved_values: Sequence[fx.Node], num_fwd_outputs: int
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split ``joint`` into forward and backward modules that pass exactly ``saved_values``.

    Backward recomputes every value it needs that is not saved, from saved values and primals.
    Keyword arguments only: the signature grew extra parameters between torch 2.11 and 2.14.
    """
    from torch._functorch import partitioners

    return partitioners._extract_fwd_bwd_modules(
        joint,
        saved_values=list(saved_values),
        saved_sym_nodes=forward_sym_nodes(joint),
        num_fwd_outputs=num_fwd_outputs,
    )


def forward_sym_nodes(joint: fx.GraphModule) -> list[fx.Node]:
    """The forward's nodes whose value is a size (a ``SymInt``: a graph traced with dynamic
    shapes), which backward may read: saved beside the tensors, as AOTAutograd's own
    partitioner does (those backward does not read are dropped by the extraction)."""
    from torch.fx.experimental.proxy_tensor import is_sym_node

    return [n for n in joint.graph.nodes if n.op != "output" and not is_backward_node(n)
            and is_sym_node(n)]


def mark_dims_dynamic(t: torch.Tensor, dims: Sequence[int]) -> None:
    """Ask dynamo to trace dimensions ``dims`` of input ``t`` as sizes that vary (one graph for
    every length), where it can: a dimension it must specialize (a size of 0 or 1, or one the
    code branches on) stays static, without an error."""
    for d in dims:
        torch._dynamo.maybe_mark_dynamic(t, d)


_DIM_MARKS = ("_dynamo_weak_dynamic_indices", "_has_dynamo_dim_marking")
"""The attributes :func:`torch._dynamo.maybe_mark_dynamic` sets on a tensor."""


@contextlib.contextmanager
def dims_marked_dynamic(marks: Sequence[tuple[torch.Tensor, int]]) -> Iterator[None]:
    """:func:`mark_dims_dynamic` for ``(tensor, dim)`` pairs for the duration of a call, then the
    tensors' marks as they were.

    Marks matter only when dynamo compiles: a graph compiled with a dimension marked runs a call
    without the mark, but a graph compiled without marks recompiles for a tensor that has one.
    Left on the caller's tensors, they would make dynamo compile again another plan of ours (a
    static one, for the same tensors) or the user's own compiled functions."""
    saved = {id(t): (t, {a: copy.copy(getattr(t, a)) for a in _DIM_MARKS if hasattr(t, a)})
             for t, _ in marks}  # (copies: marking adds to the set in place)
    for t, d in marks:
        mark_dims_dynamic(t, [d])
    try:
        yield
    finally:
        for t, attrs in saved.values():
            for a in _DIM_MARKS:
                if a in attrs:
                    setattr(t, a, attrs[a])
                elif hasattr(t, a):
                    delattr(t, a)


def size_symbol(size) -> object | None:
    """The symbol a traced size stands for (``s0`` for a dynamic length), or None where the size
    is a plain int or an expression of several symbols."""
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return expr if getattr(expr, "is_Symbol", False) else None
    return None


def concrete(value, bindings: dict):
    """``value`` with every traced size replaced by its value under ``bindings`` (symbol → int):
    an int for a ``SymInt``, a meta tensor of the same dtype, sizes and strides for a
    FakeTensor with dynamic sizes, tuples and lists element-wise; anything else as it is.

    Raises:
        KeyError: a size depends on a symbol ``bindings`` does not give.
    """
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        if getattr(expr, "is_Symbol", False) and expr in bindings:  # (most sizes: fast)
            return int(bindings[expr])
        if not isinstance(expr, int):
            expr = expr.xreplace(bindings)  # (a plain int where the expression was one symbol)
        if not isinstance(expr, int) and not expr.is_number:
            raise KeyError(f"no value for {sorted(map(str, expr.free_symbols))} in {value}")
        return int(expr)
    if isinstance(value, torch.Tensor):
        if not any(isinstance(x, torch.SymInt) for x in (*value.shape, *value.stride())):
            return value
        return torch.empty_strided([concrete(x, bindings) for x in value.shape],
                                   [concrete(x, bindings) for x in value.stride()],
                                   dtype=value.dtype, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(concrete(v, bindings) for v in value)
    return value


_SAME_BY_NAME = {"", "torch", "operator", "_operator", "builtins", "math"}
"""Modules whose functions a graph calls that are the same function wherever they have the same
name."""


def graph_signature(gm: fx.GraphModule) -> str:
    """A key that two graphs dynamo hands a backend share only when they compile to the same
    step: each node's op, target and arguments (nodes by position: names depend on the path
    dynamo took to a parameter, ``self._modules`` or ``self.__dict__``), each input's kind,
    dtype, device, sizes and strides (as dynamo traced them, in ``meta["example_value"]``), and
    each attribute read, by identity. Size symbols are named by order of appearance, since each
    trace numbers its own."""
    import re

    index = {node: i for i, node in enumerate(gm.graph.nodes)}
    parts = []
    for node in gm.graph.nodes:
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        target = node.target
        if node.op == "placeholder":
            v = node.meta.get("example_value")
            target = (f"{type(v).__name__} {v.dtype} {v.device} {tuple(v.shape)} {v.stride()} "
                      f"{v.requires_grad}" if isinstance(v, torch.Tensor)
                      else f"{type(v).__name__} {v}")
        elif node.op == "get_attr":
            obj = gm
            for name in str(node.target).split("."):
                obj = getattr(obj, name)
            target = f"attribute {id(obj)}"
        elif callable(target):
            module = getattr(target, "__module__", None) or ""
            # (a function of the user's, by identity: two of one name can differ, closures)
            target = f"{module}.{getattr(target, '__qualname__', target)}" if \
                module.split(".")[0] in _SAME_BY_NAME else f"function {id(target)}"
        parts.append(f"{node.op} {target} {args}")
    names: dict[str, str] = {}
    return re.sub(r"\b[su]\d+\b", lambda m: names.setdefault(m.group(), f"sym{len(names)}"),
                  "\n".join(parts))


def use_boxed_calling_convention(gm: fx.GraphModule) -> fx.GraphModule:
    """Recompile ``gm`` to take its arguments as one list that it empties as it goes.

    AOTAutograd calls compiled graphs "boxed": the runtime hands over the list of saved
    tensors, and a boxed graph drops each one at its last use. With plain calling, every saved
    activation stays alive until backward returns (1.5 GiB more on ResNet-152 b128, H100: docs/design.md).
    """
    gm.graph.set_codegen(torch.fx.graph._BoxedCodeGen())
    gm.recompile()
    return gm


def eliminate_common_subexpressions(gm: fx.GraphModule) -> fx.GraphModule:
    """Merge nodes that compute the same op on the same inputs (random ops excepted), in place.

    AOTAutograd's own partitioners run this pass before they split the joint graph; ours needs
    it too, or values traced once per layer (BERT's float attention bias, rebuilt from the bool
    mask by every attention call) are saved once per layer. The pass builds a new graph: node
    objects change, so run it before anything keeps references to nodes.
    """
    from torch._functorch.compile_utils import fx_graph_cse

    gm.graph = fx_graph_cse(gm.graph)
    gm.recompile()
    return gm


def current_cuda_stream_id(device_index: int = -1) -> tuple[int, int]:
    """``(stream id, device index)`` of the current stream of CUDA device ``device_index`` (-1:
    of the current device, whose index comes back).

    ``torch.cuda.current_stream()`` answers the same, but builds a ``Stream`` object to do so:
    8 µs of host time on the H100 machine, a quarter of what a swap call costs
    (``benchmarks/swap_calls.py``); the swap ops ask on every call and keep the object.
    """
    stream_id, index, _ = torch._C._cuda_getCurrentStream(device_index)
    return stream_id, index


def storage_id(t: torch.Tensor) -> int:
    """What identifies ``t``'s storage itself (its ``StorageImpl``), not the memory it holds at
    the moment: a storage freed in place (``resize_(0)``, FSDP's reshard) while views of it
    live keeps its identity, and a new one made at the address it gave back has another."""
    return t.untyped_storage()._cdata


def gpu_spin(cycles: int) -> None:
    """Enqueue a kernel that keeps the current CUDA stream busy for ``cycles`` clock cycles.

    Timing a single op with CUDA events on an idle GPU also measures how long the host takes to
    launch it; spinning the GPU first while the host enqueues start event, op and end event leaves
    only the kernels between the two events.
    """
    torch.cuda._sleep(int(cycles))


def reorder_backward(bwd: fx.GraphModule) -> fx.GraphModule:
    """Move each recomputed forward node of ``bwd`` to just before its first use.

    ``extract_fwd_bwd`` puts recomputation at the start of backward, where everything it rebuilds
    would be live at once; this is the pass AOTAutograd's own min-cut partitioner applies.
    """
    from torch._functorch import partitioners

    return partitioners.reordering_to_mimic_autograd_engine(bwd)


@contextlib.contextmanager
def device_memory_trace(device: torch.device | str) -> Iterator[list[tuple[float, int]]]:
    """Record the CUDA caching allocator's allocations and frees inside the ``with`` block.

    Yields a list that, when the block exits, holds ``(time_us, +bytes)`` for each allocation and
    ``(time_us, -bytes)`` for each completed free, in order (``torch.cuda.memory``'s private
    memory history, the source of ``torch.cuda.memory._dump_snapshot``). Where an entry has no
    timestamp, its position in the trace stands in.
    """
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    record = torch.cuda.memory._record_memory_history
    try:  # an earlier recording's entries would otherwise come back too
        record(enabled="all", context=None, stacks="python", max_entries=2_000_000,
               clear_history=True)
    except TypeError:  # a torch without clear_history
        record(enabled="all", context=None, stacks="python", max_entries=2_000_000)
    events: list[tuple[float, int]] = []
    try:
        yield events
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        record(enabled=None)
    for k, entry in enumerate(snapshot["device_traces"][index]):
        sign = {"alloc": 1, "free_completed": -1}.get(entry["action"])
        if sign is not None:
            events.append((float(entry.get("time_us", k)), sign * int(entry["size"])))


def rng_prims():
    """torch's RNG higher-order ops, which inductor runs as they are (``run_and_save_rng_state``:
    the generator's state, then the op's result; ``run_with_rng_state``: the op run from a given
    state, leaving the generator where it was)."""
    from torch._prims import rng_prims

    return rng_prims


def inductor_compile(gm: fx.GraphModule, example_inputs: list, *,
                     is_backward: bool) -> Callable:
    """``gm`` (an aten graph of AOTAutograd's forward or backward form) compiled by inductor for
    ``example_inputs``; the result takes its inputs as one list, which it empties (boxed).

    The graph goes through inductor's decompositions, the passes ``torch.compile`` runs on a
    joint graph before it partitions it (:func:`inductor_graph_passes`), then inductor's own
    compilation with its memory-driven reordering off: the graphs come planned, each
    recomputation, swap and release where the simulator counted it."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    # Inductor lowers the graphs AOTAutograd traced with its decompositions; ours were traced
    # without them, so trace once more through them (fake tensors: nothing runs).
    decomposed = make_fx(fx.Interpreter(gm).run, decomposition_table=select_decomp_table(),
                         tracing_mode="fake")(*example_inputs)
    decomposed = inductor_graph_passes(decomposed)
    _keep_output_strides(decomposed)
    # As torch.compile compiles: under a tracing context with the graph's fake mode, given its
    # fake inputs. Inductor's FX graph cache needs that fake mode's shape environment (without
    # it every compile bypasses the cache, and a second fit of the same model compiles from
    # scratch). make_fx made one placeholder per input, in order.
    fakes = [n.meta.get("val") for n in decomposed.graph.find_nodes(op="placeholder")]
    fake_mode = torch._guards.detect_fake_mode(fakes)
    context = contextlib.nullcontext()
    if fake_mode is not None and fake_mode.shape_env is not None:
        context = torch._guards.tracing(torch._guards.TracingContext(fake_mode))
        example_inputs = [f if isinstance(f, torch.Tensor) else x
                          for f, x in zip(fakes, example_inputs, strict=True)]
    with config.patch(reorder_for_peak_memory=False), context:
        return compile_fx_inner(decomposed, example_inputs, is_backward=is_backward)


def warm_inductor_workers() -> None:
    """Start inductor's pool of kernel-compiling processes now, as ``torch.compile``'s inductor
    backend does when it is created (``async_compile.maybe_warm_pool``): kernels compiled before
    the pool is up compile one by one in this process. Does nothing where the pool is not used
    (one compile thread, no Triton) or the call is missing."""
    try:
        from torch._inductor.async_compile import maybe_warm_pool
    except ImportError:
        return
    maybe_warm_pool()


_FUSED_COMPOSITES = ("native_layer_norm", "_softmax", "_safe_softmax", "_log_softmax",
                     "native_dropout_backward", "gelu", "silu", "_native_batch_norm_legit",
                     "native_batch_norm", "cudnn_batch_norm", "new_ones", "new_zeros",
                     "native_layer_norm_backward", "native_batch_norm_backward",
                     "_softmax_backward_data", "_log_softmax_backward_data", "nll_loss_forward",
                     "nll_loss_backward", "embedding", "native_group_norm",
                     "native_group_norm_backward", "gelu_backward", "silu_backward")
"""Ops inductor decomposes into reductions and pointwise ops that it fuses with their neighbours
(absent from the partitioner's lists, which are of decomposed ops)."""


@functools.cache
def _partitioner_op_types():
    """torch's partitioner's op lists, built once (0.9 ms a build on this project's CPU
    machine: once per node, seconds for a graph of thousands of nodes)."""
    from torch._functorch.partitioners import get_default_op_list

    return get_default_op_list()


def fuses_into_neighbours(node: fx.Node) -> bool:
    """Whether inductor fuses ``node`` into the kernels around it, so that running it again in
    backward costs about nothing: the ops torch's own partitioner recomputes freely (pointwise,
    views, cheap reductions: ``partitioners.get_default_op_list``), and the composites above.
    Random ops and matmuls/convolutions are not."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return node.op == "call_function" and node.target is operator.getitem
    ops = _partitioner_op_types()
    if ops.is_random(node) or ops.is_compute_intensive(node):
        return False
    return ops.is_recomputable(node) or ops.is_view(node) or node.target.is_view \
        or node.target.overloadpacket.__name__ in _FUSED_COMPOSITES


def inductor_graph_passes(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` after the passes ``torch.compile`` runs on a joint graph (``joint_graph_passes``:
    among others, matmuls padded to aligned sizes, where a vocabulary of 30522 makes cuBLAS pick
    slow kernels; random ops made inductor's), run on a copy under the graph's fake mode.

    Where they fail, or leave a real tensor among the graph's fake ones (they did on CUDA, run
    without the fake mode), ``gm`` with only the random-op pass, which inductor's lowerings of
    random ops require."""
    from torch._inductor.fx_passes.joint_graph import joint_graph_passes
    from torch._inductor.fx_passes.replace_random import replace_random_passes
    from torch._inductor.virtualized import V

    fake_mode = torch._guards.detect_fake_mode(
        [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")])
    with V.set_fake_mode(fake_mode):
        candidate = copy.deepcopy(gm)
        try:
            joint_graph_passes(candidate)
        except Exception as exc:  # (their errors have no common base)
            log.debug("joint_graph_passes failed (%s); random-op pass only", exc)
        else:
            if not _real_tensors_in(candidate):
                return candidate
            log.debug("joint_graph_passes left real tensors in the graph; random-op pass only")
        replace_random_passes(gm)
    return gm


def _real_tensors_in(gm: fx.GraphModule) -> bool:
    """Whether ``gm``'s nodes take a real (not fake) tensor as an argument or as a constant."""
    from torch._subclasses.fake_tensor import FakeTensor

    found = []

    def look(a):
        if isinstance(a, torch.Tensor) and not isinstance(a, FakeTensor):
            found.append(a)
        return a

    for n in gm.graph.nodes:
        fx.node.map_aggregate((n.args, n.kwargs), look)
        if n.op == "get_attr":
            look(getattr(gm, n.target, None))
    return bool(found)


def _keep_output_strides(gm: fx.GraphModule) -> None:
    """Make inductor return every output of ``gm`` with the strides it was traced with, as
    ``torch.compile`` does for a module's own outputs (``user_visible_output_idxs``). Left free,
    inductor lays saved activations out as it likes (channels-last around convolutions), and
    the other graph, traced for the original strides, cannot read them (a ``view`` of a
    channels-last tensor fails: ConvNeXt)."""
    out = gm.graph.output_node()
    values = out.args[0] if isinstance(out.args[0], (list, tuple)) else out.args
    strides = [n.meta["val"].stride() if isinstance(n, fx.Node)
               and isinstance(n.meta.get("val"), torch.Tensor) else None for n in values]
    out.meta["user_visible_output_idxs"] = [i for i, st in enumerate(strides) if st is not None]
    out.meta["original_output_strides"] = strides
