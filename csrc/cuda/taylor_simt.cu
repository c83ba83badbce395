// CUDA-core kernels of linattn_cuda: every dtype (fp16, bf16, fp32, fp64), every shape up to D = 128, Dv = 256.
//   quadratic forward  (tiled like FlashAttention, w = 1 + s + s^2/2, no running maximum)
//   quadratic backward (dout/den and delta, then dq per query block and dk, dv per key block: no atomics)
//   state kernels      (linear form: kv = sum phi(k) v^T built on the fly; phi(q)^T kv read on the fly)
//   decoding step      (reads and writes the state once)
// Accumulation in float (double for fp64). Grids flatten (batch*head, row block) into x: no 65535 limit.
#include "launch_util.cuh"

namespace linattn {
namespace simt {

constexpr int kThreads = 128;
constexpr int kDvSlice = 64;  // output columns per block (grid y) in forward and state kernels
constexpr int kTile = 32;     // rows per tile

// ---------------------------------------------------------------------------------------------- forward

// Block: 32 queries x 64 output columns; loops over key tiles of 32. Thread (ty, tx) owns a 4x4 output tile.
template <class T, class A>
LA_GLOBAL void LA_LAUNCH_BOUNDS(kThreads) quad_fwd_kernel(AttnParams p, int n_row_blocks) {
  constexpr int BM = kTile, BN = kTile, DVS = kDvSlice;
  LA_DYN_SMEM(A, sm);
  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ k = static_cast<const T*>(p.k);
  const T* __restrict__ v = static_cast<const T*>(p.v);
  const A* num0 = static_cast<const A*>(p.num0);
  const A* den0 = static_cast<const A*>(p.den0);
  const int D = p.D, DP = D + 1, Dv = p.Dv, Lq = p.Lq, Lk = p.Lk;
  A* Qs = sm;                      // [BM][DP]
  A* Ks = Qs + BM * DP;            // [BN][DP]
  A* Vs = Ks + BN * DP;            // [BN][DVS]
  A* Ps = Vs + BN * DVS;           // [BM][BN + 1]
  A* rsum = Ps + BM * (BN + 1);    // [BM]
  A* keep = rsum + BM;             // [BN]

  const int tid = threadIdx.x;
  const index_t bh = blockIdx.x / n_row_blocks;
  const int i0 = static_cast<int>(blockIdx.x % n_row_blocks) * BM;
  const int b = static_cast<int>(bh / p.H);
  const int c0 = blockIdx.y * DVS;
  const int ncols = min(DVS, Dv - c0);
  const A scale = static_cast<A>(p.scale);

  for (int idx = tid; idx < BM * D; idx += kThreads) {
    const int i = idx / D, d = idx - i * D;
    Qs[i * DP + d] = (i0 + i < Lq) ? load_as<A>(q, (bh * Lq + i0 + i) * D + d) : A(0);
  }
  const int ty = tid / 16, tx = tid % 16;
  A acc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int row = i0 + ty * 4 + r, col = tx * 4 + c;
      acc[r][c] = (num0 != nullptr && row < Lq && col < ncols) ? num0[(bh * Lq + row) * Dv + c0 + col] : A(0);
    }
  if (tid < BM) rsum[tid] = (den0 != nullptr && i0 + tid < Lq) ? den0[bh * Lq + i0 + tid] : A(0);

  const int kend = p.causal ? min(Lk, i0 + BM) : Lk;
  for (int j0 = 0; j0 < kend; j0 += BN) {
    LA_SYNC();
    for (int idx = tid; idx < BN * D; idx += kThreads) {
      const int j = idx / D, d = idx - j * D;
      Ks[j * DP + d] = key_in(p.mask, b, j0 + j, Lk) ? load_as<A>(k, (bh * Lk + j0 + j) * D + d) : A(0);
    }
    for (int idx = tid; idx < BN * DVS; idx += kThreads) {
      const int j = idx / DVS, c = idx - j * DVS;
      Vs[j * DVS + c] = (key_in(p.mask, b, j0 + j, Lk) && c < ncols) ? load_as<A>(v, (bh * Lk + j0 + j) * Dv + c0 + c) : A(0);
    }
    if (tid < BN) {
      const int j = j0 + tid;
      keep[tid] = (j < Lk && !(p.mask != nullptr && p.mask[static_cast<index_t>(b) * Lk + j])) ? A(1) : A(0);
    }
    LA_SYNC();
    for (int idx = tid; idx < BM * BN; idx += kThreads) {
      const int i = idx / BN, j = idx - i * BN;
      A s = 0;
      for (int d = 0; d < D; ++d) s += Qs[i * DP + d] * Ks[j * DP + d];
      s *= scale;
      const bool vis = keep[j] != A(0) && (!p.causal || j0 + j <= i0 + i);
      Ps[i * (BN + 1) + j] = vis ? A(1) + s + A(0.5) * s * s : A(0);
    }
    LA_SYNC();
    if (tid < BM) {
      A sum = 0;
      for (int j = 0; j < BN; ++j) sum += Ps[tid * (BN + 1) + j];
      rsum[tid] += sum;
    }
    for (int j = 0; j < BN; ++j) {
      A pv[4], vv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) pv[r] = Ps[(ty * 4 + r) * (BN + 1) + j];
#pragma unroll
      for (int c = 0; c < 4; ++c) vv[c] = Vs[j * DVS + tx * 4 + c];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] += pv[r] * vv[c];
    }
  }
  LA_SYNC();
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int rl = ty * 4 + r, row = i0 + rl;
    if (row >= Lq) continue;
    const A z = rsum[rl];
    const A inv = z != A(0) ? A(1) / z : A(0);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int col = tx * 4 + c;
      if (col < ncols) out[(bh * Lq + row) * Dv + c0 + col] = Elem<T>::store(acc[r][c] * inv);
    }
  }
  if (p.den != nullptr && blockIdx.y == 0 && tid < BM && i0 + tid < Lq) {
    static_cast<A*>(p.den)[bh * Lq + i0 + tid] = rsum[tid];
  }
}

