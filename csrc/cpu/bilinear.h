// Bilinear resize (forward) and its gather-form backward, shared by upsample_add, upsample_concat and
// upsample_cross_entropy.
//
// Index rule, PyTorch's (area_pixel_compute_scale, area_pixel_compute_source_index,
// guard_index_and_lambda), in the opmath type (float32 for float32/bfloat16, float64 for float64):
//     scale = align_corners ? (n_in - 1) / (n_out - 1) (0 when n_out == 1) : n_in / n_out
//     src   = align_corners ? d * scale : max((d + 0.5) * scale - 0.5, 0)
//     i0    = min(floor(src), n_in - 1);  i1 = min(i0 + 1, n_in - 1)
//     l1    = clamp(src - i0, 0, 1);      l0 = 1 - l1
// and the value is PyTorch's sum order: (x00 * lw0 + x01 * lw1) * lh0 + (x10 * lw0 + x11 * lw1) * lh1.
//
// Gather form of the backward: input index i is read by the outputs d with i0(d) == i (weight l0) or
// i1(d) == i (weight l1, also i0(d) == i - 1, or i at the clamped border). As i0 is non-decreasing in d,
// they are the contiguous range [first(i0 >= i - 1), first(i0 >= i + 1)), found here by one exact sweep
// over the same i0 the forward uses (no closed-form estimate needed on the CPU). Each input gradient is
//     sum over rows d (increasing) of  wh(d) * (sum over columns e (increasing) of ww(e) * g[d, e])
// (kernels/_bilinear.py's resize_backward_tile order): every element written once, no atomics, no zero
// fill, the same bits for any thread count and for both layouts.
#pragma once

#include "common.h"

#include <cmath>

namespace upernet_fast_cpp {

// torch.cat's layout for the resized inputs of a concat, as the Triton op allocates it (ops/upsample_concat.py's
// _new_output): channels_last only when every input suggests it, inputs with one channel or a 1x1 map (whose
// layout is only in the strides of size-1 dimensions) taking no part. Shared by upsample_concat and the fused
// Winograd bottlenecks, which must agree on it bitwise.
inline bool concat_channels_last(at::TensorList tensors) {
  bool channels_last = true, voted = false;
  for (const Tensor& t : tensors) {
    if (t.size(1) == 1 || t.size(2) * t.size(3) == 1) continue;
    voted = true;
    channels_last = channels_last && suggests_channels_last(t);
  }
  return channels_last && voted;
}

template <typename opmath_t>
struct Axis {
  int64_t n_in = 0, n_out = 0;
  std::vector<int64_t> i0, i1;   // per output position
  std::vector<opmath_t> l0, l1;  // per output position
  // Backward: the outputs reading input i are [lo[i], lo[i] + count(i)), weights at gw[start[i]...].
  std::vector<int64_t> lo, start;
  std::vector<opmath_t> gw;
  int64_t max_readers = 0;

  int64_t readers(int64_t i) const { return start[i + 1] - start[i]; }

