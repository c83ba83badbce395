// Fused C++ CPU kernels of the hybrid attention (schemas in csrc/ops.cpp): exact softmax weights inside a sliding
// window of W keys, the Taylor weight beyond it, one normalizer.
//
//   w_ij = exp(s_ij)                       j inside the window of i (causal: i - W < j <= i; else |i - j| < W)
//   w_ij = fw_h (1 + s_ij + s_ij^2 / 2)    j visible and outside it (fw_h: the optional per-head far weight)
//   out_i = sum_j w_ij v_j / sum_j w_ij    (0 for a query without an unpadded key), s_ij = scale q_i.k_j
//
// Stabilized as in SPEC section 5: every weight of row i is scaled by e^(-m_i) with m_i = max(window max logit, 0)
// when the row has a key beyond the window (else the window max alone), so that no exponential overflows and the
// Taylor part (>= fw/2 per key) never underflows into 0/0. The backward needs the row's log-normalizer
// lse_i = m_i + log(sum_j w_ij e^(-m_i)) only (+inf for a row without keys: every weight exp(s - lse) is then 0).
//
// Every (sequence, head) pair is an independent task (struct Tasks of tasks.h: dense [B, H, L, *] now, packed
// sequences through the same Rows later); inside a task the queries are processed in blocks of C rows. For the
// block [r0, r0 + C) the keys split into three ranges (BlockRanges below):
//
//   * keys j <= r0 - W are beyond the window of every query of the block: a Taylor state S = sum phi(k) [v | 1]^T
//     (M x (Dv + 1)), kept one step behind the queries, read as phi(Q) S (the linear form of taylor_cpu.cpp);
//   * keys in [r0 - W + 1, r0 + C) (non-causal: up to r0 + C + W - 2) are inside the window of some query of the
//     block: one quadratic block S = scale Q K^T of C x (C + W - 1) logits, each entry weighted by exp (inside
//     the band |i - j| < W), by the Taylor polynomial (outside it) or 0 (future, padding);
//   * non-causal: keys j >= r0 + C + W - 1 are beyond the window of every query after it: a second state, built
//     from the end of the sequence in a second pass (the mirror image).
//
// So the window costs one C x (C + W - 1) block per C queries (no L x L, no [B, H, L, 2W] tensor), the Taylor part
// what taylor_cpu.cpp's chunked form costs, and the only per-task buffers are cache-sized scratch (plus, non-causal,
// an L x (Dv + 1) buffer holding the first pass's state readout). phi is built per block in scratch, never stored.
// Accumulation in float32 (float64 for float64 inputs); the output takes the input dtype.
//
// Backward (recompute; nothing of the band is stored). With G_i = [dO_i | -delta_i], delta_i = dO_i . out_i and
// DP_ij = G_i . [v_j | 1] = dO_i . v_j - delta_i (the quadratic blocks take dO_i . v_j from a Dv-wide GEMM), the normalized weight a_ij = w_ij / Z_i is exp(s_ij - lse_i)
// inside the window and fw e^(-lse_i) poly(s_ij) outside, and
//   dv_j = sum_i a_ij dO_i,   dS_ij = a_ij DP_ij (inside) or fw e^(-lse_i) (1 + s_ij) DP_ij (outside),
//   dq = scale dS K,   dk = scale dS^T Q.
// The pairs in the quadratic blocks take these directly; the state pairs take them in the linear form with the
// scaled G~_i = fw e^(-lse_i) G_i: dq_i = J_phi(q_i)^T (S G~_i) in a forward sweep, dk_j = J_phi(k_j)^T (R [v_j | 1])
// and dv_j = phi(k_j)^T R[:, :Dv] with R = sum phi(q_i) G~_i^T of the queries the key is beyond, in a backward
// sweep (non-causal: both sweeps carry both kinds, mirrored). The far weight's gradient needs no state: the
// normalized weights of a row sum to 1, so sum_far a_ij DP_ij = -sum_window a_ij DP_ij and
//   d loss / d fw_h = -(1 / fw_h) sum_i sum_(j inside) a_ij DP_ij,
// a sum over the window entries the quadratic blocks already hold.
//
// Decoding (hybrid_step) updates a cache in place: a ring buffer of the last W - 1 keys / values (slot p mod (W-1)
// holds position p) with their padding flags, the Taylor state of every key before them, and the per-row position.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../include/problem.h"
#include "math.h"
#include "tasks.h"

