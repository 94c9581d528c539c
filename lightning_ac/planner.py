"""μ-TWO's greedy choice of activations to recompute under a memory budget.

Candidates are the profiled activations that can be rebuilt without replaying the RNG. Each has
a *recompute ratio*: bytes freed per millisecond of recomputation, where the recomputation is the
chain of forward nodes between the activation and the values it is rebuilt from (its sources).
The planner repeatedly drops the candidate with the best ratio, then

* updates the others: a candidate whose source was just dropped is now rebuilt from that
  source's own sources, so its chain (and its cost) grows; nodes that are already being re-run
  for an earlier pick cost nothing more (backward runs each node once);
* replays the iteration with :func:`~lightning_ac.simulator.simulate` and stops as soon as the
  simulated peak of the whole step is within the budget.

Only activations idle across the current simulated peak (made before it, first needed by backward
after it) are considered: dropping anything else cannot lower that peak. It never drops a
candidate whose chain contains a random op or reads a buffer that is updated in place, nor one
smaller than 0.1% of the largest activation. (Dropout's random op only draws the mask, which is
kept; its output is rebuilt from the mask, see :func:`lightning_ac.graph_passes.replayable_dropout`.)
When nothing qualifies and the budget is not met it stops with ``"infeasible"`` and returns the
lowest-peak plan it found.

Before recomputing anything it *swaps* (μ-TWO's hybrid): an activation idle across the peak for
long enough is copied to pinned host memory on a side stream after its last forward use and
copied back before backward needs it, which costs no step time as long as the copies hide behind
compute (:func:`~lightning_ac.simulator.swap_schedule`). The copy engine is a shared queue, so
it goes first to the activations that are dearest to recompute (lowest recompute ratio); a swap
is taken only if the schedule stays free of stalls and the activation is on the host across the
current peak. What swapping cannot free, recomputation does, with the swaps in place (a swapped
activation may still be picked for recomputation; it is then dropped instead of swapped).
"""

from __future__ import annotations

import dataclasses
import operator
import time
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.fx as fx

from lightning_ac import _torch_compat as compat
from lightning_ac.capture import node_value
from lightning_ac.profiler import Profile, op_name, recompute_chain
from lightning_ac.simulator import Simulation, profile_index, simulate, swap_ms, swap_schedule

__all__ = ["Plan", "can_swap_value", "default_reserve_B", "fused_costs", "offload_eager_saves",
           "plan", "rerun_by_op", "swap_cost_ms", "swappable"]

_MIN_SHARE = 1e-3  # candidates below this share of the largest activation are left alone
MIN_SWAP_B = 1 << 20  # smaller activations are not worth a copy's host work (tens of µs)
SWAP_HOST_MS = 0.1
"""Host time charged per swapped activation (its four calls: copy out, release, copy back, wait)
when a swapping plan is weighed against the recompute-only one. It is step time where the host
has little lead on the GPU: BERT-base 32×512 in bf16 at 9.44 GiB, whose step is about 55 ms of
GPU time, ran 75.9 ms with 46 swaps (1.6 ms predicted extra) and 67.5 ms recomputing only (2.6 ms
predicted; H200). On the fp32 steps (150 to 290 ms) the swaps' unpredicted time came to 0.03 to
0.09 ms each (H100), where swapping wins by far more. Fitted when the four calls took 117 µs of
host time; they take 47 µs now (``reports/ac/swap_calls``, H100), not re-fitted."""
HEADROOM = 0.01  # plan this share below the budget (measured vs simulated peak, see plan())
CUDA_RESERVE_B = 128 << 20  # and this much below it on CUDA (see plan())


