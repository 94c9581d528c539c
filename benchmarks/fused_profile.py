"""Where the planned step on inductor's kernels stands against ``torch.compile``: per option,
step time, host time, kernel time and count, peak, and the top of a kernel profile.

Options (comma-separated ``--configs``): ``eager``; ``compile`` (``torch.compile``, inductor's
own partition); ``mutwo`` and ``mutwo-ind`` (MuTwoAC op by op / ``kernels="inductor"``), each
with nothing recomputed, or ``@share`` for a budget that share of the way from the plan's floor
to the peak (``mutwo-ind@0.3``). Every option trains a fresh model in this process (Adam).

Each entry also has every step's own peak over as many more steps (``step_peaks_GiB``), the
graphs dynamo captured after the first step (a recompile would capture, profile and compile
again inside a measured step) and the re-plans. Writes
``<out>/fused_profile_<model>_<precision>.json`` (one entry per option),
``<out>/kernels_<model>_<precision>_<option>.txt`` (torch.profiler's table over two steps, by
CUDA time) and, for ``mutwo-ind``, inductor's generated forward and backward
(``code_<model>_<precision>_<option>_{fwd,bwd}.py``). With ``--phases`` each entry also has
one more step measured phase by phase (peak of forward, backward, optimizer; allocated after
forward) beside the simulator's figures for the same phases under the plan, on the profile the
plan was made on (:func:`lightning_ac.planner.fused_costs` of it for a fused step).

    PYTHONPATH=. python benchmarks/fused_profile.py --model bert --batch-size 32 \\
        --precision bf16-mixed --configs eager,compile,mutwo-ind,mutwo --out reports/fused
"""

from __future__ import annotations

import gc
import json
import time

import torch
from torch._dynamo.utils import counters

from benchmarks.common import NO_LIMIT, load_workload, planned_step, with_precision, workload_parser
from lightning_ac.measure import measure_steps, train_step
from lightning_ac.planner import fused_costs
from lightning_ac.simulator import peak_breakdown, phase_peaks, simulate

GIB = 2**30


def build(option: str, w, optimizer):
    """The step function of ``option`` for workload ``w``, and its AutoCheckpoint (or None)."""
    kind, _, share = option.partition("@")
    if kind == "eager":
        return w.loss, None
    if kind == "compile":
        return torch.compile(w.loss), None
    if kind in ("mutwo", "mutwo-ind"):
        ac = planned_step(w, optimizer, None if share else NO_LIMIT, share=float(share or 0.5),
                          kernels="inductor" if kind == "mutwo-ind" else "eager")
        return ac, ac
    raise ValueError(f"unknown option {option!r}")


def planned_profile(ac):
    """The profile ``ac``'s plan was made on (:func:`~lightning_ac.planner.fused_costs` of the
    measured one for a fused step)."""
    fused = ac.last.planned is not None and ac.last.planned[0].fused
    return fused_costs(ac.profile) if fused else ac.profile


