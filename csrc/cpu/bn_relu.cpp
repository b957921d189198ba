// BatchNorm + ReLU on the CPU: the kernel-level functions of kernels/conv_bn_relu.py (training, batch
// statistics; the Python op composes them with the SyncBatchNorm all-gather and the running-statistics
// update) and the eval-mode pair relu(x * scale + shift).
//
// x is a dense (N, C, H, W) map, NCHW or channels_last (reduce.h); outputs are in x's layout and dtype.
// Statistics and per-channel sums are in the opmath dtype: float32 for float32/bfloat16 inputs (as the
// Triton kernels), float64 for float64 inputs (so that float64 gradcheck sees float64 arithmetic).
// Every per-channel sum is over reduce.h's fixed chunk partition, chunks combined in order: the same bits
// for any number of threads. The arithmetic those ops share, per value and per channel, is in bn_relu_passes.h.
#include "bn_relu_passes.h"
#include "reduce.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>

namespace upernet_fast_cpp {
namespace {

at::ScalarType opmath_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// grad must be a float map of x's shape and dtype (the backward kernels' incoming gradient).
void check_grad_of(const Tensor& grad_in, const Tensor& x_in) {
  check_float_map(x_in, "x");
  check_float_map(grad_in, "grad");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "grad must have x's shape ", x_in.sizes(), ", got ", grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type(), "grad must have x's dtype ", x_in.scalar_type(), ", got ",
              grad_in.scalar_type());
}

// A new map of x's shape and dtype in m's layout, written once by the caller (hence huge pages, see common.h).
Tensor new_map_like(const Tensor& x, const DenseMap& m) {
  return huge_pages(at::empty(x.sizes(), x.options().memory_format(memory_format(m.cl))));
}

std::tuple<Tensor, Tensor> channel_stats(const Tensor& x_in) {
  check_float_map(x_in, "x");
  DenseMap m;
  const Tensor x = dense_map(x_in, m);
  TORCH_CHECK(m.P() > 0, "x must have at least one value per channel, got shape ", x_in.sizes());
  Tensor mean = at::empty({m.C}, x.options().dtype(opmath_dtype(x)));
  Tensor var = at::empty({m.C}, mean.options());
  UPERNET_FAST_DISPATCH(x.scalar_type(), "bn_relu_channel_stats", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = m.C;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    opmath_t* mean_p = mean.data_ptr<opmath_t>();
    opmath_t* var_p = var.data_ptr<opmath_t>();
    if (small_nchw_stats(m)) {
      for_each_block<opmath_t>(m, m.P() * Vec<opmath_t>::size(), [&](int64_t c0, int64_t lanes, opmath_t* X) {
        load_block(m, xp, c0, lanes, X);
        const auto [mu, v] = block_moments(X, m.P());
        vstore(mean_p + c0, lanes, mu);
        vstore(var_p + c0, lanes, v);
      });
      return;
    }
    // Per chunk and channel: [chunk][c].
    std::vector<opmath_t> part_mean(m.chunks() * C), part_m2(m.chunks() * C);
    for_each_chunk<opmath_t>(m, [&](int64_t chunk, int64_t c0, int64_t c1, int64_t p0, int64_t p1,
                                    Scratch<opmath_t>& tmp) {
      const int64_t at = chunk * C + c0;
      chunk_moments(m, xp, p0, p1, c0, c1, part_mean.data() + at, part_m2.data() + at, tmp);
    });
    at::parallel_for(0, C, tasks_of(m.chunks()), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        std::tie(mean_p[c], var_p[c]) = combine_moments(m, part_mean.data() + c, part_m2.data() + c, C);
      }
    });
  });
  return {mean, var};
}

struct Params {
  const Tensor& mean;
  const Tensor& invstd;
  const Tensor& weight;
  const Tensor& bias;
};

void check_params(const Params& p, int64_t C) {
  check_per_channel(p.mean, "mean", C);
  check_per_channel(p.invstd, "invstd", C);
  check_per_channel(p.weight, "weight", C);
  check_per_channel(p.bias, "bias", C);
}

