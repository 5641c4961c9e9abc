import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so spawned ranks can import test modules
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "gpu"))  # and the GPU tests' shared helpers

# Never use NVLink multicast on the shared GPU hosts (docs/safety.md, "Multicast"); children inherit these.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
for _k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ[_k] = {"NCCL_NVLS_ENABLE": "0"}.get(_k, "1")
# Tests make calls time out on purpose: the watchdog reports them and lets the test process live
# (its default tears a process down; tests/test_failed_calls.py checks that in a child process).
os.environ.setdefault("TPFUSE_WATCHDOG", "report")


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def pytest_collection_modifyitems(config, items):
    n = _cuda_count()
    for item in items:
        if "gpu" in item.keywords and n == 0:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        elif "multigpu" in item.keywords and n < 2:
            item.add_marker(pytest.mark.skip(reason="needs at least 2 CUDA GPUs"))


@pytest.fixture
def fake_cuda(monkeypatch):
    """Dispatch's CUDA branch on the CPU: device 0, no capture, no forcing variables, and an
    ``install(ws)`` that puts a stand-in workspace in place of the collective set-up."""
    import torch

    from tpfuse.compile_ops import workspace as workspaces

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    for name in ("TPFUSE_BACKEND", "TPFUSE_ENABLE_MULTIMEM", "TPFUSE_PUSH_MAX_BYTES", "TPFUSE_FLAG_MAX_BYTES"):
        monkeypatch.delenv(name, raising=False)
    saved = dict(workspaces._workspaces)
    workspaces._workspaces.clear()

    def install(ws):
        workspaces._workspaces[(ws.group.name, 0)] = ws
        return ws

    yield install
    workspaces._workspaces.clear()
    workspaces._workspaces.update(saved)


@pytest.fixture
def planning(monkeypatch):
    """The compile-time plan, whatever machine runs the test: a stand-in GPU model, an empty evidence table
    and no forcing variable (none of the machine's GPU or of the shipped table's entries reaches it)."""
    from tpfuse.compile_ops import dispatch
    from tpfuse.compile_ops.flag import evidence

    for name in ("TPFUSE_BACKEND", "TPFUSE_FLAG_MAX_BYTES", "TPFUSE_ENABLE_MULTIMEM", "TPFUSE_PUSH_MAX_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dispatch, "local_device_name", lambda: "stand-in GPU")
    monkeypatch.setattr(evidence, "FLAG_CROSSOVER", {})
    return monkeypatch
