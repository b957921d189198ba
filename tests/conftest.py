"""Test set-up. Without a CUDA device, Triton kernels are tested on CPU tensors through Triton's interpreter,
which must be switched on before any kernel module is imported (it is read when kernels are decorated)."""

import os
import re
import time

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


# The files whose tests run the Triton kernels (compiled on CUDA, interpreted on CPU): their tests get the
# `kernel` marker, which the GPU session's test stage selects (.ci/gpu-session: -m "(gpu or kernel) and not slow").
KERNEL_TEST_FILES = (
    "test_adaptive_avg_pool_multi.py",
    "test_upsample_add.py",
    "test_upsample_concat.py",
    "test_upsample_cross_entropy.py",
    "test_bn_relu.py",
    "test_conv_bn_relu.py",
    "test_model_triton.py",
    "test_ops_api.py",
    "test_properties.py",
)
# Set by .ci/gpu-session's test stage, which runs the selection as several pytest processes at once (Triton
# compiles on the host's CPUs, one process compiles on one core):
# * UPERNET_FAST_TEST_SHARD="i/n": this process runs shard i of n, whole test files balanced by test count (a
#   file's tests share their kernels' compilations);
# * UPERNET_FAST_TEST_BUDGET_S: seconds the tests may run once collected. Tests not started by then are skipped
#   with a reason, so the stage ends inside its time limit by construction (pytest-timeout is not on the GPU
#   machine); tests run most valuable first: GPU-marked, then deterministic-mode, bitwise-repeat, opcheck and
#   compile tests, then the rest.
SHARD_ENV = "UPERNET_FAST_TEST_SHARD"
BUDGET_ENV = "UPERNET_FAST_TEST_BUDGET_S"
FIRST = re.compile(r"determinis|repeatable|opcheck|compile", re.IGNORECASE)
_deadline: list[float] = []


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the marker must be there by then
def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none here")
    for item in items:
        if item.path.name in KERNEL_TEST_FILES:
            item.add_marker(pytest.mark.kernel)
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


class _GpuSessionOrder:
    """The GPU session's shard and order of the selected tests (after -m has deselected the others)."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if os.environ.get(SHARD_ENV):
            index, count = (int(v) for v in os.environ[SHARD_ENV].split("/"))
            by_file: dict[str, list] = {}
            for item in items:
                by_file.setdefault(item.path.name, []).append(item)
            load, shard_of = [0] * count, {}
            for name in sorted(by_file, key=lambda n: (-len(by_file[n]), n)):
                shard = load.index(min(load))
                shard_of[name], load[shard] = shard, load[shard] + len(by_file[name])
            kept = [item for item in items if shard_of[item.path.name] == index]
            dropped = [item for item in items if shard_of[item.path.name] != index]
            if dropped:
                config.hook.pytest_deselected(items=dropped)
            items[:] = kept
        if os.environ.get(BUDGET_ENV):
            items.sort(key=lambda item: 0 if "gpu" in item.keywords else 1 if FIRST.search(item.name) else 2)


def pytest_configure(config):
    if os.environ.get(SHARD_ENV) or os.environ.get(BUDGET_ENV):
        config.pluginmanager.register(_GpuSessionOrder(), "upernet_fast_gpu_session_order")


def pytest_collection_finish(session):
    if os.environ.get(BUDGET_ENV):
        _deadline.append(time.monotonic() + float(os.environ[BUDGET_ENV]))


def pytest_runtest_setup(item):
    if _deadline and time.monotonic() > _deadline[0]:
        pytest.skip("not started: the time budget of the GPU session's test stage was used up")
