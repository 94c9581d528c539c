"""Peak memory and step time of the rewritten step at several budgets, next to eager.

For each model: eager (no AC), the rewritten step with nothing recomputed (parity), and the
rewritten step planned for each budget. Every configuration trains the same freshly built model
on the same batch; peaks are the allocator's peak of active bytes
(``lightning_ac.measure.peak_memory_B``) over the measured steps, times
are medians by CUDA events after warm-up (the first, planning step is a warm-up step).

    PYTHONPATH=. python benchmarks/ac_budgets.py --model resnet152 --batch-size 128 \\
        --budgets 12GiB 8.55GiB --out reports/ac
"""

from __future__ import annotations

import csv
import json
import time

import torch

from benchmarks.common import NO_LIMIT, SWAP_MODES, load_workload, planned_step, workload_parser
from lightning_ac import parse_budget
from lightning_ac.measure import measure_steps
from lightning_ac.planner import rerun_by_op

GIB = 2**30


def describe_plan(p, prof) -> dict:
    """What was recomputed, by op, and every pick with its size and marginal cost."""
    from collections import Counter

    acts = prof.activations.set_index("name")
    ops = Counter(str(acts.at[n.name, "creator"]).rstrip("_0123456789") for n in p.recomputed)
    return {"summary": p.summary(), "recomputed_by_creator": dict(ops.most_common()),
            "rerun_nodes": len(p.recomputed_nodes),
            "rerun_by_op": rerun_by_op(p, prof).reset_index().to_dict("records"),
            "picks": p.steps,
            "swapped": [{"name": n.name, "bytes": int(acts.at[n.name, "bytes"]),
                         "prefetch_before": p.prefetch_before[n].name
                         if n in p.prefetch_before else None} for n in p.swapped],
            "kept_largest": [
                {"name": n.name, "bytes": int(acts.at[n.name, "bytes"]),
                 "recomputable": bool(acts.at[n.name, "recomputable"]),
                 "recompute_ms": round(float(acts.at[n.name, "recompute_ms"]), 3)}
                for n in sorted(p.kept, key=lambda n: -acts.at[n.name, "bytes"])[:8]]}


def run_config(args, budget: int | None, rewrite: bool, swap: bool = True) -> dict:
    """One configuration: eager (``rewrite`` False), the rewritten step with nothing recomputed
    (``budget`` None) or planned for ``budget``; its row of the table."""
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    w = load_workload(args.model, args.batch_size, device=args.device, seq_len=args.seq_len)
    opt = torch.optim.Adam(w.model.parameters(), lr=1e-4)
    fn = planned_step(w, opt, budget or NO_LIMIT, swap=swap,
                      profile_options={"cold_l2": args.cold_l2}) if rewrite else w.loss
    t0 = time.perf_counter()
    m = measure_steps(fn, w.inputs, opt, steps=args.steps, warmup=args.warmup)
    row = {"model": args.model, "batch": args.batch_size, "config": "eager" if not rewrite else
           ("rewritten, nothing recomputed" if budget is None else
            "MuTwoAC" if swap else "MuTwoAC, recompute only"),
           "budget_GiB": round(budget / GIB, 3) if budget else None,
           "peak_GiB": round(m.peak_B / GIB, 3) if m.peak_B else None,
           "step_ms": round(m.step_ms, 2), "total_s": round(time.perf_counter() - t0, 1)}
    if rewrite:
        p, prof = fn.plan, fn.profile
        row.update(cold_l2=args.cold_l2, predicted_peak_GiB=round(p.predicted_peak_B / GIB, 3),
                   predicted_extra_ms=round(p.predicted_extra_ms, 2),
                   recomputed=len(p.recomputed), recomputed_GiB=round(p.recomputed_B / GIB, 3),
                   swapped=len(p.swapped), swapped_GiB=round(p.swapped_B / GIB, 3),
                   stop_reason=p.stop_reason, planning_s=round(p.planning_s, 2),
                   capture_profile_plan_s=round(fn.planning_call_s, 1),
                   profile_peak_GiB=round(prof.peak_bytes / GIB, 3))
        if m.peak_B:
            row["peak_vs_predicted"] = round(m.peak_B / p.predicted_peak_B, 4)
        row["plan"] = describe_plan(p, prof)
    torch.compiler.reset()  # drop compiled graphs (and the tensors they hold) between configs
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = workload_parser(__doc__, "resnet152", 128, out="reports/ac")
    ap.add_argument("--budgets", nargs="*", default=[])
    ap.add_argument("--swap", choices=list(SWAP_MODES), default="on",
                    help="let the planner swap activations to host memory (both: one run each)")
    ap.add_argument("--cold-l2", action="store_true",
                    help="profile with the L2 cache evicted before each timed node run")
    args = ap.parse_args(argv)
    if args.precision != "32-true":
        ap.error("ac_budgets runs fp32 only (see compare.py for bf16-mixed)")
    rows = [run_config(args, None, False), run_config(args, None, True)]
    for b in args.budgets:
        for swap in SWAP_MODES[args.swap]:
            rows.append(run_config(args, parse_budget(b), True, swap))
    eager = rows[0]
    args.out.mkdir(parents=True, exist_ok=True)
    plans = {}
    for r in rows:
        if eager["peak_GiB"]:
            r["peak_vs_eager"] = round(r["peak_GiB"] / eager["peak_GiB"], 4)
        r["time_vs_eager"] = round(r["step_ms"] / eager["step_ms"], 4)
        if "plan" in r:
            plans[f"{r['config']} {r['budget_GiB']}"] = r.pop("plan")  # one per config
        print(json.dumps(r), flush=True)
    (args.out / f"{args.model}_plans.json").write_text(json.dumps(plans, indent=1) + "\n")
    path = args.out / f"{args.model}_budgets.csv"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
