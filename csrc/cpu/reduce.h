// Per-channel passes over a dense (N, C, H, W) map, NCHW or channels_last: elementwise maps and
// deterministic per-channel sums (the BatchNorm+ReLU kernels).
//
// Determinism: a sum over the P = N*H*W pixels of a channel is split over a FIXED partition of the pixels
// (chunks of kChunkPixels, a constant), each chunk summed in one fixed order (vector lanes by position, the
// lanes then combined by a fixed pairwise tree, lane_sum), and the chunk results combined sequentially in chunk
// order by the caller. Nothing depends on the number of threads: parallel_for only decides which thread computes
// which chunk.
#pragma once

#include "common.h"

#include <ATen/cpu/vec/functional.h>

#include <array>
#include <functional>

namespace upernet_fast_cpp {

// Pixels per chunk of a per-channel sum; fixed, so the summation order is a function of the shape only.
constexpr int64_t kChunkPixels = 2048;

struct DenseMap {
  int64_t N, C, HW;
  bool cl;  // channels_last: element (p, c) at p * C + c; else (n, c, hw) at (n * C + c) * HW + hw
  int64_t P() const { return N * HW; }
  int64_t chunks() const { return (P() + kChunkPixels - 1) / kChunkPixels; }
};

// x as a dense map: NCHW-contiguous or channels_last; any other strides are copied once to NCHW (the
// Python op hands dense tensors; the copy keeps odd callers correct).
inline Tensor dense_map(const Tensor& x, DenseMap& m) {
  Tensor d = x;
  const bool cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (!cl && !x.is_contiguous()) d = x.contiguous();
  m = DenseMap{x.size(0), x.size(1), x.size(2) * x.size(3), cl};
  return d;
}

// The same layout as m for another tensor of the same shape (a gradient autograd may hand in another layout).
inline Tensor like_map(const Tensor& t, const DenseMap& m) {
  return t.contiguous(m.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// Lanes of one vector step: channel c (NCHW: one channel, values along pixels) or channels [c, c + n)
// (channels_last). get() reads a per-channel parameter array accordingly.
template <typename opmath_t>
struct Lanes {
  using Vec = at::vec::Vectorized<opmath_t>;
  bool cl;
  int64_t c, n;
  Vec get(const opmath_t* arr) const { return cl ? vload(arr + c, n) : Vec(arr[c]); }
};

// Work items per parallel task when each item is `values` values: tasks of at least kTaskValues values. A parallel
// region costs microseconds (the other thread's wake-up), more than a small map's whole pass (the PPM's 512
// channels of 6x6 pixels, a thread-count-free 18K values); only speed depends on the split.
constexpr int64_t kTaskValues = 8192;

inline int64_t tasks_of(int64_t values) {
  return std::max<int64_t>(1, kTaskValues / std::max<int64_t>(values, 1));
}

// out = f(lanes, x, a, b) elementwise over the map (a, b: optional same-layout inputs, null when unused),
// out in x's layout. f uses at::vec operators only.
template <typename scalar_t, typename F>
void map_elementwise(const DenseMap& m, const scalar_t* x, const scalar_t* a, const scalar_t* b, scalar_t* out, F f) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t rows = m.cl ? m.P() : m.N * m.C;
  const int64_t len = m.cl ? m.C : m.HW;
  at::parallel_for(0, rows, tasks_of(len), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> tx(len), ta(len), tb(len), to(len);
    // NCHW: row r is channel r % C, counted along rather than divided per row (tens of cycles a division, per
    // row of a few pixels on small maps).
    int64_t channel = m.cl ? 0 : begin % m.C;
    for (int64_t r = begin; r < end; ++r, channel = (m.cl || channel + 1 == m.C) ? 0 : channel + 1) {
      const int64_t off = r * len;
      const opmath_t* xr = row_in(x + off, 1, len, tx.data());
      const opmath_t* ar = a ? row_in(a + off, 1, len, ta.data()) : nullptr;
      const opmath_t* br = b ? row_in(b + off, 1, len, tb.data()) : nullptr;
      opmath_t* o = row_buffer<scalar_t, opmath_t>(out + off, 1, to.data());
      vec_for<opmath_t>(len, [&](int64_t i, int64_t n) {
        const Lanes<opmath_t> lanes{m.cl, m.cl ? i : channel, n};
        auto av = ar ? vload(ar + i, n) : at::vec::Vectorized<opmath_t>(0);
        auto bv = br ? vload(br + i, n) : at::vec::Vectorized<opmath_t>(0);
        vstore(o + i, n, f(lanes, vload(xr + i, n), av, bv));
      });
      row_out(out + off, 1, len, o);
    }
  });
}

// out = f(x, p) elementwise, p the NP per-channel parameter arrays (opmath, C values each) as vectors: one channel's
// values broadcast along an NCHW row, the lanes' channels along a channels_last one. The per-channel affine maps'
// loop (BatchNorm+ReLU forward and eval). Why not map_elementwise: on the pyramid pooling module's maps (512 rows of
// 1 to 36 values) its per-vector generality cost more than the values (C++ loop, 1x512x2x2: 5.9 against 2.4 us):
// here a row reads its parameters once, and a one-pixel NCHW map, which is also a channels_last map, runs along its
// channels (1x512x1x1: 32 vectors instead of 512 partial ones). A row's last partial vector is computed as the full
// vector ending at the row's end (rows of at least one vector): values already written are computed again with the
// same bits, so out must not overlap x.
template <typename scalar_t, size_t NP, typename F>
void map_channel_params(const DenseMap& m, const scalar_t* x, scalar_t* out,
                        const std::array<const at::opmath_type<scalar_t>*, NP>& params, F f) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t width = Vec::size();
  const bool cl = m.cl || m.HW == 1;
  const int64_t rows = cl ? m.P() : m.N * m.C;
  const int64_t len = cl ? m.C : m.HW;
  at::parallel_for(0, rows, tasks_of(len), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> tx, to;  // rows converted to opmath (bfloat16 maps only)
    if constexpr (!std::is_same_v<scalar_t, opmath_t>) {
      tx.resize(len);
      to.resize(len);
    }
    std::array<Vec, NP> p;
    auto at_lane = [&](const opmath_t* xr, opmath_t* o, int64_t i, int64_t n) {
      if (cl) {
        for (size_t k = 0; k < NP; ++k) p[k] = vload(params[k] + i, n);
      }
      vstore(o + i, n, f(vload(xr + i, n), p));
    };
    int64_t channel = cl ? 0 : begin % m.C;  // NCHW: counted along, as map_elementwise does
    for (int64_t r = begin; r < end; ++r, channel = (cl || channel + 1 == m.C) ? 0 : channel + 1) {
      const int64_t off = r * len;
      const opmath_t* xr = row_in(x + off, 1, len, tx.data());
      opmath_t* o = row_buffer<scalar_t, opmath_t>(out + off, 1, to.data());
      if (!cl) {
        for (size_t k = 0; k < NP; ++k) p[k] = Vec(params[k][channel]);
      }
      int64_t i = 0;
      for (; i + width <= len; i += width) at_lane(xr, o, i, width);
      if (i < len) {
        if (len >= width) {
          at_lane(xr, o, len - width, width);
        } else {
          at_lane(xr, o, i, len - i);
        }
      }
      row_out(out + off, 1, len, o);
    }
  });
}

