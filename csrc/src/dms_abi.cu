// C ABI of dms_kernels: argument checks, launches, status codes.
#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "dms/dms.h"
#include "status.h"

namespace dms {
namespace detail {

namespace {
thread_local std::string g_last_error;
}  // namespace

dmsStatus_t fail(dmsStatus_t status, const char* file, int line, const std::string& msg) {
  g_last_error = std::string(file) + ":" + std::to_string(line) + ": " + msg;
  return status;
}

const char* last_error() { return g_last_error.c_str(); }

dmsStatus_t check_device() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky-free error state
    return DMS_FAIL(DMS_ERROR_NO_DEVICE, std::string("no CUDA device: ") +
                                             (err == cudaSuccess ? "0 devices" : cudaGetErrorString(err)));
  }
  // An error left by earlier work on this thread would otherwise be reported as this call's launch
  // failure: report it as what it is (and clear it) before launching anything.
  err = cudaGetLastError();
  if (err != cudaSuccess)
    return DMS_FAIL(DMS_ERROR_CUDA, std::string("a CUDA error was pending before this call (from earlier work on "
                                                "this thread; nothing was launched): ") + cudaGetErrorString(err));
  return DMS_SUCCESS;
}

}  // namespace detail
}  // namespace dms

namespace {

using dms::detail::check_device;

__global__ void eviction_decisions_kernel(const float* __restrict__ logits, uint8_t* __restrict__ decisions,
                                          int64_t rows, int64_t T) {
  const int64_t n = rows * T;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = idx % T;
    decisions[idx] = (j + 1 < T) ? (logits[idx + 1] > 0.0f) : 0;
  }
}

}  // namespace

extern "C" {

const char* dms_status_string(dmsStatus_t status) {
  switch (status) {
    case DMS_SUCCESS: return "DMS_SUCCESS";
    case DMS_ERROR_INVALID_ARGUMENT: return "DMS_ERROR_INVALID_ARGUMENT";
    case DMS_ERROR_NO_DEVICE: return "DMS_ERROR_NO_DEVICE";
    case DMS_ERROR_CUDA: return "DMS_ERROR_CUDA";
  }
  return "DMS_UNKNOWN_STATUS";
}

const char* dms_last_error(void) { return dms::detail::last_error(); }

dmsStatus_t dms_device_count(int* count) {
  if (count == nullptr) return DMS_FAIL(DMS_ERROR_INVALID_ARGUMENT, "count: must not be NULL");
  *count = 0;
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return DMS_FAIL(DMS_ERROR_NO_DEVICE, std::string("no CUDA device: ") + cudaGetErrorString(err));
  }
  *count = n;
  return n > 0 ? DMS_SUCCESS : DMS_FAIL(DMS_ERROR_NO_DEVICE, "no CUDA device: 0 devices");
}

dmsStatus_t dms_eviction_decisions(const float* logits, uint8_t* decisions, int64_t rows, int64_t T,
                                   dmsStream_t stream) {
  if (rows < 0) return DMS_FAIL(DMS_ERROR_INVALID_ARGUMENT, "rows: expected >= 0, got " + std::to_string(rows));
  if (T < 0) return DMS_FAIL(DMS_ERROR_INVALID_ARGUMENT, "T: expected >= 0, got " + std::to_string(T));
  if (rows * T == 0) return DMS_SUCCESS;
  if (logits == nullptr) return DMS_FAIL(DMS_ERROR_INVALID_ARGUMENT, "logits: must not be NULL");
  if (decisions == nullptr) return DMS_FAIL(DMS_ERROR_INVALID_ARGUMENT, "decisions: must not be NULL");
  dmsStatus_t st = check_device();
  if (st != DMS_SUCCESS) return st;
  const int threads = 256;
  const int64_t blocks64 = (rows * T + threads - 1) / threads;
  const int blocks = (int)(blocks64 < 65535 ? blocks64 : 65535);
  eviction_decisions_kernel<<<blocks, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(logits, decisions,
                                                                                           rows, T);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return DMS_FAIL(DMS_ERROR_CUDA, std::string("launch failed: ") + cudaGetErrorString(err));
  return DMS_SUCCESS;
}

}  // extern "C"
