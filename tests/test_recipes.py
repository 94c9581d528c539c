"""The recipes run end to end on the CPU (tiny sizes), with and without MuTwoAC."""

import pytest

from recipes import bert, resnet152
from recipes.common import main, parser


def _args(module, *argv):
    p = parser("test", 1, 1)
    if module is bert:
        p.add_argument("--seq-len", type=int, default=None)
        p.add_argument("--tiny", action="store_true")
    else:
        p.add_argument("--arch", default="resnet18")
        p.add_argument("--image-size", type=int, default=32)
    return p.parse_args(["--accelerator", "cpu", *argv])  # tiny sizes, also on a GPU machine


def test_bert_recipe_with_and_without_ac(tmp_path, capsys):
    off = main(bert.build, "bert", _args(bert, "--no-ac", "--steps", "3", "--log-dir", str(tmp_path)))
    assert off["state"] == "no-ac" and off["step_ms"] > 0
    on = main(bert.build, "bert", _args(bert, "--budget", "4.5MB", "--steps", "3",
                                         "--log-dir", str(tmp_path)))
    assert on["state"] == "active" and on["step_ms"] > 0
    out = capsys.readouterr().out
    assert "AC off (--no-ac)" in out and "activations recomputed" in out
    assert "samples/s" in out


def test_resnet_recipe_turns_ac_off_when_it_fits(tmp_path, capsys):
    result = main(resnet152.build, "resnet", _args(resnet152, "--steps", "2",
                                                    "--log-dir", str(tmp_path)))
    assert result["state"] == "off"
    assert "AC off (the step fits)" in capsys.readouterr().out


def test_device_memory_needs_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main(bert.build, "bert", _args(bert, "--device-memory", "16GB", "--log-dir", str(tmp_path)))


def test_sweep_writes_csv_and_charts(tmp_path):
    from recipes import sweep

    df = sweep.main(["--model", "bert", "--batch-sizes", "2", "--steps", "3",
                     "--out", str(tmp_path)])
    assert list(df["status"]) == ["ok", "ok"] and list(df["ac"]) == [False, True]
    assert (df["step_ms"] > 0).all()
    csv = (tmp_path / "bert_sweep.csv").read_text().splitlines()
    assert csv[0].startswith("batch_size,ac,") and len(csv) == 3
    assert (tmp_path / "bert_peak_memory.png").stat().st_size > 0
    assert (tmp_path / "bert_step_time.png").stat().st_size > 0


def test_a_point_that_fails_says_why_in_the_csv(monkeypatch):
    """A point that runs out of memory keeps the allocator's message (how much it asked for), one
    that MuTwoAC refuses its BudgetError (which quotes the allocator), and one that fails
    otherwise its last line: the sweep records why, not only that."""
    import subprocess

    from recipes import sweep

    said = {"oom": "Epoch 0: 0%|\n    budget_error = unwrap_compile_error(exc, (BudgetError,))\n"
                   "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
                   "1.50 GiB. GPU 0 has a total capacity of 79.18 GiB\n",
            "error": "Traceback (most recent call last):\nValueError: bad batch\n",
            "refused": "    raise BudgetError(\n"  # the traceback's source line comes first
                       "lightning_ac.callback.BudgetError: MuTwoAC cannot run this step on the "
                       "device even with every activation swapped to host memory\nCUDA out of "
                       "memory. Tried to allocate 3.00 GiB.\n"}
    for kind, status, expect in (("oom", "OOM", "Tried to allocate 1.50 GiB"),
                                 ("error", "error", "ValueError: bad batch"),
                                 ("refused", "error", "BudgetError: MuTwoAC cannot run")):
        monkeypatch.setattr(subprocess, "run", lambda cmd, kind=kind, **kw: subprocess.
                            CompletedProcess(cmd, 1, stdout="training\n", stderr=said[kind]))
        row = sweep.run_point("bert", 128, True, [], timeout=5)
        assert row["status"] == status and expect in row["error"], row
        assert "raise" not in row["error"]
        assert "error" in sweep.table([row]).columns


def test_sweep_point_that_times_out_says_how_far_it_got(monkeypatch):
    import subprocess

    from recipes import sweep

    def slow(cmd, timeout, **kw):  # what run() raises: the output read so far, as bytes
        raise subprocess.TimeoutExpired(cmd, timeout, output=b"[MuTwoAC] profiling with swap\n",
                                        stderr=None)

    monkeypatch.setattr(subprocess, "run", slow)
    row = sweep.run_point("resnet152", 256, True, [], timeout=7)
    assert row["status"] == "timeout" and row["wall_s"] == 7
    assert row["error"] == "no result after 7 s; last output: [MuTwoAC] profiling with swap"


