// dms_kernels._cpu: fused DMS paged attention and the paged store for CPU tensors.
//
// Tensors cross as data_ptr() integers with element strides (the last dimension contiguous), so
// the module needs no torch headers. Layouts are those of torch.ops.dms.paged_attention /
// paged_store (docs/ARCHITECTURE.md):
//
//   q        [B, Hq, T, D]   new queries at positions starts[b] + a, a < n_new[b] (right padded)
//   k_new    [B, H, T, D]    new keys / values (v_new alike)
//   new_evict[B, H, T]       uint8 (torch.bool) decisions of the new keys
//   k_pool   [P, PS, D]      contiguous pool (v_pool alike)
//   table    [B, H, R + K]   page ids: columns [0, R) hold the ring (slot r at page r / PS,
//                            offset r % PS), columns [R, R + K) the kept store (token j likewise)
//   kept_len [B, H]          tokens in the kept store
//   ring_evict [B, H, W]     uint8 decision of the token in each ring slot
//   out      [B, Hq, T, D]   contiguous
//
// One task is (sequence, KV head, tile of queries, split of the held keys): the G query heads of
// the group and the tile's queries are rows of one tile, so each K/V row is read once per group
// and tile. The softmax is online, in fp32 (fp64 for fp64 tensors); splits of one tile are merged
// by log-sum-exp (a split that saw no key has weight 0). Rows past n_new are written as zeros.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64)) && __GNUC__ >= 11
// One build for every x86-64 machine, with AVX-512 and AVX2+FMA code chosen at load time.
#define DMS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DMS_CLONES
#endif
#define DMS_INLINE inline __attribute__((always_inline))
// lambdas too: a call out of a target clone would run the baseline ISA
#define DMS_INLINE_LAMBDA __attribute__((always_inline))

namespace {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };

struct bf16_t { uint16_t x; };
struct f16_t { uint16_t x; };

template <class T> struct acc_of { using type = float; };
template <> struct acc_of<double> { using type = double; };
template <class T> using acc_t = typename acc_of<T>::type;

DMS_INLINE float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

DMS_INLINE uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

#if defined(__FLT16_MAX__)
#define DMS_HAVE_F16 1
DMS_INLINE float f16_to_float(uint16_t h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return float(x);
}
DMS_INLINE uint16_t float_to_f16(float f) {
  _Float16 x = _Float16(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
}
#else
#define DMS_HAVE_F16 0
#endif

// Convert one row of D elements to the accumulation type.
template <class T>
DMS_INLINE void load_row(const T* __restrict src, acc_t<T>* __restrict dst, int64_t D) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = bf16_to_float(s[d]);
  } else if constexpr (std::is_same_v<T, f16_t>) {
#if DMS_HAVE_F16
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    for (int64_t d = 0; d < D; ++d) dst[d] = f16_to_float(s[d]);
#endif
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = src[d];
  }
}

template <class T>
DMS_INLINE void store_row(const acc_t<T>* __restrict src, T* __restrict dst, int64_t D) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    uint16_t* o = reinterpret_cast<uint16_t*>(dst);
    for (int64_t d = 0; d < D; ++d) o[d] = float_to_bf16(src[d]);
  } else if constexpr (std::is_same_v<T, f16_t>) {
#if DMS_HAVE_F16
    uint16_t* o = reinterpret_cast<uint16_t*>(dst);
    for (int64_t d = 0; d < D; ++d) o[d] = float_to_f16(src[d]);
#endif
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = src[d];
  }
}