@dataclass
class Plan:
    """Which activations to keep and which to recompute, and what that is predicted to cost."""

    budget_B: int | None
    """The budget planned for (None: no limit)."""
    baseline_peak_B: int
    """Simulated peak with every activation kept (the profile's peak)."""
    predicted_peak_B: int
    predicted_extra_ms: float
    """Runtime added to each step by recomputation (and by waiting for copies back, if any)."""
    stop_reason: str
    """``"fits"`` (reached the budget), ``"already fits"`` (nothing to do) or ``"infeasible"``
    (then the plan is the one with the lowest peak found, and ``predicted_peak_B`` is that peak)."""
    recomputed: list[fx.Node] = field(default_factory=list)
    """Activations dropped after forward and rebuilt in backward, in the order they were picked."""
    kept: list[fx.Node] = field(default_factory=list)
    """Activations saved for backward."""
    recomputed_nodes: list[fx.Node] = field(default_factory=list)
    """Every forward node backward re-runs (the dropped activations and their chains)."""
    recomputed_B: int = 0
    """Bytes of the dropped activations."""
    swapped: list[fx.Node] = field(default_factory=list)
    """Kept activations that wait for backward in pinned host memory, in the order picked."""
    swapped_B: int = 0
    release_before: dict[fx.Node, fx.Node] = field(default_factory=dict)
    """Swapped activation → the forward node before which its device memory is given back (where
    its copy out is planned to have ended)."""
    prefetch_before: dict[fx.Node, fx.Node] = field(default_factory=dict)
    """Swapped activation → the backward node before which its copy back is issued."""
    target_B: int | None = None
    """What the planner aimed the simulated peak at: the budget less its headroom and reserve
    for memory the profile does not see (see :func:`plan`)."""
    planning_s: float = 0.0
    offload_eager_B: int = 0
    """Bytes that eager code between graphs saves for backward and that the step keeps in
    pinned host memory instead (0: none; only where the budget is out of reach without it:
    :func:`plan`'s ``offload_eager``)."""
    steps: list[dict] = field(default_factory=list)
    """One entry per pick: the activation, its bytes and marginal ms, and the simulated peak
    after it (None where no simulation was needed: the budget was out of reach)."""


    def summary(self) -> str:
        """One line: budget, baseline and predicted peak, what is recomputed and swapped, and
        what that is predicted to cost."""
        from lightning_ac.report import format_bytes as fb

        budget = "none" if self.budget_B is None else fb(self.budget_B)
        swapped = (f"{len(self.swapped)} swapped to host ({fb(self.swapped_B)}), "
                   if self.swapped else "")
        if self.offload_eager_B:
            swapped += f"eager code's saved tensors in host memory ({fb(self.offload_eager_B)}), "
        return (f"budget {budget}, baseline peak {fb(self.baseline_peak_B)}, "
                f"predicted peak {fb(self.predicted_peak_B)}, "
                f"{len(self.recomputed)} activations recomputed ({fb(self.recomputed_B)}), "
                f"{swapped}predicted overhead {self.predicted_extra_ms:.1f} ms/step, "
                f"planned in {self.planning_s:.2f} s [{self.stop_reason}]")


def swappable(profile: Profile) -> list[fx.Node]:
    """Activations that can wait for backward in host memory, dearest to recompute first.

    One swap must free one storage: the activation is a single dense tensor that covers its
    storage, of at least :data:`MIN_SWAP_B`. Activations that cannot be recomputed (random ops)
    come first, then by recompute ratio, lowest first.
    """
    acts = profile.activations
    ranked = []
    with profile.joint.bound(profile.sizes):  # (values at the sizes the bytes are at)
        for n, nbytes, ratio, ok in zip(acts["node"], acts["bytes"],
                                        acts["recompute_ratio_B_per_ms"], acts["recomputable"]):
            if can_swap_value(n, nbytes):
                ranked.append((ratio if ok else 0.0, n))
    return [n for _, n in sorted(ranked, key=lambda rn: rn[0])]