// --------------------------------------------------------------------------------------------- backward

// One warp per query row: gt = dout / den (0 where den == 0), delta = gt . out.
template <class T, class A>
LA_GLOBAL void LA_LAUNCH_BOUNDS(kThreads) bwd_prep_kernel(BwdParams p, index_t rows) {
  const int lane = threadIdx.x % 32;
  const index_t row = static_cast<index_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together
  const T* dout = static_cast<const T*>(p.dout);
  const T* out = static_cast<const T*>(p.out);
  const A z = static_cast<const A*>(p.den)[row];
  const A inv = z != A(0) ? A(1) / z : A(0);
  A* gt = static_cast<A*>(p.gt);
  A part = 0;
  for (int c = lane; c < p.Dv; c += 32) {
    const A g = load_as<A>(dout, row * p.Dv + c) * inv;
    gt[row * p.Dv + c] = g;
    part += g * load_as<A>(out, row * p.Dv + c);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) part += la_shfl_xor(part, o);
  if (lane == 0) static_cast<A*>(p.delta)[row] = part;
}

template <class A>
LA_DEVICE bool bwd_visible(const A* keep, int j, int jg, int ig, int Lq, bool causal) {
  return keep[j] != A(0) && ig < Lq && (!causal || jg <= ig);
}

// dq_i = scale * sum_j ds_ij k_j, ds_ij = (gt_i . v_j - delta_i) (1 + s_ij). Block: BM queries, key tiles of BN.
template <class T, class A, int BM, int BN>
LA_GLOBAL void LA_LAUNCH_BOUNDS(kThreads) quad_bwd_dq_kernel(BwdParams p, int n_row_blocks) {
  LA_DYN_SMEM(A, sm);
  const int D = p.D, DP = D + 1, Dv = p.Dv, VP = Dv + 1, Lq = p.Lq, Lk = p.Lk;
  A* Qs = sm;                    // [BM][DP]
  A* Gs = Qs + BM * DP;          // [BM][VP]
  A* dl = Gs + BM * VP;          // [BM]
  A* Ks = dl + BM;               // [BN][DP]
  A* Vs = Ks + BN * DP;          // [BN][VP]
  A* DSs = Vs + BN * VP;         // [BM][BN + 1]
  A* keep = DSs + BM * (BN + 1); // [BN]
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const A* gt = static_cast<const A*>(p.gt);
  const A* delta = static_cast<const A*>(p.delta);

  const int tid = threadIdx.x;
  const index_t bh = blockIdx.x / n_row_blocks;
  const int i0 = static_cast<int>(blockIdx.x % n_row_blocks) * BM;
  const int b = static_cast<int>(bh / p.H);
  const A scale = static_cast<A>(p.scale);

  for (int idx = tid; idx < BM * D; idx += kThreads) {
    const int i = idx / D, d = idx - i * D;
    Qs[i * DP + d] = (i0 + i < Lq) ? load_as<A>(q, (bh * Lq + i0 + i) * D + d) : A(0);
  }
  for (int idx = tid; idx < BM * Dv; idx += kThreads) {
    const int i = idx / Dv, c = idx - i * Dv;
    Gs[i * VP + c] = (i0 + i < Lq) ? gt[(bh * Lq + i0 + i) * Dv + c] : A(0);
  }
  if (tid < BM) dl[tid] = (i0 + tid < Lq) ? delta[bh * Lq + i0 + tid] : A(0);

  constexpr int R = BM;  // BM * D / kThreads <= BM for D <= 128
  A acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0;

  const int kend = p.causal ? min(Lk, i0 + BM) : Lk;
  for (int j0 = 0; j0 < kend; j0 += BN) {
    LA_SYNC();
    for (int idx = tid; idx < BN * D; idx += kThreads) {
      const int j = idx / D, d = idx - j * D;
      Ks[j * DP + d] = key_in(p.mask, b, j0 + j, Lk) ? load_as<A>(k, (bh * Lk + j0 + j) * D + d) : A(0);
    }
    for (int idx = tid; idx < BN * Dv; idx += kThreads) {
      const int j = idx / Dv, c = idx - j * Dv;
      Vs[j * VP + c] = key_in(p.mask, b, j0 + j, Lk) ? load_as<A>(v, (bh * Lk + j0 + j) * Dv + c) : A(0);
    }
    if (tid < BN) {
      const int j = j0 + tid;
      keep[tid] = (j < Lk && !(p.mask != nullptr && p.mask[static_cast<index_t>(b) * Lk + j])) ? A(1) : A(0);
    }
    LA_SYNC();
    for (int idx = tid; idx < BM * BN; idx += kThreads) {
      const int i = idx / BN, j = idx - i * BN;
      A s = 0;
      for (int d = 0; d < D; ++d) s += Qs[i * DP + d] * Ks[j * DP + d];
      s *= scale;
      A dw = 0;
      for (int c = 0; c < Dv; ++c) dw += Gs[i * VP + c] * Vs[j * VP + c];
      dw -= dl[i];
      DSs[i * (BN + 1) + j] = bwd_visible(keep, j, j0 + j, i0 + i, Lq, p.causal) ? dw * (A(1) + s) : A(0);
    }
    LA_SYNC();
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int idx = tid + r * kThreads;
      if (idx < BM * D) {
        const int i = idx / D, d = idx - i * D;
        A a = 0;
        for (int j = 0; j < BN; ++j) a += DSs[i * (BN + 1) + j] * Ks[j * DP + d];
        acc[r] += a;
      }
    }
  }
  T* dq = static_cast<T*>(p.dq);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int idx = tid + r * kThreads;
    if (idx < BM * D) {
      const int i = idx / D, d = idx - i * D;
      if (i0 + i < Lq) dq[(bh * Lq + i0 + i) * D + d] = Elem<T>::store(acc[r] * scale);
    }
  }
}

