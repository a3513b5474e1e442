/* dms_kernels C ABI: raw pointers, explicit sizes, a cudaStream_t, status codes.
 * No C++ exceptions cross this boundary; every entry point returns a dmsStatus_t and
 * dms_last_error() describes the most recent failure of the calling thread. */
#ifndef DMS_DMS_H_
#define DMS_DMS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st* dmsStream_t; /* the same type as cudaStream_t */

typedef enum {
  DMS_SUCCESS = 0,
  DMS_ERROR_INVALID_ARGUMENT = 1,
  DMS_ERROR_NO_DEVICE = 2,
  DMS_ERROR_CUDA = 3,
} dmsStatus_t;

/* Human-readable name of a status code. */
const char* dms_status_string(dmsStatus_t status);

/* Message of the last failing call on this thread ("" if none). */
const char* dms_last_error(void);

/* Number of usable CUDA devices; DMS_ERROR_NO_DEVICE (count 0) when there is no driver or device. */
dmsStatus_t dms_device_count(int* count);

/* Shift-by-one eviction decisions (semantics section 2):
 *   decisions[r * T + j] = logits[r * T + j + 1] > 0  for j < T - 1,   decisions[r * T + T - 1] = 0.
 * logits: float32 [rows, T] row-major on the device; decisions: uint8 [rows, T] on the device. */
dmsStatus_t dms_eviction_decisions(const float* logits, uint8_t* decisions, int64_t rows, int64_t T,
                                   dmsStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* DMS_DMS_H_ */
