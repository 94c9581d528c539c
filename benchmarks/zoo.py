"""Reference workloads: a model, a synthetic batch and the loss of one training step.

The command line, the tests and the recipes share these so that "ResNet-152 at batch 32" means
the same thing everywhere. Data is synthetic and made on the spot; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["WORKLOADS", "Workload", "make_workload"]


@dataclass
class Workload:
    """A model and one step's inputs: ``loss(*inputs)`` is the scalar loss."""

    name: str
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    loss: Callable[..., torch.Tensor]


class MLP(nn.Module):
    """Three linear layers with ReLUs between them: the profiler's smallest test subject."""

    def __init__(self, d_in: int = 32, hidden: int = 64, d_out: int = 10):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), \
            nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyCNN(nn.Module):
    """Four conv-BN-ReLU blocks, a pooled linear head: a tiny model with BatchNorm and enough
    depth for recomputation to lower its peak."""

    def __init__(self, classes: int = 10, widths: tuple[int, ...] = (8, 8, 16, 16)):
        super().__init__()
        layers, c_in = [], 3
        for c in widths:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def _classifier(name, model, x, classes):
    y = torch.randint(0, classes, (x.shape[0],), device=x.device)

    def loss(x, y):
        return nn.functional.cross_entropy(model(x), y)

    return Workload(name, model, (x, y), loss)


def _bert(name, config_kwargs, batch_size, seq_len, device, seed, classify=False):
    """BERT as a masked LM (labels per token), or with ``classify`` as a sequence classifier
    (``BertForSequenceClassification``, 2 classes, one label per sample)."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    config = BertConfig(**config_kwargs)
    model = (BertForSequenceClassification if classify else BertForMaskedLM)(config).to(device)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g).to(device)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=device)
    shape = (batch_size,) if classify else (batch_size, seq_len)
    labels = torch.randint(0, config.num_labels if classify else config.vocab_size, shape,
                           generator=g).to(device)

    def loss(ids, mask, labels):
        # attention_mask passed explicitly: without it HF checks the batch for padding on the
        # host, a data-dependent branch that cannot be captured as one graph.
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    return Workload(name, model, (ids, mask, labels), loss)


def make_workload(name: str, batch_size: int, device="cpu", seq_len: int = 512,
                  seed: int = 0) -> Workload:
    """Build the named workload on ``device`` with random weights and a synthetic batch.

    Names: ``mlp``, ``cnn`` (tiny CNN with BatchNorm), ``tiny-bert`` (2 layers, dropout on),
    ``resnet152``, ``bert`` (BERT-base masked LM; ``seq_len`` tokens per sample), and
    ``tiny-bert-cls``, ``bert-cls``: the same as sequence classifiers.
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    device = torch.device(device)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return _classifier(name, MLP().to(device), torch.randn(batch_size, 32, generator=g).to(device), 10)
    if name == "cnn":
        x = torch.randn(batch_size, 3, 16, 16, generator=g).to(device)
        return _classifier(name, TinyCNN().to(device), x, 10)
    if name == "resnet152":
        from torchvision.models import resnet152

        x = torch.randn(batch_size, 3, 224, 224, generator=g).to(device)
        return _classifier(name, resnet152().to(device), x, 1000)
    classify = name.endswith("-cls")
    if name.startswith("tiny-bert"):
        cfg = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=128, max_position_embeddings=128)
        return _bert(name, cfg, batch_size, min(seq_len, 128), device, seed, classify)
    return _bert(name, {}, batch_size, seq_len, device, seed, classify)


WORKLOADS = ("mlp", "cnn", "tiny-bert", "tiny-bert-cls", "resnet152", "bert", "bert-cls")
