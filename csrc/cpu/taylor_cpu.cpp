// Fused C++ CPU kernels of second-order Taylor attention (schemas in csrc/ops.cpp).
//
// Every (batch, head) pair is an independent task; tasks run in parallel (at::parallel_for).
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
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

// The Fortran BLAS that torch's CPU library links (MKL on x86-64 wheels). Weak: when a build of torch does
// not export them, the portable loops below take over.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

// The element-wise loops (feature map, polynomial, normalizer) are compiled for AVX-512 and AVX2 besides the
// baseline x86-64 (SSE2) the extension is built for; the loader picks the best at run time (GCC ifunc).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(LINATTN_NO_SIMD_CLONES)
#define LA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LA_SIMD_CLONES
#endif

namespace linattn_cuda {
namespace {

constexpr int64_t kMaxHeadDim = 128;
constexpr int64_t kMaxValueDim = 256;

int64_t env_int(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  return std::max<int64_t>(1, std::atoll(value));
}

// ---------------------------------------------------------------------------------------------------------
// Row-major GEMM: C[m x n] = alpha * op(A) op(B) + beta * C, with leading dimensions = row strides.
template <typename T>
void portable_gemm(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta,
                   T* c, int ldc) {
  for (int i = 0; i < m; ++i) {
    T* crow = c + static_cast<int64_t>(i) * ldc;
    for (int j = 0; j < n; ++j) crow[j] = beta == T(0) ? T(0) : crow[j] * beta;
    for (int p = 0; p < k; ++p) {
      const T aip = alpha * (ta ? a[static_cast<int64_t>(p) * lda + i] : a[static_cast<int64_t>(i) * lda + p]);
      if (aip == T(0)) continue;
      if (!tb) {
        const T* brow = b + static_cast<int64_t>(p) * ldb;
        for (int j = 0; j < n; ++j) crow[j] += aip * brow[j];
      } else {
        for (int j = 0; j < n; ++j) crow[j] += aip * b[static_cast<int64_t>(j) * ldb + p];
      }
    }
  }
}

template <typename T>
void gemm(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
          int ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    portable_gemm(ta, tb, m, n, 0, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // Row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T.
  const char tra = tb ? 'T' : 'N';
  const char trb = ta ? 'T' : 'N';
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&tra, &trb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&tra, &trb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
      return;
    }
  }
  portable_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// ---------------------------------------------------------------------------------------------------------
// The symmetric feature map and its Jacobian-transpose product, in a "feature-major" layout: a chunk of n
// rows is held transposed (x^T: D x n, phi^T: M x n) so that every feature is one contiguous, vectorizable
// loop over the rows, whatever D is.
template <typename T>
struct FeatureMap {
  int d;
  int m;
  T c1, c2, c3;
  explicit FeatureMap(int head_dim, double scale)
      : d(head_dim),
        m(1 + head_dim + head_dim * (head_dim + 1) / 2),
        c1(static_cast<T>(std::sqrt(scale))),
        c2(static_cast<T>(scale / std::sqrt(2.0))),
        c3(static_cast<T>(scale)) {}

  // x^T (d x n) of n rows of x ([n x d], row stride d).
  LA_SIMD_CLONES
  void transpose_in(const T* __restrict__ x, int n, T* __restrict__ xt) const {
    // contiguous writes, strided reads (vector gathers with AVX2 / AVX-512)
    for (int a = 0; a < d; ++a) {
      T* __restrict__ row = xt + static_cast<int64_t>(a) * n;
      for (int r = 0; r < n; ++r) row[r] = x[static_cast<int64_t>(r) * d + a];
    }
  }

  // x^T into xt and phi^T into phit, from n rows of x.
  void features(const T* x, int n, T* xt, T* phit) const {
    transpose_in(x, n, xt);
    build(xt, n, phit);
  }

  // phi^T (m x n) from x^T (d x n).
  LA_SIMD_CLONES
  void build(const T* __restrict__ xt, int n, T* __restrict__ phit) const {
    std::fill(phit, phit + n, T(1));
    for (int a = 0; a < d; ++a) {
      const T* __restrict__ xa = xt + static_cast<int64_t>(a) * n;
      T* __restrict__ lin = phit + static_cast<int64_t>(1 + a) * n;
      T* __restrict__ sq = phit + static_cast<int64_t>(1 + d + a) * n;
      for (int r = 0; r < n; ++r) {
        lin[r] = c1 * xa[r];
        sq[r] = c2 * xa[r] * xa[r];
      }
    }
    T* cross = phit + static_cast<int64_t>(1 + 2 * d) * n;
    for (int a = 0; a < d; ++a) {
      const T* __restrict__ xa = xt + static_cast<int64_t>(a) * n;
      for (int b = a + 1; b < d; ++b, cross += n) {
        const T* __restrict__ xb = xt + static_cast<int64_t>(b) * n;
        T* __restrict__ out = cross;
        for (int r = 0; r < n; ++r) out[r] = c3 * xa[r] * xb[r];
      }
    }
  }

