"""Fused bilinear-upsample + cross-entropy: the Triton kernels against the eager reference.

Runs on CUDA when present, else on CPU tensors under Triton's interpreter (see conftest.py).

Tolerances:
* fp32: the kernels evaluate the same per-pixel formulas as PyTorch (PyTorch's fp32 index rule, its
  interpolation order, log_softmax's ``(x - max) - log(sum)``); what differs is the order of sums (online
  log-sum-exp over class chunks, per-program partial sums, the gather order of the backward). That costs a few
  ulp per summed term, so rtol 2e-5 with an absolute floor of 2e-5 x the largest reference value.
* fp16/bf16: judged against the fp32 reference of the same (rounded) inputs; the error may be at most 2x the
  error of the reference computed in that dtype, plus a floor of 1e-6 x the largest reference value.
"""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_DEVICE
from layouts import in_layout
from op_testing import OpSpec, OpTests, require_backend

from upernet_fast import backend as _backend
from upernet_fast import reference
from upernet_fast.ops import upsample_cross_entropy

pytest.importorskip("triton")
from upernet_fast.kernels import upsample_cross_entropy as kernels  # noqa: E402

DEV = TRITON_DEVICE
IGNORE = 255


def _inputs(batch, classes, h, w, out_h, out_w, *, ignored=0.0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, classes, h, w, generator=gen) * 2).to(dtype).to(DEV)
    labels = torch.randint(0, classes, (batch, out_h, out_w), generator=gen)
    if ignored:
        labels[torch.rand(labels.shape, generator=gen) < ignored] = IGNORE
    weight = (torch.rand(classes, generator=gen) + 0.5).to(DEV)
    return logits, labels.to(DEV), weight


def _loss_and_grad(fn, logits, labels, grad_dtype=None, **kwargs):
    """The loss and the logits gradient for a random upstream gradient, rounded to ``grad_dtype`` if given."""
    logits = logits.detach().requires_grad_()
    loss = fn(logits, labels, **kwargs)
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.rand(loss.shape, generator=gen).to(grad_dtype or loss.dtype).to(loss.dtype).to(loss.device)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    return loss.detach(), grad


def _triton(logits, labels, **kwargs):
    return upsample_cross_entropy(logits, labels, backend="triton", **kwargs)


def _assert_fp32_close(actual, expected):
    scale = float(expected.abs().max()) if expected.numel() and torch.isfinite(expected).all() else 1.0
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-5 * max(scale, 1e-30), equal_nan=True)


def _check_against_reference(logits, labels, **kwargs):
    loss, grad = _loss_and_grad(_triton, logits, labels, **kwargs)
    ref_loss, ref_grad = _loss_and_grad(reference.upsample_cross_entropy, logits, labels, **kwargs)
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    _assert_fp32_close(loss, ref_loss)
    _assert_fp32_close(grad, ref_grad)


# Every reduction x class weights x ignored pixels, on the odd sizes 7x5 -> 29x23 (non-integer ratios).
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "mean_all"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignored", [0.0, 0.3])
def test_reductions_weights_ignored_odd_sizes(reduction, weighted, ignored):
    logits, labels, weight = _inputs(2, 7, 7, 5, 29, 23, ignored=ignored)
    _check_against_reference(logits, labels, reduction=reduction, weight=weight if weighted else None)


SHAPES = {
    # (batch, classes, h, w, H, W)
    "ratio 1 (same size)": (2, 7, 6, 5, 6, 5),
    "ratio 4": (1, 7, 4, 3, 16, 12),
    "ratio 8": (1, 7, 3, 2, 24, 16),
    "ratio 16": (1, 7, 2, 2, 32, 32),
    "binary C=2": (2, 2, 5, 5, 11, 9),
    "C=150 tiny map (several class chunks and class blocks)": (1, 150, 2, 3, 8, 12),
    "wide map (several column blocks, several pixel chunks per program)": (1, 3, 2, 37, 7, 83),
    "downsampling (rows read by no output)": (1, 5, 9, 7, 4, 3),
    "1x1 source": (2, 3, 1, 1, 5, 4),
    "1-pixel target": (1, 4, 3, 5, 1, 1),
}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shapes_and_ratios(shape, reduction):
    logits, labels, weight = _inputs(*shape, ignored=0.2)
    _check_against_reference(logits, labels, reduction=reduction, weight=weight if reduction == "mean" else None)


