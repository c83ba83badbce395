// Tensor-core quadratic (FlashAttention-like) forward: any D <= 128, fp16/bf16 (fp32 via 3xTF32), sm_80+.
// Used where the chunked linear form does not apply (D > 32) or costs more (short non-causal sequences).
//
// Block: 4 warps, 64 queries (16 per warp) x a slice of DS = 64 value columns; loops over key tiles of 64:
//   s = Q K^T (mma over DK = D rounded up to 16..128), P = 1 + s + s^2/2 on visible unmasked pairs,
//   O += P [V | 1] (mma; the ones column is the normalizer, as in the chunked kernel),
// then out = O[:, :DS] / O[:, DS]. Prefill: O starts from num0 / den0 (the initial state's contribution).
// No running maximum: the polynomial cannot overflow the way exp does. Included by exactly one translation
// unit (taylor_cuda.cu, or the emulator module).
#pragma once

#include "launch_util.cuh"

namespace linattn {
namespace qtc {

constexpr int BQ = 64;  // queries per block
constexpr int BK = 64;  // keys per tile
constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
constexpr int DS = 64;  // value columns per block

template <int DK>
struct Layout {
  static constexpr int QST = DK + 4;       // == 4 mod 32 for DK in {16, 32, 64, 128}: conflict-free fragments
  static constexpr int NTO = DS / 8 + 1;   // output n-tiles incl. the normalizer
  static constexpr int PST = NTO * 8 + 4;  // paired V rows (as in taylor_tc.cu)
  static size_t smem_bytes() { return sizeof(float) * (static_cast<size_t>(BQ + BK) * QST + BK * PST + BK); }
};

template <int PST>
LA_DEVICE int vpaired(int row, int col) {
  return ((row >> 3) * 4 + (row & 3)) * (2 * PST) + 2 * col + ((row >> 2) & 1);
}

template <class T, bool SPLIT, int DK, bool CAUSAL>
LA_GLOBAL void LA_LAUNCH_BOUNDS(THREADS) quad_tc_kernel(AttnParams p, int nqb, int nslices) {
  using L = Layout<DK>;
  constexpr int QST = L::QST, NTO = L::NTO, PST = L::PST;
  LA_DYN_SMEM(float, sm);
  float* Qs = sm;               // [BQ][QST]
  float* Ks = Qs + BQ * QST;    // [BK][QST]
  float* Vs = Ks + BK * QST;    // paired [BK][NTO * 8]
  float* keep = Vs + BK * PST;  // [BK]

  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ k = static_cast<const T*>(p.k);
  const T* __restrict__ v = static_cast<const T*>(p.v);
  const int D = p.D, Dv = p.Dv, Lq = p.Lq, Lk = p.Lk;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int slice = static_cast<int>(blockIdx.x % nslices);
  const index_t rest = blockIdx.x / nslices;
  const int i0 = static_cast<int>(rest % nqb) * BQ;
  const index_t bh = rest / nqb;
  const int b = static_cast<int>(bh / p.H);
  const int c0 = slice * DS;
  const int ncols = min(DS, Dv - c0);
  const float scale = static_cast<float>(p.scale);
  const int r0 = warp * 16;

  for (int idx = tid; idx < BQ * DK; idx += THREADS) {
    const int r = idx / DK, d = idx % DK;
    Qs[r * QST + d] = (i0 + r < Lq && d < D) ? Elem<T>::load(q[(bh * Lq + i0 + r) * D + d]) : 0.f;
  }
  for (int idx = tid; idx < BK * 8; idx += THREADS) {
    const int r = idx / 8, c = DS + idx % 8;
    Vs[vpaired<PST>(r, c)] = c == DS ? 1.f : 0.f;
  }

  // O starts at the initial state's contribution (prefill) or 0.
  float o[NTO][4];
  {
    const float* num0 = static_cast<const float*>(p.num0);
    const float* den0 = static_cast<const float*>(p.den0);
    const int ra = i0 + r0 + g, rb = ra + 8;
#pragma unroll
    for (int nt = 0; nt < NTO; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = (e >> 1) ? rb : ra, col = nt * 8 + 2 * t + (e & 1);
        float x = 0.f;
        if (row < Lq) {
          if (col < ncols && num0 != nullptr) x = num0[(bh * Lq + row) * Dv + c0 + col];
          if (col == DS && den0 != nullptr) x = den0[bh * Lq + row];
        }
        o[nt][e] = x;
      }
    }
  }

