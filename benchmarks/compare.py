"""Side by side: MuTwoAC against what users pick instead, on one model, batch and data.

Every option trains a freshly built copy of the same model (same seed, same batch, Adam) in this
one process, in this order:

1. ``eager``: no activation checkpointing;
2. ``checkpoint``: non-reentrant ``torch.utils.checkpoint`` on every n-th block (ResNet
   bottleneck / BERT layer), n = 1, 2, 3; and ``hf-gc``, HF ``gradient_checkpointing_enable()``
   (BERT);
3. ``compile``: ``torch.compile`` (inductor) with ``activation_memory_budget`` 0.1 … 0.7, and
   ``aot_eager`` (AOTAutograd's min-cut partitioner, no inductor fusion) at the same budgets;
4. ``rockmate``, if the package imports and runs here (else its row says why);
5. ``mutwoac`` at budgets matching the peaks the other options reached (and at the eager peak:
   nothing recomputed); ``mutwoac-inductor``: the same plans run on inductor's kernels
   (``kernels="inductor"``).

Peaks are the allocator's peak of active bytes (``lightning_ac.measure.peak_memory_B``) over the
measured steps, less what was allocated before the option started; step times are medians by
CUDA events after warm-up; ``first_step_s`` is the first step's wall time (capture, planning,
compilation). Writes
``<out>/compare_<model>.csv`` (rows of the same model and precision are replaced) and
``<out>/compare_pareto.png`` (every CSV in ``<out>``).

    PYTHONPATH=. python benchmarks/compare.py --model resnet152 --batch-size 128
    PYTHONPATH=. python benchmarks/compare.py --model bert --batch-size 32 --seq-len 512 \\
        --precision bf16-mixed
    # a family that compiles for minutes, on its own, into the rows already there:
    PYTHONPATH=. python benchmarks/compare.py --model resnet152 --batch-size 128 \\
        --options eager compile mutwoac --compile-budgets 0.1 0.3 --merge
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from benchmarks.common import NO_LIMIT, load_workload, planned_step, with_precision, workload_parser
from benchmarks.zoo import Workload
from lightning_ac.errors import unwrap_compile_error
from lightning_ac.measure import measure_steps, train_step
from lightning_ac.report import pyplot

GIB = 2**30
COMPILE_BUDGETS = (0.1, 0.3, 0.5, 0.7)
FAMILIES = ("eager", "checkpoint", "hf-gc", "compile", "aot_eager", "rockmate", "mutwoac",
            "mutwoac-inductor")
MUTWO = ("mutwoac", "mutwoac-inductor")
COMPILED = ("compile", "aot_eager")


@dataclass
class Option:
    """One way to train the step: a family, its setting, and how to build the step function."""

    family: str
    setting: str
    build: Callable[[Workload, torch.optim.Optimizer], Callable[..., torch.Tensor]]
    """Turns a fresh workload (and its optimizer) into ``loss(*inputs)``, the step to train (may
    modify the model)."""
    config: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    """Held while the option runs (torch.compile reads its budget at compile time)."""
    budget_B: int | None = None
    made: dict = field(default_factory=dict)
    """What building it produced that the CSV reports (MuTwoAC's plan)."""


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a reference model: ResNet bottlenecks/basic blocks, BERT layers."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    found = [m for m in model.modules() if isinstance(m, (Bottleneck, BasicBlock))]
    if not found and hasattr(model, "bert"):
        found = list(model.bert.encoder.layer)
    if not found:
        raise ValueError(f"no ResNet blocks or BERT layers in {type(model).__name__}")
    return found


def checkpoint_every(model: nn.Module, n: int) -> int:
    """Wrap every ``n``-th block's forward in non-reentrant ``torch.utils.checkpoint``."""
    chosen = blocks(model)[::n]
    for block in chosen:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward,
                                          use_reentrant=False)
    return len(chosen)


def _eager(w: Workload, _optimizer):
    return w.loss


def _hf_gc(w: Workload, _optimizer):
    w.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return w.loss


def _checkpointed(n: int):
    def build(w: Workload, _optimizer):
        checkpoint_every(w.model, n)
        return w.loss

    return build


def _compiled(backend: str):
    def build(w: Workload, _optimizer):
        return torch.compile(w.loss, backend=backend)

    return build


