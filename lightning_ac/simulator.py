"""Replay a profiled iteration with a recomputation plan: peak memory and added time.

The simulator uses the profile's own memory model (``Profile.storages``: every allocation with
the ranks between which it is live, plus the persistent bytes) and changes what a plan changes:

* an activation that is dropped dies after its last *forward* use instead of its last backward
  use;
* backward re-runs the forward nodes needed to rebuild it from values that are kept (saved
  activations, parameters, the batch). Each re-run node is placed just before its first consumer
  in backward (what ``reordering_to_mimic_autograd_engine`` does to the rewritten backward) and
  its output lives until its last consumer there. A node needed by several dropped activations
  runs once;
* a kept value that a re-run node reads stays alive until that node has run;
* an activation that is *swapped* (μ-TWO's other tool, see :func:`swap_schedule`) is copied to
  pinned host memory after its last forward use and back before backward needs it: its device
  memory is free from the end of the first copy to the start of the second. Copies run on side
  streams, one per direction, in order; a copy back that is late stalls the step.

With nothing dropped or swapped it reproduces the profile's peak exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx

from lightning_ac.profiler import CATEGORIES, Profile, is_tensor_node

__all__ = ["SWAP_SLACK", "Simulation", "SwapSchedule", "peak_breakdown", "recompute_closure",
           "simulate", "swap_schedule"]

SWAP_SLACK = 1.25
"""Copies are planned this many times longer than the measured bandwidth says: the bandwidth is
measured on an idle device, and a late copy back stalls the step."""


@dataclass
class Simulation:
    """The iteration's memory and time under a plan."""

    peak_B: int
    peak_rank: int
    extra_ms: float
    """Runtime of the forward nodes that backward re-runs."""
    recomputed_nodes: list[fx.Node] = field(default_factory=list)
    """Forward nodes that backward re-runs, in forward order."""
    placement: dict[fx.Node, int] = field(default_factory=dict)
    """Re-run node → rank of the backward node it runs just before."""
    during_B: np.ndarray | None = None
    """Bytes live at each point of the refined timeline (scratch space included)."""
    swaps: SwapSchedule | None = None
    """When the swapped activations move (None: nothing swapped)."""


@dataclass
class SwapSchedule:
    """When each swapped activation moves between device and host, on the profile's timeline.

    Copies to the host start after the activation's last forward use, in that order, one at a
    time; copies back start as late as the one-at-a-time queue allows them to end by the time
    backward needs the value ("as late as possible" keeps the memory free longest).
    """

    out_done_rank: dict[fx.Node, int]
    """First rank that starts after the copy to the host has ended: the device memory is free
    from there."""
    prefetch_rank: dict[fx.Node, int]
    """The backward rank before which the copy back is issued (its memory is allocated there)."""
    need_rank: dict[fx.Node, int]
    """The first rank that reads the value in backward (a use, or a re-run node that reads it)."""
    stall_ms: float
    """How late the latest copy back ends after its value is needed (0: all hidden)."""


