// The stateful clipping policies' step (gradclip_cuda/policies.py, GradClipper): the threshold rule of each policy
// and the coefficient, on a float64 state vector, as __host__ __device__ code run by the CPU kernel on the host and by
// one CUDA thread on the device: one op per step instead of tens of small tensor ops (each a launch on a GPU, a few
// microseconds of dispatch on a CPU). The pure-PyTorch kernel of the op (gradclip_cuda/_ops.py, policy_step_torch)
// computes the same values with torch ops on the same layout. nvcc contracts a * b + c into fused multiply-adds (the
// CPU build does not), so the CUDA kernel's state can differ from the CPU's in the last bit; each is deterministic.
//
// State layout (float64): [0] steps, [1] count (finite totals taken: every one for AutoClip, the warm-up ones for
// ZClip), [2] the last threshold (+inf: no clipping), [3] ZClip's EMA mean, [4] its variance, then from [5] the
// policy's buffer: AutoClip's ring of the last `size` finite totals and, after it, the same values sorted ascending
// (NaN past the filled part); ZClip's warm-up buffer of `size` totals.
#pragma once

#include <cmath>
#include <cstdint>

#include "arith.h"

namespace gradclip {

enum class ClipPolicy : int64_t { Fixed = 0, AutoClip = 1, ZClip = 2 };

constexpr int kStateSteps = 0, kStateCount = 1, kStateThreshold = 2, kStateMean = 3, kStateVar = 4, kStateData = 5;

// The policy's parameters, in the order of the op's `args` (gradclip_cuda/policies.py, GradClipper._args).
struct PolicyArgs {
  double max_norm, eps, q, cap, alpha, z_thresh, clip_factor;
  int64_t size;           // AutoClip's history, ZClip's warm-up steps
  bool percentile_mode;   // ZClip: mode "percentile" (else "zscore")
  bool mean_option;       // ZClip: clip_option "mean" (else "adaptive_scaling")
  bool skip_on_spike;     // ZClip: skip_update_on_spike
};

GC_HD PolicyArgs policy_args(const double* a) {
  return {a[0], a[1], a[2], a[3], a[4], a[5], a[6], static_cast<int64_t>(a[7]), a[8] != 0, a[9] != 0, a[10] != 0};
}
constexpr int kPolicyArgs = 11;

// AutoClip: a finite total enters the ring (evicting the oldest when full) and the sorted copy; the threshold is the
// q-quantile of the filled part by numpy's "linear" method (rank (m - 1) q, the neighbours' two-sided lerp); an empty
// history gives +inf.
GC_HD double autoclip_threshold(double* s, const PolicyArgs& a, double g) {
  const int64_t n = a.size;
  double* ring = s + kStateData;
  double* sorted = ring + n;
  int64_t count = static_cast<int64_t>(s[kStateCount]);
  int64_t m = count < n ? count : n;
  if (std::isfinite(g)) {
    const int64_t pos = count % n;
    if (count >= n) {  // the oldest value leaves the sorted copy
      const double old = ring[pos];
      int64_t j = 0;
      while (j < m && sorted[j] < old) ++j;
      for (; j + 1 < m; ++j) sorted[j] = sorted[j + 1];
      sorted[--m] = NAN;
    }
    ring[pos] = g;
    int64_t j = m;
    for (; j > 0 && sorted[j - 1] > g; --j) sorted[j] = sorted[j - 1];
    sorted[j] = g;
    ++m;
    s[kStateCount] = static_cast<double>(++count);
  }
  if (m == 0) return INFINITY;
  const double rank = static_cast<double>(m - 1) * a.q;
  const double below = std::floor(rank);
  const double gamma = rank - below;
  const int64_t lo = below < 0 ? 0 : static_cast<int64_t>(below);
  const int64_t hi = lo + 1 < m ? lo + 1 : m - 1;
  const double va = sorted[lo], vb = sorted[hi], diff = vb - va;
  return gamma >= 0.5 ? vb - diff * (1 - gamma) : va + diff * gamma;
}

// ZClip (Kumar et al. 2025, as gradclip_cuda/policies.py states it): warm-up buffer of finite totals, then an EMA of
// mean and variance; a spike (z-score above z_thresh, or a total above mean + z_thresh std) gets a threshold, any
// other step +inf; the EMA takes the spike threshold or the total (the variance with the updated mean).
GC_HD double zclip_threshold(double* s, const PolicyArgs& a, double g) {
  const int64_t w = a.size;
  double* buffer = s + kStateData;
  const int64_t count = static_cast<int64_t>(s[kStateCount]);
  const bool finite = std::isfinite(g);
  const bool warm = count < w;
  const double mean = s[kStateMean], var = s[kStateVar];
  const double std_ = std::sqrt(var);
  bool spike;
  double spike_threshold;
  if (!a.percentile_mode) {
    const double z = (g - mean) / (std_ + a.eps);
    spike = z > a.z_thresh;
    spike_threshold = a.mean_option ? mean : (mean + (a.z_thresh * std_) / (z / a.z_thresh)) * a.clip_factor;
  } else {
    spike_threshold = mean + a.z_thresh * std_;
    spike = g > spike_threshold;
  }
  spike = spike && !warm;
  const double threshold = spike ? spike_threshold : INFINITY;
  if (warm && finite) {
    buffer[count] = g;
    s[kStateCount] = static_cast<double>(count + 1);
    if (count + 1 == w) {  // the warm-up's mean and population variance start the EMA
      double sum = 0;
      for (int64_t i = 0; i < w; ++i) sum += buffer[i];
      const double m0 = sum / static_cast<double>(w);
      double sq = 0;
      for (int64_t i = 0; i < w; ++i) sq += (buffer[i] - m0) * (buffer[i] - m0);
      s[kStateMean] = m0;
      s[kStateVar] = sq / static_cast<double>(w);
    }
  } else if (finite && !warm && !(a.skip_on_spike && spike)) {
    const double value = spike ? spike_threshold : g;
    const double new_mean = a.alpha * mean + (1 - a.alpha) * value;
    s[kStateMean] = new_mean;
    s[kStateVar] = a.alpha * var + (1 - a.alpha) * (value - new_mean) * (value - new_mean);
  }
  return threshold;
}

// One step: advances the state with the total g (float64) and returns the step's threshold (also stored in the
// state): max_norm (fixed), the policy's threshold capped at `cap` (+inf: no cap).
GC_HD double policy_step(double* s, ClipPolicy policy, const PolicyArgs& a, double g) {
  s[kStateSteps] += 1;
  if (policy == ClipPolicy::Fixed) return s[kStateThreshold] = a.max_norm;
  double t = policy == ClipPolicy::AutoClip ? autoclip_threshold(s, a, g) : zclip_threshold(s, a, g);
  if (t > a.cap) t = a.cap;
  return s[kStateThreshold] = t;
}

// The step's coefficient in the total's precision A: torch's clamp(threshold / (total + eps), max=1) with the
// threshold rounded to A as a Python max_norm is; exactly 1 when that threshold is +inf (no clipping).
template <typename A>
GC_HD A policy_coef(A total, double threshold, double eps) {
  const A t = static_cast<A>(threshold);
  if (t == A(INFINITY)) return A(1);
  return clip_coef<A>(total, threshold, eps);
}

}  // namespace gradclip