  const int pg = (g >> 1) + 4 * (g & 1);  // key rows of the B operand permuted: accumulator columns 2t, 2t+1
                                          // hold keys t, t+4 (the A-fragment k positions of P V)
  const int kend = CAUSAL ? min(Lk, i0 + BQ) : Lk;
  for (int j0 = 0; j0 < kend; j0 += BK) {
    LA_SYNC();  // the previous tile is consumed (and Q is loaded)
    for (int idx = tid; idx < BK * DK; idx += THREADS) {
      const int r = idx / DK, d = idx % DK;
      Ks[r * QST + d] = (key_in(p.mask, b, j0 + r, Lk) && d < D) ? Elem<T>::load(k[(bh * Lk + j0 + r) * D + d]) : 0.f;
    }
    for (int idx = tid; idx < BK * DS; idx += THREADS) {
      const int r = idx / DS, c = idx % DS;
      Vs[vpaired<PST>(r, c)] =
          (key_in(p.mask, b, j0 + r, Lk) && c < ncols) ? Elem<T>::load(v[(bh * Lk + j0 + r) * Dv + c0 + c]) : 0.f;
    }
    if (tid < BK) {
      const int j = j0 + tid;
      keep[tid] = (j < Lk && !(p.mask != nullptr && p.mask[static_cast<index_t>(b) * Lk + j])) ? 1.f : 0.f;
    }
    LA_SYNC();
    // key tiles of 8 with at least one key at or before the warp's last row (causal)
    const int last_row = i0 + r0 + 15;
    const int nkt = CAUSAL ? max(0, min(BK / 8, (last_row - j0) / 8 + 1)) : BK / 8;
#pragma unroll 1
    for (int kt = 0; kt < nkt; ++kt) {
      float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int k0 = 0; k0 < DK; k0 += 8) {
        const float av[4] = {Qs[(r0 + g) * QST + k0 + t], Qs[(r0 + g + 8) * QST + k0 + t],
                             Qs[(r0 + g) * QST + k0 + t + 4], Qs[(r0 + g + 8) * QST + k0 + t + 4]};
        const float bv[2] = {Ks[(kt * 8 + pg) * QST + k0 + t], Ks[(kt * 8 + pg) * QST + k0 + t + 4]};
        Frag<SPLIT, 4> fa;
        fa.set(av);
        Frag<SPLIT, 2> fb;
        fb.set(bv);
        mma<SPLIT>(s, fa, fb);
      }
      float pr[4];  // s[e]: query i0 + r0 + g + 8 (e >> 1), key j0 + kt*8 + t + 4 (e & 1)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = i0 + r0 + g + 8 * (e >> 1), jl = kt * 8 + t + 4 * (e & 1);
        const float x = s[e] * scale;
        pr[e] = (keep[jl] != 0.f && (!CAUSAL || j0 + jl <= i)) ? 1.f + x + 0.5f * x * x : 0.f;
      }
      const float pv[4] = {pr[0], pr[2], pr[1], pr[3]};
      Frag<SPLIT, 4> pa;
      pa.set(pv);
      const float* vrow = Vs + (kt * 4 + t) * (2 * PST) + 2 * g;
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) {
        const float2 b2 = *reinterpret_cast<const float2*>(vrow + 16 * nt);  // keys kt*8 + t, kt*8 + t + 4
        const float bv[2] = {b2.x, b2.y};
        Frag<SPLIT, 2> fb;
        fb.set(bv);
        mma<SPLIT>(o[nt], pa, fb);
      }
    }
  }

  const float den_a = la_shfl(o[NTO - 1][0], lane & ~3);
  const float den_b = la_shfl(o[NTO - 1][2], lane & ~3);
  const int row_a = i0 + r0 + g, row_b = row_a + 8;
  const float inv_a = den_a != 0.f ? 1.f / den_a : 0.f;
  const float inv_b = den_b != 0.f ? 1.f / den_b : 0.f;
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int nt = 0; nt < DS / 8; ++nt) {
    const int col = nt * 8 + 2 * t;
    if (row_a < Lq) {
      const index_t base = (bh * Lq + row_a) * Dv + c0 + col;
      if (col < ncols) out[base] = Elem<T>::store(o[nt][0] * inv_a);
      if (col + 1 < ncols) out[base + 1] = Elem<T>::store(o[nt][1] * inv_a);
    }
    if (row_b < Lq) {
      const index_t base = (bh * Lq + row_b) * Dv + c0 + col;
      if (col < ncols) out[base] = Elem<T>::store(o[nt][2] * inv_b);
      if (col + 1 < ncols) out[base + 1] = Elem<T>::store(o[nt][3] * inv_b);
    }
  }
  float* den = static_cast<float*>(p.den);
  if (den != nullptr && slice == 0 && t == 0) {
    if (row_a < Lq) den[bh * Lq + row_a] = den_a;
    if (row_b < Lq) den[bh * Lq + row_b] = den_b;
  }
}

