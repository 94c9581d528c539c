"""Does the budget hold on every step, across models, budgets and training habits? (issue 19)

For each configuration (a model at a realistic size, a budget, a habit), the same batches train
twice from the same weights: without AC, then with ``auto_checkpoint`` at the budget (a share of
the no-AC run's peak, or bytes). Every step's allocator peak is measured (reset before the step)
and handed to ``AutoCheckpoint.observe_peak``, the closed loop the callback runs. Habits:

* ``plain``: the model and its batch as ``benchmarks.coverage.GPU_MODELS`` make them;
* ``foreign``: another copy of the model and its AdamW state stay allocated through both runs
  (an earlier model in a notebook, a sweep): memory the step did not make;
* ``compiled``: the user compiled the model's forward with ``torch.compile`` (inductor), in both
  runs;
* ``bf16``: the step under bf16 autocast, as Lightning's ``precision="bf16-mixed"``;
* ``short-last``: the last batch has half the samples.

Writes ``<out>/budget_matrix_steps.csv`` (one row per step and run) and
``<out>/budget_matrix.csv`` (one row per configuration: steps over the budget after the second,
the largest and the median peak / budget, the step time against no AC, the loss difference),
rewritten after each configuration, and prints the summary the issue's targets read.

    PYTHONPATH=. python -m benchmarks.budget_matrix --device cuda --out $OUT/budget
    PYTHONPATH=. python -m benchmarks.budget_matrix --device cuda --only resnet50 \\
        --habits foreign --budgets 5GB
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
import traceback
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from benchmarks.common import with_precision
from benchmarks.coverage import GPU_MODELS, MODELS, _midway
from benchmarks.zoo import Workload
from lightning_ac import auto_checkpoint, parse_budget

HABITS = ("plain", "foreign", "compiled", "bf16", "short-last")
DEFAULT_MODELS = ("gpt2", "t5", "llama", "bert", "deberta-v2", "vit", "resnet50", "convnext_tiny",
                  "efficientnet_b0")
"""Models of ``GPU_MODELS`` whose floor is under 60% of their no-AC peak (coverage report)."""


def _batches(w: Workload, steps: int, short_last: bool) -> list[tuple]:
    half = max(1, w.inputs[0].shape[0] // 2)
    return [tuple(t[:half] for t in w.inputs) if short_last and i == steps - 1 else w.inputs
            for i in range(steps)]


def _run(step, w: Workload, opt, batches: list[tuple], ac=None) -> list[dict]:
    """One run over ``batches``: per step its loss, time and (CUDA) allocator peak; the peak goes
    to ``ac.observe_peak``."""
    rows = []
    cuda = w.inputs[0].is_cuda
    for i, inputs in enumerate(batches):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = step(*inputs)
        loss.backward()
        opt.step()
        row = {"step": i, "batch": int(inputs[0].shape[0]), "loss": loss.item()}
        row["step_ms"] = (time.perf_counter() - t0) * 1e3
        if ac is not None:
            row["planned"] = bool(ac.planned_last_call)
        if cuda:
            row["peak_B"] = torch.cuda.max_memory_allocated()
            if ac is not None:
                row["replanned"] = bool(ac.observe_peak(row["peak_B"]))
        rows.append(row)
    return rows


def run_config(name: str, make, batch: int, habit: str, budget: str | float, steps: int,
               device: str) -> tuple[dict, list[dict]]:
    """One configuration: its summary row and its per-step rows."""
    label = {"model": name, "habit": habit, "budget": str(budget), "batch": batch}
    torch.manual_seed(0)
    w = make(batch)
    w.model.to(device).train()
    w = replace(w, inputs=tuple(t.to(device) for t in w.inputs))
    keep = []
    if habit == "foreign":  # another model and its optimizer state, left allocated
        other = copy.deepcopy(w.model)
        other_opt = torch.optim.AdamW(other.parameters())
        for p in other.parameters():
            p.grad = torch.zeros_like(p)
        other_opt.step()
        keep = [other, other_opt]
    if habit == "compiled":
        w.model.forward = torch.compile(w.model.forward)
    step = with_precision(w.loss, torch.device(device), "bf16-mixed") if habit == "bf16" \
        else w.loss
    batches = _batches(w, steps, habit == "short-last")
    state = {k: v.clone() for k, v in w.model.state_dict().items()}
    opt = torch.optim.AdamW(w.model.parameters(), lr=1e-4)
    torch.manual_seed(1)
    ref = _run(step, w, opt, batches)
    w.model.load_state_dict(state)
    del opt
    opt = torch.optim.AdamW(w.model.parameters(), lr=1e-4)
    no_ac_peak = max((r.get("peak_B", 0) for r in ref[1:]), default=0)
    budget_B = parse_budget(budget) if isinstance(budget, str) else int(budget * no_ac_peak)
    summary = {**label, "budget_B": budget_B, "no_ac_peak_B": no_ac_peak}
    # (on the CPU there is no allocator peak to take a share of: halfway to the floor instead)
    ac = auto_checkpoint(step, opt, module=w.model, budget=budget_B or _midway,
                         previous_grads="freed", on_infeasible="warn")
    torch.manual_seed(1)
    try:
        on = _run(ac, w, opt, batches, ac)
    except Exception as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"[:400].replace("\n", " ")
        summary["traceback"] = traceback.format_exc()[-1200:]
        return summary, []
    summary["budget_B"] = budget_B = ac.plan.budget_B if ac.plan else budget_B
    steady = [r for r in on[2:] if not r["planned"]]
    peaks = [r["peak_B"] for r in on[2:] if "peak_B" in r]
    summary.update(
        state=str(ac.state), plans=len(ac.plans), replans=ac.replans,
        predicted_peak_B=ac.plan.predicted_peak_B if ac.plan else None,
        stop_reason=ac.plan.stop_reason if ac.plan else None,
        steps_after_second=len(on) - 2,
        over_budget_after_second=sum(p > budget_B for p in peaks) if budget_B else None,
        max_peak_to_budget=max(peaks) / budget_B if peaks and budget_B else None,
        median_peak_to_budget=statistics.median(r["peak_B"] for r in steady) / budget_B
        if steady and budget_B and "peak_B" in steady[0] else None,
        step_ratio=statistics.median(r["step_ms"] for r in steady)
        / statistics.median(r["step_ms"] for r in ref[2:]) if steady and ref[2:] else None,
        max_rel_loss_diff=max(abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12)
                              for a, b in zip(on, ref)))
    rows = [{**label, "run": run, **r} for run, rs in (("no AC", ref), ("MuTwoAC", on))
            for r in rs]
    ac.remove()
    del ac, opt, w, keep, step
    return summary, rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", nargs="+", default=None, help="model names (default: nine)")
    ap.add_argument("--habits", nargs="+", default=["plain"], choices=HABITS)
    ap.add_argument("--budgets", nargs="+", default=["0.5", "0.7"],
                    help='shares of the no-AC peak ("0.6") or bytes ("5GB")')
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tiny", action="store_true",
                    help="the CPU models of benchmarks.coverage (a smoke run: no peaks)")
    ap.add_argument("--out", type=Path, default=Path("reports/budget"))
    args = ap.parse_args(argv)
    if args.tiny:
        models = [(name, make, 4) for name, _, make in MODELS]
    else:
        models = [(name, make, batch) for name, _, make, batch in GPU_MODELS]
    wanted = args.only or ([m[0] for m in models] if args.tiny else DEFAULT_MODELS)
    models = [m for m in models if m[0] in wanted]
    budgets = [b if any(c.isalpha() for c in b) else float(b) for b in args.budgets]
    args.out.mkdir(parents=True, exist_ok=True)
    summaries, steps = [], []
    for name, make, batch in models:
        for habit in args.habits:
            for budget in budgets:
                t0 = time.perf_counter()
                summary, rows = run_config(name, make, batch, habit, budget, args.steps,
                                           args.device)
                summary["wall_s"] = round(time.perf_counter() - t0, 1)
                summaries.append(summary)
                steps += rows
                print({k: summary.get(k) for k in ("model", "habit", "budget", "state",
                                                    "over_budget_after_second",
                                                    "max_peak_to_budget", "step_ratio",
                                                    "error")}, flush=True)
                pd.DataFrame(summaries).to_csv(args.out / "budget_matrix.csv", index=False)
                pd.DataFrame(steps).to_csv(args.out / "budget_matrix_steps.csv", index=False)
                gc.collect()
                torch.compiler.reset()
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
    df = pd.DataFrame(summaries)
    if "over_budget_after_second" in df and df["over_budget_after_second"].notna().any():
        held = (df["over_budget_after_second"] == 0).mean()
        print(f"configurations with every step after the second within the budget: {held:.0%}; "
              f"median peak/budget: {df['median_peak_to_budget'].median():.3f}")
    return df


if __name__ == "__main__":
    main()
