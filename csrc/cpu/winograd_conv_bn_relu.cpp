// 3x3 convolution (stride 1, padding 1, dilation 1, groups 1) + per-output-channel bias + ReLU by Winograd's
// minimal filtering F(4x4, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016),
// float32. The eval-mode conv-BN-ReLU block folds BN into the weight and bias
// (upernet_fast/ops/conv_bn_relu.py) and calls this with the folded bias; the output is written once. Training
// uses the plain convolution (no bias, no ReLU: its BatchNorm follows) forward, and again for the input
// gradient, the gradient convolved with the flipped, transposed weight (upernet_fast/ops/winograd_conv_bn_relu.py
// holds that autograd; these ops have none).
//
// Why: on the CPU the head's 3x3 convolutions are most of inference and oneDNN already runs them at the
// matrix-product ceiling, so only fewer multiplications help. F(4x4, 3x3) computes each 4x4 output tile
// from a 6x6 input tile with 36 products per (input channel, output channel) instead of 144.
//
//   Y = A^T [ U (.) V ] A,  U = G g G^T (filter, 6x6),  V = B^T d B (input tile, 6x6)
//
// with the interpolation points 0, 1, -1, 1/2, -2 and infinity (see below why not Lavin and Gray's). The 36
// element-wise products summed over input channels are 36 independent matrix products
// [tiles x C_in] x [C_in x C_out], done by the packed-filter kernel of winograd_products.h (the filter transform
// stored in its panel order once per cached weight), in chunks of ~256 tiles (the V and M buffers stay a few MB).
// It replaced at::bmm (MKL), which re-packed the whole filter transform on every call: on the small maps that
// copy was a quarter of the block (32x32: 64 tiles; 2 threads, 36 x [64 x 512] x [512 x 512]: 12.3 ms packed
// against 18.3 ms by bmm, and about equal at 256 tiles, 2026-11-28).
//
// Layouts: the transforms are vectorised (at::vec::Vectorized<float>) along whichever dimension is
// contiguous: channels for channels_last maps, tiles of one tile row for NCHW maps. The transform-domain
// matrices are laid out to match (tile-major or channel-major), and the products read and write either form
// (winograd::Matrix's strides), so no layout conversion pass is ever made on dense inputs.
//
// Determinism: every output element is computed by the same sequence of float operations whatever the
// thread count or the split of work (vector lanes are independent; a partial vector runs the same code on
// zero-padded lanes; the products' summation order is fixed by the shapes, see winograd_products.h), and the
// chunking of tiles is fixed by the shapes alone (tests/test_winograd_conv_bn_relu.py checks the whole op on
// 1, 2 and 12 threads). The low-resolution sources' products (winograd_lowres.h) keep that property: at::mm
// where MKL measured thread-count invariant, a kernel of their own where it did not.
// Built with -ffp-contract=off like the rest of the extension: no multiply-add is fused implicitly (the
// products' explicit ones are the exception, see winograd_products.h).
#include "bilinear.h"
#include "winograd_lowres.h"
#include "winograd_products.h"

#include <torch/library.h>

