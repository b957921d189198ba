"""Triton kernels of the fused bilinear-upsample + cross-entropy loss, and their host launchers.

The loss of ``F.cross_entropy(F.interpolate(logits, labels.shape[-2:], mode="bilinear"), labels)`` is computed
without ever building the (B, C, H, W) upsampled logits:

* forward: one program per block of output pixels. Each pixel gathers its 4 bilinear source positions for a
  chunk of classes at a time, keeps an online max / sum-of-exponentials over the classes, and picks its label's
  logit. It writes the per-pixel log-sum-exp (B, H, W) fp32, the only statistic kept for backward, the per-pixel
  loss when ``reduction="none"``, and one partial (loss, weight) sum per program. The partials are summed by
  ``torch.sum`` in a fixed order: the reduction is deterministic, no atomics.
* backward: gather form, each upsampled logit computed once per program. Along each axis the outputs fall
  into *cells*: cell k holds the outputs whose source coordinate (before PyTorch's clamp at 0) has floor k, for
  k = -1 .. n_in - 1 (cell -1: the clamped outputs at the border), contiguous and at most ~ceil(n_out / n_in)
  long (table: ``cell_starts``, corrected in the kernel with the device's own index rule). An output of cell k
  reads inputs max(k, 0) and min(max(k, 0) + 1, n_in - 1), so it adds only into input k ("own", weight l0 or
  l0 + l1 at the border) and input k + 1 ("next", l1). With the saved log-sum-exp the gradient of an upsampled
  logit, ``factor * (exp(z - lse) - onehot)``, needs no other class: classes are split freely.
  One program per (batch, BLOCK_I input rows, BLOCK_J column cells, BLOCK_C classes): it walks the row cells
  i_lo - 1 .. i_hi - 1 in order; per row cell it loads the 4 bilinear sources of every (class, column cell)
  once, then for each offset k inside the column cells and each output row y of the row cell forms
  ``dlogit * factor * row weight`` for a BLOCK_C x BLOCK_J tile (one pixel per cell) and sums it by row part;
  after the row cell the column weights split that into column parts. Input row i is complete once row cell i
  is done (its "own" part plus the "next" part of cell i - 1, carried over), and its column j_first + t is the
  "own" part of cell t plus the "next" part of cell t - 1 (a register ``tl.gather``): written once, in fp32
  until the store. Column programs overlap by one cell (lane 0 is the halo), row programs by one row cell.
  Fixed summation order, no atomics, no ``tl.dot``, no shared memory, no zero-fill pass.

The bilinear index rule is PyTorch's (``area_pixel_compute_source_index`` + ``guard_index_and_lambda``), in fp32,
size-based, and the interpolation sums in PyTorch's order: ``(x00*w0 + x01*w1)*h0 + (x10*w0 + x11*w1)*h1``.
fp16/bf16 logits are read and computed in fp32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from upernet_fast.kernels._bilinear import source_index, split_program_id
from upernet_fast.kernels._utils import axis_scale, checked_grid, interpreting



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
def _cell_of(d, scale, n_in, ALIGN_CORNERS: tl.constexpr):
    """Cell of output position(s) ``d``: floor of PyTorch's source coordinate *before* its clamp at 0 (so -1 for
    the outputs that the clamp sends to input 0 with weight 1), at most ``n_in - 1``. The expression is
    ``source_index``'s, so the compiler evaluates it the same way (``max(floor(s), 0) == floor(max(s, 0))``):
    ``i0 == max(cell, 0)`` and ``i1 == min(i0 + 1, n_in - 1)`` for every output of a cell."""
    d_f = d.to(tl.float32)
    if ALIGN_CORNERS:
        src = d_f * scale
    else:
        src = (d_f + 0.5) * scale - 0.5
    return tl.minimum(tl.floor(src).to(tl.int32), n_in - 1)


@triton.jit
def _cell_start(est_ptr, k, scale, n_in, n_out, ALIGN_CORNERS: tl.constexpr):
    """First output position whose cell is >= k (k in [-1, n_in]; int tensor or scalar), by this device's index
    rule: the host's estimate ``est_ptr[k + 1]`` (CPU fp32, unfused) corrected by one exact step each way (a
    fused multiply-add on the GPU moves a boundary by at most one position)."""
    d = tl.load(est_ptr + (k + 1))
    below = tl.maximum(d - 1, 0)
    d = tl.where((d > 0) & (_cell_of(below, scale, n_in, ALIGN_CORNERS) >= k), d - 1, d)
    here = tl.minimum(d, n_out - 1)
    d = tl.where((d < n_out) & (_cell_of(here, scale, n_in, ALIGN_CORNERS) < k), d + 1, d)
    return d


# stride_c is never specialised (to 1 for channels_last): a known unit class stride would make the compiler lay the
# tiles out with the classes across the lanes, each thread then doing the per-pixel work of several pixels.
@triton.jit(do_not_specialize=["stride_c"])
def _backward_kernel(
    grad_logits_ptr, logits_ptr, labels_ptr, weight_ptr, lse_ptr, grad_ptr, row_est_ptr, col_est_ptr,
    num_classes, in_h, in_w, out_h, out_w,
    stride_b, stride_c, stride_h, stride_w,
    scale_h, scale_w, ignore_index,
    row_blocks, col_blocks, class_blocks,
    PER_PIXEL_GRAD: tl.constexpr, HAS_WEIGHT: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # Program: (batch b, input rows [i_lo, i_hi), cells j_first .. j_first + BLOCK_J - 1, class block); class
    # blocks vary fastest, so the programs that read the same labels run side by side.
    cb, jb, ib, b = split_program_id(tl.program_id(0), class_blocks, col_blocks, row_blocks)
    cls = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cls_mask = cls < num_classes
    coff = cls.to(tl.int64)[:, None] * stride_c + b.to(tl.int64) * stride_b

    # Column cells: lane t holds cell j = j_first + t, the outputs x in [x_start, x_end) with q0(x) = max(j, 0).
    # Its outputs add to input column j (weight "own") and j + 1 (weight "next"): the program owns columns
    # j_first + 1 .. j_first + BLOCK_J - 1 (lane 0 is the halo cell, read only for its "next" part).
    t = tl.arange(0, BLOCK_J)
    j = jb * (BLOCK_J - 1) - 1 + t
    cell_ok = j < in_w
    jj = tl.minimum(j, in_w)
    x_start = _cell_start(col_est_ptr, jj, scale_w, in_w, out_w, ALIGN_CORNERS)
    x_end = _cell_start(col_est_ptr, tl.minimum(jj + 1, in_w), scale_w, in_w, out_w, ALIGN_CORNERS)
    x_count = tl.where(cell_ok, x_end - x_start, 0)
    k_count = tl.max(x_count, axis=0)
    q0 = tl.minimum(tl.maximum(j, 0), in_w - 1)
    q1 = tl.minimum(q0 + 1, in_w - 1)
    col0 = q0.to(tl.int64)[None, :] * stride_w
    col1 = q1.to(tl.int64)[None, :] * stride_w
    tile_mask = cls_mask[:, None] & cell_ok[None, :]
    if not PER_PIXEL_GRAD:
        grad_scalar = tl.load(grad_ptr)
    owned = cls_mask[:, None] & ((t >= 1) & cell_ok)[None, :]
    shift = tl.zeros([BLOCK_C, BLOCK_J], tl.int32) + tl.maximum(t - 1, 0)[None, :]

    i_lo = ib * BLOCK_I
    i_hi = tl.minimum(i_lo + BLOCK_I, in_h)
    # Sums of the current row cell by (row part, column part); the "own row" sums start from the "next row" sums
    # of the cell above, which belong to the same input row.
    acc_next_own = tl.zeros([BLOCK_C, BLOCK_J], tl.float32)
    acc_next_next = tl.zeros([BLOCK_C, BLOCK_J], tl.float32)
    y_end = _cell_start(row_est_ptr, i_lo - 1, scale_h, in_h, out_h, ALIGN_CORNERS)
    # Row cells i_lo - 1 .. i_hi - 1: cell i's outputs y add to input row i ("own") and i + 1 ("next").
    for di in range(0, i_hi - i_lo + 1):
        i = i_lo - 1 + di  # a tensor (the interpreter's loop variables are Python ints)
        y_start = y_end
        y_end = _cell_start(row_est_ptr, i + 1, scale_h, in_h, out_h, ALIGN_CORNERS)
        r0 = tl.minimum(tl.maximum(i, 0), in_h - 1)
        r1 = tl.minimum(r0 + 1, in_h - 1)
        row0 = logits_ptr + coff + r0.to(tl.int64) * stride_h
        row1 = logits_ptr + coff + r1.to(tl.int64) * stride_h
        x00 = tl.load(row0 + col0, mask=tile_mask, other=0.0).to(tl.float32)
        x01 = tl.load(row0 + col1, mask=tile_mask, other=0.0).to(tl.float32)
        x10 = tl.load(row1 + col0, mask=tile_mask, other=0.0).to(tl.float32)
        x11 = tl.load(row1 + col1, mask=tile_mask, other=0.0).to(tl.float32)
        acc_own_own = acc_next_own
        acc_own_next = acc_next_next
        acc_next_own = tl.zeros([BLOCK_C, BLOCK_J], tl.float32)
        acc_next_next = tl.zeros([BLOCK_C, BLOCK_J], tl.float32)
        for k in range(0, k_count):
            x_mask = k < x_count
            x = tl.minimum(x_start + k, out_w - 1)
            c0, c1, w0, w1 = source_index(x, scale_w, in_w, ALIGN_CORNERS)
            col_own = tl.where(c0 == j, w0, 0.0) + tl.where(c1 == j, w1, 0.0)
            col_next = tl.where(c0 == j + 1, w0, 0.0) + tl.where(c1 == j + 1, w1, 0.0)
            # PyTorch's interpolation order: (x00*w0 + x01*w1)*h0 + (x10*w0 + x11*w1)*h1.
            top = x00 * w0[None, :] + x01 * w1[None, :]
            bottom = x10 * w0[None, :] + x11 * w1[None, :]
            sum_own = tl.zeros([BLOCK_C, BLOCK_J], tl.float32)
            sum_next = tl.zeros([BLOCK_C, BLOCK_J], tl.float32)
            for dy in range(0, y_end - y_start):
                y = y_start + dy
                s0, s1, h0, h1 = source_index(y, scale_h, in_h, ALIGN_CORNERS)
                row_own = tl.where(s0 == i, h0, 0.0) + tl.where(s1 == i, h1, 0.0)
                row_next = tl.where(s0 == i + 1, h0, 0.0) + tl.where(s1 == i + 1, h1, 0.0)
                pix = (b * out_h + y) * out_w + x
                label = tl.load(labels_ptr + pix, mask=x_mask, other=ignore_index)
                valid = x_mask & (label != ignore_index) & (label >= 0) & (label < num_classes)
                lse = tl.load(lse_ptr + pix, mask=x_mask, other=0.0)
                if PER_PIXEL_GRAD:
                    factor = tl.load(grad_ptr + pix, mask=x_mask, other=0.0).to(tl.float32)
                else:
                    factor = tl.zeros([BLOCK_J], tl.float32) + grad_scalar
                # Select before scaling: with every pixel ignored, "mean" divides by 0 and factor is inf.
                factor = tl.where(valid, factor, 0.0)
                if HAS_WEIGHT:
                    factor = factor * tl.load(weight_ptr + label, mask=valid, other=0.0).to(tl.float32)
                target = tl.where(valid, label, -1).to(tl.int32)
                prob = tl.exp((top * h0 + bottom * h1) - lse[None, :])
                dlogit = prob - tl.where(cls[:, None] == target[None, :], 1.0, 0.0)
                # The select keeps an inf logit of an ignored pixel from making 0 * inf.
                dlogit = tl.where(valid[None, :], dlogit, 0.0)
                sum_own += dlogit * (factor * row_own)[None, :]
                sum_next += dlogit * (factor * row_next)[None, :]
            acc_own_own += sum_own * col_own[None, :]
            acc_own_next += sum_own * col_next[None, :]
            acc_next_own += sum_next * col_own[None, :]
            acc_next_next += sum_next * col_next[None, :]
        # Input row i is complete; its column j_first + t: the "own column" sum of cell t plus the "next column"
        # sum of cell t - 1.
        grad = acc_own_own + tl.gather(acc_own_next, shift, axis=1)
        out_off = ((b * num_classes + cls[:, None]).to(tl.int64) * in_h + i) * in_w + j[None, :]
        if i >= i_lo:  # row cell i_lo - 1 only hands its "next row" part down
            tl.store(grad_logits_ptr + out_off, grad.to(grad_logits_ptr.dtype.element_ty), mask=owned)


# ------------------------------------------------------------------------------------------------ host side


def _scale(n_in: int, n_out: int, align_corners: bool) -> float:
    if align_corners:
        # A Python float rounds to the same fp32 as PyTorch's fp32 division (53 >= 2*24 + 2 bits).
        return (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    return axis_scale(n_in, n_out)


def source_cells(n_in: int, n_out: int, align_corners: bool) -> torch.Tensor:
    """Cell of every output position along one axis (int64, on CPU): the floor of PyTorch's fp32 source
    coordinate before its clamp at 0 (-1 for the outputs the clamp sends to input 0), at most ``n_in - 1``.
    Output ``d`` reads inputs ``i0 = max(cell, 0)`` and ``i1 = min(i0 + 1, n_in - 1)``. Non-decreasing in ``d``."""
    scale = torch.tensor(_scale(n_in, n_out, align_corners), dtype=torch.float32)
    dst = torch.arange(n_out, dtype=torch.float32)
    src = dst * scale if align_corners else (dst + 0.5) * scale - 0.5
    return src.floor().long().clamp_max(n_in - 1)


@functools.lru_cache(maxsize=256)
def _cell_starts_cpu(n_in: int, n_out: int, align_corners: bool) -> torch.Tensor:
    # Entry k + 1 for k in [-1, n_in]: the first output whose cell is >= k (CPU fp32, no fused multiply-add).
    cells = source_cells(n_in, n_out, align_corners)
    return torch.searchsorted(cells, torch.arange(-1, n_in + 1), right=False).to(torch.int32)


@functools.lru_cache(maxsize=256)
def _cell_starts_on(n_in: int, n_out: int, align_corners: bool, device: torch.device) -> torch.Tensor:
    return _cell_starts_cpu(n_in, n_out, align_corners).to(device)


def cell_starts(n_in: int, n_out: int, align_corners: bool, device="cpu") -> torch.Tensor:
    """(n_in + 2,) int32 on ``device``: entry ``k + 1`` is the first output position whose cell (see
    :func:`source_cells`) is >= k, for k in [-1, n_in]; cell k is the outputs [entry k + 1, entry k + 2).

    The backward kernel corrects each entry by one position with its own device's index rule (a GPU fuses the
    multiply-add of the source coordinate). Cached per (sizes, align_corners, device): no device sync per call.
    """
    return _cell_starts_on(n_in, n_out, align_corners, torch.device(device))


def _forward_blocks(num_classes: int) -> tuple[int, int, int]:
    if interpreting():
        # Large pixel blocks (the interpreter pays per program), but at most 64 classes per chunk so that
        # the tests' 150-class case runs the multi-chunk online log-sum-exp the GPU runs.
        return 256, min(triton.next_power_of_2(num_classes), 64), 1
    return 64, min(triton.next_power_of_2(num_classes), 32), 4


def _backward_blocks(batch: int, num_classes: int, in_h: int, in_w: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_J, BLOCK_I, num_warps) of the backward: classes per program, column cells per program
    (the program owns BLOCK_J - 1 input columns, lane 0 is the halo cell), input rows per program."""
    p2 = triton.next_power_of_2
    if interpreting():
        # At most 64 classes, 16 cells and 4 rows: the tests' shapes then run several class blocks (150
        # classes), column blocks and row blocks, as the GPU does on real maps.
        return max(min(p2(num_classes), 64), 2), 16, 4, 1
    block_c = min(p2(num_classes), 32)
    # The fewest cells computed in all: the column programs overlap by one cell.
    block_j = min((8, 16, 32), key=lambda n: (triton.cdiv(in_w, n - 1) * n, -n))
    column_programs = batch * triton.cdiv(in_w, block_j - 1) * triton.cdiv(num_classes, block_c)
    # Up to 16 rows per program (each program reads one extra row cell above its rows), fewer while that
    # leaves the GPU fewer than ~2048 programs.
    block_i = 16
    while block_i > 2 and column_programs * triton.cdiv(in_h, block_i) < 2048:
        block_i //= 2
    # About 4 tile elements per thread (each thread's pixel work is shared by its elements' classes).
    num_warps = max(1, min(4, block_c * block_j // 128))
    return block_c, block_j, block_i, num_warps


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
    row_est = cell_starts(in_h, out_h, align_corners, device)
    col_est = cell_starts(in_w, out_w, align_corners, device)
    block_c, block_j, block_i, num_warps = _backward_blocks(batch, num_classes, in_h, in_w)
    row_blocks = triton.cdiv(in_h, block_i)
    col_blocks = triton.cdiv(in_w, block_j - 1)
    class_blocks = triton.cdiv(num_classes, block_c)
    grid = (checked_grid(batch * row_blocks * col_blocks * class_blocks, "upsample_cross_entropy backward"),)
    _backward_kernel[grid](
        grad_logits, logits, labels, weight if weight is not None else lse, lse, grad, row_est, col_est,
        num_classes, in_h, in_w, out_h, out_w,
        *logits.stride(),
        _scale(in_h, out_h, align_corners), _scale(in_w, out_w, align_corners), ignore_index,
        row_blocks, col_blocks, class_blocks,
        PER_PIXEL_GRAD=per_pixel, HAS_WEIGHT=weight is not None, ALIGN_CORNERS=bool(align_corners),
        BLOCK_C=block_c, BLOCK_J=block_j, BLOCK_I=block_i, num_warps=num_warps,
    )
    return grad_logits
