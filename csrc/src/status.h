// Shared by the C ABI sources: the thread's last error and the device check.
#ifndef DMS_SRC_STATUS_H_
#define DMS_SRC_STATUS_H_

#include <string>

#include "dms/dms.h"

namespace dms {
namespace detail {

// Records "file:line: msg" as this thread's last error and returns `status`.
dmsStatus_t fail(dmsStatus_t status, const char* file, int line, const std::string& msg);

// DMS_SUCCESS when a CUDA device is usable, DMS_ERROR_NO_DEVICE (with a message) otherwise.
dmsStatus_t check_device();

}  // namespace detail
}  // namespace dms

#define DMS_FAIL(status, msg) ::dms::detail::fail((status), __FILE__, __LINE__, (msg))

#endif  // DMS_SRC_STATUS_H_
