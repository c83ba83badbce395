// The problem description of one Taylor attention call, shared by every compiled backend (csrc/cpu, csrc/cuda):
// the argument checks of the op family of csrc/ops.cpp in one place, with one table of limits.
//
// A call holds `seqs` independent sequences, each with `heads` query heads and `kv_heads` key/value heads:
//   dense   q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv]   (seqs = B, every sequence Lq x Lk)
//   packed  q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv] with cu_seqlens_q / cu_seqlens_k int32 [N + 1]
//           (seqs = N; sequence n is rows cu[n] .. cu[n+1] - 1; flash_attn_varlen_func's layout)
// Query head h reads key/value head h / (H / Hkv) (grouped-query attention, SDPA's convention). Causal is
// end-aligned per sequence: query i sees the keys j <= i + Lk - Lq (Lq <= Lk). A dense call may carry a key
// padding mask [B, Lk] (True = padding). An initial state (kv0 [seqs, Hkv, M, Dv], k_sum0 [seqs, Hkv, M],
// float32 or float64, M = 1 + D + D(D+1)/2) is the state of keys before the first one: every query sees it.
// The Python side checks the same things first (linattn_cuda/ops/problem.py, with the same limits); these checks
// protect direct torch.ops callers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace linattn_cuda {

// The fused kernels' limits on the q/k feature dim D and the value dim Dv (the one table of limits in C++;
// linattn_cuda/ops/problem.py holds the same numbers for the Python checks and the `auto` rule).
struct Limits {
  const char* backend;
  int64_t max_head_dim;
  int64_t max_value_dim;
};
inline constexpr Limits kCpuLimits{"cpu", 256, 256};
inline constexpr Limits kCudaLimits{"cuda", 128, 256};

// M of the symmetric second-order map.
inline int64_t taylor_features(int64_t d) { return 1 + d + d * (d + 1) / 2; }

inline at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct Problem {
  bool packed = false;
  int64_t seqs = 0, heads = 0, kv_heads = 0, d = 0, dv = 0;
  int64_t lq = 0, lk = 0;  // dense: every sequence's lengths; packed: the token counts Tq, Tk
  bool causal = false;
  double scale = 1.0;
  bool has_mask = false;   // dense only
  bool has_state = false;  // an initial state kv0 / k_sum0
  at::ScalarType dtype = at::kFloat;
  at::ScalarType state_dtype = at::kFloat;  // the initial state's, else float32 (float64 for float64 inputs)

  int64_t group() const { return kv_heads > 0 ? heads / kv_heads : 1; }
  int64_t features() const { return taylor_features(d); }
  // The shapes of the outputs: out, den (q's shape without D, in the accumulation type), a state.
  std::vector<int64_t> out_shape() const {
    return packed ? std::vector<int64_t>{lq, heads, dv} : std::vector<int64_t>{seqs, heads, lq, dv};
  }
  std::vector<int64_t> den_shape() const {
    return packed ? std::vector<int64_t>{lq, heads} : std::vector<int64_t>{seqs, heads, lq};
  }
  std::vector<int64_t> state_shape() const { return {seqs, kv_heads, features(), dv}; }
  std::vector<int64_t> state_sum_shape() const { return {seqs, kv_heads, features()}; }
};

namespace detail {

inline void check_float(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, name,
              " must be a float16, bfloat16, float32 or float64 tensor, got ", st);
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), name, " must be on the device of q (", q.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have the dtype of q (", q.scalar_type(), "), got ",
              t.scalar_type());
}

inline void check_cu(const at::Tensor& cu, const char* name, const at::Tensor& q) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, name, " must be an int32 tensor, got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, name, " must have shape [N + 1] (N sequences), got ", cu.sizes());
  TORCH_CHECK(cu.device() == q.device(), name, " must be on the device of q (", q.device(), "), got ", cu.device());
}

}  // namespace detail

