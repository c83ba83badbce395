// The torch-facing side of the CUDA kernels: argument checks, output allocation (NaN-poisoned when
// LINATTN_POISON_OUTPUTS=1), the choice between the quadratic and the linear form, and the launches on the
// current stream under a device guard. Included by taylor_cuda.cu (which registers the ops for the CUDA
// dispatch key) and by emu/emu_module.cpp (the same code on CPU tensors, kernels run by the emulator).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#ifndef LINATTN_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "../include/problem.h"
#include "common.cuh"

namespace linattn {

using at::Tensor;

constexpr int64_t kMaxHeadDim = 128;
constexpr int64_t kMaxValueDim = 256;

// ------------------------------------------------------------------------------------------ environment

inline std::string env_str(const char* name) {
  const char* e = std::getenv(name);
  return e == nullptr ? std::string() : std::string(e);
}

inline bool env_on(const char* name) {
  const std::string s = env_str(name);
  return !s.empty() && s != "0" && s != "false" && s != "off";
}

// Outputs and scratch buffers: uninitialised, or all NaN under LINATTN_POISON_OUTPUTS=1 (tests), so that an
// element a kernel forgets to write shows up.
inline Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
  if (env_on("LINATTN_POISON_OUTPUTS") && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// ------------------------------------------------------------------------------------------ device glue

#ifdef LINATTN_EMULATE
inline void check_device(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the emulated CUDA kernels, got ", t.device());
}
inline DeviceInfo device_info(const Tensor&) {
  DeviceInfo d;
  d.cc_major = 9;
  d.sm_count = 132;
  d.smem_optin = 227 * 1024;
  return d;
}
inline la_stream_t current_stream(const Tensor&) { return nullptr; }
#define LA_DEVICE_GUARD(t) (void)(t)
#else
inline void check_device(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t.device());
}
inline DeviceInfo device_info(const Tensor& t) {
  const int dev = t.get_device();
  DeviceInfo d;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return d;
}
inline la_stream_t current_stream(const Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}
#define LA_DEVICE_GUARD(t) const c10::cuda::CUDAGuard la_device_guard((t).device())
#endif

// ------------------------------------------------------------------------------------------ checks

inline DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::F32;
    case at::kHalf:
      return DType::F16;
    case at::kBFloat16:
      return DType::BF16;
    case at::kDouble:
      return DType::F64;
    default:
      TORCH_CHECK(false, "linattn_cuda: unsupported dtype ", t.scalar_type());
  }
}

inline at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_float_tensor(const Tensor& t, const char* name, int64_t ndim, const char* layout) {
  TORCH_CHECK(t.dim() == ndim, name, " must have shape ", layout, " (", ndim, " dims), got ", t.sizes());
  check_device(t, name);
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, name,
              " must be a float16, bfloat16, float32 or float64 tensor, got ", st);
}

inline void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(), "), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_scale(double scale) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0.0, "scale must be a finite positive number, got ", scale);
}

inline void check_dims(int64_t D, int64_t Dv) {
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, "q and k must have a feature dim 1 <= D <= ", kMaxHeadDim,
              " for the CUDA kernels, got D = ", D);
  TORCH_CHECK(Dv >= 1 && Dv <= kMaxValueDim, "v must have a value dim 1 <= Dv <= ", kMaxValueDim,
              " for the CUDA kernels, got Dv = ", Dv);
}

struct Dims {
  int64_t B, H, Lq, Lk, D, Dv;
};

inline Dims check_attention(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                            bool causal, double scale) {
  check_float_tensor(q, "q", 4, "[B, H, Lq, D]");
  check_float_tensor(k, "k", 4, "[B, H, Lk, D]");
  check_float_tensor(v, "v", 4, "[B, H, Lk, Dv]");
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  const Dims d{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == d.B && k.size(1) == d.H, "k must have the batch and head sizes of q (", d.B, ", ", d.H,
              "), got shape ", k.sizes());
  TORCH_CHECK(v.size(0) == d.B && v.size(1) == d.H, "v must have the batch and head sizes of q (", d.B, ", ", d.H,
              "), got shape ", v.sizes());
  TORCH_CHECK(k.size(3) == d.D, "k must have the feature dim D of q (", d.D, "), got shape ", k.sizes());
  TORCH_CHECK(v.size(2) == d.Lk, "v must have the length Lk of k (", d.Lk, "), got shape ", v.sizes());
  check_dims(d.D, d.Dv);
  TORCH_CHECK(!causal || d.Lq == d.Lk, "causal attention needs Lq == Lk, got q length ", d.Lq, " and k length ", d.Lk);
  TORCH_CHECK(d.Lq < INT_MAX && d.Lk < INT_MAX, "sequence lengths must be below 2^31");
  check_scale(scale);
  if (mask.has_value()) {
    const Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "key_padding_mask must have dtype torch.bool (True = padding), got ",
                m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == d.B && m.size(1) == d.Lk, "key_padding_mask must have shape [B, Lk] = [",
                d.B, ", ", d.Lk, "], got ", m.sizes());
    TORCH_CHECK(m.device() == q.device(), "key_padding_mask must be on the device of q (", q.device(), "), got ",
                m.device());
  }
  return d;
}

