"""Builds and loads the compiled core (``csrc/``): the ``torch.ops.upernet_fast_cpp`` ops and a small info module.

Built with ``torch.utils.cpp_extension.load`` and ninja on first use, then loaded from the cache in later
processes (ninja rebuilds only what a changed source needs). Never raises on import; :func:`load` raises
only when asked to (``backend="cpp"`` by name), and :func:`why_unavailable` gives the reason otherwise.

Sources: ``csrc/`` next to the ``upernet_fast`` package in a source checkout (the editable install that
``.ci/setup`` makes), else ``upernet_fast/csrc`` in an installed wheel (package data, see pyproject.toml).

Flags and cache key: ``-O3 -ffp-contract=off`` (no silent FMA contraction: the bits of a result are those of
the expression as written, whatever the ISA), ``-fopenmp`` (``at::parallel_for`` is compiled into the
extension: see ``_OPENMP_FLAGS``) plus the vector ISA. ``at::vec::Vectorized`` picks its
instructions at compile time from the ``CPU_CAPABILITY_*`` macros, which only ATen's own build defines per
kernel file; an extension gets the generic (scalar-array) implementation unless it defines them. So the
ISA torch detects on this machine (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, else
default) selects the macros and ``-m`` flags; never ``-march=native``, whose code may not run on another
machine sharing the cache. The build directory is keyed by torch version, compiler version and a hash of
the flags (ISA included; and the ninja version, whose build logs are not portable), the source folder and
torch's install folder, so machines or environments with different ISAs never share a binary, and two
checkouts or virtual environments never rebuild one folder for each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

NAME = "upernet_fast_cpp"
_DEFAULT_BUILD_SECONDS = 120  # announced before a first build when no earlier build on this machine was timed

_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mbmi", "-mbmi2",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}

# Process-wide state: the loaded module, or the reason it is not there ("not built" until tried).
_state: dict = {"module": None, "status": "not built", "reason": None, "log": None, "path": None, "seconds": None}


def source_dir() -> Path | None:
    """The csrc/ folder: the checkout's (editable install), else the installed package data."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "csrc"):
        if (candidate / "upernet_fast_cpp.cpp").is_file():
            return candidate
    return None


def sources(root: Path) -> list[Path]:
    # csrc/cpu: the CPU kernels; csrc/autograd: autograd formulas written in C++ (device-independent).
    kernels, autograd = sorted((root / "cpu").glob("*.cpp")), sorted((root / "autograd").glob("*.cpp"))
    return [root / "upernet_fast_cpp.cpp", *kernels, *autograd]


def _isa() -> str:
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        return "DEFAULT"
    if capability.startswith("AVX512") and not capability.startswith("AVX512_"):
        return "AVX512"
    if capability.startswith("AVX512"):  # AVX512_VNNI / AVX512_BF16 machines: plain AVX512 code
        return "AVX512"
    return "AVX2" if capability == "AVX2" else "DEFAULT"


# OpenMP: ATen's at::parallel_for is a header template (ATen/ParallelOpenMP.h) whose `#pragma omp parallel`
# is compiled into the extension itself, so without -fopenmp every at::parallel_for of csrc/ ran on one
# thread (found 2026-11-28: `perf stat` showed 1.00 CPUs utilised by the Winograd products on 2 threads).
# Linked with -fopenmp, the extension needs libgomp.so.1, which resolves to the copy libtorch_cpu has already
# loaded (torch/lib/libgomp.so.1, the same soname): one OpenMP runtime, whose thread count
# torch.set_num_threads sets.
_OPENMP_FLAGS = ("-fopenmp",)


def cflags() -> list[str]:
    """Compiler flags of the build (the cache key hashes them)."""
    return ["-O3", "-ffp-contract=off", "-fno-math-errno", *_OPENMP_FLAGS, *(_ISA_FLAGS.get(_isa(), []))]


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _compiler_version() -> str | None:
    exe = shutil.which(_compiler())
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception:
        return None
    return out.splitlines()[0].strip() if out else exe


