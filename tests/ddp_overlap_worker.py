"""Lightning's DDP with small gradient buckets on the CPU (gloo, 2 ranks), run by
tests/test_distributed.py as a script: when does each bucket go to the all-reduce, against when
the first block's gradients are made? Dynamo's DDP optimizer cuts the LightningModule's forward
(which runs inside DDP's) at bucket boundaries, and MuTwoAC plans the graphs as one step; each
graph's backward then hands its bucket to DDP as it ends, as DDP without AC does. Writes each
rank's events of the last step to --out."""

import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ac import MuTwoAC  # noqa: E402
from tests.test_step_graphs import Block  # noqa: E402

EVENTS: list[list] = []


def recording_allreduce(state, bucket):
    """DDP's own all-reduce, noting when the bucket was handed over."""
    EVENTS.append(["bucket", bucket.index()])
    return default_hooks.allreduce_hook(state, bucket)


class Blocks(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(128) for _ in range(6)])  # 3 buckets of 1 MB
        self.head = nn.Linear(128, 10)
        self.losses: list[float] = []

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.head(self.blocks(x).mean(1)), y)

    def on_train_start(self):
        # (Lightning registers DDPStrategy(ddp_comm_hook=...) on CUDA only)
        self.trainer.strategy.model.register_comm_hook(None, recording_allreduce)
        for p in self.blocks[0].parameters():  # the first bucket of DDP's backward is the last
            p.register_post_accumulate_grad_hook(lambda p: EVENTS.append(["first block grad"]))

    def on_train_batch_start(self, batch, batch_idx):
        EVENTS.clear()

    def training_step(self, batch, batch_idx):
        loss = self(*batch)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(32, 32, 128, generator=g), torch.randint(0, 10, (32,), generator=g)
        return torch.utils.data.DataLoader(list(zip(x, y)), batch_size=8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=0, help="0: no AC")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Blocks()
    cb = MuTwoAC(budget=args.budget, verbose=False) if args.budget else None
    strategy = DDPStrategy(bucket_cap_mb=1)
    t = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3,
                  callbacks=[cb] if cb else [], logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, deterministic=True)
    t.fit(model)
    seen = {"events": EVENTS, "losses": model.losses}
    if cb is not None:
        graphs = cb.ac.last.graphs
        seen.update(state=str(cb.state), graphs=len(graphs.captured) if graphs else 1,
                    recomputed=len(cb.plan.recomputed))
    (args.out / f"rank_{t.global_rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