def test_sweep_summary_reads_the_targets_off_the_points():
    import pandas as pd

    from recipes.sweep import summarize

    gib = 2**30
    rows = [  # batch, ac, status, step_ms, peak, budget
        (16, False, "ok", 60.0, 4 * gib, None), (16, True, "ok", 60.0, 4 * gib, 14 * gib),
        (32, False, "ok", 100.0, 8 * gib, None), (32, True, "ok", 105.0, 7 * gib, 14 * gib),
        (64, False, "OOM", None, None, None), (64, True, "ok", 215.0, 15 * gib, 14 * gib),
        (128, False, "OOM", None, None, None), (128, True, "OOM", None, None, None)]
    df = pd.DataFrame(rows, columns=["batch_size", "ac", "status", "step_ms", "peak_B",
                                     "budget_B"])
    df["samples_per_s"] = df["batch_size"] / df["step_ms"] * 1e3
    s = summarize(df)
    assert s["largest_batch_no_ac"] == 32 and s["largest_batch_ac"] == 64
    assert s["batch_ratio"] == 2
    assert abs(s["overhead_at_largest_no_ac_pct"] - 5.0) < 1e-9
    assert abs(s["throughput_ratio"] - (64 / 0.215) / 320) < 1e-9
    assert s["over_budget_batches"] == [64]


def test_sweep_merges_csvs_and_draws_a_sweep_where_nothing_trained(tmp_path):
    """A sweep can be finished in a second run (--from-csv merges them, the later point wins),
    and a run in which every point ran out of memory still gets its charts and summary."""
    import pandas as pd

    from recipes import sweep

    gib = 2**30
    first = pd.DataFrame({"batch_size": [8, 8, 16, 16], "ac": [False, True, False, True],
                          "peak_B": [5 * gib, 5 * gib, None, None],
                          "step_ms": [80.0, 80.0, None, None],
                          "samples_per_s": [100.0, 100.0, None, None],
                          "budget_B": [None, 14 * gib, None, None],
                          "status": ["ok", "ok", "OOM", "timeout"]})
    second = pd.DataFrame({"batch_size": [16, 16], "ac": [False, True],
                           "status": ["OOM", "OOM"]})  # no measured column at all
    first.to_csv(tmp_path / "a.csv", index=False)
    second.to_csv(tmp_path / "b.csv", index=False)
    assert sweep.charts(sweep.table(second), "bert", tmp_path / "") and \
        (tmp_path / "bert_peak_memory.png").exists()
    out = tmp_path / "merged"
    df = sweep.main(["--model", "bert", "--from-csv", str(tmp_path / "a.csv"),
                     str(tmp_path / "b.csv"), "--out", str(out)])
    assert list(zip(df["batch_size"], df["ac"], df["status"])) == [
        (8, False, "ok"), (8, True, "ok"), (16, False, "OOM"), (16, True, "OOM")]
    assert pd.read_csv(out / "bert_sweep.csv")["status"].tolist() == ["ok", "ok", "OOM", "OOM"]
    summary = (out / "bert_sweep_summary.json").read_text()
    assert '"largest_batch_ac": 8' in summary


def test_recipe_under_ddp_on_one_device_plans_as_without_a_strategy(tmp_path):
    """``--strategy ddp`` on one device (a script written for several GPUs): MuTwoAC is active
    under Lightning's DDPStrategy, the plan starts from the same un-checkpointed peak (within
    1%: DDP adds nothing the step keeps), and the budget holds in the plan."""
    import torch.distributed as dist

    runs = {}
    try:
        for strategy in ("auto", "ddp"):
            runs[strategy] = main(bert.build, "bert", _args(
                bert, "--budget", "4.5MB", "--steps", "3", "--strategy", strategy,
                "--log-dir", str(tmp_path / strategy), "--result-json",
                str(tmp_path / f"{strategy}.json")))
    finally:  # Lightning's DDP leaves its process group to the process: not to later tests
        if dist.is_initialized():
            dist.destroy_process_group()
    plain, ddp = runs["auto"], runs["ddp"]
    assert ddp["strategy"] == "DDPStrategy" != plain["strategy"]
    for r in (plain, ddp):
        assert r["state"] == "active" and r["recomputed"] > 0
        assert r["predicted_peak_B"] <= r["budget_B"]
    assert abs(ddp["baseline_peak_B"] - plain["baseline_peak_B"]) <= 0.01 * plain["baseline_peak_B"]


def test_fsdp_recipe_needs_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(SystemExit, match="needs a GPU"):
        main(bert.build, "bert", _args(bert, "--strategy", "fsdp", "--log-dir", str(tmp_path)))