// First error raised inside a parallel region; reported after it (as ValueError naming the argument).
class ErrorSlot {
 public:
  void set(std::string msg) {
    if (failed_.exchange(true)) return;
    std::lock_guard<std::mutex> lock(mu_);
    msg_ = std::move(msg);
  }
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  void raise() {
    if (failed()) throw py::value_error(msg_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::mutex mu_;
  std::string msg_;
};

int threads_for(int requested, int64_t tasks) {
  int n = requested > 0 ? requested : 1;
  return int(std::max<int64_t>(1, std::min<int64_t>(n, tasks)));
}

// ----------------------------------------------------------------------------- attention

constexpr int BN = 32;      // keys per block
constexpr int DMAX = 512;   // largest head dim
constexpr int MIN_SPLIT = 256;  // fewest held keys a split of a decode tile reads
constexpr int64_t SMALL_WORK = 16384;  // (query row, key) pairs below which one thread runs a call

struct AttnArgs {
  int64_t B, H, G, T, D, PS, W, R, TW, P;
  const char* q; int64_t q_b, q_h, q_t;
  const char* kn; int64_t kn_b, kn_h, kn_t;
  const char* vn; int64_t vn_b, vn_h, vn_t;
  const uint8_t* ev; int64_t ev_b, ev_h, ev_t;
  const int64_t* n_new; int64_t n_s;
  const int64_t* starts; int64_t st_s;
  const char* kp; const char* vp;
  const int64_t* table; int64_t tb_b, tb_h, tb_c;
  const int64_t* kept; int64_t kl_b, kl_h;
  const uint8_t* rev; int64_t re_b, re_h, re_w;
  char* out;
  double scale;
  int threads;
};

struct Task {
  int64_t b, h;
  int64_t a0, na;   // queries [a0, a0 + na) of the chunk
  int64_t k0, k1;   // held keys [k0, k1): ring slots first, then the kept store
  int64_t ws;       // partial results offset (rows) of a split tile, -1 when the tile is not split
  bool with_new;    // this split also reads the new chunk's keys
};

struct Group {  // the splits of one tile, tasks [first, first + n)
  int64_t first, n;
};

constexpr int RB = 4;     // rows per register tile of the score product
typedef float vf8 __attribute__((vector_size(32)));  // 8 floats: one AVX register, two SSE ones
constexpr int GEMM_ROWS = 8;  // tiles with at least this many rows take the transposed-K product

template <class A>
struct Scratch {
  std::vector<A> q, acc, m, l, kbuf, vbuf, kt;
  std::vector<uint8_t> vis;
  void reserve(int64_t rows, int64_t D, int64_t na) {
    const int64_t padded = (rows + RB - 1) / RB * RB;
    q.assign(padded * D, A(0));
    acc.resize(rows * D);
    m.resize(rows);
    l.resize(rows);
    kbuf.resize(BN * D);
    vbuf.resize(BN * D);
    kt.resize(D * BN);
    vis.resize(na * BN);
  }
};

// exp(x) for x <= 0 (scores minus their running maximum), as plain arithmetic so that loops over
// keys vectorise: 2^n * e^t with |t| <= ln2/2, a degree-7 Taylor polynomial (relative error
// below 3e-7); exactly 0 below -87 (and for -inf, a masked key).
DMS_INLINE float exp_nonpos(float x) {
  float y = x * 1.44269504088896341f;
  y = y < -126.0f ? -126.0f : y;
  const float n = (y + 12582912.0f) - 12582912.0f;  // round to nearest
  const float t = (y - n) * 0.693147180559945309f;
  float p = 1.0f / 5040.0f;
  p = p * t + 1.0f / 720.0f;
  p = p * t + 1.0f / 120.0f;
  p = p * t + 1.0f / 24.0f;
  p = p * t + 1.0f / 6.0f;
  p = p * t + 0.5f;
  p = p * t + 1.0f;
  p = p * t + 1.0f;
  const float r = __builtin_bit_cast(float, __builtin_bit_cast(int32_t, p) + int32_t(n) * (1 << 23));
  return x < -87.0f ? 0.0f : r;
}
DMS_INLINE double exp_nonpos(double x) { return std::exp(x); }

// One row's softmax update from its block scores sc[0, nk) (-inf: not visible): rescale the
// accumulator to the new maximum and add the visible keys' values. Visible keys are real tokens,
// so a masked key's p = 0 multiplies finite data.
template <class A, int DC>
DMS_INLINE void update_row(int64_t D_, int nk, A* sc, const A* const* V, A* __restrict accp, A& m, A& l) {
  const int64_t D = DC ? DC : D_;
  constexpr int DM = DC ? DC : DMAX;
  const A ninf = -std::numeric_limits<A>::infinity();
  A mx = ninf;
  for (int j = 0; j < nk; ++j) mx = sc[j] > mx ? sc[j] : mx;
  if (mx == ninf) return;  // no key of this block is visible to the row
  const A m_new = std::max(m, mx);
  A lsum = 0;
#pragma omp simd reduction(+ : lsum)
  for (int j = 0; j < nk; ++j) {
    sc[j] = exp_nonpos(sc[j] - m_new);
    lsum += sc[j];
  }
  const A alpha = m_new > m ? exp_nonpos(m - m_new) : A(1);  // 0 while nothing was seen (m = -inf)
  if constexpr (std::is_same_v<A, float> && DC % 8 == 0 && DC > 0) {
    // the row's accumulator in DC/8 registers of 8 floats across the block's keys
    constexpr int NV = DC / 8;
    vf8 av[NV];
    for (int i = 0; i < NV; ++i) {
      std::memcpy(&av[i], accp + 8 * i, 32);
      av[i] *= alpha;
    }
    for (int j = 0; j < nk; ++j) {
      const vf8 p = vf8{} + sc[j];
      const float* v = V[j];
      for (int i = 0; i < NV; ++i) {
        vf8 x;
        std::memcpy(&x, v + 8 * i, 32);
        av[i] += p * x;
      }
    }
    for (int i = 0; i < NV; ++i) std::memcpy(accp + 8 * i, &av[i], 32);
  } else {
    A av[DM];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) av[d] = accp[d] * alpha;
    for (int j = 0; j < nk; ++j) {
      const A p = sc[j];
      const A* v = V[j];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) av[d] += p * v[d];
    }
    for (int64_t d = 0; d < D; ++d) accp[d] = av[d];
  }
  m = m_new;
  l = l * alpha + lsum;
}

