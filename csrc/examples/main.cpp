// Calls the DMS C ABI: device discovery, a decode plan (host only), argument validation, and
// (with a GPU) one kernel.
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
  if (st != DMS_SUCCESS) return 1;

  // Plan a decode step once (8 sequences x 8 KV heads, GQA 4, bf16, D = 128, up to 4096 tokens
  // held per list, 132 SMs), then reuse the plan for every layer of the step.
  dmsDecodePlan plan;
  st = dms_decode_plan(64, 4, 128, DMS_DTYPE_BFLOAT16, 4096, 132, &plan);
  std::printf("decode plan: %s, %d splits of %lld tokens, %d stages of %d tokens, %d threads, %d B smem, "
              "%lld B workspace\n",
              dms_status_string(st), plan.num_splits, (long long)plan.split_tokens, plan.stages, plan.tile_tokens,
              plan.threads, plan.smem_bytes, (long long)plan.workspace_bytes);
  if (st != DMS_SUCCESS) return 1;
  int64_t begin = 0, end = 0;
  st = dms_decode_split_range(&plan, 1000, 0, &begin, &end);
  std::printf("split 0 of a 1000-token list: [%lld, %lld)\n", (long long)begin, (long long)end);
  if (st != DMS_SUCCESS) return 1;

  // A decode call with an unsupported head dim fails on the host, before any device work.
  dmsPagedDecodeArgs args = {};
  args.dtype = DMS_DTYPE_BFLOAT16;
  args.batch = 8;
  args.num_kv_heads = 8;
  args.group_size = 4;
  args.head_dim = 96;
  st = dms_paged_decode(&args, &plan, nullptr);
  std::printf("invalid decode: %s - %s\n", dms_status_string(st), dms_last_error());
  return st == DMS_ERROR_INVALID_ARGUMENT ? 0 : 1;
}
