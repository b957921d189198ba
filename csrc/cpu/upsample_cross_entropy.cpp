// upsample_cross_entropy on the CPU: cross_entropy(interpolate(logits, labels' size, bilinear), labels)
// without ever building the (B, C, H, W) logits at label resolution, forward or backward.
//
// Forward: one work item per (batch, tile of kTileX output columns), walking the output rows in order.
// For each row the two source rows of every class are interpolated along W over the tile (cached: the
// next rows reuse them), blended along H into the tile's C x kTileX logits (vectorised along the pixels),
// then per pixel: max over classes, sum of exp(logit - max), lse = max + log(sum), and the label's
// log-probability (x_label - max) - log(sum), PyTorch's log_softmax grouping. Each item keeps float64
// partial sums of the (weighted) loss and of the weights; the caller adds the items' partials in item
// order, so the reduction is the same for any number of threads.
//
// Backward, gather form: one work item per (batch, tile of kTileJ low-resolution columns). Walking the
// low-resolution rows i in order, it needs the output rows y that read row i (bilinear.h's reader ranges)
// and, of each, the output columns that read the tile. For such a row it recomputes the upsampled logits
// over those columns, forms D = factor * (softmax - onehot) from the saved lse, and reduces D along W to
// the tile's columns (gather weights, columns increasing); the reduced rows are kept in a ring keyed by y
// (the next low-resolution row shares them). grad[c, i, j] = sum over y (increasing) of wy * reduced[y].
// Each gradient element is written once: no atomics, no zero fill. Memory per work item (bounded, not
// O(H * W)): 2 + 1 rows of C x (columns read by the tile) for the interpolated source rows and D, and
// (max readers per row + 1) x C x kTileJ for the ring and the accumulator.
//
// Labels outside [0, C) that are not ignore_index are never read out of bounds: masked (loss 0, weight 0, no
// gradient) where they are met, and the forward raises ValueError once its pass is over (the Python entry point
// leaves that check to this kernel, which reads every label anyway; the backward takes labels the forward took).
#include "bilinear.h"

#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>

namespace upernet_fast_cpp {
namespace {

constexpr int64_t kTileX = 64;  // output columns per forward work item
constexpr int64_t kTileJ = 16;  // low-resolution columns per backward work item

template <typename opmath_t>
using Vec = at::vec::Vectorized<opmath_t>;

void check_inputs(const Tensor& logits, const Tensor& labels, const std::optional<Tensor>& weight) {
  check_float_map(logits, "logits");
  TORCH_CHECK(logits.numel() > 0, "logits must have no empty dimension, got shape ", logits.sizes());
  TORCH_CHECK(labels.device().is_cpu(), "labels must be a CPU tensor, got ", labels.device());
  TORCH_CHECK(labels.dim() == 3, "labels must be a 3D (B, H, W) tensor, got shape ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.size(0) == logits.size(0), "labels must have shape (B, H, W) with B = logits.shape[0] = ",
              logits.size(0), ", got ", labels.sizes());
  TORCH_CHECK(labels.numel() > 0, "labels must have no empty dimension, got shape ", labels.sizes());
  if (weight.has_value() && weight->defined()) check_per_channel(*weight, "weight", logits.size(1));
}

// Interpolates source row `row` of every class of batch b along W over output columns [x0, x0 + nx):
// buf[c * nx + x] = v[q0] * w0 + v[q1] * w1 (PyTorch's order).
template <typename scalar_t, typename opmath_t>
void interpolate_row(const View4<const scalar_t>& s, const Axis<opmath_t>& aw, int64_t b, int64_t row, int64_t C,
                     int64_t x0, int64_t nx, opmath_t* buf) {
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* p = s.at(b, c, row, 0);
    opmath_t* out = buf + c * nx;
    for (int64_t x = 0; x < nx; ++x) {
      const int64_t e = x0 + x;
      out[x] = static_cast<opmath_t>(p[aw.i0[e] * s.sw]) * aw.l0[e] + static_cast<opmath_t>(p[aw.i1[e] * s.sw]) * aw.l1[e];
    }
  }
}

// The upsampled logits of output row y over the columns of the rows' buffers: val = top * h0 + bottom * h1.
template <typename opmath_t>
void blend_rows(const opmath_t* top, const opmath_t* bottom, opmath_t h0, opmath_t h1, int64_t n, opmath_t* val) {
  const Vec<opmath_t> wt(h0), wb(h1);
  vec_for<opmath_t>(n, [&](int64_t i, int64_t k) {
    vstore(val + i, k, vload(top + i, k) * wt + vload(bottom + i, k) * wb);
  });
}

inline bool valid_label(int64_t label, int64_t ignore_index, int64_t C) {
  return label != ignore_index && label >= 0 && label < C;
}

// Raised once the forward pass has seen a label that is neither a class nor ignore_index: the Python entry point
// leaves this check to the kernel, which reads every label anyway (the same message, and the first such label in
// (b, y, x) order, as upernet_fast/ops/upsample_cross_entropy.py gives for the other backends).
[[noreturn]] void raise_first_bad_label(const Tensor& labels, int64_t ignore_index, int64_t C) {
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < labels.size(0); ++b) {
    for (int64_t y = 0; y < labels.size(1); ++y) {
      for (int64_t x = 0; x < labels.size(2); ++x) {
        const int64_t label = lab[b * labels.stride(0) + y * labels.stride(1) + x * labels.stride(2)];
        TORCH_CHECK_VALUE(label == ignore_index || (label >= 0 && label < C), "labels must lie in [0, ", C,
                          ") or equal ignore_index=", ignore_index, "; found ", label);
      }
    }
  }
  TORCH_CHECK(false, "upsample_cross_entropy: a bad label was seen but not found again");
}

