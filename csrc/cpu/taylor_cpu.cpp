// Fused C++ CPU kernels of second-order Taylor attention (schemas in csrc/ops.cpp).
//
// Every (sequence, head) pair is an independent task -- a sequence is one batch entry of a dense [B, H, L, *]
// call or one packed sequence of a varlen call (struct Problem) -- and tasks run in parallel, longest first.
// Grouped-query attention: query head h reads key/value head h / (H / Hkv) in place; the backward and the
// prefill run a key/value head's query heads in one task, so that dk, dv and the state add up without races.
// Causal with Lq < Lk is end-aligned: the first Lk - Lq keys, seen by every query, are a prefix state.
// Inside a task the sequence is processed in chunks of C tokens with GEMM-shaped loops (the BLAS sgemm
// / dgemm that torch links, called directly without tensor overhead):
//
//   * quadratic form, per chunk of queries:  S = scale Q K^T,  P = 1 + S + S^2/2,  [N | z] = P [V | 1]
//   * linear form: the state S_aug = sum_j phi(k_j) [v_j | 1]^T  (M x (Dv+1): kv and k_sum side by side),
//     out = phi(Q) S_aug; causal = quadratic inside a chunk + the state of the chunks before it.
//
// phi (symmetric map, feature order of linattn_cuda/feature_map.py) is built per chunk in a C x M scratch
// buffer that stays in cache; no L x M matrix is ever written. Padded keys are handled by zeroing their row
// of [V | 1], which removes them from numerator, normalizer and state at once. Accumulation and the final
// division happen in float32 (float64 for float64 inputs); the output is cast to the input dtype last.
//
// Backward (w = 1 + s + s^2/2, out_i = N_i / Z_i): with G_i = [dO_i / Z_i | -delta_i], delta_i = dO_i.out_i/Z_i,
//   dw_ij = G_i . [v_j | 1],  dS_ij = dw_ij (1 + s_ij),  dq = scale dS K,  dk = scale dS^T Q,  dv = P^T G[:, :Dv]
// and in the linear form dq_i = J_phi(q_i)^T (S_aug G_i), dk_j = J_phi(k_j)^T (R_aug [v_j | 1]),
// dv_j = phi(k_j)^T R_aug[:, :Dv] with R_aug = sum over later queries of phi(q_i) G_i^T.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include "../include/problem.h"
#include "math.h"
#include "tasks.h"

