// Low-resolution sources of the fused upsample-concat + Winograd conv (winograd_conv_bn_relu.cpp).
//
// For a source p upsampled to the output size (bilinear, align_corners=False), the 3x3 convolution of its
// channels commutes with the upsampling, which is linear per channel:
//
//   conv3x3(up(p))[co, y, x] = sum over taps (dy, dx) of up(q_tap)[co, y + dy, x + dx]  (taps outside the
//                              output map skipped: the zero padding),   q_tap = W[:, p's channels, tap] @ p
//
// so the channel mixing runs at the low resolution, one matrix product (B h w x C_p) @ (C_p x 9 C_out), and
// only the upsampling of 9 maps and their shifted sum remain at the output resolution, added to the Winograd
// output before bias and ReLU. Why: the 3x3 products of those channels cost 9 h w instead of Winograd's
// 2.25 H W per (C_in, C_out) pair, 4x fewer for a 4x upsampling, 16x for 8x (the PPM's branches: 16x to
// 256x); the Python side (lowres_first in upernet_fast/ops/winograd_conv_bn_relu.py) only sends a source
// here when 9 h w < 2.25 H W. Exact in real arithmetic; in float32 the sums are ordered differently from
// the convolution of the concat, so this path is judged against a float64 reference, not bitwise.
//
// Channels_last only: q is laid out (B, h, w, 9, C_out), every pass vectorised over output channels as the
// channels_last output transform is.
#pragma once

#include "bilinear.h"

#include <ATen/Parallel.h>
#include <ATen/ops/mm.h>