def _memory_budget(share: float):
    import torch._functorch.config as functorch_config

    return lambda: functorch_config.patch(activation_memory_budget=share)


def mutwoac_option(setting: str, budget_B: int | None, family: str = "mutwoac") -> Option:
    """MuTwoAC's pipeline (capture, profile with the optimizer, plan, rewrite) at ``budget_B``;
    family ``mutwoac-inductor`` runs the planned step on inductor's kernels."""
    made: dict = {}
    kernels = "inductor" if family == "mutwoac-inductor" else "eager"

    def build(w: Workload, optimizer):
        # below the floor, the lowest-peak plan runs (the callback raises there): the row says
        # so and is no point of MuTwoAC's curve
        made["ac"] = planned_step(w, optimizer, budget_B or NO_LIMIT, kernels=kernels)
        return made["ac"]

    return Option(family, setting, build, budget_B=budget_B, made=made)


def rockmate_option(budget_B: int) -> Option:
    """Rockmate (``pip install rockmate``) at ``budget_B``; wired up for one-tensor models."""

    def build(w: Workload, _optimizer):
        from rockmate import Rockmate

        if "resnet" not in w.name:
            raise NotImplementedError("only wired up for models called with one tensor (ResNet)")
        rk = Rockmate(w.model, [w.inputs[0]], budget=budget_B)

        def loss(x, y):
            return nn.functional.cross_entropy(rk(x), y)

        return loss

    return Option("rockmate", f"budget {budget_B / GIB:.2f} GiB", build, budget_B=budget_B)


def options(model: str, families: set[str],
            compile_budgets: tuple[float, ...] = COMPILE_BUDGETS) -> list[Option]:
    """Every option but MuTwoAC and Rockmate (their budgets come from the others' peaks)."""
    out = [Option("eager", "", _eager)]
    if "checkpoint" in families:
        out += [Option("checkpoint", f"every {n}" if n > 1 else "every block", _checkpointed(n))
                for n in (1, 2, 3)]
    if "hf-gc" in families and model in ("bert", "tiny-bert"):
        out.append(Option("hf-gc", "gradient_checkpointing_enable", _hf_gc))
    for backend, family in (("inductor", "compile"), ("aot_eager", "aot_eager")):
        if family in families:
            out += [Option(family, f"budget {b}", _compiled(backend), _memory_budget(b))
                    for b in compile_budgets]
    return [o for o in out if o.family in families]


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raise TimeoutError after ``seconds`` (main thread, POSIX); a solver may run for ages."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(*_):
        raise TimeoutError(f"gave up after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_option(opt: Option, args, device: torch.device) -> dict:
    """Train one option for ``args.steps`` measured steps; its row of the CSV."""
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device) if cuda else 0
    row = {"model": args.model, "batch": args.batch_size, "precision": args.precision,
           "option": opt.family, "setting": opt.setting,
           "budget_GiB": round(opt.budget_B / GIB, 3) if opt.budget_B else None}
    try:
        with opt.config(), _time_limit(args.option_timeout):
            torch.compiler.reset()
            w = load_workload(args.model, args.batch_size, device=device, seq_len=args.seq_len)
            optimizer = torch.optim.Adam(w.model.parameters(), lr=1e-4)
            t0 = time.perf_counter()
            step = with_precision(opt.build(w, optimizer), device, args.precision)
            train_step(step, w.inputs, optimizer)
            if cuda:
                torch.cuda.synchronize(device)
            row["first_step_s"] = round(time.perf_counter() - t0, 2)
            m = measure_steps(step, w.inputs, optimizer, steps=args.steps,
                              warmup=getattr(args, "warmup", 2))
        row.update(status="ok", step_ms=round(m.step_ms, 2),
                   peak_GiB=round((m.peak_B - base) / GIB, 3) if m.peak_B is not None else None)
    except Exception as exc:  # one option failing (OOM, compile error) must not stop the others
        exc = unwrap_compile_error(exc, (torch.cuda.OutOfMemoryError,)) or exc
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)
        row.update(status="OOM" if oom else "error",
                   error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                   if str(exc).strip() else type(exc).__name__)
        if not oom and args.verbose:
            traceback.print_exc()
    ac = opt.made.pop("ac", None)
    p = ac.plan if ac is not None else None
    if p is not None:
        row.update(predicted_peak_GiB=round(p.predicted_peak_B / GIB, 3),
                   recomputed=len(p.recomputed), stop_reason=p.stop_reason)
        planned = ac.last.planned[0] if ac.last.planned is not None else None
        if planned is not None and planned.fused:
            row["inductor_compile_s"] = round(planned.compile_s, 1)
        if p.stop_reason == "infeasible" and row["status"] == "ok":
            # the smallest plan ran, over the budget (the callback raises here): not a point of
            # MuTwoAC's curve at this budget
            row.update(status="infeasible",
                       error=f"smallest plan predicted at {p.predicted_peak_B / GIB:.2f} GiB, "
                             f"over the budget; measured as run at it")
    torch.compiler.reset()
    return row