class _Index:
    """Per-profile lookups the simulator and the planner share (built once per profile)."""

    def __init__(self, profile: Profile):
        self.profile = profile
        st = profile.storages
        self.storage_of: dict[fx.Node, int] = {a: i for i, aliases in enumerate(st["aliases"])
                                                for a in aliases if is_tensor_node(a)}
        self.multi_output = {a for aliases in st["aliases"] for a in aliases
                             if a.op == "call_function" and not is_tensor_node(a)}
        self.activation_row = {n: i for i, n in enumerate(st["node"])
                               if st.at[i, "category"] == "activation"}
        self.activation_rows = frozenset(self.activation_row.values())
        self.rank = profile.rank
        self.phase = dict(zip(profile.nodes["node"], profile.nodes["phase"]))
        self.runtime = dict(zip(profile.nodes["node"], profile.nodes["runtime_ms"]))
        # rank by which a node's value has been read: later where fused kernels inline it into
        # the kernel of a later node (planner.fused_costs), else its own
        self.done = dict(zip(profile.nodes["node"], profile.nodes["done_rank"])) \
            if "done_rank" in profile.nodes else self.rank
        self.workspace = profile.nodes["workspace_B"].to_numpy()
        self.n_nodes = len(profile.nodes)
        # start time of each rank (and the end of the last) on the profiled timeline, in ms
        self.start_ms = np.concatenate([[0.0], np.cumsum(profile.nodes["runtime_ms"].to_numpy())])
        phases = profile.nodes["phase"].to_numpy()
        backward = np.flatnonzero(phases == "backward")
        self.backward_start = int(backward[0]) if len(backward) else self.n_nodes
        acts = profile.activations
        self.act_bytes = dict(zip(acts["node"], acts["bytes"].astype(int)))
        self.last_fwd = dict(zip(acts["node"], acts["last_fwd_use_rank"].astype(int)))
        self.first_bwd = dict(zip(acts["node"], acts["first_bwd_use_rank"].astype(int)))
        # pinned-host copy bandwidth per direction (bytes/ms); the slower one where the profile
        # has only that
        gbps = profile.summary.get("host_device_bandwidth_GBps")
        self.bandwidth_B_per_ms = {
            d: float(profile.summary.get(f"{d}_GBps") or gbps) * 1e6 if gbps else None
            for d in ("to_host", "to_device")}

    @property
    def can_swap(self) -> bool:
        """Whether the profile measured the host link (CUDA profiles): swaps can be planned."""
        return all(self.bandwidth_B_per_ms.values())

    def available(self, dropped_rows: set[int]):
        """Predicate: is a forward value there for backward without re-running anything?

        True for inputs (placeholders, constants), views of persistent memory (parameters, the
        batch) and activations that are kept; false for dropped activations and for forward
        temporaries, which are freed during forward.
        """
        activation_rows = self.activation_rows

        def available(n: fx.Node) -> bool:  # reads dropped_rows live: the planner grows it
            if n.op in ("placeholder", "get_attr"):
                return True
            if n in self.multi_output:  # only its getitems can be saved
                return False
            row = self.storage_of.get(n)
            return row is None or (row in activation_rows and row not in dropped_rows)

        return available

    def is_backward(self, n: fx.Node) -> bool:
        return self.phase.get(n) == "backward"

    def needed_by_backward(self, row: int) -> list[fx.Node]:
        """The aliases of storage ``row`` that backward nodes read directly."""
        return [a for a in self.profile.storages.at[row, "aliases"]
                if any(self.is_backward(u) for u in a.users)]


def profile_index(profile: Profile) -> _Index:
    """The simulator's lookups for ``profile``, built on first use and kept on the profile."""
    cached = getattr(profile, "_sim_index", None)
    if cached is None:
        cached = _Index(profile)
        profile._sim_index = cached
    return cached


def recompute_closure(profile: Profile, dropped: Iterable[fx.Node],
                      index: _Index | None = None) -> tuple[set[fx.Node], set[fx.Node]]:
    """The forward nodes backward must re-run when ``dropped`` activations are not saved.

    Returns (nodes to re-run, kept values they read). A node is available without re-running if
    it is an input (placeholder), aliases persistent memory (a view of a parameter), or aliases a
    kept activation.
    """
    ix = index or profile_index(profile)
    dropped_rows = {ix.activation_row[n] for n in dropped}
    available = ix.available(dropped_rows)

    rerun: set[fx.Node] = set()
    sources: set[fx.Node] = set()
    stack = [a for r in dropped_rows for a in ix.needed_by_backward(r)]
    while stack:
        n = stack.pop()
        if n in rerun:
            continue
        rerun.add(n)
        for inp in n.all_input_nodes:
            if available(inp):
                sources.add(inp)
            elif inp not in rerun:
                stack.append(inp)
    return rerun, sources


def swap_ms(profile: Profile, nbytes: int, direction: str = "to_host") -> float:
    """Planned time of one copy of ``nbytes`` ``"to_host"`` or ``"to_device"``, with
    :data:`SWAP_SLACK` (inf without a measured bandwidth: on the CPU nothing is swapped)."""
    bw = profile_index(profile).bandwidth_B_per_ms[direction]
    return nbytes / bw * SWAP_SLACK if bw else float("inf")