namespace linattn_cuda {
namespace cpu {
namespace {

constexpr int64_t kHybridMaxHeadDim = kCpuLimits.max_head_dim;  // csrc/include/problem.h
constexpr int64_t kHybridMaxValueDim = kCpuLimits.max_value_dim;
// Query rows per block. 64 keeps a C x (C + W - 1) logit block and the C x M features in L2 for W = 64 (the
// shape of the README's benchmark); overridable with LINATTN_CPU_HYBRID_CHUNK (tests use small ones).
constexpr int64_t kHybridChunk = 64;

// ---------------------------------------------------------------------------------------------------------
// The element-wise loops below are written so that GCC vectorizes them under the default -ftrapping-math: no
// floating-point operation under a condition (a select of two computed values instead), no float comparison in
// a select (integer tricks instead), padding read as uint8 (GCC gives bool loads no vector type) and applied as a
// factor 1 - pad (the weights are finite, so 0 * w = 0).

// e^x for x <= 0 (x slightly above 0 from rounding is fine), vectorizable: 2^n e^r with n = round(x / ln 2) by the
// 1.5 * 2^23 (2^52) shifter trick, |r| <= ln2 / 2, e^r by its Taylor polynomial (relative error < 1e-7 in float,
// < 3e-16 in double). x below -87 (-708) is raised to it (e^-87 = 1.6e-38: the weight of such an entry next to
// the row's largest, e^0 = 1, is nothing): the clamp compares the bit patterns as integers (for negative floats the
// pattern grows with the magnitude).
template <typename T>
inline T exp_nonpositive(T x) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int32_t lo = std::bit_cast<int32_t>(-87.0f);
    int32_t bx = std::bit_cast<int32_t>(x);
    const int32_t below = -static_cast<int32_t>((bx > lo) & (bx < 0));
    bx = (bx & ~below) | (lo & below);
    const float xc = std::bit_cast<float>(bx);
    const float t = xc * 1.44269504088896341f + 12582912.0f;
    const float n = t - 12582912.0f;
    const float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * std::bit_cast<float>((std::bit_cast<int32_t>(t) - 0x4B400000 + 127) << 23);
  } else {
    constexpr int64_t lo = std::bit_cast<int64_t>(-708.0);
    int64_t bx = std::bit_cast<int64_t>(x);
    const int64_t below = -static_cast<int64_t>((bx > lo) & (bx < 0));
    bx = (bx & ~below) | (lo & below);
    const double xc = std::bit_cast<double>(bx);
    const double t = xc * 1.4426950408889634 + 6755399441055744.0;
    const double n = t - 6755399441055744.0;
    const double r = (xc - n * 0.6931471803691238) - n * 1.9082149292705877e-10;
    double p = 1.0 / 6227020800.0;  // 1/13!
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    return p * std::bit_cast<double>((std::bit_cast<int64_t>(t) - 0x4338000000000000LL + 1023) << 52);
  }
}

// ---------------------------------------------------------------------------------------------------------
// The key ranges of query block b (rows [start(b), start(b) + size(b))) of a sequence of L tokens:
//   keys [0, left_end(b))      beyond the window (before) of every query of the block: the state "before";
//   keys [right_start(b), L)   non-causal: beyond the window (after) of every query of the block: the state "after";
//   keys [key_begin(b), key_end(b))  the quadratic block (causal: up to the block's last query).
// left_end grows by <= C keys per block, right_start likewise: the keys entering a state between two blocks are
// one contiguous run of <= C keys (added(b) and added_after(b) below).
struct BlockRanges {
  int64_t len, window, chunk;
  bool causal;
  int64_t blocks() const { return (len + chunk - 1) / chunk; }
  int64_t start(int64_t b) const { return b * chunk; }
  int64_t size(int64_t b) const { return std::min(chunk, len - b * chunk); }
  int64_t left_end(int64_t b) const { return std::clamp<int64_t>(start(b) - window + 1, 0, len); }
  int64_t right_start(int64_t b) const {
    return b >= blocks() ? len : std::clamp<int64_t>(start(b) + size(b) + window - 1, 0, len);
  }
  int64_t key_begin(int64_t b) const { return left_end(b); }
  int64_t key_end(int64_t b) const { return causal ? start(b) + size(b) : right_start(b); }
  int64_t max_keys() const { return std::min(len, chunk + (causal ? 1 : 2) * (window - 1)); }
};

// Positions of the first and last unpadded key (len and -1 when there is none): query i has a key beyond its
// window iff first <= i - W (or, non-causal, last >= i + W).
struct ValidKeys {
  int64_t first, last;
};

ValidKeys valid_keys(const bool* pad, int64_t len) {
  if (pad == nullptr) return {0, len - 1};
  ValidKeys r{len, -1};
  for (int64_t j = 0; j < len; ++j)
    if (!pad[j]) {
      r.first = j;
      break;
    }
  for (int64_t j = len - 1; j >= 0; --j)
    if (!pad[j]) {
      r.last = j;
      break;
    }
  return r;
}

// Where row i of a quadratic block over keys [k0, k0 + nk) has which weight, as column ranges of the block:
// [0, far_end): beyond the window before i; [band_begin, band_end): inside it; [far_begin, nk): beyond it after i
// (non-causal; causal rows end at band_end: later keys are the future).
struct RowSplit {
  int64_t far_end, band_begin, band_end, far_begin;
};

RowSplit split_row(int64_t i, int64_t k0, int64_t nk, int64_t window, bool causal) {
  RowSplit r;
  r.band_begin = std::clamp<int64_t>(i - window + 1 - k0, 0, nk);
  r.far_end = r.band_begin;
  r.band_end = std::clamp<int64_t>((causal ? i + 1 : i + window) - k0, 0, nk);
  r.far_begin = causal ? nk : r.band_end;
  return r;
}

// A padded column's logit is lowered by this much before a row maximum: it can never be the maximum of a row
// that has an unpadded column (logits are far smaller), and a row maximum below -kPadLogit / 2 means "no column".
template <typename T>
constexpr T kPadLogit = T(1e30);

// Each row kernel below has one body for both cases: kPadded = false (no mask: `keep` is the constant 1, the loop
// vectorizes without a load) and true (pad: 1 = padded column, keep = 0 there). The un-suffixed function picks one.
template <bool kPadded, typename T>
inline T keep(const uint8_t* pad, int64_t j) {
  if constexpr (kPadded) return static_cast<T>(1 - pad[j]);
  return T(1);
}

// max_j row[j] over the unpadded columns of [begin, end) (-inf when there is none).
template <bool kPadded, typename T>
LA_SIMD_CLONES T masked_row_max_(const T* __restrict__ row, const uint8_t* pad, int64_t begin, int64_t end) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = begin; j < end; ++j) {  // "- 0" without a mask: GCC vectorizes this form
    mx = std::max(mx, row[j] - kPadLogit<T> * (T(1) - keep<kPadded, T>(pad, j)));
  }
  return mx < -kPadLogit<T> / 2 ? -std::numeric_limits<T>::infinity() : mx;
}

// row[j] = exp(row[j] - shift) over [begin, end) (0 on padded columns); returns the sum. row[j] <= shift.
template <bool kPadded, typename T>
LA_SIMD_CLONES T exp_weights_(T* __restrict__ row, const uint8_t* pad, int64_t begin, int64_t end, T shift) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t j = begin; j < end; ++j) {
    const T w = exp_nonpositive(row[j] - shift) * keep<kPadded, T>(pad, j);
    row[j] = w;
    acc += w;
  }
  return acc;
}

// row[j] = coef * poly(row[j]) over [begin, end) (0 on padded columns); returns the sum.
template <bool kPadded, typename T>
LA_SIMD_CLONES T poly_weights_(T* __restrict__ row, const uint8_t* pad, int64_t begin, int64_t end, T coef) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t j = begin; j < end; ++j) {
    const T w = coef * keep<kPadded, T>(pad, j) * poly(row[j]);
    row[j] = w;
    acc += w;
  }
  return acc;
}

// Backward of one row segment, with s = row (logits) and dp = dO_i . v_j (minus delta_i gives DP). Inside the window:
// a = exp(s - lse), dS = a DP, returning sum dS (the window's share of the far weight's gradient); outside it
// (far_grads, coef = fw e^(-lse)): a = coef poly(s), dS = coef (1 + s) DP. row <- a, dp <- dS, 0 on padded columns.
template <bool kPadded, typename T>
LA_SIMD_CLONES T window_grads_(T* __restrict__ row, T* __restrict__ dp, const uint8_t* pad, int64_t begin, int64_t end,
                               T lse, T delta) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t j = begin; j < end; ++j) {
    const T a = exp_nonpositive(row[j] - lse) * keep<kPadded, T>(pad, j);
    const T ds = a * (dp[j] - delta);
    row[j] = a;
    dp[j] = ds;
    acc += ds;
  }
  return acc;
}

template <bool kPadded, typename T>
LA_SIMD_CLONES void far_grads_(T* __restrict__ row, T* __restrict__ dp, const uint8_t* pad, int64_t begin, int64_t end,
                               T coef, T delta) {
#pragma omp simd
  for (int64_t j = begin; j < end; ++j) {
    const T s = row[j];
    const T c = coef * keep<kPadded, T>(pad, j);
    row[j] = c * poly(s);
    dp[j] = c * (T(1) + s) * (dp[j] - delta);
  }
}

