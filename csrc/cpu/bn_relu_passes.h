// BatchNorm + ReLU on the CPU, the arithmetic under bn_relu.cpp's ops: the per-value expressions that forward and
// backward share (so that the ReLU mask and every sum have the same bits wherever they are computed), and the
// per-channel passes built on them: a chunk's moments, the NCHW rows' apply and grad_x, the fused backward's sums
// that keep each pixel's g_relu, and the small-map blocks (a block of channels one per vector lane).
//
// Split from bn_relu.cpp, which keeps the ops (argument checks, allocation, the parallel partition and the
// registration) and is the only file that includes this one. Its functions keep the internal linkage they had
// there (an unnamed namespace, which a header shared by several files would not use): the compiler then inlines
// and emits them exactly as before the split (checked: the same instructions in bn_relu.o), so the same code,
// the same bits and the same speed.
#pragma once

#include "reduce.h"

#include <array>
#include <utility>

namespace upernet_fast_cpp {
namespace {

template <typename opmath_t>
using Vec = at::vec::Vectorized<opmath_t>;

// The pre-ReLU value, one expression shared by forward and backward so the ReLU mask is identical
// (kernels/conv_bn_relu.py's _bn_affine): ((x - mean) * invstd) * weight + bias.
template <typename opmath_t>
inline Vec<opmath_t> bn_affine(const Vec<opmath_t>& x, const Vec<opmath_t>& mean, const Vec<opmath_t>& invstd,
                               const Vec<opmath_t>& weight, const Vec<opmath_t>& bias) {
  return (x - mean) * invstd * weight + bias;
}

// The forward's output, relu(bn_affine(x)): one definition for apply's rows and the small-map blocks (the same bits).
template <typename opmath_t>
inline Vec<opmath_t> bn_relu_value(const Vec<opmath_t>& x, const Vec<opmath_t>& mean, const Vec<opmath_t>& invstd,
                                   const Vec<opmath_t>& weight, const Vec<opmath_t>& bias) {
  return at::vec::maximum(bn_affine(x, mean, invstd, weight, bias), Vec<opmath_t>(0));
}

template <typename opmath_t>
inline Vec<opmath_t> where_positive(const Vec<opmath_t>& z, const Vec<opmath_t>& v) {
  return Vec<opmath_t>::blendv(Vec<opmath_t>(0), v, z > Vec<opmath_t>(0));
}

#if defined(CPU_CAPABILITY_AVX512)
// The same selection with the comparison's mask register used directly: at::vec's blendv takes its mask as a
// vector, so the generic form compares, widens the mask register to a vector and compares that back to a mask (three
// instructions where one masked move follows the comparison). The backward evaluates it for every value it reads.
template <>
inline Vec<float> where_positive(const Vec<float>& z, const Vec<float>& v) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GT_OQ), v);
}
#endif

// The backward's two per-pixel terms, summed per channel: {g_relu, g_relu * (x - mean)} (the second sum times
// invstd is sum(g_relu * xhat)). One definition for backward_reduce and backward_fused: the same bits.
template <typename opmath_t>
inline std::array<Vec<opmath_t>, 2> bn_backward_terms(const Vec<opmath_t>& x, const Vec<opmath_t>& g,
                                                      const Vec<opmath_t>& mean, const Vec<opmath_t>& invstd,
                                                      const Vec<opmath_t>& weight, const Vec<opmath_t>& bias) {
  const auto g_relu = where_positive(bn_affine(x, mean, invstd, weight, bias), g);
  return {g_relu, g_relu * (x - mean)};
}

// grad_x = weight * invstd * (g_relu - mean(g_relu) - xhat * mean(g_relu * xhat)), the means over the batch and
// xhat = (x - mean) * invstd, folded per channel into grad_x = a * g_relu + ((x - mean) * b + c) with a = weight *
// invstd, b = -a * invstd * mean(g_relu * xhat), c = -a * mean(g_relu): two fused multiply-adds per value where the
// unfolded form takes six operations, on a pass that is most of the backward's arithmetic. T is a scalar or a Vec:
// the same operations in the same order give the same bits per channel either way (no FMA contraction, see
// cpp_extension.py), so every kernel that computes grad_x agrees bit for bit whichever form it computed them in.
template <typename T>
struct GradInputCoefs {
  T a, b, c;
};

template <typename T>
inline GradInputCoefs<T> grad_input_coefs(const T& invstd, const T& weight, const T& mean_g, const T& mean_gx) {
  const T a = weight * invstd;
  return {a, T(0) - a * invstd * mean_gx, T(0) - a * mean_g};
}

