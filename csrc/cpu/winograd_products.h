// The 36 transform-domain matrix products of the Winograd convolution (winograd_conv_bn_relu.cpp), by a
// register-blocked kernel over a filter transform stored pre-packed in column panels.
//
//   M[p] (tiles x C_out) = V[p] (tiles x C_in) @ U[p]^T (C_in x C_out),  p = 0 .. 35
//
// Why not at::bmm (MKL): sgemm packs both operands on every call. The filter transform is the large one
// (36 x C_in x C_out floats: 38 MB at 512 -> 512, 57 MB for the PPM bottleneck's 768 direct channels) and the
// same on every call, while the tiles are few on the small maps (64 at 32x32, 16 at 16x16): there MKL spent a
// quarter of the block's time copying the filter into its panel format (perf: scopy), and the product is
// bound by reading the filter, which packing reads twice and writes once. Stored pre-packed (by
// winograd_filter_transform, once per cached weight), the filter is read exactly once per call.
//
// Layout of the packed filter: a (36, C_out, C_in) tensor whose values lie, for each point, in column panels
// of 16 output channels, each panel depth-major: U[p][co][ci] at p * C_out * C_in + (co / 16) * 16 * C_in +
// ci * w + co % 16, w the panel's width (16; the last panel's may be narrower, so that nothing is padded and
// the tensor keeps the plain transform's shape, C_out included, which the ops check against the bias). The
// kernel's B operand, one panel over a range of depth, is then one contiguous run of memory. The width 16
// is fixed, whatever the vector ISA, so that the layout does not depend on the build.
//
// The product, BLIS's loop structure (Van Zee and van de Geijn, "BLIS: A Framework for Rapidly Instantiating
// BLAS Functionality", 2015): for each point, depth blocks of kDepthBlock; V's rows of that depth block are
// packed into row panels of kRows (interleaved [k][row], L2-resident); for each column panel (its depth block,
// 16 KB, stays in L1) the kernel runs over every row panel, kRows x 16 accumulators in registers, one
// multiply-add per (row, column, depth) with the depth in order.
//
// Summation order, four levels, each in order from zero: chains of kChain fused multiply-adds over
// consecutive depths; kChainsPerGroup chains' sums added into a group sum; a depth block's groups added
// (kDepthBlock); the blocks' sums added. Why: a sum's rounding error grows with the length of each chain of
// additions, and the Winograd output transform (weights up to 8 x 8) amplifies the products' errors against
// outputs that are much smaller than the products. One chain per depth block of 256 measured 7-15x ATen's
// float32 error for the whole convolution against float64 on an AVX-512 machine (2026-11-28), where oneDNN's
// direct convolution is more accurate than on the AVX2 machine the kernel was first measured on; these
// levels (8, 8, 256) bring it to 2.6-3.3x (tests/test_winograd_conv_bn_relu.py allows 4x), the products
// alone to 0.3x MKL's float32 bmm error at the head's depths, at no measured cost in time (102 against 106 ms
// for 512 -> 512 at 64x64, batch 2; the group and chain sums live in registers, spilled on AVX2).
// Determinism: that order is fixed by the shapes, so an element's bits depend on neither the thread count
// nor the split of work (which only decides which thread computes which elements). Explicit
// multiply-adds (at::vec::fmadd: one rounding per step) rather than the separate multiply and add of the rest
// of the extension (built with -ffp-contract=off): here each output is a dot product of C_in terms, computed
// in one place, and MKL's sgemm, which this replaces, fuses them too.
#pragma once

#include "common.h"

#include <ATen/Parallel.h>