// Eval mode's output, relu(x * scale + shift): one definition for eval_forward and eval_from_buffers (the same bits).
template <typename opmath_t>
Vec<opmath_t> eval_value(const Vec<opmath_t>& x, const std::array<Vec<opmath_t>, 2>& p) {
  return at::vec::maximum(x * p[0] + p[1], Vec<opmath_t>(0));
}

// y = value(x, p) over a float map, in x's dtype and layout, p the per-channel parameters read from `params` (each
// as an opmath_t array, in order, given to value as vectors): the frame that apply and eval_forward share.
template <size_t N, typename Value>
Tensor per_channel_map(const Tensor& x_in, const std::array<Tensor, N>& params, Value value) {
  DenseMap m;
  const Tensor x = dense_map(x_in, m);
  Tensor y = new_map_like(x, m);
  UPERNET_FAST_DISPATCH(x.scalar_type(), "bn_relu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::array<ChannelValues<opmath_t>, N> p;
    std::array<const opmath_t*, N> pp;
    for (size_t i = 0; i < N; ++i) {
      p[i] = per_channel<opmath_t>(params[i]);
      pp[i] = p[i].data();
    }
    map_channel_params<scalar_t, N>(m, x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), pp,
                                    [&](const Vec<opmath_t>& v, const std::array<Vec<opmath_t>, N>& pv) {
                                      return value(v, pv);
                                    });
  });
  return y;
}

Tensor apply(const Tensor& x_in, const Tensor& mean, const Tensor& invstd, const Tensor& weight, const Tensor& bias) {
  check_float_map(x_in, "x");
  check_params({mean, invstd, weight, bias}, x_in.size(1));
  return per_channel_map<4>(x_in, {mean, invstd, weight, bias}, [](const auto& v, const auto& p) {
    return bn_relu_value(v, p[0], p[1], p[2], p[3]);
  });
}

// BatchNorm2d's running-statistics update of channel c, as upernet_fast.reference.update_running_stats computes
// it: running = mean * factor + running * keep, each product rounded in the statistics' dtype, then the sum.
template <typename opmath_t>
inline void update_running(opmath_t* running, int64_t c, opmath_t batch_value, opmath_t factor, opmath_t keep) {
  const opmath_t a = batch_value * factor;
  const opmath_t b = running[c] * keep;
  running[c] = a + b;
}

