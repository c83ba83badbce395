// Building blocks of the linear (feature-map) form, shared by the chunked forward and backward, the quadratic
// form with an initial state and the state passes: phi(K)^T [V | 1] into a state, phi(Q)^T S out of it, and their
// Jacobian-transpose products (the "phi-state update" in one home).
#pragma once

#include <vector>

#include "math.h"
#include "tasks.h"

namespace linattn_cuda {
namespace cpu {
namespace {  // internal linkage: every kernel file has its own copy

// ---------------------------------------------------------------------------------------------------------
// Linear-form building blocks, shared by the forward, the backward and the state passes. A state S_aug is an
// M x (Dv + 1) matrix (rows ldst apart): S = sum phi(k) v^T in the first Dv columns, z = sum phi(k) in the last.

// Scratch of the feature map for chunks of up to c rows.
template <typename T>
struct FeatureScratch {
  std::vector<T> xt, phi, gt, zq, red;  // x^T, phi^T, a d x c gradient scratch, two c-long row buffers
  FeatureScratch(int c, int d, int m)
      : xt(static_cast<size_t>(c) * d), phi(static_cast<size_t>(c) * m), gt(static_cast<size_t>(c) * d), zq(c), red(c) {}
};

// S_aug += phi(K)^T [V | 1] over the n keys k (rows d apart) / v (rows ld apart); padded keys add nothing.
// vscratch: n x dv. The normalizer column is kept out of the GEMM (see the forward's note above).
template <typename T>
void keys_into_state(const FeatureMap<T>& fm, const T* k, const T* v, const bool* pad, int n, int dv, int ld,
                     T* st, FeatureScratch<T>& fs, T* vscratch) {
  const int d = fm.d, m = fm.m, dv1 = dv + 1;
  fm.features(k, n, fs.xt.data(), fs.phi.data());
  zero_padded_columns(fs.phi.data(), m, n, pad);
  int ldv = ld;
  const T* vc = key_values(v, pad, n, dv, &ldv, vscratch);
  gemm<T>(false, false, m, dv, n, T(1), fs.phi.data(), n, vc, ldv, T(1), st, dv1);
  add_feature_sums(fs.phi.data(), m, n, st + dv, dv1);
  (void)d;
}

// num = phi(Q)^T S_aug (n x (Dv + 1), the normalizer last; beta = 1 adds to num) for n queries q (rows d apart).
template <typename T>
void queries_read_state(const FeatureMap<T>& fm, const T* q, int n, int dv, const T* st, T* num, bool add,
                        FeatureScratch<T>& fs) {
  const int m = fm.m, dv1 = dv + 1;
  fm.features(q, n, fs.xt.data(), fs.phi.data());
  gemm<T>(true, false, n, dv, m, T(1), fs.phi.data(), n, st, dv1, add ? T(1) : T(0), num, dv1);
  project_normalizer(fs.phi.data(), m, n, st + dv, dv1, fs.zq.data(), 1, fs.red.data());
  for (int r = 0; r < n; ++r) {
    T& z = num[static_cast<int64_t>(r) * dv1 + dv];
    z = (add ? z : T(0)) + fs.zq[r];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward building blocks. With G_i = [dO_i / Z_i | -delta_i] (delta_i = dO_i . out_i / Z_i) and [v_j | 1]:
//   dw_ij = G_i . [v_j | 1];  in the linear form, for a state S_aug the queries read and a state R_aug of queries
//   the keys feed:  dq_i += J_phi(q_i)^T (S_aug G_i),  R_aug += phi(q_i) G_i^T,
//                   dk_j += J_phi(k_j)^T (R_aug [v_j | 1]),  dv_j += phi(k_j)^T R_aug[:, :Dv]   (padded keys: 0).

// G of lq queries (an lq x (Dv+1) buffer) for the value columns [c0, c0 + dv) of rows ld apart; delta sums over
// all ld columns and is carried by the block with `norm` (the others get a 0 normalizer column).
template <typename T>
void build_gaug(const T* g, const T* out, const T* den, int lq, int dv, int ld, int c0, bool norm, T* gaug) {
  const int dv1 = dv + 1;
  for (int i = 0; i < lq; ++i) {
    const T z = den[i];
    const T inv = z != T(0) ? T(1) / z : T(0);
    const T* gi = g + static_cast<int64_t>(i) * ld;
    const T* oi = out + static_cast<int64_t>(i) * ld;
    T* gr = gaug + static_cast<int64_t>(i) * dv1;
    T delta = T(0);
    if (norm) {
      for (int c = 0; c < ld; ++c) delta += gi[c] * oi[c];
    }
    for (int c = 0; c < dv; ++c) gr[c] = gi[c0 + c] * inv;
    gr[dv] = -delta * inv;
  }
}

// S_aug += phi(K)^T [V | one] over n keys (the backward's form: one GEMM over Dv + 1 columns; vaug: n x (Dv+1)).
template <typename T>
void keys_into_state_aug(const FeatureMap<T>& fm, const T* k, const T* v, const bool* pad, int n, int dv, int ld,
                         T one, T* st, FeatureScratch<T>& fs, T* vaug) {
  const int dv1 = dv + 1;
  fm.features(k, n, fs.xt.data(), fs.phi.data());
  build_value_aug(v, pad, n, dv, vaug, ld, one);
  gemm<T>(false, false, fm.m, dv1, n, T(1), fs.phi.data(), n, vaug, dv1, T(1), st, dv1);
}

// For n queries q with G rows gaug: dq += J_phi(Q)^T (S_aug G^T) when s_aug is given, and R_aug += phi(Q)^T G when
// r_aug is (u: an m x n scratch).
template <typename T>
void queries_against_state(const FeatureMap<T>& fm, const T* q, const T* gaug, int n, int dv, const T* s_aug,
                           T* dq, T* r_aug, FeatureScratch<T>& fs, T* u) {
  const int dv1 = dv + 1, m = fm.m;
  if (r_aug != nullptr) {
    fm.features(q, n, fs.xt.data(), fs.phi.data());
  } else {
    fm.transpose_in(q, n, fs.xt.data());  // J_phi needs x only
  }
  if (s_aug != nullptr) {
    gemm<T>(false, true, m, n, dv1, T(1), s_aug, dv1, gaug, dv1, T(0), u, n);
    fm.backprop(fs.xt.data(), u, n, fs.gt.data(), dq);
  }
  if (r_aug != nullptr) gemm<T>(false, false, m, dv1, n, T(1), fs.phi.data(), n, gaug, dv1, T(1), r_aug, dv1);
}

// For n keys k / v (rows ld apart, `one` in the normalizer column): dk += J_phi(K)^T (R_aug [V | one]^T) and
// dv += phi(K)^T R_aug[:, :Dv] (dv rows ld apart); padded keys get nothing.
template <typename T>
void keys_against_state(const FeatureMap<T>& fm, const T* k, const T* v, const bool* pad, int n, int dv, int ld,
                        T one, const T* r_aug, T* dk, T* dv_out, FeatureScratch<T>& fs, T* vaug, T* u) {
  const int dv1 = dv + 1, m = fm.m;
  fm.features(k, n, fs.xt.data(), fs.phi.data());
  zero_padded_columns(fs.phi.data(), m, n, pad);
  build_value_aug(v, pad, n, dv, vaug, ld, one);
  gemm<T>(true, false, n, dv, m, T(1), fs.phi.data(), n, r_aug, dv1, T(1), dv_out, ld);
  gemm<T>(false, true, m, n, dv1, T(1), r_aug, dv1, vaug, dv1, T(0), u, n);
  fm.backprop(fs.xt.data(), u, n, fs.gt.data(), dk);
}

}  // namespace
}  // namespace cpu
}  // namespace linattn_cuda
