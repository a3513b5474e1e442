// dms_kernels._cuda: a thin pybind11 layer over the C ABI. Pointers arrive as integers
// (tensor.data_ptr()), so the module needs no torch headers and imports without a driver.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "dms/dms.h"
#include "dms/paged_layout.h"

namespace py = pybind11;

namespace {

void raise_on_error(dmsStatus_t status) {
  if (status == DMS_SUCCESS) return;
  std::string msg = std::string(dms_status_string(status)) + ": " + dms_last_error();
  if (status == DMS_ERROR_INVALID_ARGUMENT) throw py::value_error(msg);
  throw std::runtime_error(msg);
}

// Keyword arguments of a C ABI struct: every field must be given exactly once, by name.
class Fields {
 public:
  explicit Fields(const py::kwargs& kw) : kw_(kw) {}

  int64_t i64(const char* name) { return take(name).cast<int64_t>(); }
  int32_t i32(const char* name) { return take(name).cast<int32_t>(); }
  float f32(const char* name) { return take(name).cast<float>(); }
  // A DataType, or a plain int (so that the C ABI's own check of unknown values is reachable).
  dmsDataType_t dtype(const char* name) {
    py::object v = take(name);
    if (py::isinstance<py::int_>(v)) return static_cast<dmsDataType_t>(v.cast<int>());
    return v.cast<dmsDataType_t>();
  }
  template <typename T>
  T* ptr(const char* name) {
    return reinterpret_cast<T*>(take(name).cast<std::uintptr_t>());
  }

  void done() const {
    if ((size_t)used_ == kw_.size()) return;
    std::string extra;
    for (auto item : kw_) {
      const std::string k = py::str(item.first);
      bool known = false;
      for (const auto& u : names_) known = known || u == k;
      if (!known) extra += (extra.empty() ? "" : ", ") + k;
    }
    throw py::type_error("unexpected keyword argument(s): " + extra);
  }

 private:
  py::object take(const char* name) {
    if (!kw_.contains(name)) throw py::type_error(std::string("missing keyword argument: ") + name);
    ++used_;
    names_.emplace_back(name);
    return kw_[name];
  }

