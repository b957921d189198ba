// adaptive_avg_pool_multi on the CPU: every adaptive_avg_pool2d(x, s) of a scale list in one call, and the
// gather-form backward (every input element sums, scale by scale and bin by bin in a fixed order, the
// gradients of the bins whose window holds it; written once, no atomics, no zero fill).
//
// Bins are PyTorch's: along an axis of size n pooled to s, bin o averages [floor(o*n/s), ceil((o+1)*n/s));
// windows overlap when n % s != 0 and repeat pixels when s > n. A bin's value is its window's sum (rows
// outer, columns inner, in the opmath type) divided by kh then by kw, as PyTorch's kernel; both layouts
// compute the same expression, so NCHW and channels_last give the same bits.
#include "common.h"

#include <torch/library.h>

namespace upernet_fast_cpp {
namespace {

inline int64_t bin_start(int64_t o, int64_t n, int64_t s) { return (o * n) / s; }
inline int64_t bin_end(int64_t o, int64_t n, int64_t s) { return ((o + 1) * n + s - 1) / s; }

std::vector<Tensor> pool(const Tensor& x, c10::IntArrayRef scales) {
  check_float_map(x, "x");
  TORCH_CHECK(x.numel() > 0, "x must have no empty dimension, got shape ", x.sizes());
  TORCH_CHECK(!scales.empty(), "scales must hold at least one output size");
  for (const int64_t s : scales) TORCH_CHECK(s > 0, "scales must be positive ints, got ", scales);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const bool cl = suggests_channels_last(x);  // PyTorch's rule, as the Triton launcher
  std::vector<Tensor> outs;
  for (const int64_t s : scales) {
    outs.push_back(at::empty({B, C, s, s}, x.options().memory_format(memory_format(cl))));
  }
  UPERNET_FAST_DISPATCH(x.scalar_type(), "adaptive_avg_pool_multi", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<opmath_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t sb = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
    std::vector<scalar_t*> out_ptrs;
    for (Tensor& o : outs) out_ptrs.push_back(o.data_ptr<scalar_t>());
    if (!cl) {
      // NCHW: one (b, block of L = Vec::size() channels) per work item. The block's planes are transposed
      // once into a pixel-major buffer (lane = channel), then every bin of every scale is a run of vector
      // adds: the same additions per channel, in the same order, as a scalar loop, L channels at a time.
      constexpr int64_t L = Vec::size();
      const int64_t cblocks = (C + L - 1) / L;
      const bool dense_planes = sw == 1 && sh == W;
      at::parallel_for(0, B * cblocks, kGrain, [&](int64_t begin, int64_t end) {
        std::vector<opmath_t> buf(H * W * L), lanes(L);
        const scalar_t* planes[L];
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / cblocks, c0 = (item % cblocks) * L, n = std::min(L, C - c0);
          // Lanes past the last channel re-read it: their sums are computed but never stored.
          for (int64_t lane = 0; lane < L; ++lane) planes[lane] = xp + b * sb + (c0 + std::min(lane, n - 1)) * sc;
          if (dense_planes) {
            for (int64_t i = 0; i < H * W; ++i) {
              for (int64_t lane = 0; lane < L; ++lane) buf[i * L + lane] = static_cast<opmath_t>(planes[lane][i]);
            }
          } else {
            for (int64_t ih = 0; ih < H; ++ih) {
              for (int64_t iw = 0; iw < W; ++iw) {
                for (int64_t lane = 0; lane < L; ++lane) {
                  buf[(ih * W + iw) * L + lane] = static_cast<opmath_t>(planes[lane][ih * sh + iw * sw]);
                }
              }
            }
          }
          for (size_t k = 0; k < scales.size(); ++k) {
            const int64_t s = scales[k];
            for (int64_t oh = 0; oh < s; ++oh) {
              const int64_t h0 = bin_start(oh, H, s), h1 = bin_end(oh, H, s);
              for (int64_t ow = 0; ow < s; ++ow) {
                const int64_t w0 = bin_start(ow, W, s), w1 = bin_end(ow, W, s);
                Vec sum(0);
                for (int64_t ih = h0; ih < h1; ++ih) {
                  for (int64_t iw = w0; iw < w1; ++iw) sum = sum + Vec::loadu(buf.data() + (ih * W + iw) * L);
                }
                const Vec kh(static_cast<opmath_t>(h1 - h0)), kw(static_cast<opmath_t>(w1 - w0));
                (sum / kh / kw).store(lanes.data());
                scalar_t* o = out_ptrs[k] + ((b * C + c0) * s + oh) * s + ow;
                for (int64_t lane = 0; lane < n; ++lane) o[lane * s * s] = static_cast<scalar_t>(lanes[lane]);
              }
            }
          }
        }
      });
      return;
    }
    // channels_last: one (b, bin) per work item, vectorised along C. Bins of every scale in one index space.
    std::vector<int64_t> first_bin{0};
    for (const int64_t s : scales) first_bin.push_back(first_bin.back() + s * s);
    const int64_t bins = first_bin.back();
    at::parallel_for(0, B * bins, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> acc(C), tmp(C), res(C);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / bins, bin = item % bins;
        size_t k = 0;
        while (bin >= first_bin[k + 1]) ++k;
        const int64_t s = scales[k], oh = (bin - first_bin[k]) / s, ow = (bin - first_bin[k]) % s;
        const int64_t h0 = bin_start(oh, H, s), h1 = bin_end(oh, H, s);
        const int64_t w0 = bin_start(ow, W, s), w1 = bin_end(ow, W, s);
        std::fill(acc.begin(), acc.end(), opmath_t(0));
        for (int64_t ih = h0; ih < h1; ++ih) {
          for (int64_t iw = w0; iw < w1; ++iw) {
            const opmath_t* v = row_in(xp + b * sb + ih * sh + iw * sw, sc, C, tmp.data());
            vec_for<opmath_t>(C, [&](int64_t i, int64_t n) {
              vstore(acc.data() + i, n, vload(acc.data() + i, n) + vload(v + i, n));
            });
          }
        }
        const Vec kh(static_cast<opmath_t>(h1 - h0)), kw(static_cast<opmath_t>(w1 - w0));
        scalar_t* o = out_ptrs[k] + ((b * s + oh) * s + ow) * C;
        opmath_t* r = row_buffer<scalar_t, opmath_t>(o, 1, res.data());
        vec_for<opmath_t>(C, [&](int64_t i, int64_t n) { vstore(r + i, n, vload(acc.data() + i, n) / kh / kw); });
        row_out(o, 1, C, r);
      }
    });
  });
  return outs;
}

