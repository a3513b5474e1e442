// Store step of the paged DMS cache (after attention), header-only, on raw pointers.
//
// One CTA per list (sequence b, KV head h) processing positions [s, s + n) with a ring of w slots:
//   1. ring tokens that leave the window (positions max(0, s - w) .. min(s, s + n - w) - 1, oldest
//      first) are appended to the kept store if their ring decision is keep, dropped otherwise;
//   2. new tokens that leave the window (chunk indices 0 .. min(n, s + n - w - s) - 1) likewise;
//   3. after a barrier (the ring slots they replace have been read), the last min(n, w) new
//      tokens go to ring slots (s + a) % w with their decisions.
// Kept index k of the list is page table[R + k / PS], offset k % PS; ring slot r is page
// table[r / PS], offset r % PS. Pages are allocated beforehand; the kernel only moves rows
// (16-byte loads and stores) and decisions. Tokens move in chunks of 32: lane t of every warp
// reads token t's decision, a warp ballot gives each kept token its rank, and all threads share
// the 16-byte pieces of the chunk's rows.
#ifndef DMS_PAGED_STORE_CUH_
#define DMS_PAGED_STORE_CUH_

#include <stdint.h>

namespace dms {

constexpr int kStoreThreads = 128;

struct StoreParams {
  const char* k_new;  // [B, Hkv, T, D] (bytes)
  const char* v_new;
  int64_t new_stride_b, new_stride_h, new_stride_t;  // bytes
  const uint8_t* new_evict;                          // [B, Hkv, T]
  int64_t evict_stride_b, evict_stride_h;
  char* k_pool;  // [P, PS, D] (bytes)
  char* v_pool;
  int64_t pool_stride_page, pool_stride_token;  // bytes
  const int64_t* page_table;                    // [NL, TW]
  int64_t table_stride;
  uint8_t* ring_evict;  // [NL, w]
  int64_t ring_stride;
  const int64_t* lists;      // [B * Hkv]
  const int64_t* kept0;      // [B * Hkv]
  const int64_t* seq_start;  // [B]
  const int64_t* n_new;      // [B]
  int32_t num_kv_heads, page_size, window, ring_pages;
  int32_t row_vecs;  // 16-byte pieces per row: D * element size / 16
};

namespace dev {

__device__ __forceinline__ void copy16(char* dst, const char* src) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}

}  // namespace dev

__global__ void __launch_bounds__(kStoreThreads) paged_store_kernel(const StoreParams p) {
  const int64_t pid = blockIdx.x;
  const int64_t b = pid / p.num_kv_heads;
  const int64_t h = pid - b * p.num_kv_heads;
  const int64_t lst = p.lists[pid];
  const int64_t s = p.seq_start[b];
  const int64_t n = p.n_new[b];
  const int64_t W = p.window, PS = p.page_size, R = p.ring_pages;
  const int64_t cut = s + n - W;  // positions below leave the window
  int64_t dest = p.kept0[pid];    // next kept index
  const int64_t* trow = p.page_table + lst * p.table_stride;
  uint8_t* rev = p.ring_evict + lst * p.ring_stride;
  const uint8_t* nev = p.new_evict + b * p.evict_stride_b + h * p.evict_stride_h;
  const char* kn = p.k_new + b * p.new_stride_b + h * p.new_stride_h;
  const char* vn = p.v_new + b * p.new_stride_b + h * p.new_stride_h;
  const int lane = threadIdx.x & 31;
  const int units = 32 * p.row_vecs;

  auto kept_slot = [&](int64_t k) { return trow[R + k / PS] * p.pool_stride_page + (k % PS) * p.pool_stride_token; };

  // 1. leaving ring tokens, oldest first
  const int64_t ring_hi = s < cut ? s : cut;
  for (int64_t p0 = s - W > 0 ? s - W : 0; p0 < ring_hi; p0 += 32) {
    const int64_t pos = p0 + lane;
    const bool keep = pos < ring_hi && rev[pos % W] == 0;
    const uint32_t mask = __ballot_sync(0xffffffffu, keep);
    for (int u = threadIdx.x; u < units; u += kStoreThreads) {
      const int t = u / p.row_vecs;
      if (!((mask >> t) & 1u)) continue;
      const int64_t off = (int64_t)(u - t * p.row_vecs) * 16;
      const int64_t slot = (p0 + t) % W;
      const int64_t src = trow[slot / PS] * p.pool_stride_page + (slot % PS) * p.pool_stride_token + off;
      const int64_t dst = kept_slot(dest + __popc(mask & ((1u << t) - 1u))) + off;
      dev::copy16(p.k_pool + dst, p.k_pool + src);
      dev::copy16(p.v_pool + dst, p.v_pool + src);
    }
    dest += __popc(mask);
  }

  // 2. leaving new tokens, in chunk order
  const int64_t new_hi = n < cut - s ? n : cut - s;
  for (int64_t a0 = 0; a0 < new_hi; a0 += 32) {
    const int64_t a = a0 + lane;
    const bool keep = a < new_hi && nev[a] == 0;
    const uint32_t mask = __ballot_sync(0xffffffffu, keep);
    for (int u = threadIdx.x; u < units; u += kStoreThreads) {
      const int t = u / p.row_vecs;
      if (!((mask >> t) & 1u)) continue;
      const int64_t off = (int64_t)(u - t * p.row_vecs) * 16;
      const int64_t src = (a0 + t) * p.new_stride_t + off;
      const int64_t dst = kept_slot(dest + __popc(mask & ((1u << t) - 1u))) + off;
      dev::copy16(p.k_pool + dst, kn + src);
      dev::copy16(p.v_pool + dst, vn + src);
    }
    dest += __popc(mask);
  }

  // 3. the new tokens still inside the window take their ring slots (after every thread has read
  //    the ring tokens they replace)
  __syncthreads();
  for (int64_t a0 = n - W > 0 ? n - W : 0; a0 < n; a0 += 32) {
    for (int u = threadIdx.x; u < units; u += kStoreThreads) {
      const int t = u / p.row_vecs;
      const int64_t a = a0 + t;
      if (a >= n) continue;
      const int64_t off = (int64_t)(u - t * p.row_vecs) * 16;
      const int64_t slot = (s + a) % W;
      const int64_t dst = trow[slot / PS] * p.pool_stride_page + (slot % PS) * p.pool_stride_token + off;
      dev::copy16(p.k_pool + dst, kn + a * p.new_stride_t + off);
      dev::copy16(p.v_pool + dst, vn + a * p.new_stride_t + off);
    }
    if (threadIdx.x < 32 && a0 + lane < n) rev[(s + a0 + lane) % W] = nev[a0 + lane] != 0;
  }
}

}  // namespace dms

#endif  // DMS_PAGED_STORE_CUH_