// Training forward in one call: the batch statistics (channel_stats' chunks, combined in the same order), the
// normalise+affine+ReLU pass (apply's expression) and BatchNorm2d's running-statistics update, in place. Returns
// (y, mean, invstd): the same bits as channel_stats, then invstd = 1 / sqrt(var + eps), apply, and the update
// of the Python composite (upernet_fast/ops/bn_relu.py), for any number of threads.
//
// Why one call: on the pyramid pooling module's small maps (512 channels at 6x6 or 16x16) the composite's
// Python glue and its ten small tensor ops cost several times the kernels. NCHW maps take one parallel pass
// over blocks of channels: each block's planes are read for the statistics and read again, still in cache, for y.
// running_mean and running_var must have the statistics' dtype (float32, or float64 for float64 x): the caller
// takes the composite otherwise. momentum None is BatchNorm's cumulative average, 1 / num_batches_tracked.
std::tuple<Tensor, Tensor, Tensor> train_step(const Tensor& x_in, const Tensor& weight, const Tensor& bias,
                                              const Tensor& running_mean, const Tensor& running_var,
                                              const Tensor& num_batches_tracked, std::optional<double> momentum,
                                              double eps) {
  check_float_map(x_in, "x");
  const int64_t C = x_in.size(1);
  check_per_channel(weight, "weight", C);
  check_per_channel(bias, "bias", C);
  const auto stats_type = opmath_dtype(x_in);
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{running_mean, "running_mean"},
                                {running_var, "running_var"}}) {
    check_per_channel(t, name, C);
    TORCH_CHECK(t.scalar_type() == stats_type && t.is_contiguous(), name, " must be a contiguous ", stats_type,
                " tensor (the statistics' dtype for ", x_in.scalar_type(), " x), got ", t.scalar_type());
  }
  TORCH_CHECK(num_batches_tracked.device().is_cpu() && num_batches_tracked.scalar_type() == at::kLong &&
                  num_batches_tracked.numel() == 1,
              "num_batches_tracked must be a one-element int64 CPU tensor, got ", num_batches_tracked.scalar_type(),
              " of shape ", num_batches_tracked.sizes());
  TORCH_CHECK(eps >= 0, "eps must be non-negative, got ", eps);
  DenseMap m;
  const Tensor x = dense_map(x_in, m);
  TORCH_CHECK(m.P() > 0, "x must have at least one value per channel, got shape ", x_in.sizes());
  Tensor y;
  Tensor mean = at::empty({C}, x.options().dtype(stats_type));
  Tensor invstd = at::empty({C}, mean.options());
  int64_t& batches = *num_batches_tracked.data_ptr<int64_t>();
  batches += 1;
  UPERNET_FAST_DISPATCH(x.scalar_type(), "bn_relu_train_step", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // The composite's scalars, rounded as there: Python floats (doubles) cast to the statistics' dtype.
    const double factor_d = momentum.has_value() ? *momentum : 1.0 / static_cast<double>(batches);
    const opmath_t factor = static_cast<opmath_t>(factor_d), keep = static_cast<opmath_t>(1.0 - factor_d);
    const int64_t count = m.P();
    const opmath_t unbias = static_cast<opmath_t>(static_cast<double>(count) / std::max<int64_t>(count - 1, 1));
    const opmath_t eps_v = static_cast<opmath_t>(eps);
    opmath_t* mean_p = mean.data_ptr<opmath_t>();
    opmath_t* invstd_p = invstd.data_ptr<opmath_t>();
    opmath_t* rm = running_mean.data_ptr<opmath_t>();
    opmath_t* rv = running_var.data_ptr<opmath_t>();
    // Per channel from its biased variance: invstd, and the running statistics (unbiased variance).
    auto finish_channel = [&](int64_t c, opmath_t mu, opmath_t var) {
      mean_p[c] = mu;
      invstd_p[c] = opmath_t(1) / std::sqrt(var + eps_v);  // torch.rsqrt's float and vector paths: the same
      update_running(rm, c, mu, factor, keep);
      update_running(rv, c, var * unbias, factor, keep);
    };
    if (m.cl) {  // no contiguous channel to walk: channel_stats over every channel, then apply itself
      const auto [mean_cl, var_cl] = channel_stats(x);
      const opmath_t* mv = mean_cl.const_data_ptr<opmath_t>();
      const opmath_t* vv = var_cl.const_data_ptr<opmath_t>();
      for (int64_t c = 0; c < C; ++c) finish_channel(c, mv[c], vv[c]);
      y = apply(x, mean, invstd, weight, bias);
      return;
    }
    y = new_map_like(x, m);
    const auto w = per_channel<opmath_t>(weight), b = per_channel<opmath_t>(bias);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (small_nchw_stats(m)) {  // channel_stats' arithmetic and apply's expression on a transposed block
      constexpr int64_t L = Vec<opmath_t>::size();
      for_each_block<opmath_t>(m, 2 * m.P() * L, [&](int64_t c0, int64_t lanes, opmath_t* X) {
        load_block(m, xp, c0, lanes, X);
        const auto [mu, v] = block_moments(X, m.P());
        alignas(64) opmath_t mus[L], vars[L];
        mu.store(mus);
        v.store(vars);
        for (int64_t j = 0; j < lanes; ++j) finish_channel(c0 + j, mus[j], vars[j]);
        const Vec<opmath_t> mean_v = vload(mean_p + c0, lanes), invstd_v = vload(invstd_p + c0, lanes);
        const Vec<opmath_t> w_v = vload(w.data() + c0, lanes), b_v = vload(b.data() + c0, lanes);
        opmath_t* Y = X + m.P() * L;
        for (int64_t p = 0; p < m.P(); ++p) {
          bn_relu_value(Vec<opmath_t>::loadu(X + p * L), mean_v, invstd_v, w_v, b_v).store(Y + p * L);
        }
        store_block(m, Y, c0, lanes, yp);
      });
      return;
    }
    const int64_t chunks = m.chunks();
    // Blocks of channels, each phase over the whole block (see chunk_moments).
    const int64_t width = block_channels(m);
    at::parallel_for(0, channel_blocks(m), tasks_of(width * m.P()), [&](int64_t begin, int64_t end) {
      Scratch<opmath_t> tmp(std::min<int64_t>(kChunkPixels, m.HW));
      std::vector<opmath_t> part_mean(chunks * width), part_m2(chunks * width), tx(m.HW), to(m.HW);
      for (int64_t block = begin; block < end; ++block) {
        const int64_t c0 = block * width, c1 = std::min(c0 + width, C);
        for (int64_t i = 0; i < chunks; ++i) {  // part_*[i * width + (c - c0)]
          const int64_t p0 = i * kChunkPixels, p1 = std::min(p0 + kChunkPixels, m.P());
          chunk_moments(m, xp, p0, p1, c0, c1, &part_mean[i * width], &part_m2[i * width], tmp);
        }
        for (int64_t c = c0; c < c1; ++c) {
          const auto [mu, var] = combine_moments(m, &part_mean[c - c0], &part_m2[c - c0], width);
          finish_channel(c, mu, var);
        }
        for (int64_t c = c0; c < c1; ++c) {  // the block's planes, read again while still in cache
          apply_rows(m, xp, yp, c, Vec<opmath_t>(mean_p[c]), Vec<opmath_t>(invstd_p[c]), Vec<opmath_t>(w[c]),
                     Vec<opmath_t>(b[c]), tx.data(), to.data());
        }
      }
    });
  });
  return {y, mean, invstd};
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& grad_in, const Tensor& x_in, const Tensor& mean,
                                           const Tensor& invstd, const Tensor& weight, const Tensor& bias) {
  check_grad_of(grad_in, x_in);
  check_params({mean, invstd, weight, bias}, x_in.size(1));
  DenseMap m;
  const Tensor x = dense_map(x_in, m);
  const Tensor grad = like_map(grad_in, m);
  Tensor sum_g = at::empty({m.C}, x.options().dtype(opmath_dtype(x)));
  Tensor sum_gxhat = at::empty({m.C}, sum_g.options());
  UPERNET_FAST_DISPATCH(x.scalar_type(), "bn_relu_backward_reduce", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto mu = per_channel<opmath_t>(mean), is = per_channel<opmath_t>(invstd);
    const auto w = per_channel<opmath_t>(weight), b = per_channel<opmath_t>(bias);
    if (small_nchw_grads(m)) {
      small_backward<scalar_t, opmath_t>(m, x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), mu, is,
                                         w, b, sum_g.data_ptr<opmath_t>(), sum_gxhat.data_ptr<opmath_t>(), nullptr);
      return;
    }
    // k = 0: sum(g_relu), k = 1: sum(g_relu * (x - mean)) (times invstd below: sum(g_relu * xhat)).
    auto f = [&](const Lanes<opmath_t>& l, Vec<opmath_t> v, Vec<opmath_t> g, Vec<opmath_t>) {
      return bn_backward_terms(v, g, l.get(mu.data()), l.get(is.data()), l.get(w.data()), l.get(b.data()));
    };
    const auto sums = channel_sums2<scalar_t, opmath_t>(m, x.const_data_ptr<scalar_t>(),
                                                        grad.const_data_ptr<scalar_t>(), nullptr, f);
    opmath_t* sg = sum_g.data_ptr<opmath_t>();
    opmath_t* sgx = sum_gxhat.data_ptr<opmath_t>();
    for (int64_t c = 0; c < m.C; ++c) {
      sg[c] = sums[0][c];
      sgx[c] = sums[1][c] * is[c];
    }
  });
  return {sum_g, sum_gxhat};
}