def can_swap_value(n: fx.Node, nbytes: int) -> bool:
    """Whether swapping ``n``'s value frees its storage of ``nbytes``: one dense tensor that
    covers the storage, of at least :data:`MIN_SWAP_B`, that the graph does not also return
    (its caller would hold it on the device: the rewriter leaves such values alone)."""
    val = node_value(n)
    return (nbytes >= MIN_SWAP_B and isinstance(val, torch.Tensor)
            and val.numel() * val.element_size() == nbytes and _dense(val)
            and not any(u.op == "output" for u in n.users))


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory exactly once, in some order of its dimensions."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _pick_swaps(profile: Profile, target: int, sim: Simulation) -> tuple[list[fx.Node], Simulation]:
    """Swap activations (see the module docstring) until the simulated peak is within ``target``
    or nothing more can be swapped for free. Returns the swaps and the simulation with them."""
    ix = profile_index(profile)
    t0 = ix.start_ms
    swapped: list[fx.Node] = []
    left = swappable(profile)
    freed = 0
    while left and sim.peak_B > target:
        at, taken = sim.peak_rank, []
        for n in left:
            # each copy alone must fit between the value's uses and the peak
            if not (t0[at] - t0[ix.last_fwd[n] + 1] > swap_ms(profile, ix.act_bytes[n], "to_host")
                    and t0[ix.first_bwd[n]] - t0[at] > swap_ms(profile, ix.act_bytes[n],
                                                                 "to_device")):
                continue
            s = swap_schedule(profile, [*swapped, n])
            # every copy out must end within forward (its memory is released there), this one
            # before the peak, and its copy back must start after the peak
            if s.stall_ms > 0 or not s.out_done_rank[n] < at < s.prefetch_rank[n] \
                    or max(s.out_done_rank.values()) > ix.backward_start:
                continue
            swapped.append(n)
            taken.append(n)
            freed += ix.act_bytes[n]
            if sim.peak_B - freed <= target:  # within reach: see where the peak is now
                sim, freed = simulate(profile, (), swapped), 0
                if sim.peak_B <= target or sim.peak_rank != at:
                    break
        if freed:
            sim, freed = simulate(profile, (), swapped), 0
        if not taken:
            break
        taken_set = set(taken)
        left = [n for n in left if n not in taken_set]
    return swapped, sim


