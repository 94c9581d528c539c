"""Loss over N training steps with and without MuTwoAC: same model, data and seed.

Each run builds the workload afresh (same seed: same weights and batch), trains ``--steps`` Adam
steps with deterministic algorithms on, and records the loss of every step. The AC run plans at
``--budget`` or, by default, ``--share`` of the way from the plan's floor (everything
recomputable dropped) to the un-checkpointed peak, so that something is always recomputed.
Dropout draws the same masks in both runs: random ops replay their generator state. Writes
``<out>/<model>_loss_curves.csv`` and ``.png`` and prints the largest relative difference.

    PYTHONPATH=. python benchmarks/loss_curves.py --model bert --batch-size 8 --seq-len 512 --steps 50
    PYTHONPATH=. python benchmarks/loss_curves.py --model resnet152 --batch-size 32 --steps 50
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import torch

from benchmarks.common import load_workload, planned_step, workload_parser
from lightning_ac.planner import Plan
from lightning_ac.report import pyplot


def train(args, device: torch.device, ac: bool) -> tuple[list[float], Plan | None]:
    """Losses of ``args.steps`` steps; with ``ac``, the plan the rewritten step ran."""
    w = load_workload(args.model, args.batch_size, device=device, seq_len=args.seq_len,
                      seed=args.seed)
    opt = torch.optim.Adam(w.model.parameters(), lr=args.lr)
    step = planned_step(w, opt, args.budget, args.share) if ac else w.loss
    torch.manual_seed(args.seed)  # the same dropout draws in both runs
    if device.type == "cuda":
        torch.cuda.manual_seed(args.seed)
    losses = []
    for _ in range(args.steps):
        opt.zero_grad(set_to_none=True)
        loss = step(*w.inputs)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.compiler.reset()
    return losses, step.plan if ac else None


def plot(df: pd.DataFrame, path: Path, title: str) -> None:
    plt = pyplot()

    fig, (ax, dx) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(df.step, df.loss_without_ac, color="k", linewidth=3, alpha=0.4, label="without AC")
    ax.plot(df.step, df.loss_with_ac, color="tab:red", linewidth=1.2, linestyle="--",
            label="with MuTwoAC")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    dx.semilogy(df.step, df.rel_diff.clip(lower=1e-12), color="tab:red", marker=".")
    dx.axhline(1e-6, color="gray", linestyle=":", label="1e-6")
    dx.set_xlabel("step")
    dx.set_ylabel("|Δ| / loss\n(0 drawn at 1e-12)")
    dx.legend(fontsize=8)
    dx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = workload_parser(__doc__, "bert", 8, out="reports/curves")
    ap.add_argument("--budget", default=None, help='e.g. "3.5GiB" (default: see --share)')
    ap.add_argument("--share", type=float, default=0.5,
                    help="budget this share of the way from the plan's floor to the peak")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.use_deterministic_algorithms(True)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        without, _ = train(args, device, ac=False)
        with_ac, p = train(args, device, ac=True)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    df = pd.DataFrame({"step": range(1, args.steps + 1), "loss_without_ac": without,
                       "loss_with_ac": with_ac})
    df["rel_diff"] = (df.loss_with_ac - df.loss_without_ac).abs() / df.loss_without_ac.abs()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.model}_loss_curves"
    df.to_csv(stem.with_suffix(".csv"), index=False)
    title = (f"{args.model}, batch {args.batch_size}, {args.steps} Adam steps, {device.type}: "
             f"{len(p.recomputed)} activations recomputed")
    plot(df, stem.with_suffix(".png"), title)
    print(f"plan: {p.summary()}")
    print(f"largest relative loss difference over {args.steps} steps: {df.rel_diff.max():.3g} "
          f"({'within' if df.rel_diff.max() <= 1e-6 else 'ABOVE'} 1e-6); "
          f"loss {without[0]:.4f} -> {without[-1]:.4f}; wrote {stem}.csv/.png")
    return df


if __name__ == "__main__":
    main()