// dv_j = sum_i w_ij gt_i, dk_j = scale * sum_i ds_ij q_i. Block: BN keys, query tiles of BM. Masked keys get 0.
template <class T, class A, int BM, int BN>
LA_GLOBAL void LA_LAUNCH_BOUNDS(kThreads) quad_bwd_dkdv_kernel(BwdParams p, int n_row_blocks) {
  LA_DYN_SMEM(A, sm);
  const int D = p.D, DP = D + 1, Dv = p.Dv, VP = Dv + 1, Lq = p.Lq, Lk = p.Lk;
  A* Ks = sm;                     // [BN][DP]
  A* Vs = Ks + BN * DP;           // [BN][VP]
  A* keep = Vs + BN * VP;         // [BN]
  A* Qs = keep + BN;              // [BM][DP]
  A* Gs = Qs + BM * DP;           // [BM][VP]
  A* dl = Gs + BM * VP;           // [BM]
  A* Ws = dl + BM;                // [BM][BN + 1]
  A* DSs = Ws + BM * (BN + 1);    // [BM][BN + 1]
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const A* gt = static_cast<const A*>(p.gt);
  const A* delta = static_cast<const A*>(p.delta);

  const int tid = threadIdx.x;
  const index_t bh = blockIdx.x / n_row_blocks;
  const int j0 = static_cast<int>(blockIdx.x % n_row_blocks) * BN;
  const int b = static_cast<int>(bh / p.H);
  const A scale = static_cast<A>(p.scale);

  for (int idx = tid; idx < BN * D; idx += kThreads) {
    const int j = idx / D, d = idx - j * D;
    Ks[j * DP + d] = key_in(p.mask, b, j0 + j, Lk) ? load_as<A>(k, (bh * Lk + j0 + j) * D + d) : A(0);
  }
  for (int idx = tid; idx < BN * Dv; idx += kThreads) {
    const int j = idx / Dv, c = idx - j * Dv;
    Vs[j * VP + c] = key_in(p.mask, b, j0 + j, Lk) ? load_as<A>(v, (bh * Lk + j0 + j) * Dv + c) : A(0);
  }
  if (tid < BN) {
    const int j = j0 + tid;
    keep[tid] = (j < Lk && !(p.mask != nullptr && p.mask[static_cast<index_t>(b) * Lk + j])) ? A(1) : A(0);
  }

  constexpr int RK = BN;      // BN * D / kThreads
  constexpr int RV = 2 * BN;  // BN * Dv / kThreads for Dv <= 256
  A dk[RK], dv[RV];
#pragma unroll
  for (int r = 0; r < RK; ++r) dk[r] = 0;
#pragma unroll
  for (int r = 0; r < RV; ++r) dv[r] = 0;

  const int ibegin = p.causal ? (j0 / BM) * BM : 0;
  for (int i0 = ibegin; i0 < Lq; i0 += BM) {
    LA_SYNC();
    for (int idx = tid; idx < BM * D; idx += kThreads) {
      const int i = idx / D, d = idx - i * D;
      Qs[i * DP + d] = (i0 + i < Lq) ? load_as<A>(q, (bh * Lq + i0 + i) * D + d) : A(0);
    }
    for (int idx = tid; idx < BM * Dv; idx += kThreads) {
      const int i = idx / Dv, c = idx - i * Dv;
      Gs[i * VP + c] = (i0 + i < Lq) ? gt[(bh * Lq + i0 + i) * Dv + c] : A(0);
    }
    if (tid < BM) dl[tid] = (i0 + tid < Lq) ? delta[bh * Lq + i0 + tid] : A(0);
    LA_SYNC();
    for (int idx = tid; idx < BM * BN; idx += kThreads) {
      const int i = idx / BN, j = idx - i * BN;
      A s = 0;
      for (int d = 0; d < D; ++d) s += Qs[i * DP + d] * Ks[j * DP + d];
      s *= scale;
      A dw = 0;
      for (int c = 0; c < Dv; ++c) dw += Gs[i * VP + c] * Vs[j * VP + c];
      dw -= dl[i];
      const bool vis = bwd_visible(keep, j, j0 + j, i0 + i, Lq, p.causal);
      Ws[i * (BN + 1) + j] = vis ? A(1) + s + A(0.5) * s * s : A(0);
      DSs[i * (BN + 1) + j] = vis ? dw * (A(1) + s) : A(0);
    }
    LA_SYNC();
#pragma unroll
    for (int r = 0; r < RV; ++r) {
      const int idx = tid + r * kThreads;
      if (idx < BN * Dv) {
        const int j = idx / Dv, c = idx - j * Dv;
        A a = 0;
        for (int i = 0; i < BM; ++i) a += Ws[i * (BN + 1) + j] * Gs[i * VP + c];
        dv[r] += a;
      }
    }
#pragma unroll
    for (int r = 0; r < RK; ++r) {
      const int idx = tid + r * kThreads;
      if (idx < BN * D) {
        const int j = idx / D, d = idx - j * D;
        A a = 0;
        for (int i = 0; i < BM; ++i) a += DSs[i * (BN + 1) + j] * Qs[i * DP + d];
        dk[r] += a;
      }
    }
  }
  T* dkp = static_cast<T*>(p.dk);
  T* dvp = static_cast<T*>(p.dv);
#pragma unroll
  for (int r = 0; r < RV; ++r) {
    const int idx = tid + r * kThreads;
    if (idx < BN * Dv) {
      const int j = idx / Dv, c = idx - j * Dv;
      if (j0 + j < Lk) dvp[(bh * Lk + j0 + j) * Dv + c] = Elem<T>::store(dv[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < RK; ++r) {
    const int idx = tid + r * kThreads;
    if (idx < BN * D) {
      const int j = idx / D, d = idx - j * D;
      if (j0 + j < Lk) dkp[(bh * Lk + j0 + j) * D + d] = Elem<T>::store(dk[r] * scale);
    }
  }
}

// ------------------------------------------------------------------------------------------ state (linear)

// kv_out[m, :] = kv0[m, :] + sum_j phi_m(k_j) v_j over unmasked keys; ks_out[m] = ks0[m] + sum_j phi_m(k_j).
// Block: 32 features x 64 columns; loops over key tiles of 32, building phi(K) in shared memory.
template <class T, class A>
LA_GLOBAL void LA_LAUNCH_BOUNDS(kThreads) state_accum_kernel(AttnParams p, FeatureCoefs<A> fc, int n_row_blocks) {
  constexpr int BF = kTile, BL = kTile, DVS = kDvSlice;
  LA_DYN_SMEM(A, sm);
  const int D = p.D, DP = D + 1, Dv = p.Dv, Lk = p.Lk, M = p.M;
  A* Ks = sm;                       // [BL][DP], column D holds keep (1 or 0); masked rows are all zero
  A* Vs = Ks + BL * DP;             // [BL][DVS]
  A* Fs = Vs + BL * DVS;            // [BF][BL + 1]
  A* fcoef = Fs + BF * (BL + 1);    // [BF]
  int* fa = reinterpret_cast<int*>(fcoef + BF);  // [BF]
  int* fb = fa + BF;                              // [BF]
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  const int tid = threadIdx.x;
  const index_t bh = blockIdx.x / n_row_blocks;
  const int f0 = static_cast<int>(blockIdx.x % n_row_blocks) * BF;
  const int b = static_cast<int>(bh / p.H);
  const int c0 = blockIdx.y * DVS;
  const int ncols = min(DVS, Dv - c0);

  if (tid < BF) {
    const int m = f0 + tid;
    const FeaturePair fp = feature_pair(m, D, D);
    fcoef[tid] = m < M ? feature_coef(fc, fp.kind) : A(0);
    fa[tid] = fp.a;
    fb[tid] = fp.b;
  }
  const int ty = tid / 16, tx = tid % 16;
  A acc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = 0;
  A zacc = 0;

  for (int t0 = 0; t0 < Lk; t0 += BL) {
    LA_SYNC();
    for (int idx = tid; idx < BL * DP; idx += kThreads) {
      const int t = idx / DP, d = idx - t * DP, j = t0 + t;
      const bool kp = j < Lk && !(p.mask != nullptr && p.mask[static_cast<index_t>(b) * Lk + j]);
      Ks[idx] = kp ? (d < D ? load_as<A>(k, (bh * Lk + j) * D + d) : A(1)) : A(0);
    }
    for (int idx = tid; idx < BL * DVS; idx += kThreads) {
      const int t = idx / DVS, c = idx - t * DVS, j = t0 + t;
      const bool kp = j < Lk && !(p.mask != nullptr && p.mask[static_cast<index_t>(b) * Lk + j]);
      Vs[idx] = (kp && c < ncols) ? load_as<A>(v, (bh * Lk + j) * Dv + c0 + c) : A(0);
    }
    LA_SYNC();
    for (int idx = tid; idx < BF * BL; idx += kThreads) {
      const int f = idx / BL, t = idx - f * BL;
      Fs[f * (BL + 1) + t] = fcoef[f] * Ks[t * DP + fa[f]] * Ks[t * DP + fb[f]];
    }
    LA_SYNC();
    for (int t = 0; t < BL; ++t) {
      A fv[4], vv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) fv[r] = Fs[(ty * 4 + r) * (BL + 1) + t];
#pragma unroll
      for (int c = 0; c < 4; ++c) vv[c] = Vs[t * DVS + tx * 4 + c];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] += fv[r] * vv[c];
    }
    if (tid < BF) {
      for (int t = 0; t < BL; ++t) zacc += Fs[tid * (BL + 1) + t];
    }
  }
  const A* kv0 = static_cast<const A*>(p.kv0);
  const A* ks0 = static_cast<const A*>(p.ks0);
  A* kv_out = static_cast<A*>(p.kv_out);
  A* ks_out = static_cast<A*>(p.ks_out);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int m = f0 + ty * 4 + r;
    if (m >= M) continue;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int col = tx * 4 + c;
      if (col >= ncols) continue;
      const index_t off = (bh * M + m) * Dv + c0 + col;
      kv_out[off] = (kv0 != nullptr ? kv0[off] : A(0)) + acc[r][c];
    }
  }
  if (blockIdx.y == 0 && tid < BF && f0 + tid < M) {
    const index_t off = bh * M + f0 + tid;
    ks_out[off] = (ks0 != nullptr ? ks0[off] : A(0)) + zacc;
  }
}

