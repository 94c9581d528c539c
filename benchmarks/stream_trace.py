"""Where does a swapping plan's time go? The rewritten step's GPU time split by CUDA stream.

The planner times a swap as if copies and compute did not touch each other: a copy takes its
bytes over the measured bandwidth, on its own stream, and costs the step nothing unless a copy
back is late. This benchmark checks that on the device. For the plan at ``--budget`` with
swapping and without it (recomputation only), it measures the step (median of ``--steps``, no
profiler), then traces two steps under ``torch.profiler`` and reads the trace per stream:

* the compute stream (the one with the most kernel time): busy time, and the idle gaps between
  its kernels, split by cause through each kernel's launch (the runtime call with the same
  correlation id): *host late* if the kernel after the gap was launched only after the one
  before it had ended (the host, not the GPU, set the pace), else *waiting* (the kernel was
  queued and the stream held it back: a ``swap_release``/``swap_wait`` on a copy);
* the side streams: how many copies, their time, bytes and bandwidth;
* kernels that ran while a copy was under way against the same kernels (by name) when none was.

``--baseline`` traces the eager step and the rewritten step with nothing dropped first, in the
same process, so that the plans' compute-stream time can be read against theirs.
Writes ``<out>/<model>_stream_trace.json`` and prints one line per configuration.

    PYTHONPATH=. python benchmarks/stream_trace.py --model resnet152 --batch-size 128 \\
        --budget 12GiB --out $OUT
"""

from __future__ import annotations

import bisect
import collections
import json
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import (
    NO_LIMIT,
    SWAP_MODES,
    gc_pauses,
    load_workload,
    planned_step,
    with_precision,
    workload_parser,
)
from lightning_ac import parse_budget
from lightning_ac.measure import measure_steps, train_step

GIB = 2**30
GAP_US = 30.0
"""Idle time between two compute-stream kernels counted as a gap (launches are a few µs apart)."""
TOP_KERNELS = 40
"""Kernel names listed with their compute-stream time per step (the most time first)."""


