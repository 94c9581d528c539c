"""What graph breaks cost MuTwoAC: the same model as 1, 2 and 4 graphs.

A stack of MLP blocks (``--blocks``, width ``--dim``) in stages with a ``print`` between stages,
so that dynamo splits the step into ``k`` graphs (``--graphs 1 2 4``). For each ``k``, with
the same weights, batch and a budget halfway between the one-graph plan's floor and its
un-checkpointed peak:

* ``planning_s``: wall time of the planning calls (for one graph, the first call; for ``k``
  graphs, the capture call and the call that plans), less the steady step time of each;
* ``step_ms``: median of the later steps, ``step_ms_no_ac`` the same model's eager steps;
  ``saved_B``: what autograd saves in one step, against ``saved_B_no_ac`` without AC;
  ``max_rel_loss_diff`` against the same steps without AC;
* ``predicted_peak_B`` and the plan's recomputed count.

    PYTHONPATH=. python -m benchmarks.graph_breaks --steps 8 --out reports/graph_breaks
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from lightning_ac import auto_checkpoint, plan
from lightning_ac.measure import saved_tensor_bytes


class _Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), \
            nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class _Stage(nn.Module):
    """Blocks in a row (user code, unlike ``nn.Sequential``: dynamo starts a frame here)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = blocks  # (a plain list: the parameters belong to the stack)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class _Stack(nn.Module):
    """``blocks`` blocks in ``graphs`` stages, a ``print`` between stages (a graph break)."""

    def __init__(self, dim: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(blocks))
        self.head = nn.Linear(dim, 10)
        self.split(1)

    def split(self, graphs: int) -> None:
        every = len(self.blocks) // graphs
        self.stages = [_Stage(list(self.blocks[i:i + every]))
                       for i in range(0, len(self.blocks), every)]

    def forward(self, x, y):
        for i, stage in enumerate(self.stages):
            if i:
                print(end="")  # what a user's debugging print does to dynamo
            x = stage(x)
        return nn.functional.cross_entropy(self.head(x.mean(1)), y)


def _train_step(model, opt, x, y, times: list[float]) -> float:
    """One step; appends its wall time to ``times``; returns the loss."""
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = model(x, y)
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t0)
    return loss.item()


def run(dim: int, blocks: int, batch: int, seq: int, graphs: list[int], steps: int) -> pd.DataFrame:
    torch.manual_seed(0)
    base = _Stack(dim, blocks)
    x, y = torch.randn(batch, seq, dim), torch.randint(0, 10, (batch,))
    budget = None
    rows = []
    for k in graphs:
        model = copy.deepcopy(base)
        model.split(k)
        ref = copy.deepcopy(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
        if budget is None:  # from the one-graph profile: halfway between floor and peak
            def budget_fn(profile):
                return (plan(profile, 1).predicted_peak_B + profile.peak_bytes) // 2
        else:
            def budget_fn(profile, b=budget):
                return b
        ac = auto_checkpoint(model, opt, budget=budget_fn, always_rewrite=True,
                             previous_grads="freed")
        times, planning, losses, ref_losses, ref_times = [], [], [], [], []
        for _ in range(steps):
            for m, o, t, ls in ((model, opt, times, losses), (ref, ref_opt, ref_times, ref_losses)):
                ls.append(_train_step(m, o, x, y, t))
            planning.append(ac.planned_last_call)
        budget = ac.plan.budget_B
        steady = statistics.median(t for t, p in zip(times, planning) if not p)
        _, saved = saved_tensor_bytes(model, [x, y], exclude=list(model.parameters()))
        _, saved_ref = saved_tensor_bytes(ref, [x, y], exclude=list(ref.parameters()))
        graphs_run = len(ac.last.graphs.captured) if ac.last.graphs is not None else 1
        rows.append({
            "graphs": graphs_run, "planning_calls": sum(planning),
            "planning_s": round(sum(t - steady for t, p in zip(times, planning) if p), 3),
            "step_ms": round(steady * 1e3, 2),
            "step_ms_no_ac": round(statistics.median(ref_times[1:]) * 1e3, 2),
            "saved_B": saved, "saved_B_no_ac": saved_ref,
            "budget_B": ac.plan.budget_B, "predicted_peak_B": ac.plan.predicted_peak_B,
            "baseline_peak_B": ac.plan.baseline_peak_B, "recomputed": len(ac.plan.recomputed),
            "max_rel_loss_diff": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
        })
        print(rows[-1], flush=True)
        ac.remove()
        torch.compiler.reset()
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--graphs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("reports/graph_breaks"))
    args = ap.parse_args(argv)
    df = run(args.dim, args.blocks, args.batch_size, args.seq_len, args.graphs, args.steps)
    one = df.loc[df.graphs == 1, "planning_s"]
    if len(one):
        df["planning_vs_one_graph"] = (df.planning_s / float(one.iloc[0])).round(2)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "graph_breaks.csv", index=False)
    print(df.to_string())
    return df


if __name__ == "__main__":
    main()
