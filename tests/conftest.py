"""Test set-up. Without a CUDA device, Triton kernels are tested on CPU tensors through Triton's interpreter,
which must be switched on before any kernel module is imported (it is read when kernels are decorated)."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # fp32 tests compare in true fp32: cuDNN convolutions default to TF32 (10-bit mantissa) on Ampere and later,
    # which would put 1e-3 differences between any two differently-ordered fp32 convolutions.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

# The device the Triton backend is tested on: the GPU when there is one, else CPU tensors under the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _fresh_backend_state():
    """No test leaks a process-wide backend override into the next."""
    import upernet_fast
    from upernet_fast import backend

    upernet_fast.set_backend(None)
    backend.clear_cache()
    yield
    upernet_fast.set_backend(None)
    backend.clear_cache()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none here")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_launches(monkeypatch):
    """Counts entries into the Triton BN+ReLU kernels: proves a path ran on Triton rather than falling back to
    eager (which would match the reference anyway)."""
    import importlib

    bn_module = importlib.import_module("upernet_fast.ops.bn_relu")  # the module; ops.bn_relu is the function
    calls = []
    real = bn_module._kernels

    def counting():
        calls.append(1)
        return real()

    monkeypatch.setattr(bn_module, "_kernels", counting)
    return calls
