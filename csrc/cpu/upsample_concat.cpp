// upsample_concat on the CPU: cat([t if t is at size else interpolate(t, size) for t in tensors], 1)
// written straight into the output's channel slices (no resized intermediates, no torch.cat), and the
// gather-form backward of the resized inputs.
#include "bilinear.h"

#include <torch/library.h>

namespace upernet_fast_cpp {
namespace {

Tensor upsample_concat(at::TensorList tensors, c10::IntArrayRef size) {
  TORCH_CHECK(!tensors.empty(), "tensors must hold at least one tensor");
  TORCH_CHECK(size.size() == 2 && size[0] > 0 && size[1] > 0, "size must be two positive ints (H, W), got ", size);
  const Tensor& first = tensors[0];
  int64_t channels = 0;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const std::string name = "tensors[" + std::to_string(k) + "]";
    check_float_map(tensors[k], name.c_str());
    TORCH_CHECK(tensors[k].numel() > 0, name, " must have no empty dimension, got ", tensors[k].sizes());
    TORCH_CHECK(tensors[k].size(0) == first.size(0), name, " has batch size ", tensors[k].size(0),
                " but tensors[0] has ", first.size(0));
    TORCH_CHECK(tensors[k].scalar_type() == first.scalar_type(), name, " has dtype ", tensors[k].scalar_type(),
                " but tensors[0] has ", first.scalar_type());
    channels += tensors[k].size(1);
  }
  const bool channels_last = concat_channels_last(tensors);
  Tensor out = huge_pages(at::empty({first.size(0), channels, size[0], size[1]},
                                    first.options().memory_format(memory_format(channels_last))));
  // One parallel region for every input (small maps such as the PPM's would pay one fork/join each):
  // the work items of all inputs in one index space, each range split at the inputs' boundaries.
  std::vector<Tensor> slices;
  std::vector<int64_t> item0{0};
  int64_t offset = 0;
  for (const Tensor& t : tensors) {
    slices.push_back(out.narrow(1, offset, t.size(1)));
    item0.push_back(item0.back() + resize_items(slices.back()));
    offset += t.size(1);
  }
  UPERNET_FAST_DISPATCH(tensors[0].scalar_type(), "upsample_concat", [&] {
    at::parallel_for(0, item0.back(), kGrain, [&](int64_t begin, int64_t end) {
      for (size_t k = 0; k < tensors.size(); ++k) {
        const int64_t lo = std::max(begin, item0[k]), hi = std::min(end, item0[k + 1]);
        if (lo < hi) resize_forward_items<scalar_t>(tensors[k], slices[k], nullptr, lo - item0[k], hi - item0[k]);
      }
    });
  });
  return out;
}

std::vector<Tensor> upsample_concat_backward(const Tensor& grad, c10::IntArrayRef shapes,
                                             c10::IntArrayRef channel_offsets, const c10::List<bool>& channels_last) {
  check_float_map(grad, "grad");
  const size_t n = channels_last.size();
  TORCH_CHECK(shapes.size() == 3 * n && channel_offsets.size() == n,
              "shapes must hold 3 ints (C, h, w) and channel_offsets 1 int per input (", n,
              " inputs, from channels_last), got ", shapes.size(), " and ", channel_offsets.size());
  std::vector<Tensor> grads;
  for (size_t k = 0; k < n; ++k) {
    const int64_t C = shapes[3 * k], h = shapes[3 * k + 1], w = shapes[3 * k + 2];
    TORCH_CHECK(C > 0 && h > 0 && w > 0, "shapes[", 3 * k, ":", 3 * k + 3, "] must be positive, got (", C, ", ", h,
                ", ", w, ")");
    TORCH_CHECK(channel_offsets[k] >= 0 && channel_offsets[k] + C <= grad.size(1), "channel_offsets[", k, "] = ",
                channel_offsets[k], " with ", C, " channels runs past grad's ", grad.size(1), " channels");
    Tensor g = huge_pages(
        at::empty({grad.size(0), C, h, w}, grad.options().memory_format(memory_format(channels_last.get(k)))));
    UPERNET_FAST_DISPATCH(grad.scalar_type(), "upsample_concat_backward",
                          [&] { resize_backward<scalar_t>(grad, channel_offsets[k], g); });
    grads.push_back(std::move(g));
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(upernet_fast_cpp, CPU, m) {
  m.impl("upsample_concat", &upsample_concat);
  m.impl("upsample_concat_backward", &upsample_concat_backward);
}

}  // namespace upernet_fast_cpp
