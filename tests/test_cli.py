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
    assert "1.00x" in result.stdout  # the speed-up column (the reference against itself)
    # At 64x64 two of the converted head's 3x3 blocks run Winograd in eval: the demo says what their cache holds.
    assert "MiB of Winograd filter transforms" in result.stdout and "freed by model.train()" in result.stdout
    # The training step's peak is measured after the switch to training mode has freed that cache: counted inside
    # the step, the freed cache (about 260 MiB here) would take the converted row down to nothing, though both
    # models keep the same backbone activations (measured 254 MiB each at this size).
    peak = {row: float(line.split()[-1]) for line in result.stdout.splitlines()
            for row in ("forward+backward  reference", "forward+backward  converted") if line.startswith(row)}
    assert peak["forward+backward  converted"] > 0.5 * peak["forward+backward  reference"], peak


def test_demo_times_the_two_models_in_alternation():
    """The demo's timings alternate the models round by round (order rotated), one call each per round."""
    from upernet_fast.demo import time_interleaved

    order = []
    runs = {name: (lambda name=name: order.append(name)) for name in ("reference", "converted")}
    samples = time_interleaved(runs, "cpu", rounds=3)
    assert order == ["reference", "converted", "converted", "reference", "reference", "converted"]
    assert {name: len(v) for name, v in samples.items()} == {"reference": 3, "converted": 3}
    assert all(t >= 0 for v in samples.values() for t in v)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "ade20k:/nonexistent/ade", "--steps", "1"], "--data ade20k: folder /nonexistent/ade does not exist"),
        (["train", "--steps", "0"], "--steps must be >= 1"),
        (["train", "--scale-range", "2,1", "--steps", "1"], "--scale-range must be MIN,MAX with 0 < MIN <= MAX"),
        (["train", "--lr", "-1", "--steps", "1"], "--lr must be > 0"),
        (["eval", "--model", "/nonexistent/model"], "--model must be a folder with config.json"),
        (["predict", "--model", "/nonexistent/model", "x.png", "--out", "/tmp/never"], "--model must be a folder"),
    ],
)
def test_bad_command_line_input_gets_one_line_and_status_2(argv, message, capsys, tmp_path):
    """A user's mistake is one line naming the option and what was expected, exit status 2 (as argparse's own
    errors), never a traceback."""
    if argv[0] == "train":
        argv = argv + ["--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"upernet-fast {argv[0]}: error: "), err
    assert message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
