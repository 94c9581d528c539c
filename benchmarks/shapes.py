"""Does every step stay within the budget when batches change shape? Dynamic padding, step by step.

Trains the same model twice on the same sequence of batches, each padded to a length drawn at
random from ``--lengths`` (as HF's dynamic padding makes them; the last batch may also be
smaller, ``--short-last``): once without AC, and once with ``auto_checkpoint`` at ``--budget``
(default: ``--share`` of the no-AC peak at the longest length). Every step's peak is read from
the allocator (reset before the step), as the callback does, and handed to
``AutoCheckpoint.observe_peak`` (the closed loop that re-plans a shape whose peak went over).

Writes ``<out>/<model>_shapes.csv`` (one row per step and run: length, whether the step planned,
peak, step time, loss) and ``<out>/<model>_shapes.json`` (the summary: budget, peaks over it, the
median step against no-AC, total wall time with all capture/profile/plan work, re-plans, loss
agreement), and prints the summary.

    PYTHONPATH=. python -m benchmarks.shapes --model bert-cls --batch-size 32 --steps 300 \\
        --lengths 128 176 224 272 320 384 448 512 --out reports/shapes
"""

from __future__ import annotations

import json
import random
import time

import pandas as pd
import torch

from benchmarks.common import load_workload, workload_parser
from lightning_ac import auto_checkpoint, parse_budget
from lightning_ac.install import describe_shapes
from lightning_ac.measure import peak_memory_B


def batches(w, lengths: list[int], steps: int, seed: int, short_last: bool) -> list[tuple]:
    """``steps`` batches cut from ``w``'s inputs: tensors whose dim 1 is the full length are cut
    to a length drawn at random (the same draws for every run); with ``short_last`` the last
    batch has half the samples."""
    full = w.inputs[0].shape[1] if w.inputs[0].dim() > 1 else None
    rng = random.Random(seed)
    out = []
    for i in range(steps):
        n = rng.choice(lengths)
        rows = w.inputs[0].shape[0] // 2 if short_last and i == steps - 1 else None
        out.append((n, tuple(
            (t[:rows, :n] if t.dim() > 1 and t.shape[1] == full else t[:rows]).contiguous()
            for t in w.inputs)))
    return out