// The entry points: pad = null (no key padding) or 1 per padded column.
template <typename T>
T masked_row_max(const T* row, const uint8_t* pad, int64_t begin, int64_t end) {
  return pad ? masked_row_max_<true>(row, pad, begin, end) : masked_row_max_<false>(row, pad, begin, end);
}
template <typename T>
T exp_weights(T* row, const uint8_t* pad, int64_t begin, int64_t end, T shift) {
  return pad ? exp_weights_<true>(row, pad, begin, end, shift) : exp_weights_<false>(row, pad, begin, end, shift);
}
template <typename T>
T poly_weights(T* row, const uint8_t* pad, int64_t begin, int64_t end, T coef) {
  return pad ? poly_weights_<true>(row, pad, begin, end, coef) : poly_weights_<false>(row, pad, begin, end, coef);
}
template <typename T>
T window_grads(T* row, T* dp, const uint8_t* pad, int64_t begin, int64_t end, T lse, T delta) {
  return pad ? window_grads_<true>(row, dp, pad, begin, end, lse, delta)
             : window_grads_<false>(row, dp, pad, begin, end, lse, delta);
}
template <typename T>
void far_grads(T* row, T* dp, const uint8_t* pad, int64_t begin, int64_t end, T coef, T delta) {
  pad ? far_grads_<true>(row, dp, pad, begin, end, coef, delta) : far_grads_<false>(row, dp, pad, begin, end, coef, delta);
}

// The log-normalizer of a row from its stabilizer m and scaled normalizer den; +inf without any key.
template <typename T>
inline T row_lse(T m, T den) {
  return den > T(0) ? m + std::log(den) : std::numeric_limits<T>::infinity();
}

// The far scale fw e^(-lse) of a row that has keys beyond its window (0 for the others).
template <typename T>
inline T far_scale(bool has_far, T fw, T lse) {
  return has_far && lse < std::numeric_limits<T>::infinity() ? fw * std::exp(-lse) : T(0);
}

// ---------------------------------------------------------------------------------------------------------
// One task's view: q [L x D], k [L x D], v [L x Dv] (rows contiguous; padded keys' rows zeroed by the caller), the
// key padding of the sequence (or null) and the problem's constants.
template <typename T>
struct Head {
  const T* q;
  const T* k;
  const T* v;
  const bool* pad;
  int64_t d, dv;
  BlockRanges ranges;
  double scale;
  T fw;  // far weight of this head (1 without one)
};

// A Taylor state "S_aug" (M x (Dv + 1): sum phi(k) v^T in the first Dv columns, sum phi(k) last) and the scratch to
// add keys to it and read it.
template <typename T>
struct LinearPart {
  const FeatureMap<T> fm;
  int64_t m, d, dv, dv1;
  std::vector<T> xt, gt, phi, u, vaug, acc;
  LinearPart(int64_t d_, int64_t dv_, double scale, int64_t chunk)
      : fm(static_cast<int>(d_), scale),
        m(fm.m),
        d(d_),
        dv(dv_),
        dv1(dv_ + 1),
        xt(chunk * d_),
        gt(chunk * d_),
        phi(chunk * fm.m),
        u(chunk * fm.m),
        vaug(chunk * (dv_ + 1)),
        acc(chunk) {}

  // st += phi(K)^T [V | 1] over n keys (rows of k and v); padded keys add nothing.
  void add_keys(T* st, const T* k, const T* v, const bool* pad, int64_t n) {
    if (n <= 0) return;
    fm.features(k, static_cast<int>(n), xt.data(), phi.data());
    zero_padded_columns(phi.data(), static_cast<int>(m), static_cast<int>(n), pad);
    gemm<T>(false, false, m, dv, n, T(1), phi.data(), n, v, dv, T(1), st, dv1);
    add_feature_sums(phi.data(), static_cast<int>(m), static_cast<int>(n), st + dv, static_cast<int>(dv1));
  }

  // num [n x (Dv+1)] (=, or += when `add`) phi(Q)^T st for n queries.
  void read(const T* st, const T* q, int64_t n, T* num, bool add) {
    fm.features(q, static_cast<int>(n), xt.data(), phi.data());
    gemm<T>(true, false, n, dv, m, T(1), phi.data(), n, st, dv1, add ? T(1) : T(0), num, dv1);
    if (!add) {
      project_normalizer(phi.data(), static_cast<int>(m), static_cast<int>(n), st + dv, static_cast<int>(dv1), num + dv,
                         static_cast<int>(dv1), acc.data());
      return;
    }
    std::vector<T> z(n);
    project_normalizer(phi.data(), static_cast<int>(m), static_cast<int>(n), st + dv, static_cast<int>(dv1), z.data(), 1,
                       acc.data());
    for (int64_t r = 0; r < n; ++r) num[r * dv1 + dv] += z[r];
  }
};