template <class T, bool SPLIT, int DK>
void launch_typed(const AttnParams& p, const DeviceInfo& dev, la_stream_t stream) {
  const size_t smem = Layout<DK>::smem_bytes();
  const int nqb = ceil_div(p.Lq, BQ);
  const int nslices = ceil_div(p.Dv, DS);
  const dim3 grid(static_cast<unsigned>(static_cast<index_t>(p.B) * p.H * nqb * nslices));
  if (p.causal) {
    auto kernel = quad_tc_kernel<T, SPLIT, DK, true>;
    prepare_smem(kernel, smem, dev, "quadratic forward (tensor core)");
    LA_LAUNCH(kernel, grid, dim3(THREADS), smem, stream, p, nqb, nslices);
  } else {
    auto kernel = quad_tc_kernel<T, SPLIT, DK, false>;
    prepare_smem(kernel, smem, dev, "quadratic forward (tensor core)");
    LA_LAUNCH(kernel, grid, dim3(THREADS), smem, stream, p, nqb, nslices);
  }
}

template <class T, bool SPLIT>
void launch_dims(const AttnParams& p, const DeviceInfo& dev, la_stream_t stream) {
  if (p.D <= 16) {
    launch_typed<T, SPLIT, 16>(p, dev, stream);
  } else if (p.D <= 32) {
    launch_typed<T, SPLIT, 32>(p, dev, stream);
  } else if (p.D <= 64) {
    launch_typed<T, SPLIT, 64>(p, dev, stream);
  } else {
    launch_typed<T, SPLIT, 128>(p, dev, stream);
  }
}

}  // namespace qtc

bool quad_tc_supported(DType dt, int D, int Dv, const DeviceInfo& dev) {
  if (dt == DType::F64 || dev.cc_major < 8 || D < 1 || D > 128 || Dv < 1) return false;
  return qtc::Layout<128>::smem_bytes() <= static_cast<size_t>(dev.smem_optin);
}

void launch_quad_tc(DType dt, const AttnParams& p, const DeviceInfo& dev, la_stream_t stream) {
  TORCH_CHECK(quad_tc_supported(dt, p.D, p.Dv, dev), "linattn_cuda: the tensor-core quadratic kernel does not "
              "support this dtype, D = ", p.D, " or this device");
  if (p.B * p.H == 0 || p.Lq == 0) return;
  switch (dt) {
    case DType::F16:
      qtc::launch_dims<__half, false>(p, dev, stream);
      break;
    case DType::BF16:
      qtc::launch_dims<__nv_bfloat16, false>(p, dev, stream);
      break;
    case DType::F32:
      qtc::launch_dims<float, true>(p, dev, stream);
      break;
    case DType::F64:
      break;
  }
}

}  // namespace linattn