def matching_budgets(rows: list[dict], eager_peak: float, tolerance: float = 0.03) -> list[float]:
    """The distinct peaks (GiB) the other options reached (not eager, MuTwoAC or Rockmate, whose
    budgets these are), below eager's, merged within ``tolerance``."""
    peaks = sorted({r["peak_GiB"] for r in rows
                    if r.get("status") == "ok" and r.get("peak_GiB")
                    and r["option"] not in ("eager", *MUTWO, "rockmate")
                    and r["peak_GiB"] < eager_peak * (1 - tolerance)})
    chosen: list[float] = []
    for p in peaks:
        if not chosen or p > chosen[-1] * (1 + tolerance):
            chosen.append(p)
    return chosen


def spread(values: list[float], k: int) -> list[float]:
    """At most ``k`` of the sorted ``values``, evenly spaced over them, the ends included."""
    if k <= 0:
        return []
    if len(values) <= k:
        return list(values)
    if k == 1:
        return [values[0]]
    step = (len(values) - 1) / (k - 1)
    return [values[round(i * step)] for i in range(k)]


def _budgeted_options(rows: list[dict], done: list[float], families: set[str],
                      args) -> list[Option]:
    """MuTwoAC (and Rockmate) at the peaks reached so far that are not within 3% of a budget
    in ``done`` (which grows); MuTwoAC with nothing recomputed the first time."""
    eager_peak = next((r["peak_GiB"] for r in rows if r["option"] == "eager"
                       and r.get("peak_GiB")), None)
    if args.mutwo_budgets is not None:
        budgets = [float(b) for b in args.mutwo_budgets]
    elif eager_peak is not None:
        budgets = matching_budgets(rows, eager_peak)
    else:
        budgets = []  # on the CPU there is no peak to match
    # (with --merge the table keeps the earlier run's row)
    first = {f: not args.merge and not any(r["option"] == f for r in rows) for f in MUTWO}
    budgets = spread([b for b in budgets if not any(abs(b - d) <= 0.03 * d for d in done)],
                     args.max_mutwo - len(done))
    done.extend(budgets)
    out: list[Option] = []
    if "rockmate" in families and not any(r["option"] == "rockmate" and r["status"] == "error"
                                          for r in rows):  # an error repeats at any budget
        out += [rockmate_option(int(b * GIB)) for b in budgets]
    for family in MUTWO:
        if family in families:
            if first[family]:
                out.append(mutwoac_option("nothing recomputed", None, family))
            out += [mutwoac_option(f"budget {b:.2f} GiB", int(b * GIB), family) for b in budgets]
    return out


