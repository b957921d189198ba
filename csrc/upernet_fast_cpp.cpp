// The compiled core of upernet_fast: the operator schemas (TORCH_LIBRARY) and a small pybind11 module with
// build and CPU-capability information. Kernels live in csrc/cpu/<op>.cpp (csrc/cuda/<op>.cu later), each
// registering its implementations with TORCH_LIBRARY_IMPL(upernet_fast_cpp, <device key>, m).
//
// Namespace: upernet_fast_cpp, with exactly the op names, argument names and schemas of the Python Triton
// custom ops in upernet_fast:: (upernet_fast/ops/*.py), not one op with a kernel per device. Reason: the
// Triton ops must also run on CPU tensors under TRITON_INTERPRET=1 (that is how every Triton kernel is
// tested here), and a dispatcher op has one CPU kernel, so one op cannot hold both the interpreted Triton
// kernel and this one. Identical schemas let the Python layer register one fake kernel and one autograd
// formula for both namespaces. The CUDA key of these ops stays free for csrc/cuda kernels.
//
// The schemas are the ones torch.library.custom_op infers for the Python ops (list[int] -> SymInt[], int ->
// SymInt; tests/test_cpp_extension.py compares them); the C++ kernels take plain int64_t / IntArrayRef, which
// the dispatcher converts (concrete sizes only, as any CPU kernel).
//
// Fake (Meta) kernels and autograd are registered from Python (upernet_fast/ops), shared with the Triton ops,
// except for bn_relu_train_step, whose autograd is C++ (csrc/autograd/): it exists to take Python off the call.
//
// This is the only file with Python bindings. It includes pybind11 itself rather than torch/extension.h
// (which pulls in the whole C++ frontend, torch/all.h, and made this file take 3x longer to compile than any
// kernel file), and the kernel files include narrow ATen headers only: the build stays short.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <string>
#include <vector>