namespace linattn_cuda {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Which algorithm and chunk size, per shape. Measured on a 2-core Xeon (Sapphire Rapids) with MKL:
// see bench/results and the README; overridable with LINATTN_CPU_CHUNK / LINATTN_CPU_QUADRATIC_MAX.
struct Plan {
  bool quadratic;  // quadratic form over all visible keys (blocks of `chunk` queries), else the linear form
  int chunk;       // tokens per chunk
};

// LINATTN_CPU_FORM = "quadratic" | "linear" forces a form (tests, benchmarks); unset = per-shape choice.
int forced_form() {
  const char* value = std::getenv("LINATTN_CPU_FORM");
  if (value == nullptr) return 0;
  const std::string form(value);
  if (form == "quadratic") return 1;
  if (form == "linear") return 2;
  TORCH_CHECK(form.empty() || form == "auto", "LINATTN_CPU_FORM must be 'quadratic', 'linear' or 'auto', got '",
              form, "'");
  return 0;
}

Plan make_plan(const Shape& s, bool causal) {
  const int form = forced_form();
  const int64_t m = 1 + s.d + s.d * (s.d + 1) / 2;
  const int64_t dv1 = s.dv + 1;
  // Chunk lengths measured best on the reference machine (fwd and bwd, D=16, Dv=64, L=4096, one core).
  const int64_t chunk = env_int("LINATTN_CPU_CHUNK", causal ? 64 : 256);
  if (causal) {
    // End-aligned (Lq < Lk): the first Lk - Lq keys are seen by every query; the quadratic form pays for them
    // per query, the linear form once (a state), so the FLOP rule below decides when there are any.
    const int64_t quad_max = env_int("LINATTN_CPU_QUADRATIC_MAX", 256);
    const int64_t off = s.lk - s.lq;
    const double quad = 2.0 * s.lq * (off + 0.5 * s.lq) * (s.d + dv1);
    const double lin = 2.0 * (s.lk + 2 * s.lq) * m * dv1;
    // Large head dims (M grows as D^2 / 2) make the quadratic form the cheaper one at any length seen in practice.
    const bool quadratic =
        form == 0 ? ((s.lq <= quad_max && (off == 0 || quad <= 2.0 * lin)) || 4.0 * quad <= lin) : form == 1;
    if (quadratic) return {true, static_cast<int>(std::clamp<int64_t>(s.lq, 1, 256))};
    return {false, static_cast<int>(chunk)};
  }
  // Non-causal: FLOPs of each form; the quadratic form runs closer to peak, hence the factor 2.
  const double quad = 2.0 * s.lq * s.lk * (s.d + dv1);
  const double lin = 2.0 * (s.lq + s.lk) * m * dv1;
  const bool quadratic = form == 0 ? ((s.lk <= 4096 && quad <= 2.0 * lin) || 4.0 * quad <= lin) : form == 1;
  return {quadratic, static_cast<int>(chunk)};
}

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
// Forward for one (sequence, head) and the value columns [c0, c0 + s.dv) of a value matrix with rows ld apart
// (v and out point at column c0; ld = s.dv unless the value columns are split across tasks, see run_forward).
// den may be null (a task that is not the first of its head). s0 (M x (Dv+1), or null) is an initial state: every
// query sees it. s_out (causal linear form only, or null) receives the final state (s0 plus every key); it may be
// s0 itself. Causal with Lq < Lk is end-aligned: query i sees the keys j <= i + Lk - Lq.
template <typename T>
void forward_one(const T* q, const T* k, const T* v, const bool* pad, T* out, T* den, const Shape& s, bool causal,
                 double scale, const Plan& plan, const T* s0, T* s_out, int ld) {
  const int d = static_cast<int>(s.d), dv = static_cast<int>(s.dv), dv1 = dv + 1;
  const FeatureMap<T> fm(d, scale);
  const int m = fm.m;
  const T tscale = static_cast<T>(scale);
  const int lq = static_cast<int>(s.lq), lk = static_cast<int>(s.lk);
  const int off = causal ? lk - lq : 0;  // keys every query of a causal problem sees
  // num: n x (Dv + 1) rows, the numerator in the first Dv columns and the normalizer in the last

  if (plan.quadratic) {
    TORCH_CHECK(s_out == nullptr, "internal: the quadratic form builds no state");
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
    return;
  }

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

// ---------------------------------------------------------------------------------------------------------
// Backward for one (sequence, head) and the value columns [c0, c0 + s.dv) of value matrices with rows ld apart
// (g, out, v and dv_out point at the head's column 0; ld = s.dv unless the columns are split across tasks, see
// run_backward). dq, dk and dv_out (zero-initialised by the caller) receive this block's share, added: dw_ij
// sums over the value columns (and the normalizer column, which the block with `norm` carries), so the blocks'
// dq and dk add up to the gradients; dv_out receives the block's own columns. Adding also sums dk and dv over
// the query heads that share a key/value head (grouped-query attention: the caller runs them one after another).
// An initial state's part of the gradients is left to the state passes (run_state_backward).
template <typename T>
void backward_one(const T* g, const T* q, const T* k, const T* v, const bool* pad, const T* out, const T* den,
                  T* dq, T* dk, T* dv_out, const Shape& s, bool causal, double scale, const Plan& plan, int ld = -1,
                  int c0 = 0, bool norm = true) {
  const int d = static_cast<int>(s.d), dv = static_cast<int>(s.dv), dv1 = dv + 1;
  if (ld < 0) ld = dv;
  const FeatureMap<T> fm(d, scale);
  const int m = fm.m;
  const T tscale = static_cast<T>(scale);
  const int lq = static_cast<int>(s.lq), lk = static_cast<int>(s.lk);
  const T one = norm ? T(1) : T(0);  // the normalizer column of [v | 1]: 0 in blocks without it
  v += c0;
  dv_out += c0;
  std::vector<T> gaug(static_cast<size_t>(lq) * dv1);
  build_gaug(g, out, den, lq, dv, ld, c0, norm, gaug.data());

  const int off = causal ? lk - lq : 0;  // end-aligned causal: query i sees the keys j <= i + off
  if (plan.quadratic) {
    const int c = std::min(plan.chunk, lq);
    std::vector<T> vaug(static_cast<size_t>(lk) * dv1), sblk(static_cast<size_t>(c) * lk),
        dp(static_cast<size_t>(c) * lk);
    build_value_aug(v, pad, lk, dv, vaug.data(), ld, one);
    for (int r0 = 0; r0 < lq; r0 += c) {
      const int n = std::min(c, lq - r0);
      const int kend = causal ? std::min(lk, r0 + n + off) : lk;  // the keys this block of queries sees
      const T* qc = q + static_cast<int64_t>(r0) * d;
      const T* gc = gaug.data() + static_cast<int64_t>(r0) * dv1;
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
  } else if (!causal) {
    const int c = std::min<int>(plan.chunk, std::max(lq, lk));
    FeatureScratch<T> fs(c, d, m);
    std::vector<T> vaug(static_cast<size_t>(c) * dv1), u(static_cast<size_t>(c) * m),
        saug(static_cast<size_t>(m) * dv1, T(0)), raug(static_cast<size_t>(m) * dv1, T(0));
    for (int r0 = 0; r0 < lk; r0 += c)  // S_aug over keys
      keys_into_state_aug(fm, k + static_cast<int64_t>(r0) * d, v + static_cast<int64_t>(r0) * ld,
                          pad ? pad + r0 : nullptr, std::min(c, lk - r0), dv, ld, one, saug.data(), fs, vaug.data());
    for (int r0 = 0; r0 < lq; r0 += c)  // dq, and R_aug over queries
      queries_against_state(fm, q + static_cast<int64_t>(r0) * d, gaug.data() + static_cast<int64_t>(r0) * dv1,
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
      const T* gc = gaug.data() + static_cast<int64_t>(r0) * dv1;
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
        queries_against_state(fm, q + static_cast<int64_t>(r0) * d, gaug.data() + static_cast<int64_t>(r0) * dv1, n,
                              dv, static_cast<const T*>(nullptr), static_cast<T*>(nullptr), aug.data(), fs, u.data());
    }
    for (int r0 = 0; r0 < off; r0 += c) key_grads(r0, std::min(c, off - r0));
  }
  if (pad != nullptr) {  // padded keys get no gradient
    for (int j = 0; j < lk; ++j) {
      if (!pad[j]) continue;
      std::fill(dk + static_cast<int64_t>(j) * d, dk + static_cast<int64_t>(j + 1) * d, T(0));
      std::fill(dv_out + static_cast<int64_t>(j) * ld, dv_out + static_cast<int64_t>(j) * ld + dv, T(0));
    }
  }
}

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

// ---------------------------------------------------------------------------------------------------------
// The kernels over a call's tasks. q, k, v (and grad_out, out, den) are head-major buffers in the accumulation
// type; mask is a dense problem's [B, Lk] key padding mask or undefined. A state travels as one
// [N, Hkv, M, Dv + 1] "aug" tensor (kv columns, then k_sum); a column block of width w uses the [.., w + 1]
// tensor of its columns and k_sum (state_block).

at::Tensor state_block(const at::Tensor& aug, int64_t c0, int64_t w) {
  const int64_t dv = aug.size(-1) - 1;
  return at::cat({aug.narrow(-1, c0, w), aug.narrow(-1, dv, 1)}, -1).contiguous();
}

// The aug tensor of every column block of cs (empty when there is no state).
std::vector<at::Tensor> state_blocks(const at::Tensor& aug, const ColumnSplit& cs) {
  std::vector<at::Tensor> blocks;
  if (!aug.defined()) return blocks;
  for (int64_t block = 0; block < cs.count; ++block) blocks.push_back(state_block(aug, cs.start(block), cs.size(block)));
  return blocks;
}

// The [N, Hkv, M, Dv + 1] aug tensor from the blocks of cs (each carries k_sum; block 0's is kept).
at::Tensor join_state_blocks(const std::vector<at::Tensor>& blocks, const ColumnSplit& cs) {
  std::vector<at::Tensor> parts;
  for (int64_t block = 0; block < cs.count; ++block) parts.push_back(blocks[block].narrow(-1, 0, cs.size(block)));
  parts.push_back(blocks[0].narrow(-1, cs.size(0), 1));
  return at::cat(parts, -1).contiguous();
}

template <typename T>
T* state_ptr(const std::vector<at::Tensor>& blocks, int64_t block, int64_t n, int64_t hk, int64_t kv_heads) {
  if (blocks.empty()) return nullptr;
  const at::Tensor& b = blocks[block];
  return b.data_ptr<T>() + (n * kv_heads + hk) * b.size(2) * b.size(3);
}

// out [rows, Dv], den [rows] of the query rows; s0: the initial state (aug) or undefined.
void run_forward(const Tasks& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                 const at::Tensor& s0, const at::Tensor& out, const at::Tensor& den, bool causal, double scale) {
  if (out.numel() == 0) {
    if (den.numel() > 0 && !s0.defined()) den.zero_();  // Dv == 0: no output columns, the normalizer still defined
    if (den.numel() == 0 || !s0.defined()) return;
  }
  // With fewer tasks than threads, split the value columns too: each task owns a block of output columns
  // (and recomputes the normalizer, written by the first block only). Blocks of >= 16 columns.
  const ColumnSplit cs = column_split(p.seqs * p.heads, p.dv);
  const std::vector<at::Tensor> s0b = state_blocks(s0, cs);
  const int64_t group = p.group();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "taylor_fwd_cpu", [&] {
    for_each_task(p, p.heads, cs, [&](int64_t n, int64_t h, int64_t block) {
      const int64_t qr = p.q.row(n, h), kr = p.k.row(n, h / group), c0 = cs.start(block);
      const Shape part = p.shape(n, cs.size(block));
      scalar_t* o = out.data_ptr<scalar_t>() + qr * p.dv + c0;
      scalar_t* z = block == 0 ? den.data_ptr<scalar_t>() + qr : nullptr;
      const scalar_t* st = state_ptr<scalar_t>(s0b, block, n, h / group, p.kv_heads);
      if (part.lk == 0 && st == nullptr) {  // no key: defined as 0
        for (int64_t i = 0; i < part.lq; ++i) std::fill(o + i * p.dv, o + i * p.dv + part.dv, scalar_t(0));
        if (z != nullptr) std::fill(z, z + part.lq, scalar_t(0));
        return;
      }
      if (part.lq == 0) return;
      forward_one<scalar_t>(q.data_ptr<scalar_t>() + qr * p.d, k.data_ptr<scalar_t>() + kr * p.d,
                            v.data_ptr<scalar_t>() + kr * p.dv + c0, mask_ptr(mask, n, part.lk), o, z, part, causal,
                            scale, make_plan(p.shape(n, p.dv), causal), st, nullptr, static_cast<int>(p.dv));
    });
  });
}

// Causal forward that also returns the final state of every (sequence, key/value head) (aug, in the accumulation
// type), from the initial state s0 (aug) or zeros; out [rows, Dv], den [rows].
at::Tensor run_prefill(const Tasks& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& mask, const at::Tensor& s0, const at::Tensor& out, const at::Tensor& den,
                       double scale) {
  const int64_t m = 1 + p.d + p.d * (p.d + 1) / 2, group = p.group();
  // A task per (sequence, key/value head, column block), as in the backward: the state belongs to the key/value
  // head, so the group's query heads run one after another and the last one builds the final state.
  const ColumnSplit cs = column_split(p.seqs * p.kv_heads, p.dv);
  const std::vector<at::Tensor> s0b = state_blocks(s0, cs);
  std::vector<at::Tensor> states;
  for (int64_t block = 0; block < cs.count; ++block)
    states.push_back(at::empty({p.seqs, p.kv_heads, m, cs.size(block) + 1}, q.options()));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "taylor_prefill_cpu", [&] {
    for_each_task(p, p.kv_heads, cs, [&](int64_t n, int64_t hk, int64_t block) {
      const Shape part = p.shape(n, cs.size(block));
      const int64_t w = part.dv, kr = p.k.row(n, hk), c0 = cs.start(block);
      Plan plan = make_plan(p.shape(n, p.dv), true);
      plan.quadratic = false;
      plan.chunk = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(plan.chunk, part.lk)));
      scalar_t* st = state_ptr<scalar_t>(states, block, n, hk, p.kv_heads);
      const scalar_t* init = state_ptr<scalar_t>(s0b, block, n, hk, p.kv_heads);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const bool last = h == (hk + 1) * group - 1;
        if (!last && part.lq == 0) continue;
        const int64_t qr = p.q.row(n, h);
        forward_one<scalar_t>(q.data_ptr<scalar_t>() + qr * p.d, k.data_ptr<scalar_t>() + kr * p.d,
                              v.data_ptr<scalar_t>() + kr * p.dv + c0, mask_ptr(mask, n, part.lk),
                              out.data_ptr<scalar_t>() + qr * p.dv + c0,
                              block == 0 ? den.data_ptr<scalar_t>() + qr : nullptr, part, true, scale, plan, init,
                              last ? st : nullptr, static_cast<int>(p.dv));
      }
      (void)w;
    });
  });
  return join_state_blocks(states, cs);
}

