// Registers the fused spectral ops with the PyTorch dispatcher: schemas in TORCH_LIBRARY, CUDA
// kernels in TORCH_LIBRARY_IMPL. The math lives in kernels/ (torch-free); this file checks the
// inputs, allocates output, scratch and the cuFFT work areas through torch's caching allocator,
// and runs the kernels on the current stream. fc_edge/ops.py registers the fake (meta) kernels
// and dispatches.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstddef>
#include <cstdint>

#include "kernels/spectral.h"

// `import fc_edge._C` loads this library, and with it the TORCH_LIBRARY registrations below; the
// module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fc_edge fused CUDA ops", -1,
                               nullptr};
  return PyModule_Create(&module);
}

namespace fc_edge {
namespace {

InputDType input_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return InputDType::Float32;
    case at::kHalf: return InputDType::Float16;
    case at::kBFloat16: return InputDType::BFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "fc_edge::spectral_compress: x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  return InputDType::Float32;  // not reached
}

void check_block_geometry(const char* op, int64_t S, int64_t D, int64_t k_s, int64_t k_d) {
  TORCH_CHECK(S >= 1, op, ": S must be >= 1, got ", S);
  TORCH_CHECK(D >= 2, op, ": D must be >= 2 on the CUDA path, got ", D);
  TORCH_CHECK(k_s >= 1 && k_s <= S / 2 + 1, op, ": k_s must be in 1..", S / 2 + 1, " for S = ", S,
              ", got ", k_s);
  TORCH_CHECK(k_d >= 1 && k_d <= D / 2 + 1, op, ": k_d must be in 1..", D / 2 + 1, " for D = ", D,
              ", got ", k_d);
}

// Contiguous and aligned for cuFFT and the float2 loads; a copy only for odd views.
at::Tensor aligned_contiguous(const at::Tensor& t, std::uintptr_t alignment) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<std::uintptr_t>(c.data_ptr()) % alignment != 0) c = c.clone();
  return c;
}

// The op's scratch buffers and the cuFFT work areas, from torch's caching allocator on the
// current stream (the stream every kernel and cuFFT execution of the call runs on). Freed when
// the op returns, with its work only enqueued: the allocator reuses a block only for later work
// on the same stream (stream order), so no record_stream is needed. During CUDA-graph capture it
// comes from the graph's private pool and lives as long as the graph. cuFFT never allocates a
// work area of its own (plans are made with cufftSetAutoAllocation(0)).
at::Tensor workspace_for(std::size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

at::Tensor spectral_compress_cuda(const at::Tensor& x, int64_t k_s, int64_t k_d) {
  const char* op = "fc_edge::spectral_compress";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, S, D), got shape ", x.sizes());
  const InputDType dtype = input_dtype(x);
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2);
  check_block_geometry(op, S, D, k_s, k_d);
  const Geometry g{B, S, D, k_s, k_d};

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({B, g.rows(), k_d, 2}, x.options().dtype(at::kFloat));
  if (B == 0) return out;
  const at::Tensor xc = aligned_contiguous(x, 16);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // Exclusive use of the cached plans until the end of this call (another thread with the same
  // shape waits here); throws during CUDA-graph capture when no plan is cached.
  PlanLease plans = lease_compress_plans(g, dtype, stream);
  at::Tensor workspace = workspace_for(spectral_compress_workspace_bytes(g, dtype, plans), x);
  spectral_compress(xc.data_ptr(), dtype, g, out.data_ptr<float>(), workspace.data_ptr(), plans,
                    stream);
  return out;  // frees the workspace and ends the lease, every kernel enqueued: see workspace_for
}

at::Tensor spectral_decompress_cuda(const at::Tensor& block, int64_t S, int64_t D, int64_t k_s) {
  const char* op = "fc_edge::spectral_decompress";
  TORCH_CHECK(block.is_cuda(), op, ": block must be a CUDA tensor, got ", block.device());
  TORCH_CHECK(block.scalar_type() == at::kFloat, op, ": block must be float32, got ",
              block.scalar_type());
  TORCH_CHECK(block.dim() == 4 && block.size(3) == 2, op,
              ": block must be (B, R, k_d, 2), got shape ", block.sizes());
  const int64_t B = block.size(0), R = block.size(1), k_d = block.size(2);
  check_block_geometry(op, S, D, k_s, k_d);
  const Geometry g{B, S, D, k_s, k_d};
  TORCH_CHECK(R == g.rows(), op, ": block has ", R, " rows, but S = ", S, " and k_s = ", k_s,
              " keep ", g.rows());

  const c10::cuda::CUDAGuard guard(block.device());
  at::Tensor out = at::empty({B, S, D}, block.options());
  if (B == 0) return out;
  const at::Tensor bc = aligned_contiguous(block, 8);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  PlanLease plans = lease_decompress_plans(g, stream);
  at::Tensor workspace = workspace_for(spectral_decompress_workspace_bytes(g, plans), block);
  spectral_decompress(bc.data_ptr<float>(), g, out.data_ptr<float>(), workspace.data_ptr(), plans,
                      stream);
  return out;
}

// Diagnostics and the cache knob for tests, benchmarks and servers (no tensors, so one kernel for
// every backend). Evicted plans are destroyed at once unless the current stream is capturing a
// CUDA graph (then by a later call outside capture).
int64_t plan_cache_size_op() { return static_cast<int64_t>(plan_cache_size()); }
int64_t plan_cache_pinned_op() { return static_cast<int64_t>(plan_cache_pinned()); }
void set_plan_cache_capacity_op(int64_t capacity) {
  TORCH_CHECK(capacity >= 0, "fc_edge: plan cache capacity must be >= 0, got ", capacity);
  set_plan_cache_capacity(static_cast<std::size_t>(capacity),
                          c10::cuda::getCurrentCUDAStream().stream());
}
void clear_plan_cache_op() { clear_plan_cache(c10::cuda::getCurrentCUDAStream().stream()); }

}  // namespace

TORCH_LIBRARY(fc_edge, m) {
  m.def("spectral_compress(Tensor x, int k_s, int k_d) -> Tensor");
  m.def("spectral_decompress(Tensor block, int S, int D, int k_s) -> Tensor");
  m.def("plan_cache_size() -> int", &plan_cache_size_op);
  m.def("plan_cache_pinned() -> int", &plan_cache_pinned_op);
  m.def("set_plan_cache_capacity(int capacity) -> ()", &set_plan_cache_capacity_op);
  m.def("clear_plan_cache() -> ()", &clear_plan_cache_op);
}

TORCH_LIBRARY_IMPL(fc_edge, CUDA, m) {
  m.impl("spectral_compress", &spectral_compress_cuda);
  m.impl("spectral_decompress", &spectral_decompress_cuda);
}

}  // namespace fc_edge
