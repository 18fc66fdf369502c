// Host-side decisions of the CUDA launchers, as pure functions of what they depend on (capture status, driver
// version, device attributes, set size), so that the CPU tests reach them through the bindings with any of those
// injected. Host C++ only (no CUDA types); compiled into every build.
#pragma once

#include <cstdint>
#include <cstdlib>

#include "launch.h"

namespace gradclip {

// Kernel parameters beyond 4 KB (up to 32,764 bytes) need a driver of CUDA 12.1 or newer (cudaDriverGetVersion
// reports 12010): below that, only the small table is launched, whatever the size of the set.
constexpr int kLargeParamsDriver = 12010;

// The table capacity (slots per launch) for a set of `n_tensors`: the small table when it holds them all (cheaper to
// pass), when the driver cannot take large kernel parameters, or when `force_small` (GRADCLIP_CUDA_SMALL_TABLES=1:
// tests and the benchmark cut a set into several launches with it); else the large one.
inline int table_capacity(int64_t n_tensors, int driver_version, bool force_small) {
  if (n_tensors <= kSmallSlots || force_small || driver_version < kLargeParamsDriver) return kSmallSlots;
  return kLargeSlots;
}

// Where a set's launch tables live. One that needs more than one parameter table (more than 2,016 tensors, or 64
// under a pre-12.1 driver) takes its tables in device memory instead (capacity kDeviceSlots): one launch per pass,
// and the fused path becomes possible. They are uploaded once per tensor set (a pinned, non-blocking copy) and
// cached, so only a set the launcher can reuse qualifies (`reusable`: no gradient went through a contiguous copy);
// `force_small` (GRADCLIP_CUDA_SMALL_TABLES=1) keeps the small parameter tables.
constexpr int kDeviceSlots = 0;
inline bool use_device_table(size_t param_launches, bool force_small, bool reusable) {
  return param_launches > 1 && !force_small && reusable;
}

// Whether a call may read a set's uploaded device table: always eagerly (a call on another stream than the upload's
// waits for the copy's event); under CUDA graph capture only once the copy is complete (`upload_done`: the event
// queried, in relaxed capture mode), since a capture cannot wait on uncaptured work. Otherwise the capture launches
// the parameter tables. A table read by a capture is kept for the life of the process (graphs replay it).
inline bool read_device_table(bool capturing, bool upload_done) { return !capturing || upload_done; }

// Sets of at most this many bytes may take the fused single launch: half of L2 (so that the second pass, the scale,
// still finds most of what the first pass read, with room for whatever else the step keeps in L2), unless `env`
// (GRADCLIP_CUDA_FUSED_MAX_BYTES, nullptr when unset) says otherwise; 0 turns the fused path off.
inline int64_t fused_max_bytes(int64_t l2_bytes, const char* env) {
  return env ? std::atoll(env) : l2_bytes / 2;
}

// Whether a clip takes the fused cooperative launch.
//   capturing:       the stream is capturing a CUDA graph. A refused cooperative launch there invalidates the
//                    capture, and the two-launch fallback would then throw, so under capture the fused path is taken
//                    only where
//   eager_fused_ok:  an eager fused launch has already succeeded on this device (then it fits the device as now set
//                    up, MPS limits included).
//   one_table:       the set fits one launch table (the fused kernel takes one).
//   bytes, max_bytes: the set's bytes, and the threshold (fused_max_bytes); a set of 0 bytes has nothing to fuse.
//   l0:              p = 0 (its total counts tensors; the fused kernel does not compute per-tensor values).
//   cooperative:     the device supports cooperative launches (cudaDevAttrCooperativeLaunch).
inline bool take_fused(bool capturing, bool eager_fused_ok, bool one_table, int64_t bytes, int64_t max_bytes, bool l0,
                       bool cooperative) {
  if (!cooperative || l0 || !one_table || bytes <= 0 || bytes > max_bytes) return false;
  return !capturing || eager_fused_ok;
}

}  // namespace gradclip