Tensor backward_input(const Tensor& grad_in, const Tensor& x_in, const Tensor& mean, const Tensor& invstd,
                      const Tensor& weight, const Tensor& bias, const Tensor& sum_g, const Tensor& sum_gxhat,
                      double count) {
  check_grad_of(grad_in, x_in);
  check_params({mean, invstd, weight, bias}, x_in.size(1));
  check_per_channel(sum_g, "sum_g", x_in.size(1));
  check_per_channel(sum_gxhat, "sum_gxhat", x_in.size(1));
  TORCH_CHECK(count > 0, "count must be positive (values per channel over every process), got ", count);
  DenseMap m;
  const Tensor x = dense_map(x_in, m);
  const Tensor grad = like_map(grad_in, m);
  Tensor dx = new_map_like(x, m);
  UPERNET_FAST_DISPATCH(x.scalar_type(), "bn_relu_backward_input", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto mu = per_channel<opmath_t>(mean), is = per_channel<opmath_t>(invstd);
    const auto w = per_channel<opmath_t>(weight), b = per_channel<opmath_t>(bias);
    const auto sg = per_channel<opmath_t>(sum_g), sgx = per_channel<opmath_t>(sum_gxhat);
    const opmath_t inv_count = static_cast<opmath_t>(1.0 / count);  // the Triton launcher's 1.0 / count
    std::vector<opmath_t> ka(m.C), kb(m.C), kc(m.C);  // grad_input_coefs per channel
    for (int64_t c = 0; c < m.C; ++c) {
      const auto k = grad_input_coefs(is[c], w[c], sg[c] * inv_count, sgx[c] * inv_count);
      ka[c] = k.a;
      kb[c] = k.b;
      kc[c] = k.c;
    }
    map_elementwise<scalar_t>(
        m, x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), nullptr, dx.data_ptr<scalar_t>(),
        [&](const Lanes<opmath_t>& l, Vec<opmath_t> v, Vec<opmath_t> g, Vec<opmath_t>) {
          return bn_grad_input(v, g, l.get(mu.data()), l.get(is.data()), l.get(w.data()), l.get(b.data()),
                               GradInputCoefs<Vec<opmath_t>>{l.get(ka.data()), l.get(kb.data()), l.get(kc.data())});
        });
  });
  return dx;
}

