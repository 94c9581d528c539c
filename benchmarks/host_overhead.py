"""Where the time goes in one training step: eager against the rewritten step.

Runs torch.profiler (CPU activity) around a few steps of each and prints the ops with the most
self CPU time, plus wall time per step and the number of op calls per step. ``--kernels`` adds
CUDA activity and lists device time by kernel: that is how backward re-running every ResNet
BatchNorm was found (``reports/host/kernels_resnet152_b128_before_9cf386d.txt``). ``--budget``
plans the rewritten step for a budget, to see what its recomputation costs kernel by kernel.

    PYTHONPATH=. python benchmarks/host_overhead.py --model resnet152 --batch-size 32
    PYTHONPATH=. python benchmarks/host_overhead.py --model bert --batch-size 32 --budget 11GiB \\
        --kernels      # device time by kernel, with a plan's recomputation
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import NO_LIMIT, load_workload, planned_step, workload_parser
from lightning_ac.measure import train_step
from lightning_ac.planner import rerun_by_op


def _step(fn, inputs, opt, sync):
    train_step(fn, inputs, opt)
    sync()


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Print the tables; return wall ms and aten op calls per step for each variant."""
    ap = workload_parser(__doc__, "resnet152", 32)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--budget", default=None,
                    help='plan the rewritten step for this budget (default: nothing recomputed)')
    ap.add_argument("--kernels", action="store_true",
                    help="also record CUDA activity and list the kernels by device time")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    results: dict[str, dict] = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for label in ("eager", "rewritten"):
        torch.compiler.reset()
        w = load_workload(args.model, args.batch_size, device=device, seq_len=args.seq_len)
        opt = torch.optim.Adam(w.model.parameters(), lr=1e-4)
        fn = w.loss
        if label == "rewritten":
            fn = planned_step(w, opt, args.budget or NO_LIMIT, profile_options={"runs": 1})
        for _ in range(max(1, args.warmup)):
            _step(fn, w.inputs, opt, sync)
        if label == "rewritten":
            print(f"plan: {fn.plan.summary()}")
            if fn.plan.recomputed_nodes:  # the prediction, by op, to set beside the kernel table
                print(rerun_by_op(fn.plan, fn.profile).to_string())
        t0 = time.perf_counter()
        for _ in range(args.steps):
            _step(fn, w.inputs, opt, sync)
        wall = (time.perf_counter() - t0) / args.steps * 1e3
        activities = [ProfilerActivity.CPU]
        if args.kernels and device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                _step(fn, w.inputs, opt, sync)
        avg = prof.key_averages()
        calls = sum(e.count for e in avg if e.key.startswith("aten::")) / args.steps
        results[label] = {"wall_ms": wall, "aten_calls": calls}
        print(f"\n=== {label}: {wall:.1f} ms/step wall, {calls:.0f} aten op calls/step")
        print(avg.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        if len(activities) > 1:
            # Device time by kernel: where a GPU-bound step's extra milliseconds go.
            kernels = [e for e in avg if e.self_device_time_total > 0 and not e.key.startswith("aten::")]
            dev_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / args.steps
            results[label]["kernel_ms"] = dev_ms
            print(f"--- {label}: {dev_ms:.1f} ms of kernels per step")
            print(avg.table(sort_by="self_device_time_total", row_limit=args.rows,
                            max_name_column_width=90))
        del w, opt, fn
    return results


if __name__ == "__main__":
    main()
