// 3x3 convolution (stride 1, padding 1, dilation 1, groups 1) + per-output-channel bias + ReLU by Winograd's
// minimal filtering F(4x4, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016),
// float32, inference only. The eval-mode conv-BN-ReLU block folds BN into the weight and bias
// (upernet_fast/ops/conv_bn_relu.py) and calls this with the folded bias; the output is written once.
//
// Why: on the CPU the head's 3x3 convolutions are most of inference and oneDNN already runs them at the
// matrix-product ceiling, so only fewer multiplications help. F(4x4, 3x3) computes each 4x4 output tile
// from a 6x6 input tile with 36 products per (input channel, output channel) instead of 144.
//
//   Y = A^T [ U (.) V ] A,  U = G g G^T (filter, 6x6),  V = B^T d B (input tile, 6x6)
//
// with the interpolation points 0, 1, -1, 1/2, -2 and infinity (see below why not Lavin and Gray's). The 36
// element-wise products summed over input channels are 36 independent matrix products
// [tiles x C_in] x [C_in x C_out], done by at::bmm (MKL; measured here at ~77 GFLOP/s for 256-512 tiles,
// against ~70 at 128 or 1024, which is why tiles are processed in chunks of ~256).
//
// Layouts: the transforms are vectorised (at::vec::Vectorized<float>) along whichever dimension is
// contiguous: channels for channels_last maps, tiles of one tile row for NCHW maps. The transform-domain
// matrices are laid out to match (tile-major or channel-major), and at::bmm takes either form through its
// transpose flags, so no layout conversion pass is ever made on dense inputs.
//
// Determinism: every output element is computed by the same sequence of float operations whatever the
// thread count or the split of work (vector lanes are independent; a partial vector runs the same code on
// zero-padded lanes), the chunking of tiles is fixed by the shapes alone, and at::bmm (MKL sgemm) gave
// bitwise the same products with 1 and 2 threads at these shapes (tests/test_winograd_conv_bn_relu.py
// checks the whole op).
// Built with -ffp-contract=off like the rest of the extension: no multiply-add is fused.
#include "common.h"

#include <ATen/ops/bmm.h>

#include <torch/library.h>

