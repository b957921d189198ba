"""Triton kernels of the fused bilinear-upsample + cross-entropy loss, and their host launchers.

The loss of ``F.cross_entropy(F.interpolate(logits, labels.shape[-2:], mode="bilinear"), labels)`` is computed
without ever building the (B, C, H, W) upsampled logits:

* forward: one program per block of output pixels. Each pixel gathers its 4 bilinear source positions for a
  chunk of classes at a time, keeps an online max / sum-of-exponentials over the classes, and picks its label's
  logit. It writes the per-pixel log-sum-exp (B, H, W) fp32, the only statistic kept for backward, the per-pixel
  loss when ``reduction="none"``, and one partial (loss, weight) sum per program. The partials are summed by
  ``torch.sum`` in a fixed order: the reduction is deterministic, no atomics.
* backward: gather form. One program per (batch, low-res row i, block of low-res columns, block of classes).
  A low-res element (i, j) is read only by the output rows whose source row ``i0`` is ``i - 1`` or ``i`` (a
  contiguous range, precomputed per axis on the host, see ``reader_ranges``), and likewise for columns. The
  program walks the (output row, output column) pairs of its ranges as one flat list, BLOCK_X pixels at a time;
  for each pixel it recomputes the upsampled logits and the softmax from the saved log-sum-exp and forms
  ``row weight * upstream factor * (softmax - onehot)`` (BLOCK_C x BLOCK_X). A small fp32 ``tl.dot`` with the
  pixels' column weights (BLOCK_X x BLOCK_J, at most two non-zeros per pixel) sums them into the low-res
  columns. Each low-res gradient element is written once: deterministic, no atomics, no zero-fill pass.

The bilinear index rule is PyTorch's (``area_pixel_compute_source_index`` + ``guard_index_and_lambda``), in fp32,
size-based, and the interpolation sums in PyTorch's order: ``(x00*w0 + x01*w1)*h0 + (x10*w0 + x11*w1)*h1``.
fp16/bf16 logits are read and computed in fp32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from upernet_fast.kernels._bilinear import source_index
from upernet_fast.kernels._utils import axis_scale, interpreting



@triton.jit
def _forward_kernel(
    logits_ptr, labels_ptr, weight_ptr, loss_ptr, lse_ptr, partials_ptr,
    num_classes, in_h, in_w, out_h, out_w, num_pixels, num_programs,
    stride_b, stride_c, stride_h, stride_w,
    scale_h, scale_w, ignore_index,
    HAS_WEIGHT: tl.constexpr, WRITE_LOSS: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    pix = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_mask = pix < num_pixels
    x = pix % out_w
    rest = pix // out_w
    y = rest % out_h
    b = rest // out_h
    i0, i1, h0, h1 = source_index(y, scale_h, in_h, ALIGN_CORNERS)
    j0, j1, w0, w1 = source_index(x, scale_w, in_w, ALIGN_CORNERS)
    base = b.to(tl.int64) * stride_b
    off00 = base + i0.to(tl.int64) * stride_h + j0.to(tl.int64) * stride_w
    off01 = base + i0.to(tl.int64) * stride_h + j1.to(tl.int64) * stride_w
    off10 = base + i1.to(tl.int64) * stride_h + j0.to(tl.int64) * stride_w
    off11 = base + i1.to(tl.int64) * stride_h + j1.to(tl.int64) * stride_w

    label = tl.load(labels_ptr + pix, mask=pix_mask, other=ignore_index)
    # Out-of-range labels are refused by the entry point; masking them here keeps every read in bounds anyway.
    valid = pix_mask & (label != ignore_index) & (label >= 0) & (label < num_classes)

    run_max = tl.full([BLOCK_P], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_P], tl.float32)
    picked = tl.zeros([BLOCK_P], tl.float32)
    for c_start in range(0, num_classes, BLOCK_C):
        cls = c_start + tl.arange(0, BLOCK_C)
        cls_mask = cls < num_classes
        mask = cls_mask[:, None] & pix_mask[None, :]
        coff = cls.to(tl.int64)[:, None] * stride_c
        v00 = tl.load(logits_ptr + coff + off00[None, :], mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(logits_ptr + coff + off01[None, :], mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(logits_ptr + coff + off10[None, :], mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(logits_ptr + coff + off11[None, :], mask=mask, other=0.0).to(tl.float32)
        val = (v00 * w0[None, :] + v01 * w1[None, :]) * h0[None, :] + (v10 * w0[None, :] + v11 * w1[None, :]) * h1[None, :]
        # Only absent classes are -inf; absent pixels read 0, so no column is all -inf (no inf - inf NaN).
        val = tl.where(cls_mask[:, None], val, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(val, axis=0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(val - new_max[None, :]), axis=0)
        run_max = new_max
        # cls_mask: an ignore_index inside the padded class block must not pick a padded -inf.
        is_label = cls_mask[:, None] & (cls[:, None] == label[None, :])
        picked += tl.sum(tl.where(is_label, val, 0.0), axis=0)

    log_sum = tl.log(run_sum)
    lse = run_max + log_sum
    # log_softmax(label) = (x_label - max) - log(sum): the same grouping as PyTorch's log_softmax.
    nll = -((picked - run_max) - log_sum)
    if HAS_WEIGHT:
        class_weight = tl.load(weight_ptr + label, mask=valid, other=0.0).to(tl.float32)
        nll = nll * class_weight
    else:
        class_weight = tl.full([BLOCK_P], 1.0, tl.float32)
    nll = tl.where(valid, nll, 0.0)
    class_weight = tl.where(valid, class_weight, 0.0)
    tl.store(lse_ptr + pix, lse, mask=pix_mask)
    if WRITE_LOSS:
        tl.store(loss_ptr + pix, nll.to(loss_ptr.dtype.element_ty), mask=pix_mask)
    tl.store(partials_ptr + pid, tl.sum(nll, axis=0))
    tl.store(partials_ptr + num_programs + pid, tl.sum(class_weight, axis=0))


@triton.jit
def _backward_kernel(
    grad_logits_ptr, logits_ptr, labels_ptr, weight_ptr, lse_ptr, grad_ptr,
    row_start_ptr, row_end_ptr, col_start_ptr, col_end_ptr,
    num_classes, in_h, in_w, out_h, out_w,
    stride_b, stride_c, stride_h, stride_w,
    scale_h, scale_w, ignore_index,
    PER_PIXEL_GRAD: tl.constexpr, HAS_WEIGHT: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_X: tl.constexpr,
):
    pid_row = tl.program_id(0)
    b = pid_row // in_h
    i = pid_row % in_h
    j_first = tl.program_id(1) * BLOCK_J
    cols = j_first + tl.arange(0, BLOCK_J)
    col_mask = cols < in_w
    cls = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cls_mask = cls < num_classes
    coff = cls.to(tl.int64)[:, None] * stride_c
    base = b.to(tl.int64) * stride_b

    # Output rows that may read low-res row i, and output columns that may read any column of this block.
    # Their (row, column) pairs are walked as one flat list, BLOCK_X pixels at a time: no per-row padding.
    y_start = tl.load(row_start_ptr + i)
    span_y = tl.load(row_end_ptr + i) - y_start
    x_start = tl.load(col_start_ptr + j_first)
    span_x = tl.load(col_end_ptr + tl.minimum(j_first + BLOCK_J, in_w) - 1) - x_start
    num_pairs = span_y * span_x
    span_x = tl.maximum(span_x, 1)  # a divisor; num_pairs is already 0 when the span is empty
    if not PER_PIXEL_GRAD:
        grad_scalar = tl.load(grad_ptr)

    acc = tl.zeros([BLOCK_C, BLOCK_J], tl.float32)
    for k_start in range(0, num_pairs, BLOCK_X):
        k = k_start + tl.arange(0, BLOCK_X)
        k_mask = k < num_pairs
        y = y_start + k // span_x
        x = x_start + k % span_x
        r0, r1, h0, h1 = source_index(y, scale_h, in_h, ALIGN_CORNERS)
        q0, q1, w0, w1 = source_index(x, scale_w, in_w, ALIGN_CORNERS)
        # Weight of low-res row i in output row y; both terms apply when r0 == r1 == i at the border.
        weight_y = tl.where(r0 == i, h0, 0.0) + tl.where(r1 == i, h1, 0.0)
        pix = (b * out_h + y) * out_w + x
        label = tl.load(labels_ptr + pix, mask=k_mask, other=ignore_index)
        valid = k_mask & (label != ignore_index) & (label >= 0) & (label < num_classes)
        lse = tl.load(lse_ptr + pix, mask=k_mask, other=0.0)
        if PER_PIXEL_GRAD:
            factor = tl.load(grad_ptr + pix, mask=k_mask, other=0.0).to(tl.float32)
        else:
            factor = tl.zeros([BLOCK_X], tl.float32) + grad_scalar
        # Select before scaling: with every pixel ignored, "mean" divides by 0 and factor is inf.
        factor = tl.where(valid, factor, 0.0)
        if HAS_WEIGHT:
            factor = factor * tl.load(weight_ptr + label, mask=valid, other=0.0).to(tl.float32)
        coef = factor * weight_y

        mask = cls_mask[:, None] & k_mask[None, :]
        row_off0 = base + r0.to(tl.int64) * stride_h
        row_off1 = base + r1.to(tl.int64) * stride_h
        col_off0 = q0.to(tl.int64) * stride_w
        col_off1 = q1.to(tl.int64) * stride_w
        v00 = tl.load(logits_ptr + coff + (row_off0 + col_off0)[None, :], mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(logits_ptr + coff + (row_off0 + col_off1)[None, :], mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(logits_ptr + coff + (row_off1 + col_off0)[None, :], mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(logits_ptr + coff + (row_off1 + col_off1)[None, :], mask=mask, other=0.0).to(tl.float32)
        val = (v00 * w0[None, :] + v01 * w1[None, :]) * h0[None, :] + (v10 * w0[None, :] + v11 * w1[None, :]) * h1[None, :]
        prob = tl.exp(val - lse[None, :])
        dlogit = prob - tl.where(cls[:, None] == label[None, :], 1.0, 0.0)
        # coef is already 0 off the valid pixels; the select also keeps an inf logit there from making 0 * inf.
        scaled = tl.where(valid[None, :], dlogit * coef[None, :], 0.0)
        # Column weights, (BLOCK_X, BLOCK_J): at most two non-zeros per pixel. The product sums the pixels of
        # each low-res column; "ieee" keeps fp32 accuracy (no TF32).
        weight_x = tl.where(k_mask[:, None] & (q0[:, None] == cols[None, :]), w0[:, None], 0.0)
        weight_x += tl.where(k_mask[:, None] & (q1[:, None] == cols[None, :]), w1[:, None], 0.0)
        acc += tl.dot(scaled, weight_x, input_precision="ieee")

    out_off = ((b * num_classes + cls[:, None]).to(tl.int64) * in_h + i) * in_w + cols[None, :]
    out_mask = cls_mask[:, None] & col_mask[None, :]
    tl.store(grad_logits_ptr + out_off, acc.to(grad_logits_ptr.dtype.element_ty), mask=out_mask)


# ------------------------------------------------------------------------------------------------ host side


def _scale(n_in: int, n_out: int, align_corners: bool) -> float:
    if align_corners:
        # A Python float rounds to the same fp32 as PyTorch's fp32 division (53 >= 2*24 + 2 bits).
        return (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    return axis_scale(n_in, n_out)


def source_rows(n_in: int, n_out: int, align_corners: bool) -> torch.Tensor:
    """Source index ``i0`` of every output position along one axis, fp32 like the kernels (int64, on CPU)."""
    scale = torch.tensor(_scale(n_in, n_out, align_corners), dtype=torch.float32)
    dst = torch.arange(n_out, dtype=torch.float32)
    src = dst * scale if align_corners else ((dst + 0.5) * scale - 0.5).clamp_min(0.0)
    return src.floor().long().clamp_max(n_in - 1)


@functools.lru_cache(maxsize=256)
def _reader_ranges_cpu(n_in: int, n_out: int, align_corners: bool) -> tuple[torch.Tensor, torch.Tensor]:
    i0 = source_rows(n_in, n_out, align_corners)  # non-decreasing in the output position
    rows = torch.arange(n_in)
    # Input row i is read by the outputs whose i0 is i - 1 (as their i1) or i (as their i0). One extra
    # position each side absorbs any last-bit disagreement between this fp32 computation and the kernel's
    # (e.g. FMA contraction); the kernel recomputes the indices and gives non-readers weight 0.
    start = (torch.searchsorted(i0, rows - 1, right=False) - 1).clamp(0, n_out)
    end = (torch.searchsorted(i0, rows, right=True) + 1).clamp(0, n_out)
    end = torch.maximum(end, start)
    return start.to(torch.int32), end.to(torch.int32)


@functools.lru_cache(maxsize=256)
def _reader_ranges_on(n_in: int, n_out: int, align_corners: bool, device: torch.device):
    start, end = _reader_ranges_cpu(n_in, n_out, align_corners)
    return start.to(device), end.to(device)


def reader_ranges(n_in: int, n_out: int, align_corners: bool, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per input position i (int32, on ``device``): the output positions [start[i], end[i]) that may read it.

    Both bounds are non-decreasing in i. Cached per (sizes, align_corners, device): no device sync per call.
    """
    return _reader_ranges_on(n_in, n_out, align_corners, torch.device(device))


