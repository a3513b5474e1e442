// dms_kernels._cuda: a thin pybind11 layer over the C ABI. Pointers arrive as integers
// (tensor.data_ptr()), so the module needs no torch headers and imports without a driver.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "dms/dms.h"

namespace py = pybind11;

namespace {

void raise_on_error(dmsStatus_t status) {
  if (status == DMS_SUCCESS) return;
  std::string msg = std::string(dms_status_string(status)) + ": " + dms_last_error();
  if (status == DMS_ERROR_INVALID_ARGUMENT) throw py::value_error(msg);
  throw std::runtime_error(msg);
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
}
