"""The eager references themselves: float64 gradcheck on tiny shapes, and the semantics they promise."""

import pytest
import torch
import torch.nn.functional as F

from upernet_fast import reference


def f64(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize(
    "shape, scales",
    [
        ((1, 2, 5, 7), (1, 2, 3, 6)),  # 5x7: non-divisible bins overlap; scale 6 > 5 rows repeats pixels
        ((2, 1, 4, 4), (3,)),  # 4 -> 3: overlapping bins
        ((1, 1, 1, 1), (1, 2)),  # 1x1 map pooled to 2x2: windows repeat the pixel
    ],
)
def test_gradcheck_adaptive_avg_pool_multi(shape, scales):
    x = f64(*shape)
    assert torch.autograd.gradcheck(lambda t: reference.adaptive_avg_pool_multi(t, scales), (x,))


@pytest.mark.parametrize("low, high", [((3, 2), (7, 5)), ((7, 5), (13, 11)), ((4, 4), (3, 2)), ((1, 1), (2, 3))])
def test_gradcheck_upsample_add(low, high):
    assert torch.autograd.gradcheck(reference.upsample_add, (f64(1, 2, *low), f64(1, 2, *high, seed=1)))


def test_gradcheck_upsample_concat():
    parts = (f64(1, 2, 5, 4), f64(1, 3, 2, 3, seed=1), f64(1, 1, 1, 1, seed=2))
    assert torch.autograd.gradcheck(lambda *t: reference.upsample_concat(t, (5, 4)), parts)


@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
def test_gradcheck_upsample_cross_entropy(reduction):
    logits = f64(2, 3, 3, 2)
    labels = torch.tensor([[[0, 1, 2, 255, 1], [2, 2, 0, 1, 255]], [[1, 0, 255, 2, 2], [0, 0, 1, 1, 2]]])
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    fn = lambda t: reference.upsample_cross_entropy(t, labels, 255, reduction, weight)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))


def test_gradcheck_conv_bn_relu_train_mode():
    conv = torch.nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    bn = torch.nn.BatchNorm2d(3).double()
    # Shift away from ReLU's kink so finite differences do not straddle it.
    x = f64(2, 2, 4, 3)
    assert torch.autograd.gradcheck(lambda t: reference.conv_bn_relu(t, conv, bn) + 0.0, (x,), atol=1e-6)


def test_upsample_concat_keeps_same_size_maps_and_resizes_others():
    a, b = torch.randn(2, 3, 6, 5), torch.randn(2, 4, 3, 2)
    out = reference.upsample_concat([a, b], (6, 5))
    assert torch.equal(out[:, :3], a)
    assert torch.equal(out[:, 3:], F.interpolate(b, size=(6, 5), mode="bilinear", align_corners=False))


def test_mean_all_is_sum_over_every_pixel():
    logits = torch.randn(2, 4, 3, 3)
    labels = torch.randint(0, 4, (2, 12, 12))
    labels[0, :5] = 255
    total = reference.upsample_cross_entropy(logits, labels, reduction="sum")
    assert torch.allclose(reference.upsample_cross_entropy(logits, labels, reduction="mean_all"), total / labels.numel())
    valid = (labels != 255).sum()
    assert torch.allclose(reference.upsample_cross_entropy(logits, labels, reduction="mean"), total / valid)


def test_all_pixels_ignored_gives_what_cross_entropy_gives():
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.full((1, 4, 4), 255)
    assert torch.isnan(reference.upsample_cross_entropy(logits, labels, reduction="mean"))
    assert reference.upsample_cross_entropy(logits, labels, reduction="sum").item() == 0.0