namespace upernet_fast_cpp {
namespace {

using Vec = at::vec::Vectorized<float>;

constexpr int64_t kTile = 4;        // output tile side (m of F(m x m, 3 x 3))
constexpr int64_t kPatch = 6;       // input tile side, m + 3 - 1
using winograd::kPoints;  // kPatch^2: transform-domain positions = independent matrix products
static_assert(kPoints == kPatch * kPatch, "F(4x4, 3x3) has 6 x 6 transform-domain positions");
constexpr int64_t kChunkTiles = 256;  // tiles per chunk of products (whole tile rows; see the header)

// Channels of a channels_last tile gathered per step (transform_input_channels_last): 36 x 64 floats, 9 KB.
constexpr int64_t kChannelBlock = 64;

// Distance in floats between consecutive transform-domain matrices V[p] and M[p]: their size plus one cache
// line. Why: the input transform stores, and the output transform loads, 36 vectors per tile, one per matrix.
// With dense matrices of a power-of-two size (256 tiles x 2048 channels: 2 MiB) all 36 addresses share their
// low 12+ bits, so they compete for one set of the L1 and L2 caches (8 ways) and alias in the store buffer;
// the extra line spreads them over 36 sets. Measured single-threaded, 2048 -> 512 at 128x128: the input
// transform took as long as a third of the matrix products. The products take the padded point stride as it is.
inline int64_t padded_point_stride(int64_t matrix_size) { return matrix_size + 64 / sizeof(float); }

// ---- 1D transforms, each a fixed sequence of adds and multiplies by constants (any T: float, double, Vec)
//
// Interpolation points 0, 1, -1, 1/2, -2 and infinity rather than Lavin and Gray's 0, +-1, +-2: measured here
// (float32 products through at::bmm then, float64 reference, 512 -> 512 channels) the maximum error drops from
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

// G g: the filter transform of 3 values into 6 (computed in double, rounded to float once). T: double, or a
// vector of doubles (one filter per lane: the same IEEE operations, so the same bits as the scalar form).
inline double negate(double x) { return -x; }
inline at::vec::Vectorized<double> negate(const at::vec::Vectorized<double>& x) { return x.neg(); }  // sign flip

template <typename T>
inline void filter_transform_1d(const T g[3], T out[6]) {
  // Multiplications by the reciprocals rather than divisions (a vector division costs several multiplies'
  // time): within a double rounding of the quotient, invisible once rounded to float but in rare ties.
  const T two(2.0), four(4.0), eight(8.0), sixteen(16.0), third(1.0 / 3.0), fifteenth(1.0 / 15.0);
  out[0] = g[0];
  out[1] = (g[0] + g[1] + g[2]) * third;
  out[2] = (g[1] - g[0] - g[2]) * third;
  out[3] = negate((sixteen * g[0] + eight * g[1] + four * g[2]) * fifteenth);
  out[4] = (g[0] - two * g[1] + four * g[2]) * fifteenth;
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

// relu(A^T m A + bias) for a 6x6 transform-domain tile m: the 4x4 output tile (row-major); with extra,
// relu((A^T m A + extra) + bias) (the low-resolution sources' contribution, winograd_lowres.h). Without it
// the float operations are exactly those of the plain convolution. relu false: A^T m A + bias (the training
// convolution, whose BN follows; its bias is zero there, an exact addition).
inline void output_transform_2d(const Vec m[kPoints], const Vec& bias, bool relu, Vec out[16],
                                const Vec* extra = nullptr) {
  // In double, each float lane widened once and the tile rounded to float once: the transform's weights (8 and
  // 1/8 in each direction) amplify the roundings of its own intermediate sums, measured as much as ATen's whole
  // float32 error on its own (the products' roundings are the rest). A few percent of the block's time.
  using VecD = at::vec::Vectorized<double>;
  constexpr int64_t kHalves = Vec::size() / VecD::size();
  alignas(64) float lanes[kPoints][Vec::size()];
  alignas(64) float reduced_lanes[16][Vec::size()];
  for (int64_t p = 0; p < kPoints; ++p) m[p].store(lanes[p]);
  for (int64_t h = 0; h < kHalves; ++h) {
    VecD column[6], reduced[4], rows[4 * 6];
    alignas(64) double wide[VecD::size()];
    for (int j = 0; j < 6; ++j) {
      for (int i = 0; i < 6; ++i) {
        for (int64_t l = 0; l < VecD::size(); ++l) wide[l] = lanes[i * 6 + j][h * VecD::size() + l];
        column[i] = VecD::loadu(wide);
      }
      output_transform_1d(column, reduced);
      for (int i = 0; i < 4; ++i) rows[i * 6 + j] = reduced[i];
    }
    for (int i = 0; i < 4; ++i) {
      output_transform_1d(&rows[i * 6], reduced);
      for (int j = 0; j < 4; ++j) {
        reduced[j].store(wide);
        for (int64_t l = 0; l < VecD::size(); ++l) {
          reduced_lanes[i * 4 + j][h * VecD::size() + l] = static_cast<float>(wide[l]);
        }
      }
    }
  }
  const Vec zero(0.f);
  for (int k = 0; k < 16; ++k) {
    const Vec tile_value = Vec::loadu(reduced_lanes[k]);
    const Vec value = extra == nullptr ? tile_value : tile_value + extra[k];
    out[k] = relu ? at::vec::maximum(value + bias, zero) : value + bias;
  }
}

// ---- the filter transform: U[p][co][ci], p = 6 * row + column of G g G^T, its values stored in column panels
// for the products (winograd_products.h).

Tensor winograd_filter_transform(const Tensor& weight) {
  TORCH_CHECK(weight.defined() && weight.device().is_cpu(), "weight must be a CPU tensor");
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "weight must be float32, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "weight must have shape (C_out, C_in, 3, 3), got ", weight.sizes());
  const Tensor w = weight.contiguous();
  const int64_t out_channels = w.size(0), in_channels = w.size(1);
  const int64_t panels = winograd::column_panels(out_channels);
  Tensor transformed = at::empty({kPoints, out_channels, in_channels}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = transformed.data_ptr<float>();
  // Blocks of one panel's output x kDepth input channels transformed into a local [36][depth][panel] buffer,
  // then written as 36 contiguous runs: one pair at a time would scatter its 36 values a whole point's matrix
  // apart, 36 write streams that measured several times slower than the arithmetic.
  constexpr int64_t kDepth = 16, kBlock = kDepth * winograd::kPanel;
  const int64_t depth_blocks = (in_channels + kDepth - 1) / kDepth;
  at::parallel_for(0, panels * depth_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(kPoints * kBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t panel = item / depth_blocks, ci0 = (item % depth_blocks) * kDepth;
      const int64_t depth = std::min(kDepth, in_channels - ci0);
      const int64_t width = std::min(winograd::kPanel, out_channels - panel * winograd::kPanel);
      // VecD::size() filters (neighbouring output channels of the panel) per step, one per lane; training makes
      // two transforms per step (forward and adjoint). 512 x 512 weight, 2 threads, AVX-512: 27.6 ms scalar,
      // 19.4 vectorised (the same bits), 14.5 with the reciprocals (1-ulp differences in 0.04% of the values).
      using VecD = at::vec::Vectorized<double>;
      constexpr int64_t lanes = VecD::size();
      alignas(64) double wide[lanes];
      for (int64_t k = 0; k < depth; ++k) {
        for (int64_t n0 = 0; n0 < width; n0 += lanes) {
          const int64_t count = std::min(lanes, width - n0);
          VecD taps[9];
          for (int t = 0; t < 9; ++t) {
            for (int64_t l = 0; l < lanes; ++l) {
              const int64_t n = n0 + std::min(l, count - 1);  // padded lanes repeat the last filter, never stored
              wide[l] = src[((panel * winograd::kPanel + n) * in_channels + ci0 + k) * 9 + t];
            }
            taps[t] = VecD::loadu(wide);
          }
          VecD rows[6][3], row[3], out[6], column[3];  // rows: G g (6x3)
          for (int j = 0; j < 3; ++j) {
            for (int i = 0; i < 3; ++i) column[i] = taps[i * 3 + j];
            filter_transform_1d(column, out);
            for (int i = 0; i < 6; ++i) rows[i][j] = out[i];
          }
          for (int i = 0; i < 6; ++i) {
            for (int j = 0; j < 3; ++j) row[j] = rows[i][j];
            filter_transform_1d(row, out);
            for (int j = 0; j < 6; ++j) {
              out[j].store(wide);
              float* dst = buffer.data() + (i * 6 + j) * kBlock + k * width + n0;
              for (int64_t l = 0; l < count; ++l) dst[l] = static_cast<float>(wide[l]);
            }
          }
        }
      }
      for (int64_t p = 0; p < kPoints; ++p) {
        std::copy_n(buffer.data() + p * kBlock, depth * width,
                    dst + winograd::packed_offset(p, panel * winograd::kPanel, ci0, out_channels, in_channels));
      }
    }
  });
  return transformed;
}

// ---- the convolution
//
// Its input is the concatenation along channels of one or more sources, each either read as it is (a map at
// the output size) or bilinearly resized to the output size on the fly (align_corners=False): the fused
// upsample-concat + conv-BN-ReLU of the FPN and PPM bottlenecks, where the 2048-channel concat is never
// built. A resized value is computed exactly as bilinear.h's resize_forward computes it for upsample_concat
// (PyTorch's index rule and sum order, float32, no contraction), so the fused call gives bitwise the result of
// winograd_conv_bias_relu(upsample_concat(sources, size)); the plain conv is the case of one source read as
// it is.

struct Source {
  const float* data;  // dense, in the concatenation's layout
  int64_t channels, first_channel, height, width;
  bool same;  // read as it is (the output size), else resized
  Axis<float> rows, cols;  // index tables of the resize along H and W (unused when same)
  Source(const Tensor& t, int64_t first, int64_t out_h, int64_t out_w)
      : data(t.const_data_ptr<float>()), channels(t.size(1)), first_channel(first), height(t.size(2)),
        width(t.size(3)), same(t.size(2) == out_h && t.size(3) == out_w), rows(t.size(2), out_h, false),
        cols(t.size(3), out_w, false) {}
};

struct Geometry {
  int64_t batch, in_channels, out_channels, height, width, tiles_h, tiles_w;
  int64_t tile_rows() const { return batch * tiles_h; }  // tile rows of every image, flattened (b, ty)
};

// Channels [c, c + count) of source s at output pixel (y, x) of image b, s channels_last: as
// resize_forward_items' channels_last branch, top = x00 * wl + x01 * wr, bottom likewise, top * wt + bottom * wb.
inline Vec sample_channels_last(const Source& s, int64_t b, int64_t y, int64_t x, int64_t c, int64_t count) {
  const float* image = s.data + b * s.height * s.width * s.channels + c;
  if (s.same) return vload(image + (y * s.width + x) * s.channels, count);
  const float* row0 = image + s.rows.i0[y] * s.width * s.channels;
  const float* row1 = image + s.rows.i1[y] * s.width * s.channels;
  const int64_t c0 = s.cols.i0[x] * s.channels, c1 = s.cols.i1[x] * s.channels;
  const Vec wl(s.cols.l0[x]), wr(s.cols.l1[x]);
  const Vec top = vload(row0 + c0, count) * wl + vload(row0 + c1, count) * wr;
  const Vec bottom = vload(row1 + c0, count) * wl + vload(row1 + c1, count) * wr;
  return top * Vec(s.rows.l0[y]) + bottom * Vec(s.rows.l1[y]);
}

// One value of source s's NCHW plane at output pixel (y, x): as resize_forward_items' NCHW branch (rows
// interpolated along W first, then the two rows along H), the same float operations in the same order.
inline float sample_nchw(const Source& s, const float* plane, int64_t y, int64_t x) {
  if (s.same) return plane[y * s.width + x];
  const float* row0 = plane + s.rows.i0[y] * s.width;
  const float* row1 = plane + s.rows.i1[y] * s.width;
  const int64_t c0 = s.cols.i0[x], c1 = s.cols.i1[x];
  const float wl = s.cols.l0[x], wr = s.cols.l1[x];
  const float top = row0[c0] * wl + row0[c1] * wr;
  const float bottom = row1[c0] * wl + row1[c1] * wr;
  return top * s.rows.l0[y] + bottom * s.rows.l1[y];
}

// Input transform, channels_last sources: V[p][t][ci] for the tiles of tile rows [row0, row1), vectorised over
// channels (one source at a time: a vector never spans two sources). A tile's 36 pixels are first gathered
// (resized where needed) kChannelBlock channels at a time into an L1-resident patch, each pixel's channels read
// as one contiguous run, then transformed from there. Why: transforming straight from the map reads 36 pixels
// 4-8 KB apart per vector, 36 concurrent streams that the hardware prefetchers do not follow; most of the
// transform's time went to those loads' cache misses (perf, 2048 channels at 128x128).
void transform_input_channels_last(const std::vector<Source>& sources, const Geometry& g, int64_t row0,
                                   int64_t row1, float* v) {
  const int64_t tiles = (row1 - row0) * g.tiles_w, channels = g.in_channels;
  const int64_t point_stride = padded_point_stride(tiles * channels);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    Vec tile[kPoints];
    alignas(64) float patch[kPoints][kChannelBlock];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = row0 + t / g.tiles_w, tx = t % g.tiles_w;
      const int64_t b = row / g.tiles_h, ty = row % g.tiles_h;
      const int64_t y0 = ty * kTile - 1, x0 = tx * kTile - 1;  // padding 1
      for (const Source& s : sources) {
        for (int64_t c0 = 0; c0 < s.channels; c0 += kChannelBlock) {
          const int64_t block = std::min(kChannelBlock, s.channels - c0);
          for (int64_t i = 0; i < kPatch; ++i) {
            const int64_t y = y0 + i;
            for (int64_t j = 0; j < kPatch; ++j) {
              const int64_t xx = x0 + j;
              const bool inside = y >= 0 && y < g.height && xx >= 0 && xx < g.width;
              for (int64_t c = 0; c < block; c += Vec::size()) {  // whole vectors: unused lanes are zeros
                const int64_t count = std::min<int64_t>(Vec::size(), block - c);
                (inside ? sample_channels_last(s, b, y, xx, c0 + c, count) : Vec(0.f)).store(patch[i * 6 + j] + c);
              }
            }
          }
          for (int64_t c = 0; c < block; c += Vec::size()) {
            const int64_t count = std::min<int64_t>(Vec::size(), block - c);
            for (int64_t p = 0; p < kPoints; ++p) tile[p] = Vec::loadu(patch[p] + c);
            input_transform_2d(tile);
            float* dst = v + t * channels + s.first_channel + c0 + c;
            for (int64_t p = 0; p < kPoints; ++p) vstore(dst + p * point_stride, count, tile[p]);
          }
        }
      }
    }
  });
}