  const py::kwargs& kw_;
  int used_ = 0;
  std::vector<std::string> names_;
};

dmsPagedDecodeArgs decode_args(const py::kwargs& kw) {
  Fields f(kw);
  dmsPagedDecodeArgs a{};
  a.dtype = f.dtype("dtype");
  a.batch = f.i64("batch");
  a.num_kv_heads = f.i32("num_kv_heads");
  a.group_size = f.i32("group_size");
  a.head_dim = f.i32("head_dim");
  a.page_size = f.i32("page_size");
  a.window = f.i32("window");
  a.ring_pages = f.i32("ring_pages");
  a.table_width = f.i64("table_width");
  a.scale = f.f32("scale");
  a.q = f.ptr<const void>("q");
  a.q_stride_b = f.i64("q_stride_b");
  a.q_stride_h = f.i64("q_stride_h");
  a.k_new = f.ptr<const void>("k_new");
  a.v_new = f.ptr<const void>("v_new");
  a.new_stride_b = f.i64("new_stride_b");
  a.new_stride_h = f.i64("new_stride_h");
  a.k_pool = f.ptr<const void>("k_pool");
  a.v_pool = f.ptr<const void>("v_pool");
  a.pool_stride_page = f.i64("pool_stride_page");
  a.pool_stride_token = f.i64("pool_stride_token");
  a.table = f.ptr<const int64_t>("table");
  a.table_stride = f.i64("table_stride");
  a.seq_start = f.ptr<const int64_t>("seq_start");
  a.kept_len = f.ptr<const int64_t>("kept_len");
  a.out = f.ptr<void>("out");
  a.out_stride_b = f.i64("out_stride_b");
  a.out_stride_h = f.i64("out_stride_h");
  a.workspace = f.ptr<void>("workspace");
  a.workspace_bytes = f.i64("workspace_bytes");
  f.done();
  return a;
}

dmsPagedStoreArgs store_args(const py::kwargs& kw) {
  Fields f(kw);
  dmsPagedStoreArgs a{};
  a.dtype = f.dtype("dtype");
  a.batch = f.i64("batch");
  a.num_kv_heads = f.i32("num_kv_heads");
  a.head_dim = f.i32("head_dim");
  a.page_size = f.i32("page_size");
  a.window = f.i32("window");
  a.ring_pages = f.i32("ring_pages");
  a.table_width = f.i64("table_width");
  a.num_new = f.i64("num_new");
  a.k_new = f.ptr<const void>("k_new");
  a.v_new = f.ptr<const void>("v_new");
  a.new_stride_b = f.i64("new_stride_b");
  a.new_stride_h = f.i64("new_stride_h");
  a.new_stride_t = f.i64("new_stride_t");
  a.new_evict = f.ptr<const uint8_t>("new_evict");
  a.evict_stride_b = f.i64("evict_stride_b");
  a.evict_stride_h = f.i64("evict_stride_h");
  a.k_pool = f.ptr<void>("k_pool");
  a.v_pool = f.ptr<void>("v_pool");
  a.pool_stride_page = f.i64("pool_stride_page");
  a.pool_stride_token = f.i64("pool_stride_token");
  a.page_table = f.ptr<const int64_t>("page_table");
  a.table_stride = f.i64("table_stride");
  a.ring_evict = f.ptr<uint8_t>("ring_evict");
  a.ring_evict_stride = f.i64("ring_evict_stride");
  a.lists = f.ptr<const int64_t>("lists");
  a.kept0 = f.ptr<const int64_t>("kept0");
  a.seq_start = f.ptr<const int64_t>("seq_start");
  a.n_new = f.ptr<const int64_t>("n_new");
  f.done();
  return a;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "dms_kernels CUDA kernels (sm_90a) behind the C ABI of csrc/include/dms/dms.h";
  m.attr("ARCH") = "sm_90a";

  m.def("device_count", []() {
    int n = 0;
    dms_device_count(&n);  // 0 with no driver or no device: not an error here
    return n;
  }, "Number of usable CUDA devices (0 without a driver or device).");

  m.def("eviction_decisions",
        [](std::uintptr_t logits, std::uintptr_t decisions, int64_t rows, int64_t T, std::uintptr_t stream) {
          raise_on_error(dms_eviction_decisions(reinterpret_cast<const float*>(logits),
                                                reinterpret_cast<uint8_t*>(decisions), rows, T,
                                                reinterpret_cast<dmsStream_t>(stream)));
        },
        py::arg("logits_ptr"), py::arg("decisions_ptr"), py::arg("rows"), py::arg("T"), py::arg("stream") = 0,
        "Shift-by-one decisions: decisions[r, j] = logits[r, j + 1] > 0, last column 0.");

  py::enum_<dmsDataType_t>(m, "DataType")
      .value("float16", DMS_DTYPE_FLOAT16)
      .value("bfloat16", DMS_DTYPE_BFLOAT16)
      .value("float32", DMS_DTYPE_FLOAT32);
  m.def("dtype_size", [](dmsDataType_t t) { return dms_dtype_size(t); });

  py::class_<dmsDecodePlan>(m, "DecodePlan", "Launch plan of the decode kernels (dms_decode_plan); read-only.")
      .def_readonly("num_lists", &dmsDecodePlan::num_lists)
      .def_readonly("group_size", &dmsDecodePlan::group_size)
      .def_readonly("head_dim", &dmsDecodePlan::head_dim)
      .def_readonly("dtype", &dmsDecodePlan::dtype)
      .def_readonly("num_splits", &dmsDecodePlan::num_splits)
      .def_readonly("max_tokens", &dmsDecodePlan::max_tokens)
      .def_readonly("split_tokens", &dmsDecodePlan::split_tokens)
      .def_readonly("tile_tokens", &dmsDecodePlan::tile_tokens)
      .def_readonly("stages", &dmsDecodePlan::stages)
      .def_readonly("threads", &dmsDecodePlan::threads)
      .def_readonly("smem_bytes", &dmsDecodePlan::smem_bytes)
      .def_readonly("workspace_bytes", &dmsDecodePlan::workspace_bytes)
      .def("__repr__", [](const dmsDecodePlan& p) {
        return "DecodePlan(num_lists=" + std::to_string(p.num_lists) + ", num_splits=" + std::to_string(p.num_splits) +
               ", split_tokens=" + std::to_string(p.split_tokens) + ", tile_tokens=" + std::to_string(p.tile_tokens) +
               ", stages=" + std::to_string(p.stages) + ", smem_bytes=" + std::to_string(p.smem_bytes) +
               ", workspace_bytes=" + std::to_string(p.workspace_bytes) + ")";
      });

  m.def("decode_plan",
        [](int64_t num_lists, int32_t group_size, int32_t head_dim, dmsDataType_t dtype, int64_t max_tokens,
           int32_t num_sms) {
          dmsDecodePlan plan{};
          raise_on_error(dms_decode_plan(num_lists, group_size, head_dim, dtype, max_tokens, num_sms, &plan));
          return plan;
        },
        py::arg("num_lists"), py::arg("group_size"), py::arg("head_dim"), py::arg("dtype"), py::arg("max_tokens"),
        py::arg("num_sms"), "Plan a decode step on the host (no device needed): splits, tiles, workspace bytes.");

  m.def("decode_split_range",
        [](const dmsDecodePlan& plan, int64_t list_tokens, int32_t split) {
          int64_t begin = 0, end = 0;
          raise_on_error(dms_decode_split_range(&plan, list_tokens, split, &begin, &end));
          return std::make_tuple(begin, end);
        },
        py::arg("plan"), py::arg("list_tokens"), py::arg("split"),
        "Logical tokens [begin, end) that split `split` reads of a list of `list_tokens` tokens.");

  m.def("decode_reads",
        [](const dmsDecodePlan& plan, int64_t start, int32_t window, int64_t kept, int32_t ring_pages,
           int32_t page_size) {
          // What the split kernel's producer copies for one list, computed by the same layout
          // functions: (split, tile, logical token, page-table column, in-page offset).
          std::vector<std::tuple<int32_t, int32_t, int64_t, int32_t, int32_t>> out;
          const int64_t n_ring = dms::list_tokens(start, window, 0);
          const int64_t n = n_ring + (kept < 0 ? 0 : kept);
          for (int32_t s = 0; s < plan.num_splits; ++s) {
            int64_t begin, end;
            dms::split_range(n, plan.split_tokens, plan.num_splits, s, &begin, &end);
            for (int64_t idx = begin; idx < end; ++idx) {
              int32_t col, off;
              dms::token_slot<int32_t>((int32_t)idx, (int32_t)n_ring, ring_pages, page_size, &col, &off);
              out.emplace_back(s, (int32_t)((idx - begin) / plan.tile_tokens), idx, col, off);
            }
          }
          return out;
        },
        py::arg("plan"), py::arg("start"), py::arg("window"), py::arg("kept"), py::arg("ring_pages"),
        py::arg("page_size"), "The reads of one list under `plan`, as the decode kernel makes them (host mirror).");

  m.def("splits_with_tokens", &dms::splits_with_tokens, py::arg("list_tokens"), py::arg("split_tokens"),
        py::arg("num_splits"), "Splits of a list that hold tokens (the merge kernel reads only those).");

  m.def("paged_decode",
        [](const dmsDecodePlan& plan, std::uintptr_t stream, const py::kwargs& kw) {
          const dmsPagedDecodeArgs a = decode_args(kw);
          raise_on_error(dms_paged_decode(&a, &plan, reinterpret_cast<dmsStream_t>(stream)));
        },
        py::arg("plan"), py::arg("stream") = 0,
        "dms_paged_decode; the fields of dmsPagedDecodeArgs as keyword arguments (pointers as integers).");

  m.def("paged_store",
        [](std::uintptr_t stream, const py::kwargs& kw) {
          const dmsPagedStoreArgs a = store_args(kw);
          raise_on_error(dms_paged_store(&a, reinterpret_cast<dmsStream_t>(stream)));
        },
        py::arg("stream") = 0,
        "dms_paged_store; the fields of dmsPagedStoreArgs as keyword arguments (pointers as integers).");
}
