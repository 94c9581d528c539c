"""Write a :class:`~lightning_ac.profiler.Profile` as CSV, JSON and PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

__all__ = ["format_bytes", "load", "plot_profile", "pyplot", "write_csv", "write_json"]

# stacking order of the plots: what lives through the iteration at the bottom
_STACK = ("parameter", "optimizer_state", "other", "gradient", "activation")
_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
_COLORS = {"parameter": "#4c72b0", "gradient": "#dd8452", "optimizer_state": "#8172b3",
           "activation": "#55a868", "other": "#937860"}


def _unit(nbytes: float) -> tuple[str, int]:
    """The largest binary unit in which ``nbytes`` is at least 1."""
    return next((u for u in _UNITS if nbytes >= u[1]), _UNITS[-1])


def format_bytes(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit that keeps it at least 1: "6.10 GiB", "812 B"."""
    unit, scale = _unit(abs(nbytes))
    return f"{nbytes / scale:.2f} {unit}" if scale > 1 else f"{int(nbytes)} B"


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (charts are written headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    """Drop the columns that hold ``fx.Node`` objects (their names are in ``name``)."""
    return df.drop(columns=[c for c in ("node",) if c in df.columns])


def write_csv(profile, directory) -> list[Path]:
    """Write ``nodes.csv``, ``activations.csv`` and ``memory.csv``; return the paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "nodes.csv", out / "activations.csv", out / "memory.csv"]
    _plain(profile.nodes).to_csv(paths[0], index=False)
    _plain(profile.activations).to_csv(paths[1], index=False)
    mem = profile.memory.copy()
    mem.insert(0, "phase", profile.nodes["phase"].to_numpy())
    mem.insert(0, "rank", range(len(mem)))
    mem.to_csv(paths[2], index=False)
    return paths


def write_json(profile, path) -> None:
    """Write the profile's summary, with the top activations by size, as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    top = _plain(profile.activations).nlargest(10, "bytes")
    data = dict(profile.summary)
    data["largest_activations"] = top[["name", "bytes", "recompute_ms", "inactive_ms",
                                       "recompute_sources"]].to_dict(orient="records")
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def plot_profile(profile, directory, device_limit_B: int | None = None) -> list[Path]:
    """Draw memory over the iteration and the breakdown at the peak; return the PNG paths.

    ``memory.png``: live bytes after each node (stacked by category) and the allocator peak
    during each node, with forward/backward/optimizer separators and the device limit.
    ``peak_breakdown.png``: one stacked bar of what is live at the peak, by category.
    """
    plt = pyplot()

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    nodes, mem, summary = profile.nodes, profile.memory, profile.summary
    title = summary.get("title") or "training iteration"
    if device_limit_B is None:
        device_limit_B = summary.get("device_limit_B")

    # Inputs (placeholders) run no op: leave them out so that x counts executed ops. Persistent
    # categories go at the bottom of the stack and the ones that come and go on top.
    ran = nodes["op"].ne("placeholder").to_numpy()
    x = range(int(ran.sum()))
    peak = nodes["peak_mem_B"].max()
    # a limit far above the peak would flatten the hump: then it is named, not drawn
    limit_in_view = bool(device_limit_B) and device_limit_B <= 2 * peak
    unit, scale = _unit(max(peak, device_limit_B if limit_in_view else 0))
    fig, ax = plt.subplots(figsize=(11, 5))
    ax.stackplot(x, *[mem[c].to_numpy()[ran] / scale for c in _STACK],
                 labels=[c.replace("_", " ") for c in _STACK],
                 colors=[_COLORS[c] for c in _STACK], alpha=0.85)
    ax.plot(x, nodes["peak_mem_B"].to_numpy()[ran] / scale, color="black", lw=0.6,
            label="peak during op")
    ymax = max(peak, device_limit_B if limit_in_view else 0) / scale * 1.15
    ax.set_ylim(0, ymax)
    phases = nodes["phase"].to_numpy()[ran]
    for i, phase in enumerate(("forward", "backward", "optimizer")):
        idx = (phases == phase).nonzero()[0]
        if len(idx):
            if i:
                ax.axvline(idx[0], color="grey", ls="--", lw=1)
            ax.text(idx[0], ymax * 0.98, f" {phase} →", va="top", fontsize=9)
    if limit_in_view:
        ax.axhline(device_limit_B / scale, color="red", lw=1.2,
                   label=f"device limit {device_limit_B / scale:.1f} {unit}")
    elif device_limit_B:
        ax.text(0.99, 0.91, f"device limit {device_limit_B / 2**30:.1f} GiB (above this scale)",
                transform=ax.transAxes, ha="right", va="top", fontsize=9, color="red")
    pr = int(ran[: summary["peak_rank"]].sum())
    ax.annotate(f"peak {summary['predicted_peak_B'] / scale:.2f} {unit}\n({summary['peak_node']})",
                xy=(pr, summary["predicted_peak_B"] / scale), xytext=(-20, 12),
                textcoords="offset points", ha="right", fontsize=8,
                arrowprops={"arrowstyle": "->"})
    ax.set_xlabel("execution order (ops, inputs left out)")
    ax.set_ylabel(f"memory ({unit})")
    ax.set_title(f"Memory over one {title}")
    ax.set_xlim(0, len(x) - 1)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    paths = [out / "memory.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    breakdown = summary["peak_breakdown_B"]
    unit, scale = _unit(sum(breakdown.values()))
    fig, ax = plt.subplots(figsize=(4.5, 5))
    bottom = 0.0
    for cat in _STACK:
        value = breakdown.get(cat, 0)
        ax.bar(["at peak"], [value / scale], bottom=bottom, color=_COLORS[cat],
               label=f"{cat.replace('_', ' ')}: {value / scale:.2f} {unit}")
        bottom += value / scale
    ax.set_ylabel(f"memory ({unit})")
    ax.set_title(f"Peak-memory breakdown\n{title}", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.05))
    fig.tight_layout()
    paths.append(out / "peak_breakdown.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def load(directory):
    """Read back what :func:`write_csv` and :func:`write_json` wrote, enough to re-plot it.

    Returns an object with ``nodes``, ``activations``, ``memory`` (DataFrames) and ``summary``.
    """
    from types import SimpleNamespace

    d = Path(directory)
    memory = pd.read_csv(d / "memory.csv").drop(columns=["rank", "phase"])
    return SimpleNamespace(nodes=pd.read_csv(d / "nodes.csv"),
                           activations=pd.read_csv(d / "activations.csv"), memory=memory,
                           summary=json.loads((d / "summary.json").read_text()))
