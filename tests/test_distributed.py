"""MuTwoAC under Lightning's DDP and FSDP2, and torch's FSDP1, on the CPU: two ranks (gloo). Under
DDP each rank plans its step and runs rank 0's plan; under FSDP2 (ModelParallelStrategy,
fully_shard) and FSDP1 each rank plans the graphs between FSDP's gathering hooks; all train
exactly as without AC."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
FSDP_WORKER = Path(__file__).with_name("fsdp_worker.py")
BUCKETS_WORKER = Path(__file__).with_name("ddp_buckets_worker.py")
OVERLAP_WORKER = Path(__file__).with_name("ddp_overlap_worker.py")


def _fit(out: Path, budget: int = 0, worker: Path = WORKER, *flags: str, ranks: int = 2
         ) -> tuple[list[dict], str]:
    out.mkdir(parents=True)
    run = subprocess.run([sys.executable, str(worker), "--budget", str(budget), "--out", str(out),
                          *flags], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in range(ranks)], run.stderr


def _assert_same_parameters(run: Path, ref: Path) -> None:
    """Each rank's parameters (or shards) after the fit within 1e-6 of the reference run's."""
    for rank in (0, 1):
        params = torch.load(run / f"params_{rank}.pt")
        ref_params = torch.load(ref / f"params_{rank}.pt")
        for p, q in zip(params, ref_params):
            assert (p - q).norm() <= 1e-6 * q.norm() + 1e-12


def test_ddp_with_mutwoac_trains_as_ddp_without_it_on_one_shared_plan(tmp_path):
    ref, _ = _fit(tmp_path / "ref")
    # below the per-rank step's 2.08 MiB peak, well above its floor (1.46 to 1.58 MiB, by run)
    ranks, said = _fit(tmp_path / "ac", budget=1_900_000)
    assert [r["state"] for r in ranks] == ["active", "active"]
    assert ranks[0]["recomputed"] > 0
    assert ranks[0]["plan"] == ranks[1]["plan"]  # rank 0's plan, on both
    for r, r_ref in zip(ranks, ref):
        assert r["saved_B"] < r_ref["saved_B"]  # less saved for backward than DDP without AC
        assert r["losses"] == r_ref["losses"]
    _assert_same_parameters(tmp_path / "ac", tmp_path / "ref")
    # the metrics are logged once, as the maximum over ranks, without Lightning's sync warning
    metrics = next((tmp_path / "ac").rglob("metrics.csv")).read_text()
    assert "mutwo/predicted_peak_B" in metrics and "mutwo/replans" in metrics
    assert "sync_dist" not in said and "does not plan" not in said


def test_ddp_on_one_device_plans_and_trains_as_without_a_strategy(tmp_path):
    """``strategy="ddp"`` with ``devices=1`` (a script written for several GPUs, run on one): the
    same one graph is planned as without a strategy, from the same profiled peak within 1%
    (DDP adds nothing the step keeps), and it trains exactly as DDP without AC."""
    flags = ("--devices", "1")
    (plain,), _ = _fit(tmp_path / "plain", 1_900_000, WORKER, *flags, "--no-strategy", ranks=1)
    (ddp,), said = _fit(tmp_path / "ddp", 1_900_000, WORKER, *flags, ranks=1)
    (ref,), _ = _fit(tmp_path / "ref", 0, WORKER, *flags, ranks=1)
    assert plain["strategy"] != ddp["strategy"] == "DDPStrategy"
    for r in (plain, ddp):
        assert r["state"] == "active" and r["graphs"] == 1 and r["recomputed"] > 0
        assert r["predicted_peak_B"] <= 1_900_000
    assert abs(ddp["profiled_peak_B"] - plain["profiled_peak_B"]) <= 0.01 * plain["profiled_peak_B"]
    assert ddp["saved_B"] < ref["saved_B"] and ddp["losses"] == ref["losses"]
    params = torch.load(tmp_path / "ddp" / "params_0.pt")
    for p, q in zip(params, torch.load(tmp_path / "ref" / "params_0.pt")):
        assert (p - q).norm() <= 1e-6 * q.norm() + 1e-12
    assert "sync_dist" not in said and "does not plan" not in said


def test_ddp_with_a_graph_break_trains_as_ddp_without_ac(tmp_path):
    """The step splits in two; each rank captures and plans its graphs (no plan is shared: the
    collectives are DDP's hooks, in the same order on every rank whatever each one recomputes)."""
    ref, _ = _fit(tmp_path / "ref", 0, WORKER, "--graph-break")
    ranks, said = _fit(tmp_path / "ac", 1_900_000, WORKER, "--graph-break")
    for r, r_ref in zip(ranks, ref):
        assert r["state"] == "active" and r["graphs"] == 2 and r["recomputed"] > 0
        assert r["saved_B"] < r_ref["saved_B"]
        assert r["losses"] == r_ref["losses"]
    _assert_same_parameters(tmp_path / "ac", tmp_path / "ref")


def test_ddp_compiled_whole_is_planned_across_its_gradient_buckets(tmp_path):
    """auto_checkpoint on the DDP module itself: dynamo's DDP optimizer cuts the step at bucket
    boundaries (3 buckets), each graph's backward hands its bucket's gradients to DDP as it ends
    (the all-reduce can start under the rest of backward), and the graphs are planned as one
    step; training equals DDP's without AC."""
    ref, _ = _fit(tmp_path / "ref", 0, BUCKETS_WORKER)
    ranks, _ = _fit(tmp_path / "ac", 10_000_000, BUCKETS_WORKER)  # no-AC peak 13.0 MiB
    for r, r_ref in zip(ranks, ref):
        assert r["state"] == "active" and r["graphs"] == 3 and r["recomputed"] > 0
        assert r["losses"] == r_ref["losses"]
    _assert_same_parameters(tmp_path / "ac", tmp_path / "ref")


def test_ddp_with_one_rank_is_captured_as_one_graph_whatever_its_buckets(tmp_path):
    """With one rank there is no all-reduce to overlap with backward: the step DDP would cut at
    its 3 buckets is captured and planned as one graph (as without DDP), and trains the same."""
    (ref,), _ = _fit(tmp_path / "ref", 0, BUCKETS_WORKER, "--ranks", "1", ranks=1)
    (run,), _ = _fit(tmp_path / "ac", 10_000_000, BUCKETS_WORKER, "--ranks", "1", ranks=1)
    assert run["state"] == "active" and run["graphs"] == 1 and run["recomputed"] > 0
    assert run["losses"] == ref["losses"]
    for p, q in zip(torch.load(tmp_path / "ac" / "params_0.pt"),
                    torch.load(tmp_path / "ref" / "params_0.pt")):
        assert (p - q).norm() <= 1e-6 * q.norm() + 1e-12


def test_lightning_ddp_hands_buckets_to_the_all_reduce_during_backward(tmp_path):
    """Under Lightning's DDP the LightningModule's forward runs inside DDP's, so dynamo's DDP
    optimizer cuts it at bucket boundaries (3 buckets of 1 MB) and MuTwoAC plans the graphs as
    one step. In a planned step, as without AC, DDP is handed its first buckets before the first
    block's gradients exist: the all-reduce can run under the rest of backward, not after it."""
    ref, _ = _fit(tmp_path / "ref", 0, OVERLAP_WORKER)
    ranks, _ = _fit(tmp_path / "ac", 10_000_000, OVERLAP_WORKER)  # no-AC peak 13.0 MiB
    for r, r_ref in zip(ranks, ref):
        assert r["state"] == "active" and r["graphs"] == 3 and r["recomputed"] > 0
        assert r["losses"] == r_ref["losses"]
        for events in (r["events"], r_ref["events"]):
            # (DDP rebuilds its buckets after the first step in the order gradients came: the
            # buckets differ between the two runs, 3 or 4)
            first_grad = events.index(["first block grad"])
            before = [e[1] for e in events[:first_grad] if e[0] == "bucket"]
            after = [e[1] for e in events[first_grad:] if e[0] == "bucket"]
            assert len(before) >= 2 and 0 in before and after, events


def test_fsdp2_with_mutwoac_trains_as_fsdp2_without_it(tmp_path):
    ref, _ = _fit(tmp_path / "ref", worker=FSDP_WORKER)
    # each rank's step peaks at about 4.1 MiB un-checkpointed; its floor is 2.5 to 2.6 MiB
    ranks, said = _fit(tmp_path / "ac", budget=3_000_000, worker=FSDP_WORKER)
    for r, r_ref in zip(ranks, ref):
        assert r["state"] == "active" and r["recomputed"] > 0
        assert r["graphs"] == 4  # one per sharded block: FSDP's hooks run eagerly between them
        assert r["resharded"] > 0  # gathered parameters FSDP2 frees after forward
        assert r["predicted_peak_B"] <= 3_000_000
        assert r["saved_B"] < r_ref["saved_B"]
        assert r["losses"] == r_ref["losses"]
    _assert_same_parameters(tmp_path / "ac", tmp_path / "ref")  # each rank's shards
    assert "does not plan" not in said


def test_a_plan_moves_between_ranks_only_onto_the_same_graph():
    import pytest

    from benchmarks.zoo import make_workload
    from lightning_ac.capture import capture_joint
    from lightning_ac.errors import CaptureError
    from lightning_ac.planner import plan
    from lightning_ac.profiler import profile_joint
    from lightning_ac.rewriter import decode_plan, encode_plan

    w = make_workload("cnn", 4)
    here, there = (capture_joint(w.loss, w.inputs, w.model) for _ in range(2))
    prof = profile_joint(here, None)
    p = plan(prof, (plan(prof, 1).predicted_peak_B + prof.peak_bytes) // 2)
    message = json.loads(json.dumps(encode_plan(p, here.graph), default=str))  # plain data
    q = decode_plan(message, there.graph)
    assert [n.name for n in q.recomputed] == [n.name for n in p.recomputed] and q.recomputed
    assert q.predicted_peak_B == p.predicted_peak_B and q.stop_reason == p.stop_reason
    other = make_workload("cnn", 8)
    with pytest.raises(CaptureError, match="another graph"):
        decode_plan(message, capture_joint(other.loss, other.inputs, other.model).graph)


FSDP1_WORKER = Path(__file__).with_name("fsdp1_worker.py")


def test_fsdp1_with_mutwoac_trains_as_fsdp1_without_it(tmp_path):
    """FSDP1 (flat parameters, FULL_SHARD, ``use_orig_params=True``, as Lightning's FSDPStrategy
    wraps a model), 2 ranks: each rank plans the graphs between FSDP's gathering hooks as one
    step, keeps its budget in the plan, counts its own shard of the parameters (once: the
    original parameters are views of one flat parameter), saves less for backward, and trains
    exactly as FSDP1 without AC."""
    ref, _ = _fit(tmp_path / "ref", worker=FSDP1_WORKER)
    # each rank's step peaks at about 4 MiB un-checkpointed
    ranks, _ = _fit(tmp_path / "ac", 3_000_000, FSDP1_WORKER)
    for r, r_ref in zip(ranks, ref):
        assert r["graphs"] == 4 and r["recomputed"] > 0  # one graph per FSDP unit (block)
        # each block's 4 gathered parameters, freed after forward and gathered again for its
        # backward (seen in the capture call), are not counted in between
        assert r["resharded"] == 16
        assert r["reshard_gaps"] == 4  # one gathered flat parameter per block, two lifetimes
        assert r["predicted_peak_B"] <= 3_000_000
        assert r["persistent_B"]["parameter"] == r["shard_B"]  # this rank's shard, once
        assert r["saved_B"] < r_ref["saved_B"]
        assert r["losses"] == r_ref["losses"]
    _assert_same_parameters(tmp_path / "ac", tmp_path / "ref")


def test_fsdp1_on_one_rank_plans_as_without_it(tmp_path):
    """FSDP1 with one rank keeps every parameter whole (NO_SHARD) and hands its graphs views
    of the flat parameters: those are parameter memory, so the step is profiled and planned as
    the same model without FSDP (the un-checkpointed peak within 1%, parameters counted once;
    which values each recomputes depends on its own timings), and trains the same."""
    (fsdp,), _ = _fit(tmp_path / "fsdp", 4_300_000, FSDP1_WORKER, "--ranks", "1", ranks=1)
    (plain,), _ = _fit(tmp_path / "plain", 4_300_000, FSDP1_WORKER, "--ranks", "1",
                       "--no-fsdp", ranks=1)
    assert fsdp["graphs"] == 4 and plain["graphs"] == 1 and fsdp["resharded"] == 0
    assert abs(fsdp["baseline_peak_B"] - plain["baseline_peak_B"]) <= 0.01 * plain["baseline_peak_B"]
    for run in (fsdp, plain):
        assert run["recomputed"] > 0 and run["predicted_peak_B"] <= 4_300_000
    assert fsdp["persistent_B"]["parameter"] == plain["persistent_B"]["parameter"]
    assert fsdp["losses"] == pytest.approx(plain["losses"], rel=1e-6)