  Axis(int64_t in, int64_t out, bool align_corners) : n_in(in), n_out(out), i0(out), i1(out), l0(out), l1(out) {
    opmath_t scale;
    if (align_corners) {
      scale = out > 1 ? static_cast<opmath_t>(in - 1) / static_cast<opmath_t>(out - 1) : opmath_t(0);
    } else {
      scale = static_cast<opmath_t>(in) / static_cast<opmath_t>(out);
    }
    for (int64_t d = 0; d < out; ++d) {
      opmath_t src;
      if (align_corners) {
        src = scale * static_cast<opmath_t>(d);
      } else {
        src = scale * (static_cast<opmath_t>(d) + static_cast<opmath_t>(0.5)) - static_cast<opmath_t>(0.5);
        src = src < opmath_t(0) ? opmath_t(0) : src;
      }
      const int64_t k = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
      opmath_t lambda = src - static_cast<opmath_t>(k);
      lambda = std::min(std::max(lambda, opmath_t(0)), opmath_t(1));
      i0[d] = k;
      i1[d] = std::min(k + 1, in - 1);
      l1[d] = lambda;
      l0[d] = opmath_t(1) - lambda;
    }
    // first[k] = smallest d with i0[d] >= k, for k in [-1, in + 1].
    std::vector<int64_t> first(in + 3);
    int64_t d = 0;
    for (int64_t k = -1; k <= in + 1; ++k) {
      while (d < out && i0[d] < k) ++d;
      first[k + 1] = d;
    }
    lo.resize(in);
    start.resize(in + 1);
    start[0] = 0;
    for (int64_t i = 0; i < in; ++i) {
      lo[i] = first[i];          // first(i - 1)
      const int64_t hi = first[i + 2];  // first(i + 1)
      for (int64_t e = lo[i]; e < hi; ++e) {
        gw.push_back((i0[e] == i ? l0[e] : opmath_t(0)) + (i1[e] == i ? l1[e] : opmath_t(0)));
      }
      start[i + 1] = static_cast<int64_t>(gw.size());
      max_readers = std::max(max_readers, hi - lo[i]);
    }
  }
};

// Strided 4D view: element (b, c, h, w) of a tensor at base + b*sb + c*sc + h*sh + w*sw.
template <typename T>
struct View4 {
  T* base;
  int64_t sb, sc, sh, sw;
  View4(T* p, const Tensor& t) : base(p), sb(t.stride(0)), sc(t.stride(1)), sh(t.stride(2)), sw(t.stride(3)) {}
  T* at(int64_t b, int64_t c, int64_t h, int64_t w) const { return base + b * sb + c * sc + h * sh + w * sw; }
};

// Two-slot cache of horizontally interpolated source rows, keyed by (plane, row): consecutive output rows
// share their source rows (an upsampling by k reuses each pair k times). Pure speed: a row is always
// computed the same way.
template <typename opmath_t>
struct RowPair {
  std::vector<opmath_t> buf[2];
  int64_t key[2] = {-1, -1};
  explicit RowPair(int64_t n) { buf[0].resize(n); buf[1].resize(n); }
  // Slot holding `k`, computing it with fill(ptr) into the slot that does not hold `keep` when absent.
  template <typename Fill>
  int get(int64_t k, int64_t keep, Fill fill) {
    if (key[0] == k) return 0;
    if (key[1] == k) return 1;
    const int s = key[0] == keep ? 1 : 0;
    fill(buf[s].data());
    key[s] = k;
    return s;
  }
};

// The horizontal interpolation of one source row (w values, unit stride) to W outputs by permutes within one loaded
// vector per output vector, where the axis allows it (see resize_forward_items): for output vector v, the sources
// i0 and i1 of its lanes lie in [base[v], base[v] + lanes). apply() is false where it does not run (other dtypes,
// ISAs or strides, downsampling), and the caller's scalar loop runs instead.
template <typename scalar_t>
struct HorizontalPermutes {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  static constexpr bool kSupported = std::is_same_v<scalar_t, float>;
#else
  static constexpr bool kSupported = false;
#endif
  static constexpr int64_t kLanes = at::vec::Vectorized<float>::size();
  bool usable = false;
  std::vector<int64_t> base, count;  // per output vector: first source, sources loaded
  std::vector<int32_t> perm0, perm1;  // per output lane: i0 - base, i1 - base (0 in padded lanes)

