"""Profile one training iteration: ``python -m benchmarks.profile_step --model resnet152 --batch-size 32``.

Captures and profiles one training iteration (forward, backward, optimizer) of a reference
workload on synthetic data (or ``--model pkg.module:function``, a workload of your own), checks
the profile against a real eager step of the same model, and writes ``nodes.csv``,
``activations.csv``, ``memory.csv``, ``summary.json``, ``memory.png`` and ``peak_breakdown.png``
into ``--out`` (default ``reports/profile/<model>``). The batch size defaults to 32 on a GPU and
2 on the CPU; ``--steps`` and ``--warmup`` are the eager steps of the check.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import load_workload, workload_parser

_GIB = 2**30
_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
# Ops present in both the captured graph and eager autograd, to compare per-op runtimes with
# torch.profiler (eager BatchNorm runs cuDNN kernels the captured graph does not, so it is left out).
_SPOT_CHECK_OPS = ("convolution", "convolution_backward", "addmm", "mm", "bmm",
                   "native_layer_norm", "native_layer_norm_backward", "gelu", "relu",
                   "threshold_backward", "max_pool2d_with_indices")


def _parser() -> argparse.ArgumentParser:
    p = workload_parser(__doc__, "resnet152", 0)
    p.set_defaults(batch_size=None)
    p.add_argument("--optimizer", choices=sorted(_OPTIMIZERS), default="adam")
    p.add_argument("--runs", type=int, default=3, help="timed runs per node (median kept)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the eager reference step and the torch.profiler spot check")
    return p


def _log(msg: str) -> None:
    print(msg, flush=True)


def profile_command(args: argparse.Namespace) -> dict:
    from lightning_ac.profiler import profile_step

    device = torch.device(args.device)
    batch = args.batch_size or (32 if device.type == "cuda" else 2)
    if batch < 1:
        raise SystemExit(f"--batch-size must be positive, got {batch}")
    out = args.out or Path("reports/profile") / args.model.replace(":", "_")
    _log(f"[lightning-ac] profiling {args.model} batch {batch} on {device} "
         f"({args.optimizer}, {args.runs} timed runs per node)")
    w = load_workload(args.model, batch, device=device, seq_len=args.seq_len)
    opt = _OPTIMIZERS[args.optimizer](w.model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    prof = profile_step(w.loss, w.inputs, w.model, opt, runs=args.runs)
    total_s = time.perf_counter() - t0
    s = prof.summary
    s.update(title=f"{args.model} batch {batch}, {args.optimizer}", model=args.model,
             batch_size=batch, optimizer=args.optimizer, capture_profile_s=round(total_s, 2),
             command="python -m benchmarks.profile_step " + " ".join(sys.argv[1:]))
    if args.model in ("bert", "tiny-bert"):
        s["seq_len"] = w.inputs[0].shape[1]
    if device.type == "cuda":
        s["device_limit_B"] = torch.cuda.get_device_properties(device).total_memory
    _log(f"  captured {sum(s['n_nodes'].values())} nodes "
         f"(forward {s['n_nodes']['forward']}, backward {s['n_nodes']['backward']}, "
         f"optimizer {s['n_nodes']['optimizer']}), {s['n_activations']} activations, "
         f"capture {s['capture_s']:.1f} s + profile {s['profile_s']:.1f} s")
    if not args.no_check:
        _check_against_eager(prof, w, opt, device, args.steps, args.warmup)
    out.mkdir(parents=True, exist_ok=True)
    paths = prof.to_csv(out)
    prof.to_json(out / "summary.json")
    paths += [out / "summary.json"] + prof.plot(out)
    _log(f"  predicted peak {s['predicted_peak_B'] / _GIB:.3f} GiB at {s['peak_node']} "
         f"({s['peak_phase']}); sum of node runtimes {s['sum_runtime_ms']:.1f} ms")
    if s.get("eager_peak_B"):
        _log(f"  eager step: peak {s['eager_peak_B'] / _GIB:.3f} GiB "
             f"(profile/eager {s['peak_ratio']:.3f}), {s['eager_step_ms']:.1f} ms/step "
             f"(sum of node runtimes / step time {s['runtime_ratio']:.3f})")
    if s.get("eager_phases_B"):
        e, p = s["eager_phases_B"], s["profile_phases_B"]
        _log("  eager vs profile, GiB: " + ", ".join(
            f"{k} {e[k] / _GIB:.3f}/{p[k] / _GIB:.3f}" for k in
            ("after_forward_B", "forward_peak_B", "backward_peak_B", "optimizer_peak_B")
            if e.get(k) is not None) + f"; saved for backward {e['saved_B'] / _GIB:.3f}/"
            f"{p['activation_B'] / _GIB:.3f}")
    if not s.get("eager_peak_B") and s.get("eager_step_ms"):
        _log(f"  eager step: {s['eager_step_ms']:.1f} ms/step "
             f"(sum of node runtimes / step time {s['runtime_ratio']:.3f})")
    _log("  wrote " + ", ".join(str(p) for p in paths))
    return s


def _check_against_eager(prof, w, opt, device, steps: int, warmup: int) -> None:
    """Add the eager step's measured peak and time, and a torch.profiler spot check."""
    from lightning_ac.measure import measure_steps

    if device.type == "cuda":
        torch.cuda.empty_cache()
    m = measure_steps(w.loss, w.inputs, opt, steps=steps, warmup=warmup)
    s = prof.summary
    s["eager_step_ms"] = round(m.step_ms, 3)
    s["runtime_ratio"] = round(s["sum_runtime_ms"] / m.step_ms, 4)
    if m.peak_B is not None:
        s["eager_peak_B"] = m.peak_B
        s["peak_ratio"] = round(s["predicted_peak_B"] / m.peak_B, 4)
    s["torch_profiler_spot_check"] = _spot_check(prof, w, opt, device)
    # Where the two agree or not, phase by phase: eager allocator figures and the bytes eager
    # autograd saves, next to the profile's own figures for the same points of the step.
    from dataclasses import asdict

    from lightning_ac.measure import measure_phases

    nodes = prof.nodes
    fwd_end = nodes.index[nodes["phase"] == "forward"][-1]
    s["eager_phases_B"] = asdict(measure_phases(w.loss, w.inputs, opt))
    s["profile_phases_B"] = {
        "activation_B": s["activation_B"],
        "after_forward_B": int(nodes.at[fwd_end, "active_mem_B"]),
        **{f"{p}_peak_B": int(nodes.loc[nodes["phase"] == p, "peak_mem_B"].max())
           for p in ("forward", "backward", "optimizer")},
    }


