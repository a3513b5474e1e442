/* The paged DMS cache layout and the decode work partition, written once for host and device.
 *
 * One pool of pages holds every (layer, sequence, KV head) list. Token o of page p is
 * pool[p * stride_page + o * stride_token + d]. A list holds, in the kernels' logical order:
 *   - n_ring = min(start, w) ring tokens: logical token i (i < n_ring) is ring slot i, in page
 *     table[i / page_size], offset i % page_size (slot r holds position p with p % w == r);
 *   - kept tokens: logical token n_ring + j is kept token j, in page table[ring_pages + j / page_size],
 *     offset j % page_size.
 * In decode every held token is visible to the new query, so the logical order is all a kernel
 * needs. The decode grid is (lists, splits): split s reads logical tokens [s * split_tokens,
 * (s + 1) * split_tokens) and the last split also reads everything past the end of the plan's
 * bound, so a list longer than the planned maximum is still read whole (just by fewer CTAs).
 *
 * Plain C++ when included without nvcc (the Python module and tests use the same functions). */
#ifndef DMS_PAGED_LAYOUT_H_
#define DMS_PAGED_LAYOUT_H_

#include <stdint.h>

#if defined(__CUDACC__)
#define DMS_HD __host__ __device__ __forceinline__
#else
#define DMS_HD inline
#endif

namespace dms {

/* Tokens held by a list: the ring (the last min(start, w) positions) plus the kept store. */
DMS_HD int64_t list_tokens(int64_t start, int64_t window, int64_t kept) {
  const int64_t ring = start < 0 ? 0 : (start < window ? start : window);
  return ring + (kept < 0 ? 0 : kept);
}

/* Logical tokens [*begin, *end) of a list of n tokens read by split s of num_splits. */
DMS_HD void split_range(int64_t n, int64_t split_tokens, int32_t num_splits, int32_t s, int64_t* begin,
                        int64_t* end) {
  int64_t b = (int64_t)s * split_tokens;
  int64_t e = (s == num_splits - 1) ? n : b + split_tokens;
  if (e > n) e = n;
  if (b > e) b = e;
  *begin = b;
  *end = e;
}

/* Splits of a list of n tokens that hold at least one token (the merge reads only those). */
DMS_HD int32_t splits_with_tokens(int64_t n, int64_t split_tokens, int32_t num_splits) {
  if (n <= 0) return 0;
  const int64_t k = (n + split_tokens - 1) / split_tokens;
  return k < num_splits ? (int32_t)k : num_splits;
}

/* Page-table column and in-page offset of logical token idx of a list with n_ring ring tokens.
 * Int is int32_t in the kernels (cheaper division; a list holds < 2^31 tokens), int64_t on the host. */
template <typename Int>
DMS_HD void token_slot(Int idx, Int n_ring, Int ring_pages, Int page_size, Int* col, Int* off) {
  if (idx < n_ring) {
    *col = idx / page_size;
    *off = idx - *col * page_size;
  } else {
    const Int j = idx - n_ring;
    const Int c = j / page_size;
    *col = ring_pages + c;
    *off = j - c * page_size;
  }
}

}  // namespace dms

#endif /* DMS_PAGED_LAYOUT_H_ */