// The backward without a process group, NCHW, one block of channels per work item (one channel on large maps, up to
// 16 on small ones): each channel's two sums over the same fixed chunks combined in the same order
// as backward_reduce, then its grad_x exactly as backward_input computes it (count = N*H*W), while the block's
// planes of x and grad are still in cache (128 KB for a channel of a 128x128 map): x and grad come from memory once
// instead of twice. The same bits as backward_reduce followed by backward_input, for any number of threads.
// channels_last maps have no contiguous channel to walk: the caller uses the two ops there (and wherever the sums
// must be all-reduced between them).
// Both fused ops: grad_x into dx, which may be grad itself (every kernel below reads a value of grad before it
// writes the value of dx at the same place: the small-map blocks load their channels whole, the large-map channels
// are summed before their grad_x pass, which reads grad, if at all, value by value where it writes).
std::tuple<Tensor, Tensor> fused_into(const Tensor& grad, const Tensor& x, const DenseMap& m, const Tensor& mean,
                                      const Tensor& invstd, const Tensor& weight, const Tensor& bias, Tensor& dx) {
  Tensor sum_g = at::empty({m.C}, x.options().dtype(opmath_dtype(x)));
  Tensor sum_gxhat = at::empty({m.C}, sum_g.options());
  UPERNET_FAST_DISPATCH(x.scalar_type(), "bn_relu_backward_fused", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto mu = per_channel<opmath_t>(mean), is = per_channel<opmath_t>(invstd);
    const auto w = per_channel<opmath_t>(weight), b = per_channel<opmath_t>(bias);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    opmath_t* sg = sum_g.data_ptr<opmath_t>();
    opmath_t* sgx = sum_gxhat.data_ptr<opmath_t>();
    if (small_nchw_grads(m)) {
      small_backward<scalar_t, opmath_t>(m, xp, gp, mu, is, w, b, sg, sgx, dp);
      return;
    }
    const opmath_t inv_count = static_cast<opmath_t>(1.0 / static_cast<double>(m.P()));  // backward_input's
    const int64_t chunks = m.chunks();
    // Channels of at most kKeptPixels: the sums' pass keeps each pixel's g_relu, and the grad_x pass reads it back
    // from L1 instead of recomputing the affine and the mask, in blocks of kKeptPixels values, whose x, grad, kept
    // g_relu and grad_x fit L1 together (16 KB of float32). Measured side by side (kernel calls in a C++ loop, 2 threads,
    // 1x512x16x16): 34.3 us against 37.4 recomputing (1.09x); kept in the recomputing path's 16-channel blocks
    // (64 KB), 43.5 against 32.6 (0.75x). Larger channels recompute: their kept values would come back from L2, no
    // faster than recomputing them (1x512x128x128, within the noise).
    const bool keep = m.P() <= kKeptPixels;
    const int64_t width = keep ? std::min<int64_t>(16, kKeptPixels / m.P()) : block_channels(m);
    // Blocks of channels, each phase over the whole block (see chunk_moments): the block's sums, then its grad_x.
    at::parallel_for(0, (m.C + width - 1) / width, tasks_of(width * m.P()), [&](int64_t begin, int64_t end) {
      Scratch<opmath_t> tmp(std::min<int64_t>(kChunkPixels, m.HW));
      std::vector<opmath_t> tx(m.HW), tg(keep ? 0 : m.HW), to(m.HW), kept(keep ? width * m.P() : 0);
      for (int64_t block = begin; block < end; ++block) {
        const int64_t c0 = block * width, c1 = std::min(c0 + width, m.C);
        for (int64_t c = c0; c < c1; ++c) {
          opmath_t* kc = keep ? kept.data() + (c - c0) * m.P() : nullptr;
          const Vec<opmath_t> mean_v(mu[c]), is_v(is[c]), w_v(w[c]), b_v(b[c]);
          // backward_reduce's two sums (channel_sums2: chunk partials added in chunk order).
          auto f = [&](const Lanes<opmath_t>&, Vec<opmath_t> v, Vec<opmath_t> g, Vec<opmath_t>) {
            return bn_backward_terms(v, g, mean_v, is_v, w_v, b_v);
          };
          opmath_t a(0), q(0);
          if (keep) {  // one chunk (kKeptPixels <= kChunkPixels)
            const auto pair = kept_grad_sums(m, xp, gp, c, mean_v, is_v, w_v, b_v, kc, tmp.x.data(), tmp.g.data());
            a += pair[0];
            q += pair[1];
          } else {
            for (int64_t i = 0; i < chunks; ++i) {
              const int64_t p0 = i * kChunkPixels, p1 = std::min(p0 + kChunkPixels, m.P());
              opmath_t pair[2];
              chunk_sums<2>(m, xp, gp, static_cast<const scalar_t*>(nullptr), p0, p1, c, f, pair, tmp);
              a += pair[0];
              q += pair[1];
            }
          }
          sg[c] = a;
          sgx[c] = q * is[c];
        }
        for (int64_t c = c0; c < c1; ++c) {  // backward_input's elementwise pass over the channel's planes
          const auto coefs = grad_input_coefs(is[c], w[c], sg[c] * inv_count, sgx[c] * inv_count);
          const GradInputCoefs<Vec<opmath_t>> k{Vec<opmath_t>(coefs.a), Vec<opmath_t>(coefs.b), Vec<opmath_t>(coefs.c)};
          const Vec<opmath_t> mean_v(mu[c]);
          if (keep) {
            grad_rows_from_kept(m, xp, kept.data() + (c - c0) * m.P(), dp, c, mean_v, k, tx.data(), to.data());
          } else {
            grad_rows(m, xp, gp, dp, c, mean_v, Vec<opmath_t>(is[c]), Vec<opmath_t>(w[c]), Vec<opmath_t>(b[c]), k,
                      tx.data(), tg.data(), to.data());
          }
        }
      }
    });
  });
  return {sum_g, sum_gxhat};
}