std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& logits, const Tensor& labels,
                                           const std::optional<Tensor>& weight, int64_t ignore_index,
                                           c10::string_view reduction, bool align_corners) {
  check_inputs(logits, labels, weight);
  const std::string red(reduction);
  TORCH_CHECK(red == "mean" || red == "sum" || red == "none" || red == "mean_all",
              "reduction must be one of ('mean', 'sum', 'none', 'mean_all'), got '", red, "'");
  const bool has_weight = weight.has_value() && weight->defined();
  const int64_t B = logits.size(0), C = logits.size(1), h = logits.size(2), w = logits.size(3);
  const int64_t H = labels.size(1), W = labels.size(2);
  const auto opmath_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor lse = at::empty({B, H, W}, logits.options().dtype(opmath_dtype));
  Tensor loss = red == "none" ? at::empty({B, H, W}, logits.options()) : Tensor();
  Tensor denominator = at::empty({}, lse.options());
  Tensor total_loss;
  UPERNET_FAST_DISPATCH(logits.scalar_type(), "upsample_cross_entropy", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const Axis<opmath_t> ah(h, H, align_corners), aw(w, W, align_corners);
    const View4<const scalar_t> s(logits.const_data_ptr<scalar_t>(), logits);
    const auto cw = has_weight ? per_channel<opmath_t>(*weight) : ChannelValues<opmath_t>();
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const int64_t lsb = labels.stride(0), lsh = labels.stride(1), lsw = labels.stride(2);
    opmath_t* lse_p = lse.data_ptr<opmath_t>();
    scalar_t* loss_p = loss.defined() ? loss.data_ptr<scalar_t>() : nullptr;
    const int64_t tiles = (W + kTileX - 1) / kTileX;
    std::vector<double> partial(2 * B * tiles);  // per work item: sum of losses, sum of weights
    std::atomic<bool> bad_label{false};
    at::parallel_for(0, B * tiles, kGrain, [&](int64_t begin, int64_t end) {
      RowPair<opmath_t> rows(C * kTileX);
      std::vector<opmath_t> val(C * kTileX), mx(kTileX), sum(kTileX);
      bool bad = false;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / tiles, x0 = (item % tiles) * kTileX, nx = std::min(kTileX, W - x0);
        rows.key[0] = rows.key[1] = -1;
        double loss_sum = 0, weight_sum = 0;
        for (int64_t y = 0; y < H; ++y) {
          const int64_t r0 = ah.i0[y], r1 = ah.i1[y];
          auto fill = [&](int64_t r) { return [&, r](opmath_t* buf) { interpolate_row(s, aw, b, r, C, x0, nx, buf); }; };
          const int s0 = rows.get(r0, r1, fill(r0));
          const int s1 = rows.get(r1, r0, fill(r1));
          for (int64_t c = 0; c < C; ++c) {
            blend_rows(rows.buf[s0].data() + c * nx, rows.buf[s1].data() + c * nx, ah.l0[y], ah.l1[y], nx,
                       val.data() + c * nx);
          }
          // Max over classes, then the sum of exponentials, classes in order, vectorised along the pixels.
          vec_for<opmath_t>(nx, [&](int64_t i, int64_t k) {
            Vec<opmath_t> m(-std::numeric_limits<opmath_t>::infinity());
            for (int64_t c = 0; c < C; ++c) m = at::vec::maximum(m, vload(val.data() + c * nx + i, k));
            Vec<opmath_t> acc(0);
            for (int64_t c = 0; c < C; ++c) acc = acc + (vload(val.data() + c * nx + i, k) - m).exp();
            vstore(mx.data() + i, k, m);
            vstore(sum.data() + i, k, acc);
          });
          for (int64_t x = 0; x < nx; ++x) {
            const int64_t pix = (b * H + y) * W + x0 + x;
            const opmath_t log_sum = std::log(sum[x]);
            lse_p[pix] = mx[x] + log_sum;
            const int64_t label = lab[b * lsb + y * lsh + (x0 + x) * lsw];
            opmath_t nll(0);
            if (valid_label(label, ignore_index, C)) {
              nll = -((val[label * nx + x] - mx[x]) - log_sum);
              const opmath_t wt = has_weight ? cw[label] : opmath_t(1);
              nll = has_weight ? nll * wt : nll;
              loss_sum += static_cast<double>(nll);
              weight_sum += static_cast<double>(wt);
            } else if (label != ignore_index) {
              bad = true;
            }
            if (loss_p) loss_p[pix] = static_cast<scalar_t>(nll);
          }
        }
        partial[2 * item] = loss_sum;
        partial[2 * item + 1] = weight_sum;
      }
      if (bad) bad_label.store(true, std::memory_order_relaxed);
    });
    if (bad_label.load()) raise_first_bad_label(labels, ignore_index, C);
    double total = 0, weights = 0;
    for (int64_t item = 0; item < B * tiles; ++item) {  // item order: independent of the thread count
      total += partial[2 * item];
      weights += partial[2 * item + 1];
    }
    opmath_t den = opmath_t(1);
    if (red == "mean") den = static_cast<opmath_t>(weights);
    if (red == "mean_all") den = static_cast<opmath_t>(B * H * W);
    denominator.fill_(den);
    if (red != "none") {
      opmath_t value = static_cast<opmath_t>(total);
      if (red != "sum") value = value / den;  // 0 / 0 = NaN when every pixel is ignored, as PyTorch
      total_loss = at::empty({}, logits.options());
      total_loss.fill_(value);
    }
  });
  return {red == "none" ? loss : total_loss, lse, denominator};
}