namespace upernet_fast_cpp {
namespace {

using Vec = at::vec::Vectorized<float>;

constexpr int64_t kTile = 4;        // output tile side (m of F(m x m, 3 x 3))
constexpr int64_t kPatch = 6;       // input tile side, m + 3 - 1
constexpr int64_t kPoints = 36;     // kPatch^2: transform-domain positions = independent matrix products
constexpr int64_t kChunkTiles = 256;  // tiles per matrix product (see the header: best measured bmm rate)

// ---- 1D transforms, each a fixed sequence of adds and multiplies by constants (any T: float, double, Vec)
//
// Interpolation points 0, 1, -1, 1/2, -2 and infinity rather than Lavin and Gray's 0, +-1, +-2: measured here
// (float32 products through at::bmm, float64 reference, 512 -> 512 channels) the maximum error drops from
// ~3x to ~1.2x that of ATen's direct convolution; with +-2 the weights 8 and 64 of the output transform
// amplify the products' rounding (the point choice of Barabasz, Anderson, Soodhalter and Gregg, "Error
// analysis and improving the accuracy of Winograd convolution for deep neural networks", 2020).
// Derived by Toom-Cook: A^T row i = p^i (infinity: last row), G row j = (1, p_j, p_j^2) / prod_{l!=j}(p_j - p_l),
// B^T row j = the coefficients of prod_{l!=j}(x - p_l) (infinity: of prod_l (x - p_l)).

// B^T d: the input transform of 6 values.
template <typename T>
inline void input_transform_1d(const T d[6], T out[6]) {
  const T half(0.5f), one_half(1.5f), two(2.f), two_half(2.5f);
  out[0] = (d[0] + d[4]) + one_half * (d[3] - d[1]) - two * d[2];
  out[1] = (d[4] - d[1]) + half * d[2] + two_half * d[3];
  out[2] = (d[4] + d[1]) - two_half * d[2] + half * d[3];
  out[3] = (d[4] - d[2]) + two * (d[3] - d[1]);
  out[4] = (d[4] - d[2]) + half * (d[1] - d[3]);
  out[5] = (d[1] + d[5]) + one_half * (d[4] - d[2]) - two * d[3];
}

// A^T m: the output transform of 6 values into 4.
template <typename T>
inline void output_transform_1d(const T m[6], T out[4]) {
  const T eighth(0.125f), quarter(0.25f), half(0.5f), two(2.f), four(4.f), eight(8.f);
  const T sum12 = m[1] + m[2], diff12 = m[1] - m[2];
  out[0] = (m[0] + sum12) + (m[3] + m[4]);
  out[1] = diff12 + (half * m[3] - two * m[4]);
  out[2] = sum12 + (quarter * m[3] + four * m[4]);
  out[3] = (diff12 + m[5]) + (eighth * m[3] - eight * m[4]);
}

// G g: the filter transform of 3 values into 6 (computed in double, rounded to float once).
inline void filter_transform_1d(const double g[3], double out[6]) {
  out[0] = g[0];
  out[1] = (g[0] + g[1] + g[2]) / 3;
  out[2] = (g[1] - g[0] - g[2]) / 3;
  out[3] = -(16 * g[0] + 8 * g[1] + 4 * g[2]) / 15;
  out[4] = (g[0] - 2 * g[1] + 4 * g[2]) / 15;
  out[5] = g[2];
}

// B^T d B for a 6x6 tile d (row-major), in place: columns first, then rows.
inline void input_transform_2d(Vec tile[kPoints]) {
  Vec column[6], transformed[6];
  for (int j = 0; j < 6; ++j) {
    for (int i = 0; i < 6; ++i) column[i] = tile[i * 6 + j];
    input_transform_1d(column, transformed);
    for (int i = 0; i < 6; ++i) tile[i * 6 + j] = transformed[i];
  }
  for (int i = 0; i < 6; ++i) {
    input_transform_1d(&tile[i * 6], transformed);
    for (int j = 0; j < 6; ++j) tile[i * 6 + j] = transformed[j];
  }
}

// relu(A^T m A + bias) for a 6x6 transform-domain tile m: the 4x4 output tile (row-major).
inline void output_transform_2d(const Vec m[kPoints], const Vec& bias, Vec out[16]) {
  Vec column[6], reduced[4], rows[4 * 6];
  for (int j = 0; j < 6; ++j) {
    for (int i = 0; i < 6; ++i) column[i] = m[i * 6 + j];
    output_transform_1d(column, reduced);
    for (int i = 0; i < 4; ++i) rows[i * 6 + j] = reduced[i];
  }
  const Vec zero(0.f);
  for (int i = 0; i < 4; ++i) {
    output_transform_1d(&rows[i * 6], reduced);
    for (int j = 0; j < 4; ++j) out[i * 4 + j] = at::vec::maximum(reduced[j] + bias, zero);
  }
}

// ---- the filter transform: U[p][co][ci], p = 6 * row + column of G g G^T

Tensor winograd_filter_transform(const Tensor& weight) {
  TORCH_CHECK(weight.defined() && weight.device().is_cpu(), "weight must be a CPU tensor");
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "weight must be float32, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "weight must have shape (C_out, C_in, 3, 3), got ", weight.sizes());
  const Tensor w = weight.contiguous();
  const int64_t out_channels = w.size(0), in_channels = w.size(1), pairs = out_channels * in_channels;
  Tensor transformed = at::empty({kPoints, out_channels, in_channels}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = transformed.data_ptr<float>();
  // Blocks of pairs transformed into a local [36][block] buffer, then written as 36 contiguous runs: one
  // pair at a time would scatter its 36 values `pairs` apart, 36 write streams that measured several times
  // slower than the arithmetic.
  constexpr int64_t kPairBlock = 256;
  at::parallel_for(0, (pairs + kPairBlock - 1) / kPairBlock, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<float> buffer(kPoints * kPairBlock);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t first = block * kPairBlock, count = std::min(kPairBlock, pairs - first);
      for (int64_t k = 0; k < count; ++k) {
        const float* g = src + (first + k) * 9;
        double rows[6][3], row[3], out[6], column[3];  // rows: G g (6x3)
        for (int j = 0; j < 3; ++j) {
          for (int i = 0; i < 3; ++i) column[i] = g[i * 3 + j];
          filter_transform_1d(column, out);
          for (int i = 0; i < 6; ++i) rows[i][j] = out[i];
        }
        for (int i = 0; i < 6; ++i) {
          for (int j = 0; j < 3; ++j) row[j] = rows[i][j];
          filter_transform_1d(row, out);
          for (int j = 0; j < 6; ++j) buffer[(i * 6 + j) * kPairBlock + k] = static_cast<float>(out[j]);
        }
      }
      for (int64_t p = 0; p < kPoints; ++p) {
        std::copy_n(buffer.data() + p * kPairBlock, count, dst + p * pairs + first);
      }
    }
  });
  return transformed;
}

// ---- the convolution

struct Geometry {
  int64_t batch, in_channels, out_channels, height, width, tiles_h, tiles_w;
  int64_t tile_rows() const { return batch * tiles_h; }  // tile rows of every image, flattened (b, ty)
};

// Input transform, channels_last x (dense NHWC): V[p][t][ci] for the tiles of tile rows [row0, row1).
void transform_input_channels_last(const float* x, const Geometry& g, int64_t row0, int64_t row1, float* v) {
  const int64_t tiles = (row1 - row0) * g.tiles_w, channels = g.in_channels;
  const int64_t point_stride = tiles * channels;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    Vec tile[kPoints];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = row0 + t / g.tiles_w, tx = t % g.tiles_w;
      const int64_t b = row / g.tiles_h, ty = row % g.tiles_h;
      const int64_t y0 = ty * kTile - 1, x0 = tx * kTile - 1;  // padding 1
      const float* image = x + b * g.height * g.width * channels;
      for (int64_t c = 0; c < channels; c += Vec::size()) {
        const int64_t count = std::min<int64_t>(Vec::size(), channels - c);
        for (int64_t i = 0; i < kPatch; ++i) {
          const int64_t y = y0 + i;
          for (int64_t j = 0; j < kPatch; ++j) {
            const int64_t xx = x0 + j;
            const bool inside = y >= 0 && y < g.height && xx >= 0 && xx < g.width;
            tile[i * 6 + j] = inside ? vload(image + (y * g.width + xx) * channels + c, count) : Vec(0.f);
          }
        }
        input_transform_2d(tile);
        float* dst = v + t * channels + c;
        for (int64_t p = 0; p < kPoints; ++p) vstore(dst + p * point_stride, count, tile[p]);
      }
    }
  });
}

