"""Plain PyTorch DDP compiled whole (``auto_checkpoint(DDP(model))``) on the CPU, 2 ranks (gloo),
run by tests/test_distributed.py as a script. Dynamo's DDP optimizer splits the step at gradient
bucket boundaries, so each graph's backward hands its bucket's gradients to DDP as it ends
(``--ranks 1``: one rank, nothing to overlap). Writes what each rank saw to --out."""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ac import auto_checkpoint  # noqa: E402
from tests.test_step_graphs import Block  # noqa: E402


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(128) for _ in range(6)])
        self.head = nn.Linear(128, 10)

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.head(self.blocks(x).mean(1)), y)


def run(rank: int, budget: int, out: Path, port: int, ranks: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Model(), bucket_cap_mb=1)  # 3 buckets
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(1 + rank)
    x, y = torch.randn(8, 32, 128), torch.randint(0, 10, (8,))
    ac = auto_checkpoint(model, opt, budget=budget) if budget else None
    losses = []
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seen = {"losses": losses}
    if ac is not None:
        graphs = ac.last.graphs
        seen.update(state=str(ac.state), graphs=len(graphs.captured) if graphs else 1,
                    recomputed=len(ac.plan.recomputed))
    torch.save([p.detach() for p in model.parameters()], out / f"params_{rank}.pt")
    (out / f"rank_{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=0, help="0: no AC")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--port", type=int, default=29561)
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    mp.spawn(run, args=(args.budget, args.out, args.port, args.ranks), nprocs=args.ranks)