def fused_costs(profile: Profile) -> Profile:
    """``profile`` as the planned step runs on inductor's kernels (``kernels="inductor"``).

    Time: every forward and backward node that inductor fuses into the kernels around it
    (pointwise ops, views, norms, softmax: :func:`~lightning_ac._torch_compat.
    fuses_into_neighbours`) costs nothing, to run or to recompute: it runs inside the kernel of
    the value that reads it. Matmuls, convolutions, attention, random ops and the optimizer keep
    their measured times; the step's timeline is shorter by what fuses, so the simulator finds
    less compute to hide copies behind (as on fused kernels).

    Memory: a value that a fused op makes and only fused ops read is never written to memory
    (column ``fused_away`` of the storages: the simulator counts it only where the plan saves it
    for backward; ``fused_away_rerun``: its recomputation in backward is not written either),
    a value that fused ops read lives until the kernel they are fused into has run (column
    ``done_rank`` of the nodes: where that kernel runs), fused ops need no scratch space, and a
    matmul whose sizes are not multiples of the alignment inductor pads them to
    (:func:`padded_operands_B`) counts padded copies of its operands as scratch. The nodes and
    tables are otherwise the same: a plan made on it applies to ``profile``."""
    nodes = profile.nodes.copy()
    phase = dict(zip(nodes["node"], nodes["phase"]))
    fused = {n for n, ph in phase.items()
             if ph != "optimizer" and compat.fuses_into_neighbours(n)}
    free = nodes["node"].isin(fused)
    nodes.loc[free, "runtime_ms"] = 0.0
    nodes.loc[free, "workspace_B"] = 0
    pads = nodes["node"].map(lambda n: padded_operands_B(n, fused)) if fused else 0
    nodes["workspace_B"] += pads

    def readers(aliases, phases):
        """The nodes outside ``aliases`` that read them, in ``phases``, and whether the step's
        output does."""
        users = {u for a in aliases for u in a.users if u not in aliases}
        return ([u for u in users if phase.get(u) in phases],
                any(u.op == "output" for u in users))

    # A fused kernel holds what it reads until it has written what it makes: a value read by
    # an op fused into later kernels lives until the last of them has run (its "done" rank).
    rank = profile.rank
    done: dict[fx.Node, int] = {}
    for n in sorted(rank, key=rank.__getitem__, reverse=True):
        readers_n = list(_readers(n))
        same = [u for u in readers_n if u in rank and phase.get(u) == phase.get(n)]
        inlined = n in fused and same and all(u in fused for u in same) \
            and not any(u.op == "output" for u in readers_n)
        done[n] = max(done[u] for u in same) if inlined else rank[n]
    nodes["done_rank"] = nodes["node"].map(done).fillna(nodes["rank"]).astype(int)

    storages = profile.storages.copy()
    # (only the users within a row's lifetime: a lifetime that ends before a later one of the
    # same storage begins, FSDP's resharded parameters', keeps its gap)
    storages["stop"] = [max([stop, *(done[u] for a in aliases for u in a.users
                                     if u in done and rank[u] <= stop)])
                        for stop, aliases in zip(storages["stop"], storages["aliases"])]
    away, away_rerun = [], []
    for creator, aliases in zip(storages["creator"], storages["aliases"]):
        if creator not in fused or not aliases:
            away.append(False)
            away_rerun.append(False)
            continue
        here = ("forward",) if phase.get(creator) == "forward" else ("backward", "optimizer")
        users, output = readers(aliases, here)
        away.append(not output and all(u in fused for u in users))
        users, output = readers(aliases, ("forward", "backward", "optimizer"))
        away_rerun.append(not output and all(u in fused for u in users))
    storages["fused_away"] = away
    storages["fused_away_rerun"] = away_rerun
    return dataclasses.replace(profile, nodes=nodes, storages=storages)


def _is_view(n: fx.Node) -> bool:
    """Whether ``n`` is a view of its input (no kernel of its own: what reads it reads that)."""
    return n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and (
        n.target.is_view or n.target is torch.ops.aten._unsafe_view.default)


def _readers(n: fx.Node):
    """The nodes that read ``n``'s value, through views and tuple items."""
    for u in n.users:
        if _is_view(u) or (u.op == "call_function" and u.target is operator.getitem):
            yield from _readers(u)
        else:
            yield u


PAD_ALIGNMENT = {torch.float16: 8, torch.bfloat16: 8, torch.float32: 4}
"""Elements inductor aligns a CUDA matmul's sizes to (its ``pad_mm`` pass)."""


def padded_operands_B(node: fx.Node, fused: set[fx.Node] = frozenset()) -> int:
    """Bytes of the operand copies inductor makes to pad a CUDA matmul (``mm``, ``addmm``,
    ``bmm``) whose sizes are not multiples of :data:`PAD_ALIGNMENT` (a vocabulary of 30522);
    0 for any other node. An operand made by a node in ``fused`` is written padded by its own
    kernel (no copy: measured on BERT's logits gradient). Inductor pads where a benchmark at
    compile time says it pays, so this is the most it allocates."""
    if node.op != "call_function" or node.target not in _MATMULS:
        return 0
    a, b = (node.args[1], node.args[2]) if node.target is torch.ops.aten.addmm.default \
        else node.args[:2]
    va, vb = (x.meta.get("val") if isinstance(x, fx.Node) else None for x in (a, b))
    if not all(isinstance(v, torch.Tensor) and v.is_cuda for v in (va, vb)):
        return 0
    align = PAD_ALIGNMENT.get(va.dtype, 0)
    if not align or any(isinstance(d, torch.SymInt) for d in (*va.shape, *vb.shape)):
        return 0
    m, k, n = va.shape[-2], va.shape[-1], vb.shape[-1]

    def off(x):
        return x % align != 0 and x != 1

    def copied(x, v):
        while isinstance(x, fx.Node) and _is_view(x):
            x = x.args[0]
        return 0 if x in fused else v.numel() * v.element_size()

    return (copied(a, va) if off(m) or off(k) else 0) + (copied(b, vb) if off(k) or off(n) else 0)