// Input transform, NCHW x (dense): V[p][ci][t] for the tiles of tile rows [row0, row1), vectorised over
// Vec::size() neighbouring tiles of one tile row (their 6x6 patches gathered into lanes).
void transform_input_nchw(const float* x, const Geometry& g, int64_t row0, int64_t row1, float* v) {
  const int64_t rows = row1 - row0, tiles = rows * g.tiles_w;
  const int64_t point_stride = g.in_channels * tiles;
  constexpr int64_t lanes = Vec::size();
  at::parallel_for(0, g.in_channels * rows, 1, [&](int64_t begin, int64_t end) {
    Vec tile[kPoints];
    alignas(64) float gathered[kPatch][lanes];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / rows, local_row = item % rows, row = row0 + local_row;
      const int64_t b = row / g.tiles_h, ty = row % g.tiles_h;
      const float* plane = x + (b * g.in_channels + c) * g.height * g.width;
      for (int64_t tx0 = 0; tx0 < g.tiles_w; tx0 += lanes) {
        const int64_t count = std::min<int64_t>(lanes, g.tiles_w - tx0);
        for (int64_t i = 0; i < kPatch; ++i) {
          const int64_t y = ty * kTile - 1 + i;
          const bool row_inside = y >= 0 && y < g.height;
          for (int64_t k = 0; k < lanes; ++k) {
            for (int64_t j = 0; j < kPatch; ++j) {
              const int64_t xx = (tx0 + k) * kTile - 1 + j;
              gathered[j][k] = (row_inside && k < count && xx >= 0 && xx < g.width) ? plane[y * g.width + xx] : 0.f;
            }
          }
          for (int64_t j = 0; j < kPatch; ++j) tile[i * 6 + j] = Vec::loadu(gathered[j]);
        }
        input_transform_2d(tile);
        float* dst = v + c * tiles + local_row * g.tiles_w + tx0;
        for (int64_t p = 0; p < kPoints; ++p) vstore(dst + p * point_stride, count, tile[p]);
      }
    }
  });
}