// Both fused ops' checks of their arguments; x as the NCHW map m.
Tensor checked_fused_map(const Tensor& grad, const Tensor& x_in, const Tensor& mean, const Tensor& invstd,
                         const Tensor& weight, const Tensor& bias, const char* op, DenseMap& m) {
  check_grad_of(grad, x_in);
  check_params({mean, invstd, weight, bias}, x_in.size(1));
  Tensor x = dense_map(x_in, m);
  TORCH_CHECK(!m.cl, "x must be NCHW (contiguous) for ", op, ", got strides ", x_in.strides(),
              " (channels_last maps take bn_relu_backward_reduce and bn_relu_backward_input)");
  TORCH_CHECK(m.P() > 0, "x must have at least one value per channel, got shape ", x_in.sizes());
  return x;
}

std::tuple<Tensor, Tensor, Tensor> backward_fused(const Tensor& grad_in, const Tensor& x_in, const Tensor& mean,
                                                  const Tensor& invstd, const Tensor& weight, const Tensor& bias) {
  DenseMap m;
  const Tensor x = checked_fused_map(grad_in, x_in, mean, invstd, weight, bias, "bn_relu_backward_fused", m);
  Tensor dx = new_map_like(x, m);
  auto sums = fused_into(like_map(grad_in, m), x, m, mean, invstd, weight, bias, dx);
  return {dx, std::get<0>(sums), std::get<1>(sums)};
}

