"""One FSDP2 fit on the CPU (Lightning's ModelParallelStrategy, gloo, 2 ranks, ``fully_shard`` on
each block and the root), run by tests/test_distributed.py as a script: Lightning starts the second
rank by running this file again. Writes what each rank saw to --out."""

import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ac import MuTwoAC  # noqa: E402
from lightning_ac.measure import saved_tensor_bytes  # noqa: E402
from tests.test_step_graphs import Block  # noqa: E402


class Sharded(L.LightningModule):
    """Four MLP blocks and a head; ``configure_model`` shards each block and the root."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block(64) for _ in range(4))
        self.head = nn.Linear(64, 10)
        self.losses: list[float] = []
        self.saved_B = 0

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
        return nn.functional.cross_entropy(self.head(x.mean(1)), y)

    def training_step(self, batch, batch_idx):
        loss, self.saved_B = saved_tensor_bytes(self, batch, exclude=[])
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=0, help="0: no AC")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    m = Sharded()
    data = TensorDataset(torch.randn(48, 32, 64), torch.randint(0, 10, (48,)))
    cb = MuTwoAC(budget=args.budget, verbose=False) if args.budget else None
    t = L.Trainer(accelerator="cpu", devices=2, max_steps=4,
                  strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                  callbacks=[cb] if cb else [], logger=L.loggers.CSVLogger(args.out),
                  enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, deterministic=True, log_every_n_steps=1)
    t.fit(m, DataLoader(data, batch_size=8))
    seen = {"rank": t.global_rank, "saved_B": m.saved_B, "losses": m.losses}
    if cb is not None:
        seen.update(state=str(cb.state), recomputed=len(cb.plan.recomputed) if cb.plan else 0,
                    graphs=len(cb.ac.last.graphs.captured) if cb.ac.last.graphs else 1,
                    predicted_peak_B=cb.plan.predicted_peak_B if cb.plan else None)
    local = [p.to_local().detach() if hasattr(p, "to_local") else p.detach()
             for p in m.parameters()]
    torch.save(local, args.out / f"params_{t.global_rank}.pt")
    (args.out / f"rank_{t.global_rank}.json").write_text(json.dumps(seen, default=str))


if __name__ == "__main__":
    main()