// ---------------------------------------------------------------------------------------------------------
// Forward of one (sequence, head): out [L x Dv], lse [L]; `state` (M x (Dv+1), zeroed by the caller) receives the
// state of the keys [0, state_end) when not null (the prefill's cache: causal only, state_end >= the last block's
// left_end).
template <typename T>
void forward_head(const Head<T>& hd, T* out, T* lse, T* state, int64_t state_end) {
  const BlockRanges& br = hd.ranges;
  const int64_t len = br.len, d = hd.d, dv = hd.dv, dv1 = dv + 1, c = br.chunk, nb = br.blocks();
  if (len == 0) return;
  LinearPart<T> lin(d, dv, hd.scale, c);
  const int64_t m = lin.m;
  const T tscale = static_cast<T>(hd.scale);
  const ValidKeys valid = valid_keys(hd.pad, len);
  const int64_t max_keys = br.max_keys();
  std::vector<T> sblk(c * max_keys), shift(c);
  std::vector<T> before(m * dv1, T(0)), after(br.causal ? 0 : m * dv1, T(0));
  // Numerator and normalizer [rows x (Dv+1)]: causal, the current block's; non-causal, every row's (pass 1 leaves
  // the state "before" readout there for pass 2).
  std::vector<T> num((br.causal ? c : len) * dv1);
  const bool* pad = hd.pad;

  // The quadratic block of block b and the combination with the state readout already in `nb_num` (rows of b).
  auto finish_block = [&](int64_t b, T* nb_num, bool has_state) {
    const int64_t r0 = br.start(b), n = br.size(b), k0 = br.key_begin(b), nk = br.key_end(b) - k0;
    const bool* kp = pad ? pad + k0 : nullptr;
    const uint8_t* kp8 = reinterpret_cast<const uint8_t*>(kp);
    if (!has_state) std::fill(nb_num, nb_num + n * dv1, T(0));
    gemm<T>(false, true, n, nk, d, tscale, hd.q + r0 * d, d, hd.k + k0 * d, d, T(0), sblk.data(), nk);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t i = r0 + r;
      T* row = sblk.data() + r * nk;
      const RowSplit sp = split_row(i, k0, nk, br.window, br.causal);
      const bool has_far = valid.first <= i - br.window || (!br.causal && valid.last >= i + br.window);
      T mx = masked_row_max(row, kp8, sp.band_begin, sp.band_end);
      if (has_far) mx = std::max(mx, T(0));
      if (mx == -std::numeric_limits<T>::infinity()) mx = T(0);  // no key at all: every weight is 0
      const T coef = has_far ? hd.fw * std::exp(-mx) : T(0);
      T sum = exp_weights(row, kp8, sp.band_begin, sp.band_end, mx);
      sum += poly_weights(row, kp8, 0, sp.far_end, coef);
      sum += poly_weights(row, kp8, sp.far_begin, nk, coef);
      if (br.causal) std::fill(row + sp.band_end, row + nk, T(0));
      T* nr = nb_num + r * dv1;
      for (int64_t col = 0; col < dv1; ++col) nr[col] *= coef;  // the state part: fw e^(-m) phi(q)^T S
      nr[dv] += sum;
      shift[r] = mx;
    }
    gemm<T>(false, false, n, dv, nk, T(1), sblk.data(), nk, hd.v + k0 * dv, dv, T(1), nb_num, dv1);
    for (int64_t r = 0; r < n; ++r) {
      const T* nr = nb_num + r * dv1;
      const T den = nr[dv];
      const T inv = den > T(0) ? T(1) / den : T(0);
      T* o = out + (r0 + r) * dv;
      for (int64_t col = 0; col < dv; ++col) o[col] = nr[col] * inv;
      lse[r0 + r] = row_lse(shift[r], den);
    }
  };

  // Pass 1 (forward over blocks): the state "before" (keys [0, left_end(b))), read by block b; causal: finished.
  int64_t left = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t r0 = br.start(b), n = br.size(b), end = br.left_end(b);
    lin.add_keys(before.data(), hd.k + left * d, hd.v + left * dv, pad ? pad + left : nullptr, end - left);
    left = end;
    T* nb_num = num.data() + (br.causal ? 0 : r0 * dv1);
    if (left > 0) lin.read(before.data(), hd.q + r0 * d, n, nb_num, false);
    if (br.causal) {
      finish_block(b, nb_num, left > 0);
    } else if (left == 0) {
      std::fill(nb_num, nb_num + n * dv1, T(0));
    }
  }
  if (state != nullptr) {  // the prefill's cache: the keys [0, state_end) that have left every future window
    for (int64_t j = left; j < state_end; j += c) {
      const int64_t n = std::min(c, state_end - j);
      lin.add_keys(before.data(), hd.k + j * d, hd.v + j * dv, pad ? pad + j : nullptr, n);
    }
    std::copy(before.begin(), before.end(), state);
  }
  if (br.causal) return;

  // Pass 2 (non-causal, backward over blocks): the state "after" (keys [right_start(b), L)), then the block.
  int64_t right = len;
  for (int64_t b = nb - 1; b >= 0; --b) {
    const int64_t r0 = br.start(b), n = br.size(b), begin = br.right_start(b);
    lin.add_keys(after.data(), hd.k + begin * d, hd.v + begin * dv, pad ? pad + begin : nullptr, right - begin);
    right = begin;
    T* nb_num = num.data() + r0 * dv1;
    if (right < len) lin.read(after.data(), hd.q + r0 * d, n, nb_num, true);
    finish_block(b, nb_num, true);  // pass 1 wrote (or zeroed) the rows
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward of one (sequence, query head): adds this head's dq (own rows), dk and dv (its key/value head: the
// caller runs a group's query heads one after another) and returns its sum over window entries of dS (see the top).
// g, out [L x Dv]; lse [L]. dk and dv rows of padded keys are left for the caller to zero.
template <typename T>
T backward_head(const Head<T>& hd, const T* g, const T* out, const T* lse, T* dq, T* dk, T* dv_out) {
  const BlockRanges& br = hd.ranges;
  const int64_t len = br.len, d = hd.d, dv = hd.dv, dv1 = dv + 1, c = br.chunk, nb = br.blocks();
  LinearPart<T> lin(d, dv, hd.scale, c);
  const int64_t m = lin.m;
  const T tscale = static_cast<T>(hd.scale);
  const ValidKeys valid = valid_keys(hd.pad, len);
  const bool* pad = hd.pad;
  const int64_t max_keys = br.max_keys();

  // G = [dO | -delta] of every row, and the far scale fw e^(-lse) of every row.
  std::vector<T> gaug(len * dv1), fscale(len);
  for (int64_t i = 0; i < len; ++i) {
    const T* gi = g + i * dv;
    const T* oi = out + i * dv;
    T* gr = gaug.data() + i * dv1;
    T delta = T(0);
    for (int64_t col = 0; col < dv; ++col) {
      delta += gi[col] * oi[col];
      gr[col] = gi[col];
    }
    gr[dv] = -delta;
    const bool has_far = valid.first <= i - br.window || (!br.causal && valid.last >= i + br.window);
    fscale[i] = far_scale(has_far, hd.fw, lse[i]);
  }
  std::vector<T> gscaled(c * dv1), sblk(c * max_keys), dpb(c * max_keys);
  std::vector<T> keys_before(m * dv1, T(0)), queries_after(m * dv1, T(0));
  std::vector<T> keys_after(br.causal ? 0 : m * dv1, T(0)), queries_before(br.causal ? 0 : m * dv1, T(0));

  // G~ = fw e^(-lse) G of the rows [r0, r0 + n) into gscaled; false when every scale is 0 (nothing to do).
  auto scaled_g = [&](int64_t r0, int64_t n) {
    bool any = false;
    for (int64_t r = 0; r < n; ++r) {
      const T f = fscale[r0 + r];
      any = any || f != T(0);
      const T* src = gaug.data() + (r0 + r) * dv1;
      T* dst = gscaled.data() + r * dv1;
      for (int64_t col = 0; col < dv1; ++col) dst[col] = f * src[col];
    }
    return any;
  };
  // st += phi(K)^T [V | 1] over keys [j0, j0 + n)
  auto add_keys = [&](T* st, int64_t j0, int64_t n) {
    if (n <= 0) return;
    lin.fm.features(hd.k + j0 * d, static_cast<int>(n), lin.xt.data(), lin.phi.data());
    build_value_aug(hd.v + j0 * dv, pad ? pad + j0 : nullptr, static_cast<int>(n), static_cast<int>(dv), lin.vaug.data());
    gemm<T>(false, false, m, dv1, n, T(1), lin.phi.data(), n, lin.vaug.data(), dv1, T(1), st, dv1);
  };
  // dq of the rows [r0, r0 + n) += J_phi(q)^T (st G~)
  auto dq_from_keys = [&](const T* st, int64_t r0, int64_t n) {
    if (!scaled_g(r0, n)) return;
    gemm<T>(false, true, m, n, dv1, T(1), st, dv1, gscaled.data(), dv1, T(0), lin.u.data(), n);
    lin.fm.transpose_in(hd.q + r0 * d, static_cast<int>(n), lin.xt.data());
    lin.fm.backprop(lin.xt.data(), lin.u.data(), static_cast<int>(n), lin.gt.data(), dq + r0 * d);
  };
  // rt += phi(Q)^T G~ over the rows [r0, r0 + n)
  auto add_queries = [&](T* rt, int64_t r0, int64_t n) {
    if (!scaled_g(r0, n)) return;
    lin.fm.features(hd.q + r0 * d, static_cast<int>(n), lin.xt.data(), lin.phi.data());
    gemm<T>(false, false, m, dv1, n, T(1), lin.phi.data(), n, gscaled.data(), dv1, T(1), rt, dv1);
  };
  // dk, dv of the keys [j0, j0 + n) from the query state rt
  auto key_grads = [&](const T* rt, int64_t j0, int64_t n, bool nonzero) {
    if (n <= 0 || !nonzero) return;
    lin.fm.features(hd.k + j0 * d, static_cast<int>(n), lin.xt.data(), lin.phi.data());
    build_value_aug(hd.v + j0 * dv, pad ? pad + j0 : nullptr, static_cast<int>(n), static_cast<int>(dv), lin.vaug.data());
    gemm<T>(true, false, n, dv, m, T(1), lin.phi.data(), n, rt, dv1, T(1), dv_out + j0 * dv, dv);
    gemm<T>(false, true, m, n, dv1, T(1), rt, dv1, lin.vaug.data(), dv1, T(0), lin.u.data(), n);
    lin.fm.backprop(lin.xt.data(), lin.u.data(), static_cast<int>(n), lin.gt.data(), dk + j0 * d);
  };

  T window_sum = T(0);
  // The quadratic block of block b: the window entries exactly, the far entries in the quadratic form.
  auto block_grads = [&](int64_t b) {
    const int64_t r0 = br.start(b), n = br.size(b), k0 = br.key_begin(b), nk = br.key_end(b) - k0;
    if (nk <= 0) return;
    const bool* kp = pad ? pad + k0 : nullptr;
    const uint8_t* kp8 = reinterpret_cast<const uint8_t*>(kp);
    const T* qb = hd.q + r0 * d;
    const T* kb = hd.k + k0 * d;
    gemm<T>(false, true, n, nk, d, tscale, qb, d, kb, d, T(0), sblk.data(), nk);
    gemm<T>(false, true, n, nk, dv, T(1), g + r0 * dv, dv, hd.v + k0 * dv, dv, T(0), dpb.data(), nk);  // dO . v
    for (int64_t r = 0; r < n; ++r) {
      const int64_t i = r0 + r;
      T* row = sblk.data() + r * nk;
      T* dp = dpb.data() + r * nk;
      const RowSplit sp = split_row(i, k0, nk, br.window, br.causal);
      const T delta = -gaug[i * dv1 + dv];
      window_sum += window_grads(row, dp, kp8, sp.band_begin, sp.band_end, lse[i], delta);
      far_grads(row, dp, kp8, 0, sp.far_end, fscale[i], delta);
      far_grads(row, dp, kp8, sp.far_begin, nk, fscale[i], delta);
      if (br.causal) {
        std::fill(row + sp.band_end, row + nk, T(0));
        std::fill(dp + sp.band_end, dp + nk, T(0));
      }
    }
    gemm<T>(false, false, n, d, nk, tscale, dpb.data(), nk, kb, d, T(1), dq + r0 * d, d);
    gemm<T>(true, false, nk, d, n, tscale, dpb.data(), nk, qb, d, T(1), dk + k0 * d, d);
    gemm<T>(true, false, nk, dv, n, T(1), sblk.data(), nk, g + r0 * dv, dv, T(1), dv_out + k0 * dv, dv);
  };

  // Forward sweep: the keys before each block (dq), the block itself, and (non-causal) the queries before each run of
  // keys after them (dk, dv of the keys [right_start(b), right_start(b + 1))).
  int64_t left = 0;
  bool before_nonzero = false, qbefore_nonzero = false;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t r0 = br.start(b), n = br.size(b), end = br.left_end(b);
    if (end > left) {
      add_keys(keys_before.data(), left, end - left);
      before_nonzero = true;
    }
    left = end;
    if (before_nonzero) dq_from_keys(keys_before.data(), r0, n);
    block_grads(b);
    if (!br.causal) {
      add_queries(queries_before.data(), r0, n);
      qbefore_nonzero = true;
      key_grads(queries_before.data(), br.right_start(b), br.right_start(b + 1) - br.right_start(b), qbefore_nonzero);
    }
  }
  // Backward sweep: the queries after each run of keys [left_end(b - 1), left_end(b)) (dk, dv), and (non-causal) the
  // keys after each block (dq).
  int64_t right = len;
  for (int64_t b = nb - 1; b >= 0; --b) {
    const int64_t r0 = br.start(b), n = br.size(b);
    add_queries(queries_after.data(), r0, n);
    const int64_t j0 = b > 0 ? br.left_end(b - 1) : 0, j1 = br.left_end(b);
    key_grads(queries_after.data(), j0, j1 - j0, true);
    if (!br.causal) {
      const int64_t begin = br.right_start(b);
      if (begin < right) add_keys(keys_after.data(), begin, right - begin);
      right = begin;
      if (right < len) dq_from_keys(keys_after.data(), r0, n);
    }
  }
  return window_sum;
}

