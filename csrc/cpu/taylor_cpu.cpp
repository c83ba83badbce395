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

#include "math.h"
#include "tasks.h"

namespace linattn_cuda {
namespace cpu {
namespace {

constexpr int64_t kMaxHeadDim = 128;
constexpr int64_t kMaxValueDim = 256;

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
    const bool quadratic = form == 0 ? (s.lq <= quad_max && (off == 0 || quad <= 2.0 * lin)) : form == 1;
    if (quadratic) return {true, static_cast<int>(std::clamp<int64_t>(s.lq, 1, 256))};
    return {false, static_cast<int>(chunk)};
  }
  // Non-causal: FLOPs of each form; the quadratic form runs closer to peak, hence the factor 2.
  const double quad = 2.0 * s.lq * s.lk * (s.d + dv1);
  const double lin = 2.0 * (s.lq + s.lk) * m * dv1;
  const bool quadratic = form == 0 ? (s.lk <= 4096 && quad <= 2.0 * lin) : form == 1;
  return {quadratic, static_cast<int>(chunk)};
}

// ---------------------------------------------------------------------------------------------------------
// Forward for one (sequence, head) and the value columns [c0, c0 + s.dv) of a value matrix with rows ld apart
// (v and out point at column c0; ld = s.dv unless the value columns are split across tasks, see
// run_forward). den may be null (a task that is not the first of its head). state (M x (Dv+1)) is read as
// the initial state when `has_state` and holds the final state on return when `want_state` (causal only).
// Causal with Lq < Lk is end-aligned: query i sees the keys j <= i + Lk - Lq.
template <typename T>
void forward_one(const T* q, const T* k, const T* v, const bool* pad, T* out, T* den, const Shape& s, bool causal,
                 double scale, const Plan& plan, T* state, bool has_state, bool want_state, int ld) {
  const int d = static_cast<int>(s.d), dv = static_cast<int>(s.dv), dv1 = dv + 1;
  const FeatureMap<T> fm(d, scale);
  const int m = fm.m;
  const T tscale = static_cast<T>(scale);
  const int lq = static_cast<int>(s.lq), lk = static_cast<int>(s.lk);
  const int off = causal ? lk - lq : 0;  // keys every query of a causal problem sees
  // num: n x (Dv + 1) rows, the numerator in the first Dv columns and the normalizer in the last

  if (plan.quadratic) {
    const int c = std::min(plan.chunk, lq);
    std::vector<T> vscratch(pad ? static_cast<size_t>(lk) * dv : 0), sblk(static_cast<size_t>(c) * lk),
        num(static_cast<size_t>(c) * dv1), rowsum(c);
    int ldv = ld;
    const T* vk = key_values(v, pad, lk, dv, &ldv, vscratch.data());
    for (int r0 = 0; r0 < lq; r0 += c) {
      const int n = std::min(c, lq - r0);
      const int kend = causal ? std::min(lk, r0 + n + off) : lk;  // the keys this block of queries sees
      gemm<T>(false, true, n, kend, d, tscale, q + static_cast<int64_t>(r0) * d, d, k, d, T(0), sblk.data(), lk);
      poly_rows(sblk.data(), n, kend, lk, causal ? r0 + off : -1, pad, rowsum.data());
      gemm<T>(false, false, n, dv, kend, T(1), sblk.data(), lk, vk, ldv, T(0), num.data(), dv1);
      for (int r = 0; r < n; ++r) num[static_cast<size_t>(r) * dv1 + dv] = rowsum[r];
      normalize_rows(num.data(), n, dv, out + static_cast<int64_t>(r0) * ld, den ? den + r0 : nullptr, ld);
    }
    return;
  }

  // Linear form. The state S_aug (m x (Dv + 1)): S = sum phi(k) v^T in the first Dv columns, z = sum phi(k) last.
  const int c = causal ? plan.chunk : std::min<int>(plan.chunk, std::max(lq, lk));
  std::vector<T> xt(static_cast<size_t>(c) * d), phi(static_cast<size_t>(c) * m),
      vscratch(pad ? static_cast<size_t>(c) * dv : 0), num(static_cast<size_t>(c) * dv1), acc(c),
      sblk(causal ? static_cast<size_t>(c) * c : 0);
  std::vector<T> local_state;
  T* st = state;
  if (st == nullptr) {
    local_state.assign(static_cast<size_t>(m) * dv1, T(0));
    st = local_state.data();
  } else if (!has_state) {
    std::fill(st, st + static_cast<int64_t>(m) * dv1, T(0));
  }
  T* z = st + dv;  // the normalizer column, stride dv1

  // S_aug += phi(K)^T [V | 1] over n keys starting at r0 (phi built into `phi`)
  auto add_keys = [&](int r0, int n) {
    const bool* pc = pad ? pad + r0 : nullptr;
    fm.features(k + static_cast<int64_t>(r0) * d, n, xt.data(), phi.data());
    zero_padded_columns(phi.data(), m, n, pc);
    int ldv = ld;
    const T* vc = key_values(v + static_cast<int64_t>(r0) * ld, pc, n, dv, &ldv, vscratch.data());
    gemm<T>(false, false, m, dv, n, T(1), phi.data(), n, vc, ldv, T(1), st, dv1);
    add_feature_sums(phi.data(), m, n, z, dv1);
  };
  // num = phi(Q)^T S_aug for n queries starting at r0
  auto read_state = [&](int r0, int n) {
    fm.features(q + static_cast<int64_t>(r0) * d, n, xt.data(), phi.data());
    gemm<T>(true, false, n, dv, m, T(1), phi.data(), n, st, dv1, T(0), num.data(), dv1);
    project_normalizer(phi.data(), m, n, z, dv1, num.data() + dv, dv1, acc.data());
  };

  if (!causal) {
    for (int r0 = 0; r0 < lk; r0 += c) add_keys(r0, std::min(c, lk - r0));  // state over all keys
    for (int r0 = 0; r0 < lq; r0 += c) {
      const int n = std::min(c, lq - r0);
      read_state(r0, n);
      normalize_rows(num.data(), n, dv, out + static_cast<int64_t>(r0) * ld, den ? den + r0 : nullptr, ld);
    }
    return;
  }

  // End-aligned causal: the first `off` keys are seen by every query, i.e. they are a prefix state.
  for (int r0 = 0; r0 < off; r0 += c) add_keys(r0, std::min(c, off - r0));
  bool state_nonzero = has_state || off > 0;
  for (int r0 = 0; r0 < lq; r0 += c) {
    const int n = std::min(c, lq - r0);
    const T* qc = q + static_cast<int64_t>(r0) * d;
    const T* kc = k + static_cast<int64_t>(off + r0) * d;
    const bool* pc = pad ? pad + off + r0 : nullptr;
    T beta = T(0);
    if (state_nonzero) {  // inter-chunk: phi(Q_c) S_aug
      read_state(r0, n);
      beta = T(1);
    }
    gemm<T>(false, true, n, n, d, tscale, qc, d, kc, d, T(0), sblk.data(), n);  // intra-chunk
    poly_rows(sblk.data(), n, n, n, 0, pc, acc.data());
    int ldv = ld;
    const T* vc = key_values(v + static_cast<int64_t>(off + r0) * ld, pc, n, dv, &ldv, vscratch.data());
    gemm<T>(false, false, n, dv, n, T(1), sblk.data(), n, vc, ldv, beta, num.data(), dv1);
    for (int r = 0; r < n; ++r) {
      T& zr = num[static_cast<size_t>(r) * dv1 + dv];
      zr = (state_nonzero ? zr : T(0)) + acc[r];
    }
    normalize_rows(num.data(), n, dv, out + static_cast<int64_t>(r0) * ld, den ? den + r0 : nullptr, ld);
    if (r0 + n < lq || want_state) {  // S_aug += phi(K_c)^T [V_c | 1]
      add_keys(off + r0, n);
      state_nonzero = true;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward for one (sequence, head) and the value columns [c0, c0 + s.dv) of value matrices with rows ld apart
// (g, out, v and dv_out point at the head's column 0; ld = s.dv unless the columns are split across tasks, see
// run_backward). dq, dk and dv_out (zero-initialised by the caller) receive this block's share, added: dw_ij
// sums over the value columns (and the normalizer column, which the block with `norm` carries), so the blocks'
// dq and dk add up to the gradients; dv_out receives the block's own columns. Adding also sums dk and dv over
// the query heads that share a key/value head (grouped-query attention: the caller runs them one after another).
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

  // G = [dO / Z | -dO.out / Z] of this block's columns for every query (an L x (Dv+1) buffer); delta over
  // all ld columns.
  std::vector<T> gaug(static_cast<size_t>(lq) * dv1);
  for (int i = 0; i < lq; ++i) {
    const T z = den[i];
    const T inv = z != T(0) ? T(1) / z : T(0);
    const T* gi = g + static_cast<int64_t>(i) * ld;
    const T* oi = out + static_cast<int64_t>(i) * ld;
    T* gr = gaug.data() + static_cast<int64_t>(i) * dv1;
    T delta = T(0);
    if (norm) {
      for (int c = 0; c < ld; ++c) delta += gi[c] * oi[c];
    }
    for (int c = 0; c < dv; ++c) gr[c] = gi[c0 + c] * inv;
    gr[dv] = -delta * inv;
  }

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
    std::vector<T> xt(static_cast<size_t>(c) * d), gt(static_cast<size_t>(c) * d), phi(static_cast<size_t>(c) * m), vaug(static_cast<size_t>(c) * dv1),
        u(static_cast<size_t>(c) * m), saug(static_cast<size_t>(m) * dv1, T(0)), raug(static_cast<size_t>(m) * dv1, T(0));
    for (int r0 = 0; r0 < lk; r0 += c) {  // S_aug over keys
      const int n = std::min(c, lk - r0);
      fm.features(k + static_cast<int64_t>(r0) * d, n, xt.data(), phi.data());
      build_value_aug(v + static_cast<int64_t>(r0) * ld, pad ? pad + r0 : nullptr, n, dv, vaug.data(), ld, one);
      gemm<T>(false, false, m, dv1, n, T(1), phi.data(), n, vaug.data(), dv1, T(1), saug.data(), dv1);
    }
    for (int r0 = 0; r0 < lq; r0 += c) {  // dq, and R_aug over queries
      const int n = std::min(c, lq - r0);
      const T* qc = q + static_cast<int64_t>(r0) * d;
      const T* gc = gaug.data() + static_cast<int64_t>(r0) * dv1;
      fm.features(qc, n, xt.data(), phi.data());
      gemm<T>(false, true, m, n, dv1, T(1), saug.data(), dv1, gc, dv1, T(0), u.data(), n);
      fm.backprop(xt.data(), u.data(), n, gt.data(), dq + static_cast<int64_t>(r0) * d);
      gemm<T>(false, false, m, dv1, n, T(1), phi.data(), n, gc, dv1, T(1), raug.data(), dv1);
    }
    for (int r0 = 0; r0 < lk; r0 += c) {  // dk, dv
      const int n = std::min(c, lk - r0);
      const T* kc = k + static_cast<int64_t>(r0) * d;
      fm.features(kc, n, xt.data(), phi.data());
      build_value_aug(v + static_cast<int64_t>(r0) * ld, pad ? pad + r0 : nullptr, n, dv, vaug.data(), ld, one);
      gemm<T>(true, false, n, dv, m, T(1), phi.data(), n, raug.data(), dv1, T(1), dv_out + static_cast<int64_t>(r0) * ld, ld);
      gemm<T>(false, true, m, n, dv1, T(1), raug.data(), dv1, vaug.data(), dv1, T(0), u.data(), n);
      fm.backprop(xt.data(), u.data(), n, gt.data(), dk + static_cast<int64_t>(r0) * d);
    }
  } else {
    const int c = plan.chunk;
    std::vector<T> xt(static_cast<size_t>(c) * d), gt(static_cast<size_t>(c) * d), phi(static_cast<size_t>(c) * m), vaug(static_cast<size_t>(c) * dv1), u(static_cast<size_t>(c) * m),
        sblk(static_cast<size_t>(c) * c), dp(static_cast<size_t>(c) * c), aug(static_cast<size_t>(m) * dv1, T(0));
    // End-aligned (off > 0): the first `off` keys, seen by every query, start the S_aug prefix; in pass 2 they
    // take their gradients from the R_aug of all queries.
    auto prefix_state = [&](int r0, int n) {
      fm.features(k + static_cast<int64_t>(r0) * d, n, xt.data(), phi.data());
      build_value_aug(v + static_cast<int64_t>(r0) * ld, pad ? pad + r0 : nullptr, n, dv, vaug.data(), ld, one);
      gemm<T>(false, false, m, dv1, n, T(1), phi.data(), n, vaug.data(), dv1, T(1), aug.data(), dv1);
    };
    auto key_grads = [&](int r0, int n) {  // dk, dv of n keys at r0 from the R_aug in `aug`
      fm.features(k + static_cast<int64_t>(r0) * d, n, xt.data(), phi.data());
      build_value_aug(v + static_cast<int64_t>(r0) * ld, pad ? pad + r0 : nullptr, n, dv, vaug.data(), ld, one);
      gemm<T>(true, false, n, dv, m, T(1), phi.data(), n, aug.data(), dv1, T(1), dv_out + static_cast<int64_t>(r0) * ld, ld);
      gemm<T>(false, true, m, n, dv1, T(1), aug.data(), dv1, vaug.data(), dv1, T(0), u.data(), n);
      fm.backprop(xt.data(), u.data(), n, gt.data(), dk + static_cast<int64_t>(r0) * d);
    };
    for (int r0 = 0; r0 < off; r0 += c) prefix_state(r0, std::min(c, off - r0));
    // Pass 1, forward over chunks: intra-chunk gradients and dq's inter-chunk part (S_aug prefix in `aug`).
    for (int r0 = 0; r0 < lq; r0 += c) {
      const int n = std::min(c, lq - r0);
      const T* qc = q + static_cast<int64_t>(r0) * d;
      const T* kc = k + static_cast<int64_t>(off + r0) * d;
      const T* gc = gaug.data() + static_cast<int64_t>(r0) * dv1;
      T* dqc = dq + static_cast<int64_t>(r0) * d;
      build_value_aug(v + static_cast<int64_t>(off + r0) * ld, pad ? pad + off + r0 : nullptr, n, dv, vaug.data(), ld, one);
      if (r0 > 0 || off > 0) {
        gemm<T>(false, true, m, n, dv1, T(1), aug.data(), dv1, gc, dv1, T(0), u.data(), n);
        fm.transpose_in(qc, n, xt.data());
        fm.backprop(xt.data(), u.data(), n, gt.data(), dqc);
      }
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
      if (r0 + n < lq) {
        fm.features(kc, n, xt.data(), phi.data());
        gemm<T>(false, false, m, dv1, n, T(1), phi.data(), n, vaug.data(), dv1, T(1), aug.data(), dv1);
      }
    }
    // Pass 2, backward over chunks: dk's and dv's inter-chunk parts (R_aug suffix in `aug`).
    std::fill(aug.begin(), aug.end(), T(0));
    const int last = ((lq - 1) / c) * c;
    for (int r0 = last; r0 >= 0; r0 -= c) {
      const int n = std::min(c, lq - r0);
      const T* qc = q + static_cast<int64_t>(r0) * d;
      if (r0 < last) key_grads(off + r0, n);
      if (r0 > 0 || off > 0) {
        fm.features(qc, n, xt.data(), phi.data());
        gemm<T>(false, false, m, dv1, n, T(1), phi.data(), n, gaug.data() + static_cast<int64_t>(r0) * dv1, dv1, T(1),
                aug.data(), dv1);
      }
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
// Argument checks (the Python API checks first; these protect direct torch.ops callers).
at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Device, dtype and dims of q, k, v whose last dim is the feature / value dim (dense [B, H, L, *] or packed
// [T, H, *]); heads at dim `hd`: the query heads a multiple of the key/value heads (grouped-query attention).
void check_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t hd) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "q, k, v must be CPU tensors");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "q must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "k and v must have q's dtype ", dt);
  const int64_t h = q.size(hd), hk = k.size(hd);
  TORCH_CHECK(v.size(hd) == hk, "v must have the key/value heads of k (", hk, "), got shape ", v.sizes());
  TORCH_CHECK(hk == h || (hk > 0 && h % hk == 0), "the query heads of q (", h,
              ") must be a multiple of the key/value heads of k (", hk, ") (grouped-query attention)");
  const int64_t last = q.dim() - 1;
  TORCH_CHECK(k.size(last) == q.size(last), "k must have the feature dim D of q (", q.size(last), "), got shape ",
              k.sizes());
  TORCH_CHECK(q.size(last) >= 1 && q.size(last) <= kMaxHeadDim, "q/k feature dim D must be in [1, ", kMaxHeadDim,
              "], got ", q.size(last));
  TORCH_CHECK(v.size(last) <= kMaxValueDim, "value dim Dv must be <= ", kMaxValueDim, ", got ", v.size(last));
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
               bool causal) {
  TORCH_CHECK(q.dim() == 4, "q must have shape [B, H, Lq, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k must have shape [B, Hkv, Lk, D], got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "v must have shape [B, Hkv, Lk, Dv], got ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), "k must have the batch size of q (", q.size(0), "), got shape ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(2) == k.size(2), "v must have shape [B, Hkv, Lk, Dv] matching k ",
              k.sizes(), ", got ", v.sizes());
  check_common(q, k, v, 1);
  TORCH_CHECK(!causal || q.size(2) <= k.size(2), "causal attention needs Lq <= Lk (end-aligned), got ", q.size(2),
              " and ", k.size(2));
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "key_padding_mask must be bool (True = padding), got ",
                mask->scalar_type());
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == k.size(2),
                "key_padding_mask must have shape [B, Lk] = [", q.size(0), ", ", k.size(2), "], got ", mask->sizes());
    TORCH_CHECK(mask->device().is_cpu(), "key_padding_mask must be a CPU tensor");
  }
}