// num_i = phi(q_i)^T kv, den_i = phi(q_i)^T ks (state p.kv0, p.ks0). FINALIZE: out = num / den and den (the
// non-causal linear form); else num and den go to the prefill scratch num_out, den_out.
template <class T, class A, bool FINALIZE>
LA_GLOBAL void LA_LAUNCH_BOUNDS(kThreads)
    state_read_kernel(AttnParams p, FeatureCoefs<A> fc, A* num_out, A* den_out, int n_row_blocks) {
  constexpr int BM = kTile, BF = kTile, DVS = kDvSlice;
  LA_DYN_SMEM(A, sm);
  const int D = p.D, DP = D + 1, Dv = p.Dv, Lq = p.Lq, M = p.M;
  A* Qs = sm;                       // [BM][DP], column D holds 1
  A* Fs = Qs + BM * DP;             // [BM][BF + 1]
  A* Ss = Fs + BM * (BF + 1);       // [BF][DVS]
  A* zs = Ss + BF * DVS;            // [BF]
  A* rs = zs + BF;                  // [BM]
  A* fcoef = rs + BM;               // [BF]
  int* fa = reinterpret_cast<int*>(fcoef + BF);
  int* fb = fa + BF;
  const T* q = static_cast<const T*>(p.q);
  const A* S = static_cast<const A*>(p.kv0);
  const A* z = static_cast<const A*>(p.ks0);

  const int tid = threadIdx.x;
  const index_t bh = blockIdx.x / n_row_blocks;
  const int i0 = static_cast<int>(blockIdx.x % n_row_blocks) * BM;
  const int c0 = blockIdx.y * DVS;
  const int ncols = min(DVS, Dv - c0);

  for (int idx = tid; idx < BM * DP; idx += kThreads) {
    const int i = idx / DP, d = idx - i * DP;
    Qs[idx] = (i0 + i < Lq) ? (d < D ? load_as<A>(q, (bh * Lq + i0 + i) * D + d) : A(1)) : A(0);
  }
  const int ty = tid / 16, tx = tid % 16;
  A acc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = 0;
  A dacc = 0;

  for (int f0 = 0; f0 < M; f0 += BF) {
    LA_SYNC();
    if (tid < BF) {
      const int m = f0 + tid;
      const FeaturePair fp = feature_pair(m, D, D);
      fcoef[tid] = m < M ? feature_coef(fc, fp.kind) : A(0);
      fa[tid] = fp.a;
      fb[tid] = fp.b;
      zs[tid] = m < M ? z[bh * M + m] : A(0);
    }
    for (int idx = tid; idx < BF * DVS; idx += kThreads) {
      const int f = idx / DVS, c = idx - f * DVS;
      Ss[idx] = (f0 + f < M && c < ncols) ? S[(bh * M + f0 + f) * Dv + c0 + c] : A(0);
    }
    LA_SYNC();
    for (int idx = tid; idx < BM * BF; idx += kThreads) {
      const int i = idx / BF, f = idx - i * BF;
      Fs[i * (BF + 1) + f] = fcoef[f] * Qs[i * DP + fa[f]] * Qs[i * DP + fb[f]];
    }
    LA_SYNC();
    for (int f = 0; f < BF; ++f) {
      A fv[4], sv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) fv[r] = Fs[(ty * 4 + r) * (BF + 1) + f];
#pragma unroll
      for (int c = 0; c < 4; ++c) sv[c] = Ss[f * DVS + tx * 4 + c];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] += fv[r] * sv[c];
    }
    if (tid < BM) {
      for (int f = 0; f < BF; ++f) dacc += Fs[tid * (BF + 1) + f] * zs[f];
    }
  }
  if (tid < BM) rs[tid] = dacc;
  LA_SYNC();
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int rl = ty * 4 + r, row = i0 + rl;
    if (row >= Lq) continue;
    const A den = rs[rl];
    const A inv = den != A(0) ? A(1) / den : A(0);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int col = tx * 4 + c;
      if (col >= ncols) continue;
      const index_t off = (bh * Lq + row) * Dv + c0 + col;
      if (FINALIZE) {
        out[off] = Elem<T>::store(acc[r][c] * inv);
      } else {
        num_out[off] = acc[r][c];
      }
    }
  }
  if (blockIdx.y == 0 && tid < BM && i0 + tid < Lq) {
    A* dst = FINALIZE ? static_cast<A*>(p.den) : den_out;
    if (dst != nullptr) dst[bh * Lq + i0 + tid] = rs[tid];
  }
}