// ---------------------------------------------------------------------------------------------------------
// Argument checks (the Python functions check first; these protect direct torch.ops callers).
at::ScalarType hybrid_acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Dense: q [B, H, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv], key_padding_mask [B, L] or none. Packed (cu_seqlens
// int32 [N + 1] given): q [T, H, D], k [T, Hkv, D], v [T, Hkv, Dv], no key_padding_mask (a packed sequence has none).
void check_hybrid_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& cu = c10::nullopt) {
  const bool packed = cu.has_value();
  const int64_t nd = packed ? 3 : 4, hd = 1, ld = packed ? 0 : 2;  // head and length dims
  const char* q_shape = packed ? "[T, H, D]" : "[B, H, L, D]";
  const char* k_shape = packed ? "[T, Hkv, D]" : "[B, Hkv, L, D]";
  const char* v_shape = packed ? "[T, Hkv, Dv]" : "[B, Hkv, L, Dv]";
  TORCH_CHECK(q.dim() == nd, "q must have shape ", q_shape, ", got ", q.sizes());
  TORCH_CHECK(k.dim() == nd, "k must have shape ", k_shape, ", got ", k.sizes());
  TORCH_CHECK(v.dim() == nd, "v must have shape ", v_shape, ", got ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "q, k, v must be CPU tensors");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "q must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "k and v must have q's dtype ", dt);
  const int64_t lq = q.size(ld), h = q.size(hd), hk = k.size(hd), d = q.size(nd - 1);
  TORCH_CHECK(k.size(ld) == lq && k.size(nd - 1) == d && (packed || k.size(0) == q.size(0)), "k must have shape ",
              k_shape, " with q's ", packed ? "T, D" : "B, L, D", " (hybrid attention is self-attention), got q ",
              q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(v.size(ld) == lq && v.size(hd) == hk && (packed || v.size(0) == q.size(0)), "v must have shape ",
              v_shape, " matching k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(hk == h || (hk > 0 && h % hk == 0), "the query heads of q (", h,
              ") must be a multiple of the key/value heads of k (", hk, ") (grouped-query attention)");
  TORCH_CHECK(d >= 1 && d <= kHybridMaxHeadDim, "q/k feature dim D must be in [1, ", kHybridMaxHeadDim, "], got ", d);
  TORCH_CHECK(v.size(nd - 1) <= kHybridMaxValueDim, "value dim Dv must be <= ", kHybridMaxValueDim, ", got ",
              v.size(nd - 1));
  if (mask.has_value()) {
    TORCH_CHECK(!packed, "key_padding_mask must be None with cu_seqlens (packed sequences hold no padding)");
    TORCH_CHECK(mask->scalar_type() == at::kBool, "key_padding_mask must be bool (True = padding), got ",
                mask->scalar_type());
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == q.size(2),
                "key_padding_mask must have shape [B, L] = [", q.size(0), ", ", q.size(2), "], got ", mask->sizes());
    TORCH_CHECK(mask->device().is_cpu(), "key_padding_mask must be a CPU tensor");
  }
}

void check_window_arg(int64_t window) { TORCH_CHECK(window >= 1, "window must be >= 1, got ", window); }

// The per-head far weights as doubles (1 without them): [H], finite and positive.
std::vector<double> far_weights(const c10::optional<at::Tensor>& fw, int64_t heads) {
  if (!fw.has_value()) return std::vector<double>(heads, 1.0);
  TORCH_CHECK(fw->dim() == 1 && fw->size(0) == heads, "far_weight must have shape [H] = [", heads, "], got ",
              fw->sizes());
  TORCH_CHECK(fw->is_floating_point() && fw->device().is_cpu(), "far_weight must be a floating-point CPU tensor");
  const at::Tensor w = fw->to(at::kDouble).contiguous();
  std::vector<double> out(w.data_ptr<double>(), w.data_ptr<double>() + heads);
  for (int64_t h = 0; h < heads; ++h)
    TORCH_CHECK(std::isfinite(out[h]) && out[h] > 0.0, "far_weight must be finite and positive, got ", out[h],
                " for head ", h);
  return out;
}

int64_t hybrid_chunk() { return env_int("LINATTN_CPU_HYBRID_CHUNK", kHybridChunk); }

// q, k, v in the accumulation type as the kernels' head-major buffers (dense [B, H, L, *] as they are, packed
// [T, H, *] transposed to [H, T, *]), with the padded keys' rows of k and v zeroed (so that 0 * x stays 0 in the
// GEMMs whatever a padded key holds), and the (sequence, head) tasks of the call.
struct Inputs {
  at::Tensor q, k, v, mask;
  Tasks p;
  bool packed = false;
  at::ScalarType acc;
  at::Tensor to_buffer(const at::Tensor& x) const { return packed ? head_major(x, acc) : x.to(acc).contiguous(); }
  at::Tensor from_buffer(const at::Tensor& x, at::ScalarType dt) const { return packed ? token_major(x, dt) : x.to(dt); }
  // An empty buffer of `width` columns per row (0: one value per row), and the shapes the ops return.
  at::Tensor rows(int64_t heads, int64_t width) const {
    const int64_t len = packed ? p.q.head_stride : q.size(2);
    std::vector<int64_t> shape = packed ? std::vector<int64_t>{heads, len} : std::vector<int64_t>{p.seqs, heads, len};
    if (width > 0) shape.push_back(width);
    return at::empty(shape, q.options());
  }
};

Inputs prepare(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
               const c10::optional<at::Tensor>& mask_in, const c10::optional<at::Tensor>& cu, bool causal) {
  Inputs in;
  in.acc = hybrid_acc_type(q_in.scalar_type());
  in.packed = cu.has_value();
  in.q = in.to_buffer(q_in);
  in.k = in.to_buffer(k_in);
  in.v = in.to_buffer(v_in);
  in.p = in.packed ? packed_tasks(q_in, k_in, v_in, *cu, *cu, causal) : dense_tasks(in.q, in.k, in.v);
  if (mask_in.has_value()) {
    in.mask = mask_in->contiguous();
    const at::Tensor pad = in.mask.view({in.mask.size(0), 1, in.mask.size(1), 1});
    in.k = in.k.masked_fill(pad, 0);
    in.v = in.v.masked_fill(pad, 0);
  }
  return in;
}

template <typename T>
Head<T> head_view(const Tasks& p, const Inputs& in, int64_t n, int64_t h, int64_t window, bool causal, double scale,
                  double fw) {
  const int64_t qr = p.q.row(n, h), kr = p.k.row(n, h / p.group());
  return Head<T>{in.q.data_ptr<T>() + qr * p.d,
                 in.k.data_ptr<T>() + kr * p.d,
                 in.v.data_ptr<T>() + kr * p.dv,
                 mask_ptr(in.mask, n, p.k.len[n]),
                 p.d,
                 p.dv,
                 BlockRanges{p.q.len[n], window, hybrid_chunk(), causal},
                 scale,
                 static_cast<T>(fw)};
}

// ---------------------------------------------------------------------------------------------------------
// The ops (schemas in csrc/ops.cpp).
std::tuple<at::Tensor, at::Tensor> hybrid_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, const c10::optional<at::Tensor>& mask_in,
                                                 const c10::optional<at::Tensor>& far_weight,
                                                 const c10::optional<at::Tensor>& cu_seqlens, int64_t window,
                                                 bool causal, double scale) {
  check_hybrid_qkv(q_in, k_in, v_in, mask_in, cu_seqlens);
  check_window_arg(window);
  const Inputs in = prepare(q_in, k_in, v_in, mask_in, cu_seqlens, causal);
  const Tasks& p = in.p;
  const std::vector<double> fw = far_weights(far_weight, p.heads);
  at::Tensor out = in.rows(p.heads, p.dv), lse = in.rows(p.heads, 0);  // lse stays head-major ([H, T] packed)
  AT_DISPATCH_FLOATING_TYPES(in.acc, "hybrid_fwd_cpu", [&] {
    for_each_task(p, p.heads, ColumnSplit{1, p.dv, p.dv}, [&](int64_t n, int64_t h, int64_t) {
      const Head<scalar_t> hd = head_view<scalar_t>(p, in, n, h, window, causal, scale, fw[h]);
      const int64_t qr = p.q.row(n, h);
      forward_head(hd, out.data_ptr<scalar_t>() + qr * p.dv, lse.data_ptr<scalar_t>() + qr, static_cast<scalar_t*>(nullptr), 0);
    });
  });
  return {in.from_buffer(out, q_in.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hybrid_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& mask_in, const c10::optional<at::Tensor>& far_weight,
    const c10::optional<at::Tensor>& cu_seqlens, const at::Tensor& out_in, const at::Tensor& lse_in, int64_t window,
    bool causal, double scale) {
  check_hybrid_qkv(q_in, k_in, v_in, mask_in, cu_seqlens);
  check_window_arg(window);
  const Inputs in = prepare(q_in, k_in, v_in, mask_in, cu_seqlens, causal);
  const Tasks& p = in.p;
  const std::vector<double> fw = far_weights(far_weight, p.heads);
  std::vector<int64_t> out_shape = q_in.sizes().vec();
  out_shape.back() = p.dv;
  TORCH_CHECK(grad_out.sizes() == out_in.sizes() && out_in.sizes() == at::IntArrayRef(out_shape),
              "grad_out and out must have shape ", at::IntArrayRef(out_shape), " (q's with Dv), got ",
              grad_out.sizes(), " and ", out_in.sizes());
  const at::Tensor lse_like = in.rows(p.heads, 0);
  TORCH_CHECK(lse_in.sizes() == lse_like.sizes(), "lse must have shape ", lse_like.sizes(),
              in.packed ? " ([H, T])" : " ([B, H, L])", ", got ", lse_in.sizes());
  const auto acc = in.acc;
  const at::Tensor g = in.to_buffer(grad_out), out = in.to_buffer(out_in), lse = lse_in.to(acc).contiguous();
  at::Tensor dq = at::zeros_like(in.q), dk = at::zeros_like(in.k), dv = at::zeros_like(in.v);
  at::Tensor dfw = at::zeros({p.seqs, p.heads}, in.q.options());
  const int64_t group = p.group();
  AT_DISPATCH_FLOATING_TYPES(acc, "hybrid_bwd_cpu", [&] {
    // A task per (sequence, key/value head): it owns that head's dk and dv and runs its query heads in turn.
    for_each_task(p, p.kv_heads, ColumnSplit{1, p.dv, p.dv}, [&](int64_t n, int64_t hk, int64_t) {
      const int64_t kr = p.k.row(n, hk);
      scalar_t* dkp = dk.data_ptr<scalar_t>() + kr * p.d;
      scalar_t* dvp = dv.data_ptr<scalar_t>() + kr * p.dv;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const Head<scalar_t> hd = head_view<scalar_t>(p, in, n, h, window, causal, scale, fw[h]);
        const int64_t qr = p.q.row(n, h);
        const scalar_t window_sum = backward_head(
            hd, g.data_ptr<scalar_t>() + qr * p.dv, out.data_ptr<scalar_t>() + qr * p.dv,
            lse.data_ptr<scalar_t>() + qr, dq.data_ptr<scalar_t>() + qr * p.d, dkp, dvp);
        dfw.data_ptr<scalar_t>()[n * p.heads + h] = -window_sum / hd.fw;
      }
      if (in.mask.defined()) {  // padded keys get no gradient
        const bool* pad = mask_ptr(in.mask, n, p.k.len[n]);
        for (int64_t j = 0; j < p.k.len[n]; ++j) {
          if (!pad[j]) continue;
          std::fill(dkp + j * p.d, dkp + (j + 1) * p.d, scalar_t(0));
          std::fill(dvp + j * p.dv, dvp + (j + 1) * p.dv, scalar_t(0));
        }
      }
    });
  });
  const auto dt = q_in.scalar_type();
  const at::Tensor dfw_out = far_weight.has_value() ? dfw.sum(0).to(far_weight->scalar_type()) : dfw.sum(0);
  return {in.from_buffer(dq, dt), in.from_buffer(dk, dt), in.from_buffer(dv, dt), dfw_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hybrid_prefill_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                  const at::Tensor& v_in,
                                                                  const c10::optional<at::Tensor>& mask_in,
                                                                  const c10::optional<at::Tensor>& far_weight,
                                                                  int64_t window, double scale) {
  check_hybrid_qkv(q_in, k_in, v_in, mask_in);
  check_window_arg(window);
  const Inputs in = prepare(q_in, k_in, v_in, mask_in, c10::nullopt, true);
  const Tasks& p = in.p;
  const std::vector<double> fw = far_weights(far_weight, p.heads);
  const int64_t b = q_in.size(0), len = q_in.size(2), m = 1 + p.d + p.d * (p.d + 1) / 2, group = p.group();
  at::Tensor out = at::empty({b, p.heads, len, p.dv}, in.q.options());
  at::Tensor lse = at::empty({b, p.heads, len}, in.q.options());
  // [B, Hkv, M, Dv + 1]: kv in the first Dv columns, k_sum last; written by the last query head of each group.
  at::Tensor state = at::zeros({b, p.kv_heads, m, p.dv + 1}, in.q.options());
  const int64_t state_end = std::max<int64_t>(0, len - window + 1);  // keys every later query sees beyond its window
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "hybrid_prefill_cpu", [&] {
    for_each_task(p, p.heads, ColumnSplit{1, p.dv, p.dv}, [&](int64_t n, int64_t h, int64_t) {
      const Head<scalar_t> hd = head_view<scalar_t>(p, in, n, h, window, true, scale, fw[h]);
      const int64_t qr = p.q.row(n, h), hk = h / group;
      scalar_t* st = h % group == group - 1 ? state.data_ptr<scalar_t>() + (n * p.kv_heads + hk) * m * (p.dv + 1)
                                            : nullptr;
      forward_head(hd, out.data_ptr<scalar_t>() + qr * p.dv, lse.data_ptr<scalar_t>() + qr, st, state_end);
    });
  });
  return {out.to(q_in.scalar_type()), state.narrow(-1, 0, p.dv).contiguous(), state.select(-1, p.dv).contiguous()};
}

// One decoding step of one (batch row, key/value head) and its `group` query heads (q: group x D, out: group x Dv):
// the new query attends to the ring's unpadded keys and the new key with exp weights and to the state with the
// Taylor weight, stabilized as the full forward; then the ring slot's old key (position t - W + 1, beyond the next
// query's window) moves into the state and the new key / value take its slot (W = 1: no ring, the new key goes
// into the state).
template <typename T>
void step_head(const T* q, const T* k, const T* v, bool new_pad, T* ring_k, T* ring_v, const bool* ring_pad,
               int64_t ring, int64_t slot, T* kv, T* ks, int64_t group, int64_t d, int64_t dv, double scale,
               const double* fw, T* out) {
  const FeatureMap<T> fm(static_cast<int>(d), scale);
  const int64_t m = fm.m;
  const T tscale = static_cast<T>(scale);
  std::vector<T> fq(m), s(ring + 1), num(dv), fk(m);
  const bool has_far = ks[0] > T(0);  // the constant feature counts the state's keys
  for (int64_t g = 0; g < group; ++g) {
    const T* qg = q + g * d;
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j <= ring; ++j) {
      const bool off = j < ring ? ring_pad[j] : new_pad;
      const T* kj = j < ring ? ring_k + j * d : k;
      T dot = T(0);
      for (int64_t a = 0; a < d; ++a) dot += qg[a] * kj[a];
      s[j] = off ? -std::numeric_limits<T>::infinity() : tscale * dot;
      mx = std::max(mx, s[j]);
    }
    if (has_far) mx = std::max(mx, T(0));
    if (mx == -std::numeric_limits<T>::infinity()) mx = T(0);
    std::fill(num.begin(), num.end(), T(0));
    T den = T(0);
    for (int64_t j = 0; j <= ring; ++j) {
      if (s[j] == -std::numeric_limits<T>::infinity()) continue;
      const T w = std::exp(s[j] - mx);
      const T* vj = j < ring ? ring_v + j * dv : v;
      for (int64_t col = 0; col < dv; ++col) num[col] += w * vj[col];
      den += w;
    }
    if (has_far) {
      const T coef = static_cast<T>(fw[g]) * std::exp(-mx);
      fm.build(qg, 1, fq.data());
      T zf = T(0);
      for (int64_t f = 0; f < m; ++f) {
        const T w = coef * fq[f];
        const T* row = kv + f * dv;
        for (int64_t col = 0; col < dv; ++col) num[col] += w * row[col];
        zf += fq[f] * ks[f];
      }
      den += coef * zf;
    }
    const T inv = den > T(0) ? T(1) / den : T(0);
    for (int64_t col = 0; col < dv; ++col) out[g * dv + col] = num[col] * inv;
  }
  // The key leaving the window (or, W = 1, the new key) into the state.
  const T* k_old = ring > 0 ? ring_k + slot * d : k;
  const T* v_old = ring > 0 ? ring_v + slot * dv : v;
  const bool old_pad = ring > 0 ? ring_pad[slot] : new_pad;
  if (!old_pad) {
    fm.build(k_old, 1, fk.data());
    for (int64_t f = 0; f < m; ++f) {
      T* row = kv + f * dv;
      for (int64_t col = 0; col < dv; ++col) row[col] += fk[f] * v_old[col];
      ks[f] += fk[f];
    }
  }
  if (ring > 0) {
    std::copy(k, k + d, ring_k + slot * d);
    std::copy(v, v + dv, ring_v + slot * dv);
  }
}

