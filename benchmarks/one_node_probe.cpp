// Measuring probes for benchmarks/backward_chain.py, not part of the library: autograd nodes with BatchNorm+ReLU's
// differentiable inputs (x, weight, bias), each registered as a dispatcher op (no Python binding: loaded with
// is_python_module=False) whose kernel for every key is the composite one, so that each call builds its node through
// torch::autograd::Function as the cpp backend's bn_relu_train_step does (csrc/autograd/bn_relu_autograd.cpp).
//
// one_node: a backward that computes nothing. It allocates the three gradients, as the cpp backend's fused backward
// must in that benchmark (whose incoming gradient is held, so never written over), and returns them unwritten. Timed
// as bn_relu's backward row is (one torch.autograd.grad call), it is what a one-node backward costs before any kernel
// runs: eager's row divided by the probe's is the most that row can read for any implementation that is one C++
// node, whatever its kernel.
//
// read_once: the least memory traffic of any BN+ReLU backward and nothing more: grad_x = x + grad by ATen's add
// (every value of x and of the incoming gradient read once, grad_x written once: over the incoming gradient when
// nothing else holds it, as the cpp backend does), the weight's and bias's gradients allocated only. Every BN+ReLU backward reads x and grad at least once and writes grad_x, so eager's row over this
// probe's is what a one-node backward reads when its whole kernel costs as much as one ATen elementwise pass over
// the same maps.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ReadsOnce: the read_once probe's backward (grad_x = x + grad), else the one_node probe's (nothing computed).
template <bool ReadsOnce>
class Probe : public torch::autograd::Function<Probe<ReadsOnce>> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias) {
    ctx->save_for_backward({x, weight, bias});
    return {at::empty_like(x)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    Tensor grad_x;
    if (!ReadsOnce) {
      grad_x = at::empty_like(x);
    } else {
      // Written over the incoming gradient where nothing else holds it, as the cpp backend's fused backward does
      // (csrc/autograd/bn_relu_autograd.cpp writable_gradient): in a chain, a fresh map per node would cost page
      // faults the library does not pay.
      Tensor grad = std::move(grads[0]);
      const bool writable = grad.use_count() == 1 && !grad.is_view() && grad.storage().use_count() == 1 &&
                            grad.sizes() == x.sizes() && grad.is_contiguous() && x.is_contiguous();
      grad_x = writable ? grad.add_(x) : at::add(x, grad);
    }
    return {grad_x, at::empty_like(saved[1]), at::empty_like(saved[2])};
  }
};

Tensor one_node(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  return Probe<false>::apply(x, weight, bias)[0];
}

Tensor read_once(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  return Probe<true>::apply(x, weight, bias)[0];
}

}  // namespace

TORCH_LIBRARY(upernet_fast_probe, m) {
  m.def("one_node(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  m.def("read_once(Tensor x, Tensor weight, Tensor bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(upernet_fast_probe, CompositeImplicitAutograd, m) {
  m.impl("one_node", &one_node);
  m.impl("read_once", &read_once);
}