Tensor backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& labels,
                const std::optional<Tensor>& weight, const Tensor& lse, const Tensor& denominator,
                int64_t ignore_index, bool align_corners) {
  check_inputs(logits, labels, weight);
  const bool has_weight = weight.has_value() && weight->defined();
  const int64_t B = logits.size(0), C = logits.size(1), h = logits.size(2), w = logits.size(3);
  const int64_t H = labels.size(1), W = labels.size(2);
  const bool per_pixel = grad_loss.dim() == 3;
  TORCH_CHECK(grad_loss.dim() == 0 || (per_pixel && grad_loss.sizes() == labels.sizes()),
              "grad_loss must be 0-dim (reduced loss) or have labels' shape ", labels.sizes(), ", got ",
              grad_loss.sizes());
  TORCH_CHECK(lse.sizes() == labels.sizes(), "lse must have labels' shape ", labels.sizes(), ", got ", lse.sizes());
  TORCH_CHECK(denominator.numel() == 1, "denominator must be a 0-dim tensor, got shape ", denominator.sizes());
  Tensor grad_logits = huge_pages(at::empty({B, C, h, w}, logits.options()));  // contiguous, like the Triton kernel
  UPERNET_FAST_DISPATCH(logits.scalar_type(), "upsample_cross_entropy_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto opmath_dtype = c10::CppTypeToScalarType<opmath_t>::value;
    const Axis<opmath_t> ah(h, H, align_corners), aw(w, W, align_corners);
    const View4<const scalar_t> s(logits.const_data_ptr<scalar_t>(), logits);
    const auto cw = has_weight ? per_channel<opmath_t>(*weight) : ChannelValues<opmath_t>();
    const Tensor lse_c = lse.to(opmath_dtype).contiguous();
    const opmath_t* lse_p = lse_c.const_data_ptr<opmath_t>();
    const Tensor g_c = per_pixel ? grad_loss.to(opmath_dtype).contiguous() : Tensor();
    const opmath_t* g_p = per_pixel ? g_c.const_data_ptr<opmath_t>() : nullptr;
    const opmath_t scalar_factor =
        per_pixel ? opmath_t(0)
                  : grad_loss.to(opmath_dtype).item<opmath_t>() / denominator.to(opmath_dtype).item<opmath_t>();
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const int64_t lsb = labels.stride(0), lsh = labels.stride(1), lsw = labels.stride(2);
    scalar_t* out = grad_logits.data_ptr<scalar_t>();
    const int64_t tiles = (w + kTileJ - 1) / kTileJ;
    const int64_t ring = std::max<int64_t>(ah.max_readers, 1);
    // Widest output-column range a tile reads.
    int64_t max_nx = 0;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t j0 = t * kTileJ, j1 = std::min(w, j0 + kTileJ);
      max_nx = std::max(max_nx, aw.lo[j1 - 1] + aw.readers(j1 - 1) - aw.lo[j0]);
    }
    at::parallel_for(0, B * tiles, kGrain, [&](int64_t begin, int64_t end) {
      RowPair<opmath_t> rows(C * std::max<int64_t>(max_nx, 1));
      std::vector<opmath_t> val(C * std::max<int64_t>(max_nx, 1)), reduced(ring * C * kTileJ), acc(C * kTileJ);
      std::vector<opmath_t> lse_row(max_nx + 1), factor(max_nx + 1), label_f(max_nx + 1), valid(max_nx + 1);
      std::vector<int64_t> keys(ring);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / tiles, j0 = (item % tiles) * kTileJ, nj = std::min(kTileJ, w - j0);
        const int64_t xa = aw.lo[j0], nx = aw.lo[j0 + nj - 1] + aw.readers(j0 + nj - 1) - xa;
        rows.key[0] = rows.key[1] = -1;
        std::fill(keys.begin(), keys.end(), -1);
        // Output row y reduced along W onto the tile's columns: reduced[slot][c * kTileJ + jj].
        auto reduce_row = [&](int64_t y, opmath_t* red) {
          const int64_t r0 = ah.i0[y], r1 = ah.i1[y];
          auto fill = [&](int64_t r) { return [&, r](opmath_t* buf) { interpolate_row(s, aw, b, r, C, xa, nx, buf); }; };
          const int s0 = rows.get(r0, r1, fill(r0));
          const int s1 = rows.get(r1, r0, fill(r1));
          for (int64_t x = 0; x < nx; ++x) {
            const int64_t pix = (b * H + y) * W + xa + x;
            const int64_t label = lab[b * lsb + y * lsh + (xa + x) * lsw];
            const bool ok = valid_label(label, ignore_index, C);
            opmath_t f = ok ? (per_pixel ? g_p[pix] : scalar_factor) : opmath_t(0);
            if (ok && has_weight) f = f * cw[label];
            lse_row[x] = lse_p[pix];
            factor[x] = f;
            label_f[x] = ok ? static_cast<opmath_t>(label) : opmath_t(-1);
            valid[x] = ok ? opmath_t(1) : opmath_t(0);
          }
          for (int64_t c = 0; c < C; ++c) {
            opmath_t* v = val.data() + c * nx;
            blend_rows(rows.buf[s0].data() + c * nx, rows.buf[s1].data() + c * nx, ah.l0[y], ah.l1[y], nx, v);
            const Vec<opmath_t> cls(static_cast<opmath_t>(c)), one(1), zero(0);
            vec_for<opmath_t>(nx, [&](int64_t i, int64_t k) {
              const auto prob = (vload(v + i, k) - vload(lse_row.data() + i, k)).exp();
              const auto onehot = Vec<opmath_t>::blendv(zero, one, vload(label_f.data() + i, k) == cls);
              const auto d = (prob - onehot) * vload(factor.data() + i, k);
              // The select (not only factor 0) keeps an inf logit of an ignored pixel from making 0 * inf.
              vstore(v + i, k, Vec<opmath_t>::blendv(zero, d, vload(valid.data() + i, k) == one));
            });
            for (int64_t jj = 0; jj < nj; ++jj) {
              const int64_t j = j0 + jj;
              const opmath_t* wx = aw.gw.data() + aw.start[j];
              const opmath_t* dx = v + (aw.lo[j] - xa);
              opmath_t sum(0);
              for (int64_t e = 0, n = aw.readers(j); e < n; ++e) sum += wx[e] * dx[e];
              red[c * kTileJ + jj] = sum;
            }
          }
        };
        for (int64_t i = 0; i < h; ++i) {
          std::fill(acc.begin(), acc.end(), opmath_t(0));
          for (int64_t t = 0, nd = ah.readers(i); t < nd; ++t) {
            const int64_t y = ah.lo[i] + t;
            opmath_t* red = reduced.data() + (y % ring) * C * kTileJ;
            if (keys[y % ring] != y) {
              reduce_row(y, red);
              keys[y % ring] = y;
            }
            const opmath_t wy = ah.gw[ah.start[i] + t];
            for (int64_t k = 0; k < C * kTileJ; ++k) acc[k] += wy * red[k];
          }
          for (int64_t c = 0; c < C; ++c) {
            scalar_t* o = out + ((b * C + c) * h + i) * w + j0;
            for (int64_t jj = 0; jj < nj; ++jj) o[jj] = static_cast<scalar_t>(acc[c * kTileJ + jj]);
          }
        }
      }
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(upernet_fast_cpp, CPU, m) {
  m.impl("upsample_cross_entropy", &forward);
  m.impl("upsample_cross_entropy_backward", &backward);
}

}  // namespace upernet_fast_cpp
