"""The benchmarks' shared flags: every script takes a workload of the user's own by
``--model pkg.module:function``, and the same defaults."""

import pytest
import torch
from torch import nn

from benchmarks import common
from benchmarks.zoo import Workload


def tiny_regression(batch_size, device, seq_len=None):
    """A workload of a user's own, as ``--model tests.test_benchmark_flags:tiny_regression``."""
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)).to(device)
    x = torch.randn(batch_size, 16, device=device)
    y = torch.randn(batch_size, 1, device=device)

    def loss(x, y):
        return nn.functional.mse_loss(model(x), y)

    return Workload("tiny-regression", model, (x, y), loss)


def not_a_workload(batch_size, device):
    return nn.Linear(2, 2)


def test_a_users_workload_is_loaded_by_module_and_function():
    w = common.load_workload("tests.test_benchmark_flags:tiny_regression", 8)
    assert w.name == "tiny-regression" and w.inputs[0].shape == (8, 16)
    assert common.load_workload("mlp", 4).name == "mlp"  # a reference workload by name


@pytest.mark.parametrize("spec,match", [
    ("tests.test_benchmark_flags:missing", "cannot load 'missing'"),
    ("no_such_package.module:f", "cannot load 'f'"),
    ("tests.test_benchmark_flags:not_a_workload", "expected a benchmarks.zoo.Workload"),
])
def test_a_bad_model_spec_says_what_is_wrong(spec, match):
    with pytest.raises(SystemExit, match=match):
        common.load_workload(spec, 2)


def test_every_benchmark_shares_the_defaults():
    args = common.workload_parser(None, "mlp", 4).parse_args([])
    assert (args.steps, args.warmup, args.precision) == (common.STEPS, common.WARMUP, "32-true")
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_benchmark_runs_on_a_users_workload(tmp_path, capsys):
    from benchmarks import host_overhead

    res = host_overhead.main(["--model", "tests.test_benchmark_flags:tiny_regression",
                              "--batch-size", "64", "--steps", "1", "--rows", "2",
                              "--device", "cpu"])
    assert set(res) == {"eager", "rewritten"} and "plan: " in capsys.readouterr().out
