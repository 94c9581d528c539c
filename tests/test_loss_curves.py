"""benchmarks/loss_curves.py on the CPU: with and without AC, the losses agree step by step."""

import re

import pytest

from benchmarks import loss_curves


@pytest.mark.parametrize("model", ["cnn", "tiny-bert"])
def test_losses_with_and_without_ac_agree(tmp_path, model, capsys):
    df = loss_curves.main(["--model", model, "--batch-size", "8", "--seq-len", "32",
                           "--steps", "6", "--share", "0.0", "--lr", "1e-3",
                           "--device", "cpu", "--out", str(tmp_path)])
    assert len(df) == 6
    assert df.loss_without_ac.iloc[-1] < df.loss_without_ac.iloc[0]  # it trains
    assert (df.rel_diff <= 1e-6).all(), df
    assert (tmp_path / f"{model}_loss_curves.csv").exists()
    assert (tmp_path / f"{model}_loss_curves.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "within 1e-6" in out
    assert int(re.search(r"(\d+) activations recomputed", out).group(1)) > 0