void check_packed_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3, "q must have shape [Tq, H, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 3, "k must have shape [Tk, Hkv, D], got ", k.sizes());
  TORCH_CHECK(v.dim() == 3 && v.size(0) == k.size(0), "v must have shape [Tk, Hkv, Dv] matching k ", k.sizes(),
              ", got ", v.sizes());
  check_common(q, k, v, 1);
}

// ---------------------------------------------------------------------------------------------------------
// The three kernels over a Problem. q, k, v (and grad_out, out, den) are head-major buffers in the accumulation
// type; mask is a dense problem's [B, Lk] key padding mask or undefined.

// out [rows, Dv], den [rows] of the query rows.
void run_forward(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& mask, const at::Tensor& out, const at::Tensor& den, bool causal, double scale) {
  if (out.numel() == 0) {
    if (den.numel() > 0) den.zero_();  // Dv == 0: no output columns, but the normalizer is still defined
    return;
  }
  // With fewer tasks than threads, split the value columns too: each task owns a block of output columns
  // (and recomputes the normalizer, written by the first block only). Blocks of >= 16 columns.
  const ColumnSplit cs = column_split(p.seqs * p.heads, p.dv);
  const int64_t group = p.group();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "taylor_fwd_cpu", [&] {
    for_each_task(p, p.heads, cs, [&](int64_t n, int64_t h, int64_t block) {
      const int64_t qr = p.q.row(n, h), kr = p.k.row(n, h / group), c0 = cs.start(block);
      const Shape part = p.shape(n, cs.size(block));
      scalar_t* o = out.data_ptr<scalar_t>() + qr * p.dv + c0;
      scalar_t* z = block == 0 ? den.data_ptr<scalar_t>() + qr : nullptr;
      if (part.lk == 0) {  // no key: defined as 0
        for (int64_t i = 0; i < part.lq; ++i) std::fill(o + i * p.dv, o + i * p.dv + part.dv, scalar_t(0));
        if (z != nullptr) std::fill(z, z + part.lq, scalar_t(0));
        return;
      }
      if (part.lq == 0) return;
      forward_one<scalar_t>(q.data_ptr<scalar_t>() + qr * p.d, k.data_ptr<scalar_t>() + kr * p.d,
                            v.data_ptr<scalar_t>() + kr * p.dv + c0, mask_ptr(mask, n, part.lk), o, z, part, causal,
                            scale, make_plan(p.shape(n, p.dv), causal), nullptr, false, false, static_cast<int>(p.dv));
    });
  });
}