inline void check_state(const Tensor& kv, const Tensor& k_sum, const Dims& d, const Tensor& q, const char* kv_name,
                        const char* ks_name) {
  const int64_t M = feature_count(static_cast<int>(d.D));
  TORCH_CHECK(kv.dim() == 4 && kv.size(0) == d.B && kv.size(1) == d.H && kv.size(2) == M && kv.size(3) == d.Dv,
              kv_name, " must have shape [B, H, M, Dv] = [", d.B, ", ", d.H, ", ", M, ", ", d.Dv, "] (M = ", M,
              " features for D = ", d.D, "), got ", kv.sizes());
  TORCH_CHECK(k_sum.dim() == 3 && k_sum.size(0) == d.B && k_sum.size(1) == d.H && k_sum.size(2) == M, ks_name,
              " must have shape [B, H, M] = [", d.B, ", ", d.H, ", ", M, "], got ", k_sum.sizes());
  TORCH_CHECK(kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kDouble, kv_name,
              " must be float32 or float64, got ", kv.scalar_type());
  TORCH_CHECK(k_sum.scalar_type() == kv.scalar_type(), ks_name, " must have the dtype of ", kv_name, " (",
              kv.scalar_type(), "), got ", k_sum.scalar_type());
  TORCH_CHECK(kv.device() == q.device(), kv_name, " must be on the device of q (", q.device(), "), got ", kv.device());
  TORCH_CHECK(k_sum.device() == q.device(), ks_name, " must be on the device of q (", q.device(), "), got ",
              k_sum.device());
}

// ------------------------------------------------------------------------------------------ dispatch

enum class Form { Quadratic, LinearTC, LinearSimt };

// LINATTN_CUDA_FORM=quadratic|linear forces a form (tests, benchmarks); LINATTN_CUDA_TC=0 disables tensor cores.
inline Form choose_form(DType dt, const Dims& d, bool causal, const DeviceInfo& dev) {
  const std::string force = env_str("LINATTN_CUDA_FORM");
  const bool tc = env_str("LINATTN_CUDA_TC") != "0" &&
                  chunk_supported(dt, static_cast<int>(d.D), static_cast<int>(d.Dv), dev);
  const double M = feature_count(static_cast<int>(d.D));
  const double state_bytes = static_cast<double>(d.B) * d.H * M * (d.Dv + 1) * (dt == DType::F64 ? 8 : 4);
  const bool simt_linear_ok = !causal && state_bytes <= 2.0e9;
  if (force == "quadratic") return Form::Quadratic;
  if (force == "linear") return tc ? Form::LinearTC : (simt_linear_ok ? Form::LinearSimt : Form::Quadratic);
  if (causal) return tc ? Form::LinearTC : Form::Quadratic;
  // Non-causal: the cheaper form by multiply-adds (quadratic: Lq Lk (D + Dv); linear: (Lq + Lk) M (Dv + 1)).
  const double quad = static_cast<double>(d.Lq) * d.Lk * (d.D + d.Dv);
  const double lin = static_cast<double>(d.Lq + d.Lk) * M * (d.Dv + 1);
  if (lin < quad) {
    if (tc) return Form::LinearTC;
    if (simt_linear_ok && 2.0 * lin < quad) return Form::LinearSimt;
  }
  return Form::Quadratic;
}

inline int dv_slice_setting() {
  const std::string s = env_str("LINATTN_CUDA_DV_SLICE");
  if (s == "32") return 32;
  if (s == "64") return 64;
  return 0;
}

// Sequence segments for the chunked kernels when batch*heads*value-slices leave SMs idle: each segment of
// seg_len tokens (whole chunks of 64) gets its own blocks, started from the state of the tokens before it
// (a first pass computes every segment's own state, then prefix sums). LINATTN_CUDA_SEGMENTS=n forces n.
struct Segments {
  int64_t nseg = 1;
  int64_t seg_len = 0;
};

