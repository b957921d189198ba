"""upernet_fast's benchmark harness (outside the installed package).

Run ``python -m benchmarks.run --help`` from the repository root, or ``upernet-fast bench``. See README.md here.
"""