def pareto_plot(out: Path) -> Path:
    """Peak memory against step time for every (model, precision) in ``out``'s CSVs."""
    plt = pyplot()

    frames = [pd.read_csv(p) for p in sorted(out.glob("compare_*.csv"))]
    df = pd.concat(frames, ignore_index=True)
    df = df[df.status == "ok"]
    panels = sorted(df.groupby(["model", "precision"]).groups)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.4 * max(1, len(panels)), 5),
                             squeeze=False)
    styles = {"eager": ("k", "*"), "checkpoint": ("tab:blue", "s"), "hf-gc": ("tab:cyan", "D"),
              "compile": ("tab:orange", "^"), "aot_eager": ("tab:purple", "v"),
              "rockmate": ("tab:brown", "P"), "mutwoac": ("tab:red", "o"),
              "mutwoac-inductor": ("tab:green", "o")}
    labels = {"mutwoac": "MuTwoAC", "mutwoac-inductor": "MuTwoAC, inductor kernels"}
    for ax, (model, precision) in zip(axes[0], panels):
        d = df[(df.model == model) & (df.precision == precision)]
        for family, g in d.groupby("option"):
            color, marker = styles.get(family, ("gray", "x"))
            g = g.sort_values("peak_GiB")
            highlight = family in MUTWO
            ax.plot(g.peak_GiB, g.step_ms, marker=marker, color=color,
                    linestyle="-" if highlight else "none", linewidth=2.5 if highlight else 0,
                    markersize=9 if highlight else 7, label=labels.get(family, family),
                    zorder=3 if highlight else 2)
            for _, r in g.iterrows():
                if r.setting and isinstance(r.setting, str) and not highlight:
                    ax.annotate(r.setting.replace("budget ", ""), (r.peak_GiB, r.step_ms),
                                fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("peak memory (GiB)")
        ax.set_ylabel("step time (ms)")
        batch = int(d.batch.iloc[0])
        ax.set_title(f"{model}, batch {batch}, {precision}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("lower left is better: MuTwoAC (lines) vs other checkpointing options")
    fig.tight_layout()
    path = out / "compare_pareto.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_rows(rows: list[dict], out: Path, model: str, precision: str,
               merge: bool = False) -> Path:
    """Replace this (model, precision)'s rows in ``compare_<model>.csv``; with ``merge``, only
    those of the options and settings in ``rows`` (the others, from earlier runs, stay)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compare_{model}.csv"
    new = pd.DataFrame(rows)
    if path.exists():
        old = pd.read_csv(path)
        gone = (old.model == model) & (old.precision == precision)
        if merge:
            ran = set(zip(new.option, new.setting.fillna("")))
            gone &= pd.MultiIndex.from_arrays([old.option, old.setting.fillna("")]).isin(ran)
        new = pd.concat([old[~gone], new], ignore_index=True)
    new.to_csv(path, index=False)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    ap = workload_parser(__doc__, "resnet152", 128, out="reports/compare",
                         formatter=argparse.RawTextHelpFormatter)
    ap.add_argument("--options", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--mutwo-budgets", nargs="*", default=None,
                    help="MuTwoAC budgets in GiB (default: the peaks the other options reached)")
    ap.add_argument("--max-mutwo", type=int, default=8, help="at most this many MuTwoAC budgets")
    ap.add_argument("--option-timeout", type=int, default=240, help="seconds per option")
    ap.add_argument("--compile-budgets", nargs="*", type=float, default=list(COMPILE_BUDGETS),
                    help="activation_memory_budget values for compile and aot_eager")
    ap.add_argument("--merge", action="store_true",
                    help="keep this model and precision's rows of options not run now (a family "
                         "that takes long, run on its own); this run's rows are marked in "
                         "'process'")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    families = set(args.options)
    rows: list[dict] = []

    def record(row: dict) -> None:
        eager = next((r for r in rows if r["option"] == "eager" and r.get("step_ms")), None)
        if eager and row.get("step_ms"):
            row["overhead_vs_eager"] = round(row["step_ms"] / eager["step_ms"] - 1, 4)
        if args.merge:  # its overhead is against this run's eager, not the kept rows'
            row["process"] = f"separate run ({time.strftime('%Y-%m-%d %H:%M')})"
        rows.append(row)
        shown = {k: row.get(k) for k in ("option", "setting", "status", "peak_GiB", "step_ms",
                                          "overhead_vs_eager", "first_step_s", "error")}
        print(" ".join(f"{k}={v}" for k, v in shown.items() if v is not None), flush=True)
        # nothing lost if a later one hangs
        write_rows(rows, args.out, args.model, args.precision, merge=args.merge)

    # Cheap options first, then MuTwoAC at their peaks, then the compiled ones (minutes of
    # compilation each) and MuTwoAC at the new peaks they reach: a run cut short by a time
    # limit still holds a comparison.
    every = options(args.model, families, tuple(args.compile_budgets))
    cheap = [o for o in every if o.family not in COMPILED]
    compiled = [o for o in every if o.family in COMPILED]
    done: list[float] = []
    for stage in (cheap, compiled):
        for opt in stage:
            record(run_option(opt, args, device))
        for opt in _budgeted_options(rows, done, families, args):
            record(run_option(opt, args, device))
    if any(r.get("peak_GiB") for r in rows):
        print(f"wrote {pareto_plot(args.out)}")
    return rows


if __name__ == "__main__":
    main()
