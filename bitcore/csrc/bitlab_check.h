// BitLab's C++ extensions: argument checks whose messages are built without iostreams.
//
// BITLAB_CHECK(cond, parts...) is TORCH_CHECK(cond, one std::string of the parts).  On the GPU machine's build
// (torch 2.11 and that machine's g++) a TORCH_CHECK whose message streamed an integer or a shape crashed the process
// (SIGSEGV) instead of raising: cuda-gdb put the fault in the extension's own copy of
// std::ostream::_M_insert<long>, in a locale facet call (std::codecvt<char16_t>::do_unshift): the number formatting
// reached the wrong facet.  Messages of strings, dtypes and devices (formatted inside libc10) raised as they should.
// Here numbers go through std::to_string, shapes are joined by hand, dtypes through c10::toString and devices
// through Device::str (docs/backends/cuda_ext_notes.md, v24).  Used by cuda_ext's bindings.cpp and cpp_cpu's ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <type_traits>

namespace bitlab_check {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_arithmetic<T>::value, int> = 0>
inline void append(std::string& s, T v) { s += std::to_string(v); }
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, at::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += "]";
}
template <typename... A>
std::string text(const A&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}
}  // namespace bitlab_check

#define BITLAB_CHECK(cond, ...) TORCH_CHECK(cond, ::bitlab_check::text(__VA_ARGS__))