_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


def plan(profile: Profile, budget_B: int | None, headroom: float = HEADROOM,
         reserve_B: int | None = None, swap: bool = True, recompute_free: bool = False,
         offload_eager: bool = False) -> Plan:
    """Choose activations to recompute so that the simulated peak is at most ``budget_B``.

    The planner aims ``headroom`` (a share of the budget) plus ``reserve_B`` bytes below it, for
    memory the profile does not see. On the H100 the measured peak of the rewritten step came out
    72 to 101 MiB above the simulated one (ResNet-152 at batch 32 and 128, BERT-base at batch 32):
    the workspaces of the cuBLAS handle that autograd's backward thread creates (the profile runs
    every node in one thread) and cuDNN's algorithm choices in backward. ``reserve_B`` defaults to
    :data:`CUDA_RESERVE_B` for a profile taken on CUDA and to 0 elsewhere.

    With ``swap`` (and a measured host bandwidth: CUDA profiles) it swaps before it recomputes.
    The plan without swaps is made too, and the better of the two returned: if both fit, the
    one with less predicted extra time, each swap counted at :data:`SWAP_HOST_MS` (swapping pays
    off where recomputation is dear, not on a short step whose host is the bottleneck); if not,
    the one with the lower peak (swaps taken for the first peak can stand in the way of a lower
    budget: copies still under way at the end of forward hold their memory there).

    With ``recompute_free`` (for a profile of :func:`fused_costs`) a step that needs a plan
    also recomputes every activation whose recomputation costs no time, before anything else
    and whatever the budget: on fused kernels that is what torch's own partitioner does, and it
    is faster than saving them (their values are never written to memory).

    With ``offload_eager`` (and swapping possible), where the budget is out of reach, what eager
    code between a split step's graphs saves for backward (an ``nn.LSTM``, code dynamo left
    out), which no recomputation of the graphs can lower, is planned in pinned host memory
    (:func:`offload_eager_saves`; each byte copied out and back, synchronously, counted in the
    predicted time), if that reaches a lower peak: only as many bytes as the budget needs,
    the first saved first.
    """
    t0 = time.perf_counter()
    if reserve_B is None:
        reserve_B = default_reserve_B(profile)
    target = None if budget_B is None else int(budget_B * (1.0 - headroom)) - reserve_B
    acts = profile.activations
    baseline = simulate(profile)
    if target is None or baseline.peak_B <= target:
        return Plan(budget_B=budget_B, baseline_peak_B=baseline.peak_B,
                    predicted_peak_B=baseline.peak_B, predicted_extra_ms=0.0,
                    stop_reason="already fits", kept=list(acts["node"]), target_B=target,
                    planning_s=time.perf_counter() - t0)
    swap = swap and profile_index(profile).can_swap
    best = _greedy(profile, budget_B, target, baseline, swap, recompute_free)
    if best.swapped:
        alone = _greedy(profile, budget_B, target, baseline, False, recompute_free)
        if best.stop_reason == alone.stop_reason == "fits":
            if alone.predicted_extra_ms <= swap_cost_ms(best):
                best = alone
        elif alone.stop_reason == "fits" or alone.predicted_peak_B < best.predicted_peak_B:
            best = alone
    if offload_eager and swap and best.stop_reason == "infeasible":
        best = _offloading_plan(profile, best, budget_B, headroom, reserve_B, recompute_free,
                                baseline.peak_B)
    best.target_B = target
    best.planning_s = time.perf_counter() - t0
    return best