// ------------------------------------------------------------------------------------------------ decode

constexpr int kStepRows = 32;      // state rows (features) per block
constexpr int kStepThreads = 256;

// Block: 32 state rows of one (batch, head). kv_out = kv + phi(k) v^T, ks_out = ks + phi(k); the block's
// partial phi(q)^T kv_out and phi(q)^T ks_out go to partial[bh, block, :].
template <class T, class A>
LA_GLOBAL void LA_LAUNCH_BOUNDS(kStepThreads) step_update_kernel(StepParams p, FeatureCoefs<A> fc) {
  constexpr int RF = kStepRows;
  LA_DYN_SMEM(A, sm);
  const int D = p.D, Dv = p.Dv, M = p.M;
  A* xq = sm;             // [D + 1], x[D] = 1
  A* xk = xq + D + 1;     // [D + 1]
  A* vs = xk + D + 1;     // [Dv]
  A* pq = vs + Dv;        // [RF] phi(q) rows
  A* pk = pq + RF;        // [RF] phi(k) rows
  A* pqk = pk + RF;       // [RF] phi(q)_m * ks_out[m]
  A* red = pqk + RF;      // [kStepThreads]
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const A* kv = static_cast<const A*>(p.kv);
  const A* ks = static_cast<const A*>(p.ks);
  A* kv_out = static_cast<A*>(p.kv_out);
  A* ks_out = static_cast<A*>(p.ks_out);

  const int tid = threadIdx.x;
  const int nblk = (M + RF - 1) / RF;  // row blocks per head; the grid is flat: (batch*head, row block)
  const index_t bh = blockIdx.x / nblk;
  const int blk = static_cast<int>(blockIdx.x - bh * nblk);
  const int f0 = blk * RF;

  for (int d = tid; d <= D; d += kStepThreads) {
    xq[d] = d < D ? load_as<A>(q, bh * D + d) : A(1);
    xk[d] = d < D ? load_as<A>(k, bh * D + d) : A(1);
  }
  for (int c = tid; c < Dv; c += kStepThreads) vs[c] = load_as<A>(v, bh * Dv + c);
  LA_SYNC();
  if (tid < RF) {
    const int m = f0 + tid;
    if (m < M) {
      const FeaturePair fp = feature_pair(m, D, D);
      const A cf = feature_coef(fc, fp.kind);
      const A fq = cf * xq[fp.a] * xq[fp.b];
      const A fk = cf * xk[fp.a] * xk[fp.b];
      const A ksn = ks[bh * M + m] + fk;
      ks_out[bh * M + m] = ksn;
      pq[tid] = fq;
      pk[tid] = fk;
      pqk[tid] = fq * ksn;
    } else {
      pq[tid] = A(0);
      pk[tid] = A(0);
      pqk[tid] = A(0);
    }
  }
  LA_SYNC();
  const int ntr = min(kStepThreads, (Dv + 31) / 32 * 32);  // threads per row
  const int rows_par = kStepThreads / ntr;                 // rows in parallel
  const int r = tid / ntr, c = tid - (tid / ntr) * ntr;
  A num = 0;
  if (r < rows_par && c < Dv) {
    for (int f = r; f < RF && f0 + f < M; f += rows_par) {
      const index_t off = (bh * M + f0 + f) * Dv + c;
      const A kvn = kv[off] + pk[f] * vs[c];
      kv_out[off] = kvn;
      num += pq[f] * kvn;
    }
  }
  red[tid] = num;
  LA_SYNC();
  A* part = static_cast<A*>(p.partial) + (bh * nblk + blk) * (Dv + 1);
  for (int cc = tid; cc < Dv; cc += kStepThreads) {
    A s = 0;
    for (int rr = 0; rr < rows_par; ++rr) s += red[rr * ntr + cc];
    part[cc] = s;
  }
  if (tid == 0) {
    A s = 0;
    for (int f = 0; f < RF; ++f) s += pqk[f];
    part[Dv] = s;
  }
}

