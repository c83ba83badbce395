// Tensor-core kernel of linattn_cuda: the chunked linear form with the feature map built on the fly.
//
// One block (4 warps) per (batch*head, slice of DS value columns). Causal: the sequence is walked in chunks
// of C = 64 tokens; the state S = [sum phi(k) v^T | sum phi(k)] (MP x (DS + 8) fp32, MP = M rounded up to 16)
// lives in shared memory for the whole walk. Per chunk:
//   warp w owns query rows 16w..16w+15 of the chunk:
//     intra:  s = Q K^T (mma), P = (1 + s + s^2/2) on visible unmasked pairs, O = P [V | 1]  (mma)
//     inter:  O += phi(Q) S  (mma; phi(Q) fragments computed from Q in registers, never stored)
//     out = O[:, :DS] / O[:, DS]; den = O[:, DS]
//   then S += phi(K)^T [V | 1]  (mma; each warp owns 16-row tiles of S, phi(K) fragments on the fly).
// The normalizer rides along as an extra value column of ones, so numerator and denominator share every
// rounding. All products are mma.sync m16n8k8 tf32 with fp32 accumulation: fp16/bf16 inputs are exact in
// tf32; the feature values, P and S are rounded to tf32 (rel. 2^-11). fp32 inputs use 3xTF32 (SPLIT).
// Non-causal: first S over all keys (chunk by chunk), then every query chunk reads S.
#include "launch_util.cuh"