// grad_x from a pixel's g_relu and x - mean (the fused kernels keep g_relu from their sums' pass); bn_grad_input
// computes both from x and g first. One definition for backward_input and backward_fused.
template <typename opmath_t>
inline Vec<opmath_t> bn_grad_input_from(const Vec<opmath_t>& g_relu, const Vec<opmath_t>& x_minus_mean,
                                        const GradInputCoefs<Vec<opmath_t>>& k) {
  return at::vec::fmadd(k.a, g_relu, at::vec::fmadd(x_minus_mean, k.b, k.c));
}

template <typename opmath_t>
inline Vec<opmath_t> bn_grad_input(const Vec<opmath_t>& x, const Vec<opmath_t>& g, const Vec<opmath_t>& mean,
                                   const Vec<opmath_t>& invstd, const Vec<opmath_t>& weight,
                                   const Vec<opmath_t>& bias, const GradInputCoefs<Vec<opmath_t>>& k) {
  const auto g_relu = where_positive(bn_affine(x, mean, invstd, weight, bias), g);
  return bn_grad_input_from(g_relu, x - mean, k);
}

// One chunk's moments, pixels [p0, p1), by the corrected two-pass algorithm (Chan, Golub and LeVeque, "Algorithms
// for computing the sample variance", 1983): a first mean, then the sums of the deviations d = x - mean and of d^2;
// the mean corrected by sum(d) / n, M2 = sum(d^2) - sum(d)^2 / n. NCHW: channels [c0, c1), into mean_out[c - c0]
// and m2_out[c - c0]; channels_last: every channel (c0 = 0, c1 = C), into [0, C).
// Why the correction: a float32 sum of many values far from zero (a map whose mean dwarfs its spread, as after a
// 1x1 conv of the PPM's pooled features) rounds the first mean by several ulps, and BatchNorm's backward turns
// that into a relative error of (mean error) / (spread) on the gradients; the deviations are small and their sum
// nearly exact. Measured on a converted Swin-T model's PPM branch (6x6 maps, all pixels of an image equal): the
// gradient of its conv weight 12x transformers' own float32 error against float64 before, within it after.
// Why a block of NCHW channels, each phase over the whole block: a channel's two passes are chained through two
// divisions and two lane sums; on small maps (the PPM's 512 channels of 1x1 to 6x6 pixels) that latency chain,
// channel after channel, was most of the time. Phase by phase, the block's channels are independent work the
// core overlaps. Each channel's arithmetic is the same as one at a time: the same bits.
template <typename scalar_t, typename opmath_t>
void chunk_moments(const DenseMap& m, const scalar_t* xp, int64_t p0, int64_t p1, int64_t c0, int64_t c1,
                   opmath_t* mean_out, opmath_t* m2_out, Scratch<opmath_t>& tmp) {
  const scalar_t* none = nullptr;
  const opmath_t count = static_cast<opmath_t>(p1 - p0);
  const bool cl = m.cl;
  const int64_t channels = cl ? m.C : c1 - c0;
  auto sum_x = [](const Lanes<opmath_t>&, Vec<opmath_t> v, Vec<opmath_t>, Vec<opmath_t>) {
    return std::array<Vec<opmath_t>, 1>{v};
  };
  if (cl) {
    chunk_sums<1>(m, xp, none, none, p0, p1, 0, sum_x, mean_out, tmp);
  } else {
    for (int64_t c = c0; c < c1; ++c) chunk_sums<1>(m, xp, none, none, p0, p1, c, sum_x, mean_out + (c - c0), tmp);
  }
  for (int64_t k = 0; k < channels; ++k) mean_out[k] = mean_out[k] / count;
  // [sum d of every channel, sum d^2 of every channel] (chunk_sums<2>'s channels_last output).
  tmp.sums.resize(2 * channels);
  opmath_t* sums = tmp.sums.data();
  if (cl) {
    auto deviations = [mean_out](const Lanes<opmath_t>& lanes, Vec<opmath_t> v, Vec<opmath_t>, Vec<opmath_t>) {
      const Vec<opmath_t> d = v - lanes.get(mean_out);
      return std::array<Vec<opmath_t>, 2>{d, d * d};
    };
    chunk_sums<2>(m, xp, none, none, p0, p1, 0, deviations, sums, tmp);
  } else {
    for (int64_t k = 0; k < channels; ++k) {
      const Vec<opmath_t> mean_v(mean_out[k]);
      auto deviations = [mean_v](const Lanes<opmath_t>&, Vec<opmath_t> v, Vec<opmath_t>, Vec<opmath_t>) {
        const Vec<opmath_t> d = v - mean_v;
        return std::array<Vec<opmath_t>, 2>{d, d * d};
      };
      opmath_t pair[2];
      chunk_sums<2>(m, xp, none, none, p0, p1, c0 + k, deviations, pair, tmp);
      sums[k] = pair[0];
      sums[channels + k] = pair[1];
    }
  }
  for (int64_t k = 0; k < channels; ++k) {
    const opmath_t sum_d = sums[k], sum_d2 = sums[channels + k];
    mean_out[k] = mean_out[k] + sum_d / count;
    m2_out[k] = std::max(opmath_t(0), sum_d2 - sum_d * sum_d / count);
  }
}