def summarize_trace(trace: dict, steps: int, gap_us: float = GAP_US) -> dict:
    """Per-step figures from a Chrome trace (``torch.profiler``'s export) of ``steps`` steps.

    Times in the trace are µs; the figures are ms per step. Kernel-beside-copy slowdowns compare
    launches of one kernel with the same grid and block (where the trace records them), so the
    same work: matched by name alone, BERT's GEMM kernels, one name over many shapes, showed
    +83 ms "beside copies" in a step whose compute time had not grown at all (H100).
    """
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_stream: dict = collections.defaultdict(list)
    for e in gpu:
        by_stream[e["args"].get("stream")].append(e)
    if not by_stream:
        raise ValueError("the trace has no GPU events")
    compute = max(by_stream, key=lambda s: sum(e["dur"] for e in by_stream[s]
                                               if e["cat"] == "kernel"))
    work = sorted(by_stream[compute], key=lambda e: e["ts"])
    # when each launch call returned (cuDNN and cuBLAS kernels go through the driver API)
    launched = {e["args"]["correlation"]: e["ts"] + e["dur"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}
    gaps, host_late = [], []  # host_late: (gap, the part of it before the host launched b)
    for a, b in zip(work, work[1:]):
        idle = b["ts"] - (a["ts"] + a["dur"])
        if idle <= gap_us:
            continue
        gaps.append((idle, a["name"][:60], b["name"][:60]))
        launch_end = launched.get(b["args"].get("correlation"))
        if launch_end is not None:
            host_late.append((idle, min(max(launch_end - (a["ts"] + a["dur"]), 0.0), idle)))
    gaps.sort(reverse=True)

    copies = sorted((e["ts"], e["ts"] + e["dur"]) for s, es in by_stream.items()
                    if s != compute for e in es if e["cat"] == "gpu_memcpy")
    starts = [c[0] for c in copies]
    ends_so_far = []  # running max of copy ends: any copy started before t still running at t?
    for _, end in copies:
        ends_so_far.append(max(end, ends_so_far[-1]) if ends_so_far else end)

    def beside_copy(e: dict) -> bool:
        i = bisect.bisect_left(starts, e["ts"] + e["dur"])  # copies that start before it ends
        return i > 0 and ends_so_far[i - 1] > e["ts"]

    def launch(e: dict) -> tuple:  # one kernel on one problem: name, grid and block
        args = e["args"]
        return e["name"][:80], tuple(args.get("grid", ())), tuple(args.get("block", ()))

    alone, beside = collections.defaultdict(list), collections.defaultdict(list)
    for e in work:
        if e["cat"] == "kernel":
            (beside if beside_copy(e) else alone)[launch(e)].append(e["dur"])
    slower = []
    for key, durs in beside.items():
        if len(durs) >= 3 and len(alone.get(key, ())) >= 3:
            excess = (statistics.mean(durs) - statistics.mean(alone[key])) * len(durs)
            name, grid, _ = key
            slower.append((excess / 1e3 / steps, f"{name} grid={list(grid)}" if grid else name))
    slower.sort(reverse=True)

    side = {}
    for s, es in by_stream.items():
        cps = [e for e in es if e["cat"] == "gpu_memcpy"]
        if s == compute or not cps:
            continue
        gbps = [e["args"].get("memory bandwidth (GB/s)", 0.0) for e in cps]
        side[str(s)] = {"copies": len(cps) / steps,
                        "ms": round(sum(e["dur"] for e in cps) / 1e3 / steps, 3),
                        "GB": round(sum(e["args"].get("bytes", 0) for e in cps) / 1e9 / steps, 3),
                        "GBps_min_median_max": [round(min(gbps), 1),
                                                round(statistics.median(gbps), 1),
                                                round(max(gbps), 1)]}
    calls = collections.Counter(e["name"] for e in events if e.get("cat") == "cuda_runtime")
    api_ms: dict = collections.defaultdict(float)  # the host's CUDA calls: total time by name
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            api_ms[e["name"]] += e["dur"] / 1e3 / steps
    host = sorted((e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver",
                                                          "python_function")),
                  key=lambda e: -e["dur"])[:8]
    by_name: dict = collections.defaultdict(lambda: [0.0, 0])  # compute stream: µs, count
    for e in work:
        by_name[e["name"][:90]][0] += e["dur"]
        by_name[e["name"][:90]][1] += 1
    return {
        "compute_stream": compute,
        "span_ms": round((work[-1]["ts"] + work[-1]["dur"] - work[0]["ts"]) / 1e3 / steps, 3),
        "compute_busy_ms": round(sum(e["dur"] for e in work) / 1e3 / steps, 3),
        "gaps": len(gaps) / steps,
        "gap_ms": round(sum(g[0] for g in gaps) / 1e3 / steps, 3),
        # gaps that were mostly the host's, and the host's share of all gap time
        "gaps_host_late": sum(late >= idle / 2 for idle, late in host_late) / steps,
        "gap_ms_host_late": round(sum(late for _, late in host_late) / 1e3 / steps, 3),
        "largest_gaps": [(round(g / 1e3, 3), a, b) for g, a, b in gaps[:10]],
        "side_streams": side,
        "beside_copy_excess_ms": round(sum(x for x, _ in slower if x > 0), 3),
        "beside_copy_slowest": [(round(x, 3), n) for x, n in slower[:8]],
        "stream_waits": calls.get("cudaStreamWaitEvent", 0) / steps,
        "host_api_ms": [(round(ms, 3), name) for name, ms
                        in sorted(api_ms.items(), key=lambda kv: -kv[1])[:8]],
        "longest_host_events": [(round(e["dur"] / 1e3, 3), e["name"][:80]) for e in host],
        # where the compute stream's time goes, to diff one configuration against another
        "busy_by_kernel": [(round(us / 1e3 / steps, 3), n / steps, name) for name, (us, n)
                           in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]],
    }