namespace upernet_fast_cpp {

// A source's contribution, computed in two separable passes (bilinear weights of an output row do not depend on
// the column tap, nor those of a column on the row tap):
//   sums[b, dy, r, x] = sum over dx of up_x(q[dy, dx])[r, x + dx]     (low-resolution rows r, output columns x)
//   contribution[y, x] = sum over dy of up_y(sums[b, dy])[y + dy, x]    (in the output transform)
// with taps outside the output map skipped. Why: gathering the 9 upsampled maps straight from q took 4 loads
// per tap and output pixel, 36 per pixel and source, which measured ~230 ms of the FPN bottleneck's ~830 ms;
// the column pass runs on the h low-resolution rows only, and the row pass takes 6 loads per pixel.
// q[b, r, col, tap, co] = (B h w, C_p) @ (C_p, 9 C_out), the weight slice (a dense block of rows) read in
// place. Few rows (the PPM's branches: 1 to 36 pixels per image) go through the small kernel below, many (the
// FPN's levels) through at::mm (MKL). Why: MKL splits small products by thread count, and gave different bits
// with 1 and 2 threads for 9 x 512 @ 512 x 4608 (the 3x3 branch, batch 1); at 36 rows and more, and at the
// FPN's 256 and 1024, it gave the same bits (as at::bmm did at the Winograd products before their own kernel),
// so the whole op's bits stay independent of the thread count. At few rows the product is memory-bound
// (the weight slice is read once), so the small kernel loses nothing to MKL there.
constexpr int64_t kSmallProductRows = 32;

// out (M, N, dense) = a (M, K, rows lda apart) @ b (K, N, rows ldb apart), M <= kSmallProductRows. Each thread
// owns a contiguous range of 16-column blocks; the depth goes in chunks of kDepthChunk rows of b, whose 16
// columns of the block are loaded once and applied to every row of a, the row's running sums kept in out
// (L1/L2-resident: at most 32 rows of the thread's columns) between chunks. Why: b is read exactly once, each
// of its rows streamed in order with a software prefetch 4 blocks ahead; the first version walked one column
// block down all K rows (one cache line per row, 9 C_out floats apart, a new page each time) and streamed
// b at 2-4 GB/s, 2-4x slower than this (1, 4, 9 rows @ 512 x 4608: 3.3, 4.6, 5.2 ms -> 0.7, 1.2, 2.2 ms on one
// thread: the extension was built without OpenMP then; MKL on 2 threads 0.7, 2.6, 2.8). Each output element is summed over k in order from zero, the same bits for any
// thread count (and the same as that first version). Separate multiply and add, as everywhere in the extension.
inline void small_products(const float* a, int64_t lda, const float* b, int64_t ldb, float* out, int64_t rows,
                           int64_t depth, int64_t columns) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t kCols = 2 * Vec::size();
  constexpr int64_t kDepthChunk = 16;
  constexpr int64_t kPrefetchAhead = 4 * kCols;  // floats ahead along a row of b
  TORCH_CHECK(rows <= kSmallProductRows, "small_products takes at most ", kSmallProductRows, " rows");
  const int64_t blocks = (columns + kCols - 1) / kCols;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * kCols, last = std::min(columns, end * kCols);
    for (int64_t r = 0; r < rows; ++r) std::fill(out + r * columns + first, out + r * columns + last, 0.f);
    for (int64_t k0 = 0; k0 < depth; k0 += kDepthChunk) {
      const int64_t chunk = std::min(kDepthChunk, depth - k0);
      for (int64_t block = begin; block < end; ++block) {
        const int64_t n0 = block * kCols;
        const int64_t count0 = std::min<int64_t>(Vec::size(), columns - n0);
        const int64_t count1 = std::max<int64_t>(0, std::min<int64_t>(Vec::size(), columns - n0 - Vec::size()));
        Vec b0[kDepthChunk], b1[kDepthChunk];
        for (int64_t k = 0; k < chunk; ++k) {
          const float* bk = b + (k0 + k) * ldb + n0;
          __builtin_prefetch(bk + kPrefetchAhead);  // a hint: past the row's end it faults nothing
          b0[k] = vload(bk, count0);
          b1[k] = count1 > 0 ? vload(bk + Vec::size(), count1) : Vec(0.f);
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* o = out + r * columns + n0;
          Vec sum0 = vload(o, count0), sum1 = count1 > 0 ? vload(o + Vec::size(), count1) : Vec(0.f);
          const float* ar = a + r * lda + k0;
          for (int64_t k = 0; k < chunk; ++k) {
            const Vec ak(ar[k]);
            sum0 = sum0 + ak * b0[k];
            sum1 = sum1 + ak * b1[k];
          }
          vstore(o, count0, sum0);
          if (count1 > 0) vstore(o + Vec::size(), count1, sum1);
        }
      }
    }
  });
}

inline Tensor tap_products(const Tensor& pixels, const Tensor& weight) {
  if (pixels.size(0) > kSmallProductRows) return at::mm(pixels, weight);
  const Tensor a = pixels.stride(1) == 1 ? pixels : pixels.contiguous();
  const Tensor b = weight.stride(1) == 1 ? weight : weight.contiguous();
  Tensor q = at::empty({a.size(0), b.size(1)}, a.options());
  small_products(a.const_data_ptr<float>(), a.stride(0), b.const_data_ptr<float>(), b.stride(0),
                 q.data_ptr<float>(), a.size(0), a.size(1), b.size(1));
  return q;
}

struct LowResSource {
  Tensor sums;  // (B, 3, h, W, C_out) dense: sums[b, dy + 1, r, x, co]
  int64_t height, out_width, out_channels;
  Axis<float> rows;  // the upsampling's index table along H (PyTorch's rule, as Source's)