namespace linattn {
namespace tc {

constexpr int C = 64;
constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;

template <int DK, int DS>
struct Layout {
  static constexpr int SST = DS + 8;      // state row stride: == 8 mod 32, conflict-free B-fragment reads
  static constexpr int QST = DK + 4;      // q/k row stride: == 4 mod 32; column DK holds 1 (q) or keep (k)
  static constexpr int VST = DS + 12;     // v row stride: == 12 mod 32; column DS holds the ones
  static constexpr int NTO = DS / 8 + 1;  // output n-tiles, the last one holding the normalizer column
  static size_t smem_bytes(int MP) {
    return sizeof(float) * (static_cast<size_t>(MP) * SST + 2 * C * QST + C * VST + C + MP) + sizeof(int) * MP;
  }
};

template <class T, bool SPLIT, int DK, int DS, bool CAUSAL>
LA_GLOBAL void LA_LAUNCH_BOUNDS(THREADS) chunk_kernel(AttnParams p, FeatureCoefs<float> fc, int MP, int nslices) {
  using L = Layout<DK, DS>;
  constexpr int SST = L::SST, QST = L::QST, VST = L::VST, NTO = L::NTO;
  LA_DYN_SMEM(float, sm);
  float* S = sm;                          // [MP][SST]
  float* Qs = S + MP * SST;               // [C][QST]
  float* Ks = Qs + C * QST;               // [C][QST]
  float* Vs = Ks + C * QST;               // [C][VST]
  float* keep = Vs + C * VST;             // [C]
  float* fcoef = keep + C;                // [MP]
  int* fab = reinterpret_cast<int*>(fcoef + MP);  // [MP]: a | b << 16

  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ k = static_cast<const T*>(p.k);
  const T* __restrict__ v = static_cast<const T*>(p.v);
  const int D = p.D, Dv = p.Dv, Lq = p.Lq, Lk = p.Lk, M = p.M;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const index_t bh = blockIdx.x / nslices;
  const int slice = static_cast<int>(blockIdx.x % nslices);
  const int b = static_cast<int>(bh / p.H);
  const int c0 = slice * DS;
  const int ncols = min(DS, Dv - c0);
  const float scale = static_cast<float>(p.scale);

  // Feature table and initial state.
  for (int m = tid; m < MP; m += THREADS) {
    const FeaturePair fp = feature_pair(m, D, DK);
    fcoef[m] = m < M ? fc.c[fp.kind] : 0.f;
    fab[m] = m < M ? (fp.a | (fp.b << 16)) : (DK | (DK << 16));
  }
  {
    const float* kv0 = static_cast<const float*>(p.kv0);
    const float* ks0 = static_cast<const float*>(p.ks0);
    for (int idx = tid; idx < MP * SST; idx += THREADS) {
      const int m = idx / SST, c = idx - m * SST;
      float x = 0.f;
      if (m < M) {
        if (c < ncols && kv0 != nullptr) x = kv0[(bh * M + m) * Dv + c0 + c];
        if (c == DS && ks0 != nullptr) x = ks0[bh * M + m];
      }
      S[idx] = x;
    }
  }

  auto key_kept = [&](int j) -> bool {
    return j < Lk && !(p.mask != nullptr && p.mask[static_cast<index_t>(b) * Lk + j]);
  };
  auto load_q = [&](int t0) {
    for (int idx = tid; idx < C * (DK + 1); idx += THREADS) {
      const int r = idx / (DK + 1), d = idx - r * (DK + 1);
      float x = 1.f;
      if (d < DK) x = (t0 + r < Lq && d < D) ? load_as<float>(q, (bh * Lq + t0 + r) * D + d) : 0.f;
      Qs[r * QST + d] = x;
    }
  };
  auto load_kv = [&](int t0) {
    for (int idx = tid; idx < C * (DK + 1); idx += THREADS) {
      const int r = idx / (DK + 1), d = idx - r * (DK + 1);
      const bool kp = key_kept(t0 + r);
      float x = kp ? 1.f : 0.f;
      if (d < DK) x = (kp && d < D) ? load_as<float>(k, (bh * Lk + t0 + r) * D + d) : 0.f;
      Ks[r * QST + d] = x;
    }
    for (int idx = tid; idx < C * (DS + 8); idx += THREADS) {
      const int r = idx / (DS + 8), c = idx - r * (DS + 8);
      float x = c == DS ? 1.f : 0.f;
      if (c < ncols && key_kept(t0 + r)) x = load_as<float>(v, (bh * Lk + t0 + r) * Dv + c0 + c);
      Vs[r * VST + c] = x;
    }
    if (tid < C) keep[tid] = key_kept(t0 + tid) ? 1.f : 0.f;
  };

  // O (16 rows of this warp x (DS + 8) columns) += phi(Q) S.
  auto read_state = [&](float (&o)[NTO][4]) {
    const float* x0 = Qs + (warp * 16 + g) * QST;
    const float* x1 = x0 + 8 * QST;
    for (int f0 = 0; f0 < MP; f0 += 8) {
      const int fA = f0 + t, fB = fA + 4;
      const int abA = fab[fA], abB = fab[fB];
      const int aA = abA & 0xffff, bA = abA >> 16, aB = abB & 0xffff, bB = abB >> 16;
      const float cA = fcoef[fA], cB = fcoef[fB];
      const float av[4] = {cA * x0[aA] * x0[bA], cA * x1[aA] * x1[bA], cB * x0[aB] * x0[bB], cB * x1[aB] * x1[bB]};
      Frag<SPLIT, 4> fa;
      fa.set(av);
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) {
        const float bv[2] = {S[fA * SST + nt * 8 + g], S[fB * SST + nt * 8 + g]};
        Frag<SPLIT, 2> fb;
        fb.set(bv);
        mma<SPLIT>(o[nt], fa, fb);
      }
    }
  };

  // out = O / den for the warp's 16 rows of the chunk starting at t0; den from the normalizer column.
  auto write_out = [&](const float (&o)[NTO][4], int t0) {
    const float den_a = la_shfl(o[NTO - 1][0], lane & ~3);  // column DS lives in lane 4g (t = 0)
    const float den_b = la_shfl(o[NTO - 1][2], lane & ~3);
    const int row_a = t0 + warp * 16 + g, row_b = row_a + 8;
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
  };

