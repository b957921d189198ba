"""``upernet_fast.selfcheck``: it passes the Triton backend (here under the interpreter) in every dtype and layout
it checks, and it catches a backend that is wrong."""

import pytest
import torch

from upernet_fast import backend, selfcheck


def test_triton_passes_one_op_in_both_dtypes_and_layouts(capsys):
    assert selfcheck.main(["--device", "cpu", "--ops", "upsample_add"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("upsample_add")]
    assert len(lines) == 4 and all(": ok (max rel. error" in line for line in lines), lines


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_wrong_backend_fails(dtype, capsys, monkeypatch):
    """A 'triton' upsample_add that misplaces the upsampled map by one pixel (error of the order of the values)."""
    def shifted(low, lateral):
        up = torch.nn.functional.interpolate(low, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        return lateral + torch.roll(up, 1, dims=-1)

    monkeypatch.setitem(backend._REGISTRY["upsample_add"], "triton",
                        backend.Implementation("upsample_add", "triton", shifted))
    assert selfcheck.main(["--device", "cpu", "--ops", "upsample_add", "--dtypes", dtype, "--layouts", "nchw"]) == 1
    out = capsys.readouterr().out
    assert "FAILED output 0" in out and "selfcheck: 1 failure(s)" in out, out


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        selfcheck.main(["--dtypes", "fp64"])