// A channel's (mean, biased variance) from its chunks' moments (part_mean[i * stride], part_m2[i * stride]),
// combined in chunk order, two-pass (kernels/conv_bn_relu.py's _stats_finalize_kernel): the global mean from
// the count-weighted chunk means, then M2 = sum(M2_i + n_i * (mean_i - mean)^2).
template <typename opmath_t>
std::pair<opmath_t, opmath_t> combine_moments(const DenseMap& m, const opmath_t* part_mean, const opmath_t* part_m2,
                                              int64_t stride) {
  const int64_t chunks = m.chunks();
  const opmath_t P = static_cast<opmath_t>(m.P());
  opmath_t acc(0);
  for (int64_t i = 0; i < chunks; ++i) {
    const opmath_t n = static_cast<opmath_t>(std::min(kChunkPixels, m.P() - i * kChunkPixels));
    acc += n * part_mean[i * stride];
  }
  const opmath_t mu = acc / P;
  opmath_t m2(0);
  for (int64_t i = 0; i < chunks; ++i) {
    const opmath_t n = static_cast<opmath_t>(std::min(kChunkPixels, m.P() - i * kChunkPixels));
    const opmath_t d = part_mean[i * stride] - mu;
    m2 += part_m2[i * stride] + n * d * d;
  }
  return {mu, m2 / P};
}

// Channel c's planes of an NCHW map (one row of HW pixels per image), elementwise: y = relu(bn_affine(x)) (apply's
// expression), or grad_x = bn_grad_input(x, g) (backward_input's). Scratch rows tx, tg, to hold HW opmath values.
template <typename scalar_t, typename opmath_t>
void apply_rows(const DenseMap& m, const scalar_t* xp, scalar_t* yp, int64_t c, const Vec<opmath_t>& mean,
                const Vec<opmath_t>& invstd, const Vec<opmath_t>& weight, const Vec<opmath_t>& bias, opmath_t* tx,
                opmath_t* to) {
  for (int64_t n = 0; n < m.N; ++n) {
    const int64_t off = (n * m.C + c) * m.HW;
    const opmath_t* xr = row_in(xp + off, 1, m.HW, tx);
    opmath_t* o = row_buffer<scalar_t, opmath_t>(yp + off, 1, to);
    vec_for<opmath_t>(m.HW, [&](int64_t i, int64_t cnt) {
      vstore(o + i, cnt, bn_relu_value(vload(xr + i, cnt), mean, invstd, weight, bias));
    });
    row_out(yp + off, 1, m.HW, o);
  }
}

// grad_x of channel c from each pixel's g_relu kept by the sums' pass (kept[n * HW + hw]): bn_grad_input's bits
// without recomputing the affine and the ReLU mask.
template <typename scalar_t, typename opmath_t>
void grad_rows_from_kept(const DenseMap& m, const scalar_t* xp, const opmath_t* kept, scalar_t* dp, int64_t c,
                         const Vec<opmath_t>& mean, const GradInputCoefs<Vec<opmath_t>>& k, opmath_t* tx,
                         opmath_t* to) {
  for (int64_t n = 0; n < m.N; ++n) {
    const int64_t off = (n * m.C + c) * m.HW;
    const opmath_t* xr = row_in(xp + off, 1, m.HW, tx);
    const opmath_t* gr = kept + n * m.HW;
    opmath_t* o = row_buffer<scalar_t, opmath_t>(dp + off, 1, to);
    vec_for<opmath_t>(m.HW, [&](int64_t i, int64_t cnt) {
      vstore(o + i, cnt, bn_grad_input_from(vload(gr + i, cnt), vload(xr + i, cnt) - mean, k));
    });
    row_out(dp + off, 1, m.HW, o);
  }
}