def _spot_check(prof, w, opt, device) -> list[dict]:
    """Per-op total runtime in our profile vs torch.profiler over one eager step."""
    from torch.profiler import ProfilerActivity, profile

    from lightning_ac.measure import train_step

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as p:
        train_step(w.loss, w.inputs, opt)
        if device.type == "cuda":
            torch.cuda.synchronize()
    opt.zero_grad(set_to_none=True)
    theirs = {}
    for evt in p.key_averages():
        t = getattr(evt, "device_time_total", 0) if device.type == "cuda" else evt.cpu_time_total
        theirs[evt.key] = (t / 1e3, evt.count)
    nodes = prof.nodes
    rows = []
    for op in _SPOT_CHECK_OPS:
        mine = nodes[nodes["op"].str.fullmatch(rf"aten\.{op}\.[\w]+")]
        key = f"aten::{op}"
        if mine.empty or key not in theirs:
            continue
        ours_ms = float(mine["runtime_ms"].sum())
        their_ms, count = theirs[key]
        rows.append({"op": key, "ours_ms": round(ours_ms, 3), "ours_count": len(mine),
                     "torch_profiler_ms": round(their_ms, 3), "torch_profiler_count": count,
                     "ratio": round(ours_ms / their_ms, 3) if their_ms else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    summary = profile_command(args)
    if summary.get("torch_profiler_spot_check"):
        _log("  torch.profiler spot check (total ms per op, ours vs torch.profiler):")
        for row in summary["torch_profiler_spot_check"]:
            _log(f"    {row['op']:<36} {row['ours_ms']:>9.3f} vs {row['torch_profiler_ms']:>9.3f}"
                 f"  (x{row['ratio']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
