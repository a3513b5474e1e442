// Paged split-K decode attention for sm_90a, header-only, on raw pointers.
//
// One new query per sequence attends over the tokens its KV head holds in the paged cache (the
// layout of dms/paged_layout.h) plus, optionally, its own new key. Two kernels:
//
//   paged_decode_split_kernel  grid (lists, splits), (kDecodeConsumers + 1) warps.
//     CTA (l, s) reads logical tokens split_range(l, s) of list l in tiles of kDecodeTile tokens.
//     A producer warp copies each token's K and V row from its page into shared memory with
//     bulk async copies (cp.async.bulk, one per row, completing on the stage's mbarrier) into a
//     ring of stages; rows are padded by 16 bytes so ldmatrix reads are free of bank conflicts.
//     Each consumer warp owns 16 tokens of every tile and the G query heads of the GQA group
//     (rows padded to 16): S = Q K^T and O += P V on mma.sync m16n8k16 with fp32 accumulation,
//     an online softmax in base 2, then the consumers merge their (max, sum, acc) in shared
//     memory and write one partial per (list, split, head) to the workspace.
//   paged_decode_merge_kernel  one warp per (sequence, query head): log-sum-exp merge of the
//     splits that hold tokens and of the new token; a split without tokens weighs 0, and a row
//     with no token at all (empty list, no new key) is written as zeros, never NaN.
//
// Workspace: acc float32 [lists, splits, G, D], then m and l float32 [lists, splits, G], each
// region starting on a 256-byte boundary (decode_workspace_layout). m is in base-2 units
// (scores times scale * log2(e)).
#ifndef DMS_PAGED_DECODE_CUH_
#define DMS_PAGED_DECODE_CUH_

#include <math_constants.h>
#include <stdint.h>

#include "dms/device_utils.cuh"
#include "dms/paged_layout.h"