  HorizontalPermutes(const Axis<at::opmath_type<scalar_t>>& aw, int64_t source_stride, bool same) {
    if (!kSupported || same || source_stride != 1) return;
    const int64_t W = aw.n_out;
    const int64_t vectors = (W + kLanes - 1) / kLanes;
    base.resize(vectors);
    count.resize(vectors);
    perm0.assign(vectors * kLanes, 0);
    perm1.assign(vectors * kLanes, 0);
    for (int64_t v = 0; v < vectors; ++v) {
      const int64_t first = v * kLanes, n = std::min(kLanes, W - first);
      base[v] = aw.i0[first];
      count[v] = std::min(kLanes, aw.n_in - base[v]);
      for (int64_t lane = 0; lane < n; ++lane) {
        const int64_t d0 = aw.i0[first + lane] - base[v], d1 = aw.i1[first + lane] - base[v];
        if (d0 < 0 || d1 < 0 || d0 >= count[v] || d1 >= count[v]) return;  // not within one vector: not usable
        perm0[first + lane] = static_cast<int32_t>(d0);
        perm1[first + lane] = static_cast<int32_t>(d1);
      }
    }
    usable = true;
  }

  // buf[0, W) = p[i0] * l0 + p[i1] * l1 per output (W = aw.n_out), or false.
  bool apply(const scalar_t* p, const Axis<at::opmath_type<scalar_t>>& aw, at::opmath_type<scalar_t>* buf) const {
    if constexpr (kSupported) {
      if (!usable) return false;
      using Vec = at::vec::Vectorized<float>;
      const int64_t W = aw.n_out;
      for (int64_t v = 0, first = 0; first < W; ++v, first += kLanes) {
        const int64_t n = std::min(kLanes, W - first);
        const float* src = p + base[v];
#if defined(CPU_CAPABILITY_AVX512)
        const __m512 row = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count[v]) - 1), src);
        const Vec x0(_mm512_permutexvar_ps(_mm512_loadu_si512(perm0.data() + first), row));
        const Vec x1(_mm512_permutexvar_ps(_mm512_loadu_si512(perm1.data() + first), row));
#else
        const __m256 row = Vec::loadu(src, count[v]);
        auto lanes = [&](const std::vector<int32_t>& perm) {
          return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(perm.data() + first));
        };
        const Vec x0(_mm256_permutevar8x32_ps(row, lanes(perm0)));
        const Vec x1(_mm256_permutevar8x32_ps(row, lanes(perm1)));
#endif
        vstore(buf + first, n, x0 * vload(aw.l0.data() + first, n) + x1 * vload(aw.l1.data() + first, n));
      }
      return true;
    } else {
      (void)p;
      (void)aw;
      (void)buf;
      return false;
    }
  }
};

// dst = resize(src) [+ lateral], bilinear, align_corners=False, dst (B, C, H, W) any strides (a channel
// slice of a concat, for instance), src (B, C, h, w) any strides, lateral null or dst's shape.
// Vectorised along W when dst is NCHW-like (one output row per work item, the two source rows
// interpolated along W once and cached), along C when dst is channels_last (one output row of pixels per
// work item). Equal sizes are a copy, as PyTorch's interpolate (no 0-weight reads of a neighbour).
// Work items of resize_forward: output rows (b, c, oh) when dst is NCHW-like, rows of pixels (b, oh) else.
inline int64_t resize_items(const Tensor& dst) {
  return is_channels_last_layout(dst) ? dst.size(0) * dst.size(2) : dst.size(0) * dst.size(1) * dst.size(2);
}

