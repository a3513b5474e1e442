/* dms_kernels C ABI: raw pointers, explicit sizes, a cudaStream_t, status codes.
 * No C++ exceptions cross this boundary; every entry point returns a dmsStatus_t and
 * dms_last_error() describes the most recent failure of the calling thread ("file:line: argument:
 * what was expected, what was given").
 *
 * Every argument is checked on the host before the device is touched: an invalid call returns
 * DMS_ERROR_INVALID_ARGUMENT whether or not a GPU exists. Kernels are enqueued on `stream` and
 * never synchronise; DMS_ERROR_CUDA reports launch errors only (asynchronous faults surface at
 * the caller's next synchronisation). The kernels are built for sm_90a (Hopper). A pipeline wait
 * that does not complete within DMS_MBAR_TIMEOUT_NS (default 4 s; dms/device_utils.cuh) traps,
 * so a fault shows as cudaErrorLaunchFailure at that synchronisation rather than a hung GPU. */
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

/* ------------------------------------------------------------------ paged DMS cache
 *
 * Layout (docs/ARCHITECTURE.md, "Cache layout: the paged runtime"; dms/paged_layout.h).
 * One pool of pages per K and V: token o of page p, element d, is
 *   pool[p * pool_stride_page + o * pool_stride_token + d]          (element strides)
 * A list is one (layer, sequence, KV head); its row of the page table holds R = ring_pages
 * ring pages, then kept-store pages. After `start` positions were processed, ring slot r
 * (r < min(start, w)) is in page table[r / PS] at offset r % PS, kept token j in page
 * table[R + j / PS] at offset j % PS. Page ids are int64; every page a list holds must be a
 * valid page of the pool (the kernels do not check ids). */

typedef enum {
  DMS_DTYPE_FLOAT16 = 0,
  DMS_DTYPE_BFLOAT16 = 1,
  DMS_DTYPE_FLOAT32 = 2,
} dmsDataType_t;

/* Bytes of one element of `dtype` (0 for an unknown value). */
int dms_dtype_size(dmsDataType_t dtype);

/* Launch plan of the decode kernels for one step (made on the host, no device needed; make it
 * once per step, reuse it for every layer). Split s of a list reads its logical tokens
 * [s * split_tokens, (s + 1) * split_tokens); the last split also reads everything past the
 * end, so a list longer than max_tokens is still read whole (by fewer CTAs). */
typedef struct {
  int64_t num_lists;       /* B * Hkv */
  int32_t group_size;      /* G = Hq / Hkv */
  int32_t head_dim;        /* D */
  dmsDataType_t dtype;
  int32_t num_splits;      /* CTAs per list (grid y of the split kernel), 1..65535 */
  int64_t max_tokens;      /* the longest list the plan was made for (ring + kept tokens) */
  int64_t split_tokens;    /* tokens per split, a multiple of tile_tokens */
  int32_t tile_tokens;     /* tokens per pipeline stage */
  int32_t stages;          /* pipeline depth (bulk copies in flight per CTA) */
  int32_t threads;         /* per CTA: consumer warps + one producer warp */
  int32_t smem_bytes;      /* dynamic shared memory per CTA */
  int64_t workspace_bytes; /* device scratch dms_paged_decode needs (16-byte aligned) */
} dmsDecodePlan;

/* Plans a decode step: about two CTAs per multiprocessor even at batch 1, every list doing work
 * proportional to what it holds.
 *   num_lists   B * Hkv (>= 0)        group_size  1..16        head_dim  64 or 128
 *   dtype       DMS_DTYPE_FLOAT16 or DMS_DTYPE_BFLOAT16
 *   max_tokens  the most tokens any list holds (>= 0; a larger list is still read correctly)
 *   num_sms     multiprocessors of the target GPU (132 on H100 / H200 SXM) */
dmsStatus_t dms_decode_plan(int64_t num_lists, int32_t group_size, int32_t head_dim, dmsDataType_t dtype,
                            int64_t max_tokens, int32_t num_sms, dmsDecodePlan* plan);

/* The logical tokens [*begin, *end) that split `split` of `plan` reads of a list holding
 * `list_tokens` tokens (the same function the kernels run; begin == end: nothing). */
dmsStatus_t dms_decode_split_range(const dmsDecodePlan* plan, int64_t list_tokens, int32_t split, int64_t* begin,
                                   int64_t* end);

/* Arguments of dms_paged_decode. Strides are in elements; every data pointer and every stride
 * times the element size must be a multiple of 16 bytes (bulk copies and vector loads). */