def offload_eager_saves(profile: Profile, limit_B: int | None = None
                        ) -> tuple[Profile, int] | None:
    """``profile`` with what eager code between graphs saves for backward (the storages
    ``eager_saved``) kept in host memory: none of it on the device, or, with ``limit_B``, the
    first ``limit_B`` bytes of it in the order eager code saved them (as the step's hooks move
    them: :meth:`~lightning_ac.step_graphs.StepGraphs._to_host`). And the bytes moved. None
    where there is nothing to move or the host link was not measured (CPU profiles)."""
    st = profile.storages
    if "eager_saved" not in st or not profile_index(profile).can_swap:
        return None
    rows = st.index[st["eager_saved"].to_numpy()]
    left = int(st["bytes"][rows].sum()) if limit_B is None else int(limit_B)
    storages = st.copy()
    moved = 0
    for row in sorted(rows, key=lambda r: st.at[r, "start"]):  # (stable: region by region)
        take = min(left, int(st.at[row, "bytes"]))
        storages.at[row, "bytes"] -= take
        moved, left = moved + take, left - take
    if not moved:
        return None
    return dataclasses.replace(profile, storages=storages), moved


def _offloading_plan(profile: Profile, best: Plan, budget_B: int, headroom: float,
                     reserve_B: int, recompute_free: bool, baseline_peak_B: int) -> Plan:
    """For a budget out of reach (``best`` is infeasible): a plan with part or all of eager
    code's saves in host memory that meets it, or, where even all of them do not, the lowest
    peak. Each byte moved is copied out and back on the step's stream, and fewer bytes moved
    can mean more recomputation in the graphs: the fewest bytes that meet the budget are found
    by bisection (to a sixteenth of the whole), and the fastest of the plans tried that meet it
    returned."""
    def with_offload(limit_B: int | None) -> Plan | None:
        moved = offload_eager_saves(profile, limit_B)
        if moved is None:
            return None
        p = plan(moved[0], budget_B, headroom, reserve_B, True, recompute_free)
        p.offload_eager_B = moved[1]
        p.predicted_extra_ms += swap_ms(profile, moved[1], "to_host") + \
            swap_ms(profile, moved[1], "to_device")
        p.baseline_peak_B = baseline_peak_B
        return p

    every = with_offload(None)
    if every is None:
        return best
    if every.stop_reason == "infeasible":
        return every if every.predicted_peak_B < best.predicted_peak_B else best
    lo, hi, met = 0, every.offload_eager_B, [every]  # (lo: not enough; hi: enough)
    while hi - lo > every.offload_eager_B // 16:
        mid = (lo + hi) // 2
        p = with_offload(mid)
        if p is not None and p.stop_reason != "infeasible":
            hi = mid
            met.append(p)
        else:
            lo = mid
    # fewer bytes moved can mean more recomputed in the graphs: the fastest of those that meet it
    return min(met, key=lambda p: (p.predicted_extra_ms, p.offload_eager_B))


def default_reserve_B(profile: Profile | torch.device | None) -> int:
    """Bytes :func:`plan` keeps free below the budget by default: :data:`CUDA_RESERVE_B` for a
    profile taken on CUDA (or for a CUDA device, before its profile), 0 elsewhere."""
    device = profile if isinstance(profile, torch.device) or profile is None else \
        profile.summary.get("device", "")
    return CUDA_RESERVE_B if str(device).startswith("cuda") else 0


def swap_cost_ms(p: Plan) -> float:
    """What ``p`` is expected to add to the step: its predicted extra time (recomputation, late
    copies) plus :data:`SWAP_HOST_MS` per swapped activation."""
    return p.predicted_extra_ms + SWAP_HOST_MS * len(p.swapped)