  // p: (B, C_p, h, w) dense channels_last; taps: the folded weight as (C_in, 9 C_out), column tap * C_out +
  // co; first_channel: p's first channel in the concat.
  LowResSource(const Tensor& p, const Tensor& taps, int64_t first_channel, int64_t out_h, int64_t out_w)
      : height(p.size(2)), out_width(out_w), out_channels(taps.size(1) / 9), rows(p.size(2), out_h, false) {
    using Vec = at::vec::Vectorized<float>;
    const int64_t batch = p.size(0), width = p.size(3), channels = out_channels, pixel = 9 * channels;
    const Tensor pixels = p.permute({0, 2, 3, 1}).reshape({-1, p.size(1)});  // a view when dense channels_last
    const Tensor q = tap_products(pixels, taps.narrow(0, first_channel, p.size(1)));
    const Axis<float> cols(width, out_w, false);
    sums = at::empty({batch, 3, height, out_w, channels}, q.options());
    const float* src = q.const_data_ptr<float>();
    float* dst = sums.data_ptr<float>();
    at::parallel_for(0, batch * 3 * height, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {  // item = (b * 3 + dy + 1) * h + r
        const int64_t b = item / (3 * height), dy = (item / height) % 3, r = item % height;
        const float* row = src + (b * height + r) * width * pixel + dy * 3 * channels;
        float* out = dst + item * out_w * channels;
        for (int64_t x = 0; x < out_w; ++x) {
          for (int64_t c = 0; c < channels; c += Vec::size()) {
            const int64_t count = std::min<int64_t>(Vec::size(), channels - c);
            Vec sum(0.f);
            for (int64_t dx = 0; dx < 3; ++dx) {
              const int64_t xx = x + dx - 1;
              if (xx < 0 || xx >= out_w) continue;
              const float* tap = row + dx * channels + c;
              sum = sum + (vload(tap + cols.i0[xx] * pixel, count) * Vec(cols.l0[xx]) +
                           vload(tap + cols.i1[xx] * pixel, count) * Vec(cols.l1[xx]));
            }
            vstore(out + x * channels + c, count, sum);
          }
        }
      }
    });
  }
};

// The taps of the folded weight (C_out, C_in, 3, 3) as a (C_in, 9 C_out) matrix: a view when the weight's
// storage is (C_in, 3, 3, C_out) dense (how the Python cache keeps it), else one copy. Why that layout: a
// source's slice is then a dense block of rows, which MKL's sgemm streamed ~20% faster at the PPM's few-row
// products (memory-bound: the slice is read once per call) than the transposed slice of (9 C_out, C_in).
inline Tensor weight_taps(const Tensor& weight) {
  return weight.permute({1, 2, 3, 0}).reshape({weight.size(1), 9 * weight.size(0)});
}

// extra[i * 4 + j] = the low-resolution sources' contribution to output pixel (y0 + i, x0 + j) of image b,
// channels [c, c + count); pixels outside the map are left at zero (the caller does not store them). The
// order of the sums is fixed by the shapes alone (sources, then dy), whatever the threads.
inline void lowres_contribution(const std::vector<LowResSource>& sources, int64_t b, int64_t y0, int64_t x0,
                                int64_t height, int64_t width, int64_t c, int64_t count,
                                at::vec::Vectorized<float> extra[16]) {
  using Vec = at::vec::Vectorized<float>;
  for (int64_t k = 0; k < 16; ++k) extra[k] = Vec(0.f);
  for (const LowResSource& s : sources) {
    const int64_t row_stride = s.out_width * s.out_channels;
    const float* image = s.sums.const_data_ptr<float>() + b * 3 * s.height * row_stride + c;
    for (int64_t i = 0; i < 4 && y0 + i < height; ++i) {
      for (int64_t dy = 0; dy < 3; ++dy) {
        const int64_t y = y0 + i + dy - 1;
        if (y < 0 || y >= height) continue;
        const float* plane = image + dy * s.height * row_stride;
        const float* row0 = plane + s.rows.i0[y] * row_stride;
        const float* row1 = plane + s.rows.i1[y] * row_stride;
        const Vec wt(s.rows.l0[y]), wb(s.rows.l1[y]);
        for (int64_t j = 0; j < 4 && x0 + j < width; ++j) {
          const int64_t x = (x0 + j) * s.out_channels;
          extra[i * 4 + j] = extra[i * 4 + j] + (vload(row0 + x, count) * wt + vload(row1 + x, count) * wb);
        }
      }
    }
  }
}

}  // namespace upernet_fast_cpp
