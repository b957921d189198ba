"""The command line: `info` lists every op's backends with reasons; `demo` runs end to end (tiny size)."""

import subprocess
import sys

import pytest

from upernet_fast import cli


def test_info_lists_backends_and_reasons(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for op in ("adaptive_avg_pool_multi", "upsample_add", "upsample_concat", "upsample_cross_entropy", "conv_bn_relu"):
        assert op in out
    assert "eager    available" in out
    assert "auto picks" in out


@pytest.mark.slow
def test_demo_checks_and_times_a_converted_model():
    # A small input keeps this near 20 s on 2 cores; the README's command runs the full-size default.
    result = subprocess.run(
        [sys.executable, "-m", "upernet_fast.cli", "demo", "--size", "64", "--batch", "2", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-> OK" in result.stdout
    for row in ("forward           reference", "forward           converted", "forward+backward  converted"):
        assert row in result.stdout
