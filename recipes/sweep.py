"""Batch-size sweep with and without MuTwoAC, each point in a fresh process.

    PYTHONPATH=. python -m recipes.sweep --model resnet152 --device-memory 16GB \\
        --batch-sizes 16 32 64 128 256
    PYTHONPATH=. python -m recipes.sweep --model bert --device-memory 16GB --batch-sizes 8 16 32 64 128

Each (batch size, AC on/off) point runs the recipe in its own process, so that an out-of-memory
failure does not poison the next point. Writes ``<out>/<model>_sweep.csv`` (batch size, AC,
budget, measured and predicted peak, median step time, samples/s, status), a bar chart of peak
memory against batch size (OOM points marked, budget and device limit drawn) and a line chart of
step time against batch size with the overhead of AC in %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

_GIB = 2**30


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def run_point(model: str, batch: int, ac: bool, extra: list[str], timeout: int) -> dict:
    """One recipe run in a fresh process; status is ok, OOM or error."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", f"recipes.{model}", "--batch-size", str(batch),
               "--result-json", str(result), "--log-dir", tmp, *extra]
        if not ac:
            cmd.append("--no-ac")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired as exc:  # say how far it got: planning, or training
            said = "\n".join(_text(o) for o in (exc.stdout, exc.stderr))
            last = [ln.strip() for ln in said.splitlines() if ln.strip()][-1:]
            return {"batch_size": batch, "ac": ac, "wall_s": timeout, "status": "timeout",
                    "error": f"no result after {timeout} s" + (f"; last output: {last[0][:300]}"
                                                               if last else "")}
        row = {"batch_size": batch, "ac": ac, "wall_s": round(time.perf_counter() - t0, 1)}
        if proc.returncode == 0 and result.exists():
            row.update(json.loads(result.read_text()), status="ok")
            return row
        lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip()]
        oom = [ln for ln in lines if "out of memory" in ln.lower()]
        # MuTwoAC refusing the step (BudgetError) quotes the allocator's message when even the
        # profile with every activation on the host ran out: that is an error, not an OOM
        refused = [ln for ln in lines if "BudgetError: " in ln]  # the message, not a source line
        row["status"] = "OOM" if oom and not refused else "error"
        # what ran out (how much the allocator was asked for, or the node the profiler ran) or
        # what failed: the CSV says why, not only that
        why = list(dict.fromkeys(refused[-1:] + oom[-1:])) or lines[-1:]
        row["error"] = " | ".join(why)[:400]
        return row


_COLUMNS = ["batch_size", "ac", "wall_s", "peak_B", "step_ms", "step_ms_mean", "state",
            "samples_per_s", "budget_B", "predicted_peak_B", "device_limit_B", "status", "error"]


