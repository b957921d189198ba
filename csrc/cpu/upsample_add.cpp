// upsample_add on the CPU: lateral + interpolate(low, size=lateral.shape[-2:], bilinear), in one pass
// (bilinear.h's resize_forward with the lateral added before the single store), and the gather-form
// backward of low's gradient (lateral's gradient is the incoming one; the Python autograd passes it on).
#include "bilinear.h"

#include <torch/library.h>

namespace upernet_fast_cpp {
namespace {

Tensor upsample_add(const Tensor& low, const Tensor& lateral) {
  check_float_map(low, "low");
  check_float_map(lateral, "lateral");
  TORCH_CHECK(low.size(0) == lateral.size(0) && low.size(1) == lateral.size(1),
              "low and lateral must have the same batch and channel sizes, got low ", low.sizes(), " and lateral ",
              lateral.sizes());
  TORCH_CHECK(low.scalar_type() == lateral.scalar_type(), "low and lateral must have the same dtype, got ",
              low.scalar_type(), " and ", lateral.scalar_type());
  TORCH_CHECK(low.numel() > 0 && lateral.numel() > 0, "low and lateral must have no empty dimension, got ",
              low.sizes(), " and ", lateral.sizes());
  Tensor out = huge_pages(at::empty_like(lateral));  // lateral's layout, as the Triton launcher allocates it
  UPERNET_FAST_DISPATCH(lateral.scalar_type(), "upsample_add", [&] { resize_forward<scalar_t>(low, out, &lateral); });
  return out;
}

Tensor upsample_add_backward(const Tensor& grad, c10::IntArrayRef low_size, bool low_channels_last) {
  check_float_map(grad, "grad");
  TORCH_CHECK(low_size.size() == 4 && low_size[0] == grad.size(0) && low_size[1] == grad.size(1) &&
                  low_size[2] > 0 && low_size[3] > 0,
              "low_size must be (B, C, h, w) with grad's B and C ", grad.sizes().slice(0, 2), ", got ", low_size);
  Tensor grad_low = huge_pages(at::empty(low_size, grad.options().memory_format(memory_format(low_channels_last))));
  UPERNET_FAST_DISPATCH(grad.scalar_type(), "upsample_add_backward",
                        [&] { resize_backward<scalar_t>(grad, 0, grad_low); });
  return grad_low;
}

}  // namespace

TORCH_LIBRARY_IMPL(upernet_fast_cpp, CPU, m) {
  m.impl("upsample_add", &upsample_add);
  m.impl("upsample_add_backward", &upsample_add_backward);
}

}  // namespace upernet_fast_cpp