// Rows r = g * na + i (query head h*G + g, query a0 + i) over one block of nk keys. vis, if
// given, is [na][BN]: whether query i sees key j.
template <class T, int DC>
DMS_INLINE void attend_block(int64_t D_, int64_t rows, int64_t na, int nk, const T* const* kr, const T* const* vr,
                             const uint8_t* vis, Scratch<acc_t<T>>& s) {
  using A = acc_t<T>;
  const int64_t D = DC ? DC : D_;
  constexpr int DM = DC ? DC : DMAX;
  const A ninf = -std::numeric_limits<A>::infinity();
  const A* K[BN];
  const A* V[BN];
  if constexpr (std::is_same_v<T, A>) {
    for (int j = 0; j < nk; ++j) {
      K[j] = kr[j];
      V[j] = vr[j];
    }
  } else {
    for (int j = 0; j < nk; ++j) {
      load_row<T>(kr[j], s.kbuf.data() + j * D, D);
      load_row<T>(vr[j], s.vbuf.data() + j * D, D);
      K[j] = s.kbuf.data() + j * D;
      V[j] = s.vbuf.data() + j * D;
    }
  }
  if (rows < GEMM_ROWS) {  // decode: a few rows, one dot product per (row, key)
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* vm = vis ? vis + (r % na) * BN : nullptr;
      A qv[DM];
      const A* qs = s.q.data() + r * D;
      for (int64_t d = 0; d < D; ++d) qv[d] = qs[d];
      A sc[BN];
      for (int j = 0; j < nk; ++j) {
        const A* k = K[j];
        A dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qv[d] * k[d];
        sc[j] = (vm && !vm[j]) ? ninf : dot;
      }
      update_row<A, DC>(D, nk, sc, V, s.acc.data() + r * D, s.m[r], s.l[r]);
    }
    return;
  }
  // chunks: K^T in a [D][BN] tile, scores of RB rows at a time as broadcast-FMAs over the keys
  A* kt = s.kt.data();
  for (int j = 0; j < nk; ++j) {
    const A* k = K[j];
    for (int64_t d = 0; d < D; ++d) kt[d * BN + j] = k[d];
  }
  for (int j = nk; j < BN; ++j)
    for (int64_t d = 0; d < D; ++d) kt[d * BN + j] = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += RB) {
    A sc[RB][BN];
    for (int rr = 0; rr < RB; ++rr)
      for (int j = 0; j < BN; ++j) sc[rr][j] = 0;
    const A* q0 = s.q.data() + r0 * D;  // rows past `rows` are padding (computed, never used)
    for (int64_t d = 0; d < D; ++d) {
      const A* kd = kt + d * BN;
      for (int rr = 0; rr < RB; ++rr) {
        const A qv = q0[rr * D + d];
#pragma omp simd
        for (int j = 0; j < BN; ++j) sc[rr][j] += qv * kd[j];
      }
    }
    for (int rr = 0; rr < RB && r0 + rr < rows; ++rr) {
      const int64_t r = r0 + rr;
      if (vis) {
        const uint8_t* vm = vis + (r % na) * BN;
        for (int j = 0; j < nk; ++j) sc[rr][j] = vm[j] ? sc[rr][j] : ninf;
      }
      update_row<A, DC>(D, nk, sc[rr], V, s.acc.data() + r * D, s.m[r], s.l[r]);
    }
  }
}

template <class T>
DMS_INLINE const T* pool_row(const AttnArgs& a, const char* pool, int64_t page, int64_t off) {
  return reinterpret_cast<const T*>(pool) + (page * a.PS + off) * a.D;
}