// Input transform, NCHW sources: V[p][ci][t] for the tiles of tile rows [row0, row1), vectorised over
// Vec::size() neighbouring tiles of one tile row (their 6x6 patches gathered into lanes).
void transform_input_nchw(const std::vector<Source>& sources, const Geometry& g, int64_t row0, int64_t row1,
                          float* v) {
  const int64_t rows = row1 - row0, tiles = rows * g.tiles_w;
  const int64_t point_stride = padded_point_stride(g.in_channels * tiles);
  constexpr int64_t lanes = Vec::size();
  at::parallel_for(0, g.in_channels * rows, 1, [&](int64_t begin, int64_t end) {
    Vec tile[kPoints];
    alignas(64) float gathered[kPatch][lanes];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / rows, local_row = item % rows, row = row0 + local_row;
      const int64_t b = row / g.tiles_h, ty = row % g.tiles_h;
      const Source* s = &sources[0];
      while (c >= s->first_channel + s->channels) ++s;
      const float* plane = s->data + (b * s->channels + c - s->first_channel) * s->height * s->width;
      for (int64_t tx0 = 0; tx0 < g.tiles_w; tx0 += lanes) {
        const int64_t count = std::min<int64_t>(lanes, g.tiles_w - tx0);
        for (int64_t i = 0; i < kPatch; ++i) {
          const int64_t y = ty * kTile - 1 + i;
          const bool row_inside = y >= 0 && y < g.height;
          for (int64_t k = 0; k < lanes; ++k) {
            for (int64_t j = 0; j < kPatch; ++j) {
              const int64_t xx = (tx0 + k) * kTile - 1 + j;
              gathered[j][k] = (row_inside && k < count && xx >= 0 && xx < g.width) ? sample_nchw(*s, plane, y, xx) : 0.f;
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

// Output transform, channels_last output: M[p][t][co] -> out (dense NHWC), vectorised over channels; the
// low-resolution sources (none for the plain convolution) are added before bias and ReLU.
void transform_output_channels_last(const float* m, const float* bias, bool relu, const Geometry& g, int64_t row0,
                                    int64_t row1, float* out, const std::vector<LowResSource>& lowres) {
  const int64_t tiles = (row1 - row0) * g.tiles_w, channels = g.out_channels;
  const int64_t point_stride = padded_point_stride(tiles * channels);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    Vec tile[kPoints], result[16], extra[16];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = row0 + t / g.tiles_w, tx = t % g.tiles_w;
      const int64_t b = row / g.tiles_h, ty = row % g.tiles_h;
      float* image = out + b * g.height * g.width * channels;
      for (int64_t c = 0; c < channels; c += Vec::size()) {
        const int64_t count = std::min<int64_t>(Vec::size(), channels - c);
        const float* src = m + t * channels + c;
        for (int64_t p = 0; p < kPoints; ++p) tile[p] = vload(src + p * point_stride, count);
        if (!lowres.empty()) {
          lowres_contribution(lowres, b, ty * kTile, tx * kTile, g.height, g.width, c, count, extra);
        }
        output_transform_2d(tile, vload(bias + c, count), relu, result, lowres.empty() ? nullptr : extra);
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
void transform_output_nchw(const float* m, const float* bias, bool relu, const Geometry& g, int64_t row0,
                           int64_t row1, float* out) {
  const int64_t rows = row1 - row0, tiles = rows * g.tiles_w;
  const int64_t point_stride = padded_point_stride(g.out_channels * tiles);
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
        output_transform_2d(tile, channel_bias, relu, result);
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

// The filter as winograd_filter_transform made it, for in_channels input channels; in_channels_name: what
// in_channels is, for the error ("x.size(1)", "the concat's channels").
void check_filter(const Tensor& filter, const char* in_channels_name, int64_t in_channels) {
  TORCH_CHECK(filter.defined() && filter.device().is_cpu() && filter.scalar_type() == at::kFloat,
              "filter must be a float32 CPU tensor (winograd_filter_transform's output)");
  TORCH_CHECK(filter.dim() == 3 && filter.size(0) == kPoints && filter.size(2) == in_channels,
              "filter must have shape (36, C_out, C_in) with C_in = ", in_channels_name, " = ", in_channels, ", got ",
              filter.sizes());
  TORCH_CHECK(filter.size(1) > 0, "filter must have at least one output channel, got ", filter.sizes());
  // Its values are in the products' packed order, which only a dense tensor of that shape keeps.
  TORCH_CHECK(filter.is_contiguous(), "filter must be contiguous (winograd_filter_transform's output as it is)");
}

void check_filter_and_bias(const Tensor& filter, const Tensor& bias, const char* in_channels_name,
                           int64_t in_channels) {
  check_filter(filter, in_channels_name, in_channels);
  TORCH_CHECK(bias.defined() && bias.device().is_cpu() && bias.scalar_type() == at::kFloat,
              "bias must be a float32 CPU tensor");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == filter.size(1), "bias must have shape (", filter.size(1),
              ",), got ", bias.sizes());
}

// The convolution of the concatenation of `inputs` (each dense in the given layout) at size height x width,
// plus, channels_last only, that of the low-resolution sources `lowres` (channels after the inputs', whose part
// of the filter the products skip), plus bias, then ReLU where relu is set.
Tensor convolve(const std::vector<Tensor>& inputs, int64_t height, int64_t width, bool channels_last,
                const Tensor& filter, const Tensor& bias, bool relu, const std::vector<LowResSource>& lowres = {}) {
  std::vector<Source> sources;
  int64_t in_channels = 0;
  for (const Tensor& t : inputs) {
    sources.emplace_back(t, in_channels, height, width);
    in_channels += t.size(1);
  }
  const int64_t out_channels = filter.size(1);
  const Tensor shift = bias.contiguous();
  Geometry g{inputs[0].size(0), in_channels, out_channels, height, width, 0, 0};
  g.tiles_h = (g.height + kTile - 1) / kTile;
  g.tiles_w = (g.width + kTile - 1) / kTile;
  Tensor out = huge_pages(at::empty({g.batch, out_channels, g.height, g.width},
                                    inputs[0].options().memory_format(memory_format(channels_last))));

  // Chunks of whole tile rows, ~kChunkTiles tiles each: fixed by the shapes, never by the thread count.
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkTiles / g.tiles_w);
  const int64_t max_tiles = std::min(rows_per_chunk, g.tile_rows()) * g.tiles_w;
  Tensor v_buffer = huge_pages(at::empty({kPoints * padded_point_stride(max_tiles * g.in_channels)}, out.options()));
  Tensor m_buffer = huge_pages(at::empty({kPoints * padded_point_stride(max_tiles * out_channels)}, out.options()));
  const float* bias_ptr = shift.data_ptr<float>();
  float* dst = out.data_ptr<float>();

  for (int64_t row0 = 0; row0 < g.tile_rows(); row0 += rows_per_chunk) {
    const int64_t row1 = std::min(g.tile_rows(), row0 + rows_per_chunk);
    const int64_t tiles = (row1 - row0) * g.tiles_w;
    const int64_t v_stride = padded_point_stride(tiles * g.in_channels);
    const int64_t m_stride = padded_point_stride(tiles * out_channels);
    float* v = v_buffer.data_ptr<float>();
    float* m = m_buffer.data_ptr<float>();
    // M[p] (tiles x C_out) = V[p] (tiles x C_in) @ U[p]^T: V and M tile-major (channels_last) or channel-major
    // (NCHW), as the transforms write and read them.
    const winograd::Matrix v_matrix = channels_last ? winograd::Matrix{v, g.in_channels, 1, v_stride}
                                                    : winograd::Matrix{v, 1, tiles, v_stride};
    const winograd::Matrix m_matrix = channels_last ? winograd::Matrix{m, out_channels, 1, m_stride}
                                                    : winograd::Matrix{m, 1, tiles, m_stride};
    if (channels_last) {
      transform_input_channels_last(sources, g, row0, row1, v);
    } else {
      TORCH_CHECK(lowres.empty(), "low-resolution sources need a channels_last output");
      transform_input_nchw(sources, g, row0, row1, v);
    }
    winograd::transform_domain_products(v_matrix, filter.const_data_ptr<float>(), filter.size(2), m_matrix, tiles,
                                        g.in_channels, out_channels);
    if (channels_last) {
      transform_output_channels_last(m, bias_ptr, relu, g, row0, row1, dst, lowres);
    } else {
      transform_output_nchw(m, bias_ptr, relu, g, row0, row1, dst);
    }
  }
  return out;
}

// The 36 products alone: v (36, tiles, C_in), any strides, @ U^T -> (36, tiles, C_out) dense.
Tensor winograd_transform_domain_products(const Tensor& v, const Tensor& filter) {
  TORCH_CHECK(v.defined() && v.device().is_cpu() && v.scalar_type() == at::kFloat, "v must be a float32 CPU tensor");
  TORCH_CHECK(v.dim() == 3 && v.size(0) == kPoints && v.size(1) > 0 && v.size(2) > 0,
              "v must have shape (36, tiles, C_in) with no empty dimension, got ", v.sizes());
  check_filter(filter, "v.size(2)", v.size(2));
  Tensor m = at::empty({kPoints, v.size(1), filter.size(1)}, v.options());
  const winograd::Matrix v_matrix{const_cast<float*>(v.const_data_ptr<float>()), v.stride(1), v.stride(2), v.stride(0)};
  const winograd::Matrix m_matrix{m.data_ptr<float>(), m.stride(1), 1, m.stride(0)};
  winograd::transform_domain_products(v_matrix, filter.const_data_ptr<float>(), filter.size(2), m_matrix, v.size(1),
                                      v.size(2), filter.size(1));
  return m;
}

// relu(conv(x) + bias) where relu is set, else conv(x) + bias.
Tensor conv_checked(const Tensor& x, const Tensor& filter, const Tensor& bias, bool relu) {
  TORCH_CHECK(x.defined() && x.device().is_cpu(), "x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, "x must be a 4D (B, C_in, H, W) tensor, got shape ", x.sizes());
  check_filter_and_bias(filter, bias, "x.size(1)", x.size(1));
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0,
              "x must have no empty dimension, got x ", x.sizes());
  // The output layout: PyTorch's suggest_memory_format rule, as ATen's convolution picks it (and the fake).
  const bool channels_last = suggests_channels_last(x);
  const Tensor input = x.contiguous(memory_format(channels_last));  // no copy when already dense
  return convolve({input}, x.size(2), x.size(3), channels_last, filter, bias, relu);
}

Tensor winograd_conv_bias_relu(const Tensor& x, const Tensor& filter, const Tensor& bias) {
  return conv_checked(x, filter, bias, true);
}

// A zero bias for the plain convolutions (an exact addition); sized from a filter that check_filter then
// validates (a malformed one gets a one-element bias here and check_filter's error after).
Tensor zero_bias(const Tensor& filter) {
  const int64_t channels = filter.defined() && filter.dim() == 3 ? filter.size(1) : 1;
  return at::empty({channels}, at::TensorOptions().dtype(at::kFloat)).zero_();
}

// The plain convolution (no bias, no ReLU): the training block's conv, whose BatchNorm follows, and its input
// gradient (the gradient convolved with the flipped, transposed weight's transform).
Tensor winograd_conv(const Tensor& x, const Tensor& filter) {
  return conv_checked(x, filter, zero_bias(filter), false);
}

// The checked inputs of the fused upsample-concat conv, each dense in the concat's layout.
struct ConcatInputs {
  std::vector<Tensor> tensors;
  bool channels_last;
};

ConcatInputs concat_inputs(at::TensorList tensors, c10::IntArrayRef size, const Tensor& filter, const Tensor& bias) {
  TORCH_CHECK(!tensors.empty(), "tensors must hold at least one tensor");
  TORCH_CHECK(size.size() == 2 && size[0] > 0 && size[1] > 0, "size must be two positive ints (H, W), got ", size);
  int64_t channels = 0;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const Tensor& t = tensors[k];
    const std::string name = "tensors[" + std::to_string(k) + "]";
    TORCH_CHECK(t.defined() && t.device().is_cpu(), name, " must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 4, name, " must be a 4D (B, C, h, w) tensor, got shape ", t.sizes());
    TORCH_CHECK(t.numel() > 0, name, " must have no empty dimension, got ", t.sizes());
    TORCH_CHECK(t.size(0) == tensors[0].size(0), name, " has batch size ", t.size(0), " but tensors[0] has ",
                tensors[0].size(0));
    channels += t.size(1);
  }
  check_filter_and_bias(filter, bias, "the sum of the tensors' channels", channels);
  // The concat's layout (upsample_concat's rule); dense in it, the concat suggests the same layout to the
  // convolution.
  const bool channels_last = concat_channels_last(tensors);
  ConcatInputs inputs{{}, channels_last};  // each dense in that layout (no copy when it already is)
  for (const Tensor& t : tensors) inputs.tensors.push_back(t.contiguous(memory_format(channels_last)));
  return inputs;
}

// winograd_conv_bias_relu(upsample_concat(tensors, size), filter, bias), bitwise, without the concat.
Tensor winograd_upsample_concat_conv_bias_relu(at::TensorList tensors, c10::IntArrayRef size, const Tensor& filter,
                                               const Tensor& bias) {
  const ConcatInputs inputs = concat_inputs(tensors, size, filter, bias);
  return convolve(inputs.tensors, size[0], size[1], inputs.channels_last, filter, bias, true);
}

// winograd_conv(upsample_concat(tensors, size), filter), bitwise, without the concat.
Tensor winograd_upsample_concat_conv(at::TensorList tensors, c10::IntArrayRef size, const Tensor& filter) {
  const Tensor bias = zero_bias(filter);
  const ConcatInputs inputs = concat_inputs(tensors, size, filter, bias);
  return convolve(inputs.tensors, size[0], size[1], inputs.channels_last, filter, bias, false);
}

// The same block with tensors[first_lowres:] (each strictly smaller than size in both dimensions) convolved at
// their own resolution with the folded weight (C_out, C_in, 3, 3), then upsampled (winograd_lowres.h), and
// only tensors[:first_lowres] through Winograd. Where that split does not apply (NCHW concat, first_lowres
// outside [1, tensors), a later tensor not smaller), the plain fused op's path and bits.
Tensor winograd_upsample_concat_conv_bias_relu_lowres(at::TensorList tensors, c10::IntArrayRef size,
                                                      const Tensor& filter, const Tensor& bias, const Tensor& weight,
                                                      int64_t first_lowres) {
  const ConcatInputs inputs = concat_inputs(tensors, size, filter, bias);
  TORCH_CHECK(weight.defined() && weight.device().is_cpu() && weight.scalar_type() == at::kFloat,
              "weight must be a float32 CPU tensor");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == filter.size(1) && weight.size(1) == filter.size(2) &&
                  weight.size(2) == 3 && weight.size(3) == 3,
              "weight must have shape (C_out, C_in, 3, 3) = (", filter.size(1), ", ", filter.size(2), ", 3, 3), got ",
              weight.sizes());
  const int64_t count = static_cast<int64_t>(tensors.size());
  bool split = inputs.channels_last && first_lowres >= 1 && first_lowres < count;
  for (int64_t k = first_lowres; split && k < count; ++k) {
    split = tensors[k].size(2) < size[0] && tensors[k].size(3) < size[1];
  }
  if (!split) return convolve(inputs.tensors, size[0], size[1], inputs.channels_last, filter, bias, true);
  int64_t direct_channels = 0;
  for (int64_t k = 0; k < first_lowres; ++k) direct_channels += tensors[k].size(1);
  const Tensor taps = weight_taps(weight);
  std::vector<LowResSource> lowres;
  for (int64_t k = first_lowres, first = direct_channels; k < count; first += tensors[k].size(1), ++k) {
    lowres.emplace_back(inputs.tensors[k], taps, first, size[0], size[1]);
  }
  const std::vector<Tensor> direct(inputs.tensors.begin(), inputs.tensors.begin() + first_lowres);
  return convolve(direct, size[0], size[1], true, filter, bias, true, lowres);
}

}  // namespace

TORCH_LIBRARY_IMPL(upernet_fast_cpp, CPU, m) {
  m.impl("winograd_filter_transform", &winograd_filter_transform);
  m.impl("winograd_transform_domain_products", &winograd_transform_domain_products);
  m.impl("winograd_conv_bias_relu", &winograd_conv_bias_relu);
  m.impl("winograd_conv", &winograd_conv);
  m.impl("winograd_upsample_concat_conv", &winograd_upsample_concat_conv);
  m.impl("winograd_upsample_concat_conv_bias_relu", &winograd_upsample_concat_conv_bias_relu);
  m.impl("winograd_upsample_concat_conv_bias_relu_lowres", &winograd_upsample_concat_conv_bias_relu_lowres);
}

}  // namespace upernet_fast_cpp
