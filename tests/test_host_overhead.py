"""benchmarks/host_overhead.py on the CPU: both variants run under the profiler."""

from benchmarks import host_overhead


def test_eager_and_rewritten_steps_are_profiled(capsys):
    res = host_overhead.main(["--model", "cnn", "--batch-size", "4", "--steps", "1",
                              "--rows", "3", "--device", "cpu"])
    assert set(res) == {"eager", "rewritten"}
    assert all(r["wall_ms"] > 0 and r["aten_calls"] > 10 for r in res.values())
    out = capsys.readouterr().out
    assert "=== eager" in out and "=== rewritten" in out and "Self CPU" in out


def test_the_rewritten_step_can_be_planned_for_a_budget(capsys):
    host_overhead.main(["--model", "cnn", "--batch-size", "4", "--steps", "1", "--rows", "3",
                        "--device", "cpu", "--budget", "1"])
    out = capsys.readouterr().out
    recomputed = int(out.split("plan: ")[1].split(" activations recomputed")[0].split()[-1])
    assert recomputed > 0
