// Status checks for the CUDA runtime and cuFFT: every call goes through one of these macros, which
// throws std::runtime_error naming the call, the file:line and the status, so a failure inside
// a torch op surfaces in Python as a RuntimeError that says which step broke and why.
#pragma once

#include <cuda_runtime_api.h>
#include <cufft.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace fc_edge {
namespace detail {

// By number, so the table compiles against every cuFFT (codes come and go between releases).
inline const char* cufft_status_name(cufftResult status) {
  switch (static_cast<int>(status)) {
    case 0x0: return "CUFFT_SUCCESS";
    case 0x1: return "CUFFT_INVALID_PLAN";
    case 0x2: return "CUFFT_ALLOC_FAILED";
    case 0x3: return "CUFFT_INVALID_TYPE";
    case 0x4: return "CUFFT_INVALID_VALUE";
    case 0x5: return "CUFFT_INTERNAL_ERROR";
    case 0x6: return "CUFFT_EXEC_FAILED";
    case 0x7: return "CUFFT_SETUP_FAILED";
    case 0x8: return "CUFFT_INVALID_SIZE";
    case 0x9: return "CUFFT_UNALIGNED_DATA";
    case 0xA: return "CUFFT_INCOMPLETE_PARAMETER_LIST";
    case 0xB: return "CUFFT_INVALID_DEVICE";
    case 0xC: return "CUFFT_PARSE_ERROR";
    case 0xD: return "CUFFT_NO_WORKSPACE";
    case 0xE: return "CUFFT_NOT_IMPLEMENTED";
    case 0xF: return "CUFFT_LICENSE_ERROR";
    case 0x10: return "CUFFT_NOT_SUPPORTED";
    case 0x11: return "CUFFT_MISSING_DEPENDENCY";
    case 0x12: return "CUFFT_NVRTC_FAILURE";
    case 0x13: return "CUFFT_NVJITLINK_FAILURE";
    case 0x14: return "CUFFT_NVSHMEM_FAILURE";
    default: return "CUFFT_UNKNOWN_STATUS";
  }
}

[[noreturn]] inline void throw_status(const char* api, const char* expr, const char* file, int line,
                                      const char* name, int code, const char* detail) {
  std::ostringstream msg;
  msg << "fc_edge: " << api << " call `" << expr << "` failed at " << file << ":" << line
      << " with " << name << " (" << code << ")";
  if (detail != nullptr && detail[0] != '\0') msg << ": " << detail;
  throw std::runtime_error(msg.str());
}

}  // namespace detail
}  // namespace fc_edge

#define FC_CUDA_CHECK(expr)                                                                     \
  do {                                                                                          \
    const cudaError_t fc_status_ = (expr);                                                      \
    if (fc_status_ != cudaSuccess) {                                                            \
      ::fc_edge::detail::throw_status("CUDA", #expr, __FILE__, __LINE__,                        \
                                      cudaGetErrorName(fc_status_),                             \
                                      static_cast<int>(fc_status_),                             \
                                      cudaGetErrorString(fc_status_));                          \
    }                                                                                           \
  } while (0)

#define FC_CUFFT_CHECK(expr)                                                                    \
  do {                                                                                          \
    const cufftResult fc_status_ = (expr);                                                      \
    if (fc_status_ != CUFFT_SUCCESS) {                                                          \
      ::fc_edge::detail::throw_status("cuFFT", #expr, __FILE__, __LINE__,                       \
                                      ::fc_edge::detail::cufft_status_name(fc_status_),         \
                                      static_cast<int>(fc_status_), "");                        \
    }                                                                                           \
  } while (0)

// After a kernel launch: catches bad launch configurations at once (asynchronous faults surface
// at the next synchronising call, as with any CUDA op).
#define FC_CUDA_CHECK_LAUNCH() FC_CUDA_CHECK(cudaGetLastError())
