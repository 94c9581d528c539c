import os

# deterministic cuBLAS for the GPU tests; it must be set before the first cuBLAS call
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own functions; keep dynamo's caches from growing across tests."""
    yield
    torch._dynamo.reset()


@pytest.fixture
def force_cudnn_batch_norm(monkeypatch):
    """Make capture build the cuDNN BatchNorm graph (CUDA only) on the CPU, with the empty
    reserve space cuDNN hands out for NCHW training; the graph can be partitioned, not run."""
    from lightning_ac import _torch_compat as compat
    from lightning_ac import graph_passes

    def fake_reserve(x, *_):
        return compat.as_fake(torch.empty(0, dtype=torch.uint8), x.meta["val"])

    monkeypatch.setattr(graph_passes, "_cudnn_reserve", fake_reserve)