  // S += phi(K)^T [V | 1] over the first nvalid tokens of the chunk in shared memory.
  auto update_state = [&](int nvalid) {
    for (int mt = warp; mt < MP / 16; mt += WARPS) {
      const int m0 = mt * 16 + g, m1 = m0 + 8;
      float u[NTO][4];
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) {
        const int col = nt * 8 + 2 * t;
        u[nt][0] = S[m0 * SST + col];
        u[nt][1] = S[m0 * SST + col + 1];
        u[nt][2] = S[m1 * SST + col];
        u[nt][3] = S[m1 * SST + col + 1];
      }
      const int ab0 = fab[m0], ab1 = fab[m1];
      const int a0 = ab0 & 0xffff, b0 = ab0 >> 16, a1 = ab1 & 0xffff, b1 = ab1 >> 16;
      const float cf0 = fcoef[m0], cf1 = fcoef[m1];
      for (int j0 = 0; j0 < nvalid; j0 += 8) {
        const float* kA = Ks + (j0 + t) * QST;
        const float* kB = kA + 4 * QST;
        const float av[4] = {cf0 * kA[a0] * kA[b0], cf1 * kA[a1] * kA[b1], cf0 * kB[a0] * kB[b0],
                             cf1 * kB[a1] * kB[b1]};
        Frag<SPLIT, 4> fa;
        fa.set(av);
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
          const float bv[2] = {Vs[(j0 + t) * VST + nt * 8 + g], Vs[(j0 + t + 4) * VST + nt * 8 + g]};
          Frag<SPLIT, 2> fb;
          fb.set(bv);
          mma<SPLIT>(u[nt], fa, fb);
        }
      }
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) {
        const int col = nt * 8 + 2 * t;
        S[m0 * SST + col] = u[nt][0];
        S[m0 * SST + col + 1] = u[nt][1];
        S[m1 * SST + col] = u[nt][2];
        S[m1 * SST + col + 1] = u[nt][3];
      }
    }
  };

  if (CAUSAL) {
    const bool want_state = p.kv_out != nullptr;
    for (int t0 = 0; t0 < Lq; t0 += C) {
      load_q(t0);
      load_kv(t0);
      LA_SYNC();
      float o[NTO][4];
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
      const int r0 = warp * 16;
      const int nkt = 2 * warp + 2;  // key tiles of 8 up to the warp's last row
      for (int kt = 0; kt < nkt; ++kt) {
        float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int k0 = 0; k0 < DK; k0 += 8) {
          const float av[4] = {Qs[(r0 + g) * QST + k0 + t], Qs[(r0 + g + 8) * QST + k0 + t],
                               Qs[(r0 + g) * QST + k0 + t + 4], Qs[(r0 + g + 8) * QST + k0 + t + 4]};
          const float bv[2] = {Ks[(kt * 8 + g) * QST + k0 + t], Ks[(kt * 8 + g) * QST + k0 + t + 4]};
          Frag<SPLIT, 4> fa;
          fa.set(av);
          Frag<SPLIT, 2> fb;
          fb.set(bv);
          mma<SPLIT>(s, fa, fb);
        }
        float pr[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = r0 + g + 8 * (e >> 1), j = kt * 8 + 2 * t + (e & 1);
          const float x = s[e] * scale;
          pr[e] = (j <= i && keep[j] != 0.f) ? 1.f + x + 0.5f * x * x : 0.f;
        }
        // P as the A operand with the 8 keys of the tile permuted: A column t <-> key 2t, column t+4 <->
        // key 2t+1; the B operand (V rows) uses the same permutation, so the product is unchanged.
        const float pv[4] = {pr[0], pr[2], pr[1], pr[3]};
        Frag<SPLIT, 4> pa;
        pa.set(pv);
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
          const float bv[2] = {Vs[(kt * 8 + 2 * t) * VST + nt * 8 + g], Vs[(kt * 8 + 2 * t + 1) * VST + nt * 8 + g]};
          Frag<SPLIT, 2> fb;
          fb.set(bv);
          mma<SPLIT>(o[nt], pa, fb);
        }
      }
      read_state(o);
      write_out(o, t0);
      LA_SYNC();
      const int nvalid = min(C, Lk - t0);
      if (want_state || t0 + C < Lq) update_state(nvalid);
      LA_SYNC();
    }
  } else {
    for (int t0 = 0; t0 < Lk; t0 += C) {
      load_kv(t0);
      LA_SYNC();
      update_state(min(C, Lk - t0));
      LA_SYNC();
    }
    for (int t0 = 0; t0 < Lq; t0 += C) {
      load_q(t0);
      LA_SYNC();
      float o[NTO][4];
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
      read_state(o);
      write_out(o, t0);
      LA_SYNC();
    }
  }

  float* kv_out = static_cast<float*>(p.kv_out);
  float* ks_out = static_cast<float*>(p.ks_out);
  if (kv_out != nullptr) {
    for (int idx = tid; idx < M * DS; idx += THREADS) {
      const int m = idx / DS, c = idx - m * DS;
      if (c < ncols) kv_out[(bh * M + m) * Dv + c0 + c] = S[m * SST + c];
    }
  }
  if (ks_out != nullptr && slice == 0) {
    for (int m = tid; m < M; m += THREADS) ks_out[bh * M + m] = S[m * SST + DS];
  }
}