inline Segments choose_segments(int64_t BH, int64_t L, int64_t slices, const DeviceInfo& dev) {
  constexpr int64_t kChunk = 64;
  const int64_t nchunks = (L + kChunk - 1) / kChunk;
  int64_t n = 1;
  const std::string forced = env_str("LINATTN_CUDA_SEGMENTS");
  if (!forced.empty()) {
    n = std::atoll(forced.c_str());
  } else {
    const int64_t blocks = BH * slices;
    if (blocks > 0 && blocks < dev.sm_count && nchunks >= 4) {
      n = std::min<int64_t>((2 * dev.sm_count + blocks - 1) / blocks, nchunks / 2);  // >= 2 chunks each
    }
  }
  n = std::max<int64_t>(1, std::min<int64_t>({n, nchunks, 64}));
  Segments s;
  if (n <= 1) return s;
  s.seg_len = (nchunks + n - 1) / n * kChunk;
  s.nseg = (L + s.seg_len - 1) / s.seg_len;
  if (s.nseg <= 1) return Segments{};
  return s;
}

// The sum over all segments (dim 2 of a [B, H, nseg, ...] float32 tensor), repeated for every segment.
inline Tensor total_over_segments(const Tensor& x) { return x.sum(2, /*keepdim=*/true).expand_as(x).contiguous(); }

// Exclusive prefix (reverse=false: sum of the segments before) or suffix (reverse=true: after) sums over
// dim 2 of a [B, H, nseg, ...] float32 tensor, plus `base` (or nothing) broadcast over the segments.
inline Tensor exclusive_segment_sums(const Tensor& x, bool reverse, const Tensor& base) {
  const int64_t n = x.size(2);
  Tensor out = new_buffer(x.sizes(), x.options());
  Tensor incl = reverse ? x.flip({2}).cumsum(2).flip({2}) : x.cumsum(2);
  if (reverse) {
    out.narrow(2, 0, n - 1).copy_(incl.narrow(2, 1, n - 1));
    out.narrow(2, n - 1, 1).zero_();
  } else {
    out.narrow(2, 0, 1).zero_();
    out.narrow(2, 1, n - 1).copy_(incl.narrow(2, 0, n - 1));
  }
  if (base.defined()) out.add_(base.unsqueeze(2));
  return out;
}

inline AttnParams attn_params(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                              const Dims& d, bool causal, double scale) {
  AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  p.B = static_cast<int>(d.B);
  p.H = static_cast<int>(d.H);
  p.Lq = static_cast<int>(d.Lq);
  p.Lk = static_cast<int>(d.Lk);
  p.D = static_cast<int>(d.D);
  p.Dv = static_cast<int>(d.Dv);
  p.M = feature_count(p.D);
  p.causal = causal;
  p.scale = scale;
  return p;
}

inline std::optional<Tensor> contiguous_mask(const std::optional<Tensor>& mask) {
  if (!mask.has_value()) return std::nullopt;
  return mask->contiguous();
}

// ------------------------------------------------------------------------------------------ ops

// The quadratic form: tensor cores when the dtype and device allow (LINATTN_CUDA_TC=0: CUDA cores).
inline void launch_quadratic(DType dt, const AttnParams& p, const DeviceInfo& dev, la_stream_t stream) {
  if (env_str("LINATTN_CUDA_TC") != "0" && quad_tc_supported(dt, p.D, p.Dv, dev)) {
    launch_quad_tc(dt, p, dev, stream);
  } else {
    launch_quad_fwd(dt, p, dev, stream);
  }
}