  // grad[r] += (J_phi(x_r)^T u_r) for n rows; x^T (d x n), u^T (m x n), grad row-major [n x d];
  // gt is a d x n scratch.
  LA_SIMD_CLONES
  void backprop(const T* __restrict__ xt, const T* __restrict__ ut, int n, T* __restrict__ gt, T* grad) const {
    for (int a = 0; a < d; ++a) {
      const T* __restrict__ xa = xt + static_cast<int64_t>(a) * n;
      const T* __restrict__ ulin = ut + static_cast<int64_t>(1 + a) * n;
      const T* __restrict__ usq = ut + static_cast<int64_t>(1 + d + a) * n;
      T* __restrict__ ga = gt + static_cast<int64_t>(a) * n;
      for (int r = 0; r < n; ++r) ga[r] = c1 * ulin[r] + T(2) * c2 * xa[r] * usq[r];
    }
    const T* cross = ut + static_cast<int64_t>(1 + 2 * d) * n;
    for (int a = 0; a < d; ++a) {
      const T* __restrict__ xa = xt + static_cast<int64_t>(a) * n;
      T* __restrict__ ga = gt + static_cast<int64_t>(a) * n;
      for (int b = a + 1; b < d; ++b, cross += n) {
        const T* __restrict__ xb = xt + static_cast<int64_t>(b) * n;
        const T* __restrict__ u = cross;
        T* __restrict__ gb = gt + static_cast<int64_t>(b) * n;
        for (int r = 0; r < n; ++r) {
          ga[r] += c3 * xb[r] * u[r];
          gb[r] += c3 * xa[r] * u[r];
        }
      }
    }
    for (int r = 0; r < n; ++r)
      for (int a = 0; a < d; ++a) grad[static_cast<int64_t>(r) * d + a] += gt[static_cast<int64_t>(a) * n + r];
  }
};

// ---------------------------------------------------------------------------------------------------------
// Problem description shared by the kernels; pointers are to contiguous [B, H, L, *] buffers of type T.
struct Shape {
  int64_t batch, heads, lq, lk, d, dv;
};

// Which algorithm and chunk size, per shape. Measured on a 2-core Xeon (Sapphire Rapids) with MKL:
// see bench/results and the README; overridable with LINATTN_CPU_CHUNK / LINATTN_CPU_QUADRATIC_MAX.
struct Plan {
  bool quadratic;  // non-causal: quadratic form over all keys; causal: one chunk covering everything
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
    const int64_t quad_max = env_int("LINATTN_CPU_QUADRATIC_MAX", 256);
    if ((form == 0 && s.lq <= quad_max) || form == 1) return {true, static_cast<int>(std::max<int64_t>(s.lq, 1))};
    return {false, static_cast<int>(chunk)};
  }
  // Non-causal: FLOPs of each form; the quadratic form runs closer to peak, hence the factor 2.
  const double quad = 2.0 * s.lq * s.lk * (s.d + dv1);
  const double lin = 2.0 * (s.lq + s.lk) * m * dv1;
  const bool quadratic = form == 0 ? (s.lk <= 4096 && quad <= 2.0 * lin) : form == 1;
  return {quadratic, static_cast<int>(chunk)};
}

template <typename T>
inline T poly(T s) {
  return T(1) + s + T(0.5) * s * s;
}

// [v | 1] for n keys (dv columns of rows ldv apart), zero rows for padded keys.
template <typename T>
void build_value_aug(const T* v, const bool* pad, int n, int dv, T* out, int ldv = -1, T one = T(1)) {
  const int dv1 = dv + 1;
  if (ldv < 0) ldv = dv;
  for (int r = 0; r < n; ++r) {
    T* o = out + static_cast<int64_t>(r) * dv1;
    if (pad != nullptr && pad[r]) {
      std::fill(o, o + dv1, T(0));
    } else {
      std::copy(v + static_cast<int64_t>(r) * ldv, v + static_cast<int64_t>(r) * ldv + dv, o);
      o[dv] = one;
    }
  }
}

// out_r = num_r[:dv] / num_r[dv] (0 when the normalizer is 0; out rows ldo apart); den_r = num_r[dv]
// unless den is null.
template <typename T>
LA_SIMD_CLONES
void normalize_rows(const T* num, int n, int dv, T* out, T* den, int ldo) {
  const int dv1 = dv + 1;
  for (int r = 0; r < n; ++r) {
    const T* nr = num + static_cast<int64_t>(r) * dv1;
    const T z = nr[dv];
    const T inv = z != T(0) ? T(1) / z : T(0);
    T* o = out + static_cast<int64_t>(r) * ldo;
    for (int c = 0; c < dv; ++c) o[c] = nr[c] * inv;
    if (den != nullptr) den[r] = z;
  }
}

// The forward keeps the normalizer out of the GEMMs: value GEMMs are exactly Dv wide (single-thread MKL sgemm on
// this project's VM: 143 GFLOP/s for 64 x 65 x 153, 165 for 64 x 64 x 153, i.e. ~13 % slower per useful FLOP at
// Dv + 1 = 65), and the normalizer column (z = sum of phi(k), or the row sums of P) is done by the loops below.

// P = poly(S) over an n x lk block (rows ld apart; causal: zero above the diagonal), padded key columns 0,
// and rowsum[i] = sum_j P_ij.
template <typename T>
LA_SIMD_CLONES
void poly_rows(T* s, int n, int lk, int ld, bool causal, const bool* pad, T* rowsum) {
  for (int i = 0; i < n; ++i) {
    T* __restrict__ row = s + static_cast<int64_t>(i) * ld;
    const int end = causal ? i + 1 : lk;
    T acc = T(0);
    if (pad == nullptr) {
#pragma omp simd reduction(+ : acc)
      for (int j = 0; j < end; ++j) {
        const T p = poly(row[j]);
        row[j] = p;
        acc += p;
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int j = 0; j < end; ++j) {
        const T p = pad[j] ? T(0) : poly(row[j]);
        row[j] = p;
        acc += p;
      }
    }
    if (causal) std::fill(row + end, row + lk, T(0));
    rowsum[i] = acc;
  }
}

// The value rows of n keys for a GEMM: v itself (rows *ld apart) when none of them is padded, else a copy in
// `scratch` with the padded rows zeroed (*ld = dv), so that padded keys add nothing whatever their values.
template <typename T>
const T* key_values(const T* v, const bool* pad, int n, int dv, int* ld, T* scratch) {
  if (pad == nullptr || std::none_of(pad, pad + n, [](bool p) { return p; })) return v;
  for (int r = 0; r < n; ++r) {
    T* o = scratch + static_cast<int64_t>(r) * dv;
    if (pad[r]) {
      std::fill(o, o + dv, T(0));
    } else {
      const T* src = v + static_cast<int64_t>(r) * *ld;
      std::copy(src, src + dv, o);
    }
  }
  *ld = dv;
  return scratch;
}

// Feature columns (phi^T: m x n) of padded keys set to 0.
template <typename T>
void zero_padded_columns(T* phit, int m, int n, const bool* pad) {
  if (pad == nullptr) return;
  for (int r = 0; r < n; ++r)
    if (pad[r])
      for (int f = 0; f < m; ++f) phit[static_cast<int64_t>(f) * n + r] = T(0);
}

// num[r * ldn] = sum_f phi^T[f, r] z[f * ldz]: the normalizer of n queries against a state column (acc: n scratch).
template <typename T>
LA_SIMD_CLONES
void project_normalizer(const T* __restrict__ phit, int m, int n, const T* z, int ldz, T* num, int ldn,
                        T* __restrict__ acc) {
  std::fill(acc, acc + n, T(0));
  for (int f = 0; f < m; ++f) {
    const T zf = z[static_cast<int64_t>(f) * ldz];
    const T* __restrict__ row = phit + static_cast<int64_t>(f) * n;
    for (int r = 0; r < n; ++r) acc[r] += zf * row[r];
  }
  for (int r = 0; r < n; ++r) num[static_cast<int64_t>(r) * ldn] = acc[r];
}

// z[f * ldz] += sum_r phi^T[f, r]: the normalizer column of the state after n more keys.
template <typename T>
LA_SIMD_CLONES
void add_feature_sums(const T* __restrict__ phit, int m, int n, T* z, int ldz) {
  for (int f = 0; f < m; ++f) {
    const T* __restrict__ row = phit + static_cast<int64_t>(f) * n;
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (int r = 0; r < n; ++r) acc += row[r];
    z[static_cast<int64_t>(f) * ldz] += acc;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward for one (b, h) and the value columns [c0, c0 + s.dv) of a value matrix with rows ld apart
// (v and out point at column c0; ld = s.dv unless the value columns are split across tasks, see
// taylor_fwd_cpu). den may be null (a task that is not the first of its head). state (M x (Dv+1)) is read as
// the initial state when `has_state` and holds the final state on return when `want_state` (causal only).
template <typename T>
void forward_one(const T* q, const T* k, const T* v, const bool* pad, T* out, T* den, const Shape& s, bool causal,
                 double scale, const Plan& plan, T* state, bool has_state, bool want_state, int ld) {
  const int d = static_cast<int>(s.d), dv = static_cast<int>(s.dv), dv1 = dv + 1;
  const FeatureMap<T> fm(d, scale);
  const int m = fm.m;
  const T tscale = static_cast<T>(scale);
  const int lq = static_cast<int>(s.lq), lk = static_cast<int>(s.lk);
  // num: n x (Dv + 1) rows, the numerator in the first Dv columns and the normalizer in the last

  if (!causal && plan.quadratic) {
    const int c = std::min(plan.chunk, lq);
    std::vector<T> vscratch(pad ? static_cast<size_t>(lk) * dv : 0), sblk(static_cast<size_t>(c) * lk),
        num(static_cast<size_t>(c) * dv1), rowsum(c);
    int ldv = ld;
    const T* vk = key_values(v, pad, lk, dv, &ldv, vscratch.data());
    for (int r0 = 0; r0 < lq; r0 += c) {
      const int n = std::min(c, lq - r0);
      gemm<T>(false, true, n, lk, d, tscale, q + static_cast<int64_t>(r0) * d, d, k, d, T(0), sblk.data(), lk);
      poly_rows(sblk.data(), n, lk, lk, false, pad, rowsum.data());
      gemm<T>(false, false, n, dv, lk, T(1), sblk.data(), lk, vk, ldv, T(0), num.data(), dv1);
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

  bool state_nonzero = has_state;
  for (int r0 = 0; r0 < lq; r0 += c) {
    const int n = std::min(c, lq - r0);
    const T* qc = q + static_cast<int64_t>(r0) * d;
    const T* kc = k + static_cast<int64_t>(r0) * d;
    const bool* pc = pad ? pad + r0 : nullptr;
    T beta = T(0);
    if (state_nonzero) {  // inter-chunk: phi(Q_c) S_aug
      read_state(r0, n);
      beta = T(1);
    }
    gemm<T>(false, true, n, n, d, tscale, qc, d, kc, d, T(0), sblk.data(), n);  // intra-chunk
    poly_rows(sblk.data(), n, n, n, true, pc, acc.data());
    int ldv = ld;
    const T* vc = key_values(v + static_cast<int64_t>(r0) * ld, pc, n, dv, &ldv, vscratch.data());
    gemm<T>(false, false, n, dv, n, T(1), sblk.data(), n, vc, ldv, beta, num.data(), dv1);
    for (int r = 0; r < n; ++r) {
      T& zr = num[static_cast<size_t>(r) * dv1 + dv];
      zr = (state_nonzero ? zr : T(0)) + acc[r];
    }
    normalize_rows(num.data(), n, dv, out + static_cast<int64_t>(r0) * ld, den ? den + r0 : nullptr, ld);
    if (r0 + n < lq || want_state) {  // S_aug += phi(K_c)^T [V_c | 1]
      add_keys(r0, n);
      state_nonzero = true;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward for one (b, h) and the value columns [c0, c0 + s.dv) of value matrices with rows ld apart (g, out,
// v and dv_out point at the head's column 0; ld = s.dv unless the columns are split across tasks, see
// taylor_bwd_cpu). dq and dk (zero-initialised by the caller) receive this block's share: dw_ij sums over the
// value columns (and the normalizer column, which the block with `norm` carries), so the blocks' dq and dk add
// up to the gradients; dv_out receives the block's own columns.
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

  if (!causal && plan.quadratic) {
    const int c = std::min(plan.chunk, lq);
    std::vector<T> vaug(static_cast<size_t>(lk) * dv1), sblk(static_cast<size_t>(c) * lk),
        dp(static_cast<size_t>(c) * lk);
    build_value_aug(v, pad, lk, dv, vaug.data(), ld, one);
    for (int r0 = 0; r0 < lq; r0 += c) {
      const int n = std::min(c, lq - r0);
      const T* qc = q + static_cast<int64_t>(r0) * d;
      const T* gc = gaug.data() + static_cast<int64_t>(r0) * dv1;
      gemm<T>(false, true, n, lk, d, tscale, qc, d, k, d, T(0), sblk.data(), lk);
      gemm<T>(false, true, n, lk, dv1, T(1), gc, dv1, vaug.data(), dv1, T(0), dp.data(), lk);
      for (int64_t i = 0; i < static_cast<int64_t>(n) * lk; ++i) {
        dp[i] *= T(1) + sblk[i];  // dS
        sblk[i] = poly(sblk[i]);  // P
      }
      gemm<T>(false, false, n, d, lk, tscale, dp.data(), lk, k, d, T(0), dq + static_cast<int64_t>(r0) * d, d);
      gemm<T>(true, false, lk, d, n, tscale, dp.data(), lk, qc, d, T(1), dk, d);
      gemm<T>(true, false, lk, dv, n, T(1), sblk.data(), lk, gc, dv1, T(1), dv_out, ld);
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
      gemm<T>(true, false, n, dv, m, T(1), phi.data(), n, raug.data(), dv1, T(0), dv_out + static_cast<int64_t>(r0) * ld, ld);
      gemm<T>(false, true, m, n, dv1, T(1), raug.data(), dv1, vaug.data(), dv1, T(0), u.data(), n);
      fm.backprop(xt.data(), u.data(), n, gt.data(), dk + static_cast<int64_t>(r0) * d);
    }
  } else {
    const int c = plan.chunk;
    std::vector<T> xt(static_cast<size_t>(c) * d), gt(static_cast<size_t>(c) * d), phi(static_cast<size_t>(c) * m), vaug(static_cast<size_t>(c) * dv1), u(static_cast<size_t>(c) * m),
        sblk(static_cast<size_t>(c) * c), dp(static_cast<size_t>(c) * c), aug(static_cast<size_t>(m) * dv1, T(0));
    // Pass 1, forward over chunks: intra-chunk gradients and dq's inter-chunk part (S_aug prefix in `aug`).
    for (int r0 = 0; r0 < lq; r0 += c) {
      const int n = std::min(c, lq - r0);
      const T* qc = q + static_cast<int64_t>(r0) * d;
      const T* kc = k + static_cast<int64_t>(r0) * d;
      const T* gc = gaug.data() + static_cast<int64_t>(r0) * dv1;
      T* dqc = dq + static_cast<int64_t>(r0) * d;
      build_value_aug(v + static_cast<int64_t>(r0) * ld, pad ? pad + r0 : nullptr, n, dv, vaug.data(), ld, one);
      if (r0 > 0) {
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
      gemm<T>(false, false, n, d, n, tscale, dp.data(), n, kc, d, T(1), dqc, d);
      gemm<T>(true, false, n, d, n, tscale, dp.data(), n, qc, d, T(1), dk + static_cast<int64_t>(r0) * d, d);
      gemm<T>(true, false, n, dv, n, T(1), sblk.data(), n, gc, dv1, T(1), dv_out + static_cast<int64_t>(r0) * ld, ld);
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
      const T* kc = k + static_cast<int64_t>(r0) * d;
      if (r0 < last) {
        fm.features(kc, n, xt.data(), phi.data());
        build_value_aug(v + static_cast<int64_t>(r0) * ld, pad ? pad + r0 : nullptr, n, dv, vaug.data(), ld, one);
        gemm<T>(true, false, n, dv, m, T(1), phi.data(), n, aug.data(), dv1, T(1), dv_out + static_cast<int64_t>(r0) * ld, ld);
        gemm<T>(false, true, m, n, dv1, T(1), aug.data(), dv1, vaug.data(), dv1, T(0), u.data(), n);
        fm.backprop(xt.data(), u.data(), n, gt.data(), dk + static_cast<int64_t>(r0) * d);
      }
      if (r0 > 0) {
        fm.features(qc, n, xt.data(), phi.data());
        gemm<T>(false, false, m, dv1, n, T(1), phi.data(), n, gaug.data() + static_cast<int64_t>(r0) * dv1, dv1, T(1),
                aug.data(), dv1);
      }
    }
  }
  if (pad != nullptr) {  // padded keys get no gradient
    for (int j = 0; j < lk; ++j) {
      if (!pad[j]) continue;
      std::fill(dk + static_cast<int64_t>(j) * d, dk + static_cast<int64_t>(j + 1) * d, T(0));
      std::fill(dv_out + static_cast<int64_t>(j) * ld, dv_out + static_cast<int64_t>(j) * ld + dv, T(0));
    }
  }
}

// One decoding step of one (b, h) in a single pass over the state: read the old row, write the new one
// (kv' = kv + phi(k) v^T, z' = z + phi(k)), accumulate out = phi(q)^T kv' / phi(q)^T z'.
template <typename T>
LA_SIMD_CLONES void step_one(const T* __restrict__ s_old, T* __restrict__ s_new, const T* __restrict__ z_old,
                             T* __restrict__ z_new, const T* __restrict__ fq, const T* __restrict__ fk,
                             const T* __restrict__ vr, int m, int dv, T* __restrict__ o) {
  std::fill(o, o + dv, T(0));
  T z = 0;
  for (int f = 0; f < m; ++f) {
    const T* __restrict__ src = s_old + static_cast<int64_t>(f) * dv;
    T* __restrict__ dst = s_new + static_cast<int64_t>(f) * dv;
    const T a = fk[f], w = fq[f];
    for (int c = 0; c < dv; ++c) {
      const T val = src[c] + a * vr[c];
      dst[c] = val;
      o[c] += w * val;
    }
    z_new[f] = z_old[f] + a;
    z += w * z_new[f];
  }
  const T inv = z != T(0) ? T(1) / z : T(0);
  for (int c = 0; c < dv; ++c) o[c] *= inv;
}

// ---------------------------------------------------------------------------------------------------------
// Argument checks (the Python API checks first; these protect direct torch.ops callers).
at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
               bool causal) {
  TORCH_CHECK(q.dim() == 4, "q must have shape [B, H, Lq, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k must have shape [B, H, Lk, D], got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "v must have shape [B, H, Lk, Dv], got ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "q, k, v must be CPU tensors");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "q must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "k and v must have q's dtype ", dt);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k must have shape [B, H, Lk, D] matching q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == k.size(2),
              "v must have shape [B, H, Lk, Dv] matching k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, "q/k feature dim D must be in [1, ", kMaxHeadDim, "], got ",
              q.size(3));
  TORCH_CHECK(v.size(3) <= kMaxValueDim, "value dim Dv must be <= ", kMaxValueDim, ", got ", v.size(3));
  TORCH_CHECK(!causal || q.size(2) == k.size(2), "causal attention needs Lq == Lk, got ", q.size(2), " and ",
              k.size(2));
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "key_padding_mask must be bool (True = padding), got ",
                mask->scalar_type());
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == k.size(2),
                "key_padding_mask must have shape [B, Lk] = [", q.size(0), ", ", k.size(2), "], got ", mask->sizes());
    TORCH_CHECK(mask->device().is_cpu(), "key_padding_mask must be a CPU tensor");
  }
}

Shape shape_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
}

// The value columns of a head in `count` blocks of `width` (the last one may be narrower): one block when there
// are at least as many heads as threads, else enough blocks of >= 16 columns to give every thread work (each
// block recomputes what does not depend on the value columns).
struct ColumnSplit {
  int64_t count, width, dv;
  int64_t start(int64_t block) const { return block * width; }
  int64_t size(int64_t block) const { return std::min(width, dv - block * width); }
};

ColumnSplit column_split(int64_t heads, int64_t dv) {
  const int64_t threads = at::get_num_threads();
  const int64_t count =
      heads >= threads ? 1 : std::min<int64_t>((threads + heads - 1) / heads, std::max<int64_t>(1, dv / 16));
  return {count, (dv + count - 1) / count, dv};
}

// fn(bh, block) over every (batch*head, column block) in parallel; block 0 always runs (even when Dv = 0).
template <typename F>
void for_each_head_block(int64_t heads, const ColumnSplit& cs, F fn) {
  at::parallel_for(0, heads * cs.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % cs.count;
      if (block == 0 || cs.size(block) > 0) fn(task / cs.count, block);
    }
  });
}

const bool* mask_ptr(const at::Tensor& mask, int64_t b, int64_t lk) {
  return mask.defined() ? mask.data_ptr<bool>() + b * lk : nullptr;
}

// ---------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> taylor_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, const c10::optional<at::Tensor>& mask_in,
                                                 bool causal, double scale) {
  check_qkv(q_in, k_in, v_in, mask_in, causal);
  const auto acc = acc_type(q_in.scalar_type());
  const at::Tensor q = q_in.to(acc).contiguous(), k = k_in.to(acc).contiguous(), v = v_in.to(acc).contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const Shape s = shape_of(q, k, v);
  at::Tensor out = at::empty({s.batch, s.heads, s.lq, s.dv}, q.options());
  at::Tensor den = at::empty({s.batch, s.heads, s.lq}, q.options());
  if (out.numel() > 0) {
    const Plan plan = make_plan(s, causal);
    // With fewer heads than threads, split the value columns too: each task owns a block of output columns
    // (and recomputes the normalizer, written by the first block only). Blocks of >= 16 columns.
    const int64_t heads = s.batch * s.heads;
    const ColumnSplit cs = column_split(heads, s.dv);
    AT_DISPATCH_FLOATING_TYPES(acc, "taylor_fwd_cpu", [&] {
      for_each_head_block(heads, cs, [&](int64_t bh, int64_t block) {
        const int64_t b = bh / s.heads, c0 = cs.start(block);
        Shape part = s;
        part.dv = cs.size(block);
        forward_one<scalar_t>(q.data_ptr<scalar_t>() + bh * s.lq * s.d, k.data_ptr<scalar_t>() + bh * s.lk * s.d,
                              v.data_ptr<scalar_t>() + bh * s.lk * s.dv + c0, mask_ptr(mask, b, s.lk),
                              out.data_ptr<scalar_t>() + bh * s.lq * s.dv + c0,
                              block == 0 ? den.data_ptr<scalar_t>() + bh * s.lq : nullptr, part, causal, scale, plan,
                              nullptr, false, false, static_cast<int>(s.dv));
      });
    });
  } else if (den.numel() > 0) {
    den.zero_();  // Dv == 0: no output columns, but the normalizer is still defined
  }
  return {out.to(q_in.scalar_type()), den};
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
  const Shape s = shape_of(q, k, v);
  TORCH_CHECK(grad_out.sizes() == out_in.sizes() && out_in.dim() == 4 && out_in.size(0) == s.batch &&
                  out_in.size(1) == s.heads && out_in.size(2) == s.lq && out_in.size(3) == s.dv,
              "grad_out and out must have shape [B, H, Lq, Dv], got ", grad_out.sizes(), " and ", out_in.sizes());
  TORCH_CHECK(den_in.dim() == 3 && den_in.size(0) == s.batch && den_in.size(1) == s.heads && den_in.size(2) == s.lq,
              "den must have shape [B, H, Lq], got ", den_in.sizes());
  const at::Tensor g = grad_out.to(acc).contiguous(), out = out_in.to(acc).contiguous(),
                   den = den_in.to(acc).contiguous();
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  if (q.numel() > 0 && k.numel() > 0 && out.numel() > 0) {
    const Plan plan = make_plan(s, causal);
    // With fewer heads than threads, split the value columns as the forward does: each task owns a block of
    // dv's columns and adds its share of dq and dk to a buffer of its own (block 0: dq, dk), summed after.
    const int64_t heads = s.batch * s.heads;
    const ColumnSplit cs = column_split(heads, s.dv);
    at::Tensor dq_part, dk_part;
    if (cs.count > 1) {
      dq_part = at::zeros({cs.count - 1, s.batch, s.heads, s.lq, s.d}, q.options());
      dk_part = at::zeros({cs.count - 1, s.batch, s.heads, s.lk, s.d}, q.options());
    }
    AT_DISPATCH_FLOATING_TYPES(acc, "taylor_bwd_cpu", [&] {
      for_each_head_block(heads, cs, [&](int64_t bh, int64_t block) {
        const int64_t b = bh / s.heads, c0 = cs.start(block);
        Shape part = s;
        part.dv = cs.size(block);
        scalar_t* dq_out = block == 0 ? dq.data_ptr<scalar_t>() : dq_part.data_ptr<scalar_t>() + (block - 1) * dq.numel();
        scalar_t* dk_out = block == 0 ? dk.data_ptr<scalar_t>() : dk_part.data_ptr<scalar_t>() + (block - 1) * dk.numel();
        backward_one<scalar_t>(g.data_ptr<scalar_t>() + bh * s.lq * s.dv, q.data_ptr<scalar_t>() + bh * s.lq * s.d,
                               k.data_ptr<scalar_t>() + bh * s.lk * s.d, v.data_ptr<scalar_t>() + bh * s.lk * s.dv,
                               mask_ptr(mask, b, s.lk), out.data_ptr<scalar_t>() + bh * s.lq * s.dv,
                               den.data_ptr<scalar_t>() + bh * s.lq, dq_out + bh * s.lq * s.d,
                               dk_out + bh * s.lk * s.d, dv.data_ptr<scalar_t>() + bh * s.lk * s.dv, part, causal,
                               scale, plan, static_cast<int>(s.dv), static_cast<int>(c0), block == 0);
      });
    });
    if (cs.count > 1) {
      dq.add_(dq_part.sum(0));
      dk.add_(dk_part.sum(0));
    }
  }
  // Contiguous gradients, as the CUDA kernels and the fake kernel (linattn_cuda/ops.py) give.
  const auto dt = q_in.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

void check_state(const at::Tensor& kv, const at::Tensor& k_sum, int64_t b, int64_t h, int64_t m, int64_t dv) {
  TORCH_CHECK(kv.dim() == 4 && kv.size(0) == b && kv.size(1) == h && kv.size(2) == m && kv.size(3) == dv,
              "kv must have shape [B, H, M, Dv] = [", b, ", ", h, ", ", m, ", ", dv, "], got ", kv.sizes());
  TORCH_CHECK(k_sum.dim() == 3 && k_sum.size(0) == b && k_sum.size(1) == h && k_sum.size(2) == m,
              "k_sum must have shape [B, H, M] = [", b, ", ", h, ", ", m, "], got ", k_sum.sizes());
  TORCH_CHECK(kv.scalar_type() == k_sum.scalar_type() &&
                  (kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kDouble),
              "kv and k_sum must both be float32 or both float64");
  TORCH_CHECK(kv.device().is_cpu() && k_sum.device().is_cpu(), "kv and k_sum must be CPU tensors");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> taylor_prefill_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                  const at::Tensor& v_in,
                                                                  const c10::optional<at::Tensor>& mask_in,
                                                                  const c10::optional<at::Tensor>& kv_in,
                                                                  const c10::optional<at::Tensor>& k_sum_in,
                                                                  double scale) {
  check_qkv(q_in, k_in, v_in, mask_in, true);
  TORCH_CHECK(kv_in.has_value() == k_sum_in.has_value(), "kv and k_sum must be given together");
  const int64_t d = q_in.size(3), m = 1 + d + d * (d + 1) / 2;
  const Shape s = shape_of(q_in, k_in, v_in);
  at::ScalarType acc = acc_type(q_in.scalar_type());
  if (kv_in.has_value()) {
    check_state(*kv_in, *k_sum_in, s.batch, s.heads, m, s.dv);
    acc = kv_in->scalar_type();
  }
  const at::Tensor q = q_in.to(acc).contiguous(), k = k_in.to(acc).contiguous(), v = v_in.to(acc).contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const bool has_state = kv_in.has_value();
  // Fewer heads than threads: value-column blocks as in the forward. The state of a block travels as one
  // [B, H, M, w+1] buffer: its w kv columns, then k_sum (every block carries it; block 0's is returned).
  const int64_t heads = s.batch * s.heads;
  const ColumnSplit cs = column_split(heads, s.dv);
  std::vector<at::Tensor> states;
  for (int64_t block = 0; block < cs.count; ++block) {
    const int64_t c0 = cs.start(block), w = cs.size(block);
    states.push_back(has_state ? at::cat({kv_in->narrow(-1, c0, w).to(acc), k_sum_in->to(acc).unsqueeze(-1)}, -1)
                                     .contiguous()
                               : at::zeros({s.batch, s.heads, m, w + 1}, q.options()));
  }
  at::Tensor out = at::empty({s.batch, s.heads, s.lq, s.dv}, q.options());
  at::Tensor den = at::empty({s.batch, s.heads, s.lq}, q.options());
  if (heads > 0 && s.lq > 0) {
    Plan plan = make_plan(s, true);
    plan.quadratic = false;
    plan.chunk = std::min<int>(plan.chunk, static_cast<int>(s.lq));
    AT_DISPATCH_FLOATING_TYPES(acc, "taylor_prefill_cpu", [&] {
      for_each_head_block(heads, cs, [&](int64_t bh, int64_t block) {
        const int64_t b = bh / s.heads, c0 = cs.start(block), w = cs.size(block);
        Shape part = s;
        part.dv = w;
        forward_one<scalar_t>(q.data_ptr<scalar_t>() + bh * s.lq * s.d, k.data_ptr<scalar_t>() + bh * s.lk * s.d,
                            v.data_ptr<scalar_t>() + bh * s.lk * s.dv + c0, mask_ptr(mask, b, s.lk),
                            out.data_ptr<scalar_t>() + bh * s.lq * s.dv + c0,
                            block == 0 ? den.data_ptr<scalar_t>() + bh * s.lq : nullptr, part, true, scale, plan,
                            states[block].data_ptr<scalar_t>() + bh * m * (w + 1), has_state, true,
                            static_cast<int>(s.dv));
      });
    });
  }
  std::vector<at::Tensor> kv_parts;
  for (int64_t block = 0; block < cs.count; ++block) kv_parts.push_back(states[block].narrow(-1, 0, cs.size(block)));
  at::Tensor kv = at::cat(kv_parts, -1).contiguous();
  at::Tensor k_sum = states[0].select(-1, cs.size(0)).contiguous();
  return {out.to(q_in.scalar_type()), kv, k_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> taylor_step_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                               const at::Tensor& v_in, const at::Tensor& kv_in,
                                                               const at::Tensor& k_sum_in, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3 && v_in.dim() == 3,
              "q, k must have shape [B, H, D] and v [B, H, Dv], got ", q_in.sizes(), ", ", k_in.sizes(), ", ",
              v_in.sizes());
  TORCH_CHECK(k_in.sizes() == q_in.sizes(), "k must have q's shape ", q_in.sizes(), ", got ", k_in.sizes());
  TORCH_CHECK(v_in.size(0) == q_in.size(0) && v_in.size(1) == q_in.size(1), "v must have shape [B, H, Dv]");
  TORCH_CHECK(q_in.device().is_cpu() && k_in.device().is_cpu() && v_in.device().is_cpu(),
              "q, k, v must be CPU tensors");
  const int64_t b = q_in.size(0), h = q_in.size(1), d = q_in.size(2), dv = v_in.size(2);
  TORCH_CHECK(d >= 1 && d <= kMaxHeadDim, "q/k feature dim D must be in [1, ", kMaxHeadDim, "], got ", d);
  TORCH_CHECK(dv <= kMaxValueDim, "value dim Dv must be <= ", kMaxValueDim, ", got ", dv);
  const int64_t m = 1 + d + d * (d + 1) / 2;
  check_state(kv_in, k_sum_in, b, h, m, dv);
  const auto acc = kv_in.scalar_type();
  const at::Tensor q = q_in.to(acc).contiguous(), k = k_in.to(acc).contiguous(), v = v_in.to(acc).contiguous();
  const at::Tensor kv = kv_in.contiguous(), k_sum = k_sum_in.contiguous();
  at::Tensor kv_out = at::empty_like(kv), k_sum_out = at::empty_like(k_sum);
  at::Tensor out = at::empty({b, h, dv}, q.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "taylor_step_cpu", [&] {
    at::parallel_for(0, b * h, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> fq(m), fk(m);
      const FeatureMap<scalar_t> fm(static_cast<int>(d), scale);
      for (int64_t bh = begin; bh < end; ++bh) {
        fm.build(q.data_ptr<scalar_t>() + bh * d, 1, fq.data());
        fm.build(k.data_ptr<scalar_t>() + bh * d, 1, fk.data());
        const scalar_t* vr = v.data_ptr<scalar_t>() + bh * dv;
        const scalar_t* s_old = kv.data_ptr<scalar_t>() + bh * m * dv;
        scalar_t* s_new = kv_out.data_ptr<scalar_t>() + bh * m * dv;
        const scalar_t* z_old = k_sum.data_ptr<scalar_t>() + bh * m;
        scalar_t* z_new = k_sum_out.data_ptr<scalar_t>() + bh * m;
        scalar_t* o = out.data_ptr<scalar_t>() + bh * dv;
        step_one(s_old, s_new, z_old, z_new, fq.data(), fk.data(), vr, static_cast<int>(m), static_cast<int>(dv), o);
      }
    });
  });
  return {out.to(q_in.scalar_type()), kv_out, k_sum_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn_cuda, CPU, m) {
  m.impl("taylor_fwd", &taylor_fwd_cpu);
  m.impl("taylor_bwd", &taylor_bwd_cpu);
  m.impl("taylor_prefill", &taylor_prefill_cpu);
  m.impl("taylor_step", &taylor_step_cpu);
}

}  // namespace linattn_cuda