// v's first count lanes, the others 0 (a row's tail): Vec::set(Vec(0), v, count)'s value by a comparison and a blend,
// where Vec::set with a runtime count is a 16-way switch left as a call (which takes v's address). Every per-channel
// sum pads its rows' tails with it.
template <typename opmath_t>
inline at::vec::Vectorized<opmath_t> first_lanes(const at::vec::Vectorized<opmath_t>& v, int64_t count) {
  using Vec = at::vec::Vectorized<opmath_t>;
  return Vec::blendv(Vec(0), v, Vec::arange(opmath_t(0), opmath_t(1)) < Vec(static_cast<opmath_t>(count)));
}

// The sum of a vector's lanes, in a fixed pairwise order (at::vec's shuffle tree: halves, then quarters, ...).
// Why not lane by lane: on small maps (the pyramid pooling module's 512 channels of 1x1 to 6x6 pixels) a channel's
// sum is a handful of vectors, and a chain of 16 dependent additions per sum was most of a channel's time.
template <typename opmath_t>
inline opmath_t lane_sum(const at::vec::Vectorized<opmath_t>& v) {
  return at::vec::vec_reduce_all<opmath_t>(std::plus<at::vec::Vectorized<opmath_t>>(), v);
}

// Scratch rows of one task (inputs converted to opmath when they are not already contiguous opmath rows), and
// per-channel sums of one chunk.
template <typename opmath_t>
struct Scratch {
  std::vector<opmath_t> x, g, y, sums;
  explicit Scratch(int64_t n) : x(n), g(n), y(n) {}
};