// The tensor-core causal walk from the state (kv0, ks0) (undefined: zero), writing p.out / p.den and, when
// kv_out is given, the final state; split in sequence segments when that adds parallelism. f32: float32
// options on the device.
inline void chunk_causal_forward(DType dt, AttnParams p, const Dims& d, const at::TensorOptions& f32,
                                 const Tensor& kv0, const Tensor& ks0, Tensor* kv_out, Tensor* ks_out,
                                 const DeviceInfo& dev, la_stream_t stream) {
  const int setting = dv_slice_setting();
  const int ds1 = chunk_dv_slice(p, setting, dev);
  const Segments sg = choose_segments(d.B * d.H, d.Lq, (d.Dv + ds1 - 1) / ds1, dev);
  p.kv0 = kv0.defined() ? kv0.data_ptr() : nullptr;
  p.ks0 = ks0.defined() ? ks0.data_ptr() : nullptr;
  p.kv_out = kv_out != nullptr ? kv_out->data_ptr() : nullptr;
  p.ks_out = ks_out != nullptr ? ks_out->data_ptr() : nullptr;
  if (sg.nseg <= 1) {
    launch_chunk(dt, p, setting, dev, stream);
    return;
  }
  const int64_t M = p.M;
  p.nseg = static_cast<int>(sg.nseg);
  p.seg_len = static_cast<int>(sg.seg_len);
  const int ds = chunk_dv_slice(p, setting, dev);
  // 1. every segment's own state
  Tensor seg_kv = new_buffer({d.B, d.H, sg.nseg, M, d.Dv}, f32);
  Tensor seg_ks = new_buffer({d.B, d.H, sg.nseg, M}, f32);
  AttnParams ps = p;
  ps.state_only = true;
  ps.out = nullptr;
  ps.den = nullptr;
  ps.kv0 = nullptr;
  ps.ks0 = nullptr;
  ps.kv_out = seg_kv.data_ptr();
  ps.ks_out = seg_ks.data_ptr();
  launch_chunk(dt, ps, ds, dev, stream);
  // 2. the state before each segment
  const Tensor init_kv = exclusive_segment_sums(seg_kv, false, kv0);
  const Tensor init_ks = exclusive_segment_sums(seg_ks, false, ks0);
  // 3. every segment's walk from its state
  AttnParams pw = p;
  pw.kv0 = init_kv.data_ptr();
  pw.ks0 = init_ks.data_ptr();
  pw.kv_out = nullptr;
  pw.ks_out = nullptr;
  launch_chunk(dt, pw, ds, dev, stream);
  if (kv_out != nullptr) {
    const int64_t last = sg.nseg - 1;
    kv_out->copy_(init_kv.select(2, last).add(seg_kv.select(2, last)));
    ks_out->copy_(init_ks.select(2, last).add(seg_ks.select(2, last)));
  }
}

// The tensor-core non-causal linear form; with segments (few batch*heads): a pass for each key segment's
// state, their sum, then every query segment reads it.
inline void chunk_noncausal_forward(DType dt, AttnParams p, const Dims& d, const at::TensorOptions& f32,
                                    const DeviceInfo& dev, la_stream_t stream) {
  const int setting = dv_slice_setting();
  const int ds1 = chunk_dv_slice(p, setting, dev);
  const Segments sg = choose_segments(d.B * d.H, std::max(d.Lq, d.Lk), (d.Dv + ds1 - 1) / ds1, dev);
  if (sg.nseg <= 1) {
    launch_chunk(dt, p, setting, dev, stream);
    return;
  }
  p.nseg = static_cast<int>(sg.nseg);
  p.seg_len = static_cast<int>(sg.seg_len);
  const int ds = chunk_dv_slice(p, setting, dev);
  Tensor seg_kv = new_buffer({d.B, d.H, sg.nseg, p.M, d.Dv}, f32);
  Tensor seg_ks = new_buffer({d.B, d.H, sg.nseg, p.M}, f32);
  AttnParams ps = p;
  ps.state_only = true;
  ps.out = nullptr;
  ps.den = nullptr;
  ps.kv_out = seg_kv.data_ptr();
  ps.ks_out = seg_ks.data_ptr();
  launch_chunk(dt, ps, ds, dev, stream);
  const Tensor all_kv = total_over_segments(seg_kv);
  const Tensor all_ks = total_over_segments(seg_ks);
  AttnParams pq = p;
  pq.kv0 = all_kv.data_ptr();
  pq.ks0 = all_ks.data_ptr();
  launch_chunk(dt, pq, ds, dev, stream);
}