def _greedy(profile: Profile, budget_B: int, target: int, baseline: Simulation,
            swap: bool, recompute_free: bool = False) -> Plan:
    """One run of the greedy (swaps first if ``swap``, then recomputation) toward ``target``;
    with ``recompute_free``, the candidates that cost no time first, all of them."""
    ix = profile_index(profile)
    acts = profile.activations
    swapped: list[fx.Node] = []
    sim = baseline
    if swap:
        swapped, sim = _pick_swaps(profile, target, baseline)
    on_host = set(swapped)

    size = dict(zip(acts["node"], acts["bytes"]))
    dropped_rows: set[int] = set()
    available = ix.available(dropped_rows)  # reads dropped_rows as it grows

    creators = profile.storages["creator"].to_list()

    def creator(n: fx.Node) -> fx.Node:
        return creators[ix.activation_row[n]]

    # A candidate's chain starts at the node that makes its storage (for a getitem of a
    # multi-output op, the op itself).
    chains: dict[fx.Node, frozenset] = {}
    sources: dict[fx.Node, frozenset] = {}
    users_of: dict[fx.Node, set[fx.Node]] = {}    # chain node -> candidates whose chain has it
    dependents: dict[int, set[fx.Node]] = {}      # storage row -> candidates rebuilt from it
    rerun: set[fx.Node] = set()
    cost: dict[fx.Node, float] = {}

    def marginal_ms(chain: frozenset) -> float:  # nodes re-run for earlier picks are free
        return sum(ix.runtime.get(c, 0.0) for c in chain - rerun)

    def set_chain(n: fx.Node, chain: frozenset, srcs: frozenset) -> None:
        chains[n], sources[n] = chain, srcs
        for c in chain:
            users_of.setdefault(c, set()).add(n)
        for x in srcs:
            if x in ix.storage_of:
                dependents.setdefault(ix.storage_of[x], set()).add(n)
        cost[n] = marginal_ms(chain)

    # Activations far smaller than the largest ones (BatchNorm's per-channel statistics) free
    # nothing that matters, and dropping them drags whole ops back into backward.
    floor = acts["bytes"].max() * _MIN_SHARE if len(acts) else 0
    # (if the swaps alone met the target, there is nothing to recompute)
    candidates = zip(acts["node"], acts["recomputable"]) \
        if sim.peak_B > target or recompute_free else ()
    for n, ok in candidates:
        if ok and size[n] > floor:
            srcs, chain = recompute_chain(creator(n), available)
            set_chain(n, frozenset(chain), frozenset(srcs))
    last_fwd = dict(zip(acts["node"], acts["last_fwd_use_rank"]))
    first_bwd = dict(zip(acts["node"], acts["first_bwd_use_rank"]))
    dropped: list[fx.Node] = []
    steps = []
    freed_since_sim = 0
    free_phase = recompute_free
    while chains:
        free = [n for n in chains if cost[n] <= 0.0] if free_phase else []
        if free_phase and not free:  # the free ones are dropped: where is the peak now
            free_phase = False
            sim, freed_since_sim = simulate(profile, dropped, swapped), 0
            if sim.peak_B <= target:
                break
        # Only an activation idle across the current peak (made before it, first needed by
        # backward after it) lowers that peak when dropped.
        at = sim.peak_rank
        idle = free or [n for n in chains if last_fwd[n] < at < first_bwd[n]]
        if not idle:
            if freed_since_sim == 0:
                break  # nothing left that can lower this peak
            sim = simulate(profile, dropped, swapped)  # the peak may have moved
            freed_since_sim = 0
            if sim.peak_B <= target:
                break
            continue
        best = max(idle, key=lambda n: size[n] / max(cost[n], 1e-6))
        marginal = cost.pop(best)
        chain, best_sources = chains.pop(best), sources.pop(best)
        row = ix.activation_row[best]
        dropped.append(best)
        dropped_rows.add(row)
        if best in on_host:  # dropped instead: its copy out may be what holds the new peak up
            on_host.discard(best)
            swapped.remove(best)
        new_nodes = chain - rerun
        rerun |= chain
        # μ-TWO's update: a candidate rebuilt from `best` is now rebuilt from best's sources, so
        # its chain takes in best's chain (and the views it read best through). Candidates that
        # share nodes now re-run anyway get cheaper.
        grown = [n for n in dependents.pop(row, ()) if n in chains]
        for n in grown:
            via = frozenset(x for x in sources[n] if ix.storage_of.get(x) == row)
            set_chain(n, chains[n] | chain | via, (sources[n] - via) | best_sources)
        for n in {u for c in new_nodes for u in users_of.get(c, ())} - set(grown):
            if n in chains:
                cost[n] = marginal_ms(chains[n])
        freed_since_sim += int(size[best])
        if free_phase:
            steps.append({"activation": best.name, "bytes": int(size[best]),
                          "marginal_ms": 0.0, "peak_B": None})
            continue
        # Dropping activations of X bytes lowers the peak by X at most: simulate only when the
        # budget is within reach, or when nothing is left to drop.
        if sim.peak_B - freed_since_sim <= target or not chains:
            sim = simulate(profile, dropped, swapped)
            freed_since_sim = 0
        steps.append({"activation": best.name, "bytes": int(size[best]),
                      "marginal_ms": round(marginal, 4),
                      "peak_B": sim.peak_B if freed_since_sim == 0 else None})
        if freed_since_sim == 0 and sim.peak_B <= target:
            break
    if freed_since_sim:
        sim = simulate(profile, dropped, swapped)
    reason = "fits" if sim.peak_B <= target else "infeasible"
    if reason == "infeasible":
        # Long chains can make the full plan worse than a partial one: report the lowest peak
        # among evenly spaced prefixes of the picks (what the smallest-peak plan looks like).
        k = len(dropped)
        prefixes = {m: simulate(profile, dropped[:m], swapped) for m in
                    sorted({max(1, round(k * i / 20)) for i in range(1, 21)})}
        prefixes[0] = simulate(profile, (), swapped)
        best_k = min(prefixes, key=lambda m: prefixes[m].peak_B)
        dropped, sim = dropped[:best_k], prefixes[best_k]
    dropped_set = set(dropped)
    release_before, prefetch_before = swap_points(profile, sim)
    return Plan(
        budget_B=budget_B, baseline_peak_B=baseline.peak_B, predicted_peak_B=sim.peak_B,
        predicted_extra_ms=sim.extra_ms, stop_reason=reason, recomputed=dropped,
        kept=[n for n in acts["node"] if n not in dropped_set],
        recomputed_nodes=sim.recomputed_nodes,
        recomputed_B=int(sum(size[n] for n in dropped)),
        swapped=swapped, swapped_B=int(sum(size[n] for n in swapped)),
        release_before=release_before, prefetch_before=prefetch_before, steps=steps,
    )


