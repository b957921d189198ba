// A typed handle to an op registered with the dispatcher (ours or ATen's), for C++ that calls an op through the
// dispatcher rather than its kernel directly: so that the profiler records the call and tracing sees it.
// Its own header, not common.h: only the files that call ops this way need the dispatcher's headers.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace upernet_fast_cpp {

// Looked up once by the caller (a function-local static): findSchemaOrThrow walks the registry by name.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace upernet_fast_cpp