// One chunk's K per-channel sums of f(lanes, x, g, y) (f returns std::array<Vec, K>) over pixels [p0, p1).
// NCHW: channel c only, out[k]. channels_last: every channel, out[k * C + c]. g and y may be null. (The fused
// backward's sums, which also keep every pixel's g_relu, have their own loop: bn_relu_passes.h kept_grad_sums.)
template <int K, typename scalar_t, typename opmath_t, typename F>
void chunk_sums(const DenseMap& m, const scalar_t* x, const scalar_t* g, const scalar_t* y, int64_t p0, int64_t p1,
                int64_t c, F f, opmath_t* out, Scratch<opmath_t>& tmp) {
  using Vec = at::vec::Vectorized<opmath_t>;
  if (!m.cl) {
    std::array<Vec, K> acc;
    acc.fill(Vec(0));
    // (image, pixel) of p0 by one division, then image after image: a 64-bit division costs tens of cycles, which
    // counted on small maps, where a chunk is one or two short rows.
    int64_t n = p0 < m.HW ? 0 : p0 / m.HW;
    int64_t hw = p0 - n * m.HW;
    for (int64_t p = p0; p < p1; ++n, hw = 0) {
      const int64_t len = std::min(p1 - p, m.HW - hw);
      const int64_t off = (n * m.C + c) * m.HW + hw;
      const opmath_t* xr = row_in(x + off, 1, len, tmp.x.data());
      const opmath_t* gr = g ? row_in(g + off, 1, len, tmp.g.data()) : nullptr;
      const opmath_t* yr = y ? row_in(y + off, 1, len, tmp.y.data()) : nullptr;
      vec_for<opmath_t>(len, [&](int64_t i, int64_t cnt) {
        const Lanes<opmath_t> lanes{false, c, cnt};
        const auto part = f(lanes, vload(xr + i, cnt), gr ? vload(gr + i, cnt) : Vec(0), yr ? vload(yr + i, cnt) : Vec(0));
        // Padded lanes add 0 (first_lanes, the same helper as bn_relu_passes.h's kept_grad_sums; full vectors skip it).
        if (cnt == Vec::size()) {
          for (int k = 0; k < K; ++k) acc[k] = acc[k] + part[k];
        } else {
          for (int k = 0; k < K; ++k) acc[k] = acc[k] + first_lanes(part[k], cnt);
        }
      });
      p += len;
    }
    for (int k = 0; k < K; ++k) out[k] = lane_sum(acc[k]);
    return;
  }
  for (int k = 0; k < K; ++k) std::fill(out + k * m.C, out + (k + 1) * m.C, opmath_t(0));
  for (int64_t p = p0; p < p1; ++p) {
    const opmath_t* xr = row_in(x + p * m.C, 1, m.C, tmp.x.data());
    const opmath_t* gr = g ? row_in(g + p * m.C, 1, m.C, tmp.g.data()) : nullptr;
    const opmath_t* yr = y ? row_in(y + p * m.C, 1, m.C, tmp.y.data()) : nullptr;
    vec_for<opmath_t>(m.C, [&](int64_t i, int64_t cnt) {
      const Lanes<opmath_t> lanes{true, i, cnt};
      const auto part = f(lanes, vload(xr + i, cnt), gr ? vload(gr + i, cnt) : Vec(0), yr ? vload(yr + i, cnt) : Vec(0));
      for (int k = 0; k < K; ++k) vstore(out + k * m.C + i, cnt, vload(out + k * m.C + i, cnt) + part[k]);
    });
  }
}

