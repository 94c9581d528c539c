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
from pathlib import Path

import torch

from benchmarks.common import SWAP_MODES, workload_parser
from lightning_ac import _torch_compat as compat
from lightning_ac.callback import parse_budget
from lightning_ac.measure import measure_steps
from lightning_ac.planner import plan, rerun_by_op
from lightning_ac.profiler import profile_joint
from lightning_ac.rewriter import compile_with_plan
from lightning_ac.zoo import make_workload

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


def run_config(model: str, batch: int, seq_len: int, budget: int | None, steps: int,
               rewrite: bool, cold_l2: bool = False, swap: bool = True) -> dict:
    torch.cuda.empty_cache()
    w = make_workload(model, batch, device="cuda", seq_len=seq_len)
    opt = torch.optim.Adam(w.model.parameters(), lr=1e-4)
    info: dict = {}
    fn = w.loss
    if rewrite:
        def make_plan(joint):
            t0 = time.perf_counter()
            with compat.real_tensor_mode():
                prof = profile_joint(joint, opt, cold_l2=cold_l2)
            p = plan(prof, budget, swap=swap)
            info.update(plan=p, profile=prof, first_step_s=time.perf_counter() - t0)
            return p

        fn = compile_with_plan(w.loss, w.model, make_plan)
    t0 = time.perf_counter()
    m = measure_steps(fn, w.inputs, opt, steps=steps, warmup=2)
    row = {"model": model, "batch": batch, "config": "eager" if not rewrite else
           ("rewritten, nothing recomputed" if budget is None else
            "MuTwoAC" if swap else "MuTwoAC, recompute only"),
           "budget_GiB": round(budget / GIB, 3) if budget else None,
           "peak_GiB": round(m.peak_B / GIB, 3), "step_ms": round(m.step_ms, 2),
           "total_s": round(time.perf_counter() - t0, 1)}
    if rewrite:
        p = info["plan"]
        row.update(cold_l2=cold_l2, predicted_peak_GiB=round(p.predicted_peak_B / GIB, 3),
                   predicted_extra_ms=round(p.predicted_extra_ms, 2),
                   recomputed=len(p.recomputed), recomputed_GiB=round(p.recomputed_B / GIB, 3),
                   swapped=len(p.swapped), swapped_GiB=round(p.swapped_B / GIB, 3),
                   stop_reason=p.stop_reason, planning_s=round(p.planning_s, 2),
                   capture_profile_plan_s=round(info["first_step_s"], 1),
                   profile_peak_GiB=round(info["profile"].peak_bytes / GIB, 3))
        row["peak_vs_predicted"] = round(m.peak_B / p.predicted_peak_B, 4)
        row["plan"] = describe_plan(p, info["profile"])
    torch.compiler.reset()  # drop compiled graphs (and the tensors they hold) between configs
    return row


def main() -> None:
    ap = workload_parser(__doc__, "resnet152", 128)
    ap.add_argument("--budgets", nargs="*", default=[])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("reports/ac"))
    ap.add_argument("--swap", choices=list(SWAP_MODES), default="on",
                    help="let the planner swap activations to host memory (both: one run each)")
    ap.add_argument("--cold-l2", action="store_true",
                    help="profile with the L2 cache evicted before each timed node run")
    args = ap.parse_args()
    rows = [run_config(args.model, args.batch_size, args.seq_len, None, args.steps, False),
            run_config(args.model, args.batch_size, args.seq_len, None, args.steps, True,
                       args.cold_l2)]
    swaps = SWAP_MODES[args.swap]
    for b in args.budgets:
        for swap in swaps:
            rows.append(run_config(args.model, args.batch_size, args.seq_len, parse_budget(b),
                                   args.steps, True, args.cold_l2, swap))
    eager = rows[0]
    args.out.mkdir(parents=True, exist_ok=True)
    plans = {}
    for r in rows:
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


if __name__ == "__main__":
    main()
