"""Tiny LightningModules around the zoo's workloads, for callback tests."""

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.zoo import make_workload


class LitWorkload(LightningModule):
    """Trains a zoo workload on its own synthetic batch, repeated."""

    def __init__(self, name: str, batch_size: int = 16, seq_len: int = 32, lr: float = 0.05,
                 optimizer: str = "sgd"):
        super().__init__()
        self.w = make_workload(name, batch_size, seq_len=seq_len)
        self.model = self.w.model
        self.name, self.lr, self.opt = name, lr, optimizer
        self.losses: list[float] = []

    def forward(self, *inputs):
        if self.name in ("tiny-bert", "bert"):
            ids, mask, labels = inputs
            return self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        x, _ = inputs
        return self.model(x)

    def _loss(self, batch):
        out = self(*batch)
        if self.name in ("tiny-bert", "bert"):
            return out
        return torch.nn.functional.cross_entropy(out, batch[1])

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def predict_step(self, batch, batch_idx):
        return self(*batch)

    def configure_optimizers(self):
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def dataloader(self, steps: int = 4):
        # the same batch `steps` times: one DataLoader batch is the whole workload batch
        data = TensorDataset(*[t.repeat(steps, *[1] * (t.dim() - 1)) for t in self.w.inputs])
        return DataLoader(data, batch_size=self.w.inputs[0].shape[0], shuffle=False)
