// Shared CPU math of the fused kernels: the BLAS GEMM, the symmetric feature map (forward and Jacobian-transpose
// product, feature order of linattn_cuda/feature_map.py) and the element-wise loops of the quadratic and linear
// forms (polynomial, normalizer, value rows with padded keys zeroed). Included by every csrc/cpu/*.cpp.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>

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
namespace cpu {
namespace {  // internal linkage: every kernel file has its own copy

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

// P = poly(S) over an n x lk block (rows ld apart), padded key columns 0, and rowsum[i] = sum_j P_ij.
// causal_offset >= 0: row i sees the columns j <= i + causal_offset only (the others are set to 0); -1: all.
template <typename T>
LA_SIMD_CLONES
void poly_rows(T* s, int n, int lk, int ld, int causal_offset, const bool* pad, T* rowsum) {
  const bool causal = causal_offset >= 0;
  for (int i = 0; i < n; ++i) {
    T* __restrict__ row = s + static_cast<int64_t>(i) * ld;
    const int end = causal ? std::min(lk, i + causal_offset + 1) : lk;
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

}  // namespace
}  // namespace cpu
}  // namespace linattn_cuda