// The state of every (sequence, key/value head) after all its keys: s0 (aug) or zeros plus phi(K)^T [V | 1].
at::Tensor run_state(const Tasks& p, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                     const at::Tensor& s0, double scale) {
  const int64_t m = 1 + p.d + p.d * (p.d + 1) / 2;
  const ColumnSplit cs = column_split(p.seqs * p.kv_heads, p.dv);
  std::vector<at::Tensor> states = state_blocks(s0, cs);
  if (states.empty()) {
    for (int64_t block = 0; block < cs.count; ++block)
      states.push_back(at::zeros({p.seqs, p.kv_heads, m, cs.size(block) + 1}, k.options()));
  }
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "taylor_state_cpu", [&] {
    for_each_task(p, p.kv_heads, cs, [&](int64_t n, int64_t hk, int64_t block) {
      const int lk = static_cast<int>(p.k.len[n]), w = static_cast<int>(cs.size(block));
      if (lk == 0) return;
      const int c = std::min(lk, static_cast<int>(env_int("LINATTN_CPU_CHUNK", 64)));
      const FeatureMap<scalar_t> fm(static_cast<int>(p.d), scale);
      FeatureScratch<scalar_t> fs(c, fm.d, fm.m);
      std::vector<scalar_t> vscratch(mask.defined() ? static_cast<size_t>(c) * w : 0);
      const int64_t kr = p.k.row(n, hk);
      const bool* pad = mask_ptr(mask, n, lk);
      scalar_t* st = state_ptr<scalar_t>(states, block, n, hk, p.kv_heads);
      for (int r0 = 0; r0 < lk; r0 += c)
        keys_into_state(fm, k.data_ptr<scalar_t>() + (kr + r0) * p.d,
                        v.data_ptr<scalar_t>() + (kr + r0) * p.dv + cs.start(block), pad ? pad + r0 : nullptr,
                        std::min(c, lk - r0), w, static_cast<int>(p.dv), st, fs, vscratch.data());
    });
  });
  return join_state_blocks(states, cs);
}