at::Tensor hybrid_step_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                           const c10::optional<at::Tensor>& mask_in, at::Tensor& ring_k, at::Tensor& ring_v,
                           at::Tensor& ring_pad, at::Tensor& kv, at::Tensor& k_sum, at::Tensor& position,
                           const c10::optional<at::Tensor>& far_weight, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3 && v_in.dim() == 3,
              "q must have shape [B, H, D], k [B, Hkv, D] and v [B, Hkv, Dv], got ", q_in.sizes(), ", ", k_in.sizes(),
              ", ", v_in.sizes());
  TORCH_CHECK(q_in.device().is_cpu() && k_in.device().is_cpu() && v_in.device().is_cpu(), "q, k, v must be CPU tensors");
  const int64_t b = q_in.size(0), h = q_in.size(1), hk = k_in.size(1), d = q_in.size(2), dv = v_in.size(2);
  TORCH_CHECK(k_in.size(0) == b && v_in.size(0) == b && v_in.size(1) == hk && k_in.size(2) == d,
              "k must have shape [B, Hkv, D] and v [B, Hkv, Dv] with q's B and D, got ", k_in.sizes(), " and ",
              v_in.sizes());
  TORCH_CHECK(hk > 0 && h % hk == 0, "the query heads of q (", h, ") must be a multiple of the key/value heads (", hk,
              ")");
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && q_in.scalar_type() == v_in.scalar_type(),
              "q, k, v must share a dtype");
  const int64_t m = 1 + d + d * (d + 1) / 2, group = h / hk;
  const auto acc = kv.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "the cache's state must be float32 or float64, got ", acc);
  TORCH_CHECK(ring_k.dim() == 4 && ring_k.size(0) == b && ring_k.size(1) == hk && ring_k.size(3) == d,
              "the cache's keys must have shape [B, Hkv, W - 1, D] = [", b, ", ", hk, ", W - 1, ", d, "], got ",
              ring_k.sizes());
  const int64_t ring = ring_k.size(2);
  TORCH_CHECK(ring_v.dim() == 4 && ring_v.size(0) == b && ring_v.size(1) == hk && ring_v.size(2) == ring &&
                  ring_v.size(3) == dv,
              "the cache's values must have shape [B, Hkv, W - 1, Dv] = [", b, ", ", hk, ", ", ring, ", ", dv,
              "], got ", ring_v.sizes());
  TORCH_CHECK(ring_pad.scalar_type() == at::kBool && ring_pad.dim() == 2 && ring_pad.size(0) == b &&
                  ring_pad.size(1) == ring,
              "the cache's key padding must be a bool tensor of shape [B, W - 1] = [", b, ", ", ring, "], got ",
              ring_pad.sizes());
  TORCH_CHECK(kv.dim() == 4 && kv.size(0) == b && kv.size(1) == hk && kv.size(2) == m && kv.size(3) == dv,
              "the cache's kv must have shape [B, Hkv, M, Dv] = [", b, ", ", hk, ", ", m, ", ", dv, "], got ",
              kv.sizes());
  TORCH_CHECK(k_sum.dim() == 3 && k_sum.size(0) == b && k_sum.size(1) == hk && k_sum.size(2) == m,
              "the cache's k_sum must have shape [B, Hkv, M] = [", b, ", ", hk, ", ", m, "], got ", k_sum.sizes());
  TORCH_CHECK(ring_k.scalar_type() == acc && ring_v.scalar_type() == acc && k_sum.scalar_type() == acc,
              "the cache's keys, values, kv and k_sum must share one dtype (float32 or float64)");
  TORCH_CHECK(position.scalar_type() == at::kLong && position.dim() == 1 && position.size(0) == b,
              "the cache's position must be an int64 tensor of shape [B] = [", b, "], got ", position.sizes());
  for (const at::Tensor* t : {&ring_k, &ring_v, &ring_pad, &kv, &k_sum, &position})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "the cache's tensors must be contiguous CPU tensors");
  at::Tensor mask;
  if (mask_in.has_value()) {
    TORCH_CHECK(mask_in->scalar_type() == at::kBool && mask_in->dim() == 1 && mask_in->size(0) == b,
                "key_padding_mask of a step must be a bool tensor of shape [B] = [", b, "], got ", mask_in->sizes());
    mask = mask_in->contiguous();
  }
  const std::vector<double> fw = far_weights(far_weight, h);
  const at::Tensor q = q_in.to(acc).contiguous(), k = k_in.to(acc).contiguous(), v = v_in.to(acc).contiguous();
  at::Tensor out = at::empty({b, h, dv}, q.options());
  const int64_t* pos = position.data_ptr<int64_t>();
  for (int64_t r = 0; r < b; ++r) TORCH_CHECK(pos[r] >= 0, "the cache's position must be >= 0, got ", pos[r]);
  AT_DISPATCH_FLOATING_TYPES(acc, "hybrid_step_cpu", [&] {
    at::parallel_for(0, b * hk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bk = begin; bk < end; ++bk) {
        const int64_t r = bk / hk;
        const int64_t slot = ring > 0 ? pos[r] % ring : 0;
        step_head<scalar_t>(q.data_ptr<scalar_t>() + bk * group * d, k.data_ptr<scalar_t>() + bk * d,
                            v.data_ptr<scalar_t>() + bk * dv, mask.defined() && mask.data_ptr<bool>()[r],
                            ring_k.data_ptr<scalar_t>() + bk * ring * d, ring_v.data_ptr<scalar_t>() + bk * ring * dv,
                            ring_pad.data_ptr<bool>() + r * ring, ring, slot, kv.data_ptr<scalar_t>() + bk * m * dv,
                            k_sum.data_ptr<scalar_t>() + bk * m, group, d, dv, scale, fw.data() + (bk % hk) * group,
                            out.data_ptr<scalar_t>() + bk * group * dv);
      }
    });
  });
  // Per row, after every head has read the old flags: the slot's padding flag and the position.
  int64_t* posw = position.data_ptr<int64_t>();
  bool* rp = ring_pad.data_ptr<bool>();
  for (int64_t r = 0; r < b; ++r) {
    if (ring > 0) rp[r * ring + posw[r] % ring] = mask.defined() && mask.data_ptr<bool>()[r];
    posw[r] += 1;
  }
  return out.to(q_in.scalar_type());
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(linattn_cuda, CPU, m) {
  using namespace cpu;
  m.impl("hybrid_fwd", &hybrid_fwd_cpu);
  m.impl("hybrid_bwd", &hybrid_bwd_cpu);
  m.impl("hybrid_prefill", &hybrid_prefill_cpu);
  m.impl("hybrid_step", &hybrid_step_cpu);
}

}  // namespace linattn_cuda
