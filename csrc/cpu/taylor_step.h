// The decoding step of Taylor attention on the CPU.
#pragma once

#include <algorithm>

#include "math.h"

namespace linattn_cuda {
namespace cpu {
namespace {  // internal linkage: every kernel file has its own copy

// One decoding step of one (b, key/value head) in a single pass over the state: read the old row, write the new
// one (kv' = kv + phi(k) v^T, z' = z + phi(k)) and accumulate out_g = phi(q_g)^T kv' / phi(q_g)^T z' for the
// `group` query heads that share the key/value head (fq: group x m, o: group x dv, z: group scratch).
template <typename T>
LA_SIMD_CLONES void step_one(const T* __restrict__ s_old, T* __restrict__ s_new, const T* __restrict__ z_old,
                             T* __restrict__ z_new, const T* __restrict__ fq, int group, const T* __restrict__ fk,
                             const T* __restrict__ vr, int m, int dv, T* __restrict__ o, T* __restrict__ z) {
  std::fill(o, o + static_cast<int64_t>(group) * dv, T(0));
  std::fill(z, z + group, T(0));
  for (int f = 0; f < m; ++f) {
    const T* __restrict__ src = s_old + static_cast<int64_t>(f) * dv;
    T* __restrict__ dst = s_new + static_cast<int64_t>(f) * dv;
    const T a = fk[f];
    z_new[f] = z_old[f] + a;
    if (group == 1) {  // one pass: the new row is written and read in the same loop
      const T w = fq[f];
      for (int c = 0; c < dv; ++c) {
        const T val = src[c] + a * vr[c];
        dst[c] = val;
        o[c] += w * val;
      }
      z[0] += w * z_new[f];
      continue;
    }
    for (int c = 0; c < dv; ++c) dst[c] = src[c] + a * vr[c];
    for (int g = 0; g < group; ++g) {  // the new row is still in L1
      const T w = fq[static_cast<int64_t>(g) * m + f];
      T* __restrict__ og = o + static_cast<int64_t>(g) * dv;
      for (int c = 0; c < dv; ++c) og[c] += w * dst[c];
      z[g] += w * z_new[f];
    }
  }
  for (int g = 0; g < group; ++g) {
    const T inv = z[g] != T(0) ? T(1) / z[g] : T(0);
    for (int c = 0; c < dv; ++c) o[static_cast<int64_t>(g) * dv + c] *= inv;
  }
}

}  // namespace
}  // namespace cpu
}  // namespace linattn_cuda
