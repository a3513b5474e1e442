// C ABI of the paged DMS kernels: planning (host only), argument checks, launches.
// Every check runs before the device is touched, so invalid calls fail the same way with or
// without a GPU.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>

#include "dms/dms.h"
#include "dms/paged_decode.cuh"
#include "dms/paged_layout.h"
#include "dms/paged_store.cuh"
#include "status.h"

namespace {

constexpr double kLog2e = 1.4426950408889634;

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

#define DMS_REQUIRE(cond, ...)                                                      \
  do {                                                                              \
    if (!(cond)) return DMS_FAIL(DMS_ERROR_INVALID_ARGUMENT, cat(__VA_ARGS__));     \
  } while (0)

const char* dtype_name(dmsDataType_t t) {
  switch (t) {
    case DMS_DTYPE_FLOAT16: return "DMS_DTYPE_FLOAT16";
    case DMS_DTYPE_BFLOAT16: return "DMS_DTYPE_BFLOAT16";
    case DMS_DTYPE_FLOAT32: return "DMS_DTYPE_FLOAT32";
  }
  return "an unknown dtype";
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

std::string hex(const void* p) { return cat("0x", std::hex, reinterpret_cast<uintptr_t>(p)); }

// The checks shared by the plan and the decode call.
dmsStatus_t check_decode_shape(int32_t group_size, int32_t head_dim, dmsDataType_t dtype) {
  DMS_REQUIRE(group_size >= 1 && group_size <= dms::kDecodeMaxGroup, "group_size: expected 1..",
              dms::kDecodeMaxGroup, " query heads per KV head (one 16-row MMA tile), got ", group_size);
  DMS_REQUIRE(head_dim == 64 || head_dim == 128, "head_dim: expected 64 or 128, got ", head_dim);
  DMS_REQUIRE(dtype == DMS_DTYPE_FLOAT16 || dtype == DMS_DTYPE_BFLOAT16,
              "dtype: expected DMS_DTYPE_FLOAT16 or DMS_DTYPE_BFLOAT16 for the decode kernels, got ",
              dtype_name(dtype), " (", (int)dtype, ")");
  return DMS_SUCCESS;
}

// 16-byte aligned pointer and strides whose byte size is a multiple of 16.
dmsStatus_t check_data(const char* name, const void* ptr, int64_t elem, std::initializer_list<std::pair<const char*, int64_t>> strides) {
  DMS_REQUIRE(ptr != nullptr, name, ": must not be NULL");
  DMS_REQUIRE(aligned16(ptr), name, ": expected a 16-byte aligned address (16-byte and bulk copies), got ", hex(ptr));
  for (const auto& s : strides) {
    DMS_REQUIRE(s.second >= 0, s.first, ": expected >= 0, got ", s.second);
    DMS_REQUIRE((s.second * elem) % 16 == 0, s.first, ": expected a multiple of ", 16 / elem,
                " elements (16 bytes) for aligned rows, got ", s.second);
  }
  return DMS_SUCCESS;
}

dmsStatus_t check_index(const char* name, const void* ptr) {
  DMS_REQUIRE(ptr != nullptr, name, ": must not be NULL");
  DMS_REQUIRE((reinterpret_cast<uintptr_t>(ptr) & 7u) == 0, name, ": expected an 8-byte aligned int64 array, got ",
              hex(ptr));
  return DMS_SUCCESS;
}

dmsStatus_t check_paging(int32_t page_size, int32_t window, int32_t ring_pages, int64_t table_width) {
  DMS_REQUIRE(page_size >= 1, "page_size: expected >= 1, got ", page_size);
  DMS_REQUIRE(window >= 1, "window: expected >= 1, got ", window);
  const int64_t r_min = cdiv(window, page_size);
  DMS_REQUIRE(ring_pages >= r_min, "ring_pages: expected >= ceil(window / page_size) = ", r_min, ", got ",
              ring_pages);
  DMS_REQUIRE(table_width >= ring_pages, "table_width: expected >= ring_pages = ", ring_pages, ", got ", table_width);
  return DMS_SUCCESS;
}

#define DMS_TRY(expr)                       \
  do {                                      \
    dmsStatus_t st_ = (expr);               \
    if (st_ != DMS_SUCCESS) return st_;     \
  } while (0)

// The K/V page pool of a decode or store call (both argument structs name these fields alike).
template <typename PoolArgs>
dmsStatus_t check_pool(const PoolArgs& a, int64_t elem, int64_t d) {
  DMS_TRY(check_data("k_pool", a.k_pool, elem,
                     {{"pool_stride_page", a.pool_stride_page}, {"pool_stride_token", a.pool_stride_token}}));
  DMS_TRY(check_data("v_pool", a.v_pool, elem, {}));
  DMS_REQUIRE(a.pool_stride_token >= d, "pool_stride_token: expected >= head_dim = ", d, ", got ", a.pool_stride_token);
  DMS_REQUIRE(a.pool_stride_page >= a.pool_stride_token * a.page_size,
              "pool_stride_page: expected >= page_size * pool_stride_token = ", a.pool_stride_token * a.page_size,
              ", got ", a.pool_stride_page);
  return DMS_SUCCESS;
}

template <typename T, int D>
cudaError_t launch_decode(const dms::DecodeParams& p, int64_t num_lists, int32_t num_splits, cudaStream_t stream) {
  constexpr int stages = dms::decode_stages(D);
  constexpr int smem = dms::decode_smem_bytes(D, (int)sizeof(T));
  auto split = dms::paged_decode_split_kernel<T, D, stages>;
  cudaError_t err = cudaFuncSetAttribute(split, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  split<<<dim3((unsigned)num_lists, (unsigned)num_splits), dms::kDecodeThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t rows = p.batch * p.num_kv_heads * p.group;
  const int64_t blocks = cdiv(rows, dms::kMergeWarps);
  dms::paged_decode_merge_kernel<T, D><<<(unsigned)blocks, dms::kMergeWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

int dms_dtype_size(dmsDataType_t dtype) {
  switch (dtype) {
    case DMS_DTYPE_FLOAT16: return 2;
    case DMS_DTYPE_BFLOAT16: return 2;
    case DMS_DTYPE_FLOAT32: return 4;
  }
  return 0;
}

dmsStatus_t dms_decode_plan(int64_t num_lists, int32_t group_size, int32_t head_dim, dmsDataType_t dtype,
                            int64_t max_tokens, int32_t num_sms, dmsDecodePlan* plan) {
  DMS_REQUIRE(plan != nullptr, "plan: must not be NULL");
  DMS_REQUIRE(num_lists >= 0 && num_lists <= INT32_MAX, "num_lists: expected 0..", INT32_MAX, ", got ", num_lists);
  DMS_TRY(check_decode_shape(group_size, head_dim, dtype));
  DMS_REQUIRE(max_tokens >= 0 && max_tokens <= INT32_MAX, "max_tokens: expected 0..", INT32_MAX, ", got ",
              max_tokens);
  DMS_REQUIRE(num_sms >= 1, "num_sms: expected >= 1 multiprocessors, got ", num_sms);

  const int64_t tile = dms::kDecodeTile;
  const int64_t target_ctas = 2 * (int64_t)num_sms;
  const int64_t splits_wanted = num_lists > 0 ? cdiv(target_ctas, num_lists) : 1;
  int64_t split = cdiv(cdiv(max_tokens > 0 ? max_tokens : 1, splits_wanted), tile) * tile;
  int64_t splits = max_tokens > 0 ? cdiv(max_tokens, split) : 1;
  if (splits > 65535) {  // grid y limit
    split = cdiv(cdiv(max_tokens, 65535), tile) * tile;
    splits = cdiv(max_tokens, split);
  }
  const int elem = dms_dtype_size(dtype);
  *plan = dmsDecodePlan{};
  plan->num_lists = num_lists;
  plan->group_size = group_size;
  plan->head_dim = head_dim;
  plan->dtype = dtype;
  plan->num_splits = (int32_t)splits;
  plan->max_tokens = max_tokens;
  plan->split_tokens = split;
  plan->tile_tokens = (int32_t)tile;
  plan->stages = dms::decode_stages(head_dim);
  plan->threads = dms::kDecodeThreads;
  plan->smem_bytes = dms::decode_smem_bytes(head_dim, elem);
  plan->workspace_bytes = dms::decode_workspace_layout(num_lists, splits, group_size, head_dim).bytes;
  return DMS_SUCCESS;
}

dmsStatus_t dms_decode_split_range(const dmsDecodePlan* plan, int64_t list_tokens, int32_t split, int64_t* begin,
                                   int64_t* end) {
  DMS_REQUIRE(plan != nullptr, "plan: must not be NULL");
  DMS_REQUIRE(begin != nullptr && end != nullptr, "begin/end: must not be NULL");
  DMS_REQUIRE(plan->num_splits >= 1 && plan->split_tokens >= 1, "plan: not made by dms_decode_plan (num_splits ",
              plan->num_splits, ", split_tokens ", plan->split_tokens, ")");
  DMS_REQUIRE(list_tokens >= 0, "list_tokens: expected >= 0, got ", list_tokens);
  DMS_REQUIRE(split >= 0 && split < plan->num_splits, "split: expected 0..", plan->num_splits - 1, ", got ", split);
  dms::split_range(list_tokens, plan->split_tokens, plan->num_splits, split, begin, end);
  return DMS_SUCCESS;
}

dmsStatus_t dms_paged_decode(const dmsPagedDecodeArgs* args, const dmsDecodePlan* plan, dmsStream_t stream) {
  DMS_REQUIRE(args != nullptr, "args: must not be NULL");
  DMS_REQUIRE(plan != nullptr, "plan: must not be NULL");
  const dmsPagedDecodeArgs& a = *args;
  DMS_REQUIRE(a.batch >= 0, "batch: expected >= 0, got ", a.batch);
  DMS_REQUIRE(a.num_kv_heads >= 1, "num_kv_heads: expected >= 1, got ", a.num_kv_heads);
  DMS_TRY(check_decode_shape(a.group_size, a.head_dim, a.dtype));
  DMS_TRY(check_paging(a.page_size, a.window, a.ring_pages, a.table_width));
  DMS_REQUIRE(std::isfinite(a.scale) && a.scale > 0.f, "scale: expected a finite value > 0, got ", a.scale);
  const int64_t lists = a.batch * a.num_kv_heads;
  DMS_REQUIRE(plan->num_lists == lists, "plan: made for num_lists = ", plan->num_lists,
              ", but batch * num_kv_heads = ", lists);
  DMS_REQUIRE(plan->group_size == a.group_size && plan->head_dim == a.head_dim && plan->dtype == a.dtype,
              "plan: made for group_size ", plan->group_size, ", head_dim ", plan->head_dim, ", ",
              dtype_name(plan->dtype), "; the call has group_size ", a.group_size, ", head_dim ", a.head_dim, ", ",
              dtype_name(a.dtype));
  DMS_REQUIRE(plan->num_splits >= 1 && plan->num_splits <= 65535 && plan->split_tokens >= dms::kDecodeTile &&
                  plan->split_tokens % dms::kDecodeTile == 0,
              "plan: not made by dms_decode_plan (num_splits ", plan->num_splits, ", split_tokens ",
              plan->split_tokens, ")");
  const dms::DecodeWorkspaceLayout ws =
      dms::decode_workspace_layout(lists, plan->num_splits, a.group_size, a.head_dim);
  DMS_REQUIRE(a.workspace_bytes >= ws.bytes, "workspace_bytes: expected >= ", ws.bytes,
              " (plan->workspace_bytes), got ", a.workspace_bytes);
  if (lists == 0) return DMS_SUCCESS;

  const int64_t elem = dms_dtype_size(a.dtype);
  const int64_t hq = (int64_t)a.num_kv_heads * a.group_size;
  const int64_t d = a.head_dim;
  DMS_TRY(check_data("q", a.q, elem, {{"q_stride_b", a.q_stride_b}, {"q_stride_h", a.q_stride_h}}));
  DMS_REQUIRE((a.k_new == nullptr) == (a.v_new == nullptr), "k_new/v_new: pass both or neither (got k_new ",
              hex(a.k_new), ", v_new ", hex(a.v_new), ")");
  if (a.k_new != nullptr) {
    DMS_TRY(check_data("k_new", a.k_new, elem, {{"new_stride_b", a.new_stride_b}, {"new_stride_h", a.new_stride_h}}));
    DMS_TRY(check_data("v_new", a.v_new, elem, {}));
  }
  DMS_TRY(check_pool(a, elem, d));
  DMS_TRY(check_data("out", a.out, elem, {{"out_stride_b", a.out_stride_b}, {"out_stride_h", a.out_stride_h}}));
  DMS_REQUIRE(a.out_stride_h >= d && a.out_stride_b >= hq * a.out_stride_h,
              "out_stride_b/out_stride_h: rows of out must not overlap (expected out_stride_h >= ", d,
              ", out_stride_b >= ", hq, " * out_stride_h), got ", a.out_stride_b, ", ", a.out_stride_h);
  DMS_TRY(check_index("table", a.table));
  DMS_REQUIRE(a.table_stride >= a.table_width, "table_stride: expected >= table_width = ", a.table_width, ", got ",
              a.table_stride);
  DMS_TRY(check_index("seq_start", a.seq_start));
  DMS_TRY(check_index("kept_len", a.kept_len));
  DMS_REQUIRE(a.workspace != nullptr, "workspace: must not be NULL (", ws.bytes, " bytes needed)");
  DMS_REQUIRE(aligned16(a.workspace), "workspace: expected a 16-byte aligned address, got ", hex(a.workspace));
  DMS_TRY(dms::detail::check_device());

  dms::DecodeParams p{};
  p.q = a.q;
  p.q_stride_b = a.q_stride_b;
  p.q_stride_h = a.q_stride_h;
  p.k_new = a.k_new;
  p.v_new = a.v_new;
  p.new_stride_b = a.new_stride_b;
  p.new_stride_h = a.new_stride_h;
  p.k_pool = a.k_pool;
  p.v_pool = a.v_pool;
  p.pool_stride_page = a.pool_stride_page;
  p.pool_stride_token = a.pool_stride_token;
  p.table = a.table;
  p.table_stride = a.table_stride;
  p.seq_start = a.seq_start;
  p.kept_len = a.kept_len;
  p.out = a.out;
  p.out_stride_b = a.out_stride_b;
  p.out_stride_h = a.out_stride_h;
  char* w = static_cast<char*>(a.workspace);
  p.ws_acc = reinterpret_cast<float*>(w + ws.acc_offset);
  p.ws_m = reinterpret_cast<float*>(w + ws.m_offset);
  p.ws_l = reinterpret_cast<float*>(w + ws.l_offset);
  p.batch = a.batch;
  p.split_tokens = plan->split_tokens;
  p.num_kv_heads = a.num_kv_heads;
  p.group = a.group_size;
  p.page_size = a.page_size;
  p.window = a.window;
  p.ring_pages = a.ring_pages;
  p.num_splits = plan->num_splits;
  p.scale_log2 = (float)(a.scale * kLog2e);

  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t err;
  if (a.dtype == DMS_DTYPE_FLOAT16) {
    err = a.head_dim == 64 ? launch_decode<__half, 64>(p, lists, plan->num_splits, s)
                           : launch_decode<__half, 128>(p, lists, plan->num_splits, s);
  } else {
    err = a.head_dim == 64 ? launch_decode<__nv_bfloat16, 64>(p, lists, plan->num_splits, s)
                           : launch_decode<__nv_bfloat16, 128>(p, lists, plan->num_splits, s);
  }
  if (err != cudaSuccess) return DMS_FAIL(DMS_ERROR_CUDA, cat("paged decode launch failed: ", cudaGetErrorString(err)));
  return DMS_SUCCESS;
}

dmsStatus_t dms_paged_store(const dmsPagedStoreArgs* args, dmsStream_t stream) {
  DMS_REQUIRE(args != nullptr, "args: must not be NULL");
  const dmsPagedStoreArgs& a = *args;
  const int64_t elem = dms_dtype_size(a.dtype);
  DMS_REQUIRE(elem > 0, "dtype: expected DMS_DTYPE_FLOAT16, DMS_DTYPE_BFLOAT16 or DMS_DTYPE_FLOAT32, got ", (int)a.dtype);
  DMS_REQUIRE(a.batch >= 0, "batch: expected >= 0, got ", a.batch);
  DMS_REQUIRE(a.num_kv_heads >= 1, "num_kv_heads: expected >= 1, got ", a.num_kv_heads);
  DMS_REQUIRE(a.head_dim >= 1 && (a.head_dim * elem) % 16 == 0 && a.head_dim <= 4096,
              "head_dim: expected 1..4096 with head_dim * element size a multiple of 16 bytes (", 16 / elem,
              " elements for ", dtype_name(a.dtype), "), got ", a.head_dim);
  DMS_TRY(check_paging(a.page_size, a.window, a.ring_pages, a.table_width));
  DMS_REQUIRE(a.num_new >= 0, "num_new: expected >= 0, got ", a.num_new);
  const int64_t lists = a.batch * a.num_kv_heads;
  DMS_REQUIRE(lists <= INT32_MAX, "batch * num_kv_heads: expected <= ", INT32_MAX, ", got ", lists);
  if (lists == 0 || a.num_new == 0) return DMS_SUCCESS;

  const int64_t d = a.head_dim;
  DMS_TRY(check_data("k_new", a.k_new, elem,
                     {{"new_stride_b", a.new_stride_b}, {"new_stride_h", a.new_stride_h}, {"new_stride_t", a.new_stride_t}}));
  DMS_TRY(check_data("v_new", a.v_new, elem, {}));
  DMS_REQUIRE(a.new_evict != nullptr, "new_evict: must not be NULL");
  DMS_REQUIRE(a.evict_stride_b >= 0 && a.evict_stride_h >= 0, "evict_stride_b/evict_stride_h: expected >= 0, got ",
              a.evict_stride_b, ", ", a.evict_stride_h);
  DMS_TRY(check_pool(a, elem, d));
  DMS_TRY(check_index("page_table", a.page_table));
  DMS_REQUIRE(a.table_stride >= a.table_width, "table_stride: expected >= table_width = ", a.table_width, ", got ",
              a.table_stride);
  DMS_REQUIRE(a.ring_evict != nullptr, "ring_evict: must not be NULL");
  DMS_REQUIRE(a.ring_evict_stride >= a.window, "ring_evict_stride: expected >= window = ", a.window, ", got ",
              a.ring_evict_stride);
  DMS_TRY(check_index("lists", a.lists));
  DMS_TRY(check_index("kept0", a.kept0));
  DMS_TRY(check_index("seq_start", a.seq_start));
  DMS_TRY(check_index("n_new", a.n_new));
  DMS_TRY(dms::detail::check_device());

  dms::StoreParams p{};
  p.k_new = static_cast<const char*>(a.k_new);
  p.v_new = static_cast<const char*>(a.v_new);
  p.new_stride_b = a.new_stride_b * elem;
  p.new_stride_h = a.new_stride_h * elem;
  p.new_stride_t = a.new_stride_t * elem;
  p.new_evict = a.new_evict;
  p.evict_stride_b = a.evict_stride_b;
  p.evict_stride_h = a.evict_stride_h;
  p.k_pool = static_cast<char*>(a.k_pool);
  p.v_pool = static_cast<char*>(a.v_pool);
  p.pool_stride_page = a.pool_stride_page * elem;
  p.pool_stride_token = a.pool_stride_token * elem;
  p.page_table = a.page_table;
  p.table_stride = a.table_stride;
  p.ring_evict = a.ring_evict;
  p.ring_stride = a.ring_evict_stride;
  p.lists = a.lists;
  p.kept0 = a.kept0;
  p.seq_start = a.seq_start;
  p.n_new = a.n_new;
  p.num_kv_heads = a.num_kv_heads;
  p.page_size = a.page_size;
  p.window = a.window;
  p.ring_pages = a.ring_pages;
  p.row_vecs = (int32_t)(d * elem / 16);
  dms::paged_store_kernel<<<(unsigned)lists, dms::kStoreThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return DMS_FAIL(DMS_ERROR_CUDA, cat("paged store launch failed: ", cudaGetErrorString(err)));
  return DMS_SUCCESS;
}

}  // extern "C"