// Output transform, channels_last output: M[p][t][co] -> out (dense NHWC), vectorised over channels.
void transform_output_channels_last(const float* m, const float* bias, const Geometry& g, int64_t row0,
                                    int64_t row1, float* out) {
  const int64_t tiles = (row1 - row0) * g.tiles_w, channels = g.out_channels;
  const int64_t point_stride = tiles * channels;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    Vec tile[kPoints], result[16];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = row0 + t / g.tiles_w, tx = t % g.tiles_w;
      const int64_t b = row / g.tiles_h, ty = row % g.tiles_h;
      float* image = out + b * g.height * g.width * channels;
      for (int64_t c = 0; c < channels; c += Vec::size()) {
        const int64_t count = std::min<int64_t>(Vec::size(), channels - c);
        const float* src = m + t * channels + c;
        for (int64_t p = 0; p < kPoints; ++p) tile[p] = vload(src + p * point_stride, count);
        output_transform_2d(tile, vload(bias + c, count), result);
        for (int64_t i = 0; i < kTile; ++i) {
          const int64_t y = ty * kTile + i;
          if (y >= g.height) break;
          for (int64_t j = 0; j < kTile; ++j) {
            const int64_t xx = tx * kTile + j;
            if (xx >= g.width) break;
            vstore(image + (y * g.width + xx) * channels + c, count, result[i * 4 + j]);
          }
        }
      }
    }
  });
}

// Output transform, NCHW output: M[p][co][t] -> out (dense NCHW), vectorised over neighbouring tiles of one
// tile row; each output row segment is interleaved from the lanes through a small buffer.
void transform_output_nchw(const float* m, const float* bias, const Geometry& g, int64_t row0, int64_t row1,
                           float* out) {
  const int64_t rows = row1 - row0, tiles = rows * g.tiles_w;
  const int64_t point_stride = g.out_channels * tiles;
  constexpr int64_t lanes = Vec::size();
  at::parallel_for(0, g.out_channels * rows, 1, [&](int64_t begin, int64_t end) {
    Vec tile[kPoints], result[16];
    alignas(64) float lane_values[kTile][lanes];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / rows, local_row = item % rows, row = row0 + local_row;
      const int64_t b = row / g.tiles_h, ty = row % g.tiles_h;
      float* plane = out + (b * g.out_channels + c) * g.height * g.width;
      const Vec channel_bias(bias[c]);
      for (int64_t tx0 = 0; tx0 < g.tiles_w; tx0 += lanes) {
        const int64_t count = std::min<int64_t>(lanes, g.tiles_w - tx0);
        const float* src = m + c * tiles + local_row * g.tiles_w + tx0;
        for (int64_t p = 0; p < kPoints; ++p) tile[p] = vload(src + p * point_stride, count);
        output_transform_2d(tile, channel_bias, result);
        const int64_t x_end = std::min<int64_t>(g.width, (tx0 + count) * kTile);
        for (int64_t i = 0; i < kTile; ++i) {
          const int64_t y = ty * kTile + i;
          if (y >= g.height) break;
          for (int64_t j = 0; j < kTile; ++j) result[i * 4 + j].store(lane_values[j]);
          float* dst = plane + y * g.width;
          for (int64_t xx = tx0 * kTile; xx < x_end; ++xx) {
            const int64_t offset = xx - tx0 * kTile;
            dst[xx] = lane_values[offset % kTile][offset / kTile];
          }
        }
      }
    }
  });
}

