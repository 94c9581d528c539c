"""One FSDP2 fit on the CPU (Lightning's ModelParallelStrategy, gloo, 2 ranks, ``fully_shard`` on
each block and the root), run by tests/test_distributed.py as a script: Lightning starts the second
rank by running this file again. Writes what each rank saw to --out."""

import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ac.measure import saved_tensor_bytes  # noqa: E402
from tests.ddp_worker import fit_two_ranks  # noqa: E402
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
    def make(args):
        data = TensorDataset(torch.randn(48, 32, 64), torch.randint(0, 10, (48,)))
        return Sharded(), DataLoader(data, batch_size=8)

    fit_two_ranks(make, ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), 4,
                  lambda cb: {"recomputed": len(cb.plan.recomputed),
                              "graphs": len(cb.ac.last.graphs.captured),
                              "resharded": sum(len(g.joint.resharded)
                                               for g in cb.ac.last.graphs.captured),
                              "predicted_peak_B": cb.plan.predicted_peak_B})


if __name__ == "__main__":
    main()
