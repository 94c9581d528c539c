"""What the benchmark scripts share: their flags and defaults, the workload a ``--model`` names, and
its step planned at a chosen budget through the public API (:func:`lightning_ac.auto_checkpoint`)."""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.zoo import WORKLOADS, Workload, make_workload
from lightning_ac import AutoCheckpoint, auto_checkpoint
from lightning_ac.planner import plan

PRECISIONS = ("32-true", "bf16-mixed")
"""Lightning's names for the precisions the benchmarks run."""

SWAP_MODES = {"on": [True], "off": [False], "both": [True, False]}
"""A benchmark's ``--swap`` choice → the planner's ``swap`` settings to run, in order."""

STEPS = 10
"""Measured steps per configuration, for every benchmark unless its command says otherwise."""
WARMUP = 2
"""Unmeasured steps before them (the first one captures, profiles and plans)."""
NO_LIMIT = 2**62
"""A budget no step reaches: plan nothing, but run the rewritten step (``always_rewrite``)."""


def workload_parser(doc: str | None, model: str, batch_size: int, *, out: str | None = None,
                    device: str | None = None,
                    formatter=argparse.RawDescriptionHelpFormatter) -> argparse.ArgumentParser:
    """A benchmark's argument parser with the flags they all share, at this benchmark's default
    model, batch size and output folder:

    ``--model`` (a reference workload, :data:`benchmarks.zoo.WORKLOADS`, or
    ``my_pkg.module:make_workload``: see :func:`load_workload`), ``--batch-size``,
    ``--seq-len`` (BERT), ``--steps`` (:data:`STEPS`), ``--warmup`` (:data:`WARMUP`),
    ``--device`` (default: cuda if there is one), ``--precision``, ``--out``.
    """
    ap = argparse.ArgumentParser(description=doc, formatter_class=formatter)
    ap.add_argument("--model", default=model,
                    help=f"one of {', '.join(WORKLOADS)}, or pkg.module:function returning a "
                         f"benchmarks.zoo.Workload (default: {model})")
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sample (BERT)")
    ap.add_argument("--steps", type=int, default=STEPS, help="measured steps per configuration")
    ap.add_argument("--warmup", type=int, default=WARMUP, help="unmeasured steps before them")
    ap.add_argument("--device", default=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ap.add_argument("--precision", default="32-true", choices=PRECISIONS)
    ap.add_argument("--out", type=Path, default=Path(out) if out else None)
    return ap


def load_workload(spec: str, batch_size: int, device="cpu", seq_len: int = 512,
                  seed: int = 0) -> Workload:
    """The workload a ``--model`` value names: a reference workload
    (:func:`benchmarks.zoo.make_workload`), or ``pkg.module:function``, a function called as
    ``function(batch_size=..., device=...)`` (and ``seq_len=``, ``seed=`` if it takes them)
    that returns a :class:`benchmarks.zoo.Workload` on that device."""
    if ":" not in spec:
        return make_workload(spec, batch_size, device=device, seq_len=seq_len, seed=seed)
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"--model {spec}: cannot load {attr!r} from {module_name!r}: {exc}") \
            from exc
    params = inspect.signature(factory).parameters
    extra = {k: v for k, v in (("seq_len", seq_len), ("seed", seed)) if k in params}
    w = factory(batch_size=batch_size, device=torch.device(device), **extra)
    if not isinstance(w, Workload):
        raise SystemExit(f"--model {spec}: {attr}() returned {type(w).__name__}, expected a "
                         "benchmarks.zoo.Workload(name, model, inputs, loss)")
    return w


def planned_step(workload: Workload, optimizer: torch.optim.Optimizer | None,
                 budget: str | int | None = None, share: float = 0.5, swap: bool = True,
                 **options) -> AutoCheckpoint:
    """``workload.loss`` planned by :func:`lightning_ac.auto_checkpoint`: its first call captures,
    profiles and plans the step, and every call runs the rewritten step (also when nothing needs
    recomputing, so that the rewritten step itself is measured).

    The budget is ``budget`` or, when that is None, ``share`` of the way from the plan's floor
    (everything recomputable dropped) to the un-checkpointed peak, so that something is always
    recomputed; ``swap=False`` plans recomputation only. Below the floor the lowest-peak plan
    runs (with a warning). ``options`` go to ``auto_checkpoint``.
    The benchmarks' loop zeroes gradients to None before forward (:func:`train_step`), which the
    plan is told. Read the plan and profile off the returned object after the first call.
    """
    if budget is None:
        def budget(profile):
            floor = plan(profile, 1).predicted_peak_B
            return int(floor + share * (profile.peak_bytes - floor))
    options = {"previous_grads": "freed", "always_rewrite": True, "on_infeasible": "warn",
               **options}
    return auto_checkpoint(workload.loss, optimizer, module=workload.model, budget=budget,
                           swap=swap, **options)


def with_precision(fn: Callable, device: torch.device, precision: str) -> Callable:
    """``fn`` run under ``precision`` (one of :data:`PRECISIONS`): bf16 autocast for
    ``bf16-mixed``, as Lightning's ``precision="bf16-mixed"`` does."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "32-true":
        return fn

    def step(*inputs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(*inputs)

    return step


@contextmanager
def gc_pauses() -> Iterator[dict]:
    """Count Python's garbage collections inside the block and time them, by generation:
    ``{"collections": [gen0, gen1, gen2], "ms": [...]}`` (filled when the block ends). A
    collection holds the host up; on a step whose host side has little lead, the GPU waits."""
    stats = {"collections": [0, 0, 0], "ms": [0.0, 0.0, 0.0]}
    started: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            gen = info["generation"]
            stats["collections"][gen] += 1
            stats["ms"][gen] += (time.perf_counter() - started.pop()) * 1e3

    gc.callbacks.append(callback)
    try:
        yield stats
    finally:
        gc.callbacks.remove(callback)
        stats["ms"] = [round(x, 2) for x in stats["ms"]]
