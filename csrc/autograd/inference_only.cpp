// Autograd of the inference-only ops (eval kernels that have no backward): a call that autograd would have to
// differentiate (grad mode on and a tensor argument requiring grad) is refused with the reason, at the call rather
// than as a silent missing gradient or a generic error at backward(); every other call goes straight on below
// autograd to the device kernel.
//
// Why C++: registered from Python (torch.library.register_autograd), the Autograd key ran a Python function on every
// call, grad or not, and redispatched from Python: measured from Python at 1x512x1x1, bn_relu_eval_from_buffers took
// 15.4 us a call against 6.7 us with the Autograd key skipped, more than the whole kernel on the pyramid pooling
// module's maps. One boxed kernel serves every such op (it reads only the stack's tensors).
//
// Named inference_only.cpp: torch.utils.cpp_extension names object files by the source's base name (see
// bn_relu_autograd.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <memory>
#include <string>

namespace upernet_fast_cpp {
namespace {

// Whether one of the call's arguments (the top `count` values of the stack) is a tensor that requires grad:
// Tensor, Tensor? (None is not a tensor) and Tensor[] arguments, as the schemas of these ops have.
bool any_requires_grad(const torch::jit::Stack& stack, size_t count) {
  for (size_t i = stack.size() - count; i < stack.size(); ++i) {
    const c10::IValue& value = stack[i];
    if (value.isTensor()) {
      if (value.toTensor().requires_grad()) return true;
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorList()) {
        if (t.requires_grad()) return true;
      }
    }
  }
  return false;
}

class InferenceOnly final : public c10::OperatorKernel {
 public:
  // op_name: the upernet_fast.ops function that routes autograd-free calls here (named in the refusal).
  explicit InferenceOnly(std::string op_name) : op_name_(std::move(op_name)) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
    const size_t count = op.schema().arguments().size();
    TORCH_CHECK(!(c10::GradMode::is_enabled() && any_requires_grad(*stack, count)), "upernet_fast: ",
                op.schema().name(), " is inference-only (no backward); ", op_name_,
                " routes only autograd-free calls (torch.no_grad / inference_mode, or nothing requiring grad) to it");
    op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
  }

 private:
  std::string op_name_;
};

torch::CppFunction inference_only(const char* op_name) {
  return torch::CppFunction::makeFromBoxedFunctor(std::make_unique<InferenceOnly>(op_name));
}

}  // namespace

// Every inference-only op of the extension (upernet_fast/ops: the InferenceOp declarations, which register only
// their fake kernels; tests/test_cpp_extension.py checks that each has this kernel and no Python one).
TORCH_LIBRARY_IMPL(upernet_fast_cpp, Autograd, m) {
  m.impl("bn_relu_eval_from_buffers", inference_only("bn_relu"));
  m.impl("conv_bn_relu_pointwise_eval", inference_only("conv_bn_relu"));
  m.impl("winograd_filter_transform", inference_only("conv_bn_relu"));
  m.impl("winograd_transform_domain_products", inference_only("conv_bn_relu"));
  m.impl("winograd_conv", inference_only("conv_bn_relu"));
  m.impl("winograd_conv_bias_relu", inference_only("conv_bn_relu"));
  m.impl("winograd_upsample_concat_conv", inference_only("conv_bn_relu"));
  m.impl("winograd_upsample_concat_conv_bias_relu", inference_only("conv_bn_relu"));
  m.impl("winograd_upsample_concat_conv_bias_relu_lowres", inference_only("conv_bn_relu"));
}

}  // namespace upernet_fast_cpp