// Channels per work item of an NCHW map's per-channel passes: as many as fit kBlockValues values (a few L1-resident
// planes; at least one, at most 16). Only speed depends on it (every channel is computed the same way whatever the
// block): on small maps a channel is a short chain of dependent steps (bn_relu_passes.h's chunk_moments), and a block's
// channels are independent work that the core overlaps phase by phase; on large maps one channel is plenty.
constexpr int64_t kBlockValues = 4096;

inline int64_t block_channels(const DenseMap& m) {
  if (m.cl) return std::max<int64_t>(m.C, 1);  // (never 0: it divides the channel count)
  return std::max<int64_t>(1, std::min<int64_t>(16, kBlockValues / std::max<int64_t>(m.P(), 1)));
}

inline int64_t channel_blocks(const DenseMap& m) {
  return (m.C + block_channels(m) - 1) / block_channels(m);
}

// Runs task(chunk, c0, c1, p0, p1, scratch) for every chunk and, NCHW, every block of channels [c0, c1) (channels_last:
// every channel, c0 = 0, c1 = C), in parallel. task writes that chunk's partial results; the caller combines chunks
// in order.
template <typename opmath_t, typename Task>
void for_each_chunk(const DenseMap& m, Task task) {
  const int64_t blocks = channel_blocks(m), width = block_channels(m);
  const int64_t item_values = (m.cl ? m.C : width) * std::min(kChunkPixels, m.P());
  at::parallel_for(0, m.chunks() * blocks, tasks_of(item_values), [&](int64_t begin, int64_t end) {
    Scratch<opmath_t> tmp(m.cl ? m.C : std::min<int64_t>(kChunkPixels, m.HW));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item / blocks, c0 = (item % blocks) * width, c1 = std::min(c0 + width, m.C);
      const int64_t p0 = chunk * kChunkPixels, p1 = std::min(p0 + kChunkPixels, m.P());
      task(chunk, c0, c1, p0, p1, tmp);
    }
  });
}

// ---- small NCHW maps: blocks of channels transposed, summed as channels_last maps are ------------------------
//
// An NCHW map whose rows are short (the pyramid pooling module's 1x1 to 6x6 maps) leaves vectors along pixels
// mostly empty: most of a channel's time went to partial vectors, lane sums and per-channel chains of dependent
// steps. There, the per-channel sums take each block of Vec::size() channels transposed (load_block, by register
// transposes) into a scratch of pixels x channels, one channel per lane, summed exactly as the channels_last kernels
// sum (in pixel order from 0, one chunk since every bound below is at most kChunkPixels): such a map gives the
// statistics and sums of the same map in channels_last, bit for bit. The one-call training op and the fused backward
// also compute their elementwise outputs on the transposed block and transpose them back (store_block); the
// composite's kernels write them by rows, as on large maps (no reduction there: the same bits either way). Which path
// a map takes depends on its shape only, never on the number of threads.
// The bounds, measured side by side against the large-map path (2 threads, 512 channels), with one vector gather
// per pixel where load_block now transposes: the forward's statistics gained up to 2x on 6x6 rows at batch 1, 2 and
// 4 (36 to 144 pixels per channel) and lost on 12x12 and 16x16 rows (0.9x-1.0x); the backward, which reads two
// inputs, gained at 36 pixels (1.2x-1.5x) and was on par or slower from 72 (0.7x at 144). With the transposes (and
// the outputs on the block), 1x512x6x6 gained 1.2x more, and bounds of 256 pixels measured on par at 72 and 144
// pixels but 0.66x-0.81x at 12x12 and 16x16, so they stay. The forward (statistics) and the backward (sums) each take
// one rule everywhere, so that the one-call op and the composite, and the fused backward and the two-op one, keep
// the same bits.
constexpr int64_t kSmallRow = 64;          // forward: rows of at most this many pixels ...
constexpr int64_t kSmallStatsPixels = 256;  // ... and at most this many pixels per channel over the batch
constexpr int64_t kSmallGradPixels = 64;    // backward: at most this many pixels per channel over the batch
// The fused backward keeps each pixel's g_relu between its two passes on channels of at most this many pixels, in
// blocks of this many values (see bn_relu.cpp fused_into).
constexpr int64_t kKeptPixels = 1024;
static_assert(kSmallStatsPixels <= kChunkPixels && kSmallGradPixels <= kChunkPixels && kKeptPixels <= kChunkPixels,
              "a small map's sums are one chunk's");

