// Shared pieces of the CPU kernels: dtype dispatch, layout rules, strided rows as vectors, checks.
//
// Every kernel file includes only this header and bilinear.h / reduce.h (narrow ATen headers, not
// torch/extension.h: each translation unit compiles in a few seconds).
//
// Arithmetic: float32 and bfloat16 compute in float32 (at::opmath_type), float64 in float64. The
// extension is compiled with -ffp-contract=off (see upernet_fast/cpp_extension.py): no multiply-add is
// contracted into an FMA behind our back, so the bits of every result are those of the expression as
// written, whichever vector ISA the build targets.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/irange.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace upernet_fast_cpp {

using at::Tensor;

// float32, float64 and bfloat16: the dtypes every kernel takes (float16 is not a CPU training dtype here).
#define UPERNET_FAST_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

// Work items per at::parallel_for task. Only speed depends on it: every kernel computes each output
// element (and each partial sum) the same way whatever the split, so results never depend on it.
constexpr int64_t kGrain = 1;

// Whether channels are the innermost dimension of t (channels_last, sliced or not), so which loop order
// its tiles take (along C when true, else along W), from its strides: size-1 dims make
// both layouts contiguous at once, and stride(3) > 1 keeps an NCHW (B, C, 1, 1) tensor NCHW. Where an output
// is allocated, suggests_channels_last (PyTorch's rule) chooses its layout instead.
inline bool is_channels_last_layout(const Tensor& t) {
  return t.size(1) > 1 && t.stride(1) == 1 && t.stride(3) > 1;
}

// PyTorch's suggest_memory_format rule for a 4D tensor (kernels/adaptive_avg_pool_multi.py's
// output_channels_last): strides non-decreasing in the order C, W, H, N, NCHW on ties of size-1 dims.
inline bool suggests_channels_last(const Tensor& x) {
  const auto sizes = x.sizes();
  const auto strides = x.strides();
  if (strides[1] == 0) return false;
  int64_t floor = 0;
  for (int d : {1, 3, 2, 0}) {
    if (strides[d] < floor) return false;
    if (d == 0 && floor == strides[1]) return false;
    floor = strides[d] * std::max<int64_t>(sizes[d], 1);
  }
  return true;
}

// Asks the kernel for transparent huge pages behind a freshly allocated (not yet touched) output; returns it.
// Why: these kernels are memory-bound and write each output once, so the first-touch page faults of a new
// output are a large share of their time: on the development machine (THP in "madvise" mode) a 32 MB
// output costs ~48 ms of 4 KB page faults against ~16 ms to write it. PyTorch's own allocator does the
// same under THP_MEM_ALLOC_ENABLE=1. Only a hint: no effect on values, ignored where unsupported.
inline Tensor huge_pages(Tensor t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.storage().nbytes();
  if (bytes >= 2 * kHuge) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.storage().data());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

inline at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline void check_float_map(const Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the upernet_fast_cpp kernels, got ", t.device());
  TORCH_CHECK(t.dim() == 4, name, " must be a 4D (B, C, H, W) tensor, got ", t.dim(), "D with shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kBFloat16,
              name, " must be float32, float64 or bfloat16, got ", t.scalar_type());
}

inline void check_per_channel(const Tensor& t, const char* name, int64_t channels) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, name, " must have shape (", channels, ",), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ", t.scalar_type());
}

// A (C,) tensor of any floating dtype as opmath values: read in place when it already is a dense opmath vector, else
// converted once (held here). Why not a std::vector copy: a call of the eval kernels on a small map read four to six
// of them, and each 2 KB allocation (512 channels) made glibc consolidate its fast bins, a few percent of the call
// (perf, 1x512x1x1). Valid while the tensor lives (the op's argument).
template <typename opmath_t>
class ChannelValues {
 public:
  ChannelValues() = default;  // none (an absent optional parameter): empty()
  explicit ChannelValues(const Tensor& t) {
    constexpr auto dtype = c10::CppTypeToScalarType<opmath_t>::value;
    // In place: no dispatcher call (microseconds on small maps) and no copy.
    held_ = t.scalar_type() == dtype && t.is_contiguous() ? t : t.to(dtype).contiguous();
    data_ = held_.const_data_ptr<opmath_t>();
    size_ = held_.numel();
  }
  const opmath_t* data() const { return data_; }
  const opmath_t& operator[](int64_t i) const { return data_[i]; }
  int64_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

 private:
  Tensor held_;
  const opmath_t* data_ = nullptr;
  int64_t size_ = 0;
};

template <typename opmath_t>
ChannelValues<opmath_t> per_channel(const Tensor& t) {
  return ChannelValues<opmath_t>(t);
}

// n values of a strided row as a contiguous opmath row: the row itself when it already is one (no copy),
// else converted into tmp. Lets every inner loop run on at::vec::Vectorized<opmath_t>, for any strides and
// for bfloat16.
template <typename scalar_t, typename opmath_t>
inline const opmath_t* row_in(const scalar_t* p, int64_t stride, int64_t n, opmath_t* tmp) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    if (stride == 1) return p;
  }
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<opmath_t>(p[i * stride]);
  return tmp;
}

// Where to compute an output row: the row itself when it is contiguous and of the opmath type, else tmp,
// which row_out then stores (rounded to scalar_t).
template <typename scalar_t, typename opmath_t>
inline opmath_t* row_buffer(scalar_t* p, int64_t stride, opmath_t* tmp) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    if (stride == 1) return p;
  }
  return tmp;
}

template <typename scalar_t, typename opmath_t>
inline void row_out(scalar_t* p, int64_t stride, int64_t n, const opmath_t* buf) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    if (stride == 1 && static_cast<const void*>(p) == static_cast<const void*>(buf)) return;
  }
  for (int64_t i = 0; i < n; ++i) p[i * stride] = static_cast<scalar_t>(buf[i]);
}

// out[i] = f(i) over n elements, Vectorized<opmath_t>-wide steps then a scalar tail. f takes a Vec lane
// start and must be written with at::vec operators only, so that the tail (done with the same vector code
// on a zero-padded copy) gives the same bits as the vector body.
template <typename opmath_t, typename F>
inline void vec_for(int64_t n, F f) {
  using Vec = at::vec::Vectorized<opmath_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) f(i, Vec::size());
  if (i < n) f(i, n - i);
}

// Loads count (<= Vec::size()) values; the rest of the lanes are 0.
template <typename opmath_t>
inline at::vec::Vectorized<opmath_t> vload(const opmath_t* p, int64_t count) {
  using Vec = at::vec::Vectorized<opmath_t>;
  return count == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, count);
}

template <typename opmath_t>
inline void vstore(opmath_t* p, int64_t count, const at::vec::Vectorized<opmath_t>& v) {
  using Vec = at::vec::Vectorized<opmath_t>;
  if (count == Vec::size()) {
    v.store(p);
  } else {
    v.store(p, count);
  }
}

}  // namespace upernet_fast_cpp
