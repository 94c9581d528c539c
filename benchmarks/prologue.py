"""Host time before the step's first kernel: eager against the rewritten step.

Each measured step starts with an empty GPU queue (the step-time benchmarks synchronize after
every step), so whatever the host does between the call and the first kernel launch is step time.
Eager launches its first kernel almost at once; the rewritten step first evaluates dynamo's
guards and runs AOTAutograd's runtime wrappers over every parameter and buffer. This benchmark
stamps the host clock at the call, at the forward graph's first and last node, at ``backward()``
and at the backward graph's first and last node (for eager: at the first leaf module's forward
pre-hook), and prints the medians per step; then it profiles the forward call with ``cProfile``
and lists the functions with the most own time.

On CUDA it also records an event with each stamp and reports the GPU's lag behind the host
at each point (``lead_*``): where it is near zero the GPU was waiting for the host.

``--skip-guards`` adds the rewritten step run under
``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` to see what the guards cost.
``--budget`` (with ``--swap on|off``) plans the rewritten step for a budget instead of keeping
everything.

    PYTHONPATH=. python benchmarks/prologue.py --model resnet152 --batch-size 128 --steps 20 --out $OUT
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import NO_LIMIT, load_workload, planned_step, workload_parser
from lightning_ac import rewriter
from lightning_ac.measure import measure_steps

PHASES = ("call_to_forward", "forward_graph", "forward_to_return", "backward_to_graph")
"""Host ms per step: call → forward graph's first node, the forward graph itself, its last node →
the call's return, ``backward()`` → the backward graph's first node."""


LEADS = ("fwd_in", "fwd_out", "returned", "bwd_in", "backward_done", "step_done")
"""Points of the step at which the GPU's lag behind the host is measured (see :func:`_phases`)."""

STAMPS: dict[str, float] = {}
"""Host clock stamps by name, set from inside graphs and hooks."""

EVENTS: dict[str, torch.cuda.Event] = {}
"""A CUDA event recorded with each stamp, when the step runs on CUDA."""


def stamp(name: str) -> None:
    """Set ``STAMPS[name]`` to now, and record a CUDA event if the step is on CUDA (called from
    the stamped graphs, so a plain function)."""
    STAMPS[name] = time.perf_counter()
    if EVENTS.get("start") is not None:
        EVENTS[name] = torch.cuda.Event(enable_timing=True)
        EVENTS[name].record()


def _stamped_partition():
    """``rewriter.partition`` with a stamp at the first and last node of each graph."""
    plain = rewriter.partition

    def partition(joint, plan):
        fwd, bwd = plain(joint, plan)
        for gm, first_name, last_name in ((fwd, "fwd_in", "fwd_out"), (bwd, "bwd_in", None)):
            g = gm.graph
            first = next(n for n in g.nodes if n.op != "placeholder")
            with g.inserting_before(first):
                g.call_function(stamp, (first_name,))
            if last_name:
                with g.inserting_before(g.output_node()):
                    g.call_function(stamp, (last_name,))
            gm.recompile()
        return fwd, bwd

    return partition


def _phases(fn, inputs, opt, steps: int) -> dict[str, float]:
    """Median host ms of each of :data:`PHASES` over ``steps`` steps, synchronized between.

    On CUDA also the GPU's lag at each of :data:`LEADS` (``lead_<point>``): how long after the
    host reached the point the GPU reached it, in ms. The step starts with an empty queue, so
    an event recorded then marks the host's clock on the GPU's. A lag near zero means the GPU
    was waiting for the host there; everything the host does next is step time.
    """
    cuda = inputs[0].is_cuda
    rows = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        STAMPS.clear()
        EVENTS.clear()
        if cuda:
            torch.cuda.synchronize()
            EVENTS["start"] = torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        if cuda:
            EVENTS["start"].record()
        loss = fn(*inputs)
        stamp("returned")
        loss.backward()
        stamp("backward_done")
        opt.step()
        stamp("step_done")
        t = STAMPS
        row = {
            "call_to_forward": t["fwd_in"] - t0,
            "forward_graph": t.get("fwd_out", t["returned"]) - t["fwd_in"],
            "forward_to_return": t["returned"] - t.get("fwd_out", t["returned"]),
            "backward_to_graph": t["bwd_in"] - t["returned"] if "bwd_in" in t else float("nan"),
        }
        if cuda:
            torch.cuda.synchronize()
            start = EVENTS.pop("start")
            for name in LEADS:
                if name in EVENTS:
                    row[f"lead_{name}"] = start.elapsed_time(EVENTS[name]) / 1e3 - (t[name] - t0)
        rows.append(row)
    EVENTS.clear()
    return {k: round(1e3 * statistics.median(r[k] for r in rows), 3) for k in rows[0]}


def _top_own_time(fn, inputs, opt, steps: int, rows: int) -> str:
    """``cProfile`` of the forward calls of ``steps`` steps, the top ``rows`` by own time."""
    prof = cProfile.Profile()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        prof.enable()
        loss = fn(*inputs)
        prof.disable()
        loss.backward()
        opt.step()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(rows)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> dict:
    ap = workload_parser(__doc__, "resnet152", 128)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--skip-guards", action="store_true",
                    help="also run the rewritten step with dynamo's guard evaluation skipped")
    ap.add_argument("--budget", default=None,
                    help="plan the rewritten step for this budget (default: nothing recomputed)")
    ap.add_argument("--swap", choices=("on", "off"), default="on",
                    help="with --budget: let the plan swap (on) or recompute only (off)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    results: dict = {"model": args.model, "batch_size": args.batch_size, "torch": torch.__version__,
                     "budget": args.budget, "swap": args.swap if args.budget else None}
    for label in ("eager", "rewritten"):
        torch.compiler.reset()
        w = load_workload(args.model, args.batch_size, device=device, seq_len=args.seq_len)
        opt = torch.optim.Adam(w.model.parameters(), lr=1e-4)
        STAMPS.clear()
        if label == "eager":
            leaf = next(m for m in w.model.modules() if not list(m.children()))
            leaf.register_forward_pre_hook(lambda *_: stamp("fwd_in"))
            fn = w.loss
        else:
            rewriter.partition, plain = _stamped_partition(), rewriter.partition
            try:
                fn = planned_step(w, opt, budget=args.budget or NO_LIMIT,  # default: nothing dropped
                                  swap=args.swap == "on")
                fn(*w.inputs).backward()  # capture, profile, plan
                results["plan"] = fn.plan.summary()
                print(f"plan: {results['plan']}")
            finally:
                rewriter.partition = plain
        variants = {label: contextlib.nullcontext}
        if label == "rewritten" and args.skip_guards:
            variants["rewritten, guards skipped"] = lambda: torch.compiler.set_stance(
                "default", skip_guard_eval_unsafe=True)
        for name, ctx in variants.items():
            with ctx():
                step = measure_steps(fn, w.inputs, opt, steps=args.steps, warmup=args.warmup)
                phases = _phases(fn, w.inputs, opt, args.steps)
                top = _top_own_time(fn, w.inputs, opt, 5, args.rows)
            results[name] = {"step_ms": round(step.step_ms, 2), **phases, "cprofile_forward": top}
            print(f"=== {name}: step {step.step_ms:.2f} ms; host ms "
                  + ", ".join(f"{k} {v}" for k, v in phases.items()))
            print(top)
        del w, opt, fn
    if args.out:
        suffix = f"_{args.budget}_swap_{args.swap}" if args.budget else ""
        path = Path(args.out) / f"{args.model}_prologue{suffix}.json"
        path.write_text(json.dumps(results, indent=1))
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
