// Autograd of bn_relu_train_step (BatchNorm + ReLU in training, one call) in C++, after torchvision's
// csrc/ops/autograd/: registered for the Autograd key, so one formula serves every device whose kernels the
// dispatcher finds below it (the CPU's today).
//
// Why C++ here and Python autograd for the other ops: this op exists to remove the per-call Python cost on the
// pyramid pooling module's small maps, where the Python autograd layer alone costs more than the kernels.
// The forward and the backward call the ops through the dispatcher (never a kernel function directly), so
// FakeTensor tracing (opcheck, torch.compile) sees the same ops with their fake kernels.
//
// The backward is the composite's: bn_relu_backward_fused on NCHW maps (one pass per channel; its in-place form,
// bn_relu_backward_fused_, writing grad_x over the incoming gradient when nothing else holds it), else
// bn_relu_backward_reduce then bn_relu_backward_input; weight and bias gradients are the per-channel sums in
// the parameters' dtype. First-order only, as every kernel backward here: a backward that would itself be
// differentiated (create_graph=True) is refused with what to do.
//
// Named bn_relu_autograd.cpp, not bn_relu.cpp: torch.utils.cpp_extension names object files by the source's
// base name alone, so a second bn_relu.cpp would build the same bn_relu.o as csrc/cpu/bn_relu.cpp.
#include "op_handle.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace upernet_fast_cpp {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using TrainStep = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                     const Tensor&, const Tensor&, std::optional<double>, double);
using BackwardFused = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, const Tensor&);
using BackwardFusedInPlace = std::tuple<Tensor, Tensor>(Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, const Tensor&);
using BackwardReduce = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                  const Tensor&, const Tensor&);
using BackwardInput = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const Tensor&, const Tensor&, const Tensor&, double);

// t in like's dtype; t itself when it is already (no dispatcher call for the float32 parameters' usual case).
Tensor as_dtype_of(const Tensor& t, const Tensor& like) {
  return t.scalar_type() == like.scalar_type() ? t : t.to(like.scalar_type());
}

// Whether grad_x may be written over grad: a plain CPU tensor (not a tracing wrapper: FakeTensor, functionalization)
// of x's shape and dtype, NCHW-contiguous, that no other tensor, hook or node holds (the only reference to its
// TensorImpl and to its storage, which it spans whole: not a view).
bool writable_gradient(const Tensor& grad, const Tensor& x) {
  const auto keys = grad.key_set();
  if (!keys.has(c10::DispatchKey::CPU) || keys.has(c10::DispatchKey::Python) ||
      keys.has(c10::DispatchKey::Functionalize)) {
    return false;
  }
  if (grad.use_count() != 1 || grad.is_view() || !grad.has_storage() || grad.storage().use_count() != 1) {
    return false;
  }
  return grad.scalar_type() == x.scalar_type() && grad.sizes() == x.sizes() && grad.is_contiguous() &&
         grad.storage_offset() == 0 && grad.storage().nbytes() == grad.nbytes() && !grad.requires_grad();
}

class BnReluTrainStep : public torch::autograd::Function<BnReluTrainStep> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                               const Tensor& running_mean, const Tensor& running_var,
                               const Tensor& num_batches_tracked, std::optional<double> momentum, double eps) {
    static const auto op = op_handle<TrainStep>("upernet_fast_cpp::bn_relu_train_step");
    Tensor y, mean, invstd;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, mean, invstd) =
          op.call(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps);
    }
    // The buffers changed in place: their version counters say so, as nn.BatchNorm2d's update does.
    for (const Tensor* t : {&running_mean, &running_var, &num_batches_tracked}) {
      torch::autograd::impl::bump_version(*t);
    }
    ctx->save_for_backward({x, weight, bias, mean, invstd});
    ctx->mark_non_differentiable({mean, invstd});
    ctx->set_materialize_grads(false);  // mean's and invstd's gradients are never used: no zeros made for them
    return {y, mean, invstd};
  }

  // grads by reference: CppNode passes its own list of the incoming gradients, which it drops after this call; taking
  // the gradient out of it (std::move) leaves ours the only reference where no hook or other node kept one.
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "upernet_fast: bn_relu's C++ backward has no backward of its own (double backward, e.g. a gradient "
                "penalty, is not supported there); run bn_relu with backend='eager' for higher-order gradients");
    static const auto fused = op_handle<BackwardFused>("upernet_fast_cpp::bn_relu_backward_fused");
    static const auto reduce = op_handle<BackwardReduce>("upernet_fast_cpp::bn_relu_backward_reduce");
    static const auto input = op_handle<BackwardInput>("upernet_fast_cpp::bn_relu_backward_input");
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(8);  // y unused: no gradient flows into x, weight or bias
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &invstd = saved[4];
    const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
    Tensor grad = std::move(grads[0]);
    grad = grad.contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    Tensor grad_x, sum_g, sum_gxhat;
    // Straight to the CPU kernels: below the Autograd and ADInplaceOrView keys, which these backward ops have
    // no kernels for (the dispatcher's boxed fallbacks there cost microseconds per call on the PPM's small maps,
    // and gradient mode is off here anyway).
    at::AutoDispatchBelowADInplaceOrView guard;
    if (!channels_last && writable_gradient(grad, x)) {
      static const auto fused_in_place = op_handle<BackwardFusedInPlace>("upernet_fast_cpp::bn_relu_backward_fused_");
      std::tie(sum_g, sum_gxhat) = fused_in_place.call(grad, x, mean, invstd, weight, bias);
      grad_x = std::move(grad);
    } else if (!channels_last) {
      std::tie(grad_x, sum_g, sum_gxhat) = fused.call(grad, x, mean, invstd, weight, bias);
    } else {
      std::tie(sum_g, sum_gxhat) = reduce.call(grad, x, mean, invstd, weight, bias);
      // Values per channel (symbolic while tracing with dynamic shapes: the float argument takes it concrete).
      const double count = static_cast<double>((x.sym_numel() / x.sym_size(1)).guard_int(__FILE__, __LINE__));
      grad_x = input.call(grad, x, mean, invstd, weight, bias, sum_g, sum_gxhat, count);
    }
    // The sums are fresh tensors: returned as they are where the parameters share their dtype (float32).
    return {grad_x, as_dtype_of(sum_gxhat, weight), as_dtype_of(sum_g, bias),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> train_step_autograd(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                       const Tensor& running_mean, const Tensor& running_var,
                                                       const Tensor& num_batches_tracked,
                                                       std::optional<double> momentum, double eps) {
  const auto out = BnReluTrainStep::apply(x, weight, bias, running_mean, running_var, num_batches_tracked,
                                          momentum, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(upernet_fast_cpp, Autograd, m) {
  m.impl("bn_relu_train_step", &train_step_autograd);
}

}  // namespace upernet_fast_cpp