inline std::tuple<Tensor, Tensor> taylor_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                             const std::optional<Tensor>& mask_in, bool causal, double scale) {
  const Dims d = check_attention(q_in, k_in, v_in, mask_in, causal, scale);
  LA_DEVICE_GUARD(q_in);
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const std::optional<Tensor> mask = contiguous_mask(mask_in);
  const auto acc = q.options().dtype(acc_type(q.scalar_type()));
  Tensor out = new_buffer({d.B, d.H, d.Lq, d.Dv}, q.options());
  Tensor den = new_buffer({d.B, d.H, d.Lq}, acc);
  if (d.B * d.H * d.Lq == 0) return {out, den};
  if (d.Lk == 0) {  // no keys: every query sees nothing
    out.zero_();
    den.zero_();
    return {out, den};
  }
  AttnParams p = attn_params(q, k, v, mask, d, causal, scale);
  p.out = out.data_ptr();
  p.den = den.data_ptr();
  const DType dt = dtype_of(q);
  const DeviceInfo dev = device_info(q);
  const la_stream_t stream = current_stream(q);
  switch (choose_form(dt, d, causal, dev)) {
    case Form::LinearTC:
      if (causal) {
        chunk_causal_forward(dt, p, d, acc, Tensor(), Tensor(), nullptr, nullptr, dev, stream);
      } else {
        chunk_noncausal_forward(dt, p, d, acc, dev, stream);
      }
      break;
    case Form::LinearSimt: {
      Tensor kv = new_buffer({d.B, d.H, p.M, d.Dv}, acc);
      Tensor ks = new_buffer({d.B, d.H, p.M}, acc);
      AttnParams ps = p;
      ps.kv_out = kv.data_ptr();
      ps.ks_out = ks.data_ptr();
      launch_state_accum(dt, ps, dev, stream);
      AttnParams pr = p;
      pr.kv0 = kv.data_ptr();
      pr.ks0 = ks.data_ptr();
      launch_state_read(dt, pr, /*finalize=*/true, nullptr, nullptr, dev, stream);
      break;
    }
    case Form::Quadratic:
      launch_quadratic(dt, p, dev, stream);
      break;
  }
  return {out, den};
}