namespace dms {

// ---------------------------------------------------------------- shape of the decode kernels

constexpr int kDecodeConsumers = 4;                  // consumer warps per CTA
constexpr int kDecodeTile = 16 * kDecodeConsumers;   // tokens per pipeline stage
constexpr int kDecodeThreads = (kDecodeConsumers + 1) * 32;
constexpr int kDecodeMaxGroup = 16;                  // query heads per KV head (one m16 tile)
constexpr int kMergeWarps = 4;

DMS_HD constexpr int decode_stages(int head_dim) { return head_dim <= 64 ? 4 : 3; }

// Dynamic shared memory of the split kernel: stages x (K tile + V tile) of padded rows.
DMS_HD constexpr int decode_smem_bytes(int head_dim, int elem_bytes) {
  return decode_stages(head_dim) * 2 * kDecodeTile * (head_dim * elem_bytes + 16);
}

struct DecodeWorkspaceLayout {
  int64_t acc_offset, m_offset, l_offset, bytes;
};

DMS_HD constexpr int64_t align256(int64_t x) { return (x + 255) / 256 * 256; }

DMS_HD DecodeWorkspaceLayout decode_workspace_layout(int64_t lists, int64_t splits, int64_t group, int64_t head_dim) {
  const int64_t rows = lists * splits * group;
  DecodeWorkspaceLayout w;
  w.acc_offset = 0;
  w.m_offset = align256(rows * head_dim * 4);
  w.l_offset = w.m_offset + align256(rows * 4);
  w.bytes = w.l_offset + align256(rows * 4);
  return w;
}

// Everything both kernels read; element strides, not bytes.
struct DecodeParams {
  const void* q;  // [B, Hq, D]
  int64_t q_stride_b, q_stride_h;
  const void* k_new;  // [B, Hkv, D] or nullptr
  const void* v_new;
  int64_t new_stride_b, new_stride_h;
  const void* k_pool;  // [P, PS, D]
  const void* v_pool;
  int64_t pool_stride_page, pool_stride_token;
  const int64_t* table;  // [B * Hkv, TW]
  int64_t table_stride;
  const int64_t* seq_start;  // [B]
  const int64_t* kept_len;   // [B * Hkv]
  void* out;                 // [B, Hq, D]
  int64_t out_stride_b, out_stride_h;
  float* ws_acc;
  float* ws_m;
  float* ws_l;
  int64_t batch;
  int64_t split_tokens;
  int32_t num_kv_heads, group, page_size, window, ring_pages, num_splits;
  float scale_log2;  // softmax scale * log2(e)
};

namespace dev {

// Keeps the halves of an mma operand register whose token index (tok, tok + 1) is < nv.
__device__ __forceinline__ uint32_t keep_tokens(uint32_t v, int tok, int nv) {
  return tok + 1 < nv ? v : (tok < nv ? (v & 0xffffu) : 0u);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// V consecutive elements (V = 2 or 4, 4- or 8-byte aligned) as floats.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* src, float* out) {
  static_assert(V == 2 || V == 4, "two or four elements per lane");
  if constexpr (V == 2) {
    const float2 f = Elem<T>::unpack(*reinterpret_cast<const uint32_t*>(src));
    out[0] = f.x;
    out[1] = f.y;
  } else {
    const uint2 u = *reinterpret_cast<const uint2*>(src);
    const float2 a = Elem<T>::unpack(u.x), b = Elem<T>::unpack(u.y);
    out[0] = a.x;
    out[1] = a.y;
    out[2] = b.x;
    out[3] = b.y;
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* dst, const float* v) {
  if constexpr (V == 2) {
    *reinterpret_cast<uint32_t*>(dst) = Elem<T>::pack(v[0], v[1]);
  } else {
    *reinterpret_cast<uint2*>(dst) = make_uint2(Elem<T>::pack(v[0], v[1]), Elem<T>::pack(v[2], v[3]));
  }
}

}  // namespace dev

// ---------------------------------------------------------------- split kernel

template <typename T, int D, int STAGES>
__global__ void __launch_bounds__(kDecodeThreads) paged_decode_split_kernel(const DecodeParams p) {
  using E = dev::Elem<T>;
  constexpr int NC = kDecodeConsumers;
  constexpr int TILE = kDecodeTile;
  constexpr int ROW_DATA = D * (int)sizeof(T);  // bytes of one K or V row in the pool
  constexpr int ROW = ROW_DATA + 16;            // padded row in shared memory
  constexpr int STAGE = 2 * TILE * ROW;         // K tile then V tile
  constexpr int KSTEPS = D / 16;
  constexpr int DTILES = D / 8;
  static_assert(sizeof(T) == 2, "fp16 / bf16 operands");
  static_assert(D % 16 == 0 && DTILES % 2 == 0, "head dim: a multiple of 16");
  static_assert(ROW % 16 == 0 && (ROW / 16) % 2 == 1, "odd number of 16-byte chunks per row: conflict-free ldmatrix");
  static_assert(NC * 16 * (D + 2) * 4 <= STAGES * STAGE, "the merge area fits in the stage buffers");

  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ __align__(8) uint64_t full_bar[STAGES];
  __shared__ __align__(8) uint64_t empty_bar[STAGES];

  const int lst = blockIdx.x;
  const int sp = blockIdx.y;
  const int b = lst / p.num_kv_heads;
  const int h = lst - b * p.num_kv_heads;
  const int64_t start = p.seq_start[b];
  const int64_t n_ring = list_tokens(start, p.window, 0);
  const int64_t n = n_ring + (p.kept_len[lst] < 0 ? 0 : p.kept_len[lst]);
  int64_t begin, end;
  split_range(n, p.split_tokens, p.num_splits, sp, &begin, &end);
  if (begin >= end) return;  // the merge reads only splits that hold tokens
  const int ntiles = (int)((end - begin + TILE - 1) / TILE);

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      dev::mbar_init(&full_bar[s], 1);
      dev::mbar_init(&empty_bar[s], NC);
    }
    dev::fence_mbar_init();
  }
  __syncthreads();