def table(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """The sweep's rows with every column present (a sweep where nothing trained has no peaks),
    one row per (batch size, AC), the last measured one kept, sorted."""
    df = pd.DataFrame(rows)
    df = df.reindex(columns=_COLUMNS + [c for c in df.columns if c not in _COLUMNS])
    df["ac"] = df["ac"].astype(bool)
    df = df.drop_duplicates(["batch_size", "ac"], keep="last")
    return df.sort_values(["batch_size", "ac"]).reset_index(drop=True)


def charts(df: pd.DataFrame, model: str, out: Path) -> list[Path]:
    """Bar chart of peak memory and line chart of step time against batch size."""
    import numpy as np

    from lightning_ac.report import pyplot  # only when drawing: it imports torch

    plt = pyplot()

    batches = sorted(df["batch_size"].unique())
    x = np.arange(len(batches))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for k, (ac, label, color) in enumerate([(False, "no AC", "#c44e52"), (True, "MuTwoAC", "#4c72b0")]):
        sub = df[df["ac"] == ac].set_index("batch_size").reindex(batches)
        peaks = (sub["peak_B"].fillna(0) / _GIB).to_numpy()
        ax.bar(x + (k - 0.5) * 0.38, peaks, 0.38, label=label, color=color)
        for i, status in enumerate(sub["status"].fillna("not run")):
            if status != "ok":
                ax.text(x[i] + (k - 0.5) * 0.38, 0.2, status, rotation=90, ha="center",
                        va="bottom", fontsize=8, color=color)
    for col, style, name in (("device_limit_B", "-", "device limit"), ("budget_B", "--", "budget")):
        vals = df[col].dropna()
        if len(vals):
            ax.axhline(vals.iloc[0] / _GIB, color="black", ls=style, lw=1,
                       label=f"{name} {vals.iloc[0] / _GIB:.1f} GiB")
    ax.set_xticks(x, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title(f"{model}: peak memory per training step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out / f"{model}_peak_memory.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ok = df[df["status"] == "ok"]
    for ac, label, color in ((False, "no AC", "#c44e52"), (True, "MuTwoAC", "#4c72b0")):
        sub = ok[ok["ac"] == ac].sort_values("batch_size")
        ax.plot(sub["batch_size"], sub["step_ms"], "o-", label=label, color=color)
    both = ok.pivot_table(index="batch_size", columns="ac", values="step_ms")
    if True in both and False in both:
        for b, row in both.dropna().iterrows():
            ax.annotate(f"{(row[True] / row[False] - 1) * 100:+.0f}%", (b, row[True]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("median step time (ms)")
    ax.set_title(f"{model}: iteration latency (AC overhead in %)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / f"{model}_step_time.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def summarize(df: pd.DataFrame) -> dict:
    """The figures the sweep exists to show: the largest batch that trains with and without AC,
    AC's overhead at the largest no-AC batch, AC's throughput at its largest batch against the
    best without, and any AC point whose measured peak exceeded its budget."""
    ok = df[df["status"] == "ok"]
    no_ac, ac = ok[~ok["ac"].astype(bool)], ok[ok["ac"].astype(bool)]
    out: dict = {"largest_batch_no_ac": int(no_ac["batch_size"].max()) if len(no_ac) else None,
                 "largest_batch_ac": int(ac["batch_size"].max()) if len(ac) else None}
    if out["largest_batch_no_ac"] and out["largest_batch_ac"]:
        out["batch_ratio"] = out["largest_batch_ac"] / out["largest_batch_no_ac"]
        at = out["largest_batch_no_ac"]
        pair = ok[ok["batch_size"] == at].set_index("ac")["step_ms"]
        if True in pair.index and False in pair.index:
            out["overhead_at_largest_no_ac_pct"] = float((pair[True] / pair[False] - 1) * 100)
        best = float(no_ac["samples_per_s"].max())
        largest = ac[ac["batch_size"] == out["largest_batch_ac"]]["samples_per_s"].iloc[0]
        out["throughput_ratio"] = float(largest / best)
    if "budget_B" in ac:
        over = ac[ac["peak_B"] > ac["budget_B"]]
        out["over_budget_batches"] = [int(b) for b in over["batch_size"]]
    return out


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["resnet152", "bert"], default="resnet152")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--device-memory", default=None, help='emulated card, e.g. "16GB"')
    ap.add_argument("--steps", type=int, default=30,
                    help="training steps per point (the median leaves out the first, planning "
                         "steps); 10 left the host-bound ResNet-152 points (b16 to b64) noisy")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per point")
    ap.add_argument("--out", type=Path, default=Path("reports/sweep"))
    ap.add_argument("--from-csv", type=Path, nargs="+", default=None,
                    help="run nothing: merge these sweep CSVs (a later row replaces an earlier "
                         "one of the same batch size and AC), then write the CSV, charts and "
                         "summary")
    ap.add_argument("recipe_args", nargs="*", help="passed to the recipe (after --)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / f"{args.model}_sweep.csv"
    if args.from_csv:
        df = table(pd.concat([pd.read_csv(p) for p in args.from_csv], ignore_index=True))
        df.to_csv(csv_path, index=False)
        return _report(df, args.model, args.out)
    extra = ["--steps", str(args.steps), *args.recipe_args]
    if args.device_memory:
        extra += ["--device-memory", args.device_memory]
    rows = []
    for batch in args.batch_sizes:
        for ac in (False, True):
            row = run_point(args.model, batch, ac, extra, args.timeout)
            rows.append(row)
            peak = f"{row['peak_B'] / _GIB:.2f} GiB" if row.get("peak_B") else "-"
            step = f"{row['step_ms']:.1f} ms" if row.get("step_ms") else "-"
            why = f"  {row['error']}" if row.get("error") else ""
            print(f"[sweep {args.model}] batch {batch:>4} {'AC' if ac else 'no AC':>5}: "
                  f"{row['status']:<7} peak {peak:>10}  step {step:>9}  "
                  f"({row.get('wall_s', '-')} s){why}", flush=True)
            # after every point, so that a sweep cut short keeps what it measured
            df = table(rows)
            df.to_csv(csv_path, index=False)
    return _report(df, args.model, args.out)


def _report(df: pd.DataFrame, model: str, out: Path) -> pd.DataFrame:
    """Draw the charts, write and print the summary."""
    for p in charts(df, model, out):
        print(f"wrote {p}")
    summary = summarize(df)
    (out / f"{model}_sweep_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[sweep {model}] " + ", ".join(
        f"{k.replace('_', ' ')} {v:.2f}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
        for k, v in summary.items()))
    return df


if __name__ == "__main__":
    main()
