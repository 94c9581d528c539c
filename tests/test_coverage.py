"""benchmarks/coverage.py on the CPU, on two of its models: one that captures as one graph, one that
dynamo splits (it does not trace nn.LSTM)."""

import pandas as pd

from benchmarks import coverage


def test_the_coverage_table_says_engaged_or_why_not(tmp_path):
    df = coverage.main(["--only", "bert", "lstm", "--steps", "3", "--out", str(tmp_path)])
    rows = df.set_index("model")
    assert bool(rows.at["bert", "engaged"]) and rows.at["bert", "max_rel_loss_diff"] <= 1e-6
    assert rows.at["bert", "graphs"] == 1 and rows.at["bert", "predicted_peak_B"] > 0
    # the LSTM runs eagerly between graphs: planned around it, its saved memory counted
    assert bool(rows.at["lstm", "engaged"]) and rows.at["lstm", "max_rel_loss_diff"] <= 1e-6
    assert rows.at["lstm", "eager_saved_B"] > 0 and "LSTM" in rows.at["lstm", "split_by"]
    saved = pd.read_csv(tmp_path / "coverage.csv")
    assert list(saved.model) == ["bert", "lstm"]
    assert "| bert | transformers | yes |" in (tmp_path / "coverage.md").read_text()


def test_every_model_in_the_benchmark_has_a_unique_name():
    names = [m[0] for m in coverage.MODELS]
    assert len(names) == len(set(names)) >= 30


def test_the_inductor_table_says_which_graphs_ran_inductors_code(tmp_path):
    """--kernels inductor (inductor's compilation stood in for by the graphs run op by op):
    each planned graph counted in on_inductor, the first step's loss as without AC, its own
    files."""
    from unittest import mock

    from lightning_ac import _torch_compat as compat
    from tests.test_codegen import _op_by_op

    with mock.patch.object(compat, "inductor_compile", _op_by_op):
        df = coverage.main(["--only", "bert", "--steps", "3", "--kernels", "inductor",
                            "--out", str(tmp_path)])
    from torch._inductor import config

    assert not config.fallback_random  # (eager's draws for that run only)
    row = df.set_index("model").loc["bert"]
    assert bool(row.engaged) and row.on_inductor == "1/1" and row.first_rel_loss_diff <= 1e-6
    table = (tmp_path / "coverage_inductor.md").read_text()
    assert "| on inductor | first-step loss diff |" in table and "| 1/1 |" in table