// dq, dk, dv zero-initialised, head-major like q, k, v.
void run_backward(const Problem& p, const at::Tensor& g, const at::Tensor& q, const at::Tensor& k,
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

// Causal prefill: out [rows, Dv] and the final state of every (sequence, key/value head), from the initial state
// (kv_in [N, Hkv, M, Dv], k_sum_in [N, Hkv, M] in the accumulation type) or zeros. Returns (kv, k_sum).
std::tuple<at::Tensor, at::Tensor> run_prefill(const Problem& p, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& mask, const at::Tensor& kv_in,
                                               const at::Tensor& k_sum_in, const at::Tensor& out, double scale) {
  const int64_t m = 1 + p.d + p.d * (p.d + 1) / 2, group = p.group();
  const bool has_state = kv_in.defined();
  // A task per (sequence, key/value head, column block), as in the backward: the state belongs to the key/value
  // head, so the group's query heads run one after another, all but the last on a scratch copy of the initial
  // state. The state of a block travels as one [N, Hkv, M, w+1] buffer: its w kv columns, then k_sum (every
  // block carries it; block 0's is returned).
  const ColumnSplit cs = column_split(p.seqs * p.kv_heads, p.dv);
  std::vector<at::Tensor> states;
  for (int64_t block = 0; block < cs.count; ++block) {
    const int64_t c0 = cs.start(block), w = cs.size(block);
    states.push_back(has_state ? at::cat({kv_in.narrow(-1, c0, w), k_sum_in.unsqueeze(-1)}, -1).contiguous()
                               : at::zeros({p.seqs, p.kv_heads, m, w + 1}, q.options()));
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "taylor_prefill_cpu", [&] {
    for_each_task(p, p.kv_heads, cs, [&](int64_t n, int64_t hk, int64_t block) {
      const Shape part = p.shape(n, cs.size(block));
      if (part.lk == 0) return;  // no key (nor query): the state stays, no output row
      const int64_t w = part.dv, kr = p.k.row(n, hk), c0 = cs.start(block);
      Plan plan = make_plan(p.shape(n, p.dv), true);
      plan.quadratic = false;
      plan.chunk = std::min<int>(plan.chunk, static_cast<int>(part.lk));
      scalar_t* st = states[block].data_ptr<scalar_t>() + (n * p.kv_heads + hk) * m * (w + 1);
      std::vector<scalar_t> scratch(group > 1 ? static_cast<size_t>(m * (w + 1)) : 0);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const bool last = h == (hk + 1) * group - 1;
        if (!last && part.lq == 0) continue;
        scalar_t* s = st;
        if (!last) {
          if (has_state) std::copy(st, st + m * (w + 1), scratch.data());
          s = scratch.data();
        }
        const int64_t qr = p.q.row(n, h);
        forward_one<scalar_t>(q.data_ptr<scalar_t>() + qr * p.d, k.data_ptr<scalar_t>() + kr * p.d,
                              v.data_ptr<scalar_t>() + kr * p.dv + c0, mask_ptr(mask, n, part.lk),
                              out.data_ptr<scalar_t>() + qr * p.dv + c0, nullptr, part, true, scale, plan, s,
                              has_state, last, static_cast<int>(p.dv));
      }
    });
  });
  std::vector<at::Tensor> kv_parts;
  for (int64_t block = 0; block < cs.count; ++block) kv_parts.push_back(states[block].narrow(-1, 0, cs.size(block)));
  return {at::cat(kv_parts, -1).contiguous(), states[0].select(-1, cs.size(0)).contiguous()};
}