template <typename scalar_t, typename opmath_t>
void grad_rows(const DenseMap& m, const scalar_t* xp, const scalar_t* gp, scalar_t* dp, int64_t c,
               const Vec<opmath_t>& mean, const Vec<opmath_t>& invstd, const Vec<opmath_t>& weight,
               const Vec<opmath_t>& bias, const GradInputCoefs<Vec<opmath_t>>& k, opmath_t* tx, opmath_t* tg,
               opmath_t* to) {
  for (int64_t n = 0; n < m.N; ++n) {
    const int64_t off = (n * m.C + c) * m.HW;
    const opmath_t* xr = row_in(xp + off, 1, m.HW, tx);
    const opmath_t* gr = row_in(gp + off, 1, m.HW, tg);
    opmath_t* o = row_buffer<scalar_t, opmath_t>(dp + off, 1, to);
    vec_for<opmath_t>(m.HW, [&](int64_t i, int64_t cnt) {
      vstore(o + i, cnt, bn_grad_input(vload(xr + i, cnt), vload(gr + i, cnt), mean, invstd, weight, bias, k));
    });
    row_out(dp + off, 1, m.HW, o);
  }
}

// One channel's backward sums {sum(g_relu), sum(g_relu * (x - mean))} over its planes (at most kKeptPixels pixels:
// one chunk), each pixel's g_relu kept in kept[n * HW + hw] for the grad_x pass: chunk_sums<2>'s order and
// arithmetic on bn_backward_terms (image rows in order, vector lanes, a row's tail on its first lanes, then lane_sum),
// written out with plain vector locals. Through chunk_sums' generic lambda the compiler kept each vector's terms in
// a std::array on the stack, one more store per vector on the backward's hottest loop.
template <typename scalar_t, typename opmath_t>
std::array<opmath_t, 2> kept_grad_sums(const DenseMap& m, const scalar_t* xp, const scalar_t* gp, int64_t c,
                                       const Vec<opmath_t>& mean, const Vec<opmath_t>& invstd,
                                       const Vec<opmath_t>& weight, const Vec<opmath_t>& bias, opmath_t* kept,
                                       opmath_t* tx, opmath_t* tg) {
  using V = Vec<opmath_t>;
  constexpr int64_t L = V::size();
  const int64_t HW = m.HW;  // (a local: the kept stores could alias m, which the loop would then reread)
  V a(0), q(0);
  for (int64_t n = 0; n < m.N; ++n) {
    const int64_t off = (n * m.C + c) * HW;
    const opmath_t* xr = row_in(xp + off, 1, HW, tx);
    const opmath_t* gr = row_in(gp + off, 1, HW, tg);
    opmath_t* k = kept + n * HW;
    int64_t i = 0;
    for (; i + L <= HW; i += L) {
      const V x = V::loadu(xr + i);
      const V g_relu = where_positive(bn_affine(x, mean, invstd, weight, bias), V::loadu(gr + i));
      g_relu.store(k + i);
      a = a + g_relu;
      q = q + g_relu * (x - mean);
    }
    if (i < HW) {
      const int64_t cnt = HW - i;
      const V x = vload(xr + i, cnt);
      const V g_relu = where_positive(bn_affine(x, mean, invstd, weight, bias), vload(gr + i, cnt));
      vstore(k + i, cnt, g_relu);
      a = a + first_lanes(g_relu, cnt);
      q = q + first_lanes(g_relu * (x - mean), cnt);
    }
  }
  return {lane_sum(a), lane_sum(q)};
}

// ---- small NCHW maps (reduce.h small_nchw_stats, small_nchw_grads): a block of channels in vector lanes ---------
// Each function is the channels_last kernels' arithmetic lane-wise, written out again as vector expressions (the
// same operations in the same order: the same bits as the channels_last map's).

// Each lane's (mean, biased variance) over the P pixels of a transposed block X: chunk_moments' arithmetic (one
// chunk), then combine_moments' for that one chunk.
template <typename opmath_t>
std::pair<Vec<opmath_t>, Vec<opmath_t>> block_moments(const opmath_t* X, int64_t P) {
  using V = Vec<opmath_t>;
  constexpr int64_t L = V::size();
  V sum(0);
  for (int64_t p = 0; p < P; ++p) sum = sum + V::loadu(X + p * L);
  const V count(static_cast<opmath_t>(P));
  V mean = sum / count;
  V sum_d(0), sum_d2(0);
  for (int64_t p = 0; p < P; ++p) {
    const V d = V::loadu(X + p * L) - mean;
    sum_d = sum_d + d;
    sum_d2 = sum_d2 + d * d;
  }
  mean = mean + sum_d / count;
  const V m2_raw = sum_d2 - sum_d * sum_d / count;
  const V m2 = where_positive(m2_raw, m2_raw);  // std::max(0, m2): 0 for NaN too
  // combine_moments: acc = 0 + n * mean, mu = acc / P, M2 = 0 + (M2_chunk + n * d * d), var = M2 / P (n = P).
  const V mu = (V(0) + count * mean) / count;
  const V d = mean - mu;
  return {mu, (V(0) + (m2 + count * d * d)) / count};
}