// dq, dk, dv zero-initialised, head-major like q, k, v.
void run_backward(const Tasks& p, const at::Tensor& g, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& mask, const at::Tensor& out, const at::Tensor& den,
                  const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, bool causal, double scale) {
  if (q.numel() == 0 || k.numel() == 0 || out.numel() == 0) return;
  // A task per (sequence, key/value head, column block): it owns that head's dk and dv and runs the query heads
  // of its group one after another, so that their dk and dv add up without races. With fewer tasks than
  // threads the value columns are split as in the forward: each block adds its share of dq and dk to a buffer
  // of its own (block 0: dq, dk), summed after.
  const ColumnSplit cs = column_split(p.seqs * p.kv_heads, p.dv);
  const int64_t group = p.group();
  at::Tensor dq_part, dk_part;
  if (cs.count > 1) {
    dq_part = at::zeros({cs.count - 1, dq.numel()}, dq.options());
    dk_part = at::zeros({cs.count - 1, dk.numel()}, dk.options());
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "taylor_bwd_cpu", [&] {
    for_each_task(p, p.kv_heads, cs, [&](int64_t n, int64_t hk, int64_t block) {
      const Shape part = p.shape(n, cs.size(block));
      if (part.lq == 0 || part.lk == 0) return;  // no query or no key: zero gradients
      const Plan plan = make_plan(p.shape(n, p.dv), causal);
      scalar_t* dq_out = block == 0 ? dq.data_ptr<scalar_t>() : dq_part.data_ptr<scalar_t>() + (block - 1) * dq.numel();
      scalar_t* dk_out = block == 0 ? dk.data_ptr<scalar_t>() : dk_part.data_ptr<scalar_t>() + (block - 1) * dk.numel();
      const int64_t kr = p.k.row(n, hk);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const int64_t qr = p.q.row(n, h);
        backward_one<scalar_t>(g.data_ptr<scalar_t>() + qr * p.dv, q.data_ptr<scalar_t>() + qr * p.d,
                               k.data_ptr<scalar_t>() + kr * p.d, v.data_ptr<scalar_t>() + kr * p.dv,
                               mask_ptr(mask, n, part.lk), out.data_ptr<scalar_t>() + qr * p.dv,
                               den.data_ptr<scalar_t>() + qr, dq_out + qr * p.d, dk_out + kr * p.d,
                               dv.data_ptr<scalar_t>() + kr * p.dv, part, causal, scale, plan, static_cast<int>(p.dv),
                               static_cast<int>(cs.start(block)), block == 0);
      }
    });
  });
  if (cs.count > 1) {
    dq.view(-1).add_(dq_part.sum(0));
    dk.view(-1).add_(dk_part.sum(0));
  }
}