def swap_schedule(profile: Profile, swapped: Iterable[fx.Node],
                  need_rank: dict[fx.Node, int] | None = None) -> SwapSchedule:
    """When the ``swapped`` activations move, and how long the step waits for them.

    ``need_rank`` overrides the first backward rank that reads an activation (the simulator
    passes the placement of re-run nodes that read it). Times are the profile's node runtimes;
    each copy takes :func:`swap_ms`.
    """
    ix = profile_index(profile)
    t0 = ix.start_ms
    swapped = list(swapped)
    out_ms = {n: swap_ms(profile, ix.act_bytes[n], "to_host") for n in swapped}
    in_ms = {n: swap_ms(profile, ix.act_bytes[n], "to_device") for n in swapped}
    need = {n: ix.first_bwd[n] for n in swapped}
    if need_rank:
        need.update({n: r for n, r in need_rank.items() if n in need})

    out_done, out_end_ms, free = {}, {}, 0.0
    for n in sorted(swapped, key=ix.last_fwd.__getitem__):
        begin = max(t0[ix.last_fwd[n] + 1], free)
        free = out_end_ms[n] = begin + out_ms[n]
        out_done[n] = int(np.searchsorted(t0, free, side="left"))

    prefetch, latest = {}, np.inf
    for n in sorted(swapped, key=lambda n: need[n], reverse=True):  # as late as possible
        end = min(t0[need[n]], latest)
        latest = end - in_ms[n]
        prefetch[n] = int(min(max(np.searchsorted(t0, latest, side="right") - 1,
                                  ix.backward_start), need[n]))

    stall, free = 0.0, 0.0
    for n in sorted(swapped, key=lambda n: (prefetch[n], need[n])):
        free = max(t0[prefetch[n]], free, out_end_ms[n]) + in_ms[n]
        stall = max(stall, free - t0[need[n]])
    return SwapSchedule(out_done_rank=out_done, prefetch_rank=prefetch, need_rank=need,
                        stall_ms=float(stall) if stall > 1e-6 else 0.0)  # (rounding)


