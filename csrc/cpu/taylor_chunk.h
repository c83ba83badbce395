// The chunked linear form of Taylor attention on the CPU: forward and backward of one (sequence, head).
#pragma once

#include <vector>

#include "math.h"
#include "taylor_state.h"
#include "tasks.h"

namespace linattn_cuda {
namespace cpu {
namespace {  // internal linkage: every kernel file has its own copy

// The linear form for one (sequence, head): the state S_aug over all keys (non-causal), or chunks of
// `plan.chunk` tokens in the quadratic form plus the state of the chunks before them (causal, end-aligned).
// Arguments as forward_one's (csrc/cpu/taylor_cpu.cpp).
template <typename T>
void forward_chunked(const T* q, const T* k, const T* v, const bool* pad, T* out, T* den, const Shape& s,
                     bool causal, double scale, const Plan& plan, const T* s0, T* s_out, int ld) {
  const int d = static_cast<int>(s.d), dv = static_cast<int>(s.dv), dv1 = dv + 1;
  const FeatureMap<T> fm(d, scale);
  const int m = fm.m;
  const T tscale = static_cast<T>(scale);
  const int lq = static_cast<int>(s.lq), lk = static_cast<int>(s.lk);
  const int off = causal ? lk - lq : 0;  // keys every query of a causal problem sees
  // num: n x (Dv + 1) rows, the numerator in the first Dv columns and the normalizer in the last

  // Linear form, with the state S_aug in st.
  const int c = causal ? plan.chunk : std::max(1, std::min<int>(plan.chunk, std::max(lq, lk)));
  FeatureScratch<T> fs(c, d, m);
  std::vector<T> vscratch(pad ? static_cast<size_t>(c) * dv : 0), num(static_cast<size_t>(c) * dv1),
      rowsum(c), sblk(causal ? static_cast<size_t>(c) * c : 0);
  std::vector<T> local_state;
  T* st = s_out;
  if (st == nullptr) {
    local_state.resize(static_cast<size_t>(m) * dv1);
    st = local_state.data();
  }
  if (s0 == nullptr) {
    std::fill(st, st + static_cast<int64_t>(m) * dv1, T(0));
  } else if (s0 != st) {
    std::copy(s0, s0 + static_cast<int64_t>(m) * dv1, st);
  }
  auto add_keys = [&](int r0, int n) {  // S_aug += phi(K)^T [V | 1] over n keys starting at r0
    keys_into_state(fm, k + static_cast<int64_t>(r0) * d, v + static_cast<int64_t>(r0) * ld,
                    pad ? pad + r0 : nullptr, n, dv, ld, st, fs, vscratch.data());
  };

  if (!causal) {
    for (int r0 = 0; r0 < lk; r0 += c) add_keys(r0, std::min(c, lk - r0));  // state over all keys
    for (int r0 = 0; r0 < lq; r0 += c) {
      const int n = std::min(c, lq - r0);
      queries_read_state(fm, q + static_cast<int64_t>(r0) * d, n, dv, st, num.data(), false, fs);
      normalize_rows(num.data(), n, dv, out + static_cast<int64_t>(r0) * ld, den ? den + r0 : nullptr, ld);
    }
    return;
  }

  // End-aligned causal: the first `off` keys are seen by every query, i.e. they are a prefix state.
  for (int r0 = 0; r0 < off; r0 += c) add_keys(r0, std::min(c, off - r0));
  bool state_nonzero = s0 != nullptr || off > 0;
  for (int r0 = 0; r0 < lq; r0 += c) {
    const int n = std::min(c, lq - r0);
    const T* qc = q + static_cast<int64_t>(r0) * d;
    const T* kc = k + static_cast<int64_t>(off + r0) * d;
    const bool* pc = pad ? pad + off + r0 : nullptr;
    if (state_nonzero) queries_read_state(fm, qc, n, dv, st, num.data(), false, fs);  // inter-chunk: phi(Q_c) S_aug
    gemm<T>(false, true, n, n, d, tscale, qc, d, kc, d, T(0), sblk.data(), n);         // intra-chunk
    poly_rows(sblk.data(), n, n, n, 0, pc, rowsum.data());
    int ldv = ld;
    const T* vc = key_values(v + static_cast<int64_t>(off + r0) * ld, pc, n, dv, &ldv, vscratch.data());
    gemm<T>(false, false, n, dv, n, T(1), sblk.data(), n, vc, ldv, state_nonzero ? T(1) : T(0), num.data(), dv1);
    for (int r = 0; r < n; ++r) {
      T& zr = num[static_cast<size_t>(r) * dv1 + dv];
      zr = (state_nonzero ? zr : T(0)) + rowsum[r];
    }
    normalize_rows(num.data(), n, dv, out + static_cast<int64_t>(r0) * ld, den ? den + r0 : nullptr, ld);
    if (r0 + n < lq || s_out != nullptr) {  // S_aug += phi(K_c)^T [V_c | 1]
      add_keys(off + r0, n);
      state_nonzero = true;
    }
  }
}


// The linear form's backward for one (sequence, head) and a block of value columns (see backward_one):
// non-causal through the key state S_aug and the query state R_aug; causal in chunks (pass 1 forward: intra-chunk
// gradients and dq from the S_aug prefix; pass 2 backward: dk, dv from the R_aug suffix).
template <typename T>
void backward_chunked(const T* gaug, const T* q, const T* k, const T* v, const bool* pad, T* dq, T* dk,
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
  if (!causal) {
  const int c = std::min<int>(plan.chunk, std::max(lq, lk));
  FeatureScratch<T> fs(c, d, m);
  std::vector<T> vaug(static_cast<size_t>(c) * dv1), u(static_cast<size_t>(c) * m),
      saug(static_cast<size_t>(m) * dv1, T(0)), raug(static_cast<size_t>(m) * dv1, T(0));
  for (int r0 = 0; r0 < lk; r0 += c)  // S_aug over keys
    keys_into_state_aug(fm, k + static_cast<int64_t>(r0) * d, v + static_cast<int64_t>(r0) * ld,
                        pad ? pad + r0 : nullptr, std::min(c, lk - r0), dv, ld, one, saug.data(), fs, vaug.data());
  for (int r0 = 0; r0 < lq; r0 += c)  // dq, and R_aug over queries
    queries_against_state(fm, q + static_cast<int64_t>(r0) * d, gaug + static_cast<int64_t>(r0) * dv1,
                          std::min(c, lq - r0), dv, saug.data(), dq + static_cast<int64_t>(r0) * d, raug.data(), fs,
                          u.data());
  for (int r0 = 0; r0 < lk; r0 += c)  // dk, dv
    keys_against_state(fm, k + static_cast<int64_t>(r0) * d, v + static_cast<int64_t>(r0) * ld,
                       pad ? pad + r0 : nullptr, std::min(c, lk - r0), dv, ld, one, raug.data(),
                       dk + static_cast<int64_t>(r0) * d, dv_out + static_cast<int64_t>(r0) * ld, fs, vaug.data(),
                       u.data());
} else {
  const int c = plan.chunk;
  FeatureScratch<T> fs(c, d, m);
  std::vector<T> vaug(static_cast<size_t>(c) * dv1), u(static_cast<size_t>(c) * m),
      sblk(static_cast<size_t>(c) * c), dp(static_cast<size_t>(c) * c), aug(static_cast<size_t>(m) * dv1, T(0));
  // End-aligned (off > 0): the first `off` keys, seen by every query, start the S_aug prefix; in pass 2 they
  // take their gradients from the R_aug of all queries.
  auto key_grads = [&](int r0, int n) {  // dk, dv of n keys at r0 from the R_aug in `aug`
    keys_against_state(fm, k + static_cast<int64_t>(r0) * d, v + static_cast<int64_t>(r0) * ld,
                       pad ? pad + r0 : nullptr, n, dv, ld, one, aug.data(), dk + static_cast<int64_t>(r0) * d,
                       dv_out + static_cast<int64_t>(r0) * ld, fs, vaug.data(), u.data());
  };
  for (int r0 = 0; r0 < off; r0 += c)
    keys_into_state_aug(fm, k + static_cast<int64_t>(r0) * d, v + static_cast<int64_t>(r0) * ld,
                        pad ? pad + r0 : nullptr, std::min(c, off - r0), dv, ld, one, aug.data(), fs, vaug.data());
  // Pass 1, forward over chunks: intra-chunk gradients and dq's inter-chunk part (S_aug prefix in `aug`).
  for (int r0 = 0; r0 < lq; r0 += c) {
    const int n = std::min(c, lq - r0);
    const T* qc = q + static_cast<int64_t>(r0) * d;
    const T* kc = k + static_cast<int64_t>(off + r0) * d;
    const T* gc = gaug + static_cast<int64_t>(r0) * dv1;
    T* dqc = dq + static_cast<int64_t>(r0) * d;
    if (r0 > 0 || off > 0) queries_against_state(fm, qc, gc, n, dv, aug.data(), dqc, static_cast<T*>(nullptr), fs, u.data());
    build_value_aug(v + static_cast<int64_t>(off + r0) * ld, pad ? pad + off + r0 : nullptr, n, dv, vaug.data(), ld, one);
    gemm<T>(false, true, n, n, d, tscale, qc, d, kc, d, T(0), sblk.data(), n);
    gemm<T>(false, true, n, n, dv1, T(1), gc, dv1, vaug.data(), dv1, T(0), dp.data(), n);
    for (int i = 0; i < n; ++i) {
      T* srow = sblk.data() + static_cast<int64_t>(i) * n;
      T* drow = dp.data() + static_cast<int64_t>(i) * n;
      for (int j = 0; j <= i; ++j) {
        drow[j] *= T(1) + srow[j];
        srow[j] = poly(srow[j]);
      }
      std::fill(srow + i + 1, srow + n, T(0));
      std::fill(drow + i + 1, drow + n, T(0));
    }
    const int64_t kr = off + r0;  // the chunk's keys
    gemm<T>(false, false, n, d, n, tscale, dp.data(), n, kc, d, T(1), dqc, d);
    gemm<T>(true, false, n, d, n, tscale, dp.data(), n, qc, d, T(1), dk + kr * d, d);
    gemm<T>(true, false, n, dv, n, T(1), sblk.data(), n, gc, dv1, T(1), dv_out + kr * ld, ld);
    if (r0 + n < lq) {  // S_aug += phi(K_c)^T [V_c | 1] (vaug already holds the chunk's [V | one])
      fm.features(kc, n, fs.xt.data(), fs.phi.data());
      gemm<T>(false, false, m, dv1, n, T(1), fs.phi.data(), n, vaug.data(), dv1, T(1), aug.data(), dv1);
    }
  }
  // Pass 2, backward over chunks: dk's and dv's inter-chunk parts (R_aug suffix in `aug`).
  std::fill(aug.begin(), aug.end(), T(0));
  const int last = ((lq - 1) / c) * c;
  for (int r0 = last; r0 >= 0; r0 -= c) {
    const int n = std::min(c, lq - r0);
    if (r0 < last) key_grads(off + r0, n);
    if (r0 > 0 || off > 0)
      queries_against_state(fm, q + static_cast<int64_t>(r0) * d, gaug + static_cast<int64_t>(r0) * dv1, n,
                            dv, static_cast<const T*>(nullptr), static_cast<T*>(nullptr), aug.data(), fs, u.data());
  }
  for (int r0 = 0; r0 < off; r0 += c) key_grads(r0, std::min(c, off - r0));
}
}

}  // namespace
}  // namespace cpu
}  // namespace linattn_cuda