inline std::tuple<Tensor, Tensor, Tensor> taylor_bwd(const Tensor& grad_out_in, const Tensor& q_in,
                                                     const Tensor& k_in, const Tensor& v_in,
                                                     const std::optional<Tensor>& mask_in, const Tensor& out_in,
                                                     const Tensor& den_in, bool causal, double scale) {
  const Dims d = check_attention(q_in, k_in, v_in, mask_in, causal, scale);
  check_float_tensor(grad_out_in, "grad_out", 4, "[B, H, Lq, Dv]");
  check_like(grad_out_in, "grad_out", q_in, "q");
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef({d.B, d.H, d.Lq, d.Dv}), "grad_out must have shape [B, H, Lq, Dv] = [",
              d.B, ", ", d.H, ", ", d.Lq, ", ", d.Dv, "], got ", grad_out_in.sizes());
  check_float_tensor(out_in, "out", 4, "[B, H, Lq, Dv]");
  check_like(out_in, "out", q_in, "q");
  TORCH_CHECK(out_in.sizes() == grad_out_in.sizes(), "out must have shape [B, H, Lq, Dv] = ", grad_out_in.sizes(),
              ", got ", out_in.sizes());
  const auto acc_st = acc_type(q_in.scalar_type());
  TORCH_CHECK(den_in.dim() == 3 && den_in.size(0) == d.B && den_in.size(1) == d.H && den_in.size(2) == d.Lq,
              "den must have shape [B, H, Lq] = [", d.B, ", ", d.H, ", ", d.Lq, "], got ", den_in.sizes());
  TORCH_CHECK(den_in.scalar_type() == acc_st, "den must be ", acc_st, " (the forward's normalizer), got ",
              den_in.scalar_type());
  TORCH_CHECK(den_in.device() == q_in.device(), "den must be on the device of q (", q_in.device(), "), got ",
              den_in.device());
  LA_DEVICE_GUARD(q_in);
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous(), den = den_in.contiguous();
  const std::optional<Tensor> mask = contiguous_mask(mask_in);
  Tensor dq = new_buffer(q.sizes(), q.options());
  Tensor dk = new_buffer(k.sizes(), k.options());
  Tensor dv = new_buffer(v.sizes(), v.options());
  if (d.B * d.H == 0) return {dq, dk, dv};
  if (d.Lq == 0 || d.Lk == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const auto acc = q.options().dtype(acc_st);
  Tensor gt = new_buffer({d.B, d.H, d.Lq, d.Dv}, acc);
  Tensor delta = new_buffer({d.B, d.H, d.Lq}, acc);
  BwdParams p{};
  p.dout = grad_out.data_ptr();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  p.out = out.data_ptr();
  p.den = den.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.gt = gt.data_ptr();
  p.delta = delta.data_ptr();
  p.B = static_cast<int>(d.B);
  p.H = static_cast<int>(d.H);
  p.Lq = static_cast<int>(d.Lq);
  p.Lk = static_cast<int>(d.Lk);
  p.D = static_cast<int>(d.D);
  p.Dv = static_cast<int>(d.Dv);
  p.causal = causal;
  p.scale = scale;
  const DType dt = dtype_of(q);
  const DeviceInfo dev = device_info(q);
  const la_stream_t stream = current_stream(q);
  launch_bwd_prep(dt, p, stream);
  if (choose_form(dt, d, causal, dev) == Form::LinearTC &&
      chunk_bwd_supported(dt, static_cast<int>(d.D), static_cast<int>(d.Dv), dev)) {
    const int ds = chunk_bwd_dv_slice(dt, p, dv_slice_setting(), dev);
    const int64_t nslices = (d.Dv + ds - 1) / ds;
    const auto f32 = q.options().dtype(at::kFloat);
    Tensor dq_part, dk_part;
    if (nslices > 1) {  // dq and dk are sums over the value-column slices
      dq_part = new_buffer({nslices, d.B * d.H * d.Lq * d.D}, f32);
      dk_part = new_buffer({nslices, d.B * d.H * d.Lk * d.D}, f32);
    }
    const Segments sg = choose_segments(d.B * d.H, std::max(d.Lq, d.Lk), nslices, dev);
    Tensor s_init, sz_init, r_init, rz_init;
    if (sg.nseg > 1) {  // causal segments start from the key state before them (dq) and the query state after
                        // (dk, dv); non-causal ones from the states over all keys and all queries
      const int64_t M = feature_count(p.D);
      p.nseg = static_cast<int>(sg.nseg);
      p.seg_len = static_cast<int>(sg.seg_len);
      AttnParams pa = attn_params(q, k, v, mask, d, /*causal=*/true, scale);
      pa.nseg = p.nseg;
      pa.seg_len = p.seg_len;
      pa.state_only = true;
      Tensor seg_kv = new_buffer({d.B, d.H, sg.nseg, M, d.Dv}, f32);
      Tensor seg_ks = new_buffer({d.B, d.H, sg.nseg, M}, f32);
      pa.kv_out = seg_kv.data_ptr();
      pa.ks_out = seg_ks.data_ptr();
      launch_chunk(dt, pa, chunk_dv_slice(pa, dv_slice_setting(), dev), dev, stream);
      s_init = causal ? exclusive_segment_sums(seg_kv, false, Tensor()) : total_over_segments(seg_kv);
      sz_init = causal ? exclusive_segment_sums(seg_ks, false, Tensor()) : total_over_segments(seg_ks);
      Tensor seg_r = new_buffer({d.B, d.H, sg.nseg, M, d.Dv}, f32);
      Tensor seg_rz = new_buffer({d.B, d.H, sg.nseg, M}, f32);
      BwdParams pr = p;
      pr.state_only = true;
      pr.r_out = seg_r.data_ptr<float>();
      pr.rz_out = seg_rz.data_ptr<float>();
      launch_chunk_bwd(dt, pr, ds, nullptr, nullptr, dev, stream);
      r_init = causal ? exclusive_segment_sums(seg_r, true, Tensor()) : total_over_segments(seg_r);
      rz_init = causal ? exclusive_segment_sums(seg_rz, true, Tensor()) : total_over_segments(seg_rz);
      p.s0 = s_init.data_ptr<float>();
      p.sz0 = sz_init.data_ptr<float>();
      p.r0 = r_init.data_ptr<float>();
      p.rz0 = rz_init.data_ptr<float>();
    }
    launch_chunk_bwd(dt, p, ds, dq_part.defined() ? dq_part.data_ptr<float>() : nullptr,
                     dk_part.defined() ? dk_part.data_ptr<float>() : nullptr, dev, stream);
  } else {
    launch_quad_bwd(dt, p, dev, stream);
  }
  return {dq, dk, dv};
}