inline bool small_nchw_stats(const DenseMap& m) {
  return !m.cl && m.HW <= kSmallRow && m.P() <= kSmallStatsPixels;
}

inline bool small_nchw_grads(const DenseMap& m) {
  return !m.cl && m.P() <= kSmallGradPixels;
}

#if defined(CPU_CAPABILITY_AVX512)
// An up-to-16 x 16 float tile transposed in registers: dst[j * ld_dst + i] = src[i * ld_src + j] for i < M, j < N
// (masked loads and stores at the edges; rows past M read as zeros). The shuffle network of at::vec's
// transpose_block, written with the tile's size fixed: at::vec's runtime-sized transpose_mxn keeps its sixteen
// vectors in memory, and was slower than the gathers it was meant to replace.
inline void transpose_tile16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t M, int64_t N) {
  const __mmask16 cols = static_cast<__mmask16>((1u << N) - 1), rows = static_cast<__mmask16>((1u << M) - 1);
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = i < M ? _mm512_maskz_loadu_ps(cols, src + i * ld_src) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // 32-bit interleave of row pairs
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // 64-bit interleave
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {  // 128-bit lanes
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      t[8 * i + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + 4 + k], 0x88);
      t[8 * i + 4 + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + 4 + k], 0xdd);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) {
    if (j < N) {
      const __m512 out =
          j < 8 ? _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88) : _mm512_shuffle_f32x4(t[j - 8], t[j], 0xdd);
      _mm512_mask_storeu_ps(dst + j * ld_dst, rows, out);
    }
  }
}

// Narrow tiles, where the 16 x 16 network would spend its 64 shuffles on at most 4 useful vectors: a small map's
// last pixels (a 6x6 map's 36 = 16 + 16 + 4), its 2x2 and 1x1 maps, in either direction. Both put the tile in four
// registers as 4 x 4 blocks, one per 128-bit lane, and transpose the blocks lane by lane (8 shuffles): at most 4
// columns, row 4l + r's values in lane l of register r; at most 4 rows, row r in register r.