def _max_pairs(in_h: int, out_h: int, in_w: int, out_w: int, align_corners: bool, block_j: int) -> int:
    """Largest number of (output row, output column) pairs one backward program walks."""
    row_start, row_end = _reader_ranges_cpu(in_h, out_h, align_corners)
    col_start, col_end = _reader_ranges_cpu(in_w, out_w, align_corners)
    lasts = col_end[torch.clamp(torch.arange(0, in_w, block_j) + block_j, max=in_w) - 1]
    return int((row_end - row_start).max()) * int((lasts - col_start[::block_j]).max())


def _forward_blocks(num_classes: int) -> tuple[int, int, int]:
    if interpreting():
        # Large pixel blocks (the interpreter pays per program), but at most 64 classes per chunk so that
        # the tests' 150-class case runs the multi-chunk online log-sum-exp the GPU runs.
        return 256, min(triton.next_power_of_2(num_classes), 64), 1
    return 64, min(triton.next_power_of_2(num_classes), 32), 4


def _backward_blocks(num_classes: int, in_h: int, out_h: int, in_w: int, out_w: int, align_corners: bool):
    """(BLOCK_J, BLOCK_C, BLOCK_X, num_warps); tl.dot needs every block >= 16."""
    if interpreting():
        # Bigger pixel chunks (the interpreter pays per loop step), the GPU's column block, and at most 64
        # classes: the tests then run several class blocks, column blocks and pixel chunks, as the GPU does.
        block_j, block_c, max_x = 16, max(min(triton.next_power_of_2(num_classes), 64), 16), 512
    else:
        block_j, block_c, max_x = 16, 16, 128
    pairs = _max_pairs(in_h, out_h, in_w, out_w, align_corners, block_j)
    block_x = max(min(triton.next_power_of_2(max(pairs, 1)), max_x), 16)
    return block_j, block_c, block_x, (1 if interpreting() else 4)


def forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    align_corners: bool,
    *,
    loss_out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(loss, lse, denominator)``.

    logits (B, C, h, w) any strides; labels (B, H, W) integer. loss: (B, H, W) for ``"none"`` else 0-dim, in
    logits' dtype. lse: (B, H, W) fp32 log-sum-exp of each pixel's upsampled logits. denominator: 0-dim fp32 the
    loss sum was divided by (weight sum of non-ignored pixels for ``"mean"``, B*H*W for ``"mean_all"``, else 1).
    ``loss_out`` / ``lse_out``: optional preallocated contiguous outputs (tests poison them with NaN).
    """
    batch, num_classes, in_h, in_w = logits.shape
    _, out_h, out_w = labels.shape
    num_pixels = batch * out_h * out_w
    labels = labels.contiguous()
    device = logits.device
    lse = lse_out if lse_out is not None else torch.empty((batch, out_h, out_w), device=device, dtype=torch.float32)
    write_loss = reduction == "none"
    if write_loss:
        loss = loss_out if loss_out is not None else torch.empty((batch, out_h, out_w), device=device, dtype=logits.dtype)
    block_p, block_c, num_warps = _forward_blocks(num_classes)
    num_programs = triton.cdiv(num_pixels, block_p)
    partials = torch.empty((2, num_programs), device=device, dtype=torch.float32)
    if weight is not None:
        weight = weight.contiguous()
    _forward_kernel[(num_programs,)](
        logits, labels, weight if weight is not None else lse, loss if write_loss else lse, lse, partials,
        num_classes, in_h, in_w, out_h, out_w, num_pixels, num_programs,
        *logits.stride(),
        _scale(in_h, out_h, align_corners), _scale(in_w, out_w, align_corners), ignore_index,
        HAS_WEIGHT=weight is not None, WRITE_LOSS=write_loss, ALIGN_CORNERS=bool(align_corners),
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps,
    )
    # torch.sum over a fixed-size buffer reduces in a fixed order: the result is deterministic.
    total = partials[0].sum()
    if reduction == "mean":
        denominator = partials[1].sum()
    elif reduction == "mean_all":
        denominator = torch.full((), float(num_pixels), device=device, dtype=torch.float32)
    else:
        denominator = torch.ones((), device=device, dtype=torch.float32)
    if not write_loss:
        loss = (total / denominator if reduction in ("mean", "mean_all") else total).to(logits.dtype)
    return loss, lse, denominator


def backward(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    denominator: torch.Tensor,
    ignore_index: int,
    align_corners: bool,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the loss w.r.t. ``logits``: a contiguous (B, C, h, w) tensor in logits' dtype.

    grad_loss: (B, H, W) for ``reduction="none"`` (used per pixel), else 0-dim (divided by ``denominator``).
    ``out``: optional preallocated contiguous output (every element is written).
    """
    batch, num_classes, in_h, in_w = logits.shape
    _, out_h, out_w = labels.shape
    device = logits.device
    labels = labels.contiguous()
    lse = lse.contiguous()
    per_pixel = grad_loss.dim() == 3
    if per_pixel:
        grad = grad_loss.contiguous()
    else:
        grad = (grad_loss.to(torch.float32) / denominator).reshape(1)
    if weight is not None:
        weight = weight.contiguous()
    grad_logits = out if out is not None else torch.empty((batch, num_classes, in_h, in_w), device=device, dtype=logits.dtype)
    row_start, row_end = reader_ranges(in_h, out_h, align_corners, device)
    col_start, col_end = reader_ranges(in_w, out_w, align_corners, device)
    block_j, block_c, block_x, num_warps = _backward_blocks(num_classes, in_h, out_h, in_w, out_w, align_corners)
    grid = (batch * in_h, triton.cdiv(in_w, block_j), triton.cdiv(num_classes, block_c))
    _backward_kernel[grid](
        grad_logits, logits, labels, weight if weight is not None else lse, lse, grad,
        row_start, row_end, col_start, col_end,
        num_classes, in_h, in_w, out_h, out_w,
        *logits.stride(),
        _scale(in_h, out_h, align_corners), _scale(in_w, out_w, align_corners), ignore_index,
        PER_PIXEL_GRAD=per_pixel, HAS_WEIGHT=weight is not None, ALIGN_CORNERS=bool(align_corners),
        BLOCK_J=block_j, BLOCK_C=block_c, BLOCK_X=block_x, num_warps=num_warps,
    )
    return grad_logits