// out = (sum of partial numerators) / (sum of partial denominators), 0 where the denominator is 0.
template <class T, class A>
LA_GLOBAL void LA_LAUNCH_BOUNDS(kStepThreads) step_finalize_kernel(StepParams p, int nblk) {
  LA_DYN_SMEM(A, tot);  // [Dv + 1]
  const int Dv = p.Dv;
  const index_t bh = blockIdx.x;
  const A* part = static_cast<const A*>(p.partial);
  for (int c = threadIdx.x; c <= Dv; c += kStepThreads) {
    A s = 0;
    for (int blk = 0; blk < nblk; ++blk) s += part[(bh * nblk + blk) * (Dv + 1) + c];
    tot[c] = s;
  }
  LA_SYNC();
  const A den = tot[Dv];
  const A inv = den != A(0) ? A(1) / den : A(0);
  T* out = static_cast<T*>(p.out);
  for (int c = threadIdx.x; c < Dv; c += kStepThreads) out[bh * Dv + c] = Elem<T>::store(tot[c] * inv);
}

}  // namespace simt

// ------------------------------------------------------------------------------------------- launchers

#define LA_DISPATCH_TYPES(dt, ...)                                  \
  switch (dt) {                                                     \
    case DType::F32: {                                              \
      using T = float;                                              \
      using A = float;                                              \
      __VA_ARGS__;                                                  \
      break;                                                        \
    }                                                               \
    case DType::F16: {                                              \
      using T = __half;                                             \
      using A = float;                                              \
      __VA_ARGS__;                                                  \
      break;                                                        \
    }                                                               \
    case DType::BF16: {                                             \
      using T = __nv_bfloat16;                                      \
      using A = float;                                              \
      __VA_ARGS__;                                                  \
      break;                                                        \
    }                                                               \
    case DType::F64: {                                              \
      using T = double;                                             \
      using A = double;                                             \
      __VA_ARGS__;                                                  \
      break;                                                        \
    }                                                               \
  }