  if (warp == NC) {
    // ---- producer: one bulk copy per K row and per V row, lane t copying tokens t, t + 32, ...
    const int64_t* trow = p.table + (int64_t)lst * p.table_stride;
    const char* kbase = static_cast<const char*>(p.k_pool);
    const char* vbase = static_cast<const char*>(p.v_pool);
    const int32_t nr = (int32_t)n_ring;
    for (int i = 0; i < ntiles; ++i) {
      const int st = i % STAGES;
      if (i >= STAGES) dev::mbar_wait(&empty_bar[st], ((i / STAGES) - 1) & 1);
      const int64_t t0 = begin + (int64_t)i * TILE;
      const int len = (int)(end - t0 < TILE ? end - t0 : TILE);
      if (lane == 0) dev::mbar_arrive_expect_tx(&full_bar[st], (uint32_t)(2 * len * ROW_DATA));
      __syncwarp();
      uint8_t* ks = smem + st * STAGE;
      uint8_t* vs = ks + TILE * ROW;
      for (int t = lane; t < len; t += 32) {
        int32_t col, off;
        token_slot<int32_t>((int32_t)(t0 + t), nr, p.ring_pages, p.page_size, &col, &off);
        const int64_t byte = (trow[col] * p.pool_stride_page + (int64_t)off * p.pool_stride_token) * (int64_t)sizeof(T);
        dev::bulk_copy_g2s(ks + t * ROW, kbase + byte, ROW_DATA, &full_bar[st]);
        dev::bulk_copy_g2s(vs + t * ROW, vbase + byte, ROW_DATA, &full_bar[st]);
      }
    }
    return;
  }

  // ---- consumers: warp w owns tokens [16 w, 16 w + 16) of every tile
  const int G = p.group;
  const int r0 = lane >> 2;       // this thread's rows: r0 and r0 + 8 (query heads of the group)
  const int cq = (lane & 3) * 2;  // its column pair inside an 8-wide block
  const T* qg = static_cast<const T*>(p.q) + (int64_t)b * p.q_stride_b + (int64_t)h * G * p.q_stride_h;
  auto q_pair = [&](int row, int col) -> uint32_t {
    return row < G ? *reinterpret_cast<const uint32_t*>(qg + (int64_t)row * p.q_stride_h + col) : 0u;
  };
  uint32_t qf[KSTEPS][4];  // A fragments of Q (rows = heads, k = head dim)
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    qf[kk][0] = q_pair(r0, kk * 16 + cq);
    qf[kk][1] = q_pair(r0 + 8, kk * 16 + cq);
    qf[kk][2] = q_pair(r0, kk * 16 + cq + 8);
    qf[kk][3] = q_pair(r0 + 8, kk * 16 + cq + 8);
  }

  float m[2] = {-CUDART_INF_F, -CUDART_INF_F};  // running max (base 2) of rows r0, r0 + 8
  float l[2] = {0.f, 0.f};                      // this thread's part of the running sums
  float acc[DTILES][4];
#pragma unroll
  for (int nd = 0; nd < DTILES; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.f;

  const int wbase = warp * 16;
  // ldmatrix row addresses: lane supplies row (lane & 7) of 8x8 matrix (lane >> 3)
  const int mi = lane >> 3, mr = lane & 7;
  // K (non-transposed): matrices (tokens 0-7 | 8-15) x (dims 0-7 | 8-15) -> B of S for two n-tiles
  const uint32_t k_off = (uint32_t)((wbase + (mi >> 1) * 8 + mr) * ROW + (mi & 1) * 16);
  // V (transposed): matrices (tokens 0-7 | 8-15) x (dims nd | nd + 1) -> B of O for two d-tiles
  const uint32_t v_off = (uint32_t)(TILE * ROW + (wbase + (mi & 1) * 8 + mr) * ROW + (mi >> 1) * 16);
  const uint32_t smem0 = dev::smem_u32(smem);

  for (int i = 0; i < ntiles; ++i) {
    const int st = i % STAGES;
    const int64_t t0 = begin + (int64_t)i * TILE;
    const int len = (int)(end - t0 < TILE ? end - t0 : TILE);
    const int nv = len - wbase < 16 ? len - wbase : 16;  // valid tokens of this warp's slice
    dev::mbar_wait(&full_bar[st], (i / STAGES) & 1);
    if (nv > 0) {
      const uint32_t stage = smem0 + st * STAGE;
      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int kk = 0; kk < KSTEPS; ++kk) {
        uint32_t b0, b1, b2, b3;
        dev::ldsm_x4(stage + k_off + kk * 16 * (int)sizeof(T), b0, b1, b2, b3);
        E::mma(s[0], qf[kk], b0, b1);
        E::mma(s[1], qf[kk], b2, b3);
      }
      // scale to base 2, mask the tokens past the slice (stale shared memory), row max
      float mx[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const bool ok = nt * 8 + cq + j < nv;
          s[nt][j] = ok ? s[nt][j] * p.scale_log2 : -CUDART_INF_F;
          s[nt][2 + j] = ok ? s[nt][2 + j] * p.scale_log2 : -CUDART_INF_F;
          mx[0] = fmaxf(mx[0], s[nt][j]);
          mx[1] = fmaxf(mx[1], s[nt][2 + j]);
        }
      }
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        const float m_new = fmaxf(m[r], mx[r]);  // finite: token 0 of the slice is valid
        alpha[r] = exp2f(m[r] - m_new);          // 0 on the first tile (m = -inf)
        m[r] = m_new;
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          s[nt][j] = exp2f(s[nt][j] - m[0]);  // masked tokens: exp2(-inf) = 0
          s[nt][2 + j] = exp2f(s[nt][2 + j] - m[1]);
        }
      }
      l[0] = l[0] * alpha[0] + (s[0][0] + s[0][1] + s[1][0] + s[1][1]);
      l[1] = l[1] * alpha[1] + (s[0][2] + s[0][3] + s[1][2] + s[1][3]);
