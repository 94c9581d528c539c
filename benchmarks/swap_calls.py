"""Host time of the swap ops (``lightning_ac.swapping``), call by call, on a CUDA device.

A step that swaps ``n`` activations makes four calls for each (copy out, release, copy back,
wait); where the host has little lead on the GPU that host time is step time. This times each
call with ``time.perf_counter`` over a forward/backward-like round of ``--tensors`` activations
(copies out in order, one release per activation or one for all, copies back in reverse), and,
for scale, the CUDA runtime pieces they are made of and one small aten op. Medians over
``--rounds`` rounds, in microseconds.

    PYTHONPATH=. python benchmarks/swap_calls.py --out reports/ac/swap_calls.json
    # an earlier version, for comparison:
    git show REV:lightning_ac/swapping.py > /tmp/old_swapping.py
    PYTHONPATH=. python benchmarks/swap_calls.py --module /tmp/old_swapping.py
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lightning_ac import _torch_compat as compat


def load_swapping(path: str | None):
    """``lightning_ac.swapping``, or the module in the file ``path``."""
    if path is None:
        from lightning_ac import swapping

        return swapping
    spec = importlib.util.spec_from_file_location("swapping_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def _us(fn, times: list[float]):
    t0 = time.perf_counter()
    out = fn()
    times.append((time.perf_counter() - t0) * 1e6)
    return out


def time_swap_calls(swapping, n: int, numel: int, rounds: int, grouped: bool) -> dict:
    """Median host µs per call of each swap op over ``rounds`` rounds of ``n`` activations."""
    group = swapping.SlotGroup(n)
    xs = [torch.randn(numel, device="cuda") for _ in range(n)]
    # versions before 2026-11-23 released one tensor per call, swap_release(x, slot), and
    # named the device to copy back to, swap_in(host, slot, device)
    one_each = "xs" not in inspect.signature(swapping.swap_release).parameters
    to = ("cuda",) if "device" in inspect.signature(swapping.swap_in).parameters else ()
    calls: dict[str, list[float]] = {"swap_out": [], "swap_release": [], "swap_in": [],
                                     "swap_wait": []}
    for r in range(rounds + 2):  # two rounds unmeasured: buffers, events and streams made
        t = {k: [] for k in calls}
        hosts = [_us(lambda x=x, s=s: swapping.swap_out(x, s), t["swap_out"])
                 for x, s in zip(xs, group.ids)]
        if grouped and not one_each:
            _us(lambda: swapping.swap_release(tuple(xs), group.ids[-1]), t["swap_release"])
        else:
            for x, s in zip(xs, group.ids):
                arg = x if one_each else (x,)
                _us(lambda arg=arg, s=s: swapping.swap_release(arg, s), t["swap_release"])
        backs = [_us(lambda h=h, s=s: swapping.swap_in(h, s, *to), t["swap_in"])
                 for h, s in reversed(list(zip(hosts, group.ids)))]
        for b, s in zip(backs, reversed(group.ids)):
            _us(lambda b=b, s=s: swapping.swap_wait(b, s), t["swap_wait"])
        del hosts, backs
        torch.cuda.synchronize()
        if r >= 2:
            for k in calls:
                calls[k] += t[k]
    med = {k: round(statistics.median(v), 2) for k, v in calls.items() if v}
    per_round = {k: sum(v) / rounds for k, v in calls.items() if v}
    return {"median_us": med,
            "per_activation_us": round(sum(per_round.values()) / n, 2),
            "releases_per_round": len(calls["swap_release"]) // rounds}


def time_pieces(numel: int, reps: int) -> dict:
    """Median host µs of the CUDA runtime calls the swap ops make, and of a small aten op."""
    dev = torch.device("cuda")
    side = torch.cuda.Stream()
    ev = torch.cuda.Event()
    x = torch.randn(numel, device=dev)
    host = torch.empty_like(x, device="cpu", pin_memory=True)
    small = torch.randn(1024, device=dev)
    compute = torch.cuda.current_stream()

    def stream_ctx():
        with torch.cuda.stream(side):
            pass

    def set_pair():
        torch.cuda.set_stream(side)
        torch.cuda.set_stream(compute)

    pieces = {
        "current_stream": lambda: torch.cuda.current_stream(dev),
        "current_cuda_stream_id": lambda: compat.current_cuda_stream_id(0),
        "event_record": lambda: ev.record(compute),
        "stream_wait_event": lambda: side.wait_event(ev),
        "stream_context_enter_exit": stream_ctx,
        "set_stream_twice": set_pair,
        "copy_d2h_pinned_nonblocking": lambda: host.copy_(x, non_blocking=True),
        "empty_like_device": lambda: torch.empty_like(x),
        "aten_relu_small": lambda: torch.ops.aten.relu.default(small),
    }
    out = {}
    for name, fn in pieces.items():
        times: list[float] = []
        for _ in range(reps):
            _us(fn, times)
        torch.cuda.synchronize()
        out[name] = round(statistics.median(times[reps // 10:]), 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", default=None, help="a swapping.py to time instead of this one")
    ap.add_argument("--tensors", type=int, default=54, help="activations swapped per round")
    ap.add_argument("--mib", type=float, default=4.0, help="size of each (MiB)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("swap_calls.py times CUDA calls: no CUDA device here")
    swapping = load_swapping(args.module)
    numel = int(args.mib * 2**20) // 4
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "module": args.module or "lightning_ac.swapping", "tensors": args.tensors,
        "MiB_each": args.mib, "rounds": args.rounds,
        "release_each": time_swap_calls(swapping, args.tensors, numel, args.rounds, False),
        "release_grouped": time_swap_calls(swapping, args.tensors, numel, args.rounds, True),
        "pieces_median_us": time_pieces(numel, 2000),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
