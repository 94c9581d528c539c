"""benchmarks/budget_matrix.py on the CPU: the configurations run, plan, and train as no-AC."""

from benchmarks import budget_matrix


def test_the_matrix_runs_each_habit_and_trains_as_without_ac(tmp_path):
    df = budget_matrix.main(["--tiny", "--only", "resnet18", "--habits", "plain", "short-last",
                             "foreign", "--budgets", "0.6", "--steps", "3", "--device", "cpu",
                             "--out", str(tmp_path)])
    assert list(df.habit) == ["plain", "short-last", "foreign"]
    assert "error" not in df or df.error.isna().all()
    assert (df.state == "active").all() and (df.over_budget_after_second == 0).all()
    assert (df.max_rel_loss_diff <= 1e-5).all()
    steps = (tmp_path / "budget_matrix_steps.csv").read_text().splitlines()
    assert len(steps) == 1 + 3 * 3 * 2  # header + steps x configurations x runs
