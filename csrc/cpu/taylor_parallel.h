// The quadratic (parallel) form of Taylor attention on the CPU: forward and backward of one (sequence, head).
#pragma once

#include <vector>

#include "math.h"
#include "taylor_state.h"
#include "tasks.h"

namespace linattn_cuda {
namespace cpu {
namespace {  // internal linkage: every kernel file has its own copy

// The quadratic form for one (sequence, head): blocks of `plan.chunk` queries against every key they see,
// S = scale Q K^T, P = 1 + S + S^2/2, [N | z] = P [V | 1] (+ phi(Q)^T S0 for an initial state s0).
// Arguments as forward_one's (csrc/cpu/taylor_cpu.cpp); the quadratic form builds no state.
template <typename T>
void forward_quadratic(const T* q, const T* k, const T* v, const bool* pad, T* out, T* den, const Shape& s,
                       bool causal, double scale, const Plan& plan, const T* s0, int ld) {
  const int d = static_cast<int>(s.d), dv = static_cast<int>(s.dv), dv1 = dv + 1;
  const FeatureMap<T> fm(d, scale);
  const int m = fm.m;
  const T tscale = static_cast<T>(scale);
  const int lq = static_cast<int>(s.lq), lk = static_cast<int>(s.lk);
  const int off = causal ? lk - lq : 0;  // keys every query of a causal problem sees
  // num: n x (Dv + 1) rows, the numerator in the first Dv columns and the normalizer in the last

  const int c = std::max(1, std::min(plan.chunk, lq));
  std::vector<T> vscratch(pad ? static_cast<size_t>(lk) * dv : 0), sblk(static_cast<size_t>(c) * lk),
      num(static_cast<size_t>(c) * dv1), rowsum(c);
  FeatureScratch<T> fs(s0 != nullptr ? c : 0, d, m);
  int ldv = ld;
  const T* vk = key_values(v, pad, lk, dv, &ldv, vscratch.data());
  for (int r0 = 0; r0 < lq; r0 += c) {
    const int n = std::min(c, lq - r0);
    const int kend = causal ? std::min(lk, r0 + n + off) : lk;  // the keys this block of queries sees
    const T* qc = q + static_cast<int64_t>(r0) * d;
    if (s0 != nullptr) queries_read_state(fm, qc, n, dv, s0, num.data(), false, fs);
    gemm<T>(false, true, n, kend, d, tscale, qc, d, k, d, T(0), sblk.data(), lk);
    poly_rows(sblk.data(), n, kend, lk, causal ? r0 + off : -1, pad, rowsum.data());
    gemm<T>(false, false, n, dv, kend, T(1), sblk.data(), lk, vk, ldv, s0 != nullptr ? T(1) : T(0), num.data(), dv1);
    for (int r = 0; r < n; ++r) {
      T& z = num[static_cast<size_t>(r) * dv1 + dv];
      z = (s0 != nullptr ? z : T(0)) + rowsum[r];
    }
    normalize_rows(num.data(), n, dv, out + static_cast<int64_t>(r0) * ld, den ? den + r0 : nullptr, ld);
  }
}

// The quadratic form's backward for one (sequence, head) and a block of value columns (see backward_one):
// dS = (G [V | 1]^T) (1 + S), dq += scale dS K, dk += scale dS^T Q, dv += P^T G.
template <typename T>
void backward_quadratic(const T* gaug, const T* q, const T* k, const T* v, const bool* pad, T* dq, T* dk,
                        T* dv_out, const Shape& s, bool causal, double scale, const Plan& plan, int ld, bool norm) {
  const int d = static_cast<int>(s.d), dv = static_cast<int>(s.dv), dv1 = dv + 1;
  const FeatureMap<T> fm(d, scale);
  const int m = fm.m;
  const T tscale = static_cast<T>(scale);
  const int lq = static_cast<int>(s.lq), lk = static_cast<int>(s.lk);
  const T one = norm ? T(1) : T(0);  // the normalizer column of [v | 1]: 0 in blocks without it
  const int off = causal ? lk - lq : 0;  // end-aligned causal: query i sees the keys j <= i + off
  (void)m;
  (void)tscale;
  const int c = std::min(plan.chunk, lq);
  std::vector<T> vaug(static_cast<size_t>(lk) * dv1), sblk(static_cast<size_t>(c) * lk),
      dp(static_cast<size_t>(c) * lk);
  build_value_aug(v, pad, lk, dv, vaug.data(), ld, one);
  for (int r0 = 0; r0 < lq; r0 += c) {
    const int n = std::min(c, lq - r0);
    const int kend = causal ? std::min(lk, r0 + n + off) : lk;  // the keys this block of queries sees
    const T* qc = q + static_cast<int64_t>(r0) * d;
    const T* gc = gaug + static_cast<int64_t>(r0) * dv1;
    gemm<T>(false, true, n, kend, d, tscale, qc, d, k, d, T(0), sblk.data(), lk);
    gemm<T>(false, true, n, kend, dv1, T(1), gc, dv1, vaug.data(), dv1, T(0), dp.data(), lk);
    for (int i = 0; i < n; ++i) {
      T* srow = sblk.data() + static_cast<int64_t>(i) * lk;
      T* drow = dp.data() + static_cast<int64_t>(i) * lk;
      const int end = causal ? std::min(kend, r0 + i + off + 1) : kend;
      for (int j = 0; j < end; ++j) {
        drow[j] *= T(1) + srow[j];  // dS
        srow[j] = poly(srow[j]);    // P
      }
      std::fill(srow + end, srow + kend, T(0));
      std::fill(drow + end, drow + kend, T(0));
    }
    gemm<T>(false, false, n, d, kend, tscale, dp.data(), lk, k, d, T(1), dq + static_cast<int64_t>(r0) * d, d);
    gemm<T>(true, false, kend, d, n, tscale, dp.data(), lk, qc, d, T(1), dk, d);
    gemm<T>(true, false, kend, dv, n, T(1), sblk.data(), lk, gc, dv1, T(1), dv_out, ld);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace linattn_cuda
