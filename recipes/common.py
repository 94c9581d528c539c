"""What the recipes share: synthetic data, the command line, and the run with its final line.

Data is made locally and repeated: a few hundred synthetic samples are generated once (torchvision
``FakeData`` images, random token ids with an attention mask) and served in a loop, so that the
data loader costs nothing next to the step being measured.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_ac import MuTwoAC, StepMonitor, parse_budget
from lightning_ac.callback import device_memory_limit
from lightning_ac.report import format_bytes

# Grow CUDA memory in expandable segments unless the user chose otherwise: under a capped card a
# step can fail with free memory split between cached blocks (BERT-base b32 under 16 GB, with
# 2.2 GiB reserved but unallocated). Read when the allocator starts, so set it at import.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


class Looped(Dataset):
    """``length`` items cycling through a small set of precomputed tensors."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], length: int):
        self.tensors, self.length = tensors, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        j = i % len(self.tensors[0])
        return tuple(t[j] for t in self.tensors)


class _Synthetic(L.LightningDataModule):
    """A few hundred samples made once by :meth:`make`, served ``batch_size * steps`` times."""

    def setup(self, stage: str) -> None:
        h = self.hparams
        self.data = self.make(min(h.unique, h.batch_size * h.steps))

    def make(self, n: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(Looped(self.data, h.batch_size * h.steps), batch_size=h.batch_size,
                          num_workers=h.num_workers, drop_last=True)


class SyntheticImages(_Synthetic):
    """Random images and labels from torchvision's ``FakeData``."""

    def __init__(self, batch_size: int, steps: int, image_size: int = 224, classes: int = 1000,
                 unique: int = 256, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()

    def make(self, n: int) -> tuple[torch.Tensor, ...]:
        from torchvision.datasets import FakeData
        from torchvision.transforms import ToTensor

        h = self.hparams
        fake = FakeData(size=n, image_size=(3, h.image_size, h.image_size),
                        num_classes=h.classes, transform=ToTensor(), random_offset=h.seed)
        images, labels = zip(*(fake[i] for i in range(n)))
        return torch.stack(images), torch.tensor(labels)


class SyntheticTokens(_Synthetic):
    """Random token ids with a padded attention mask and masked-LM labels (15% of tokens)."""

    def __init__(self, batch_size: int, steps: int, seq_len: int = 512, vocab_size: int = 30522,
                 unique: int = 256, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()

    def make(self, n: int) -> tuple[torch.Tensor, ...]:
        h = self.hparams
        g = torch.Generator().manual_seed(h.seed)
        ids = torch.randint(0, h.vocab_size, (n, h.seq_len), generator=g)
        lengths = torch.randint(h.seq_len // 2, h.seq_len + 1, (n, 1), generator=g)
        mask = (torch.arange(h.seq_len) < lengths).long()
        chosen = (torch.rand(n, h.seq_len, generator=g) < 0.15) & mask.bool()
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        return ids, mask, labels


def parser(description: str, batch_default_gpu: int, batch_default_cpu: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"default: {batch_default_gpu} on a GPU, {batch_default_cpu} on the CPU")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 20 GPU, 3 CPU)")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"],
                   help="auto: the GPU if there is one (the defaults above follow it)")
    ac = p.add_mutually_exclusive_group()
    ac.add_argument("--budget", default=None,
                    help='MuTwoAC budget: "6GB", "5.5GiB", bytes (default: the device limit)')
    ac.add_argument("--no-ac", action="store_true", help="train without MuTwoAC")
    p.add_argument("--device-memory", default=None,
                   help='emulate a smaller GPU, e.g. "16GB" (per-process memory fraction)')
    p.add_argument("--strategy", default="auto", choices=["auto", "ddp", "fsdp"],
                   help="Lightning's strategy on this one device: ddp, or fsdp (FSDPStrategy, one "
                        "unit per block; needs a GPU). For scripts written for several GPUs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--log-dir", default="lightning_logs")
    p.add_argument("--result-json", default=None, help="also write the final figures as JSON")
    return p


def run(name: str, args: argparse.Namespace, model: L.LightningModule,
        data: L.LightningDataModule, batch_size: int) -> dict:
    """Train and print one final line with peak memory, median step time and throughput."""
    gpu = _on_gpu(args)
    if args.device_memory:
        if not gpu:
            sys.exit("--device-memory needs a CUDA device")
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, parse_budget(args.device_memory) / total))
    monitor: StepMonitor = StepMonitor() if args.no_ac else MuTwoAC(budget=args.budget)
    trainer = L.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, max_steps=args.steps,
                        strategy=_strategy(args, model, gpu),
                        precision=args.precision, callbacks=[monitor], log_every_n_steps=1,
                        logger=L.loggers.CSVLogger(args.log_dir, name=name),
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    m = monitor.last_epoch
    peak = m.get("mutwo/peak_memory_B")
    step = m.get("mutwo/step_time_median_ms")
    throughput = batch_size / step * 1e3 if step else None
    plan = getattr(monitor, "plan", None)  # a plain StepMonitor (--no-ac) has none
    if args.no_ac:
        ac = "off (--no-ac)"
    elif monitor.state == "active":
        ac = (f"on ({len(plan.recomputed)} activations recomputed, predicted peak "
              f"{format_bytes(plan.predicted_peak_B)})")
    else:
        ac = "off (the step fits)" if plan else "off (capture failed)"
    figures = (f"median step {step:.1f} ms, {throughput:.1f} samples/s" if step
               else "no measured steps (the first steps plan and warm up: raise --steps)")
    print(f"[{name}] batch {batch_size}, {args.precision}, AC {ac}: "
          f"peak {format_bytes(peak) if peak else 'n/a (CPU)'}, {figures}", flush=True)
    loss = trainer.callback_metrics.get("train_loss")
    result = {"peak_B": peak, "step_ms": step, "step_ms_mean": m.get("mutwo/step_time_ms"),
              "state": getattr(monitor, "state", "no-ac"),
              "strategy": type(trainer.strategy).__name__,
              "final_loss": float(loss) if loss is not None else None,
              "recomputed": len(plan.recomputed) if plan else None,
              "swapped": len(plan.swapped) if plan else None,
              "baseline_peak_B": plan.baseline_peak_B if plan else None,
              "batch_size": batch_size, "samples_per_s": throughput,
              "budget_B": plan.budget_B if plan else None,
              "predicted_peak_B": plan.predicted_peak_B if plan else None,
              "device_limit_B": device_memory_limit(torch.device("cuda"), margin=0.0)
              if gpu else None}
    if args.result_json:
        import json

        with open(args.result_json, "w") as f:
            json.dump(result, f)
    return result




def _strategy(args: argparse.Namespace, model: L.LightningModule, gpu: bool):
    """Lightning's strategy for ``--strategy``: FSDP wraps each of the model's blocks
    (``model.fsdp_blocks``: the layer classes its transformer or residual stack repeats)."""
    if args.strategy != "fsdp":
        return args.strategy
    if not gpu:
        sys.exit("--strategy fsdp needs a GPU (Lightning's FSDPStrategy does not run on the CPU)")
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(auto_wrap_policy=set(model.fsdp_blocks))


def _on_gpu(args: argparse.Namespace) -> bool:
    """Whether this run trains on the GPU: ``--accelerator``, or the GPU if there is one."""
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        sys.exit("--accelerator gpu: no CUDA device here")
    return args.accelerator == "gpu" or (args.accelerator == "auto" and torch.cuda.is_available())


def main(build: Callable[[argparse.Namespace, bool], tuple], name: str,
         args: argparse.Namespace) -> dict:
    gpu = _on_gpu(args)
    args.steps = args.steps or (20 if gpu else 3)
    L.seed_everything(args.seed, verbose=False)
    model, data, batch = build(args, gpu)
    return run(name, args, model, data, batch)
