// Shared by the CUDA kernels of linattn_cuda: portability macros (real CUDA or the CPU emulator in emu/),
// element conversions, the symmetric feature map's index table, the tf32 tensor-core mma, and the
// parameter structs that the torch-facing host code (taylor_host.h) passes to the launchers.
// No torch headers here: kernel translation units stay light.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef LINATTN_EMULATE
#include <cmath>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "emu/emu.h"
#define LA_DEVICE inline
#define LA_HOST_DEVICE inline
#define LA_GLOBAL
#define LA_LAUNCH_BOUNDS(n)
#define LA_LAUNCH_BOUNDS2(n, m)
#define LA_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(::emu::shared_memory())
#define LA_SYNC() ::emu::syncthreads()
using la_stream_t = void*;
#define LA_SYNCWARP() ::emu::syncwarp()
inline void la_atomic_add_shared(float* p, float v) { *p += v; }  // fibers never interleave within it
template <class T>
inline T la_shfl(T v, int src_lane) { return ::emu::shfl(v, src_lane); }
template <class T>
inline T la_shfl_xor(T v, int lane_mask) { return ::emu::shfl_xor(v, lane_mask); }
using std::max;
using std::min;
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define LA_DEVICE __device__ __forceinline__
#define LA_HOST_DEVICE __host__ __device__ __forceinline__
#define LA_GLOBAL __global__
#define LA_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#define LA_LAUNCH_BOUNDS2(n, m) __launch_bounds__(n, m)
#define LA_DYN_SMEM(T, name)                                  \
  extern __shared__ __align__(16) unsigned char la_smem_raw[]; \
  T* name = reinterpret_cast<T*>(la_smem_raw)