typedef struct {
  dmsDataType_t dtype;      /* of q, k_new, v_new, the pools and out: FLOAT16 or BFLOAT16 */
  int64_t batch;            /* B sequences, one new token each */
  int32_t num_kv_heads;     /* Hkv */
  int32_t group_size;       /* G: query head hq reads KV head hq / G; Hq = Hkv * G */
  int32_t head_dim;         /* D: 64 or 128 */
  int32_t page_size;        /* PS >= 1 */
  int32_t window;           /* w >= 1: ring slots */
  int32_t ring_pages;       /* R >= ceil(w / PS): page-table columns of the ring */
  int64_t table_width;      /* columns of `table` (>= R) */
  float scale;              /* softmax scale, usually 1 / sqrt(D) */
  const void* q;            /* [B, Hq, D]: q[b * q_stride_b + hq * q_stride_h + d] */
  int64_t q_stride_b, q_stride_h;
  const void* k_new;        /* [B, Hkv, D]: the new token's key, always visible to its own query; */
  const void* v_new;        /*   NULL (both) to attend over the cache only */
  int64_t new_stride_b, new_stride_h; /* of both k_new and v_new (one layout for the two) */
  const void* k_pool;       /* [P, PS, D] */
  const void* v_pool;
  int64_t pool_stride_page, pool_stride_token;
  const int64_t* table;     /* [B * Hkv, table_width] page ids; list (b, h) is row b * Hkv + h */
  int64_t table_stride;     /* elements between rows (>= table_width) */
  const int64_t* seq_start; /* [B] positions processed per sequence: the ring holds min(start, w) */
  const int64_t* kept_len;  /* [B * Hkv] tokens in each list's kept store, <= (table_width - R) * PS;
                             * device values: like page ids, they are the caller's to keep in range */
  void* out;                /* [B, Hq, D]: out[b * out_stride_b + hq * out_stride_h + d] */
  int64_t out_stride_b, out_stride_h;
  void* workspace;          /* >= plan->workspace_bytes of device memory */
  int64_t workspace_bytes;
} dmsPagedDecodeArgs;

/* Decode attention of one new query per sequence over the tokens its KV head holds (all of them
 * are visible in decode: the ring holds only positions within the window) plus its own new key:
 * out = softmax(scale * q K^T) V per query head, fp32 accumulation, log-sum-exp merge of the
 * splits. A query with no token at all (empty list, no k_new) gets zeros. `plan` must come from
 * dms_decode_plan with this step's num_lists, group_size, head_dim and dtype. */
dmsStatus_t dms_paged_decode(const dmsPagedDecodeArgs* args, const dmsDecodePlan* plan, dmsStream_t stream);

/* Arguments of dms_paged_store (the data movement of a store step; pages already allocated).
 * Strides are in elements; pointers and strides times the element size: multiples of 16 bytes. */
typedef struct {
  dmsDataType_t dtype;       /* of k_new, v_new and the pools (any of the three) */
  int64_t batch;             /* B sequences */
  int32_t num_kv_heads;      /* Hkv */
  int32_t head_dim;          /* D: D * element size a multiple of 16 bytes */
  int32_t page_size;         /* PS >= 1 */
  int32_t window;            /* w >= 1 */
  int32_t ring_pages;        /* R >= ceil(w / PS) */
  int64_t table_width;       /* columns of page_table (>= R) */
  int64_t num_new;           /* T: chunk length; n_new[b] <= T */
  const void* k_new;         /* [B, Hkv, T, D]: new[b * new_stride_b + h * new_stride_h + a * new_stride_t + d] */
  const void* v_new;
  int64_t new_stride_b, new_stride_h, new_stride_t; /* of both k_new and v_new (one layout for the two) */
  const uint8_t* new_evict;  /* [B, Hkv, T] decisions of the new keys (0 keep, else evict) */
  int64_t evict_stride_b, evict_stride_h;
  void* k_pool;              /* [P, PS, D], updated */
  void* v_pool;
  int64_t pool_stride_page, pool_stride_token;
  const int64_t* page_table; /* [NL, table_width]: the cache's whole table (lists are addressed by id) */
  int64_t table_stride;
  uint8_t* ring_evict;       /* [NL, w] decision of each ring slot, updated */
  int64_t ring_evict_stride;
  const int64_t* lists;      /* [B * Hkv] list id of (b, h) */
  const int64_t* kept0;      /* [B * Hkv] kept tokens of each list before this step */
  const int64_t* seq_start;  /* [B] first new position */
  const int64_t* n_new;      /* [B] new positions (<= T) */
} dmsPagedStoreArgs;

/* Store step of positions [start, start + n_new) of each list: tokens leaving the window (older
 * than start + n_new - w) are appended to the kept store in position order if kept, dropped if
 * evicted; then the last min(n_new, w) new tokens take ring slots (position % w) with their
 * decisions. The caller updates kept_len (kept0 + tokens appended). */
dmsStatus_t dms_paged_store(const dmsPagedStoreArgs* args, dmsStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* DMS_DMS_H_ */