template <class T, int DC>
DMS_INLINE void run_task(const AttnArgs& a, const Task& t, Scratch<acc_t<T>>& s, std::vector<acc_t<T>>& ws,
                         ErrorSlot& err) {
  using A = acc_t<T>;
  const int64_t D = DC ? DC : a.D;
  const int64_t G = a.G, na = t.na, rows = G * na;
  const int64_t b = t.b, h = t.h;
  const int64_t start = a.starts[b * a.st_s];
  const int64_t n = a.n_new[b * a.n_s];
  const int64_t n_ring = std::min(start, a.W);
  const int64_t last = start - 1;
  const A scale = A(a.scale);
  const A ninf = -std::numeric_limits<A>::infinity();

  // the tile's queries, scaled once
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t i = 0; i < na; ++i) {
      const T* src = reinterpret_cast<const T*>(a.q) + b * a.q_b + (h * G + g) * a.q_h + (t.a0 + i) * a.q_t;
      A* dst = s.q.data() + (g * na + i) * D;
      load_row<T>(src, dst, D);
      for (int64_t d = 0; d < D; ++d) dst[d] *= scale;
    }
  }
  std::fill(s.acc.begin(), s.acc.begin() + rows * D, A(0));
  std::fill(s.m.begin(), s.m.begin() + rows, ninf);
  std::fill(s.l.begin(), s.l.begin() + rows, A(0));

  const int64_t* tab = a.table + b * a.tb_b + h * a.tb_h;
  const uint8_t* rev = a.rev + b * a.re_b + h * a.re_h;
  const T* kr[BN];
  const T* vr[BN];
  int nk = 0;
  bool masked = false;  // some (query, key) pair of the block is invisible
  uint8_t* vis = s.vis.data();
  auto flush = [&]() DMS_INLINE_LAMBDA {
    if (nk) attend_block<T, DC>(D, rows, na, nk, kr, vr, masked ? vis : nullptr, s);
    nk = 0;
    masked = false;
  };
  auto page_at = [&](int64_t col) DMS_INLINE_LAMBDA -> int64_t {
    const int64_t page = tab[col * a.tb_c];
    if (page < 0 || page >= a.P) {
      err.set("table: page id " + std::to_string(page) + " at column " + std::to_string(col) + " of sequence " +
              std::to_string(b) + ", KV head " + std::to_string(h) + " is outside the pool [0, " +
              std::to_string(a.P) + ")");
      return -1;
    }
    return page;
  };

  // 1. ring slots: visible to query start + i iff its distance is <= W or the decision is keep
  const int64_t r_hi = std::min(t.k1, n_ring);
  for (int64_t r = t.k0; r < r_hi; ++r) {
    const int64_t page = page_at(r / a.PS);
    if (page < 0) return;
    const int64_t pos = start <= a.W ? r : last - ((last - r) % a.W);
    const bool evicted = rev[r * a.re_w] != 0;
    kr[nk] = pool_row<T>(a, a.kp, page, r % a.PS);
    vr[nk] = pool_row<T>(a, a.vp, page, r % a.PS);
    for (int64_t i = 0; i < na; ++i) {
      const bool v = !evicted || (start + t.a0 + i - pos <= a.W);
      vis[i * BN + nk] = v;
      masked |= !v;
    }
    if (++nk == BN) flush();
  }
  // 2. the kept store: always visible
  for (int64_t k = std::max(t.k0, n_ring); k < t.k1; ++k) {
    const int64_t j = k - n_ring;
    const int64_t page = page_at(a.R + j / a.PS);
    if (page < 0) return;
    kr[nk] = pool_row<T>(a, a.kp, page, j % a.PS);
    vr[nk] = pool_row<T>(a, a.vp, page, j % a.PS);
    for (int64_t i = 0; i < na; ++i) vis[i * BN + nk] = 1;
    if (++nk == BN) flush();
  }
  // 3. the new chunk: causal, and the window rule with the chunk's own decisions
  if (t.with_new) {
    const int64_t c_hi = std::min(n, t.a0 + na);
    const uint8_t* ev = a.ev + b * a.ev_b + h * a.ev_h;
    for (int64_t c = 0; c < c_hi; ++c) {
      const bool evicted = ev[c * a.ev_t] != 0;
      // a key evicted and beyond the window of every query of the tile is skipped
      if (evicted && t.a0 - c > a.W) continue;
      kr[nk] = reinterpret_cast<const T*>(a.kn) + b * a.kn_b + h * a.kn_h + c * a.kn_t;
      vr[nk] = reinterpret_cast<const T*>(a.vn) + b * a.vn_b + h * a.vn_h + c * a.vn_t;
      for (int64_t i = 0; i < na; ++i) {
        const int64_t dist = t.a0 + i - c;
        const bool v = dist >= 0 && (!evicted || dist <= a.W);
        vis[i * BN + nk] = v;
        masked |= !v;
      }
      if (++nk == BN) flush();
    }
  }
  flush();

  if (t.ws < 0) {  // the whole tile: normalise and write
    A o[DMAX];
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t i = 0; i < na; ++i) {
        const int64_t r = g * na + i;
        const A inv = s.l[r] > 0 ? A(1) / s.l[r] : A(0);  // no visible key: zeros
        const A* accp = s.acc.data() + r * D;
        for (int64_t d = 0; d < D; ++d) o[d] = accp[d] * inv;
        T* dst = reinterpret_cast<T*>(a.out) + (((b * a.H + h) * G + g) * a.T + t.a0 + i) * D;
        store_row<T>(o, dst, D);
      }
    }
  } else {  // a split: keep (m, l, acc) for the merge
    A* w = ws.data() + t.ws * (D + 2);
    for (int64_t r = 0; r < rows; ++r) {
      A* row = w + r * (D + 2);
      row[0] = s.m[r];
      row[1] = s.l[r];
      std::memcpy(row + 2, s.acc.data() + r * D, sizeof(A) * D);
    }
  }
}