BASELINES = ("eager", "parity")
"""``--baseline`` configurations: the eager step, and the rewritten step with nothing dropped."""


def run(model: str, batch: int, seq_len: int, budget_B: int | None, swap: bool, steps: int,
        config: str = "plan", precision: str = "32-true", warmup: int = 2) -> dict:
    """Plan, measure and trace one configuration (a freshly built model): ``plan`` (the plan at
    ``budget_B``), or one of :data:`BASELINES`."""
    from torch.profiler import ProfilerActivity, profile

    torch.compiler.reset()
    torch.cuda.empty_cache()
    w = load_workload(model, batch, device="cuda", seq_len=seq_len)
    opt = torch.optim.Adam(w.model.parameters(), lr=1e-4)
    ac = None
    if config == "eager":
        fn = w.loss
    else:  # parity: a budget no step reaches leaves the plan empty
        fn = ac = planned_step(w, opt, budget_B if config == "plan" else NO_LIMIT, swap=swap)
    fn = with_precision(fn, torch.device("cuda"), precision)
    train_step(fn, w.inputs, opt)  # the first step plans (and collects the garbage it leaves)
    with gc_pauses() as gc_stats:
        m = measure_steps(fn, w.inputs, opt, steps=steps, warmup=warmup)
    traced = 2
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
        for _ in range(traced):
            train_step(fn, w.inputs, opt)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        pr.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    row = {"config": config, "swap": swap if config == "plan" else None,
           "step_ms": round(m.step_ms, 2), "step_ms_all": [round(t, 1) for t in m.step_ms_all],
           "peak_GiB": round(m.peak_B / GIB, 3), "gc_during_steps": gc_stats}
    if ac is not None:
        p, s = ac.plan, ac.profile.summary
        row.update(predicted_peak_GiB=round(p.predicted_peak_B / GIB, 3),
                   predicted_extra_ms=round(p.predicted_extra_ms, 2), swapped=len(p.swapped),
                   swapped_GiB=round(p.swapped_B / GIB, 3), recomputed=len(p.recomputed),
                   profiled_GBps={k: s.get(k) for k in ("to_host_GBps", "to_device_GBps")})
    row["traced"] = summarize_trace(trace, traced)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = workload_parser(__doc__, "resnet152", 128, out="reports/ac", device="cuda")
    ap.add_argument("--budget", default="12GiB")
    ap.add_argument("--swap", choices=list(SWAP_MODES), default="both")
    ap.add_argument("--baseline", action="store_true",
                    help="first trace the eager step and the rewritten one with nothing dropped")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not args.device.startswith("cuda"):
        raise SystemExit("stream_trace.py traces CUDA streams: it needs a CUDA device")
    budget = parse_budget(args.budget)
    configs = [(c, False) for c in BASELINES if args.baseline]
    configs += [("plan", swap) for swap in SWAP_MODES[args.swap]]
    rows = [run(args.model, args.batch_size, args.seq_len, budget, swap, args.steps, config,
                args.precision, args.warmup) for config, swap in configs]
    for r in rows:
        t = r["traced"]
        name = f"swap={r['swap']}" if r["config"] == "plan" else r["config"]
        print(f"[stream_trace {args.model}] {name}: {r['step_ms']} ms/step untraced "
              f"(gc {r['gc_during_steps']}); "
              f"traced per step: compute busy {t['compute_busy_ms']} ms, {t['gaps']:.0f} gaps "
              f"({t['gap_ms']} ms; host late in {t['gaps_host_late']:.0f}, "
              f"{t['gap_ms_host_late']} ms), kernels beside copies "
              f"+{t['beside_copy_excess_ms']} ms",
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{args.model}_stream_trace.json"
    result = {"model": args.model, "batch": args.batch_size, "precision": args.precision,
              "budget": args.budget, "runs": rows}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
