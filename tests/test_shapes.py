"""benchmarks/shapes.py on the CPU: batches of several lengths, every one planned, same losses."""

import pytest

from benchmarks import shapes


@pytest.mark.parametrize("per_shape", [False, True])
def test_every_length_is_planned_and_losses_equal_no_ac(tmp_path, per_shape):
    s = shapes.main(["--model", "tiny-bert-cls", "--batch-size", "8", "--lengths", "16", "32",
                     "48", "--steps", "6", "--budget", "5MB", "--short-last", "--device", "cpu",
                     "--out", str(tmp_path)] + (["--per-shape"] if per_shape else []))
    lengths_seen = {r for r in (tmp_path / "tiny-bert-cls_shapes.csv").read_text().splitlines()}
    assert len(lengths_seen) == 13  # header + 6 steps x 2 runs
    assert s["max_rel_loss_diff"] <= 1e-6 and s["steps"] == 6
    assert (tmp_path / "tiny-bert-cls_shapes.json").exists()
    if per_shape:  # one planning call per shape
        assert s["shapes_planned"] == len(s["planning_call_s"]) >= 2
        assert not s["varying_sizes_planned_for"]
    else:  # the first shape alone, then the varying sizes traced dynamic, for the largest seen
        assert len(s["plans"]) >= 2 and "*" in s["plans"][-1]
        assert max(s["varying_sizes_planned_for"][-1].values()) == 48