// Per scale and input index along one axis of size n: the bins [lo, hi] holding it, and each bin's size.
struct PoolAxis {
  std::vector<int64_t> lo, hi, size;
  PoolAxis(int64_t n, int64_t s) : lo(n), hi(n), size(s) {
    for (int64_t i = 0; i < n; ++i) {
      lo[i] = (i * s) / n;
      hi[i] = ((i + 1) * s + n - 1) / n - 1;
    }
    for (int64_t o = 0; o < s; ++o) size[o] = bin_end(o, n, s) - bin_start(o, n, s);
  }
};

Tensor pool_backward(at::TensorList grads, c10::IntArrayRef input_shape, bool channels_last) {
  TORCH_CHECK(!grads.empty(), "grads must hold one gradient per scale, got none");
  TORCH_CHECK(input_shape.size() == 4, "input_shape must be (B, C, H, W), got ", input_shape);
  const int64_t B = input_shape[0], C = input_shape[1], H = input_shape[2], W = input_shape[3];
  TORCH_CHECK(B > 0 && C > 0 && H > 0 && W > 0, "input_shape must be positive, got ", input_shape);
  std::vector<int64_t> scales;
  std::vector<PoolAxis> ax_h, ax_w;
  for (size_t k = 0; k < grads.size(); ++k) {
    const std::string name = "grads[" + std::to_string(k) + "]";
    check_float_map(grads[k], name.c_str());
    const int64_t s = grads[k].size(3);
    TORCH_CHECK(grads[k].size(0) == B && grads[k].size(1) == C && grads[k].size(2) == s && s > 0, name,
                " must have shape (", B, ", ", C, ", s, s), got ", grads[k].sizes());
    TORCH_CHECK(grads[k].scalar_type() == grads[0].scalar_type(), name, " has dtype ", grads[k].scalar_type(),
                " but grads[0] has ", grads[0].scalar_type());
    scales.push_back(s);
    ax_h.emplace_back(H, s);
    ax_w.emplace_back(W, s);
  }
  Tensor gi = huge_pages(at::empty({B, C, H, W}, grads[0].options().memory_format(memory_format(channels_last))));
  UPERNET_FAST_DISPATCH(gi.scalar_type(), "adaptive_avg_pool_multi_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<opmath_t>;
    scalar_t* out = gi.data_ptr<scalar_t>();
    const size_t K = scales.size();
    // Pointers and strides of the gradients, read once (not per element in the loops below).
    struct Strided {
      const scalar_t* p;
      int64_t sb, sc, sh, sw;
    };
    std::vector<Strided> gs;
    for (const Tensor& g : grads) {
      gs.push_back({g.const_data_ptr<scalar_t>(), g.stride(0), g.stride(1), g.stride(2), g.stride(3)});
    }
    if (!channels_last) {
      // NCHW: one (b, block of L channels) per work item, as the forward. Each bin's g / kh / kw is computed
      // once (the same value the sum would compute at each use), lanes = channels; every input pixel then
      // sums its bins with vector adds (scale, bin row, bin column order) and the block is written back
      // plane by plane.
      const int64_t L = Vec::size(), cblocks = (C + L - 1) / L;
      std::vector<int64_t> first_bin{0};
      for (const int64_t s : scales) first_bin.push_back(first_bin.back() + s * s);
      // The bins each input pixel sums, in that order, as offsets into the scaled bins (CSR over pixels): the
      // same for every work item, so built once instead of walking the scales' bin ranges per pixel.
      std::vector<int64_t> pixel_start{0}, pixel_bins;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t w = 0; w < W; ++w) {
          for (size_t k = 0; k < K; ++k) {
            const int64_t s = scales[k];
            for (int64_t oh = ax_h[k].lo[h]; oh <= ax_h[k].hi[h]; ++oh) {
              for (int64_t ow = ax_w[k].lo[w]; ow <= ax_w[k].hi[w]; ++ow) {
                pixel_bins.push_back((first_bin[k] + oh * s + ow) * L);
              }
            }
          }
          pixel_start.push_back(static_cast<int64_t>(pixel_bins.size()));
        }
      }
      at::parallel_for(0, B * cblocks, kGrain, [&](int64_t begin, int64_t end) {
        std::vector<opmath_t> scaled(first_bin.back() * L), res(H * W * L), lanes(L);
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / cblocks, c0 = (item % cblocks) * L, n = std::min(L, C - c0);
          for (size_t k = 0; k < K; ++k) {
            const Strided& g = gs[k];
            const int64_t s = scales[k];
            for (int64_t oh = 0; oh < s; ++oh) {
              const Vec kh(static_cast<opmath_t>(ax_h[k].size[oh]));
              for (int64_t ow = 0; ow < s; ++ow) {
                const Vec kw(static_cast<opmath_t>(ax_w[k].size[ow]));
                const scalar_t* src = g.p + b * g.sb + c0 * g.sc + oh * g.sh + ow * g.sw;
                for (int64_t lane = 0; lane < L; ++lane) {
                  lanes[lane] = lane < n ? static_cast<opmath_t>(src[lane * g.sc]) : opmath_t(0);
                }
                (Vec::loadu(lanes.data()) / kh / kw).store(scaled.data() + (first_bin[k] + oh * s + ow) * L);
              }
            }
          }
          // Four pixels at a time, each with its own accumulator and its own bins in its own order: the four
          // chains of dependent adds overlap instead of running one after another.
          const opmath_t* bins = scaled.data();
          constexpr int64_t kPixels = 4;
          for (int64_t p0 = 0; p0 < H * W; p0 += kPixels) {
            const int64_t np = std::min(kPixels, H * W - p0);
            Vec acc[kPixels] = {Vec(0), Vec(0), Vec(0), Vec(0)};
            int64_t shared = pixel_start[p0 + 1] - pixel_start[p0];
            for (int64_t k = 1; k < np; ++k) shared = std::min(shared, pixel_start[p0 + k + 1] - pixel_start[p0 + k]);
            for (int64_t t = 0; t < shared; ++t) {
              for (int64_t k = 0; k < kPixels; ++k) {
                if (k < np) acc[k] = acc[k] + Vec::loadu(bins + pixel_bins[pixel_start[p0 + k] + t]);
              }
            }
            for (int64_t k = 0; k < np; ++k) {
              for (int64_t q = pixel_start[p0 + k] + shared; q < pixel_start[p0 + k + 1]; ++q) {
                acc[k] = acc[k] + Vec::loadu(bins + pixel_bins[q]);
              }
              acc[k].store(res.data() + (p0 + k) * L);
            }
          }
          for (int64_t lane = 0; lane < n; ++lane) {
            scalar_t* o = out + (b * C + c0 + lane) * H * W;
            for (int64_t i = 0; i < H * W; ++i) o[i] = static_cast<scalar_t>(res[i * L + lane]);
          }
        }
      });
      return;
    }
    at::parallel_for(0, B * H, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> acc(C), tmp(C), res(C);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / H, h = r % H;
        for (int64_t w = 0; w < W; ++w) {
          std::fill(acc.begin(), acc.end(), opmath_t(0));
          for (size_t k = 0; k < K; ++k) {
            const Strided& g = gs[k];
            const scalar_t* gp = g.p + b * g.sb;
            for (int64_t oh = ax_h[k].lo[h]; oh <= ax_h[k].hi[h]; ++oh) {
              const Vec kh(static_cast<opmath_t>(ax_h[k].size[oh]));
              for (int64_t ow = ax_w[k].lo[w]; ow <= ax_w[k].hi[w]; ++ow) {
                const Vec kw(static_cast<opmath_t>(ax_w[k].size[ow]));
                const opmath_t* v = row_in(gp + oh * g.sh + ow * g.sw, g.sc, C, tmp.data());
                vec_for<opmath_t>(C, [&](int64_t i, int64_t n) {
                  vstore(acc.data() + i, n, vload(acc.data() + i, n) + vload(v + i, n) / kh / kw);
                });
              }
            }
          }
          scalar_t* o = out + ((b * H + h) * W + w) * C;
          opmath_t* rr = row_buffer<scalar_t, opmath_t>(o, 1, res.data());
          vec_for<opmath_t>(C, [&](int64_t i, int64_t n) { vstore(rr + i, n, vload(acc.data() + i, n)); });
          row_out(o, 1, C, rr);
        }
      }
    });
  });
  return gi;
}

}  // namespace

TORCH_LIBRARY_IMPL(upernet_fast_cpp, CPU, m) {
  m.impl("adaptive_avg_pool_multi", &pool);
  m.impl("adaptive_avg_pool_multi_backward", &pool_backward);
}

}  // namespace upernet_fast_cpp
