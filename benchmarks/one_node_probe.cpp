// A measuring probe for benchmarks/backward_chain.py, not part of the library: one autograd node with BatchNorm+ReLU's
// differentiable inputs (x, weight, bias) whose backward computes nothing. Its backward allocates the three gradients,
// as the cpp backend's fused backward must in that benchmark (whose incoming gradient is held, so never written
// over), and returns them unwritten. Timed as bn_relu's backward row is (one torch.autograd.grad call), it is what a
// one-node backward costs before any kernel runs: eager's row divided by the probe's is the most that row can read
// for any implementation that is one C++ node, whatever its kernel.
//
// Registered as a dispatcher op (no Python binding: loaded with is_python_module=False), its kernel for every key
// the composite one, so that each call builds the node through torch::autograd::Function as the cpp backend's
// bn_relu_train_step does (csrc/autograd/bn_relu_autograd.cpp).
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class OneNodeProbe : public torch::autograd::Function<OneNodeProbe> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias) {
    ctx->save_for_backward({x, weight, bias});
    return {at::empty_like(x)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    return {at::empty_like(saved[0]), at::empty_like(saved[1]), at::empty_like(saved[2])};
  }
};

Tensor one_node(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  return OneNodeProbe::apply(x, weight, bias)[0];
}

}  // namespace

TORCH_LIBRARY(upernet_fast_probe, m) {
  m.def("one_node(Tensor x, Tensor weight, Tensor bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(upernet_fast_probe, CompositeImplicitAutograd, m) {
  m.impl("one_node", &one_node);
}