template <class T>
void merge_group(const AttnArgs& a, const std::vector<Task>& tasks, const Group& grp, const std::vector<acc_t<T>>& ws) {
  using A = acc_t<T>;
  const int64_t D = a.D, G = a.G;
  const Task& t0 = tasks[grp.first];
  const int64_t na = t0.na;
  const A ninf = -std::numeric_limits<A>::infinity();
  A o[DMAX];
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t i = 0; i < na; ++i) {
      const int64_t r = g * na + i;
      A mx = ninf;
      for (int64_t s = 0; s < grp.n; ++s) mx = std::max(mx, ws[(tasks[grp.first + s].ws + r) * (D + 2)]);
      std::fill(o, o + D, A(0));
      A l = 0;
      if (mx != ninf) {
        for (int64_t s = 0; s < grp.n; ++s) {
          const A* row = ws.data() + (tasks[grp.first + s].ws + r) * (D + 2);
          if (row[0] == ninf) continue;  // a split that saw no key weighs nothing
          const A wgt = std::exp(row[0] - mx);
          l += row[1] * wgt;
          for (int64_t d = 0; d < D; ++d) o[d] += row[2 + d] * wgt;
        }
      }
      const A inv = l > 0 ? A(1) / l : A(0);
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      T* dst = reinterpret_cast<T*>(a.out) + (((t0.b * a.H + t0.h) * G + g) * a.T + t0.a0 + i) * D;
      store_row<T>(o, dst, D);
    }
  }
}

// Query tile: about 48 rows (GQA heads x queries) share each block of keys.
int64_t tile_queries(int64_t T, int64_t G) { return std::max<int64_t>(1, std::min<int64_t>(T, 48 / std::max<int64_t>(1, G))); }

template <class T, int DC>
DMS_CLONES void run_tasks(const AttnArgs& a, const std::vector<Task>& tasks, std::vector<acc_t<T>>& ws, ErrorSlot& err,
                          int nthreads) {
  const int64_t qt = tile_queries(a.T, a.G);
#pragma omp parallel num_threads(nthreads)
  {
    Scratch<acc_t<T>> s;
    s.reserve(a.G * qt, DC ? DC : a.D, qt);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(tasks.size()); ++i) {
      if (!err.failed()) run_task<T, DC>(a, tasks[i], s, ws, err);
    }
  }
}

template <class T>
void attention(const AttnArgs& a) {
  using A = acc_t<T>;
  const int64_t qt = tile_queries(a.T, a.G);
  // plan: tasks per (sequence, KV head, query tile), split over held keys when tiles are too few
  int64_t tiles = 0, work = 0;
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t n = a.n_new[b * a.n_s];
    const int64_t start = a.starts[b * a.st_s];
    if (n < 0 || n > a.T) throw py::value_error("n_new: expected values in [0, " + std::to_string(a.T) + "], got " + std::to_string(n) + " for sequence " + std::to_string(b));
    if (start < 0) throw py::value_error("starts: expected values >= 0, got " + std::to_string(start) + " for sequence " + std::to_string(b));
    for (int64_t h = 0; h < a.H; ++h) {
      const int64_t kept = a.kept[b * a.kl_b + h * a.kl_h];
      if (kept < 0 || kept > (a.TW - a.R) * a.PS)
        throw py::value_error("kept_len: expected values in [0, " + std::to_string((a.TW - a.R) * a.PS) + "] (the table's kept columns), got " + std::to_string(kept) + " for sequence " + std::to_string(b) + ", KV head " + std::to_string(h));
    }
    tiles += a.H * ((n + qt - 1) / qt);
    for (int64_t h = 0; h < a.H; ++h) {  // (query row, key) pairs, an estimate of the work
      const int64_t held = std::min(start, a.W) + a.kept[b * a.kl_b + h * a.kl_h];
      work += a.G * n * held + a.G * n * (n + 1) / 2;
    }
  }
  // waking threads costs more than a small step saves
  const int nthreads = work < SMALL_WORK ? 1 : (a.threads > 0 ? a.threads : 1);
  std::vector<Task> tasks;
  std::vector<Group> groups;
  int64_t ws_rows = 0;
  tasks.reserve(tiles);
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t n = a.n_new[b * a.n_s];
    const int64_t start = a.starts[b * a.st_s];
    const int64_t n_ring = std::min(start, a.W);
    for (int64_t h = 0; h < a.H; ++h) {
      const int64_t held = n_ring + a.kept[b * a.kl_b + h * a.kl_h];
      for (int64_t a0 = 0; a0 < n; a0 += qt) {
        const int64_t na = std::min(qt, n - a0);
        int64_t nsplit = 1;
        if (tiles < 2 * nthreads) {
          nsplit = std::min<int64_t>((2 * nthreads + tiles - 1) / tiles, held / MIN_SPLIT);
          nsplit = std::max<int64_t>(1, nsplit);
        }
        groups.push_back({int64_t(tasks.size()), nsplit});
        for (int64_t sidx = 0; sidx < nsplit; ++sidx) {
          Task t{b, h, a0, na, held * sidx / nsplit, held * (sidx + 1) / nsplit, -1, sidx == nsplit - 1};
          if (nsplit > 1) {
            t.ws = ws_rows;
            ws_rows += a.G * na;
          }
          tasks.push_back(t);
        }
      }
    }
  }
  // rows past n_new: zeros
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t n = a.n_new[b * a.n_s];
    if (n >= a.T) continue;
    for (int64_t hq = 0; hq < a.H * a.G; ++hq) {
      T* dst = reinterpret_cast<T*>(a.out) + ((b * a.H * a.G + hq) * a.T + n) * a.D;
      std::memset(static_cast<void*>(dst), 0, sizeof(T) * (a.T - n) * a.D);
    }
  }
  if (tasks.empty()) return;
  std::vector<A> ws(ws_rows * (a.D + 2));
  ErrorSlot err;
  {
    py::gil_scoped_release nogil;
    const int nt = threads_for(nthreads, int64_t(tasks.size()));
    if (a.D == 64) run_tasks<T, 64>(a, tasks, ws, err, nt);
    else if (a.D == 128) run_tasks<T, 128>(a, tasks, ws, err, nt);
    else run_tasks<T, 0>(a, tasks, ws, err, nt);
    if (!err.failed() && ws_rows) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(nthreads, int64_t(groups.size())))
      for (int64_t gi = 0; gi < int64_t(groups.size()); ++gi) {
        if (groups[gi].n > 1) merge_group<T>(a, tasks, groups[gi], ws);
      }
    }
  }
  err.raise();
}