// Why: in a chain of BN+ReLU backward calls, a fresh grad_x per call (512 KB at 1x512x16x16) made glibc hand heap
// memory back to the system and fault it in again on the next call, in about two processes of three: 30-60 page
// faults per call, twice the call's time (measured with getrusage; none with glibc's trim threshold raised). The
// C++ autograd hands its incoming gradient here when nothing else holds it (csrc/autograd/bn_relu_autograd.cpp).
std::tuple<Tensor, Tensor> backward_fused_(Tensor& grad, const Tensor& x_in, const Tensor& mean, const Tensor& invstd,
                                           const Tensor& weight, const Tensor& bias) {
  DenseMap m;
  const Tensor x = checked_fused_map(grad, x_in, mean, invstd, weight, bias, "bn_relu_backward_fused_", m);
  TORCH_CHECK(grad.is_contiguous(),
              "grad must be NCHW-contiguous for bn_relu_backward_fused_ (grad_x is written over it), got strides ",
              grad.strides());
  TORCH_CHECK(at::get_overlap_status(grad, x) == at::MemOverlapStatus::No,
              "grad must not share memory with x for bn_relu_backward_fused_ (grad_x is written over grad)");
  return fused_into(grad, x, m, mean, invstd, weight, bias, grad);
}

// Eval mode, BatchNorm folded into a per-channel affine: y = relu(x * scale + shift).
Tensor eval_forward(const Tensor& x_in, const Tensor& scale, const Tensor& shift) {
  check_float_map(x_in, "x");
  check_per_channel(scale, "scale", x_in.size(1));
  check_per_channel(shift, "shift", x_in.size(1));
  return per_channel_map<2>(x_in, {scale, shift}, [](const auto& v, const auto& p) { return eval_value(v, p); });
}

// Eval mode from BatchNorm's own tensors, for autograd-free calls: the per-channel scale and shift computed as
// upernet_fast/ops/bn_relu.py's running_stats_path computes them with tensor ops (rsqrt(running_var + eps), shift
// = -running_mean * scale, then shift * weight + bias and scale * weight, each rounded in the statistics' dtype;
// here as vectors: IEEE division, square root, products and sums, the same bits), then eval_forward's pass: the same
// bits, without six tensor ops per call (most of the cost on the pyramid pooling module's 1x1 to 6x6 maps), nor a
// tensor for the scale and shift.
Tensor eval_from_buffers(const Tensor& x_in, const Tensor& running_mean, const Tensor& running_var,
                         const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps) {
  check_float_map(x_in, "x");
  const int64_t C = x_in.size(1);
  check_per_channel(running_mean, "running_mean", C);
  check_per_channel(running_var, "running_var", C);
  const bool affine = weight.has_value() && weight->defined();
  TORCH_CHECK(affine == (bias.has_value() && bias->defined()),
              "weight and bias must both be tensors or both be None (BatchNorm's affine parameters)");
  if (affine) {
    check_per_channel(*weight, "weight", C);
    check_per_channel(*bias, "bias", C);
  }
  DenseMap m;
  const Tensor x = dense_map(x_in, m);
  Tensor y = new_map_like(x, m);
  UPERNET_FAST_DISPATCH(x.scalar_type(), "bn_relu_eval_from_buffers", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using V = Vec<opmath_t>;
    const auto rm = per_channel<opmath_t>(running_mean), rv = per_channel<opmath_t>(running_var);
    const auto w = affine ? per_channel<opmath_t>(*weight) : ChannelValues<opmath_t>();
    const auto b = affine ? per_channel<opmath_t>(*bias) : ChannelValues<opmath_t>();
    // On the stack up to 1024 channels (no heap allocation a call, see ChannelValues).
    c10::SmallVector<opmath_t, 2048> folded(2 * C);
    opmath_t* const scale = folded.data();
    opmath_t* const shift = scale + C;
    const V eps_v(static_cast<opmath_t>(eps));
    vec_for<opmath_t>(C, [&](int64_t c, int64_t n) {
      const V s = V(1) / (vload(rv.data() + c, n) + eps_v).sqrt();
      const V h = vload(rm.data() + c, n).neg() * s;
      if (affine) {
        const V wv = vload(w.data() + c, n);
        vstore(scale + c, n, s * wv);
        vstore(shift + c, n, h * wv + vload(b.data() + c, n));
      } else {
        vstore(scale + c, n, s);
        vstore(shift + c, n, h);
      }
    });
    map_channel_params<scalar_t, 2>(m, x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                    {scale, shift},
                                    [](const V& v, const std::array<V, 2>& p) { return eval_value(v, p); });
  });
  return y;
}

