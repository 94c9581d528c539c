"""Memory over one training step, with and without MuTwoAC, recorded from a real run on CUDA.

Each variant builds the workload afresh (same seed), trains a few warm-up steps (with AC the
first is the planning step), then records one step with the CUDA caching allocator's history
(every allocation and free, timed on the host). Writes ``<out>/<model>_memory_timeline.csv``
(variant, ms since the step began, bytes allocated), a PNG of both curves with the budget drawn,
and an animated GIF that draws them as the step runs.

    PYTHONPATH=. python benchmarks/memory_timeline.py --model resnet152 --batch-size 64 \\
        --budget 6GiB
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.common import load_workload, planned_step, workload_parser
from lightning_ac import _torch_compat as compat
from lightning_ac.measure import train_step
from lightning_ac.report import pyplot

_GIB = 2**30
_COLORS = {"without AC": "#c44e52", "with MuTwoAC": "#4c72b0"}


def timeline(events: list[tuple[float, int]], base_B: int) -> pd.DataFrame:
    """Bytes allocated after each event, from ``(time_us, ±bytes)`` pairs, starting at ``base_B``.

    Times become milliseconds since the first event.
    """
    if not events:
        return pd.DataFrame({"ms": [0.0], "allocated_B": [base_B]})
    t = np.array([e[0] for e in events], dtype=np.float64)
    d = np.array([e[1] for e in events], dtype=np.int64)
    return pd.DataFrame({"ms": (t - t[0]) / 1e3, "allocated_B": base_B + np.cumsum(d)})


def record_step(step, inputs, optimizer, device: torch.device, warmup: int = 3) -> pd.DataFrame:
    """The allocated bytes over one training step, after ``warmup`` unrecorded steps."""
    for _ in range(warmup):
        train_step(step, inputs, optimizer)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    with compat.device_memory_trace(device) as events:
        train_step(step, inputs, optimizer)
    return timeline(events, base)


def plot(df: pd.DataFrame, title: str, budget_B: int | None, path: Path) -> None:
    """Both curves on one axis, each peak marked, the budget drawn."""
    plt = pyplot()
    fig, ax = _axes(df, title, budget_B)
    for variant, sub in df.groupby("variant", sort=False):
        ax.plot(sub.ms, sub.allocated_B / _GIB, color=_COLORS.get(variant), label=variant, lw=1.2)
        i = sub.allocated_B.idxmax()
        ax.annotate(f"peak {sub.allocated_B[i] / _GIB:.2f} GiB", (sub.ms[i], sub.allocated_B[i] / _GIB),
                    textcoords="offset points", xytext=(4, 4), fontsize=8,
                    color=_COLORS.get(variant))
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def animate(df: pd.DataFrame, title: str, budget_B: int | None, path: Path,
            frames: int = 48, fps: int = 12) -> None:
    """A GIF that draws both curves up to the same moment of their steps, frame by frame."""
    from matplotlib.animation import FuncAnimation, PillowWriter

    plt = pyplot()
    fig, ax = _axes(df, title, budget_B)
    groups = list(df.groupby("variant", sort=False))
    lines = [ax.plot([], [], color=_COLORS.get(v), label=v, lw=1.2)[0] for v, _ in groups]
    clock = ax.text(0.01, 0.97, "", transform=ax.transAxes, va="top", fontsize=9)
    ax.legend(loc="upper right")
    fig.tight_layout()
    end = float(df.ms.max()) or 1.0

    def draw(k: int):
        now = end * (k + 1) / frames
        for line, (_, sub) in zip(lines, groups):
            shown = sub[sub.ms <= now]
            line.set_data(shown.ms, shown.allocated_B / _GIB)
        clock.set_text(f"{now:.0f} ms into the step")
        return [*lines, clock]

    FuncAnimation(fig, draw, frames=frames, blit=False).save(path, writer=PillowWriter(fps=fps))
    plt.close(fig)


def _axes(df: pd.DataFrame, title: str, budget_B: int | None):
    fig, ax = pyplot().subplots(figsize=(8, 4.2))
    ax.set_xlim(0, float(df.ms.max()) * 1.02 or 1.0)
    ax.set_ylim(0, float(df.allocated_B.max()) / _GIB * 1.12)
    if budget_B:
        ax.axhline(budget_B / _GIB, color="black", ls="--", lw=1,
                   label=f"budget {budget_B / _GIB:.2f} GiB")
    ax.set_xlabel("time since the step began (ms, host clock)")
    ax.set_ylabel("allocated (GiB)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig, ax


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = workload_parser(__doc__, "resnet152", 64, out="reports/memory", device="cuda")
    ap.add_argument("--budget", default=None, help='e.g. "6GiB" (default: see --share)')
    ap.add_argument("--share", type=float, default=0.5,
                    help="budget this share of the way from the plan's floor to the peak")
    ap.add_argument("--frames", type=int, default=48)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        ap.error("the allocator's history is recorded on CUDA only")
    parts, p = [], None
    for variant in ("without AC", "with MuTwoAC"):
        torch.cuda.empty_cache()
        w = load_workload(args.model, args.batch_size, device=device, seq_len=args.seq_len)
        opt = torch.optim.Adam(w.model.parameters(), lr=1e-4)
        step = w.loss if variant == "without AC" else planned_step(w, opt, args.budget, args.share)
        parts.append(record_step(step, w.inputs, opt, device).assign(variant=variant))
        p = getattr(step, "plan", p)
        del w, opt, step
        torch.compiler.reset()
    df = pd.concat(parts, ignore_index=True)[["variant", "ms", "allocated_B"]]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.model}_memory_timeline"
    df.to_csv(stem.with_suffix(".csv"), index=False)
    title = (f"{args.model}, batch {args.batch_size}: one training step "
             f"({len(p.recomputed)} activations recomputed with MuTwoAC)")
    plot(df, title, p.budget_B, stem.with_suffix(".png"))
    animate(df, title, p.budget_B, stem.with_suffix(".gif"), frames=args.frames)
    for variant, sub in df.groupby("variant", sort=False):
        print(f"{variant}: peak {sub.allocated_B.max() / _GIB:.2f} GiB, "
              f"step {sub.ms.max():.1f} ms (host clock, allocator events)")
    print(f"plan: {p.summary()}\nwrote {stem}.csv/.png/.gif")
    return df


if __name__ == "__main__":
    main()