// Items [begin, end) of resize_forward (the index tables are rebuilt per call: O(H + W), small).
template <typename scalar_t>
void resize_forward_items(const Tensor& src, const Tensor& dst, const Tensor* lateral, int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const int64_t B = dst.size(0), C = dst.size(1), H = dst.size(2), W = dst.size(3);
  const int64_t h = src.size(2), w = src.size(3);
  const bool same = (h == H && w == W);
  const Axis<opmath_t> ah(h, H, false), aw(w, W, false);
  const View4<const scalar_t> s(src.const_data_ptr<scalar_t>(), src);
  const View4<scalar_t> o(dst.data_ptr<scalar_t>(), dst);
  const scalar_t* lat_base = lateral ? lateral->const_data_ptr<scalar_t>() : nullptr;
  const View4<const scalar_t> l(lat_base, lateral ? *lateral : dst);

  if (!is_channels_last_layout(dst)) {
    {
      // The horizontal interpolation of a float32 source row by in-register permutes where every output vector's
      // sources lie within one vector of the row (upsampling; AVX-512 and AVX2 builds): the same products and sum
      // per value as the scalar loop below, so the same bits. That loop was most of the kernel's time on the FPN's
      // 2x upsamplings (16 -> 32: a new source row every second output row). (at::vec's gathers measured barely
      // faster than the scalar loop on this project's Xeon.)
      const HorizontalPermutes<scalar_t> permutes(aw, s.sw, same);
      RowPair<opmath_t> rows(W);
      std::vector<opmath_t> tmp_lat(W), tmp_out(W), tmp_src(W);
      // (plane, output row) of begin by division once, then counted along (a division per row cost more than the
      // row itself on the pyramid pooling module's maps: 16 values a row).
      int64_t plane = begin / H, oh = begin % H, b = plane / C, c = plane % C;
      for (int64_t r = begin; r < end; ++r) {
        if (r != begin && ++oh == H) {
          oh = 0;
          ++plane;
          if (++c == C) {
            c = 0;
            ++b;
          }
        }
        scalar_t* out_row = o.at(b, c, oh, 0);
        opmath_t* out = row_buffer<scalar_t, opmath_t>(out_row, o.sw, tmp_out.data());
        const opmath_t* lat = lateral ? row_in(l.at(b, c, oh, 0), l.sw, W, tmp_lat.data()) : nullptr;
        if (same) {
          const opmath_t* x = row_in(s.at(b, c, oh, 0), s.sw, W, tmp_src.data());
          vec_for<opmath_t>(W, [&](int64_t i, int64_t n) {
            Vec v = vload(x + i, n);
            if (lat) v = vload(lat + i, n) + v;
            vstore(out + i, n, v);
          });
        } else {
          auto hlerp = [&](int64_t row) {
            return [&, row](opmath_t* buf) {
              const scalar_t* p = s.at(b, c, row, 0);
              if (permutes.apply(p, aw, buf)) return;
              for (int64_t ow = 0; ow < W; ++ow) {
                buf[ow] = static_cast<opmath_t>(p[aw.i0[ow] * s.sw]) * aw.l0[ow] +
                          static_cast<opmath_t>(p[aw.i1[ow] * s.sw]) * aw.l1[ow];
              }
            };
          };
          const int64_t k0 = plane * h + ah.i0[oh], k1 = plane * h + ah.i1[oh];
          const int s0 = rows.get(k0, k1, hlerp(ah.i0[oh]));
          const int s1 = rows.get(k1, k0, hlerp(ah.i1[oh]));
          const opmath_t* top = rows.buf[s0].data();
          const opmath_t* bottom = rows.buf[s1].data();
          const Vec wt(ah.l0[oh]), wb(ah.l1[oh]);
          vec_for<opmath_t>(W, [&](int64_t i, int64_t n) {
            Vec v = vload(top + i, n) * wt + vload(bottom + i, n) * wb;
            if (lat) v = vload(lat + i, n) + v;
            vstore(out + i, n, v);
          });
        }
        row_out(out_row, o.sw, W, out);
      }
    }
    return;
  }

  {
    std::vector<opmath_t> t00(C), t01(C), t10(C), t11(C), tlat(C), tout(C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, oh = r % H;
      const int64_t r0 = same ? oh : ah.i0[oh], r1 = same ? oh : ah.i1[oh];
      const Vec wt(same ? opmath_t(1) : ah.l0[oh]), wb(same ? opmath_t(0) : ah.l1[oh]);
      for (int64_t ow = 0; ow < W; ++ow) {
        scalar_t* out_px = o.at(b, 0, oh, ow);
        opmath_t* out = row_buffer<scalar_t, opmath_t>(out_px, o.sc, tout.data());
        const opmath_t* lat = lateral ? row_in(l.at(b, 0, oh, ow), l.sc, C, tlat.data()) : nullptr;
        if (same) {
          const opmath_t* x = row_in(s.at(b, 0, oh, ow), s.sc, C, t00.data());
          vec_for<opmath_t>(C, [&](int64_t i, int64_t n) {
            Vec v = vload(x + i, n);
            if (lat) v = vload(lat + i, n) + v;
            vstore(out + i, n, v);
          });
        } else {
          const int64_t c0 = aw.i0[ow], c1 = aw.i1[ow];
          const Vec wl(aw.l0[ow]), wr(aw.l1[ow]);
          const opmath_t* x00 = row_in(s.at(b, 0, r0, c0), s.sc, C, t00.data());
          const opmath_t* x01 = row_in(s.at(b, 0, r0, c1), s.sc, C, t01.data());
          const opmath_t* x10 = row_in(s.at(b, 0, r1, c0), s.sc, C, t10.data());
          const opmath_t* x11 = row_in(s.at(b, 0, r1, c1), s.sc, C, t11.data());
          vec_for<opmath_t>(C, [&](int64_t i, int64_t n) {
            const Vec top = vload(x00 + i, n) * wl + vload(x01 + i, n) * wr;
            const Vec bottom = vload(x10 + i, n) * wl + vload(x11 + i, n) * wr;
            Vec v = top * wt + bottom * wb;
            if (lat) v = vload(lat + i, n) + v;
            vstore(out + i, n, v);
          });
        }
        row_out(out_px, o.sc, C, out);
      }
    }
  }
}

