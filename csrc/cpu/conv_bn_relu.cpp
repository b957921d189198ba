// conv_bn_relu on the CPU, eval mode, autograd-free, 1x1 convolutions of NCHW maps: the whole block of
// upernet_fast/ops/conv_bn_relu.py's cpp path in one call, with the bits of its Python composition.
//
// Why an op for what Python composes from ATen calls: on small maps (the FPN's and the pyramid pooling
// module's 1x1 blocks at low resolution, every block on tiny inputs) the block was a dozen ATen calls from
// Python (the fold: conversions, rsqrt, five elementwise ops; the products: a view, a select and an addmm per
// image; the ReLU), about 60 us a call on this project's CPU where the arithmetic takes a few. Those calls
// also evict the interpreter's own working set, so the Python code after the block (the next op's dispatch)
// ran twice as slow (measured: the selection of the next call 3.3 us after this op, 6 us after the
// composition). Here the products and the ReLU are the same ATen calls made from C++, and the fold is one loop.
//
// fold=true: BatchNorm folded into the conv (conv_bn_relu.py's _fold: scale = bn_weight / sqrt(running_var
// + eps), weight * scale, (conv_bias - running_mean) * scale + bn_bias, each step rounded in the
// accumulation dtype as its tensor ops round it), then out[b] = shift + W' @ x[b] (addmm) and ReLU in place.
// fold=false (a weight that outnumbers the output: the PPM's): out[b] = conv_bias + W @ x[b], then
// bn_relu_eval_from_buffers (called through the dispatcher, so that the profiler records it as when Python
// called it). Only speed differs from the Python path; tests/test_conv_bn_relu.py compares the bits.
#include "common.h"
#include "op_handle.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <utility>