Tensor winograd_conv_bias_relu(const Tensor& x, const Tensor& filter, const Tensor& bias) {
  TORCH_CHECK(x.defined() && x.device().is_cpu(), "x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, "x must be a 4D (B, C_in, H, W) tensor, got shape ", x.sizes());
  TORCH_CHECK(filter.defined() && filter.device().is_cpu() && filter.scalar_type() == at::kFloat,
              "filter must be a float32 CPU tensor (winograd_filter_transform's output)");
  TORCH_CHECK(filter.dim() == 3 && filter.size(0) == kPoints && filter.size(2) == x.size(1),
              "filter must have shape (36, C_out, C_in) with C_in = x.size(1) = ", x.size(1), ", got ",
              filter.sizes());
  const int64_t out_channels = filter.size(1);
  TORCH_CHECK(bias.defined() && bias.device().is_cpu() && bias.scalar_type() == at::kFloat,
              "bias must be a float32 CPU tensor");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == out_channels, "bias must have shape (", out_channels,
              ",), got ", bias.sizes());
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0 && out_channels > 0,
              "x and filter must have no empty dimension, got x ", x.sizes(), " and filter ", filter.sizes());

  // The output layout: PyTorch's suggest_memory_format rule, as ATen's convolution picks it (and the fake).
  const bool channels_last = suggests_channels_last(x);
  const Tensor input = x.contiguous(memory_format(channels_last));  // no copy when already dense
  const Tensor weights = filter.contiguous();
  const Tensor shift = bias.contiguous();
  Geometry g{x.size(0), x.size(1), out_channels, x.size(2), x.size(3), 0, 0};
  g.tiles_h = (g.height + kTile - 1) / kTile;
  g.tiles_w = (g.width + kTile - 1) / kTile;
  Tensor out = huge_pages(at::empty({g.batch, out_channels, g.height, g.width},
                                    x.options().memory_format(memory_format(channels_last))));

  // Chunks of whole tile rows, ~kChunkTiles tiles each: fixed by the shapes, never by the thread count.
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkTiles / g.tiles_w);
  const int64_t max_tiles = std::min(rows_per_chunk, g.tile_rows()) * g.tiles_w;
  Tensor v_buffer = at::empty({kPoints * max_tiles * g.in_channels}, x.options());
  Tensor m_buffer = at::empty({kPoints * max_tiles * out_channels}, x.options());
  const float* src = input.data_ptr<float>();
  const float* bias_ptr = shift.data_ptr<float>();
  float* dst = out.data_ptr<float>();

  for (int64_t row0 = 0; row0 < g.tile_rows(); row0 += rows_per_chunk) {
    const int64_t row1 = std::min(g.tile_rows(), row0 + rows_per_chunk);
    const int64_t tiles = (row1 - row0) * g.tiles_w;
    Tensor v = v_buffer.narrow(0, 0, kPoints * tiles * g.in_channels);
    Tensor m = m_buffer.narrow(0, 0, kPoints * tiles * out_channels);
    if (channels_last) {
      // M[p] (tiles x C_out) = V[p] (tiles x C_in) @ U[p]^T (C_in x C_out)
      transform_input_channels_last(src, g, row0, row1, v.data_ptr<float>());
      Tensor m3 = m.view({kPoints, tiles, out_channels});
      at::bmm_out(m3, v.view({kPoints, tiles, g.in_channels}), weights.transpose(1, 2));
      transform_output_channels_last(m.data_ptr<float>(), bias_ptr, g, row0, row1, dst);
    } else {
      // M[p] (C_out x tiles) = U[p] (C_out x C_in) @ V[p] (C_in x tiles)
      transform_input_nchw(src, g, row0, row1, v.data_ptr<float>());
      Tensor m3 = m.view({kPoints, out_channels, tiles});
      at::bmm_out(m3, weights, v.view({kPoints, g.in_channels, tiles}));
      transform_output_nchw(m.data_ptr<float>(), bias_ptr, g, row0, row1, dst);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(upernet_fast_cpp, CPU, m) {
  m.impl("winograd_filter_transform", &winograd_filter_transform);
  m.impl("winograd_conv_bias_relu", &winograd_conv_bias_relu);
}

}  // namespace upernet_fast_cpp