// The 4 x 4 blocks of four registers, each 128-bit lane transposed across them: out[k] lane l = (in[0] lane l)[k],
// (in[1] lane l)[k], (in[2] lane l)[k], (in[3] lane l)[k].
inline void transpose_lanes4(const __m512 in[4], __m512 out[4]) {
  const __m512 t0 = _mm512_unpacklo_ps(in[0], in[1]), t1 = _mm512_unpackhi_ps(in[0], in[1]);
  const __m512 t2 = _mm512_unpacklo_ps(in[2], in[3]), t3 = _mm512_unpackhi_ps(in[2], in[3]);
  out[0] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  out[1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  out[2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  out[3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
}

// transpose_tile16 for N <= 4 columns (M <= 16 rows): rows as 128-bit loads into the registers' lanes, then
// transpose_lanes4; out[k] is column k, stored as one (row-masked) vector.
inline void transpose_tile16x4(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t M, int64_t N) {
  const __mmask8 cols = static_cast<__mmask8>((1u << N) - 1);
  const __mmask16 rows = static_cast<__mmask16>((1u << M) - 1);
  auto row = [&](int64_t i) { return i < M ? _mm_maskz_loadu_ps(cols, src + i * ld_src) : _mm_setzero_ps(); };
  __m512 in[4], out[4];
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) {
    __m512 v = _mm512_castps128_ps512(row(r));
    v = _mm512_insertf32x4(v, row(4 + r), 1);
    v = _mm512_insertf32x4(v, row(8 + r), 2);
    in[r] = _mm512_insertf32x4(v, row(12 + r), 3);
  }
  transpose_lanes4(in, out);
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    if (k < N) _mm512_mask_storeu_ps(dst + k * ld_dst, rows, out[k]);
  }
}

// Lane l of v (a constant: the extract takes an immediate).
template <int l>
inline __m128 lane128(__m512 v) {
  return _mm512_extractf32x4_ps(v, l);
}

// transpose_tile16 for M <= 4 rows (N <= 16 columns): the rows as registers, transpose_lanes4, and each output row
// j = 4l + k, the M values in lane l of out[k], as one masked 128-bit store.
inline void transpose_tile4x16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t M, int64_t N) {
  const __mmask16 cols = static_cast<__mmask16>((1u << N) - 1);
  const __mmask8 rows = static_cast<__mmask8>((1u << M) - 1);
  __m512 in[4], out[4];
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) in[r] = r < M ? _mm512_maskz_loadu_ps(cols, src + r * ld_src) : _mm512_setzero_ps();
  transpose_lanes4(in, out);
  const __m128 lanes[16] = {lane128<0>(out[0]), lane128<0>(out[1]), lane128<0>(out[2]), lane128<0>(out[3]),
                            lane128<1>(out[0]), lane128<1>(out[1]), lane128<1>(out[2]), lane128<1>(out[3]),
                            lane128<2>(out[0]), lane128<2>(out[1]), lane128<2>(out[2]), lane128<2>(out[3]),
                            lane128<3>(out[0]), lane128<3>(out[1]), lane128<3>(out[2]), lane128<3>(out[3])};
  for (int64_t j = 0; j < N; ++j) _mm_mask_storeu_ps(dst + j * ld_dst, rows, lanes[j]);
}
#endif

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < M, j < N (an M x N matrix transposed). float by register
// transposes of 16 x 16 tiles and narrower ones (AVX-512) or full 8 x 8 tiles (AVX2: at::vec's, the rest value by
// value); other types value by value. Only moves values: the bits of what is computed on them never depend on it.
template <typename T>
inline void transpose_values(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t M, int64_t N) {
  int64_t i0 = 0;
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    for (; i0 < M; i0 += 16) {
      for (int64_t j0 = 0; j0 < N; j0 += 16) {
        const int64_t rows = std::min<int64_t>(16, M - i0), cols = std::min<int64_t>(16, N - j0);
        const float* s = src + i0 * ld_src + j0;
        float* d = dst + j0 * ld_dst + i0;
        if (cols <= 4) {
          transpose_tile16x4(s, ld_src, d, ld_dst, rows, cols);
        } else if (rows <= 4) {
          transpose_tile4x16(s, ld_src, d, ld_dst, rows, cols);
        } else {
          transpose_tile16(s, ld_src, d, ld_dst, rows, cols);
        }
      }
    }
    return;
#elif defined(CPU_CAPABILITY_AVX2)
    for (; i0 + 8 <= M; i0 += 8) {
      int64_t j0 = 0;
      for (; j0 + 8 <= N; j0 += 8) {
        at::vec::transpose_mxn<float, 8, 8>(src + i0 * ld_src + j0, ld_src, dst + j0 * ld_dst + i0, ld_dst);
      }
      for (int64_t i = i0; i < i0 + 8; ++i) {
        for (int64_t j = j0; j < N; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
      }
    }
#endif
  }
  for (int64_t i = i0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
  }
}