template <class T, bool SPLIT, int DK, int DS>
void launch_typed(const AttnParams& p, const DeviceInfo& dev, la_stream_t stream) {
  const int MP = (p.M + 15) / 16 * 16;
  const size_t smem = Layout<DK, DS>::smem_bytes(MP);
  const int nslices = ceil_div(p.Dv, DS);
  const dim3 grid(static_cast<unsigned>(static_cast<index_t>(p.B) * p.H * nslices));
  const FeatureCoefs<float> fc = make_feature_coefs<float>(p.scale);
  if (p.causal) {
    auto kernel = chunk_kernel<T, SPLIT, DK, DS, true>;
    prepare_smem(kernel, smem, dev, "chunked linear (tensor core)");
    LA_LAUNCH(kernel, grid, dim3(THREADS), smem, stream, p, fc, MP, nslices);
  } else {
    auto kernel = chunk_kernel<T, SPLIT, DK, DS, false>;
    prepare_smem(kernel, smem, dev, "chunked linear (tensor core)");
    LA_LAUNCH(kernel, grid, dim3(THREADS), smem, stream, p, fc, MP, nslices);
  }
}

template <class T, bool SPLIT>
void launch_dims(const AttnParams& p, int dv_slice, const DeviceInfo& dev, la_stream_t stream) {
  if (p.D <= 16) {
    if (dv_slice == 64) {
      launch_typed<T, SPLIT, 16, 64>(p, dev, stream);
    } else {
      launch_typed<T, SPLIT, 16, 32>(p, dev, stream);
    }
  } else {
    launch_typed<T, SPLIT, 32, 32>(p, dev, stream);
  }
}

}  // namespace tc

bool chunk_supported(DType dt, int D, int Dv, const DeviceInfo& dev) {
  if (dt == DType::F64 || dev.cc_major < 8 || D < 1 || D > 32 || Dv < 1) return false;
  const int MP = (feature_count(D) + 15) / 16 * 16;
  const size_t smem = D <= 16 ? tc::Layout<16, 32>::smem_bytes(MP) : tc::Layout<32, 32>::smem_bytes(MP);
  return smem <= static_cast<size_t>(dev.smem_optin);
}

void launch_chunk(DType dt, const AttnParams& p, int dv_slice, const DeviceInfo& dev, la_stream_t stream) {
  TORCH_CHECK(chunk_supported(dt, p.D, p.Dv, dev), "linattn_cuda: the tensor-core chunked kernel does not support "
              "this dtype, D = ", p.D, " or this device");
  if (p.B * p.H == 0 || (p.Lq == 0 && p.kv_out == nullptr)) return;
  if (dv_slice == 0) {  // auto: 64 columns per block when that still gives two blocks per SM, else 32
    const index_t blocks64 = static_cast<index_t>(p.B) * p.H * ((p.Dv + 63) / 64);
    dv_slice = (p.Dv > 32 && blocks64 >= 2 * dev.sm_count) ? 64 : 32;
  }
  if (p.D > 16) dv_slice = 32;
  const size_t smem64 = tc::Layout<16, 64>::smem_bytes((p.M + 15) / 16 * 16);
  if (dv_slice == 64 && smem64 > static_cast<size_t>(dev.smem_optin)) dv_slice = 32;
  switch (dt) {
    case DType::F16:
      tc::launch_dims<__half, false>(p, dv_slice, dev, stream);
      break;
    case DType::BF16:
      tc::launch_dims<__nv_bfloat16, false>(p, dv_slice, dev, stream);
      break;
    case DType::F32:
      tc::launch_dims<float, true>(p, dv_slice, dev, stream);
      break;
    case DType::F64:
      break;
  }
}

}  // namespace linattn