namespace upernet_fast_cpp {
namespace winograd {

constexpr int64_t kPanel = 16;        // output channels per packed column panel (the filter's last dimension)
constexpr int64_t kDepthBlock = 256;  // depth per pass: a column panel's block is 16 KB (L1)
constexpr int64_t kChain = 8;         // multiply-adds per chain (the summation order above)
constexpr int64_t kChainsPerGroup = 8;  // chains per group sum
constexpr int64_t kPoints = 36;       // transform-domain positions of F(4x4, 3x3): 6 x 6 independent products

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVecsPerRow = kPanel / Vec::size();  // 2 on AVX2 and NEON, 1 on AVX-512
// Rows per register block: kRows x kVecsPerRow accumulators plus kVecsPerRow loads of the panel and one
// broadcast fit the 16 vector registers of AVX2 (12 + 2 + 1); AVX-512 has 32 (12 + 1 + 1).
constexpr int64_t kRows = kVecsPerRow >= 2 ? 6 : 12;
static_assert(kPanel % Vec::size() == 0, "a panel must be whole vectors");

inline int64_t column_panels(int64_t out_channels) { return (out_channels + kPanel - 1) / kPanel; }

// Where an operand or result matrix lies: element (row, column) at data[row * row_stride + column *
// column_stride]. The products' V and M are row-major (channels_last: tile-major) or column-major (NCHW:
// channel-major), each point's matrix point_stride floats after the previous one.
struct Matrix {
  float* data;
  int64_t row_stride, column_stride, point_stride;
  float* at(int64_t point, int64_t row, int64_t column) const {
    return data + point * point_stride + row * row_stride + column * column_stride;
  }
};

using Accumulators = Vec[kRows][kVecsPerRow];

inline void zero(Accumulators& sums) {
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < kVecsPerRow; ++v) sums[r][v] = Vec(0.f);
}

inline void add_into(Accumulators& sums, const Accumulators& part) {
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < kVecsPerRow; ++v) sums[r][v] = sums[r][v] + part[r][v];
}

// rows x kPanel block of the result: c (rows x columns valid) = a (packed [depth][kRows]) @ b (packed
// [depth][kPanel]), plus c's current value when accumulate (a later depth block).
inline void register_block(int64_t depth, const float* a, const float* b, const Matrix& out, float* c, int64_t rows,
                           int64_t columns, bool accumulate) {
  // The three levels inside a depth block (see "Summation order" above): chains of kChain multiply-adds from
  // zero, kChainsPerGroup chains added into a group sum from zero, the groups added into the block's sum.
  Vec sum[kRows][kVecsPerRow], group[kRows][kVecsPerRow], chain[kRows][kVecsPerRow];
  zero(sum);
  for (int64_t g0 = 0; g0 < depth; g0 += kChain * kChainsPerGroup) {
    zero(group);
    const int64_t g1 = std::min(depth, g0 + kChain * kChainsPerGroup);
    for (int64_t k0 = g0; k0 < g1; k0 += kChain) {
      zero(chain);
      const int64_t k1 = std::min(g1, k0 + kChain);
      for (int64_t k = k0; k < k1; ++k) {
        Vec panel[kVecsPerRow];
        for (int64_t v = 0; v < kVecsPerRow; ++v) panel[v] = Vec::loadu(b + k * kPanel + v * Vec::size());
        const float* ak = a + k * kRows;
        for (int64_t r = 0; r < kRows; ++r) {
          const Vec value(ak[r]);
          for (int64_t v = 0; v < kVecsPerRow; ++v) chain[r][v] = at::vec::fmadd(value, panel[v], chain[r][v]);
        }
      }
      add_into(group, chain);
    }
    add_into(sum, group);
  }
  if (out.column_stride == 1 && rows == kRows && columns == kPanel) {
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t v = 0; v < kVecsPerRow; ++v) {
        float* dst = c + r * out.row_stride + v * Vec::size();
        (accumulate ? Vec::loadu(dst) + sum[r][v] : sum[r][v]).store(dst);
      }
    }
    return;
  }
  // An edge block or a column-major result (NCHW): through a staging block, the same float operations.
  alignas(64) float staging[kRows][kPanel];
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < kVecsPerRow; ++v) sum[r][v].store(staging[r] + v * Vec::size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t n = 0; n < columns; ++n) {
      float& dst = c[r * out.row_stride + n * out.column_stride];
      dst = accumulate ? dst + staging[r][n] : staging[r][n];
    }
  }
}