def _sweep(begin: np.ndarray, end: np.ndarray, nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes live at each event time, for allocations live over closed intervals [begin, end].

    Returns the running total after each event and the event times. Allocations at a time are
    counted before frees at that time, so what is used and what is made at a node overlap.
    """
    eps = 1e-7  # below the refined timeline's spacing
    t = np.concatenate([begin, end + eps])
    d = np.concatenate([nbytes, -nbytes])
    order = np.lexsort((-d, t))  # by time, allocations first
    return np.cumsum(d[order]), t[order]


def _timeline(profile: Profile, dropped: list[fx.Node], swapped: list[fx.Node] = ()):
    """Allocations of the iteration under a plan, on the refined timeline.

    Returns (begin, end, bytes, category) arrays, the nodes re-run, their placement, and the
    swap schedule (None when nothing is swapped).
    """
    ix = profile_index(profile)
    st = profile.storages
    starts, stops, nbytes = st["start"].to_numpy().copy(), st["stop"].to_numpy().copy(), \
        st["bytes"].to_numpy()
    category = st["category"].to_numpy()
    rerun, _ = recompute_closure(profile, dropped, ix)
    rerun_bytes = nbytes
    if "fused_away" in st:  # (a profile of planner.fused_costs: the step on fused kernels)
        # a value that fused kernels never write takes no memory, unless the plan saves it
        away = st["fused_away"].to_numpy().copy()
        dropped_rows = {ix.activation_row[n] for n in dropped}
        away[list(ix.activation_rows - dropped_rows)] = False
        nbytes = np.where(away, 0, nbytes)
        rerun_bytes = np.where(st["fused_away_rerun"].to_numpy(), 0, rerun_bytes)
    rank = ix.rank

    # Each re-run node goes just before its first consumer in backward; a re-run node consumed
    # only by other re-run nodes goes before the earliest of them (users first: reverse order).
    placement: dict[fx.Node, int] = {}
    for n in sorted(rerun, key=rank.__getitem__, reverse=True):
        needs = [rank[u] for u in n.users if ix.is_backward(u)] + \
                [placement[u] for u in n.users if u in placement]
        placement[n] = min(needs)

    # Dropped activations die after their last forward use.
    for node in dropped:
        row = ix.activation_row[node]
        fwd_uses = [ix.done[u] for a in st.at[row, "aliases"] for u in a.users
                    if ix.phase.get(u) == "forward"]
        stops[row] = max(fwd_uses, default=starts[row])

    # A refined timeline: original node r at position r; the m nodes re-run before backward node
    # P get positions inside (P - 1, P), in forward order, so a recomputed chain runs one node at
    # a time and each intermediate dies once its consumer has run.
    pos: dict[fx.Node, float] = {}
    by_slot: dict[int, list[fx.Node]] = {}
    for n in sorted(placement, key=rank.__getitem__):
        by_slot.setdefault(placement[n], []).append(n)
    for slot, group in by_slot.items():
        for k, n in enumerate(group):
            pos[n] = slot - 1 + (k + 1) / (len(group) + 1)

    begin = starts.astype(np.float64)
    end = stops.astype(np.float64)
    rerun_rows = {ix.storage_of[n] for n in rerun if n in ix.storage_of}
    extra_begin, extra_end, extra_bytes = [], [], []
    for row in rerun_rows:
        aliases = [a for a in st.at[row, "aliases"] if a in rerun]
        b = min(pos[a] for a in aliases)
        uses = [ix.done[u] for a in aliases for u in a.users if ix.is_backward(u)] + \
               [pos[u] for a in aliases for u in a.users if u in pos]
        extra_begin.append(b)
        extra_end.append(max(uses + [b]))
        extra_bytes.append(rerun_bytes[row])
    # Kept values that a re-run node reads stay alive until it has run.
    for n, where in pos.items():
        for inp in n.all_input_nodes:
            row = ix.storage_of.get(inp)
            if row is not None and row not in rerun_rows and end[row] < where:
                end[row] = where

    # Swapped activations are on the host between the end of the copy out and the start of the
    # copy back; backward needs one at its first use or at the first re-run node that reads it.
    schedule = None
    if swapped:
        need = {}
        for node in swapped:
            aliases = st.at[ix.activation_row[node], "aliases"]
            readers = [pos[u] for a in aliases for u in a.users if u in pos]
            need[node] = int(np.floor(min([ix.first_bwd[node], *readers])))
        schedule = swap_schedule(profile, swapped, need)
        for node in swapped:
            row = ix.activation_row[node]
            out, back = schedule.out_done_rank[node], schedule.prefetch_rank[node]
            if out < back:
                extra_begin.append(back)
                extra_end.append(end[row])
                extra_bytes.append(nbytes[row])
                end[row] = max(out, starts[row])

    # scratch space of each node counts as "other" while it runs
    ranks = np.arange(ix.n_nodes, dtype=np.float64)
    times = np.concatenate([begin, extra_begin, ranks])
    until = np.concatenate([end, extra_end, ranks])
    amount = np.concatenate([nbytes, extra_bytes, ix.workspace]).astype(np.int64)
    cats = np.concatenate([category, ["activation"] * len(extra_bytes),
                           ["other"] * ix.n_nodes])
    return times, until, amount, cats, rerun, placement, schedule


def simulate(profile: Profile, dropped: Iterable[fx.Node] = (),
             swapped: Iterable[fx.Node] = ()) -> Simulation:
    """Peak memory and added runtime of the iteration when ``dropped`` activations are recomputed
    and ``swapped`` ones go to the host and back.

    Args:
        profile: the profiled iteration.
        dropped: nodes from ``profile.activations["node"]`` that are not saved for backward.
        swapped: nodes from ``profile.activations["node"]`` that are saved on the host.
    """
    ix = profile_index(profile)
    times, until, amount, _, rerun, placement, swaps = _timeline(profile, list(dropped),
                                                                 list(swapped))
    during, at = _sweep(times, until, amount)
    during = during + profile.persistent_B
    i = int(np.argmax(during))
    return Simulation(
        peak_B=int(during[i]), peak_rank=int(np.ceil(at[i])),
        extra_ms=float(sum(ix.runtime.get(n, 0.0) for n in rerun))
        + (swaps.stall_ms if swaps else 0.0),
        recomputed_nodes=sorted(rerun, key=ix.rank.__getitem__), placement=placement,
        during_B=during, swaps=swaps,
    )


def peak_breakdown(profile: Profile, dropped: Iterable[fx.Node] = (),
                   swapped: Iterable[fx.Node] = ()) -> dict[str, int]:
    """Bytes per category live at the simulated peak under a plan (scratch space is "other")."""
    times, until, amount, cats, _, _, _ = _timeline(profile, list(dropped), list(swapped))
    during, at = _sweep(times, until, amount)
    t = at[int(np.argmax(during))]
    live = (times <= t) & (until >= t)
    out = {c: 0 for c in CATEGORIES}
    for c, b in profile.summary["persistent_B"].items():
        out[c] += int(b)
    for c in CATEGORIES:
        out[c] += int(amount[live & (cats == c)].sum())
    return out


def phase_peaks(profile: Profile, dropped: Iterable[fx.Node] = (),
                swapped: Iterable[fx.Node] = ()) -> dict[str, int]:
    """Simulated bytes under a plan, phase by phase: the peak of each phase of the step
    (``"forward"``, ``"backward"``, ``"optimizer"``, where the step has it) and what is live when
    forward ends (``"after_forward"``), persistent memory included: what a measurement of each
    phase compares with."""
    times, until, amount, *_ = _timeline(profile, list(dropped), list(swapped))
    during, at = _sweep(times, until, amount)
    during = during + profile.persistent_B
    ranks = np.minimum(np.floor(at).astype(int), len(profile.nodes) - 1)
    phases = profile.nodes["phase"].to_numpy()[ranks]
    out = {ph: int(during[phases == ph].max()) for ph in ("forward", "backward", "optimizer")
           if (phases == ph).any()}
    if "forward" in out:
        out["after_forward"] = int(during[phases == "forward"][-1])
    return out