void check_state(const at::Tensor& kv, const at::Tensor& k_sum, int64_t b, int64_t h, int64_t m, int64_t dv) {
  TORCH_CHECK(kv.dim() == 4 && kv.size(0) == b && kv.size(1) == h && kv.size(2) == m && kv.size(3) == dv,
              "kv must have shape [B, Hkv, M, Dv] = [", b, ", ", h, ", ", m, ", ", dv, "], got ", kv.sizes());
  TORCH_CHECK(k_sum.dim() == 3 && k_sum.size(0) == b && k_sum.size(1) == h && k_sum.size(2) == m,
              "k_sum must have shape [B, Hkv, M] = [", b, ", ", h, ", ", m, "], got ", k_sum.sizes());
  TORCH_CHECK(kv.scalar_type() == k_sum.scalar_type() &&
                  (kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kDouble),
              "kv and k_sum must both be float32 or both float64");
  TORCH_CHECK(kv.device().is_cpu() && k_sum.device().is_cpu(), "kv and k_sum must be CPU tensors");
}

// The accumulation type of a prefill (the initial state's, else float32 / float64) and the checked initial state.
at::ScalarType prefill_state(const c10::optional<at::Tensor>& kv_in, const c10::optional<at::Tensor>& k_sum_in,
                             const Problem& p, at::ScalarType dt, at::Tensor* kv, at::Tensor* k_sum) {
  TORCH_CHECK(kv_in.has_value() == k_sum_in.has_value(), "kv and k_sum must be given together");
  if (!kv_in.has_value()) return acc_type(dt);
  const int64_t m = 1 + p.d + p.d * (p.d + 1) / 2;
  check_state(*kv_in, *k_sum_in, p.seqs, p.kv_heads, m, p.dv);
  *kv = *kv_in;
  *k_sum = *k_sum_in;
  return kv_in->scalar_type();
}

