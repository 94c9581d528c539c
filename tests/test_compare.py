"""benchmarks/compare.py on the CPU: the options build, train and land in the CSV and the plot."""

import pandas as pd
import pytest
import torch
from torchvision.models import resnet18

from benchmarks import compare


def test_checkpoint_every_nth_block_keeps_the_gradients():
    torch.manual_seed(0)
    ref = resnet18(num_classes=10)
    model = resnet18(num_classes=10)
    model.load_state_dict(ref.state_dict())
    assert compare.checkpoint_every(model, 2) == 4  # 8 basic blocks
    x = torch.randn(2, 3, 32, 32)
    for m in (ref, model):
        m.eval()  # BatchNorm statistics would differ between a run and its recomputation
        m(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_blocks_rejects_a_model_without_blocks():
    with pytest.raises(ValueError, match="no ResNet blocks or BERT layers"):
        compare.blocks(torch.nn.Linear(2, 2))


def test_matching_budgets_merge_close_peaks_and_skip_eager():
    rows = [{"option": "eager", "status": "ok", "peak_GiB": 10.0},
            {"option": "checkpoint", "status": "ok", "peak_GiB": 4.0},
            {"option": "compile", "status": "ok", "peak_GiB": 4.05},
            {"option": "compile", "status": "ok", "peak_GiB": 9.9},  # within 3% of eager
            {"option": "compile", "status": "OOM"},
            {"option": "aot_eager", "status": "ok", "peak_GiB": 6.0}]
    assert compare.matching_budgets(rows, 10.0) == [4.0, 6.0]


def test_spread_keeps_the_ends_and_at_most_k():
    vals = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert compare.spread(vals, 3) == [1.0, 3.0, 5.0]
    assert compare.spread(vals, 9) == vals
    assert compare.spread(vals, 1) == [1.0] and compare.spread(vals, 0) == []


def test_mutwoac_runs_at_new_peaks_only_after_the_compiled_options(tmp_path, monkeypatch):
    """Cheap options, MuTwoAC at their peaks, compiled options, MuTwoAC at the new peaks."""
    peaks = {"eager": 10.0, "checkpoint": 4.0, "compile": 6.0, "aot_eager": 4.1}
    order = []

    def fake_run(opt, args, device):
        order.append((opt.family, opt.budget_B and round(opt.budget_B / compare.GIB, 2)))
        return {"option": opt.family, "setting": opt.setting, "status": "ok", "step_ms": 1.0,
                "peak_GiB": peaks.get(opt.family, 5.0), "model": "m", "precision": "32-true"}

    monkeypatch.setattr(compare, "run_option", fake_run)
    monkeypatch.setattr(compare, "pareto_plot", lambda out: out / "p.png")
    compare.main(["--model", "resnet152", "--options", "eager", "checkpoint", "compile",
                  "aot_eager", "mutwoac", "--out", str(tmp_path), "--device", "cpu"])
    families = [f for f, _ in order]
    assert families == (["eager"] + ["checkpoint"] * 3 + ["mutwoac"] * 2
                        + ["compile"] * 4 + ["aot_eager"] * 4 + ["mutwoac"])
    assert order[4:6] == [("mutwoac", None), ("mutwoac", 4.0)]
    assert order[-1] == ("mutwoac", 6.0)  # 4.1 is within 3% of 4.0: not run again


def test_every_option_trains_and_lands_in_the_csv(tmp_path):
    args = ["--model", "tiny-bert", "--batch-size", "2", "--seq-len", "16", "--device", "cpu",
            "--steps", "1", "--options", "eager", "checkpoint", "hf-gc", "aot_eager", "mutwoac",
            "--out", str(tmp_path)]
    rows = compare.main(args)
    df = pd.read_csv(tmp_path / "compare_tiny-bert.csv")
    assert len(df) == len(rows) == 1 + 3 + 1 + 4 + 1
    assert (df.status == "ok").all(), df[df.status != "ok"].to_dict("records")
    assert set(df.option) == {"eager", "checkpoint", "hf-gc", "aot_eager", "mutwoac"}
    assert {"peak_GiB", "step_ms", "overhead_vs_eager", "first_step_s"} <= set(df.columns)
    compare.main(args[:-5] + ["--options", "eager", "--out", str(tmp_path)])
    again = pd.read_csv(tmp_path / "compare_tiny-bert.csv")  # this precision's rows replaced
    assert len(again) == 1


def test_pareto_plot_draws_every_model_and_precision(tmp_path):
    for model in ("a", "b"):
        rows = [dict(model=model, batch=8, precision=p, option=o, setting=s, status="ok",
                     peak_GiB=g, step_ms=t)
                for p in ("32-true", "bf16-mixed")
                for o, s, g, t in (("eager", "", 10.0, 100.0), ("checkpoint", "every block", 4.0, 130.0),
                                   ("mutwoac", "budget 4", 4.0, 120.0),
                                   ("mutwoac", "budget 6", 6.0, 110.0))]
        compare.write_rows(rows, tmp_path, model, "32-true")
    path = compare.pareto_plot(tmp_path)
    assert path.exists() and path.stat().st_size > 10_000


def test_with_precision_runs_bf16_mixed_under_autocast_and_rejects_unknown_names():
    from benchmarks.common import with_precision

    def fn(x):
        return torch.mm(x, x)

    x = torch.randn(4, 4)
    cpu = torch.device("cpu")
    assert with_precision(fn, cpu, "32-true") is fn
    assert with_precision(fn, cpu, "bf16-mixed")(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="16-mixed"):
        with_precision(fn, cpu, "16-mixed")


def test_gc_pauses_counts_the_collections_inside_the_block():
    import gc

    from benchmarks.common import gc_pauses

    with gc_pauses() as stats:
        gc.collect()
    assert stats["collections"][2] == 1 and stats["ms"][2] >= 0
    with gc_pauses() as stats:
        pass
    assert stats["collections"] == [0, 0, 0]


def test_merge_replaces_only_the_options_run_now_and_marks_them(tmp_path, monkeypatch):
    """A compiled family run on its own (``--merge``, some ``--compile-budgets``) adds its rows
    and this run's eager to the table and keeps the rest."""
    peaks = {"eager": 10.0, "checkpoint": 4.0, "compile": 6.0}

    def fake_run(opt, args, device):
        return {"option": opt.family, "setting": opt.setting, "status": "ok", "step_ms": 2.0,
                "peak_GiB": peaks.get(opt.family, 5.0), "model": "resnet152",
                "precision": args.precision}

    monkeypatch.setattr(compare, "run_option", fake_run)
    monkeypatch.setattr(compare, "pareto_plot", lambda out: out / "p.png")
    base = ["--model", "resnet152", "--out", str(tmp_path), "--device", "cpu"]
    compare.main(base + ["--options", "eager", "checkpoint"])
    compare.main(base + ["--options", "eager", "checkpoint", "--precision", "bf16-mixed"])
    compare.main(base + ["--options", "eager", "compile", "--compile-budgets", "0.1", "0.5",
                         "--merge"])
    df = pd.read_csv(tmp_path / "compare_resnet152.csv").fillna("")
    fp32 = df[df.precision == "32-true"]
    assert sorted(zip(fp32.option, fp32.setting)) == sorted(
        [("eager", ""), ("checkpoint", "every block"), ("checkpoint", "every 2"),
         ("checkpoint", "every 3"), ("compile", "budget 0.1"), ("compile", "budget 0.5")])
    merged = fp32[fp32.process != ""]
    assert set(merged.option) == {"eager", "compile"} and len(merged) == 3
    assert len(df[df.precision == "bf16-mixed"]) == 4  # the other precision is untouched


def test_mutwoac_below_its_floor_is_marked_infeasible_not_a_point_of_its_curve():
    import argparse

    args = argparse.Namespace(model="tiny-bert", batch_size=2, seq_len=16, precision="32-true",
                              option_timeout=0, steps=1, verbose=False)
    row = compare.run_option(compare.mutwoac_option("budget 1 B", 1), args, torch.device("cpu"))
    assert row["status"] == "infeasible" and row["stop_reason"] == "infeasible"
    assert "smallest plan" in row["error"]
    row = compare.run_option(compare.mutwoac_option("nothing recomputed", None), args,
                             torch.device("cpu"))
    assert row["status"] == "ok"