// The gradient's state parts, after run_backward: with an initial state s0 (aug), dq += J_phi(q)^T (S0_aug G) and
// dS0 = sum over the group's queries of phi(q) G^T; with the gradient dsf (aug) of the final state (s0 plus every
// key), dk, dv += its part (the keys as if read by one more query) and dS0 += dsf. Returns dS0 (aug) or undefined.
at::Tensor run_state_backward(const Tasks& p, const at::Tensor& g, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& mask, const at::Tensor& out, const at::Tensor& den,
                              const at::Tensor& s0, const at::Tensor& dsf, const at::Tensor& dq, const at::Tensor& dk,
                              const at::Tensor& dv, double scale) {
  const int64_t m = 1 + p.d + p.d * (p.d + 1) / 2, group = p.group(), dv1 = p.dv + 1;
  at::Tensor ds0 = s0.defined() ? at::zeros({p.seqs, p.kv_heads, m, dv1}, q.options()) : at::Tensor();
  const ColumnSplit whole{1, p.dv, p.dv};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "taylor_state_bwd_cpu", [&] {
    for_each_task(p, p.kv_heads, whole, [&](int64_t n, int64_t hk, int64_t) {
      const int lq = static_cast<int>(p.q.len[n]), lk = static_cast<int>(p.k.len[n]), d = static_cast<int>(p.d);
      const int dvi = static_cast<int>(p.dv);
      const int c = std::max(1, std::min(std::max(lq, lk), static_cast<int>(env_int("LINATTN_CPU_CHUNK", 64))));
      const FeatureMap<scalar_t> fm(d, scale);
      FeatureScratch<scalar_t> fs(c, d, fm.m);
      std::vector<scalar_t> u(static_cast<size_t>(c) * fm.m), vaug(static_cast<size_t>(c) * dv1);
      const int64_t off = (n * p.kv_heads + hk) * m * dv1;
      if (s0.defined() && lq > 0) {
        std::vector<scalar_t> gaug(static_cast<size_t>(lq) * dv1);
        const scalar_t* s0p = s0.data_ptr<scalar_t>() + off;
        scalar_t* r = ds0.data_ptr<scalar_t>() + off;
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const int64_t qr = p.q.row(n, h);
          build_gaug(g.data_ptr<scalar_t>() + qr * p.dv, out.data_ptr<scalar_t>() + qr * p.dv,
                     den.data_ptr<scalar_t>() + qr, lq, dvi, dvi, 0, true, gaug.data());
          for (int r0 = 0; r0 < lq; r0 += c)
            queries_against_state(fm, q.data_ptr<scalar_t>() + (qr + r0) * p.d, gaug.data() + static_cast<int64_t>(r0) * dv1,
                                  std::min(c, lq - r0), dvi, s0p, dq.data_ptr<scalar_t>() + (qr + r0) * p.d, r, fs,
                                  u.data());
        }
      }
      if (dsf.defined()) {
        const scalar_t* dsp = dsf.data_ptr<scalar_t>() + off;
        const int64_t kr = p.k.row(n, hk);
        const bool* pad = mask_ptr(mask, n, lk);
        for (int r0 = 0; r0 < lk; r0 += c)
          keys_against_state(fm, k.data_ptr<scalar_t>() + (kr + r0) * p.d, v.data_ptr<scalar_t>() + (kr + r0) * p.dv,
                             pad ? pad + r0 : nullptr, std::min(c, lk - r0), dvi, dvi, scalar_t(1), dsp,
                             dk.data_ptr<scalar_t>() + (kr + r0) * p.d, dv.data_ptr<scalar_t>() + (kr + r0) * p.dv, fs,
                             vaug.data(), u.data());
        if (ds0.defined()) {
          scalar_t* r = ds0.data_ptr<scalar_t>() + off;
          for (int64_t i = 0; i < m * dv1; ++i) r[i] += dsp[i];
        }
      }
    });
  });
  return ds0;
}