def _ninja_version() -> str | None:
    # In the key: ninja versions do not share a build log (another version rebuilds everything).
    try:
        return subprocess.run(["ninja", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return None


def cache_root() -> Path:
    base = os.environ.get("UPERNET_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "upernet_fast"
    )
    return Path(base) / "cpp"


def build_directory() -> Path:
    """<cache>/cpp/torch-<version>-<hash of compiler version, flags, source folder and torch install>.

    The source folder and torch's install folder are part of the key: two checkouts (a development tree and
    a fresh CI clone) or two virtual environments would otherwise share one build folder and rebuild it
    for each other, racing when they run at the same time.
    """
    import torch

    key = json.dumps({"compiler": _compiler_version(), "flags": cflags(), "python": sys.version_info[:2],
                      "ninja": _ninja_version(), "sources": str(source_dir()),
                      "torch": os.path.dirname(torch.__file__)})
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / f"torch-{torch.__version__}-{digest}"


def why_no_toolchain() -> str | None:
    if shutil.which(_compiler()) is None:
        return f"no C++ compiler ({_compiler()!r} not on PATH; set CXX or install g++)"
    try:
        from torch.utils.cpp_extension import is_ninja_available

        if not is_ninja_available():
            return "ninja is not available (pip install ninja)"
    except Exception as exc:
        return f"torch.utils.cpp_extension is not importable ({type(exc).__name__}: {exc})"
    if source_dir() is None:
        return "the C++ sources (csrc/) are not found next to the package nor in it"
    return None


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's stdout and stderr (file descriptors, so the compiler's output too) to path."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _timing_file() -> Path:
    return cache_root() / "last_build_seconds.json"


def _expected_seconds() -> int:
    try:
        return int(json.loads(_timing_file().read_text())["seconds"])
    except Exception:
        return _DEFAULT_BUILD_SECONDS


def _is_built(directory: Path) -> bool:
    return any(directory.glob(f"{NAME}*.so")) or any(directory.glob(f"{NAME}*.pyd"))


def load(*, announce: bool = True):
    """The compiled module (building it first when needed). Raises RuntimeError with the reason if it cannot."""
    if _state["module"] is not None:
        return _state["module"]
    if _state["status"] == "failed":
        raise RuntimeError(_state["reason"])
    reason = why_no_toolchain()
    if reason is not None:
        _state.update(status="failed", reason=reason)
        raise RuntimeError(reason)
    import torch.utils.cpp_extension as cpp

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "build.log"
    first = not _is_built(directory)
    if first and announce:
        print(
            f"upernet_fast: building the C++ extension, about {_expected_seconds()} s, once "
            f"(log: {log})",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    try:
        with _output_to(log):
            module = cpp.load(
                name=NAME,
                sources=[str(p) for p in sources(source_dir())],
                extra_cflags=cflags(),
                extra_ldflags=list(_OPENMP_FLAGS),  # a copy: torch's load appends its own flags to the list
                extra_include_paths=[str(source_dir() / "cpu")],
                build_directory=str(directory),
                verbose=True,
            )
    except Exception as exc:
        summary = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _state.update(status="failed", log=str(log),
                      reason=f"the C++ extension failed to build ({summary}); see {log}")
        raise RuntimeError(_state["reason"]) from None
    seconds = time.perf_counter() - start
    if first:
        with contextlib.suppress(OSError):
            _timing_file().write_text(json.dumps({"seconds": round(seconds)}))
        if announce:
            print(f"upernet_fast: C++ extension built in {seconds:.0f} s ({directory})", file=sys.stderr, flush=True)
    _state.update(module=module, status="built", reason=None, log=str(log), path=str(directory), seconds=seconds)
    return module


def why_unavailable() -> str | None:
    """None when the extension is loaded or can be built and loaded now; else why not (built lazily here)."""
    try:
        load()
    except RuntimeError as exc:
        return str(exc)
    return None


def status() -> dict:
    """{"status": "built" | "not built" | "failed", "reason", "log", "path"} without building anything."""
    state = dict(_state)
    state.pop("module")
    if state["status"] == "not built":
        reason = why_no_toolchain()
        if reason is not None:
            state.update(status="failed", reason=reason)
        elif _is_built(build_directory()):
            state.update(status="built (not loaded in this process)", path=str(build_directory()))
        else:
            state.update(reason="not built yet: `upernet-fast build` or the first CPU call builds it",
                         path=str(build_directory()))
    return state


def build_info() -> dict:
    """The compiled module's own report (compiler, torch it was built against, vector ISA, threads) + flags."""
    info = dict(load().build_info())
    info["flags"] = " ".join(cflags())
    return info


def status_line() -> str:
    """One line for ``upernet-fast info``."""
    state = status()
    line = f"C++ extension: {state['status']}"
    if state.get("path"):
        line += f" | {state['path']}"
    if state.get("reason"):
        line += f" | {state['reason']}"
    return line