void launch_quad_fwd(DType dt, const AttnParams& p, const DeviceInfo& dev, la_stream_t stream) {
  using namespace simt;
  LA_DISPATCH_TYPES(dt, {
    const int DP = p.D + 1;
    const size_t smem = sizeof(A) * (2 * kTile * DP + kTile * kDvSlice + kTile * (kTile + 1) + 2 * kTile);
    auto kernel = quad_fwd_kernel<T, A>;
    prepare_smem(kernel, smem, dev, "quadratic forward");
    const int nrb = ceil_div(p.Lq, kTile);
    const dim3 grid(static_cast<unsigned>(static_cast<index_t>(nrb) * p.B * p.H), ceil_div(p.Dv, kDvSlice));
    LA_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p, nrb);
  });
}

void launch_bwd_prep(DType dt, const BwdParams& p, la_stream_t stream) {
  using namespace simt;
  const index_t rows = static_cast<index_t>(p.B) * p.H * p.Lq;
  if (rows == 0) return;
  LA_DISPATCH_TYPES(dt, {
    auto prep = bwd_prep_kernel<T, A>;
    LA_LAUNCH(prep, dim3(ceil_div(rows, kThreads / 32)), dim3(kThreads), 0, stream, p, rows);
  });
}

// After launch_bwd_prep.
void launch_quad_bwd(DType dt, const BwdParams& p, const DeviceInfo& dev, la_stream_t stream) {
  using namespace simt;
  const index_t rows = static_cast<index_t>(p.B) * p.H * p.Lq;
  LA_DISPATCH_TYPES(dt, {
    constexpr int BT = sizeof(A) == 8 ? 16 : 32;  // tiles of 16 in double keep shared memory under 110 KiB
    const int DP = p.D + 1, VP = p.Dv + 1;
    if (rows > 0) {
      const size_t smem_dq = sizeof(A) * (2 * BT * DP + 2 * BT * VP + BT * (BT + 1) + 2 * BT);
      auto dq = quad_bwd_dq_kernel<T, A, BT, BT>;
      prepare_smem(dq, smem_dq, dev, "quadratic backward (dq)");
      const int nqb = ceil_div(p.Lq, BT);
      LA_LAUNCH(dq, dim3(static_cast<unsigned>(static_cast<index_t>(nqb) * p.B * p.H)), dim3(kThreads), smem_dq,
                stream, p, nqb);
    }
    if (p.Lk > 0) {
      const size_t smem_kv = sizeof(A) * (2 * BT * DP + 2 * BT * VP + 2 * BT * (BT + 1) + 2 * BT);
      auto dkdv = quad_bwd_dkdv_kernel<T, A, BT, BT>;
      prepare_smem(dkdv, smem_kv, dev, "quadratic backward (dk, dv)");
      const int nkb = ceil_div(p.Lk, BT);
      LA_LAUNCH(dkdv, dim3(static_cast<unsigned>(static_cast<index_t>(nkb) * p.B * p.H)), dim3(kThreads), smem_kv,
                stream, p, nkb);
    }
  });
}

