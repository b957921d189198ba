"""``upernet-fast``: ``info`` (backends here and why), ``demo`` (the main job), ``bench`` (benchmarks/),
``selfcheck`` (a backend against eager on this machine), ``build`` (the C++ extension, csrc/), ``train`` /
``eval`` / ``predict`` (upernet_fast.train)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _info(args) -> int:
    import torch

    import upernet_fast
    from upernet_fast import backend
    from upernet_fast.kernels._utils import interpreting

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # report, do not crash: info is the tool for diagnosing exactly this
        triton_version = f"not importable ({type(exc).__name__})"
    print(f"upernet_fast {upernet_fast.__version__} | torch {torch.__version__} | triton {triton_version}")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda} | TRITON_INTERPRET: {'on' if interpreting() else 'off'}")
    print(f"process-wide backend: {backend.get_backend()} (set_backend() or ${backend.ENV_VAR})")
    from upernet_fast import cpp_extension

    print(cpp_extension.status_line())
    print("auto picks, per call: CUDA tensors -> triton, cpp, eager; CPU tensors -> cpp, eager (first that can run)")
    print()
    rows = backend.describe()
    width = max(len(r["op"]) for r in rows)
    print(f"{'op':<{width}}  {'backend':<7}  {'status':<11}  why not")
    for r in rows:
        print(f"{r['op']:<{width}}  {r['backend']:<7}  {r['status']:<11}  {r['why']}")
    return 0


def _build(args) -> int:
    """Builds (or loads, when current) the C++ extension; prints where, how long and what it was built for."""
    import time

    from upernet_fast import cpp_extension

    start = time.perf_counter()
    try:
        cpp_extension.load()
    except RuntimeError as exc:
        print(f"upernet-fast build: failed: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    info = cpp_extension.build_info()
    print(f"C++ extension built: {cpp_extension.status()['path']} ({seconds:.1f} s)")
    print(f"  {info['compiler']} | torch {info['torch_version']} | at::vec {info['vec_isa']} "
          f"({info['vec_float_lanes']} float lanes) | {info['num_threads']} threads "
          f"(OpenMP {'on' if info.get('openmp') else 'OFF: kernels run on one thread'})")
    print(f"  flags: {info['flags']}")
    return 0


def _demo(args) -> int:
    from upernet_fast.demo import run_demo

    return run_demo(
        device=args.device, batch=args.batch, size=args.size, weights=args.weights, repeats=args.repeats
    )


def _bench(argv: list[str]) -> int:
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "run.py").is_file():
        print(
            "upernet-fast bench runs the harness in the repository's benchmarks/ folder, which is not installed "
            f"with the package; run it from a source checkout (looked in {root}).",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(root))
    from benchmarks import run

    return run.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the harness owns its own arguments
        return _bench(argv[1:])
    if argv[:1] == ["selfcheck"]:
        from upernet_fast import selfcheck

        return selfcheck.main(argv[1:])
    parser = argparse.ArgumentParser(prog="upernet-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backend each op can use here, and why the others cannot")
    demo = sub.add_parser("demo", help="build ConvNeXt-T UperNet, convert it, check it, time it")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    demo.add_argument("--batch", type=int, default=None, help="default: 16 on CUDA, 2 on CPU")
    demo.add_argument("--size", type=int, default=None, help="input side in pixels (default: 512 on CUDA, 256 on CPU)")
    demo.add_argument("--weights", default=None, help="local folder of a saved UperNet checkpoint (save_pretrained)")
    demo.add_argument("--repeats", type=int, default=None,
                      help="timed runs of each model per measurement, the two models alternating (default 10 CUDA, 3 CPU)")
    sub.add_parser("bench", help="benchmarks (see `upernet-fast bench --help`)")
    sub.add_parser("selfcheck", help="every op of a backend against eager, forward and backward (see --help)")
    sub.add_parser("build", help="build the C++ extension (csrc/) now, print where it is and how long it took")
    from upernet_fast.train.commands import add_subcommands

    add_subcommands(sub)  # train, eval, predict: each sets args.run
    args = parser.parse_args(argv)
    if hasattr(args, "run"):
        from upernet_fast.train.errors import UsageError

        try:
            return args.run(args)
        except (UsageError, FloatingPointError) as exc:  # the user's input (or a diverged run), not a bug
            print(f"upernet-fast {args.command}: error: {exc}", file=sys.stderr)
            return 2
    return {"info": _info, "demo": _demo, "build": _build}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