def run(option: str, args, device: torch.device) -> dict:
    """One option: its figures, and its kernel table and generated code under ``args.out``."""
    from torch.profiler import ProfilerActivity, profile

    torch.compiler.reset()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    w = load_workload(args.model, args.batch_size, device=device, seq_len=args.seq_len)
    optimizer = torch.optim.Adam(w.model.parameters(), lr=1e-4)
    fn, ac = build(option, w, optimizer)
    step = with_precision(fn, device, args.precision)
    t0 = time.perf_counter()
    train_step(step, w.inputs, optimizer)
    torch.cuda.synchronize(device)
    first_s = time.perf_counter() - t0
    graphs = counters["stats"]["unique_graphs"]
    m = measure_steps(step, w.inputs, optimizer, steps=args.steps, warmup=args.warmup)
    # each step's own peak, and whether anything was captured again meanwhile (a dynamo
    # recompile would capture, profile and compile anew inside a measured step)
    step_peaks = []
    for _ in range(args.steps):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(step, w.inputs, optimizer)
        torch.cuda.synchronize(device)
        step_peaks.append(round((torch.cuda.max_memory_allocated(device) - base) / GIB, 3))
    recaptured = counters["stats"]["unique_graphs"] - graphs
    # host time per step: the loop without a sync, then the sync (the GPU's lag behind it)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(5):
        train_step(step, w.inputs, optimizer)
    host_s = (time.perf_counter() - t0) / 5
    torch.cuda.synchronize(device)
    wall_s = (time.perf_counter() - t0) / 5
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            train_step(step, w.inputs, optimizer)
        torch.cuda.synchronize(device)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    tag = f"{args.model}_{args.precision}_{option.replace('@', '_at_')}"
    (args.out / f"kernels_{tag}.txt").write_text(
        events.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    row = {"step_ms": m.step_ms, "peak_GiB": (m.peak_B - base) / GIB, "first_step_s": first_s,
           "step_peaks_GiB": step_peaks, "graphs_captured_after_first_step": recaptured,
           "host_ms": host_s * 1e3, "wall_ms": wall_s * 1e3,
           "kernel_ms": sum(e.device_time_total for e in kernels) / 2 / 1e3,
           "kernels": sum(e.count for e in kernels) / 2}
    if ac is not None:
        row["replans"] = ac.replans
    if ac is not None and ac.plan is not None:
        row.update(predicted_peak_GiB=ac.plan.predicted_peak_B / GIB,
                   recomputed=len(ac.plan.recomputed), swapped=len(ac.plan.swapped))
        profile = planned_profile(ac)
        sim = simulate(profile, ac.plan.recomputed, ac.plan.swapped)
        at = profile.nodes.iloc[min(sim.peak_rank, len(profile.nodes) - 1)]
        row["predicted_peak_at"] = str(at.get("name", at.name))
        row["predicted_peak_GiB_by_category"] = {
            c: round(b / GIB, 3) for c, b in peak_breakdown(
                profile, ac.plan.recomputed, ac.plan.swapped).items() if b}
        planned = ac.last.planned[0] if ac.last.planned is not None else None
        if planned is not None and planned.fused:
            row["compiled"] = planned._run_fwd.compiled and planned._run_bwd.compiled
            row["inductor_compile_s"] = planned.compile_s
            for side, g in (("fwd", planned._run_fwd), ("bwd", planned._run_bwd)):
                source = getattr(g._run, "source_code", None)
                if source:
                    (args.out / f"code_{tag}_{side}.py").write_text(source)
    if args.phases:
        row["measured_phases"] = measured_phases(step, w.inputs, optimizer, device, base)
        if ac is not None and ac.plan is not None:
            row["predicted_phases"] = {
                f"{k}_GiB" if k == "after_forward" else f"{k}_peak_GiB": b / GIB
                for k, b in phase_peaks(planned_profile(ac), ac.plan.recomputed,
                                        ac.plan.swapped).items()}
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


def measured_phases(step, inputs, optimizer, device: torch.device, base: int) -> dict:
    """One more step, phase by phase: the allocator's peak in forward, backward and the
    optimizer step, and what is allocated after forward (GiB above ``base``)."""
    out = {}

    def mark(name):
        torch.cuda.synchronize(device)
        out[f"{name}_peak_GiB"] = (torch.cuda.max_memory_allocated(device) - base) / GIB
        torch.cuda.reset_peak_memory_stats(device)

    optimizer.zero_grad(set_to_none=True)
    mark("before")
    loss = step(*inputs)
    mark("forward")
    out["after_forward_GiB"] = (torch.cuda.memory_allocated(device) - base) / GIB
    loss.backward()
    del loss
    mark("backward")
    optimizer.step()
    mark("optimizer")
    del out["before_peak_GiB"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = workload_parser(__doc__, "bert", 32, out="reports/fused")
    ap.add_argument("--configs", default="eager,compile,mutwo-ind,mutwo",
                    help="comma-separated options (see above)")
    ap.add_argument("--phases", action="store_true",
                    help="also measure and predict the peak of each phase (forward, backward, "
                         "optimizer)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("fused_profile measures CUDA kernels: run it on a GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for option in args.configs.split(","):
        results[option] = run(option, args, device)
        print(option, results[option], flush=True)
        path = args.out / f"fused_profile_{args.model}_{args.precision}.json"
        path.write_text(json.dumps(results, indent=1))  # nothing lost if a later one fails
    return results


if __name__ == "__main__":
    main()