def swap_points(profile: Profile, sim: Simulation) -> tuple[dict, dict]:
    """Where the simulated swaps move, as nodes: swapped activation → the forward node before
    which its device memory is given back, and → the backward node before which its copy back
    is issued (:attr:`Plan.release_before`, :attr:`Plan.prefetch_before`)."""
    if sim.swaps is None:
        return {}, {}
    nodes = profile.nodes["node"].to_list()
    return ({n: nodes[r] for n, r in sim.swaps.out_done_rank.items()},
            {n: nodes[r] for n, r in sim.swaps.prefetch_rank.items()})


def rerun_by_op(plan_: Plan, profile: Profile) -> pd.DataFrame:
    """The plan's predicted recomputation per aten op: nodes re-run, their profiled ms, and the
    share of the predicted overhead; to set beside a kernel profile of the rewritten step."""
    ix = profile_index(profile)
    rows = [{"op": op_name(n), "ms": ix.runtime.get(n, 0.0)} for n in plan_.recomputed_nodes]
    df = pd.DataFrame(rows, columns=["op", "ms"])
    out = df.groupby("op")["ms"].agg(nodes="size", ms="sum").sort_values("ms", ascending=False)
    out["share"] = out["ms"] / max(out["ms"].sum(), 1e-9)
    return out.round({"ms": 3, "share": 3})
