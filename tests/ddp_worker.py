"""One DDP fit on the CPU (gloo, 2 ranks), run by tests/test_distributed.py as a script: Lightning
starts the second rank by running this file again. Writes what each rank saw to --out."""

import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ac import MuTwoAC  # noqa: E402
from lightning_ac.measure import saved_tensor_bytes  # noqa: E402
from lightning_ac.rewriter import encode_plan  # noqa: E402
from tests.lit_models import LitWorkload  # noqa: E402


class Counted(LitWorkload):
    """Counts the bytes saved for backward in the last training step."""

    def training_step(self, batch, batch_idx):
        params = list(self.parameters())
        loss, self.saved_B = saved_tensor_bytes(lambda *b: self._loss(b), batch, exclude=params)
        self.losses.append(loss.item())
        return loss


class CountedWithABreak(Counted):
    """The CNN with a ``print`` between its feature blocks: dynamo splits its step in two."""

    def forward(self, x, y):
        features = self.model.features
        h = features[:6](x)
        print(end="")
        h = features[6:](h)
        return self.model.head(h.mean(dim=(2, 3)))


def fit_two_ranks(make, strategy, max_steps: int, describe=lambda cb: {}) -> None:
    """Parse ``--budget`` (0: no AC), ``--out``, ``--graph-break``, ``--devices`` (2) and
    ``--no-strategy`` (Lightning's default strategy instead of ``strategy``), fit the model and
    loader ``make(args)`` returns on that many CPU ranks, and write each rank's
    ``rank_<r>.json`` (its saved bytes, losses, MuTwoAC's state and ``describe(callback)``) and
    ``params_<r>.pt`` (its parameters, or its shards)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=0, help="0: no AC")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--graph-break", action="store_true")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--no-strategy", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, loader = make(args)
    cb = MuTwoAC(budget=args.budget, verbose=False) if args.budget else None
    t = L.Trainer(accelerator="cpu", devices=args.devices,
                  strategy="auto" if args.no_strategy else strategy, max_steps=max_steps,
                  callbacks=[cb] if cb else [], logger=L.loggers.CSVLogger(args.out),
                  enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, deterministic=True, log_every_n_steps=1)
    t.fit(model, loader)
    seen = {"rank": t.global_rank, "saved_B": model.saved_B, "losses": model.losses}
    if cb is not None:
        seen.update(state=str(cb.state), **describe(cb))
    local = [p.to_local().detach() if hasattr(p, "to_local") else p.detach()
             for p in model.parameters()]
    torch.save(local, args.out / f"params_{t.global_rank}.pt")
    (args.out / f"rank_{t.global_rank}.json").write_text(json.dumps(seen, default=str))


def main() -> None:
    def make(args):
        m = (CountedWithABreak if args.graph_break else Counted)("cnn")
        return m, m.dataloader(3)

    def describe(cb):
        graphs = cb.ac.last.graphs
        return {"recomputed": len(cb.plan.recomputed),
                "predicted_peak_B": cb.plan.predicted_peak_B,
                "profiled_peak_B": cb.profile.peak_bytes,
                "strategy": type(cb.ac.module.trainer.strategy).__name__,
                "graphs": len(graphs.captured) if graphs else 1,
                # (a plan travels between ranks as positions in one graph)
                "plan": None if graphs else encode_plan(cb.plan, cb.profile.joint.graph)}

    fit_two_ranks(make, "ddp", 3, describe)


if __name__ == "__main__":
    main()