TORCH_LIBRARY(upernet_fast_cpp, m) {
  // adaptive_avg_pool_multi: one (B, C, s, s) map per scale, in x's memory format (suggest_memory_format).
  m.def("adaptive_avg_pool_multi(Tensor x, SymInt[] scales) -> Tensor[]");
  m.def("adaptive_avg_pool_multi_backward(Tensor[] grads, SymInt[] input_shape, bool channels_last) -> Tensor");
  // upsample_add: lateral + interpolate(low, lateral's size); backward: low's gradient.
  m.def("upsample_add(Tensor low, Tensor lateral) -> Tensor");
  m.def("upsample_add_backward(Tensor grad, SymInt[] low_size, bool low_channels_last) -> Tensor");
  // upsample_concat: the concat of every input resized to size; backward: the resized inputs' gradients.
  m.def("upsample_concat(Tensor[] tensors, SymInt[] size) -> Tensor");
  m.def("upsample_concat_backward(Tensor grad, SymInt[] shapes, SymInt[] channel_offsets, bool[] channels_last) -> Tensor[]");
  // upsample_cross_entropy: (loss, per-pixel log-sum-exp, denominator); backward: the logits' gradient.
  m.def(
      "upsample_cross_entropy(Tensor logits, Tensor labels, Tensor? weight, SymInt ignore_index, str reduction, "
      "bool align_corners) -> (Tensor, Tensor, Tensor)");
  m.def(
      "upsample_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor labels, Tensor? weight, Tensor lse, "
      "Tensor denominator, SymInt ignore_index, bool align_corners) -> Tensor");
  // BatchNorm + ReLU, training (batch statistics), as the kernel-level functions of kernels/conv_bn_relu.py.
  m.def("bn_relu_channel_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("bn_relu_apply(Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias) -> Tensor");
  m.def(
      "bn_relu_backward_reduce(Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias) "
      "-> (Tensor, Tensor)");
  m.def(
      "bn_relu_backward_input(Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
      "Tensor sum_g, Tensor sum_gxhat, float count) -> Tensor");
  // Both in one pass per channel (NCHW, no process group): (grad_x, sum_g, sum_gxhat), the same bits.
  m.def(
      "bn_relu_backward_fused(Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias) "
      "-> (Tensor, Tensor, Tensor)");
  // The same with grad_x written over grad (an incoming gradient nothing else holds): (sum_g, sum_gxhat).
  m.def(
      "bn_relu_backward_fused_(Tensor(a!) grad, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias) "
      "-> (Tensor, Tensor)");
  // The training forward in one call (statistics, y, running-statistics update in place): (y, mean, invstd).
  // Its autograd is C++ (csrc/autograd/bn_relu_autograd.cpp), its backward the kernel ops above; no Python per call.
  m.def(
      "bn_relu_train_step(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!) num_batches_tracked, float? momentum, float eps) -> (Tensor, Tensor, Tensor)");
  // BatchNorm + ReLU, eval (running statistics folded into a per-channel affine).
  m.def("bn_relu_eval(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  m.def("bn_relu_eval_backward(Tensor grad, Tensor y, Tensor x, Tensor scale) -> (Tensor, Tensor, Tensor)");
  // The same from BatchNorm's buffers and parameters, scale and shift computed in C++ (autograd-free calls only).
  m.def(
      "bn_relu_eval_from_buffers(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, Tensor? bias, "
      "float eps) -> Tensor");
  // conv + BatchNorm + ReLU of a 1x1 conv on an NCHW map, eval, autograd-free, in one call (csrc/cpu/conv_bn_relu.cpp):
  // BN folded into the weight (fold) or applied after the products (the PPM's blocks, fold=false).
  m.def(
      "conv_bn_relu_pointwise_eval(Tensor x, Tensor weight, Tensor? conv_bias, Tensor running_mean, "
      "Tensor running_var, Tensor? bn_weight, Tensor? bn_bias, float eps, bool fold) -> Tensor");
  // 3x3 stride-1 padding-1 convolution + bias + ReLU by Winograd F(4x4, 3x3), no autograd formula (training's is in Python):
  // the filter transform (36, C_out, C_in; values in the products' packed order), computed once per weight and
  // cached by the caller, and the conv.
  m.def("winograd_filter_transform(Tensor weight) -> Tensor");
  // The conv's 36 transform-domain products alone, v (36, tiles, C_in) @ U^T -> (36, tiles, C_out): for the
  // products' own tests and benchmark rows.
  m.def("winograd_transform_domain_products(Tensor v, Tensor filter) -> Tensor");
  m.def("winograd_conv_bias_relu(Tensor x, Tensor filter, Tensor bias) -> Tensor");
  // The same conv over upsample_concat(tensors, size) (bitwise), reading the inputs without building the concat.
  m.def("winograd_upsample_concat_conv_bias_relu(Tensor[] tensors, SymInt[] size, Tensor filter, Tensor bias) -> Tensor");
  // The same with tensors[first_lowres:] convolved at their own (lower) resolution by the folded weight, then
  // upsampled (csrc/cpu/winograd_lowres.h): not bitwise the unfused block, judged against float64.
  m.def(
      "winograd_upsample_concat_conv_bias_relu_lowres(Tensor[] tensors, SymInt[] size, Tensor filter, Tensor bias, "
      "Tensor weight, SymInt first_lowres) -> Tensor");
  // The plain convolutions (no bias, no ReLU), for training: the block's conv, whose BatchNorm follows, and the
  // input gradient (the gradient convolved with the transform of the flipped, transposed weight). The same
  // layout rules and bits as the ops above with a zero bias and without the ReLU.
  m.def("winograd_conv(Tensor x, Tensor filter) -> Tensor");
  m.def("winograd_upsample_concat_conv(Tensor[] tensors, SymInt[] size, Tensor filter) -> Tensor");
}

#define UPERNET_FAST_STR2(x) #x
#define UPERNET_FAST_STR(x) UPERNET_FAST_STR2(x)

namespace {

std::string vec_isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#elif defined(__aarch64__)
  return "NEON (aarch64)";
#else
  return "DEFAULT (no ISA-specific at::vec; compiler auto-vectorisation only)";
#endif
}

// How many threads one at::parallel_for of this extension really runs on. Why: at::parallel_for is a header
// template compiled into the extension, parallel only when the extension itself is built with OpenMP; built
// without it (as this project's extension was until 2026-11-28) every kernel silently ran on one thread.
int parallel_for_threads() {
  std::vector<int> ran(at::get_num_threads(), 0);
  at::parallel_for(0, static_cast<int64_t>(ran.size()), 1, [&](int64_t begin, int64_t end) {
    const int thread = at::get_thread_num();
    if (thread >= 0 && thread < static_cast<int>(ran.size())) ran[thread] = 1;
  });
  int count = 0;
  for (int r : ran) count += r;
  return count;
}

pybind11::dict build_info() {
  pybind11::dict info;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  info["torch_version"] = std::string(TORCH_VERSION);
  info["vec_isa"] = vec_isa();
  info["vec_float_lanes"] = static_cast<int>(at::vec::Vectorized<float>::size());
  info["num_threads"] = at::get_num_threads();
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["parallel_for_threads"] = parallel_for_threads();
#ifdef UPERNET_FAST_CFLAGS
  info["flags"] = std::string(UPERNET_FAST_STR(UPERNET_FAST_CFLAGS));
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "upernet_fast's compiled core: ops under torch.ops.upernet_fast_cpp, and build information";
  module.def("build_info", &build_info, "compiler, flags, torch version built against, at::vec ISA, threads");
}