// den_out: when given, receives the normalizer (the initial state's part included).
inline std::tuple<Tensor, Tensor, Tensor> taylor_prefill(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                         const std::optional<Tensor>& mask_in,
                                                         const std::optional<Tensor>& kv_in,
                                                         const std::optional<Tensor>& k_sum_in, double scale,
                                                         Tensor* den_out = nullptr) {
  const Dims d = check_attention(q_in, k_in, v_in, mask_in, /*causal=*/true, scale);
  TORCH_CHECK(kv_in.has_value() == k_sum_in.has_value(),
              "kv and k_sum must be given together (the state of a preceding prefix) or both be None");
  if (kv_in.has_value()) check_state(*kv_in, *k_sum_in, d, q_in, "kv", "k_sum");
  LA_DEVICE_GUARD(q_in);
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const std::optional<Tensor> mask = contiguous_mask(mask_in);
  const auto acc_st = acc_type(q.scalar_type());
  const auto acc = q.options().dtype(acc_st);
  const auto state_st = kv_in.has_value() ? kv_in->scalar_type() : acc_st;
  Tensor kv0, ks0;
  if (kv_in.has_value()) {
    kv0 = kv_in->to(acc_st).contiguous();
    ks0 = k_sum_in->to(acc_st).contiguous();
  }
  const int64_t M = feature_count(static_cast<int>(d.D));
  Tensor out = new_buffer({d.B, d.H, d.Lq, d.Dv}, q.options());
  Tensor kv_out = new_buffer({d.B, d.H, M, d.Dv}, acc);
  Tensor ks_out = new_buffer({d.B, d.H, M}, acc);
  if (d.B * d.H > 0) {
    if (d.Lq == 0) {
      if (kv0.defined()) {
        kv_out.copy_(kv0);
        ks_out.copy_(ks0);
      } else {
        kv_out.zero_();
        ks_out.zero_();
      }
    } else {
      AttnParams p = attn_params(q, k, v, mask, d, /*causal=*/true, scale);
      p.out = out.data_ptr();
      p.den = den_out != nullptr ? den_out->data_ptr() : nullptr;
      p.kv0 = kv0.defined() ? kv0.data_ptr() : nullptr;
      p.ks0 = ks0.defined() ? ks0.data_ptr() : nullptr;
      p.kv_out = kv_out.data_ptr();
      p.ks_out = ks_out.data_ptr();
      const DType dt = dtype_of(q);
      const DeviceInfo dev = device_info(q);
      const la_stream_t stream = current_stream(q);
      if (choose_form(dt, d, /*causal=*/true, dev) == Form::LinearTC) {
        chunk_causal_forward(dt, p, d, acc, kv0, ks0, &kv_out, &ks_out, dev, stream);
      } else {
        Tensor num0, den0;
        AttnParams pq = p;
        if (kv0.defined()) {  // contribution of the initial state to every query
          num0 = new_buffer({d.B, d.H, d.Lq, d.Dv}, acc);
          den0 = new_buffer({d.B, d.H, d.Lq}, acc);
          launch_state_read(dt, p, /*finalize=*/false, num0.data_ptr(), den0.data_ptr(), dev, stream);
          pq.num0 = num0.data_ptr();
          pq.den0 = den0.data_ptr();
        }
        launch_quadratic(dt, pq, dev, stream);
        launch_state_accum(dt, p, dev, stream);
      }
    }
  }
  if (state_st != acc_st) {
    kv_out = kv_out.to(state_st);
    ks_out = ks_out.to(state_st);
  }
  return {out, kv_out, ks_out};
}

inline std::tuple<Tensor, Tensor, Tensor> taylor_step(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                      const Tensor& kv_in, const Tensor& k_sum_in, double scale) {
  check_float_tensor(q_in, "q", 3, "[B, H, D]");
  check_float_tensor(k_in, "k", 3, "[B, H, D]");
  check_float_tensor(v_in, "v", 3, "[B, H, Dv]");
  check_like(k_in, "k", q_in, "q");
  check_like(v_in, "v", q_in, "q");
  TORCH_CHECK(k_in.sizes() == q_in.sizes(), "k must have the shape of q ", q_in.sizes(), ", got ", k_in.sizes());
  TORCH_CHECK(v_in.size(0) == q_in.size(0) && v_in.size(1) == q_in.size(1), "v must have the batch and head sizes of q (",
              q_in.size(0), ", ", q_in.size(1), "), got shape ", v_in.sizes());
  const Dims d{q_in.size(0), q_in.size(1), 1, 1, q_in.size(2), v_in.size(2)};
  check_dims(d.D, d.Dv);
  check_scale(scale);
  check_state(kv_in, k_sum_in, d, q_in, "kv", "k_sum");
  LA_DEVICE_GUARD(q_in);
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const Tensor kv = kv_in.contiguous(), ks = k_sum_in.contiguous();
  Tensor out = new_buffer({d.B, d.H, d.Dv}, q.options());
  Tensor kv_out = new_buffer(kv.sizes(), kv.options());
  Tensor ks_out = new_buffer(ks.sizes(), ks.options());
  if (d.B * d.H == 0) return {out, kv_out, ks_out};
  StepParams p{};
  p.BH = static_cast<int>(d.B * d.H);
  p.D = static_cast<int>(d.D);
  p.Dv = static_cast<int>(d.Dv);
  p.M = feature_count(p.D);
  p.scale = scale;
  Tensor partial = new_buffer({d.B * d.H, step_num_blocks(p.M), d.Dv + 1}, kv.options());
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.kv = kv.data_ptr();
  p.ks = ks.data_ptr();
  p.out = out.data_ptr();
  p.kv_out = kv_out.data_ptr();
  p.ks_out = ks_out.data_ptr();
  p.partial = partial.data_ptr();
  launch_step(dtype_of(q), kv.scalar_type() == at::kDouble ? DType::F64 : DType::F32, p, device_info(q),
              current_stream(q));
  return {out, kv_out, ks_out};
}