void paged_attention(int dtype, py::tuple dims, py::tuple q, py::tuple k_new, py::tuple v_new, py::tuple new_evict,
                     py::tuple n_new, py::tuple starts, std::uintptr_t k_pool, std::uintptr_t v_pool, py::tuple table,
                     py::tuple kept_len, py::tuple ring_evict, std::uintptr_t out, double scale, int threads) {
  AttnArgs a{};
  auto i64 = [](py::handle h) { return h.cast<int64_t>(); };
  auto ptr = [](py::handle h) { return reinterpret_cast<const char*>(h.cast<std::uintptr_t>()); };
  if (dims.size() != 10) throw py::value_error("dims: expected (B, H, G, T, D, PS, W, R, TW, P)");
  a.B = i64(dims[0]); a.H = i64(dims[1]); a.G = i64(dims[2]); a.T = i64(dims[3]); a.D = i64(dims[4]);
  a.PS = i64(dims[5]); a.W = i64(dims[6]); a.R = i64(dims[7]); a.TW = i64(dims[8]); a.P = i64(dims[9]);
  auto t4 = [&](py::tuple x, const char* name, const char*& p, int64_t& s0, int64_t& s1, int64_t& s2) {
    if (x.size() != 4) throw py::value_error(std::string(name) + ": expected (ptr, stride0, stride1, stride2)");
    p = ptr(x[0]); s0 = i64(x[1]); s1 = i64(x[2]); s2 = i64(x[3]);
  };
  const char* evp; const char* rep; const char* nnp; const char* stp; const char* tbp; const char* klp; int64_t unused;
  t4(q, "q", a.q, a.q_b, a.q_h, a.q_t);
  t4(k_new, "k_new", a.kn, a.kn_b, a.kn_h, a.kn_t);
  t4(v_new, "v_new", a.vn, a.vn_b, a.vn_h, a.vn_t);
  t4(new_evict, "new_evict", evp, a.ev_b, a.ev_h, a.ev_t);
  t4(table, "table", tbp, a.tb_b, a.tb_h, a.tb_c);
  t4(ring_evict, "ring_evict", rep, a.re_b, a.re_h, a.re_w);
  t4(kept_len, "kept_len", klp, a.kl_b, a.kl_h, unused);
  t4(n_new, "n_new", nnp, a.n_s, unused, unused);
  t4(starts, "starts", stp, a.st_s, unused, unused);
  a.ev = reinterpret_cast<const uint8_t*>(evp);
  a.rev = reinterpret_cast<const uint8_t*>(rep);
  a.n_new = reinterpret_cast<const int64_t*>(nnp);
  a.starts = reinterpret_cast<const int64_t*>(stp);
  a.table = reinterpret_cast<const int64_t*>(tbp);
  a.kept = reinterpret_cast<const int64_t*>(klp);
  a.kp = reinterpret_cast<const char*>(k_pool);
  a.vp = reinterpret_cast<const char*>(v_pool);
  a.out = reinterpret_cast<char*>(out);
  a.scale = scale;
  a.threads = threads;
  if (a.D < 1 || a.D > DMAX) throw py::value_error("q: head dim must be in [1, " + std::to_string(DMAX) + "], got " + std::to_string(a.D));
  if (a.W < 1) throw py::value_error("window: expected an int >= 1, got " + std::to_string(a.W));
  if (a.PS < 1) throw py::value_error("k_pool: expected a page size >= 1");
  if (a.R * a.PS < a.W || a.R > a.TW)
    throw py::value_error("ring_pages: expected ceil(window / page size) <= ring_pages <= table width, got " + std::to_string(a.R));
  switch (dtype) {
    case F32: attention<float>(a); break;
    case F64: attention<double>(a); break;
    case BF16: attention<bf16_t>(a); break;
#if DMS_HAVE_F16
    case F16: attention<f16_t>(a); break;
#endif
    default: throw py::value_error("q: dtype code " + std::to_string(dtype) + " is not supported by this build");
  }
}

// ----------------------------------------------------------------------------- store