// ---------------------------------------------------------------------------------------------------------
// The ops (schemas in csrc/ops.cpp). Dense [B, H, L, *] inputs are used as they are (made contiguous in the
// accumulation type); packed [T, H, *] ones are transposed to head-major [H, T, *] buffers (one copy each).

at::ScalarType compute_type(const Problem& desc) {
  return desc.dtype == at::kDouble || desc.state_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor to_buffer(const Problem& desc, const at::Tensor& x, at::ScalarType acc) {
  return desc.packed ? head_major(x, acc) : x.to(acc).contiguous();
}

at::Tensor from_buffer(const Problem& desc, const at::Tensor& x, at::ScalarType dt) {
  return desc.packed ? token_major(x, dt) : x.to(dt);
}

Tasks make_tasks(const Problem& desc, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const c10::optional<at::Tensor>& cu_q, const c10::optional<at::Tensor>& cu_k) {
  return desc.packed ? packed_tasks(q, k, v, *cu_q, *cu_k, desc.causal) : dense_tasks(q, k, v);
}

// [N, Hkv, M, Dv + 1] from a state (kv, k_sum) or undefined.
at::Tensor join_state(const c10::optional<at::Tensor>& kv, const c10::optional<at::Tensor>& k_sum, at::ScalarType acc) {
  if (!kv.has_value()) return at::Tensor();
  return at::cat({kv->to(acc), k_sum->to(acc).unsqueeze(-1)}, -1).contiguous();
}

std::tuple<at::Tensor, at::Tensor> split_state(const at::Tensor& aug, at::ScalarType dt) {
  const int64_t dv = aug.size(-1) - 1;
  return {aug.narrow(-1, 0, dv).to(dt).contiguous(), aug.select(-1, dv).to(dt).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> taylor_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const c10::optional<at::Tensor>& mask_in,
    const c10::optional<at::Tensor>& cu_q, const c10::optional<at::Tensor>& cu_k, const c10::optional<at::Tensor>& kv0,
    const c10::optional<at::Tensor>& k_sum0, bool causal, double scale, bool return_state) {
  const Problem desc = describe_problem(q_in, k_in, v_in, mask_in, cu_q, cu_k, kv0, k_sum0, causal, scale, kCpuLimits);
  const Tasks tasks = make_tasks(desc, q_in, k_in, v_in, cu_q, cu_k);
  const auto acc = compute_type(desc);
  const at::Tensor q = to_buffer(desc, q_in, acc), k = to_buffer(desc, k_in, acc), v = to_buffer(desc, v_in, acc);
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const at::Tensor s0 = join_state(kv0, k_sum0, acc);
  // head-major buffers: out [.., Lq, Dv] (dense) / [H, Tq, Dv] (packed), den [.., Lq] / [H, Tq]
  const auto opt = q.options();
  at::Tensor out = desc.packed ? at::empty({desc.heads, desc.lq, desc.dv}, opt) : at::empty(desc.out_shape(), opt);
  at::Tensor den = desc.packed ? at::empty({desc.heads, desc.lq}, opt) : at::empty(desc.den_shape(), opt);
  at::Tensor state;
  if (return_state && causal) {
    state = run_prefill(tasks, q, k, v, mask, s0, out, den, scale);
  } else {
    run_forward(tasks, q, k, v, mask, s0, out, den, causal, scale);
    if (return_state) state = run_state(tasks, k, v, mask, s0, scale);
  }
  const auto den_acc = accumulate_type(desc.dtype);
  at::Tensor den_out = (desc.packed ? den.t() : den).to(den_acc).contiguous();
  at::Tensor kv_out = at::empty({0}, opt.dtype(desc.state_dtype)), ks_out = at::empty({0}, opt.dtype(desc.state_dtype));
  if (state.defined()) std::tie(kv_out, ks_out) = split_state(state, desc.state_dtype);
  return {from_buffer(desc, out, desc.dtype), den_out, kv_out, ks_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> taylor_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_kv, const c10::optional<at::Tensor>& grad_k_sum,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const c10::optional<at::Tensor>& mask_in,
    const c10::optional<at::Tensor>& cu_q, const c10::optional<at::Tensor>& cu_k, const c10::optional<at::Tensor>& kv0,
    const c10::optional<at::Tensor>& k_sum0, const at::Tensor& out_in, const at::Tensor& den_in, bool causal,
    double scale) {
  const Problem desc = describe_problem(q_in, k_in, v_in, mask_in, cu_q, cu_k, kv0, k_sum0, causal, scale, kCpuLimits);
  check_backward(desc, q_in, grad_out, out_in, den_in, grad_kv, grad_k_sum);
  const Tasks tasks = make_tasks(desc, q_in, k_in, v_in, cu_q, cu_k);
  const auto acc = compute_type(desc);
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  at::Tensor q = to_buffer(desc, q_in, acc), k = to_buffer(desc, k_in, acc), v = to_buffer(desc, v_in, acc);
  if (mask.defined()) {  // padded keys hold anything (NaN, inf): zero them, so that 0 * x stays 0 below
    const at::Tensor pad = mask.view({mask.size(0), 1, mask.size(1), 1});
    k = k.masked_fill(pad, 0);
    v = v.masked_fill(pad, 0);
  }
  const at::Tensor g = to_buffer(desc, grad_out, acc), out = to_buffer(desc, out_in, acc);
  const at::Tensor den = (desc.packed ? den_in.t() : den_in).to(acc).contiguous();
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  run_backward(tasks, g, q, k, v, mask, out, den, dq, dk, dv, causal, scale);
  const at::Tensor s0 = join_state(kv0, k_sum0, acc), dsf = join_state(grad_kv, grad_k_sum, acc);
  at::Tensor ds0;
  if (s0.defined() || dsf.defined())
    ds0 = run_state_backward(tasks, g, q, k, v, mask, out, den, s0, dsf, dq, dk, dv, scale);
  // Contiguous gradients, as the CUDA kernels and the fake kernel (linattn_cuda/ops/taylor/registration.py) give.
  const auto dt = desc.dtype;
  at::Tensor dkv0 = at::empty({0}, q.options().dtype(desc.state_dtype)), dks0 = at::empty_like(dkv0);  // no aliasing
  if (ds0.defined()) std::tie(dkv0, dks0) = split_state(ds0, desc.state_dtype);
  return {from_buffer(desc, dq, dt), from_buffer(desc, dk, dt), from_buffer(desc, dv, dt), dkv0, dks0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> taylor_step_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                               const at::Tensor& v_in, const at::Tensor& kv_in,
                                                               const at::Tensor& k_sum_in, double scale) {
  const Problem desc = describe_step(q_in, k_in, v_in, kv_in, k_sum_in, scale, kCpuLimits);
  const int64_t b = desc.seqs, h = desc.heads, hk = desc.kv_heads, d = desc.d, dv = desc.dv;
  const int64_t m = desc.features(), group = desc.group();
  const auto acc = kv_in.scalar_type();
  const at::Tensor q = q_in.to(acc).contiguous(), k = k_in.to(acc).contiguous(), v = v_in.to(acc).contiguous();
  const at::Tensor kv = kv_in.contiguous(), k_sum = k_sum_in.contiguous();
  at::Tensor kv_out = at::empty_like(kv), k_sum_out = at::empty_like(k_sum);
  at::Tensor out = at::empty({b, h, dv}, q.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "taylor_step_cpu", [&] {
    at::parallel_for(0, b * hk, std::max<int64_t>(1, 16 / group), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> fq(group * m), fk(m), z(group);
      const FeatureMap<scalar_t> fm(static_cast<int>(d), scale);
      for (int64_t bk = begin; bk < end; ++bk) {  // (batch, key/value head); its query heads are bk*group + g
        for (int64_t g = 0; g < group; ++g) fm.build(q.data_ptr<scalar_t>() + (bk * group + g) * d, 1, fq.data() + g * m);
        fm.build(k.data_ptr<scalar_t>() + bk * d, 1, fk.data());
        step_one(kv.data_ptr<scalar_t>() + bk * m * dv, kv_out.data_ptr<scalar_t>() + bk * m * dv,
                 k_sum.data_ptr<scalar_t>() + bk * m, k_sum_out.data_ptr<scalar_t>() + bk * m, fq.data(),
                 static_cast<int>(group), fk.data(), v.data_ptr<scalar_t>() + bk * dv, static_cast<int>(m),
                 static_cast<int>(dv), out.data_ptr<scalar_t>() + bk * group * dv, z.data());
      }
    });
  });
  return {out.to(q_in.scalar_type()), kv_out, k_sum_out};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(linattn_cuda, CPU, m) {
  m.impl("taylor_fwd", &cpu::taylor_fwd_cpu);
  m.impl("taylor_bwd", &cpu::taylor_bwd_cpu);
  m.impl("taylor_step", &cpu::taylor_step_cpu);
}

}  // namespace linattn_cuda