// ------------------------------------------------------------------------------------------ the op family
// taylor_fwd / taylor_bwd of csrc/ops.cpp on top of the functions above. The kernels take dense multi-head problems
// (causal: Lq == Lk), an initial state and the final state in causal calls, and no gradient through a state; the
// other features of the problem description (packed sequences, grouped-query heads, end-aligned causal) raise
// NotImplementedError until the kernels read them (issue 18).
using linattn_cuda::Problem;

inline void require_supported(const Problem& p) {
  TORCH_CHECK_NOT_IMPLEMENTED(!p.packed, "the CUDA kernels do not take packed variable-length sequences yet");
  TORCH_CHECK_NOT_IMPLEMENTED(p.kv_heads == p.heads,
                              "the CUDA kernels do not take grouped-query attention (Hkv < H) yet");
  TORCH_CHECK_NOT_IMPLEMENTED(!p.causal || p.lq == p.lk,
                              "the CUDA kernels do not take causal attention with Lq < Lk (end-aligned) yet");
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor> op_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const std::optional<Tensor>& mask, const std::optional<Tensor>& cu_q,
                                               const std::optional<Tensor>& cu_k, const std::optional<Tensor>& kv0,
                                               const std::optional<Tensor>& k_sum0, bool causal, double scale,
                                               bool return_state) {
  const Problem p = linattn_cuda::describe_problem(q, k, v, mask, cu_q, cu_k, kv0, k_sum0, causal, scale,
                                                   linattn_cuda::kCudaLimits);
  require_supported(p);
  if (!return_state && !p.has_state) {
    auto [out, den] = taylor_fwd(q, k, v, mask, causal, scale);
    const auto none = q.options().dtype(p.state_dtype);  // two distinct empty tensors: outputs never alias
    return {out, den, at::empty({0}, none), at::empty({0}, none)};
  }
  TORCH_CHECK_NOT_IMPLEMENTED(causal, "the CUDA kernels take a decoding state in causal calls only");
  Tensor den = new_buffer({p.seqs, p.heads, p.lq}, q.options().dtype(linattn_cuda::accumulate_type(p.dtype)));
  auto [out, kv, k_sum] = taylor_prefill(q, k, v, mask, kv0, k_sum0, scale, &den);
  if (!return_state) {
    kv = at::empty({0}, kv.options());
    k_sum = at::empty({0}, k_sum.options());
  }
  return {out, den, kv, k_sum};
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> op_bwd(
    const Tensor& grad_out, const std::optional<Tensor>& grad_kv, const std::optional<Tensor>& grad_k_sum,
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
    const std::optional<Tensor>& cu_q, const std::optional<Tensor>& cu_k, const std::optional<Tensor>& kv0,
    const std::optional<Tensor>& k_sum0, const Tensor& out, const Tensor& den, bool causal, double scale) {
  const Problem p = linattn_cuda::describe_problem(q, k, v, mask, cu_q, cu_k, kv0, k_sum0, causal, scale,
                                                   linattn_cuda::kCudaLimits);
  linattn_cuda::check_backward(p, q, grad_out, out, den, grad_kv, grad_k_sum);
  require_supported(p);
  TORCH_CHECK_NOT_IMPLEMENTED(!p.has_state && !grad_kv.has_value(),
                              "the CUDA kernels have no backward through a decoding state yet");
  auto [dq, dk, dv] = taylor_bwd(grad_out, q, k, v, mask, out, den, causal, scale);
  const auto none = q.options().dtype(p.state_dtype);  // two distinct empty tensors: outputs never alias
  return {dq, dk, dv, at::empty({0}, none), at::empty({0}, none)};
}

}  // namespace linattn