// Rows [0, rows) x depth [k0, k0 + depth) of point p's V, into row panels [panel][k][kRows] (rows past the
// end zero).
inline void pack_rows(const Matrix& v, int64_t p, int64_t rows, int64_t k0, int64_t depth, float* packed) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t count = std::min(kRows, rows - r0);
    float* dst = packed + r0 * depth;
    if (v.row_stride == 1) {  // column-major V (NCHW): each depth's rows are one contiguous run
      for (int64_t k = 0; k < depth; ++k) {
        const float* src = v.at(p, r0, k0 + k);
        for (int64_t r = 0; r < kRows; ++r) dst[k * kRows + r] = r < count ? src[r] : 0.f;
      }
    } else {
      for (int64_t r = 0; r < kRows; ++r) {
        const float* src = v.at(p, r0 + r, k0);
        if (r < count) {
          for (int64_t k = 0; k < depth; ++k) dst[k * kRows + r] = src[k * v.column_stride];
        } else {
          for (int64_t k = 0; k < depth; ++k) dst[k * kRows + r] = 0.f;
        }
      }
    }
  }
}

// Where the packed values of U[p][co][ci] lie (see the layout above) in a transform of in_channels.
inline int64_t packed_offset(int64_t p, int64_t co, int64_t ci, int64_t out_channels, int64_t in_channels) {
  const int64_t panel = co / kPanel, width = std::min(kPanel, out_channels - panel * kPanel);
  return (p * out_channels + panel * kPanel) * in_channels + ci * width + co % kPanel;
}

// M[p] = V[p] @ U[p]^T for the 36 points: v (rows x depth), m (rows x out_channels), filter the packed
// transform of filter_depth >= depth input channels, of which the first depth are used (the low-resolution
// split convolves the others its own way).
inline void transform_domain_products(const Matrix& v, const float* filter, int64_t filter_depth, const Matrix& m,
                                      int64_t rows, int64_t depth, int64_t out_channels) {
  const int64_t panels = column_panels(out_channels);
  // Work items: (point, group of column panels). One group per point unless there are few points per thread:
  // each item packs its point's rows once per depth block, so fewer groups pack less.
  const int64_t threads = at::get_num_threads();
  const int64_t groups = std::min(panels, std::max<int64_t>(1, (4 * threads + kPoints - 1) / kPoints));
  const int64_t panels_per_group = (panels + groups - 1) / groups;
  const int64_t row_panels = (rows + kRows - 1) / kRows;
  at::parallel_for(0, kPoints * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> packed(row_panels * kRows * std::min(depth, kDepthBlock));
    std::vector<float> narrow_panel;  // the last panel's depth block, padded to kPanel columns with zeros
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / groups, group = item % groups;
      const int64_t first_panel = group * panels_per_group;
      const int64_t last_panel = std::min(panels, first_panel + panels_per_group);
      for (int64_t k0 = 0; k0 < depth; k0 += kDepthBlock) {
        const int64_t block = std::min(kDepthBlock, depth - k0);
        pack_rows(v, p, rows, k0, block, packed.data());
        for (int64_t panel = first_panel; panel < last_panel; ++panel) {
          const int64_t columns = std::min(kPanel, out_channels - panel * kPanel);
          const float* b = filter + packed_offset(p, panel * kPanel, k0, out_channels, filter_depth);
          if (columns < kPanel) {
            narrow_panel.assign(block * kPanel, 0.f);
            for (int64_t k = 0; k < block; ++k) std::copy_n(b + k * columns, columns, &narrow_panel[k * kPanel]);
            b = narrow_panel.data();
          }
          for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
            register_block(block, packed.data() + r0 * block, b, m, m.at(p, r0, panel * kPanel),
                           std::min(kRows, rows - r0), columns, k0 > 0);
          }
        }
      }
    }
  });
}

}  // namespace winograd
}  // namespace upernet_fast_cpp