void launch_state_accum(DType dt, const AttnParams& p, const DeviceInfo& dev, la_stream_t stream) {
  using namespace simt;
  LA_DISPATCH_TYPES(dt, {
    const int DP = p.D + 1;
    const size_t smem =
        sizeof(A) * (kTile * DP + kTile * kDvSlice + kTile * (kTile + 1) + kTile) + sizeof(int) * 2 * kTile;
    auto kernel = state_accum_kernel<T, A>;
    prepare_smem(kernel, smem, dev, "state accumulation");
    const int nfb = ceil_div(p.M, kTile);
    const dim3 grid(static_cast<unsigned>(static_cast<index_t>(nfb) * p.B * p.H), ceil_div(p.Dv, kDvSlice));
    LA_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p, make_feature_coefs<A>(p.scale), nfb);
  });
}

void launch_state_read(DType dt, const AttnParams& p, bool finalize, void* num_out, void* den_out,
                       const DeviceInfo& dev, la_stream_t stream) {
  using namespace simt;
  LA_DISPATCH_TYPES(dt, {
    const int DP = p.D + 1;
    const size_t smem = sizeof(A) * (kTile * DP + kTile * (kTile + 1) + kTile * kDvSlice + 3 * kTile) +
                        sizeof(int) * 2 * kTile;
    const int nrb = ceil_div(p.Lq, kTile);
    const dim3 grid(static_cast<unsigned>(static_cast<index_t>(nrb) * p.B * p.H), ceil_div(p.Dv, kDvSlice));
    const auto fc = make_feature_coefs<A>(p.scale);
    if (finalize) {
      auto kernel = state_read_kernel<T, A, true>;
      prepare_smem(kernel, smem, dev, "state read");
      LA_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p, fc, static_cast<A*>(nullptr),
                static_cast<A*>(nullptr), nrb);
    } else {
      auto kernel = state_read_kernel<T, A, false>;
      prepare_smem(kernel, smem, dev, "state read");
      LA_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p, fc, static_cast<A*>(num_out),
                static_cast<A*>(den_out), nrb);
    }
  });
}

int step_num_blocks(int M) { return (M + simt::kStepRows - 1) / simt::kStepRows; }

template <class T, class A>
static void launch_step_typed(const StepParams& p, const DeviceInfo& dev, la_stream_t stream) {
  using namespace simt;
  const int nblk = step_num_blocks(p.M);
  const size_t smem_u = sizeof(A) * (2 * (p.D + 1) + p.Dv + 3 * kStepRows + kStepThreads);
  auto update = step_update_kernel<T, A>;
  prepare_smem(update, smem_u, dev, "decode step");
  LA_LAUNCH(update, dim3(static_cast<unsigned>(nblk * p.BH)), dim3(kStepThreads), smem_u, stream, p,
            make_feature_coefs<A>(p.scale));
  auto finalize = step_finalize_kernel<T, A>;
  LA_LAUNCH(finalize, dim3(p.BH), dim3(kStepThreads), sizeof(A) * (p.Dv + 1), stream, p, nblk);
}

void launch_step(DType dt, DType state_dt, const StepParams& p, const DeviceInfo& dev, la_stream_t stream) {
  TORCH_CHECK(state_dt == DType::F32 || state_dt == DType::F64, "linattn_cuda: the state must be float32 or float64");
  TORCH_CHECK(p.BH <= (int64_t{1} << 31) / step_num_blocks(p.M) - 1, "linattn_cuda: taylor_step supports at most ",
              (int64_t{1} << 31) / step_num_blocks(p.M) - 1, " batch*heads for M = ", p.M, ", got ", p.BH);
  if (p.BH == 0) return;
  const bool f64 = state_dt == DType::F64;
  switch (dt) {
    case DType::F32:
      f64 ? launch_step_typed<float, double>(p, dev, stream) : launch_step_typed<float, float>(p, dev, stream);
      break;
    case DType::F16:
      f64 ? launch_step_typed<__half, double>(p, dev, stream) : launch_step_typed<__half, float>(p, dev, stream);
      break;
    case DType::BF16:
      f64 ? launch_step_typed<__nv_bfloat16, double>(p, dev, stream)
          : launch_step_typed<__nv_bfloat16, float>(p, dev, stream);
      break;
    case DType::F64:
      f64 ? launch_step_typed<double, double>(p, dev, stream) : launch_step_typed<double, float>(p, dev, stream);
      break;
  }
}

}  // namespace linattn