#pragma unroll
      for (int nd = 0; nd < DTILES; ++nd) {
        acc[nd][0] *= alpha[0];
        acc[nd][1] *= alpha[0];
        acc[nd][2] *= alpha[1];
        acc[nd][3] *= alpha[1];
      }
      // P as the A operand of P V (the accumulator layout of two n-tiles is the k16 A layout)
      const uint32_t pa[4] = {E::pack(s[0][0], s[0][1]), E::pack(s[0][2], s[0][3]), E::pack(s[1][0], s[1][1]),
                              E::pack(s[1][2], s[1][3])};
#pragma unroll
      for (int nd = 0; nd < DTILES; nd += 2) {
        uint32_t b0, b1, b2, b3;
        dev::ldsm_x4_trans(stage + v_off + nd * 8 * (int)sizeof(T), b0, b1, b2, b3);
        if (nv < 16) {  // stale rows may hold anything (NaN * 0 = NaN): zero them
          b0 = dev::keep_tokens(b0, cq, nv);
          b1 = dev::keep_tokens(b1, cq + 8, nv);
          b2 = dev::keep_tokens(b2, cq, nv);
          b3 = dev::keep_tokens(b3, cq + 8, nv);
        }
        E::mma(acc[nd], pa, b0, b1);
        E::mma(acc[nd + 1], pa, b2, b3);
      }
    }
    __syncwarp();
    if (lane == 0) dev::mbar_arrive(&empty_bar[st]);
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }

  // ---- merge the consumer warps in shared memory (the stage buffers are free once all are done)
  float* red_acc = reinterpret_cast<float*>(smem);  // [NC][16][D]
  float* red_m = red_acc + NC * 16 * D;             // [NC][16]
  float* red_l = red_m + NC * 16;                   // [NC][16]
  dev::named_barrier(1, NC * 32);
  if ((lane & 3) == 0) {
    red_m[warp * 16 + r0] = m[0];
    red_m[warp * 16 + r0 + 8] = m[1];
    red_l[warp * 16 + r0] = l[0];
    red_l[warp * 16 + r0 + 8] = l[1];
  }
#pragma unroll
  for (int nd = 0; nd < DTILES; ++nd) {
    float* a0 = red_acc + (warp * 16 + r0) * D + nd * 8 + cq;
    float* a1 = a0 + 8 * D;
    a0[0] = acc[nd][0];
    a0[1] = acc[nd][1];
    a1[0] = acc[nd][2];
    a1[1] = acc[nd][3];
  }
  dev::named_barrier(1, NC * 32);

  const int64_t wsrow = ((int64_t)lst * p.num_splits + sp) * G;
  for (int e = threadIdx.x; e < G * D; e += NC * 32) {
    const int g = e / D;
    const int d = e - g * D;
    float mm = -CUDART_INF_F;
#pragma unroll
    for (int w = 0; w < NC; ++w) mm = fmaxf(mm, red_m[w * 16 + g]);
    float a = 0.f, ll = 0.f;
#pragma unroll
    for (int w = 0; w < NC; ++w) {
      const float mw = red_m[w * 16 + g];
      if (mw != -CUDART_INF_F) {  // a warp that saw no token weighs 0
        const float c = exp2f(mw - mm);
        a += c * red_acc[(w * 16 + g) * D + d];
        ll += c * red_l[w * 16 + g];
      }
    }
    p.ws_acc[(wsrow + g) * D + d] = a;
    if (d == 0) {
      p.ws_m[wsrow + g] = mm;
      p.ws_l[wsrow + g] = ll;
    }
  }
}