// Each lane's backward sums {sum(g_relu), sum(g_relu * (x - mean))} over a transposed block (X, G): backward_reduce's
// chunk sums (from 0, pixel order), then channel_sums2's combination of one chunk (0 + the chunk's sum).
// keep: G then holds each pixel's g_relu and X its x - mean, for bn_grad_input_from (the compiler computes x - mean
// once: bn_affine's and this one are the same operation on the same values).
template <typename opmath_t, bool keep>
std::array<Vec<opmath_t>, 2> block_grad_sums(opmath_t* X, opmath_t* G, int64_t P, const Vec<opmath_t>& mean,
                                             const Vec<opmath_t>& invstd, const Vec<opmath_t>& weight,
                                             const Vec<opmath_t>& bias) {
  using V = Vec<opmath_t>;
  constexpr int64_t L = V::size();
  V a(0), q(0);
  for (int64_t p = 0; p < P; ++p) {
    const V x = V::loadu(X + p * L);
    const auto terms = bn_backward_terms(x, V::loadu(G + p * L), mean, invstd, weight, bias);
    a = a + terms[0];
    q = q + terms[1];
    if constexpr (keep) {
      terms[0].store(G + p * L);
      (x - mean).store(X + p * L);
    }
  }
  return {V(0) + a, V(0) + q};
}

// The backward on a small NCHW map, block by block: each channel's sums into sg and sgx (backward_reduce's), and,
// where dp is not null, its grad_x (backward_input's expression, count = N*H*W) into dp, computed on the transposed
// block (a full vector per pixel where the rows would leave most of each vector empty) and transposed back.
template <typename scalar_t, typename opmath_t>
void small_backward(const DenseMap& m, const scalar_t* xp, const scalar_t* gp, const ChannelValues<opmath_t>& mu,
                    const ChannelValues<opmath_t>& is, const ChannelValues<opmath_t>& w,
                    const ChannelValues<opmath_t>& b, opmath_t* sg, opmath_t* sgx, scalar_t* dp) {
  using V = Vec<opmath_t>;
  constexpr int64_t L = V::size();
  const int64_t P = m.P();
  const opmath_t inv_count = static_cast<opmath_t>(1.0 / static_cast<double>(P));  // backward_input's
  for_each_block<opmath_t>(m, 3 * P * L, [&](int64_t c0, int64_t lanes, opmath_t* X) {
    opmath_t* G = X + P * L;
    load_block(m, xp, c0, lanes, X);
    load_block(m, gp, c0, lanes, G);
    const V mean_v = vload(mu.data() + c0, lanes), is_v = vload(is.data() + c0, lanes);
    const V w_v = vload(w.data() + c0, lanes), b_v = vload(b.data() + c0, lanes);
    // With grad_x to compute, the sums' pass keeps each pixel's g_relu (in G) and x - mean (in X) for it.
    const auto sums = dp ? block_grad_sums<opmath_t, true>(X, G, P, mean_v, is_v, w_v, b_v)
                         : block_grad_sums<opmath_t, false>(X, G, P, mean_v, is_v, w_v, b_v);
    const V sum_gxhat = sums[1] * is_v;
    vstore(sg + c0, lanes, sums[0]);
    vstore(sgx + c0, lanes, sum_gxhat);
    if (!dp) return;
    // backward_input's coefficients (sum * (1 / count) for the means), lane by lane.
    const auto k = grad_input_coefs(is_v, w_v, sums[0] * V(inv_count), sum_gxhat * V(inv_count));
    // bn_grad_input on the kept g_relu and x - mean: the same bits, without recomputing the affine and the mask.
    opmath_t* D = G + P * L;
    for (int64_t p = 0; p < P; ++p) {
      bn_grad_input_from(V::loadu(G + p * L), V::loadu(X + p * L), k).store(D + p * L);
    }
    store_block(m, D, c0, lanes, dp);
  });
}

}  // namespace
}  // namespace upernet_fast_cpp
