"""The C++ extension's loader (upernet_fast/cpp_extension.py) and its command-line surface: it builds (CI must
build it: a failure fails here, never skips), reports what it was built for, and explains itself when it
cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from upernet_fast import cpp_extension


def test_builds_loads_and_registers_every_op():
    module = cpp_extension.load()
    assert cpp_extension.why_unavailable() is None
    state = cpp_extension.status()
    assert state["status"] == "built" and os.path.isdir(state["path"]) and os.path.isfile(state["log"])
    info = module.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["vec_float_lanes"] >= 4 and info["num_threads"] >= 1
    assert info["openmp"]


def test_kernels_run_on_every_thread_torch_allows():
    # at::parallel_for compiles into the extension and is parallel only when the extension is built with
    # OpenMP (it was not until 2026-11-28: every kernel ran on one thread). The extension's own
    # parallel_for must run on as many threads as torch.set_num_threads gives it (the runtime torch uses).
    module = cpp_extension.load()
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            info = module.build_info()
            assert info["num_threads"] == n and info["parallel_for_threads"] == n, (n, info)
    finally:
        torch.set_num_threads(threads)
    for name in ("adaptive_avg_pool_multi", "adaptive_avg_pool_multi_backward", "upsample_add",
                 "upsample_add_backward", "upsample_concat", "upsample_concat_backward", "upsample_cross_entropy",
                 "upsample_cross_entropy_backward", "bn_relu_channel_stats", "bn_relu_apply",
                 "bn_relu_backward_reduce", "bn_relu_backward_input", "bn_relu_eval", "bn_relu_eval_backward",
                 "conv_bn_relu_pointwise_eval"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"upernet_fast_cpp::{name}", "CPU"), name


def test_schemas_are_the_triton_ops_schemas():
    """One fake kernel and one autograd formula serve both namespaces only if the schemas are identical."""
    import upernet_fast.ops  # noqa: F401  (registers the Triton custom ops)

    cpp_extension.load()
    for name in ("adaptive_avg_pool_multi", "adaptive_avg_pool_multi_backward", "upsample_add",
                 "upsample_add_backward", "upsample_concat", "upsample_concat_backward", "upsample_cross_entropy",
                 "upsample_cross_entropy_backward"):
        ours = str(getattr(torch.ops.upernet_fast_cpp, name).default._schema)
        theirs = str(getattr(torch.ops.upernet_fast, name).default._schema)
        assert ours.replace("upernet_fast_cpp::", "upernet_fast::") == theirs


def test_inference_only_ops_have_the_extensions_autograd_and_no_python_layer():
    """Every InferenceOp's Autograd kernel is csrc/autograd/inference_only.cpp's, registered from C++: a Python one
    (torch.library.register_autograd) ran Python on every call, grad or not, more than the kernel on small maps."""
    import upernet_fast.ops  # noqa: F401  (declares the ops)
    from upernet_fast import backend
    from upernet_fast.ops._kernel_op import _EXTENSION_OPS, InferenceOp

    cpp_extension.load()
    assert backend._cpp_unavailable() is None  # loads and attaches the fakes, as the backend layer does
    inference_ops = [op for op in _EXTENSION_OPS[backend.CPP_NAMESPACE] if isinstance(op, InferenceOp)]
    assert len(inference_ops) == 9, [op.name for op in inference_ops]
    for op in inference_ops:
        table = torch._C._dispatch_dump(f"upernet_fast_cpp::{op.name}")
        autograd = [line for line in table.splitlines() if line.startswith("Autograd")]
        assert len(autograd) == 1 and "inference_only.cpp" in autograd[0], (op.name, table)
        meta = [line for line in table.splitlines() if line.startswith("Meta")]
        assert len(meta) == 1 and ".py" in meta[0], (op.name, table)  # the fake kernel: traced by torch.compile


def test_cli_build_and_info_report_the_extension():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "upernet_fast.cli", "build"], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr
    assert "C++ extension built:" in out.stdout and "flags:" in out.stdout
    info = subprocess.run([sys.executable, "-m", "upernet_fast.cli", "info"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert info.returncode == 0, info.stderr
    assert "C++ extension: built" in info.stdout


def test_without_a_compiler_it_explains_and_raises_only_when_asked():
    env = dict(os.environ, CXX="no-such-compiler-here")
    code = (
        "from upernet_fast import cpp_extension as c\n"
        "reason = c.why_unavailable()\n"
        "print(reason)\n"
        "print(c.status_line())\n"
        "try:\n"
        "    c.load()\n"
        "except RuntimeError as e:\n"
        "    print('raised:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "no C++ compiler ('no-such-compiler-here'" in out.stdout
    assert "C++ extension: failed" in out.stdout and "raised: no C++ compiler" in out.stdout