// ---------------------------------------------------------------- merge kernel

template <typename T, int D>
__global__ void __launch_bounds__(kMergeWarps * 32) paged_decode_merge_kernel(const DecodeParams p) {
  constexpr int V = D / 32;  // head-dim elements per lane
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t heads = (int64_t)p.num_kv_heads * p.group;
  const int64_t row = (int64_t)blockIdx.x * kMergeWarps + warp;  // (sequence, query head)
  if (row >= p.batch * heads) return;
  const int64_t b = row / heads;
  const int hq = (int)(row - b * heads);
  const int h = hq / p.group;
  const int g = hq - h * p.group;
  const int64_t lst = b * p.num_kv_heads + h;
  const int64_t n = list_tokens(p.seq_start[b], p.window, p.kept_len[lst]);
  const int nsplit = splits_with_tokens(n, p.split_tokens, p.num_splits);
  const int64_t wsrow = lst * p.num_splits;
  const int d0 = lane * V;

  float top = -CUDART_INF_F;
  for (int s = lane; s < nsplit; s += 32) top = fmaxf(top, p.ws_m[(wsrow + s) * p.group + g]);
  top = dev::warp_max(top);

  float s_new = -CUDART_INF_F;
  if (p.k_new != nullptr) {
    float qv[V], kv[V];
    dev::load_vec<T, V>(static_cast<const T*>(p.q) + b * p.q_stride_b + hq * p.q_stride_h + d0, qv);
    dev::load_vec<T, V>(static_cast<const T*>(p.k_new) + b * p.new_stride_b + h * p.new_stride_h + d0, kv);
    float dot = 0.f;
#pragma unroll
    for (int v = 0; v < V; ++v) dot += qv[v] * kv[v];
    s_new = dev::warp_sum(dot) * p.scale_log2;
    top = fmaxf(top, s_new);
  }

  float num[V];
#pragma unroll
  for (int v = 0; v < V; ++v) num[v] = 0.f;
  float den = 0.f;
  if (top != -CUDART_INF_F) {
    for (int s = 0; s < nsplit; ++s) {
      const int64_t r = (wsrow + s) * p.group + g;
      const float ms = p.ws_m[r];
      if (ms == -CUDART_INF_F) continue;  // no keys: weight 0, never exp(0)
      const float c = exp2f(ms - top);
      den += c * p.ws_l[r];
      const float* a = p.ws_acc + r * D + d0;
      if constexpr (V == 2) {
        const float2 x = *reinterpret_cast<const float2*>(a);
        num[0] += c * x.x;
        num[1] += c * x.y;
      } else {
        const float4 x = *reinterpret_cast<const float4*>(a);
        num[0] += c * x.x;
        num[1] += c * x.y;
        num[2] += c * x.z;
        num[3] += c * x.w;
      }
    }
    if (p.k_new != nullptr) {
      const float c = exp2f(s_new - top);
      float vv[V];
      dev::load_vec<T, V>(static_cast<const T*>(p.v_new) + b * p.new_stride_b + h * p.new_stride_h + d0, vv);
      den += c;
#pragma unroll
      for (int v = 0; v < V; ++v) num[v] += c * vv[v];
    }
  }
  const float inv = den > 0.f ? 1.f / den : 0.f;  // a row with no token at all: zeros
#pragma unroll
  for (int v = 0; v < V; ++v) num[v] *= inv;
  dev::store_vec<T, V>(static_cast<T*>(p.out) + b * p.out_stride_b + hq * p.out_stride_h + d0, num);
}

}  // namespace dms

#endif  // DMS_PAGED_DECODE_CUH_