#define LA_SYNC() __syncthreads()
using la_stream_t = cudaStream_t;
#define LA_SYNCWARP() __syncwarp()
__device__ __forceinline__ void la_atomic_add_shared(float* p, float v) { atomicAdd(p, v); }
template <class T>
__device__ __forceinline__ T la_shfl(T v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }
template <class T>
__device__ __forceinline__ T la_shfl_xor(T v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
#endif

namespace linattn {

using index_t = int64_t;

// A key takes part when it is in range and not padded (mask true = padding). The kernels load a padded key's k
// and v as 0, so whatever it holds (NaN, inf) never reaches a product.
LA_DEVICE bool key_in(const bool* mask, index_t b, index_t j, index_t Lk) {
  return j < Lk && !(mask != nullptr && mask[b * Lk + j]);
}

// Element types of the tensors, as the host code sees them.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

// Element conversions: inputs are read into the accumulation type A (float, or double for float64).
template <class T>
struct Elem;
template <>
struct Elem<float> {
  LA_DEVICE static float load(float x) { return x; }
  LA_DEVICE static float store(float x) { return x; }
  LA_DEVICE static float store(double x) { return static_cast<float>(x); }
};
template <>
struct Elem<double> {
  LA_DEVICE static double load(double x) { return x; }
  LA_DEVICE static double store(double x) { return x; }
  LA_DEVICE static double store(float x) { return x; }
};
template <>
struct Elem<__half> {
  LA_DEVICE static float load(__half x) { return __half2float(x); }
  LA_DEVICE static __half store(float x) { return __float2half_rn(x); }
  LA_DEVICE static __half store(double x) { return __float2half_rn(static_cast<float>(x)); }
};
template <>
struct Elem<__nv_bfloat16> {
  LA_DEVICE static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  LA_DEVICE static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
  LA_DEVICE static __nv_bfloat16 store(double x) { return __float2bfloat16_rn(static_cast<float>(x)); }
};

template <class A, class T>
LA_DEVICE A load_as(const T* p, index_t i) {
  return static_cast<A>(Elem<T>::load(p[i]));
}

LA_HOST_DEVICE int feature_count(int D) { return 1 + D + D * (D + 1) / 2; }

// Feature m of the symmetric map in the order of linattn_cuda/feature_map.py:
//   phi_m(x) = coef(kind) * x[a] * x[b], with x[one] == 1 (a slot the caller appends to x).
//   m = 0: constant (kind 0); 1..D: c1 x_a (kind 1); D+1..2D: c2 x_a^2 (kind 2);
//   then c3 x_a x_b for a < b in row-major order (kind 3); m >= M: padding (kind 4, coefficient 0).
struct FeaturePair {
  int a, b, kind;
};

LA_HOST_DEVICE FeaturePair feature_pair(int m, int D, int one) {
  if (m == 0) return {one, one, 0};
  if (m <= D) return {m - 1, one, 1};
  if (m <= 2 * D) return {m - D - 1, m - D - 1, 2};
  const int t = m - 2 * D - 1;
  if (t >= D * (D - 1) / 2) return {one, one, 4};
  // Row a of the strict upper triangle starts at start(a) = a*D - a*(a+1)/2; invert, then fix rounding.
  const double dh = D - 0.5;
  int a = static_cast<int>(dh - sqrt(dh * dh - 2.0 * t));
  if (a < 0) a = 0;
  if (a > D - 2) a = D - 2;
  while (a > 0 && a * D - a * (a + 1) / 2 > t) --a;
  while (a + 1 <= D - 2 && (a + 1) * D - (a + 1) * (a + 2) / 2 <= t) ++a;
  const int b = a + 1 + (t - (a * D - a * (a + 1) / 2));
  return {a, b, 3};
}

// Coefficients of the feature kinds: {1, c1, c2, c3, 0} with c1 = sqrt(scale), c2 = scale/sqrt(2), c3 = scale.
template <class A>
struct FeatureCoefs {
  A c[5];
};

template <class A>
LA_HOST_DEVICE A feature_coef(const FeatureCoefs<A>& fc, int kind) {
  return fc.c[kind];
}

template <class A>
inline FeatureCoefs<A> make_feature_coefs(double scale) {
  FeatureCoefs<A> fc;
  fc.c[0] = static_cast<A>(1.0);
  fc.c[1] = static_cast<A>(std::sqrt(scale));
  fc.c[2] = static_cast<A>(scale / std::sqrt(2.0));
  fc.c[3] = static_cast<A>(scale);
  fc.c[4] = static_cast<A>(0.0);
  return fc;
}

// ---------------------------------------------------------------------------------------------------------
// Tensor cores: mma.sync m16n8k8 with tf32 inputs and fp32 accumulation (sm_80+).
// Fragment layout (PTX ISA), g = lane / 4, t = lane % 4:
//   A 16x8 (row-major): a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)
//   B 8x8  (k x n):     b0 (k=t, n=g), b1 (k=t+4, n=g)
//   C 16x8:             c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)

LA_DEVICE uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
LA_DEVICE float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// Round to tf32 (nearest, ties away from zero), as cvt.rna.tf32.f32.
LA_DEVICE uint32_t to_tf32(float x) {
#if defined(LINATTN_EMULATE)
  uint32_t u = float_bits(x);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  return u;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  return float_bits(x) & 0xffffe000u;
#endif
}

LA_DEVICE void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(LINATTN_EMULATE)
  ::emu::mma_m16n8k8_tf32(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
  __trap();  // the host code never launches tensor-core kernels below sm_80
#endif
}

// An operand fragment in tf32; with SPLIT (fp32 inputs) also the residual x - tf32(x), so that three mmas
// (hi*hi + hi*lo + lo*hi) reproduce fp32 products to ~2^-21 ("3xTF32").
template <bool SPLIT, int N>
struct Frag {
  uint32_t hi[N];
  uint32_t lo[N];
  LA_DEVICE void set(const float (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      hi[i] = to_tf32(x[i]);
      if (SPLIT) lo[i] = to_tf32(x[i] - bits_float(hi[i] & 0xffffe000u));
    }
  }
};

template <bool SPLIT>
LA_DEVICE void mma(float (&d)[4], const Frag<SPLIT, 4>& a, const Frag<SPLIT, 2>& b) {
  if (SPLIT) {
    mma_tf32(d, a.lo, b.hi);
    mma_tf32(d, a.hi, b.lo);
  }
  mma_tf32(d, a.hi, b.hi);
}

// ---------------------------------------------------------------------------------------------------------
// Launcher parameters. Tensors are contiguous; [BH, ...] means batch and heads flattened (bh = b * H + h).

struct AttnParams {
  const void* q;       // [BH, Lq, D]
  const void* k;       // [BH, Lk, D]
  const void* v;       // [BH, Lk, Dv]
  const bool* mask;    // [B, Lk], true = padding, or null
  void* out;           // [BH, Lq, Dv] input dtype
  void* den;           // [BH, Lq] accumulation dtype, or null
  const void* num0;    // prefill: [BH, Lq, Dv] accumulation dtype, phi(q)^T kv0, or null
  const void* den0;    // prefill: [BH, Lq], phi(q)^T k_sum0, or null
  const void* kv0;     // linear form: initial state [BH, M, Dv] (accumulation dtype) or null
  const void* ks0;     // [BH, M] or null
  void* kv_out;        // linear form: final state [BH, M, Dv] or null
  void* ks_out;        // [BH, M] or null
  int B, H, Lq, Lk, D, Dv, M;
  bool causal;
  double scale;
  // Chunked kernels only: the sequence split in nseg segments of seg_len tokens (a multiple of 64), one block
  // per (batch*head, segment, value slice); states kv0/ks0/kv_out/ks_out are then indexed by
  // (batch*head)*nseg + segment. state_only: only accumulate each segment's state into kv_out/ks_out.
  int nseg;
  int seg_len;
  bool state_only;
};

struct BwdParams {
  const void* dout;    // [BH, Lq, Dv] input dtype
  const void* q;
  const void* k;
  const void* v;
  const bool* mask;
  const void* out;     // [BH, Lq, Dv] input dtype
  const void* den;     // [BH, Lq] accumulation dtype
  void* dq;            // [BH, Lq, D]
  void* dk;            // [BH, Lk, D]
  void* dv;            // [BH, Lk, Dv]
  void* gt;            // scratch [BH, Lq, Dv] accumulation dtype: dout / den
  void* delta;         // scratch [BH, Lq]: (dout / den) . out
  int B, H, Lq, Lk, D, Dv;
  bool causal;
  double scale;
  // Chunked causal backward split in segments (as AttnParams): kernel A starts each segment from the key
  // state s0/sz0 = sum phi(k) [v | 1] of the earlier segments; kernel B from r0/rz0 = sum phi(q) [gt | -delta]
  // of the later ones. state_only: kernel B only accumulates each segment's r into r_out/rz_out.
  int nseg;
  int seg_len;
  bool state_only;
  const float* s0;   // [BH * nseg, M, Dv] or null
  const float* sz0;  // [BH * nseg, M]
  const float* r0;
  const float* rz0;
  float* r_out;
  float* rz_out;
};

struct StepParams {
  const void* q;       // [BH, D] input dtype
  const void* k;       // [BH, D]
  const void* v;       // [BH, Dv]
  const void* kv;      // [BH, M, Dv] state dtype
  const void* ks;      // [BH, M]
  void* out;           // [BH, Dv] input dtype
  void* kv_out;        // [BH, M, Dv]
  void* ks_out;        // [BH, M]
  void* partial;       // scratch [BH, nblocks, Dv + 1] state dtype
  int BH, D, Dv, M;
  double scale;
};

// Device facts the launchers need (filled by the host code).
struct DeviceInfo {
  int cc_major = 0;
  int sm_count = 1;
  int smem_optin = 48 * 1024;  // bytes of dynamic shared memory a block may opt in to
};

// ---- launchers (taylor_simt.cu, taylor_tc.cu); each TORCH_CHECKs its configuration and every launch ----

// Quadratic (tiled) forward on CUDA cores; any D <= 128, Dv <= 256; honours num0/den0.
void launch_quad_fwd(DType dt, const AttnParams& p, const DeviceInfo& dev, la_stream_t stream);
// Tensor-core quadratic forward (quad_tc.cuh): fp16/bf16/fp32 (3xTF32), D <= 128, sm_80+; honours num0/den0.
bool quad_tc_supported(DType dt, int D, int Dv, const DeviceInfo& dev);
void launch_quad_tc(DType dt, const AttnParams& p, const DeviceInfo& dev, la_stream_t stream);
// Quadratic backward on CUDA cores (dq per query block, dk and dv per key block), after launch_bwd_prep.
void launch_quad_bwd(DType dt, const BwdParams& p, const DeviceInfo& dev, la_stream_t stream);
// kv_out = kv0 + sum_j phi(k_j) v_j^T over unmasked keys, ks_out likewise (CUDA cores).
void launch_state_accum(DType dt, const AttnParams& p, const DeviceInfo& dev, la_stream_t stream);
// Reads a state (p.kv0, p.ks0) with phi(q): finalize=true writes out = num/den and den (non-causal linear
// form); finalize=false writes num0 := phi(q)^T kv0 and den0 := phi(q)^T ks0 (cast away const) for prefill.
void launch_state_read(DType dt, const AttnParams& p, bool finalize, void* num_out, void* den_out,
                       const DeviceInfo& dev, la_stream_t stream);
// One decoding step (two kernels). dt: q/k/v dtype, state_dt: F32 or F64.
void launch_step(DType dt, DType state_dt, const StepParams& p, const DeviceInfo& dev, la_stream_t stream);
int step_num_blocks(int M);

// Tensor-core chunked linear form (fp16/bf16; fp32 via 3xTF32). Causal: chunks of 64 with the state carried
// on chip, from kv0/ks0 and into kv_out/ks_out when given. Non-causal: state over all keys, then queries.
// Returns false (launching nothing) when the shape is outside what the kernel supports.
bool chunk_supported(DType dt, int D, int Dv, const DeviceInfo& dev);
void launch_chunk(DType dt, const AttnParams& p, int dv_slice, const DeviceInfo& dev, la_stream_t stream);
// The value columns per block launch_chunk uses for dv_slice = setting (0: automatic).
int chunk_dv_slice(const AttnParams& p, int setting, const DeviceInfo& dev);
// Tensor-core chunked backward (same support as the forward), from p.gt / p.delta of the prep kernel.
// The value columns are split in slices of chunk_bwd_dv_slice(...) columns; with more than one slice, dq and
// dk are summed from float32 partials dq_part [nslices, BH, Lq, D] and dk_part [nslices, BH, Lk, D].
bool chunk_bwd_supported(DType dt, int D, int Dv, const DeviceInfo& dev);
int chunk_bwd_dv_slice(DType dt, const BwdParams& p, int setting, const DeviceInfo& dev);
void launch_chunk_bwd(DType dt, const BwdParams& p, int dv_slice, float* dq_part, float* dk_part,
                      const DeviceInfo& dev, la_stream_t stream);
// gt = dout / den and delta = gt . out (the first step of every backward).
void launch_bwd_prep(DType dt, const BwdParams& p, la_stream_t stream);

}  // namespace linattn
