"""Where does the rewritten step (nothing recomputed) differ from eager? Kernels and saved bytes.

For each model: a torch.profiler trace of ``--steps`` steady-state training steps, eager and
rewritten, summed per kernel name (GPU time per step), with the GPU's busy time against the
step's wall time (the rest is the GPU waiting for the host); and the tensors each saves for
backward, grouped by shape and dtype.

    PYTHONPATH=. python benchmarks/parity.py --model resnet152 --batch-size 128 --out $OUT
"""

from __future__ import annotations

import collections
import json

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import NO_LIMIT, load_workload, planned_step, workload_parser
from lightning_ac.measure import train_step


def saved_by_shape(fn, inputs, params) -> collections.Counter:
    """Bytes saved for backward per (shape, dtype), storages counted once, parameters left out."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, tuple] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = (st.nbytes(), f"{tuple(t.shape)} {str(t.dtype)[6:]}")
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(*inputs)
    del loss
    out: collections.Counter = collections.Counter()
    for nbytes, key in seen.values():
        out[key] += nbytes
    return out


def kernel_table(fn, inputs, opt, steps: int, warmup: int = 3) -> tuple[dict, float, float]:
    """GPU ms per step by kernel name, GPU busy ms per step, wall ms per step."""

    def step():
        train_step(fn, inputs, opt)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
    wall = start.elapsed_time(end) / steps
    per_kernel: collections.Counter = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[ev.name[:90]] += ev.device_time / 1e3 / steps
    return dict(per_kernel), sum(per_kernel.values()), wall


def run(args) -> dict:
    result = {}
    for label in ("eager", "rewritten"):
        torch.compiler.reset()
        torch.cuda.empty_cache()
        w = load_workload(args.model, args.batch_size, device=args.device, seq_len=args.seq_len)
        opt = torch.optim.Adam(w.model.parameters(), lr=1e-4)
        fn = w.loss
        if label == "rewritten":
            # profiled without the optimizer, as before: only the rewritten step is wanted
            fn = planned_step(w, None, NO_LIMIT)
            fn(*w.inputs).backward()  # capture, profile, compile
        kernels, busy, wall = kernel_table(fn, w.inputs, opt, args.steps, max(1, args.warmup))
        saved = saved_by_shape(fn, w.inputs, list(w.model.parameters()))
        result[label] = {"wall_ms": wall, "gpu_busy_ms": busy, "kernels": kernels,
                         "n_kernels": len(kernels), "saved": dict(saved),
                         "saved_GiB": sum(saved.values()) / 2**30}
        del w, opt, fn
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = workload_parser(__doc__, "resnet152", 128, out="reports/parity", device="cuda")
    args = ap.parse_args(argv)
    if not args.device.startswith("cuda"):
        ap.error("parity traces CUDA kernels: it needs --device cuda")
    r = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.model}_parity.json").write_text(json.dumps(r, indent=1))
    e, w = r["eager"], r["rewritten"]
    print(f"{args.model}: wall eager {e['wall_ms']:.1f} rewritten {w['wall_ms']:.1f} ms; "
          f"GPU busy eager {e['gpu_busy_ms']:.1f} rewritten {w['gpu_busy_ms']:.1f} ms; "
          f"saved eager {e['saved_GiB']:.3f} rewritten {w['saved_GiB']:.3f} GiB")
    names = set(e["kernels"]) | set(w["kernels"])
    diff = sorted(names, key=lambda k: -abs(w["kernels"].get(k, 0) - e["kernels"].get(k, 0)))
    print("kernel (ms/step): eager rewritten")
    for k in diff[:25]:
        print(f"  {e['kernels'].get(k, 0):8.2f} {w['kernels'].get(k, 0):8.2f}  {k}")
    keys = set(e["saved"]) | set(w["saved"])
    sdiff = sorted(keys, key=lambda k: -abs(w["saved"].get(k, 0) - e["saved"].get(k, 0)))
    print("saved (MiB): eager rewritten")
    for k in sdiff[:12]:
        print(f"  {e['saved'].get(k, 0) / 2**20:9.1f} {w['saved'].get(k, 0) / 2**20:9.1f}  {k}")
    return r


if __name__ == "__main__":
    main()
