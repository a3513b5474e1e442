// Calls the DMS C ABI: device discovery, argument validation, and (with a GPU) one kernel.
#include <cstdio>

#include "dms/dms.h"

int main() {
  int count = 0;
  dmsStatus_t st = dms_device_count(&count);
  std::printf("dms_device_count: %s, %d device(s)%s%s\n", dms_status_string(st), count,
              st == DMS_SUCCESS ? "" : " - ", st == DMS_SUCCESS ? "" : dms_last_error());

  st = dms_eviction_decisions(nullptr, nullptr, -1, 4, nullptr);
  std::printf("invalid call: %s - %s\n", dms_status_string(st), dms_last_error());
  if (st != DMS_ERROR_INVALID_ARGUMENT) return 1;

  st = dms_eviction_decisions(nullptr, nullptr, 0, 4, nullptr);  // nothing to do: success
  std::printf("empty call: %s\n", dms_status_string(st));
  return st == DMS_SUCCESS ? 0 : 1;
}