// Checks the inputs shared by the op family (taylor_fwd, taylor_bwd) and describes the call.
inline Problem describe_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
                                const std::optional<at::Tensor>& cu_k, const std::optional<at::Tensor>& kv0,
                                const std::optional<at::Tensor>& k_sum0, bool causal, double scale,
                                const Limits& limits) {
  Problem p;
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(),
              "cu_seqlens_q and cu_seqlens_k must be given together (packed sequences) or both be None");
  p.packed = cu_q.has_value();
  const int64_t ndim = p.packed ? 3 : 4;
  const char* q_layout = p.packed ? "[Tq, H, D]" : "[B, H, Lq, D]";
  const char* k_layout = p.packed ? "[Tk, Hkv, D]" : "[B, Hkv, Lk, D]";
  const char* v_layout = p.packed ? "[Tk, Hkv, Dv]" : "[B, Hkv, Lk, Dv]";
  TORCH_CHECK(q.dim() == ndim, "q must have shape ", q_layout, ", got ", q.sizes());
  TORCH_CHECK(k.dim() == ndim, "k must have shape ", k_layout, ", got ", k.sizes());
  TORCH_CHECK(v.dim() == ndim, "v must have shape ", v_layout, ", got ", v.sizes());
  detail::check_float(q, "q");
  detail::check_like(k, "k", q);
  detail::check_like(v, "v", q);
  p.dtype = q.scalar_type();
  const int64_t hd = ndim - 2;  // the head dim: 1 in both layouts
  (void)hd;
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.d = q.size(ndim - 1);
  p.dv = v.size(ndim - 1);
  TORCH_CHECK(v.size(1) == p.kv_heads, "v must have the key/value heads of k (", p.kv_heads, "), got shape ", v.sizes());
  TORCH_CHECK(p.kv_heads == p.heads || (p.kv_heads > 0 && p.heads % p.kv_heads == 0), "the query heads of q (",
              p.heads, ") must be a multiple of the key/value heads of k (", p.kv_heads,
              ") (grouped-query attention), got shapes ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(k.size(ndim - 1) == p.d, "k must have the feature dim D of q (", p.d, "), got shape ", k.sizes());
  TORCH_CHECK(p.d >= 1 && p.d <= limits.max_head_dim, "the ", limits.backend, " kernels take a q/k feature dim 1 <= D <= ",
              limits.max_head_dim, ", got D = ", p.d);
  TORCH_CHECK(p.dv <= limits.max_value_dim, "the ", limits.backend, " kernels take a value dim Dv <= ",
              limits.max_value_dim, ", got Dv = ", p.dv);
  TORCH_CHECK(std::isfinite(scale) && scale > 0.0, "scale must be a finite positive number, got ", scale);
  p.scale = scale;
  p.causal = causal;
  if (p.packed) {
    detail::check_cu(*cu_q, "cu_seqlens_q", q);
    detail::check_cu(*cu_k, "cu_seqlens_k", q);
    TORCH_CHECK(cu_k->size(0) == cu_q->size(0), "cu_seqlens_k must have the length of cu_seqlens_q (", cu_q->size(0),
                ": N + 1), got ", cu_k->size(0));
    TORCH_CHECK(v.size(0) == k.size(0), "v must have the token count Tk of k (", k.size(0), "), got shape ", v.sizes());
    TORCH_CHECK(!mask.has_value(), "key_padding_mask is for dense [B, H, L, D] inputs; packed sequences have no padding");
    TORCH_CHECK(q.size(0) <= std::numeric_limits<int32_t>::max() && k.size(0) <= std::numeric_limits<int32_t>::max(),
                "packed inputs hold at most 2^31 - 1 tokens (int32 cu_seqlens)");
    p.seqs = cu_q->size(0) - 1;
    p.lq = q.size(0);
    p.lk = k.size(0);
  } else {
    p.seqs = q.size(0);
    p.lq = q.size(2);
    p.lk = k.size(2);
    TORCH_CHECK(k.size(0) == p.seqs, "k must have the batch size of q (", p.seqs, "), got shape ", k.sizes());
    TORCH_CHECK(v.size(0) == p.seqs && v.size(2) == p.lk, "v must have shape [B, Hkv, Lk, Dv] matching k ", k.sizes(),
                ", got ", v.sizes());
    TORCH_CHECK(!causal || p.lq <= p.lk, "causal attention needs Lq <= Lk (end-aligned: query i sees keys j <= i + Lk - Lq), "
                "got q length ", p.lq, " and k length ", p.lk);
    if (mask.has_value()) {
      TORCH_CHECK(mask->scalar_type() == at::kBool, "key_padding_mask must have dtype torch.bool (True = padding), got ",
                  mask->scalar_type());
      TORCH_CHECK(mask->dim() == 2 && mask->size(0) == p.seqs && mask->size(1) == p.lk,
                  "key_padding_mask must have shape [B, Lk] = [", p.seqs, ", ", p.lk, "], got ", mask->sizes());
      TORCH_CHECK(mask->device() == q.device(), "key_padding_mask must be on the device of q (", q.device(), "), got ",
                  mask->device());
      p.has_mask = true;
    }
  }
  TORCH_CHECK(kv0.has_value() == k_sum0.has_value(),
              "kv0 and k_sum0 must be given together (the state of a preceding prefix) or both be None");
  p.state_dtype = accumulate_type(p.dtype);
  if (kv0.has_value()) {
    const int64_t m = p.features();
    TORCH_CHECK(kv0->dim() == 4 && kv0->size(0) == p.seqs && kv0->size(1) == p.kv_heads && kv0->size(2) == m &&
                    kv0->size(3) == p.dv,
                "kv0 must have shape [N, Hkv, M, Dv] = [", p.seqs, ", ", p.kv_heads, ", ", m, ", ", p.dv, "] (M = ", m,
                " features for D = ", p.d, "), got ", kv0->sizes());
    TORCH_CHECK(k_sum0->dim() == 3 && k_sum0->size(0) == p.seqs && k_sum0->size(1) == p.kv_heads &&
                    k_sum0->size(2) == m,
                "k_sum0 must have shape [N, Hkv, M] = [", p.seqs, ", ", p.kv_heads, ", ", m, "], got ", k_sum0->sizes());
    TORCH_CHECK(kv0->scalar_type() == at::kFloat || kv0->scalar_type() == at::kDouble,
                "kv0 must be float32 or float64, got ", kv0->scalar_type());
    TORCH_CHECK(k_sum0->scalar_type() == kv0->scalar_type(), "k_sum0 must have the dtype of kv0 (",
                kv0->scalar_type(), "), got ", k_sum0->scalar_type());
    TORCH_CHECK(kv0->device() == q.device() && k_sum0->device() == q.device(),
                "kv0 and k_sum0 must be on the device of q (", q.device(), ")");
    p.has_state = true;
    p.state_dtype = kv0->scalar_type();
  }
  return p;
}

