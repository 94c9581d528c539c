"""FSDP1 (``FullyShardedDataParallel``, FULL_SHARD, ``use_orig_params=True``, one unit per block)
on the CPU, 2 ranks (gloo; ``--ranks 1``: one, where FSDP1 keeps the parameters whole), run by
tests/test_distributed.py as a script: the step planned with ``auto_checkpoint`` on the wrapped
module (``--no-fsdp``: on the model itself). Lightning's ``FSDPStrategy`` refuses the CPU, so
this drives torch's FSDP1 directly, as that strategy wraps the model. Writes what each rank saw
to --out (``rank_<r>.json``, ``params_<r>.pt``: its shards)."""

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ac import auto_checkpoint  # noqa: E402
from lightning_ac.measure import saved_tensor_bytes  # noqa: E402
from tests.test_step_graphs import Block  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block(64) for _ in range(4))
        self.head = nn.Linear(64, 10)

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
        return nn.functional.cross_entropy(self.head(x.mean(1)), y)


def _reshard_gaps(profile) -> int:
    """Storages of resharded parameters the profile holds as two lifetimes with a gap between
    (forward's end to their graph's backward)."""
    resharded = {p for j in profile.graphs for p in j.resharded}
    st = profile.storages[profile.storages.creator.isin(resharded)]
    return sum(1 for _, rows in st.groupby(st.creator.map(id))
               if len(rows) == 2 and rows.stop.min() < rows.start.max())


def rank_main(rank: int, port: int, budget: int, out: Path, ranks: int, fsdp: bool) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    torch.manual_seed(0)
    model = Net()
    if fsdp:
        model = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True,
                     device_id=torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = auto_checkpoint(model, optimizer, budget=budget, verbose=False) if budget else model
    torch.manual_seed(1 + rank)  # each rank its own data
    x, y = torch.randn(8, 32, 64), torch.randint(0, 10, (8,))
    losses, saved_B = [], 0
    for i in range(3):
        optimizer.zero_grad(set_to_none=True)
        if i == 2:  # (a planned step: what autograd saves for backward)
            loss, saved_B = saved_tensor_bytes(step, (x, y), exclude=[])
        else:
            loss = step(x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seen = {"rank": rank, "losses": losses, "saved_B": saved_B,
            "shard_B": sum(p.numel() * p.element_size() for p in model.parameters())}
    if budget:
        graphs = step.last.graphs
        seen.update(graphs=len(graphs.captured) if graphs is not None else 1,
                    resharded=sum(len(g.joint.resharded) for g in graphs.captured)
                    if graphs is not None else 0,
                    reshard_gaps=_reshard_gaps(step.profile),
                    recomputed=len(step.plan.recomputed),
                    predicted_peak_B=step.plan.predicted_peak_B,
                    baseline_peak_B=step.plan.baseline_peak_B,
                    persistent_B=step.profile.summary["persistent_B"])
    torch.save([p.detach().clone() for p in model.parameters()], out / f"params_{rank}.pt")
    (out / f"rank_{rank}.json").write_text(json.dumps(seen, default=str))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=0, help="0: no AC")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--no-fsdp", action="store_true")
    args = ap.parse_args()
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(port, args.budget, args.out, args.ranks, not args.no_fsdp),
             nprocs=args.ranks)


if __name__ == "__main__":
    main()