struct StoreArgs {
  int64_t B, H, T, D, PS, W, R, TW, P, NL;
  const char* kn; int64_t kn_b, kn_h, kn_t;
  const char* vn; int64_t vn_b, vn_h, vn_t;
  const uint8_t* ev; int64_t ev_b, ev_h, ev_t;
  char* kp; char* vp;
  const int64_t* table; int64_t tb_l, tb_c;
  uint8_t* rev; int64_t re_l, re_w;
  const int64_t* lists; int64_t li_b, li_h;
  const int64_t* kept0; int64_t k0_b, k0_h;
  const int64_t* starts; int64_t st_s;
  const int64_t* n_new; int64_t n_s;
  int64_t elem;  // bytes per element
  int threads;
};

// One list: tokens leaving the window (ring, oldest first, then the chunk's oldest) go to the
// kept store if kept; then the chunk's last min(n, W) tokens go to their ring slots.
void store_list(const StoreArgs& a, int64_t b, int64_t h, ErrorSlot& err) {
  const int64_t lst = a.lists[b * a.li_b + h * a.li_h];
  const int64_t s = a.starts[b * a.st_s], n = a.n_new[b * a.n_s];
  const int64_t cut = s + n - a.W;
  int64_t dest = a.kept0[b * a.k0_b + h * a.k0_h];
  const int64_t* tab = a.table + lst * a.tb_l;
  uint8_t* rev = a.rev + lst * a.re_l;
  const int64_t row = a.D * a.elem;
  auto page_at = [&](int64_t col) -> int64_t {
    const int64_t page = col < a.TW ? tab[col * a.tb_c] : -1;
    if (page < 0 || page >= a.P) {
      err.set("page_table: list " + std::to_string(lst) + " has no valid page at column " + std::to_string(col) +
              " (got " + std::to_string(page) + ", pool of " + std::to_string(a.P) +
              " pages); pages must be allocated before the store");
      return -1;
    }
    return page;
  };
  auto slot_ptr = [&](char* pool, int64_t page, int64_t off) { return pool + (page * a.PS + off) * row; };
  auto to_kept = [&](const char* k, const char* v) -> bool {
    const int64_t page = page_at(a.R + dest / a.PS);
    if (page < 0) return false;
    std::memcpy(slot_ptr(a.kp, page, dest % a.PS), k, row);
    std::memcpy(slot_ptr(a.vp, page, dest % a.PS), v, row);
    ++dest;
    return true;
  };
  // 1. ring tokens leaving the window: positions max(0, s - W) .. min(s, cut) - 1
  for (int64_t p = std::max<int64_t>(s - a.W, 0); p < std::min(s, cut); ++p) {
    const int64_t slot = p % a.W;
    if (rev[slot * a.re_w]) continue;
    const int64_t page = page_at(slot / a.PS);
    if (page < 0) return;
    if (!to_kept(slot_ptr(a.kp, page, slot % a.PS), slot_ptr(a.vp, page, slot % a.PS))) return;
  }
  // 2. new tokens leaving the window: chunk indices 0 .. cut - s - 1
  const uint8_t* ev = a.ev + b * a.ev_b + h * a.ev_h;
  for (int64_t c = 0; c < std::min(n, cut - s); ++c) {
    if (ev[c * a.ev_t]) continue;
    if (!to_kept(a.kn + (b * a.kn_b + h * a.kn_h + c * a.kn_t) * a.elem,
                 a.vn + (b * a.vn_b + h * a.vn_h + c * a.vn_t) * a.elem))
      return;
  }
  // 3. the chunk's tokens inside the window, into their ring slots
  for (int64_t c = std::max<int64_t>(n - a.W, 0); c < n; ++c) {
    const int64_t slot = (s + c) % a.W;
    const int64_t page = page_at(slot / a.PS);
    if (page < 0) return;
    std::memcpy(slot_ptr(a.kp, page, slot % a.PS), a.kn + (b * a.kn_b + h * a.kn_h + c * a.kn_t) * a.elem, row);
    std::memcpy(slot_ptr(a.vp, page, slot % a.PS), a.vn + (b * a.vn_b + h * a.vn_h + c * a.vn_t) * a.elem, row);
    rev[slot * a.re_w] = ev[c * a.ev_t] != 0;
  }
}