// The extra inputs of taylor_bwd: grad_out and out with the output's shape, den with its shape (accumulation
// type), and the gradients of the final state (both or neither) with the state's shapes.
inline void check_backward(const Problem& p, const at::Tensor& q, const at::Tensor& grad_out, const at::Tensor& out,
                           const at::Tensor& den, const std::optional<at::Tensor>& grad_kv,
                           const std::optional<at::Tensor>& grad_k_sum) {
  const auto shape = p.out_shape();
  const char* layout = p.packed ? "[Tq, H, Dv]" : "[B, H, Lq, Dv]";
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(shape), "grad_out must have shape ", layout, " = ",
              at::IntArrayRef(shape), ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(shape), "out must have shape ", layout, " = ", at::IntArrayRef(shape),
              ", got ", out.sizes());
  detail::check_float(grad_out, "grad_out");
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device(),
              "grad_out and out must be on the device of q (", q.device(), ")");
  const auto dshape = p.den_shape();
  TORCH_CHECK(den.sizes() == at::IntArrayRef(dshape), "den must have shape ", at::IntArrayRef(dshape),
              " (the forward's normalizer), got ", den.sizes());
  TORCH_CHECK(den.scalar_type() == accumulate_type(p.dtype), "den must be ", accumulate_type(p.dtype),
              " (the forward's normalizer), got ", den.scalar_type());
  TORCH_CHECK(den.device() == q.device(), "den must be on the device of q (", q.device(), "), got ", den.device());
  TORCH_CHECK(grad_kv.has_value() == grad_k_sum.has_value(), "grad_kv and grad_k_sum must be given together or both be None");
  if (grad_kv.has_value()) {
    TORCH_CHECK(grad_kv->sizes() == at::IntArrayRef(p.state_shape()), "grad_kv must have the shape of the state ",
                at::IntArrayRef(p.state_shape()), ", got ", grad_kv->sizes());
    TORCH_CHECK(grad_k_sum->sizes() == at::IntArrayRef(p.state_sum_shape()), "grad_k_sum must have the shape ",
                at::IntArrayRef(p.state_sum_shape()), ", got ", grad_k_sum->sizes());
    TORCH_CHECK(grad_kv->is_floating_point() && grad_k_sum->is_floating_point(), "grad_kv and grad_k_sum must be floating point");
    TORCH_CHECK(grad_kv->device() == q.device() && grad_k_sum->device() == q.device(),
                "grad_kv and grad_k_sum must be on the device of q (", q.device(), ")");
  }
}

// taylor_step: q [B, H, D], k [B, Hkv, D], v [B, Hkv, Dv], state kv [B, Hkv, M, Dv], k_sum [B, Hkv, M] (float32 or
// float64). Returns the problem (seqs = B, lq = lk = 1).
inline Problem describe_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv,
                             const at::Tensor& k_sum, double scale, const Limits& limits) {
  TORCH_CHECK(q.dim() == 3, "q must have shape [B, H, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 3, "k must have shape [B, Hkv, D], got ", k.sizes());
  TORCH_CHECK(v.dim() == 3, "v must have shape [B, Hkv, Dv], got ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "k and v must have the batch size of q (", q.size(0),
              "), got shapes ", k.sizes(), " and ", v.sizes());
  // the step is the dense problem of one query against one key, with the state as its initial state
  return describe_problem(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), std::nullopt, std::nullopt, std::nullopt,
                          kv, k_sum, /*causal=*/true, scale, limits);
}

}  // namespace linattn_cuda