def test_align_corners():
    logits, labels, weight = _inputs(2, 5, 5, 4, 17, 11, ignored=0.2)
    for reduction in ("mean", "none"):
        _check_against_reference(logits, labels, reduction=reduction, weight=weight, align_corners=True)


@pytest.mark.parametrize("ignore_index", [-100, 0, -1])
def test_any_ignore_index(ignore_index):
    # 0 is a real class: ignoring it must skip it, not any padded class block entry.
    logits, labels, _ = _inputs(1, 6, 4, 4, 9, 7)
    labels[:, ::3] = ignore_index
    _check_against_reference(logits, labels, ignore_index=ignore_index, reduction="mean")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "mean_all"])
def test_all_pixels_ignored(reduction):
    # F.cross_entropy gives NaN for "mean" (0 / 0) and 0 otherwise; the gradient is zero everywhere.
    logits, labels, weight = _inputs(1, 4, 3, 3, 7, 6)
    labels.fill_(IGNORE)
    for w in (None, weight):
        loss, grad = _loss_and_grad(_triton, logits, labels, reduction=reduction, weight=w)
        ref_loss, ref_grad = _loss_and_grad(reference.upsample_cross_entropy, logits, labels, reduction=reduction, weight=w)
        torch.testing.assert_close(loss, ref_loss, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(ref_grad, torch.zeros_like(ref_grad))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_against_fp32_reference(dtype, reduction):
    logits, labels, weight = _inputs(2, 7, 7, 5, 29, 23, ignored=0.2, dtype=dtype)
    weight = weight if reduction == "mean" else None
    logits32 = logits.float()
    # The same upstream gradient (rounded to the dtype) for all three.
    loss, grad = _loss_and_grad(_triton, logits, labels, dtype, reduction=reduction, weight=weight)
    ref16_loss, ref16_grad = _loss_and_grad(
        reference.upsample_cross_entropy, logits, labels, dtype, reduction=reduction,
        weight=None if weight is None else weight.to(dtype),
    )
    ref32_loss, ref32_grad = _loss_and_grad(
        reference.upsample_cross_entropy, logits32, labels, dtype, reduction=reduction, weight=weight
    )
    assert loss.dtype == dtype and grad.dtype == dtype
    for ours, ref16, ref32 in ((loss, ref16_loss, ref32_loss), (grad, ref16_grad, ref32_grad)):
        largest = float(ref32.abs().max())
        ref_error = float((ref16.float() - ref32).abs().max())
        our_error = float((ours.float() - ref32).abs().max())
        slack = 1e-6 * largest
        if dtype == torch.bfloat16 and DEV == "cpu":
            # Triton's interpreter converts fp32 -> bf16 by truncation where compiled Triton rounds to nearest
            # (the kernels' fp32 values are right: see the fp32 tests), so allow one bf16 ulp of the largest value.
            slack += 2.0 ** (math.floor(math.log2(largest)) - 7)
        assert our_error <= 2 * ref_error + slack, (our_error, ref_error, slack)


def test_channels_last_and_sliced_logits_in_nan_storage():
    logits, labels, weight = _inputs(2, 5, 6, 4, 15, 13, ignored=0.2)
    ref_loss, ref_grad = _loss_and_grad(reference.upsample_cross_entropy, logits, labels, weight=weight)
    # channels_last
    loss, grad = _loss_and_grad(_triton, logits.contiguous(memory_format=torch.channels_last), labels, weight=weight)
    _assert_fp32_close(loss, ref_loss)
    _assert_fp32_close(grad, ref_grad)
    # A view into a NaN-filled larger tensor: any read outside the view poisons the result.
    big = torch.full((2, 8, 9, 7), float("nan"), device=DEV)
    big[:, 2:7, 1:7, 2:6] = logits
    view = big[:, 2:7, 1:7, 2:6]
    assert not view.is_contiguous()
    loss, grad = _loss_and_grad(_triton, view, labels, weight=weight)
    _assert_fp32_close(loss, ref_loss)
    _assert_fp32_close(grad, ref_grad)
    # A strided (every other column) view.
    wide = torch.full((2, 5, 6, 8), float("nan"), device=DEV)
    wide[..., ::2] = logits
    loss, grad = _loss_and_grad(_triton, wide[..., ::2], labels, weight=weight)
    _assert_fp32_close(loss, ref_loss)
    _assert_fp32_close(grad, ref_grad)


def test_every_output_element_written_over_nan():
    logits, labels, weight = _inputs(2, 7, 5, 3, 13, 10, ignored=0.3)
    shape = labels.shape
    loss_out = torch.full(shape, float("nan"), device=DEV)
    lse_out = torch.full(shape, float("nan"), device=DEV)
    loss, lse, denominator = kernels.forward(logits, labels, weight, IGNORE, "none", False, loss_out=loss_out, lse_out=lse_out)
    assert loss is loss_out and lse is lse_out
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all()
    full = F.interpolate(logits, size=shape[-2:], mode="bilinear", align_corners=False)
    _assert_fp32_close(lse, torch.logsumexp(full, dim=1))
    _assert_fp32_close(loss, reference.upsample_cross_entropy(logits, labels, IGNORE, "none", weight))
    grad_out = torch.full(logits.shape, float("nan"), device=DEV)
    grad = kernels.backward(torch.ones(shape, device=DEV), logits, labels, weight, lse, denominator, IGNORE, False, out=grad_out)
    assert grad is grad_out and torch.isfinite(grad).all()


def test_out_of_range_labels_are_masked_in_the_kernels():
    # The entry point raises on such labels (a host sync); under torch.compile it skips that check, so the
    # kernels must not read out of bounds: a pixel with a label outside [0, C) counts as ignored.
    logits, labels, weight = _inputs(1, 4, 3, 3, 8, 8)
    bad = labels.clone()
    bad[0, 0, :3] = torch.tensor([4, -3, 1000])
    masked = labels.clone()
    masked[0, 0, :3] = IGNORE
    for w in (None, weight):
        loss, lse, denominator = kernels.forward(logits, bad, w, IGNORE, "sum", False)
        expected, _, _ = kernels.forward(logits, masked, w, IGNORE, "sum", False)
        assert torch.equal(loss, expected)
        grad = kernels.backward(torch.tensor(1.0, device=DEV), logits, bad, w, lse, denominator, IGNORE, False)
        expected_grad = kernels.backward(torch.tensor(1.0, device=DEV), logits, masked, w, lse, denominator, IGNORE, False)
        assert torch.equal(grad, expected_grad)


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_out_of_range_labels_raise_the_same_error_on_every_backend(backend, monkeypatch):
    # Where the labels are read by code that checks them (the C++ kernel's pass, PyTorch's CPU cross-entropy,
    # whose IndexError is translated), the entry point runs no separate pass over them; elsewhere (Triton, eager
    # on a GPU) it checks them first, a host sync. Every backend raises the same error, naming the first bad label
    # in (b, y, x) order.
    device = "cpu" if backend == "cpp" else DEV
    if backend == "cpp":
        require_backend("cpp")
    module = sys.modules["upernet_fast.ops.upsample_cross_entropy"]
    separate_checks = []
    check = module._check_label_range
    monkeypatch.setattr(module, "_check_label_range", lambda *args: (separate_checks.append(1), check(*args)))
    logits, labels, _ = _inputs(2, 4, 3, 3, 6, 6)
    logits, labels = logits.to(device), labels.to(device)
    bad = labels.clone()
    bad[1, 0, 0], bad[0, 4, 5], bad[0, 5, 1] = -1, 4, 1000
    error = r"labels must lie in \[0, 4\) or equal ignore_index=255; found 4$"
    for reduction in reference.REDUCTIONS:
        with pytest.raises(ValueError, match=error):
            upsample_cross_entropy(logits, bad, reduction=reduction, backend=backend)
    if backend == "eager":  # the loss of logits already resized (a model returning full-resolution logits)
        resized = F.interpolate(logits, size=(6, 6), mode="bilinear", align_corners=False)
        with pytest.raises(ValueError, match=error):
            upsample_cross_entropy(logits, bad, backend=backend, resized=resized)
    upsample_cross_entropy(logits, labels, backend=backend)  # and good labels pass
    checked_first = backend == "triton" or torch.device(device).type != "cpu"
    assert bool(separate_checks) == checked_first, (backend, device, len(separate_checks))


def test_none_reduction_with_expanded_upstream_gradient():
    # loss.sum().backward() hands the op a stride-0 (expanded) gradient.
    logits, labels, _ = _inputs(1, 3, 4, 4, 9, 9, ignored=0.2)
    ours = logits.detach().requires_grad_()
    _triton(ours, labels, reduction="none").sum().backward()
    ref = logits.detach().requires_grad_()
    reference.upsample_cross_entropy(ref, labels, reduction="none").sum().backward()
    _assert_fp32_close(ours.grad, ref.grad)


def test_saved_for_backward_is_at_most_inputs_plus_per_pixel_lse():
    batch, classes, out_h, out_w = 2, 7, 29, 23
    logits, labels, weight = _inputs(batch, classes, 7, 5, out_h, out_w, ignored=0.2)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    logits = logits.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _triton(logits, labels, weight=weight)
    loss.backward()
    assert saved, "nothing was saved: the hooks did not see the op's context"
    budget = (
        logits.numel() * logits.element_size()
        + labels.numel() * labels.element_size()
        + batch * out_h * out_w * 4  # per-pixel log-sum-exp, fp32
        + weight.numel() * weight.element_size()
        + 64  # the 0-dim denominator and slack
    )
    full_res = batch * classes * out_h * out_w * 4
    assert sum(saved) <= budget < full_res, (saved, budget, full_res)


@pytest.mark.parametrize(("n_in", "n_out"), [(7, 29), (5, 23), (2, 32), (4, 16), (6, 6), (9, 4), (1, 5), (3, 1), (13, 100)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_cells_partition_the_outputs_brute_force(n_in, n_out, align_corners):
    # The backward splits the outputs of an axis into cells k = -1 .. n_in - 1 and adds output d only into inputs
    # k ("own") and k + 1 ("next") of its cell, with the weights below; found independently here by interpolating
    # each one-hot input, every read must be one of those two, with that weight.
    eye = torch.eye(n_in).reshape(n_in, 1, 1, n_in)
    weights = F.interpolate(eye, size=(1, n_out), mode="bilinear", align_corners=align_corners)[:, 0, 0]
    cells = kernels.source_cells(n_in, n_out, align_corners)
    starts = kernels.cell_starts(n_in, n_out, align_corners)
    assert starts.shape == (n_in + 2,) and starts[0] == 0 and starts[-1] == n_out
    assert (starts[1:] >= starts[:-1]).all()
    for k in range(-1, n_in):
        assert (cells[starts[k + 1]:starts[k + 2]] == k).all(), (k, cells, starts)
    scale = torch.tensor(kernels._scale(n_in, n_out, align_corners), dtype=torch.float32)
    for d in range(n_out):
        k = int(cells[d])
        src = torch.tensor(float(d), dtype=torch.float32) * scale if align_corners else (
            ((torch.tensor(float(d), dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0.0))
        i0 = max(k, 0)
        i1 = min(i0 + 1, n_in - 1)
        l1 = float((src - i0).clamp(0.0, 1.0))
        l0 = 1.0 - l1
        expected = torch.zeros(n_in)
        for part, i in ((0, k), (1, k + 1)):
            if 0 <= i < n_in:
                expected[i] = (l0 if i0 == i else 0.0) + (l1 if i1 == i else 0.0)
        # PyTorch's CPU kernel rounds its source coordinate once more than the rule (e.g. 5 -> 23, output 11:
        # 1.9999999, not 2): a weight of 1 ulp may move to the neighbouring input there.
        torch.testing.assert_close(weights[:, d], expected, rtol=0, atol=1e-6, msg=f"output {d} of cell {k}")


def test_backward_corrects_cell_starts_off_by_one(monkeypatch):
    # On a GPU the source coordinate's multiply-add is fused, so a cell boundary there can sit one output away
    # from the host's (unfused) table; the kernel corrects each entry with its own index rule. Feed it tables
    # moved by up to one position each way: the gradient must be bitwise the same.
    logits, labels, weight = _inputs(2, 5, 7, 6, 29, 23, ignored=0.2)
    loss, lse, denominator = kernels.forward(logits, labels, weight, IGNORE, "mean", False)
    grad_loss = torch.tensor(1.0, device=DEV)
    exact = kernels.backward(grad_loss, logits, labels, weight, lse, denominator, IGNORE, False)
    real = kernels.cell_starts
    gen = torch.Generator().manual_seed(3)

    def moved(n_in, n_out, align_corners, device="cpu"):
        starts = real(n_in, n_out, align_corners, device).cpu().long()
        moved = starts + torch.randint(-1, 2, starts.shape, generator=gen)
        moved[0], moved[-1] = starts[0], starts[-1]
        return moved.clamp(0, n_out).to(torch.int32).to(device)

    monkeypatch.setattr(kernels, "cell_starts", moved)
    for _ in range(3):
        assert torch.equal(kernels.backward(grad_loss, logits, labels, weight, lse, denominator, IGNORE, False), exact)


# (BLOCK_C, BLOCK_J, BLOCK_I, num_warps): the CUDA launcher's column blocks (8, 16 or 32 cells) and row blocks (2 to
# 16 rows), which the interpreter's own choice (16 cells, 4 rows) does not run, and one-class / one-row blocks.
BACKWARD_CONFIGS = [(32, 8, 2, 2), (8, 32, 16, 4), (4, 16, 1, 1), (64, 8, 3, 1)]


@pytest.mark.parametrize("config", BACKWARD_CONFIGS, ids=[str(c) for c in BACKWARD_CONFIGS])
def test_backward_launch_configurations(config, monkeypatch):
    monkeypatch.setattr(kernels, "_backward_blocks", lambda *args: config)
    logits, labels, _ = _inputs(1, 7, 4, 37, 13, 83, ignored=0.2)  # several column blocks of each size
    _check_against_reference(logits, labels, reduction="none")
    logits, labels, weight = _inputs(1, 5, 9, 7, 4, 3, ignored=0.2)  # downsampling: empty cells
    _check_against_reference(logits, labels, reduction="mean", weight=weight, align_corners=True)


def test_reference_gradcheck_float64():
    logits, labels, weight = _inputs(1, 3, 3, 2, 5, 4, ignored=0.2)
    logits = logits.double().cpu().requires_grad_()
    for reduction in ("mean", "none", "mean_all"):
        assert torch.autograd.gradcheck(
            lambda x: reference.upsample_cross_entropy(x, labels.cpu(), IGNORE, reduction, weight.double().cpu()),
            (logits,),
        )


def _kernel_calls(device):
    logits, labels, weight = _inputs(1, 5, 3, 4, 7, 9, ignored=0.2)
    logits, labels, weight = logits.to(device), labels.to(device), weight.to(device)
    # The saved statistics the backward takes, from the eager formula (no kernel needed to make them):
    # the per-pixel log-sum-exp of the upsampled logits and the weighted count of counted pixels.
    upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    lse = torch.logsumexp(upsampled, dim=1)
    counted = labels != IGNORE
    denominator = weight[torch.where(counted, labels, 0)][counted].sum()
    return [
        ("upsample_cross_entropy", (logits.requires_grad_(), labels, weight, IGNORE, "mean", False)),
        ("upsample_cross_entropy", (logits.detach().requires_grad_(), labels, None, IGNORE, "none", True)),
        ("upsample_cross_entropy_backward",
         (torch.tensor(1.0, device=device), logits.detach(), labels, weight, lse, denominator, IGNORE, False)),
    ]


def _shared_inputs(device, layout, seed):
    # Odd sizes 4x3 -> 13x11, class weights and 20% ignored pixels.
    logits, labels, weight = _inputs(2, 5, 4, 3, 13, 11, ignored=0.2, seed=seed)
    return in_layout(logits.to(device), layout).requires_grad_(), labels.to(device), weight.to(device)


def _bad_calls():
    logits, labels, weight = _inputs(2, 4, 3, 3, 6, 6)
    out_of_range = []
    for value in (4, -1):
        bad = labels.clone()
        bad[0, 0, 0] = value
        out_of_range.append((lambda bad=bad: _triton(logits, bad), ValueError, "labels must lie in"))
    return [
        (lambda: _triton(logits, labels[0]), ValueError, "labels must be a 3D"),  # 2D labels
        (lambda: _triton(logits, labels[:1]), ValueError, r"labels must have shape \(B, H, W\)"),  # batch mismatch
        (lambda: _triton(logits, labels.float()), TypeError, "labels must be an integer"),
        *out_of_range,
        (lambda: _triton(logits, labels, weight=weight[:3]), ValueError, "weight"),
        (lambda: _triton(logits, labels, weight=torch.ones(4, dtype=torch.int64, device=DEV)), TypeError, "weight"),
        (lambda: _triton(logits, labels, reduction="avg"), ValueError, "reduction"),
        (lambda: _triton(logits, labels, ignore_index=1.5), TypeError, "ignore_index"),
        (lambda: _triton(logits[0], labels), ValueError, "logits"),
        (lambda: upsample_cross_entropy(logits.double(), labels, backend="triton"), RuntimeError, "float64"),
    ]


class TestShared(OpTests):
    spec = OpSpec(
        name="upsample_cross_entropy",
        make_inputs=_shared_inputs,
        run=lambda inputs, backend: (upsample_cross_entropy(inputs[0], inputs[1], weight=inputs[2], backend=backend),),
        kernel_calls=_kernel_calls,
        bad_calls=_bad_calls(),
        rtol=2e-5,
        atol=2e-5,  # reordered sums, see the module docstring (values here are of order 1)
    )


def test_backend_selection():
    logits, labels, _ = _inputs(1, 3, 2, 2, 4, 4)
    impl = _backend.select("upsample_cross_entropy", "triton", logits, labels, IGNORE, "mean", None, False)
    assert impl.backend == "triton"
    # int32 labels are accepted (converted to int64 by the entry point).
    _assert_fp32_close(_triton(logits, labels.int()), reference.upsample_cross_entropy(logits, labels))


def test_autocast_gives_an_fp32_loss_like_the_reference():
    # transformers' loss under autocast is fp32 (autocast runs cross-entropy in fp32); the drop-in must match.
    device_type = "cuda" if TRITON_DEVICE == "cuda" else "cpu"
    logits = torch.randn(2, 4, 3, 3, device=TRITON_DEVICE, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 4, (2, 12, 12), device=TRITON_DEVICE)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        ours = upsample_cross_entropy(logits, labels, backend="triton")
        expected = upsample_cross_entropy(logits, labels, backend="eager")
    assert ours.dtype == expected.dtype == torch.float32
    # The reference interpolates in bf16 before its fp32 cross-entropy; ours interpolates in fp32.
    torch.testing.assert_close(ours, expected, rtol=2e-2, atol=2e-2)
    ours.backward()
    assert logits.grad.dtype == torch.bfloat16