template <typename scalar_t>
void resize_forward(const Tensor& src, const Tensor& dst, const Tensor* lateral) {
  at::parallel_for(0, resize_items(dst), kGrain, [&](int64_t begin, int64_t end) {
    resize_forward_items<scalar_t>(src, dst, lateral, begin, end);
  });
}

// grad_in (B, C, h, w) = gather-form bilinear backward of channels [c_offset, c_offset + C) of grad
// (B, *, H, W), align_corners=False. grad_in is written whole (any strides); grad any strides.
template <typename scalar_t>
void resize_backward(const Tensor& grad, int64_t c_offset, const Tensor& grad_in) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const int64_t B = grad_in.size(0), C = grad_in.size(1), h = grad_in.size(2), w = grad_in.size(3);
  const int64_t H = grad.size(2), W = grad.size(3);
  const Axis<opmath_t> ah(h, H, false), aw(w, W, false);
  const View4<const scalar_t> g(grad.const_data_ptr<scalar_t>(), grad);
  const View4<scalar_t> o(grad_in.data_ptr<scalar_t>(), grad_in);

  if (!is_channels_last_layout(grad_in)) {
    // One input row (b, c..c+L-1, i) of L = Vec::size() planes per work item, one plane per vector lane, so
    // that the reduction along W (a few weights per input column, at an irregular offset) runs on whole
    // vectors instead of one scalar per product: each lane performs exactly the scalar operations, in the
    // same order, for its own plane (the last group's unused lanes hold stale values and are never stored).
    // The output rows an input row gathers, reduced along W to the w input columns, are kept in a ring of
    // max_readers slots keyed by (plane group, output row): the next input row reuses the ones it shares.
    // Per-task memory: (max_readers + 1) rows of w vectors and one of W (the L planes' output row, columns
    // as vectors).
    constexpr int64_t L = Vec::size();
    const int64_t groups = (C + L - 1) / L;
    const int64_t ring = std::max<int64_t>(ah.max_readers, 1);
    at::parallel_for(0, B * groups * h, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<Vec> slots(ring * w), acc(w), cols(W, Vec(0));
      std::vector<int64_t> keys(ring, -1);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t group = r / h, i = r % h, b = group / groups, c0 = (group % groups) * L;
        const int64_t planes = std::min(L, C - c0);
        std::fill(acc.begin(), acc.end(), Vec(0));
        const int64_t n_rows = ah.readers(i);
        for (int64_t t = 0; t < n_rows; ++t) {
          const int64_t d = ah.lo[i] + t;
          Vec* hrow = slots.data() + (d % ring) * w;
          const int64_t key = group * H + d;
          if (keys[d % ring] != key) {
            opmath_t* col_lanes = reinterpret_cast<opmath_t*>(cols.data());  // [W][L]
            for (int64_t p = 0; p < planes; ++p) {
              const scalar_t* gr = g.at(b, c0 + p + c_offset, d, 0);
              for (int64_t e = 0; e < W; ++e) col_lanes[e * L + p] = static_cast<opmath_t>(gr[e * g.sw]);
            }
            for (int64_t j = 0; j < w; ++j) {
              const opmath_t* wj = aw.gw.data() + aw.start[j];
              const Vec* ge = cols.data() + aw.lo[j];
              Vec sum(0);
              for (int64_t e = 0, n = aw.readers(j); e < n; ++e) sum = sum + Vec(wj[e]) * ge[e];
              hrow[j] = sum;
            }
            keys[d % ring] = key;
          }
          const Vec wd(ah.gw[ah.start[i] + t]);
          for (int64_t j = 0; j < w; ++j) acc[j] = acc[j] + wd * hrow[j];
        }
        const opmath_t* acc_lanes = reinterpret_cast<const opmath_t*>(acc.data());  // [w][L]
        for (int64_t p = 0; p < planes; ++p) {
          scalar_t* out_row = o.at(b, c0 + p, i, 0);
          for (int64_t j = 0; j < w; ++j) out_row[j * o.sw] = static_cast<scalar_t>(acc_lanes[j * L + p]);
        }
      }
    });
    return;
  }

  // channels_last: one input row of pixels (b, i) per work item, vectorised along C, channels in blocks of
  // kVecs vectors held in registers through the whole gather (the same operations per element as above).
  constexpr int kVecs = 8;
  const int64_t block = kVecs * Vec::size();
  at::parallel_for(0, B * h, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> tmp_g(block), tmp_out(block);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / h, i = r % h;
      for (int64_t j = 0; j < w; ++j) {
        for (int64_t c0 = 0; c0 < C; c0 += block) {
          const int64_t n = std::min(block, C - c0);
          const int64_t nvec = (n + Vec::size() - 1) / Vec::size();
          Vec acc[kVecs];
          for (int v = 0; v < kVecs; ++v) acc[v] = Vec(0);
          for (int64_t t = 0, nd = ah.readers(i); t < nd; ++t) {
            const int64_t d = ah.lo[i] + t;
            Vec row[kVecs];
            for (int v = 0; v < kVecs; ++v) row[v] = Vec(0);
            for (int64_t e = 0, ne = aw.readers(j); e < ne; ++e) {
              const Vec we(aw.gw[aw.start[j] + e]);
              const opmath_t* gp = row_in(g.at(b, c_offset + c0, d, aw.lo[j] + e), g.sc, n, tmp_g.data());
              for (int64_t v = 0; v < nvec; ++v) {
                row[v] = row[v] + we * vload(gp + v * Vec::size(), std::min<int64_t>(Vec::size(), n - v * Vec::size()));
              }
            }
            const Vec wd(ah.gw[ah.start[i] + t]);
            for (int64_t v = 0; v < nvec; ++v) acc[v] = acc[v] + wd * row[v];
          }
          scalar_t* op = o.at(b, c0, i, j);
          opmath_t* out = row_buffer<scalar_t, opmath_t>(op, o.sc, tmp_out.data());
          for (int64_t v = 0; v < nvec; ++v) {
            vstore(out + v * Vec::size(), std::min<int64_t>(Vec::size(), n - v * Vec::size()), acc[v]);
          }
          row_out(op, o.sc, n, out);
        }
      }
    }
  });
}

}  // namespace upernet_fast_cpp