def train(args, budget_B: int | None, label: str) -> tuple[list[dict], float, object]:
    """One run over the batches: rows per step, total wall seconds, the AutoCheckpoint or None."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    w = load_workload(args.model, args.batch_size, device=device, seq_len=max(args.lengths),
                      seed=args.seed)
    opt = torch.optim.AdamW(w.model.parameters(), lr=1e-5)
    step_fn = w.loss
    ac = None
    if budget_B is not None:
        step_fn = ac = auto_checkpoint(w.loss, opt, module=w.model, budget=budget_B,
                                       previous_grads="freed", verbose=args.verbose,
                                       dynamic_shapes=not args.per_shape)
    data = batches(w, args.lengths, args.steps, args.seed, args.short_last)
    torch.manual_seed(args.seed)  # the same dropout draws in both runs
    rows = []
    if cuda:
        torch.cuda.synchronize(device)
    t_start = time.perf_counter()
    for i, (n, inputs) in enumerate(data):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = step_fn(*inputs)
        loss.backward()
        opt.step()
        row = {"run": label, "step": i, "length": n, "batch": inputs[0].shape[0],
               "loss": loss.item()}  # (.item() waits for the step)
        row["wall_ms"] = (time.perf_counter() - t0) * 1e3  # (planning included)
        if cuda:
            end.record()
            end.synchronize()
            row["step_ms"] = start.elapsed_time(end)
            row["peak_B"] = peak_memory_B(device)
        else:
            row["step_ms"] = (time.perf_counter() - t0) * 1e3
        if ac is not None:
            row["planned"] = ac.planned_last_call
            row["replanned"] = bool(row.get("peak_B")) and ac.observe_peak(row["peak_B"])
            row["predicted_peak_B"] = ac.plan.predicted_peak_B if ac.plan else None
        rows.append(row)
    wall = time.perf_counter() - t_start
    del w, opt, step_fn
    torch.compiler.reset()
    if cuda:
        torch.cuda.empty_cache()
    return rows, wall, ac


def summarize(df: pd.DataFrame, budget_B: int, walls: dict[str, float], ac) -> dict:
    """The figures the issue's targets read: peaks against the budget, step times, wall time."""
    off, on = df[df.run == "no AC"], df[df.run == "MuTwoAC"].copy()
    on["planned"] = on.planned.astype(bool)
    on["replanned"] = on.replanned.astype(bool)
    steady = on[~on.planned]
    out = {"budget_B": budget_B, "steps": len(on), "shapes_planned": int(on.planned.sum()),
           "replans": int(on.replanned.sum()),
           "median_step_ms_no_ac": float(off.step_ms.median()),
           "median_step_ms_ac": float(steady.step_ms.median()),
           "wall_s_no_ac": round(walls["no AC"], 2), "wall_s_ac": round(walls["MuTwoAC"], 2),
           "planning_call_s": [round(s.planning_call_s, 2) for s in ac.plans.values()],
           "plans": [describe_shapes(s.shapes) for s in ac.plans.values()],
           "varying_sizes_planned_for": [{str(k): v for k, v in s.sizes.items()}
                                         for s in ac.plans.values() if s.dynamic],
           # where a planning call's time goes: profiling (with the optimizer step's capture),
           # and planning (with them, for a plan made from its own profile); the rest is capture,
           # compilation and the step itself
           "profile_s": [s.profile.summary["profile_s"] for s in ac.plans.values()],
           "optimizer_capture_s": [s.profile.summary["optimizer_capture_s"]
                                   for s in ac.plans.values()],
           # (the last planning of each: a re-plan for larger sizes profiles nothing)
           "last_plan_s": [round(s.plan.planning_s, 2) for s in ac.plans.values()],
           "max_rel_loss_diff": float(abs((on.loss.to_numpy() - off.loss.to_numpy())
                                          / off.loss.to_numpy()).max())}
    out["median_step_ratio"] = out["median_step_ms_ac"] / out["median_step_ms_no_ac"]
    out["wall_ratio"] = out["wall_s_ac"] / out["wall_s_no_ac"]
    if "peak_B" in on:
        over = on[on.peak_B > budget_B]
        out.update(
            peak_B_no_ac=int(off.peak_B.max()), peak_B_ac=int(on.peak_B.max()),
            steps_over_budget=int(len(over)),
            planning_steps_over_budget=int(over.planned.sum()),
            steady_steps_over_budget_after_second=int(
                (over[~over.planned].step >= 2).sum()),
            max_excess_B=int((on.peak_B - budget_B).clip(lower=0).max()),
            median_peak_to_budget=float((steady.peak_B / budget_B).median()))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = workload_parser(__doc__, "bert-cls", 32, out="reports/shapes")
    ap.set_defaults(steps=10)
    ap.add_argument("--lengths", type=int, nargs="+",
                    default=[128, 176, 224, 272, 320, 384, 448, 512])
    ap.add_argument("--budget", default=None, help='e.g. "6GiB" (default: see --share)')
    ap.add_argument("--share", type=float, default=0.6,
                    help="budget: this share of the no-AC run's peak at the longest length")
    ap.add_argument("--short-last", action="store_true", help="the last batch has half the samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="say each plan")
    ap.add_argument("--per-shape", action="store_true",
                    help="plan each shape alone (dynamic_shapes=False), as before varying sizes "
                         "were traced dynamic")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.budget is None and not cuda:
        ap.error("on the CPU there is no allocator peak to take a share of: pass --budget")
    off, wall_off, _ = train(args, None, "no AC")
    args.out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(off).to_csv(args.out / f"{args.model}_shapes.csv", index=False)  # if cut short
    if args.budget is not None:
        budget = parse_budget(args.budget)
    else:
        longest = [r["peak_B"] for r in off if r["length"] == max(args.lengths)]
        budget = int(args.share * (max(longest) if longest else max(r["peak_B"] for r in off)))
    on, wall_on, ac = train(args, budget, "MuTwoAC")
    df = pd.DataFrame(off + on)
    summary = summarize(df, budget, {"no AC": wall_off, "MuTwoAC": wall_on}, ac)
    summary.update(model=args.model, batch_size=args.batch_size, lengths=args.lengths,
                   device=torch.cuda.get_device_name() if cuda else "cpu",
                   torch=torch.__version__)
    df.to_csv(args.out / f"{args.model}_shapes.csv", index=False)
    (args.out / f"{args.model}_shapes.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