void paged_store(int64_t elem, py::tuple dims, py::tuple k_new, py::tuple v_new, py::tuple new_evict,
                 std::uintptr_t k_pool, std::uintptr_t v_pool, py::tuple page_table, py::tuple ring_evict,
                 py::tuple lists, py::tuple kept0, py::tuple starts, py::tuple n_new, int threads) {
  StoreArgs a{};
  auto i64 = [](py::handle h) { return h.cast<int64_t>(); };
  auto ptr = [](py::handle h) { return reinterpret_cast<char*>(h.cast<std::uintptr_t>()); };
  if (dims.size() != 10) throw py::value_error("dims: expected (B, H, T, D, PS, W, R, TW, P, NL)");
  a.B = i64(dims[0]); a.H = i64(dims[1]); a.T = i64(dims[2]); a.D = i64(dims[3]); a.PS = i64(dims[4]);
  a.W = i64(dims[5]); a.R = i64(dims[6]); a.TW = i64(dims[7]); a.P = i64(dims[8]); a.NL = i64(dims[9]);
  auto t4 = [&](py::tuple x, const char* name, char*& p, int64_t& s0, int64_t& s1, int64_t& s2) {
    if (x.size() != 4) throw py::value_error(std::string(name) + ": expected (ptr, stride0, stride1, stride2)");
    p = ptr(x[0]); s0 = i64(x[1]); s1 = i64(x[2]); s2 = i64(x[3]);
  };
  char *kn, *vn, *ev, *tb, *re, *li, *k0, *st, *nn;
  int64_t unused;
  t4(k_new, "k_new", kn, a.kn_b, a.kn_h, a.kn_t);
  t4(v_new, "v_new", vn, a.vn_b, a.vn_h, a.vn_t);
  t4(new_evict, "new_evict", ev, a.ev_b, a.ev_h, a.ev_t);
  t4(page_table, "page_table", tb, a.tb_l, a.tb_c, unused);
  t4(ring_evict, "ring_evict", re, a.re_l, a.re_w, unused);
  t4(lists, "lists", li, a.li_b, a.li_h, unused);
  t4(kept0, "kept0", k0, a.k0_b, a.k0_h, unused);
  t4(starts, "starts", st, a.st_s, unused, unused);
  t4(n_new, "n_new", nn, a.n_s, unused, unused);
  a.kn = kn; a.vn = vn;
  a.ev = reinterpret_cast<const uint8_t*>(ev);
  a.kp = reinterpret_cast<char*>(k_pool);
  a.vp = reinterpret_cast<char*>(v_pool);
  a.table = reinterpret_cast<const int64_t*>(tb);
  a.rev = reinterpret_cast<uint8_t*>(re);
  a.lists = reinterpret_cast<const int64_t*>(li);
  a.kept0 = reinterpret_cast<const int64_t*>(k0);
  a.starts = reinterpret_cast<const int64_t*>(st);
  a.n_new = reinterpret_cast<const int64_t*>(nn);
  a.elem = elem;
  a.threads = threads;
  if (a.W < 1) throw py::value_error("window: expected an int >= 1, got " + std::to_string(a.W));
  if (a.R * a.PS < a.W || a.R > a.TW)
    throw py::value_error("ring_pages: expected ceil(window / page size) <= ring_pages <= table width, got " + std::to_string(a.R));
  // scalar inputs first (serially), so the parallel part can only fail on page ids
  std::vector<uint8_t> seen(a.NL, 0);
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t s = a.starts[b * a.st_s], n = a.n_new[b * a.n_s];
    if (s < 0) throw py::value_error("starts: expected values >= 0, got " + std::to_string(s) + " for sequence " + std::to_string(b));
    if (n < 0 || n > a.T) throw py::value_error("n_new: expected values in [0, " + std::to_string(a.T) + "], got " + std::to_string(n) + " for sequence " + std::to_string(b));
    for (int64_t h = 0; h < a.H; ++h) {
      const int64_t lst = a.lists[b * a.li_b + h * a.li_h];
      if (lst < 0 || lst >= a.NL) throw py::value_error("lists: expected list ids in [0, " + std::to_string(a.NL) + "), got " + std::to_string(lst));
      if (seen[lst]++) throw py::value_error("lists: list id " + std::to_string(lst) + " appears twice in one store");
      if (a.kept0[b * a.k0_b + h * a.k0_h] < 0) throw py::value_error("kept0: expected values >= 0");
    }
  }
  ErrorSlot err;
  {
    py::gil_scoped_release nogil;
    const int64_t nl = a.B * a.H;
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads_for(a.threads, nl / 4 + 1))
    for (int64_t i = 0; i < nl; ++i) {
      if (!err.failed()) store_list(a, i / a.H, i % a.H, err);
    }
  }
  err.raise();
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "DMS paged attention and paged store on CPU (raw pointers, no torch headers)";
  m.def("paged_attention", &paged_attention,
        "Fused DMS attention over the paged cache; tensors as (ptr, strides...) tuples, see dms_kernels/cpu.py",
        py::arg("dtype"), py::arg("dims"), py::arg("q"), py::arg("k_new"), py::arg("v_new"), py::arg("new_evict"),
        py::arg("n_new"), py::arg("starts"), py::arg("k_pool"), py::arg("v_pool"), py::arg("table"),
        py::arg("kept_len"), py::arg("ring_evict"), py::arg("out"), py::arg("scale"), py::arg("threads"));
  m.def("paged_store", &paged_store, "Data movement of a paged store step, see dms_kernels/cpu.py", py::arg("elem"),
        py::arg("dims"), py::arg("k_new"), py::arg("v_new"), py::arg("new_evict"), py::arg("k_pool"),
        py::arg("v_pool"), py::arg("page_table"), py::arg("ring_evict"), py::arg("lists"), py::arg("kept0"),
        py::arg("starts"), py::arg("n_new"), py::arg("threads"));
  m.attr("f16_supported") = bool(DMS_HAVE_F16);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
