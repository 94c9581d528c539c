"""Checks that need the device the profile is for (run on the H100: pytest -m gpu)."""

import pytest
import torch

from lightning_ac.measure import measure_steps
from lightning_ac.profiler import profile_step
from lightning_ac.zoo import make_workload

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name,batch", [("resnet152", 16), ("bert", 8)])
def test_profile_agrees_with_a_real_step(name, batch):
    w = make_workload(name, batch, device="cuda", seq_len=256)
    opt = torch.optim.Adam(w.model.parameters(), lr=1e-4)
    prof = profile_step(w.loss, w.inputs, w.model, opt)
    torch.cuda.empty_cache()
    m = measure_steps(w.loss, w.inputs, opt, steps=5, warmup=2)
    ratio = prof.peak_bytes / m.peak_B
    assert 0.9 <= ratio <= 1.1, f"predicted {prof.peak_bytes} vs measured {m.peak_B}"
    # node runtimes are kernel times: their sum cannot be far above a real step (it is below
    # it where the step is bound by kernel launches)
    ratio = prof.summary["sum_runtime_ms"] / m.step_ms
    assert 0.3 <= ratio <= 1.3, f"sum of node runtimes {prof.summary['sum_runtime_ms']} vs step {m.step_ms}"
    assert prof.summary["host_device_bandwidth_GBps"] > 1