// The rows of channels [c0, c0 + lanes) (HW values per image) as the columns of dst: value (p, j) of the block,
// pixel p = n * HW + hw, at dst[p * Vec::size() + j]. float and double by transpose_values (register tiles for float),
// bfloat16 converted one value at a time. A partial block's unused lanes are left as they were (computed on, never
// stored). Why transposes rather than one vector gather per pixel (as until 2026-11-29): with the outputs also
// computed on the block (store_block), the 1x512x6x6 fused backward ran 1.21x faster, side by side.
template <typename scalar_t, typename opmath_t>
void load_block(const DenseMap& m, const scalar_t* x, int64_t c0, int64_t lanes, opmath_t* dst) {
  constexpr int64_t L = at::vec::Vectorized<opmath_t>::size();
  for (int64_t n = 0; n < m.N; ++n) {
    const scalar_t* src = x + (n * m.C + c0) * m.HW;
    opmath_t* out = dst + n * m.HW * L;
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      transpose_values(src, m.HW, out, L, lanes, m.HW);
    } else {
      for (int64_t j = 0; j < lanes; ++j) {
        for (int64_t hw = 0; hw < m.HW; ++hw) out[hw * L + j] = static_cast<opmath_t>(src[j * m.HW + hw]);
      }
    }
  }
}

// load_block's inverse: the block's values src[p * Vec::size() + j] (opmath) written to the rows of channels
// [c0, c0 + lanes) of the NCHW map y, in its dtype.
template <typename scalar_t, typename opmath_t>
void store_block(const DenseMap& m, const opmath_t* src, int64_t c0, int64_t lanes, scalar_t* y) {
  constexpr int64_t L = at::vec::Vectorized<opmath_t>::size();
  for (int64_t n = 0; n < m.N; ++n) {
    const opmath_t* in = src + n * m.HW * L;
    scalar_t* dst = y + (n * m.C + c0) * m.HW;
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      transpose_values(in, L, dst, m.HW, m.HW, lanes);
    } else {
      for (int64_t j = 0; j < lanes; ++j) {
        for (int64_t hw = 0; hw < m.HW; ++hw) dst[j * m.HW + hw] = static_cast<scalar_t>(in[hw * L + j]);
      }
    }
  }
}

// Runs task(c0, lanes, scratch) for every block of Vec::size() channels of a small NCHW map, in parallel; scratch
// holds `scratch_values` opmath values (zeroed once: a partial block's unused lanes compute on zeros or on an earlier
// block's values, and are never stored).
template <typename opmath_t, typename Task>
void for_each_block(const DenseMap& m, int64_t scratch_values, Task task) {
  constexpr int64_t L = at::vec::Vectorized<opmath_t>::size();
  const int64_t blocks = (m.C + L - 1) / L;
  at::parallel_for(0, blocks, tasks_of(m.P() * L), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> scratch(scratch_values);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block * L;
      task(c0, std::min(L, m.C - c0), scratch.data());
    }
  });
}

// Two per-channel sums of f(lanes, x, g, y) (std::array<Vec, 2>) over every pixel: fixed-chunk partials,
// combined per channel in chunk order.
template <typename scalar_t, typename opmath_t, typename F>
std::array<std::vector<opmath_t>, 2> channel_sums2(const DenseMap& m, const scalar_t* x, const scalar_t* g,
                                                   const scalar_t* y, F f) {
  const int64_t chunks = m.chunks(), C = m.C;
  std::vector<opmath_t> parts(chunks * 2 * C);  // [chunk][k][c]
  for_each_chunk<opmath_t>(m, [&](int64_t chunk, int64_t c0, int64_t c1, int64_t p0, int64_t p1,
                                  Scratch<opmath_t>& tmp) {
    opmath_t* out = parts.data() + chunk * 2 * C;
    if (m.cl) {
      chunk_sums<2>(m, x, g, y, p0, p1, 0, f, out, tmp);
      return;
    }
    for (int64_t c = c0; c < c1; ++c) {
      opmath_t pair[2];
      chunk_sums<2>(m, x, g, y, p0, p1, c, f, pair, tmp);
      out[c] = pair[0];
      out[C + c] = pair[1];
    }
  });
  std::array<std::vector<opmath_t>, 2> sums{std::vector<opmath_t>(C), std::vector<opmath_t>(C)};
  for (int64_t c = 0; c < C; ++c) {
    opmath_t a(0), q(0);
    for (int64_t i = 0; i < chunks; ++i) {
      a += parts[i * 2 * C + c];
      q += parts[i * 2 * C + C + c];
    }
    sums[0][c] = a;
    sums[1][c] = q;
  }
  return sums;
}

}  // namespace upernet_fast_cpp