// ---------------------------------------------------------------------------------------------------------
// The ops (schemas in csrc/ops.cpp): dense [B, H, L, *] and packed varlen [T, H, *] entry points of the kernels.
std::tuple<at::Tensor, at::Tensor> taylor_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, const c10::optional<at::Tensor>& mask_in,
                                                 bool causal, double scale) {
  check_qkv(q_in, k_in, v_in, mask_in, causal);
  const auto acc = acc_type(q_in.scalar_type());
  const at::Tensor q = q_in.to(acc).contiguous(), k = k_in.to(acc).contiguous(), v = v_in.to(acc).contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const Problem p = dense_problem(q, k, v);
  at::Tensor out = at::empty({q.size(0), p.heads, q.size(2), p.dv}, q.options());
  at::Tensor den = at::empty({q.size(0), p.heads, q.size(2)}, q.options());
  run_forward(p, q, k, v, mask, out, den, causal, scale);
  return {out.to(q_in.scalar_type()), den};
}

std::tuple<at::Tensor, at::Tensor> taylor_varlen_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, const at::Tensor& cu_q,
                                                        const at::Tensor& cu_k, bool causal, double scale) {
  check_packed_qkv(q_in, k_in, v_in);
  const Problem p = packed_problem(q_in, k_in, v_in, cu_q, cu_k, causal);
  const auto acc = acc_type(q_in.scalar_type());
  const at::Tensor q = head_major(q_in, acc), k = head_major(k_in, acc), v = head_major(v_in, acc);
  at::Tensor out = at::empty({p.heads, q_in.size(0), p.dv}, q.options());
  at::Tensor den = at::empty({p.heads, q_in.size(0)}, q.options());
  run_forward(p, q, k, v, at::Tensor(), out, den, causal, scale);
  return {token_major(out, q_in.scalar_type()), den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> taylor_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q_in,
                                                              const at::Tensor& k_in, const at::Tensor& v_in,
                                                              const c10::optional<at::Tensor>& mask_in,
                                                              const at::Tensor& out_in, const at::Tensor& den_in,
                                                              bool causal, double scale) {
  check_qkv(q_in, k_in, v_in, mask_in, causal);
  const auto acc = acc_type(q_in.scalar_type());
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  at::Tensor q = q_in.to(acc).contiguous(), k = k_in.to(acc).contiguous(), v = v_in.to(acc).contiguous();
  if (mask.defined()) {  // padded keys hold anything (NaN, inf): zero them, so that 0 * x stays 0 below
    const at::Tensor pad = mask.view({mask.size(0), 1, mask.size(1), 1});
    k = k.masked_fill(pad, 0);
    v = v.masked_fill(pad, 0);
  }
  const Problem p = dense_problem(q, k, v);
  const int64_t b = q.size(0), lq = q.size(2);
  TORCH_CHECK(grad_out.sizes() == out_in.sizes() && out_in.dim() == 4 && out_in.size(0) == b &&
                  out_in.size(1) == p.heads && out_in.size(2) == lq && out_in.size(3) == p.dv,
              "grad_out and out must have shape [B, H, Lq, Dv], got ", grad_out.sizes(), " and ", out_in.sizes());
  TORCH_CHECK(den_in.dim() == 3 && den_in.size(0) == b && den_in.size(1) == p.heads && den_in.size(2) == lq,
              "den must have shape [B, H, Lq], got ", den_in.sizes());
  const at::Tensor g = grad_out.to(acc).contiguous(), out = out_in.to(acc).contiguous(),
                   den = den_in.to(acc).contiguous();
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  run_backward(p, g, q, k, v, mask, out, den, dq, dk, dv, causal, scale);
  // Contiguous gradients, as the CUDA kernels and the fake kernel (linattn_cuda/ops.py) give.
  const auto dt = q_in.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> taylor_varlen_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& cu_q, const at::Tensor& cu_k, const at::Tensor& out_in, const at::Tensor& den_in, bool causal,
    double scale) {
  check_packed_qkv(q_in, k_in, v_in);
  const Problem p = packed_problem(q_in, k_in, v_in, cu_q, cu_k, causal);
  const int64_t tq = q_in.size(0);
  TORCH_CHECK(grad_out.sizes() == out_in.sizes() && out_in.dim() == 3 && out_in.size(0) == tq &&
                  out_in.size(1) == p.heads && out_in.size(2) == p.dv,
              "grad_out and out must have shape [Tq, H, Dv], got ", grad_out.sizes(), " and ", out_in.sizes());
  TORCH_CHECK(den_in.dim() == 2 && den_in.size(0) == p.heads && den_in.size(1) == tq,
              "den must have shape [H, Tq], got ", den_in.sizes());
  const auto acc = acc_type(q_in.scalar_type());
  const at::Tensor q = head_major(q_in, acc), k = head_major(k_in, acc), v = head_major(v_in, acc);
  const at::Tensor g = head_major(grad_out, acc), out = head_major(out_in, acc), den = den_in.to(acc).contiguous();
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  run_backward(p, g, q, k, v, at::Tensor(), out, den, dq, dk, dv, causal, scale);
  const auto dt = q_in.scalar_type();
  return {token_major(dq, dt), token_major(dk, dt), token_major(dv, dt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> taylor_prefill_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                  const at::Tensor& v_in,
                                                                  const c10::optional<at::Tensor>& mask_in,
                                                                  const c10::optional<at::Tensor>& kv_in,
                                                                  const c10::optional<at::Tensor>& k_sum_in,
                                                                  double scale) {
  check_qkv(q_in, k_in, v_in, mask_in, true);
  const Problem p = dense_problem(q_in, k_in, v_in);
  at::Tensor kv0, k_sum0;
  const at::ScalarType acc = prefill_state(kv_in, k_sum_in, p, q_in.scalar_type(), &kv0, &k_sum0);
  const at::Tensor q = q_in.to(acc).contiguous(), k = k_in.to(acc).contiguous(), v = v_in.to(acc).contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty({q.size(0), p.heads, q.size(2), p.dv}, q.options());
  auto [kv, k_sum] = run_prefill(p, q, k, v, mask, kv0, k_sum0, out, scale);
  return {out.to(q_in.scalar_type()), kv, k_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> taylor_varlen_prefill_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cu_q,
    const at::Tensor& cu_k, const c10::optional<at::Tensor>& kv_in, const c10::optional<at::Tensor>& k_sum_in,
    double scale) {
  check_packed_qkv(q_in, k_in, v_in);
  const Problem p = packed_problem(q_in, k_in, v_in, cu_q, cu_k, true);
  at::Tensor kv0, k_sum0;
  const at::ScalarType acc = prefill_state(kv_in, k_sum_in, p, q_in.scalar_type(), &kv0, &k_sum0);
  const at::Tensor q = head_major(q_in, acc), k = head_major(k_in, acc), v = head_major(v_in, acc);
  at::Tensor out = at::zeros({p.heads, q_in.size(0), p.dv}, q.options());
  auto [kv, k_sum] = run_prefill(p, q, k, v, at::Tensor(), kv0, k_sum0, out, scale);
  return {token_major(out, q_in.scalar_type()), kv, k_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> taylor_step_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                               const at::Tensor& v_in, const at::Tensor& kv_in,
                                                               const at::Tensor& k_sum_in, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3 && v_in.dim() == 3,
              "q must have shape [B, H, D], k [B, Hkv, D] and v [B, Hkv, Dv], got ", q_in.sizes(), ", ", k_in.sizes(),
              ", ", v_in.sizes());
  TORCH_CHECK(k_in.size(0) == q_in.size(0) && v_in.size(0) == q_in.size(0),
              "k and v must have the batch size of q (", q_in.size(0), ")");
  check_common(q_in, k_in, v_in, 1);
  const int64_t b = q_in.size(0), h = q_in.size(1), hk = k_in.size(1), d = q_in.size(2), dv = v_in.size(2);
  const int64_t m = 1 + d + d * (d + 1) / 2, group = hk > 0 ? h / hk : 1;
  check_state(kv_in, k_sum_in, b, hk, m, dv);
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
  using namespace cpu;
  m.impl("taylor_fwd", &taylor_fwd_cpu);
  m.impl("taylor_bwd", &taylor_bwd_cpu);
  m.impl("taylor_prefill", &taylor_prefill_cpu);
  m.impl("taylor_step", &taylor_step_cpu);
  m.impl("taylor_varlen_fwd", &taylor_varlen_fwd_cpu);
  m.impl("taylor_varlen_bwd", &taylor_varlen_bwd_cpu);
  m.impl("taylor_varlen_prefill", &taylor_varlen_prefill_cpu);
}

}  // namespace linattn_cuda