// grad_x = (y > 0) * grad * scale; grad_scale = sum((y > 0) * grad * x), grad_shift = sum((y > 0) * grad)
// per channel (fixed chunk partition), in scale's dtype.
std::tuple<Tensor, Tensor, Tensor> eval_backward(const Tensor& grad_in, const Tensor& y_in, const Tensor& x_in,
                                                 const Tensor& scale) {
  check_float_map(x_in, "x");
  check_float_map(grad_in, "grad");
  check_float_map(y_in, "y");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && y_in.sizes() == x_in.sizes(),
              "grad and y must have x's shape ", x_in.sizes(), ", got ", grad_in.sizes(), " and ", y_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type() && y_in.scalar_type() == x_in.scalar_type(),
              "grad and y must have x's dtype ", x_in.scalar_type());
  check_per_channel(scale, "scale", x_in.size(1));
  DenseMap m;
  const Tensor x = dense_map(x_in, m);
  const Tensor grad = like_map(grad_in, m), y = like_map(y_in, m);
  Tensor dx = new_map_like(x, m);
  Tensor grad_scale, grad_shift;
  UPERNET_FAST_DISPATCH(x.scalar_type(), "bn_relu_eval_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto s = per_channel<opmath_t>(scale);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    map_elementwise<scalar_t>(m, gp, yp, nullptr, dx.data_ptr<scalar_t>(),
                              [&](const Lanes<opmath_t>& l, Vec<opmath_t> g, Vec<opmath_t> yv, Vec<opmath_t>) {
                                return where_positive(yv, g) * l.get(s.data());
                              });
    // k = 0: sum(g_m * x) (grad of scale), k = 1: sum(g_m) (grad of shift), g_m = (y > 0) * grad.
    auto f = [](const Lanes<opmath_t>&, Vec<opmath_t> v, Vec<opmath_t> g, Vec<opmath_t> yv) {
      const auto gm = where_positive(yv, g);
      return std::array<Vec<opmath_t>, 2>{gm * v, gm};
    };
    const auto sums = channel_sums2<scalar_t, opmath_t>(m, xp, gp, yp, f);
    const auto dtype = c10::CppTypeToScalarType<opmath_t>::value;
    Tensor gs = at::empty({m.C}, x.options().dtype(dtype));
    Tensor gt = at::empty({m.C}, gs.options());
    std::copy(sums[0].begin(), sums[0].end(), gs.data_ptr<opmath_t>());
    std::copy(sums[1].begin(), sums[1].end(), gt.data_ptr<opmath_t>());
    grad_scale = gs.to(scale.scalar_type());
    grad_shift = gt.to(scale.scalar_type());
  });
  return {dx, grad_scale, grad_shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(upernet_fast_cpp, CPU, m) {
  m.impl("bn_relu_channel_stats", &channel_stats);
  m.impl("bn_relu_apply", &apply);
  m.impl("bn_relu_backward_reduce", &backward_reduce);
  m.impl("bn_relu_backward_input", &backward_input);
  m.impl("bn_relu_backward_fused", &backward_fused);
  m.impl("bn_relu_backward_fused_", &backward_fused_);
  m.impl("bn_relu_train_step", &train_step);
  m.impl("bn_relu_eval", &eval_forward);
  m.impl("bn_relu_eval_from_buffers", &eval_from_buffers);
  m.impl("bn_relu_eval_backward", &eval_backward);
}

}  // namespace upernet_fast_cpp