namespace upernet_fast_cpp {
namespace {

bool given(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// (weight * scale, shift) in weight's dtype, computed in acc_t (float32 for float32 and bfloat16 weights, float64
// for float64), in _fold's order: scale = 1 / sqrt(running_var + eps) [* bn_weight]; shift = -running_mean
// [+ conv_bias], * scale [+ bn_bias]. Per-channel tensors of any floating dtype are converted to acc_t first, as
// _fold's .to(acc) converts them.
template <typename scalar_t>
std::pair<Tensor, Tensor> fold(const Tensor& weight, const std::optional<Tensor>& conv_bias,
                               const Tensor& running_mean, const Tensor& running_var,
                               const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias,
                               double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t cout = weight.size(0);
  const int64_t per_out = weight.numel() / cout;
  const auto rm = per_channel<acc_t>(running_mean), rv = per_channel<acc_t>(running_var);
  const auto cb = given(conv_bias) ? per_channel<acc_t>(*conv_bias) : ChannelValues<acc_t>();
  const auto bw = given(bn_weight) ? per_channel<acc_t>(*bn_weight) : ChannelValues<acc_t>();
  const auto bb = given(bn_bias) ? per_channel<acc_t>(*bn_bias) : ChannelValues<acc_t>();
  const Tensor w = weight.contiguous();
  Tensor folded = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor shift = at::empty({cout}, weight.options());
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  scalar_t* fp = folded.data_ptr<scalar_t>();
  scalar_t* hp = shift.data_ptr<scalar_t>();
  for (int64_t o = 0; o < cout; ++o) {
    acc_t scale = acc_t(1) / std::sqrt(rv[o] + static_cast<acc_t>(eps));  // torch.rsqrt's float and vector paths
    if (!bw.empty()) scale = scale * bw[o];
    acc_t h = -rm[o];
    if (!cb.empty()) h = h + cb[o];
    h = h * scale;
    if (!bb.empty()) h = h + bb[o];
    hp[o] = static_cast<scalar_t>(h);
    for (int64_t i = 0; i < per_out; ++i) {
      fp[o * per_out + i] = static_cast<scalar_t>(static_cast<acc_t>(wp[o * per_out + i]) * scale);
    }
  }
  return {folded, shift};
}

void check_pointwise_eval_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& conv_bias,
                               const Tensor& running_mean, const Tensor& running_var,
                               const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias) {
  check_float_map(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x must be float32 or float64 (the products are ATen's matrix products in x's dtype), got ",
              x.scalar_type());
  TORCH_CHECK(x.is_contiguous() && x.numel() > 0, "x must be a non-empty NCHW-contiguous map, got shape ",
              x.sizes(), " and strides ", x.strides());
  TORCH_CHECK(weight.defined() && weight.device().is_cpu() && weight.dim() == 4 && weight.size(1) == x.size(1) &&
                  weight.size(2) == 1 && weight.size(3) == 1 && weight.size(0) > 0,
              "weight must be a CPU (C_out, ", x.size(1), ", 1, 1) tensor (a 1x1 conv of x's channels), got ",
              weight.defined() ? weight.sizes() : c10::IntArrayRef{});
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype ", x.scalar_type(), ", got ",
              weight.scalar_type());
  const int64_t cout = weight.size(0);
  if (given(conv_bias)) {
    check_per_channel(*conv_bias, "conv_bias", cout);
    TORCH_CHECK(conv_bias->scalar_type() == x.scalar_type(), "conv_bias must have x's dtype ", x.scalar_type(),
                ", got ", conv_bias->scalar_type());
  }
  check_per_channel(running_mean, "running_mean", cout);
  check_per_channel(running_var, "running_var", cout);
  if (given(bn_weight)) check_per_channel(*bn_weight, "bn_weight", cout);
  if (given(bn_bias)) check_per_channel(*bn_bias, "bn_bias", cout);
}

// out[b] = bias + matrix @ x3[b] (bias a (C_out, 1) view, or none), one product per image written in place:
// conv_bn_relu.py's _pointwise_products, call for call.
Tensor products(const Tensor& x, const Tensor& matrix, const std::optional<Tensor>& bias) {
  const int64_t batch = x.size(0), hw = x.size(2) * x.size(3);
  const Tensor x3 = x.view({batch, x.size(1), hw});
  Tensor out = at::empty({batch, matrix.size(0), hw}, x.options());
  for (int64_t b = 0; b < batch; ++b) {
    Tensor out_b = out.select(0, b);
    if (bias.has_value()) {
      at::addmm_out(out_b, *bias, matrix, x3.select(0, b));
    } else {
      at::mm_out(out_b, matrix, x3.select(0, b));
    }
  }
  return out.view({batch, matrix.size(0), x.size(2), x.size(3)});
}

Tensor conv_bn_relu_pointwise_eval(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& conv_bias,
                                   const Tensor& running_mean, const Tensor& running_var,
                                   const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias,
                                   double eps, bool fold_bn) {
  check_pointwise_eval_args(x, weight, conv_bias, running_mean, running_var, bn_weight, bn_bias);
  const int64_t cout = weight.size(0);
  if (!fold_bn) {
    const std::optional<Tensor> bias =
        given(conv_bias) ? std::optional<Tensor>(conv_bias->view({cout, 1})) : std::nullopt;
    const Tensor y = products(x, weight.reshape({cout, x.size(1)}), bias);
    static const auto eval_from_buffers =
        op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                         const std::optional<Tensor>&, double)>("upernet_fast_cpp::bn_relu_eval_from_buffers");
    // Below autograd (this op is autograd-free; the op's Python autograd formula would only cost time), but
    // through the dispatcher, where the profiler records the call.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return eval_from_buffers.call(y, running_mean, running_var, bn_weight, bn_bias, eps);
  }
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_bn_relu_pointwise_eval", [&] {
    const auto [folded, shift] = fold<scalar_t>(weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps);
    out = products(x, folded.reshape({cout, x.size(1)}), shift.view({cout, 1}));
  });
  return at::relu_(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(upernet_fast_cpp, CPU, m) {
  m.impl("conv_bn_relu_pointwise_eval", &conv_bn_relu_pointwise_eval);
}

}  // namespace upernet_fast_cpp
