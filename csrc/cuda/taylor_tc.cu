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
// A chunk's inputs are loaded with all loads in flight at once (the other resident blocks compute meanwhile),
// and S and V are stored so that each B fragment is one conflict-free 64-bit load.
#include <algorithm>

#include "launch_util.cuh"

namespace linattn {
namespace tc {

constexpr int C = 64;
constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;

// Shared-memory layouts. Q and K rows (stride QST == 4 mod 32) hold D values, zeros up to DK, and a 1 in
// column DK (the x[one] slot of the feature map). S and V are stored "paired": rows r and r + 4 of every
// group of 8 rows interleave element by element, so that the two B-fragment values of a lane (k rows t and
// t + 4, same column) are one 64-bit load; the pair-row stride PST (in float2) == 4 mod 8 makes those
// loads conflict-free (each half-warp touches 16 distinct 8-byte bank pairs). The normalizer column DS of S and V (V: all ones) rides in the last n-tile.
template <int DK, int DS>
struct Layout {
  static constexpr int QST = DK + 4;
  static constexpr int NTO = DS / 8 + 1;   // output n-tiles, the last one holding the normalizer column
  static constexpr int PST = NTO * 8 + 4;   // float2 per pair-row of S and V
  static size_t smem_bytes(int MP) {
    return sizeof(float) * (static_cast<size_t>(MP) * PST + C * PST + 2 * C * QST + C) + 8 * static_cast<size_t>(MP);
  }
};

// Offset (in floats) of element (row, col) of a paired matrix with pair-row stride PST.
template <int PST>
LA_DEVICE int paired(int row, int col) {
  return ((row >> 3) * 4 + (row & 3)) * (2 * PST) + 2 * col + ((row >> 2) & 1);
}

struct alignas(8) FeatEntry {
  int ab;      // a | b << 16: phi_m(x) = coef * x[a] * x[b]
  float coef;
};

template <int DK, int DS>
constexpr int min_blocks() {
  return DK > 16 ? 1 : (DS > 32 ? 2 : 4);
}

template <class T, bool SPLIT, int DK, int DS, bool CAUSAL>
LA_GLOBAL void LA_LAUNCH_BOUNDS2(THREADS, (min_blocks<DK, DS>())) chunk_kernel(AttnParams p, FeatureCoefs<float> fc, int MP, int nslices) {
  using L = Layout<DK, DS>;
  constexpr int QST = L::QST, NTO = L::NTO, PST = L::PST;
  constexpr int NQ = C * DK / THREADS, NV = C * DS / THREADS;  // loads per thread per chunk
  LA_DYN_SMEM(float, sm);
  float* S = sm;                                                // paired [MP][NTO * 8]
  float* Vs = S + MP * PST;                                     // paired [C][NTO * 8]
  float* Qs = Vs + C * PST;                                     // [C][QST]
  float* Ks = Qs + C * QST;                                     // [C][QST]
  float* keep = Ks + C * QST;                                   // [C]
  FeatEntry* ftab = reinterpret_cast<FeatEntry*>(keep + C);     // [MP]

  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ k = static_cast<const T*>(p.k);
  const T* __restrict__ v = static_cast<const T*>(p.v);
  const int D = p.D, Dv = p.Dv, Lq = p.Lq, Lk = p.Lk, M = p.M;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int nseg = p.nseg > 1 ? p.nseg : 1;
  const index_t vbh = blockIdx.x / nslices;  // (batch*head, segment): the index of this block's states
  const index_t bh = vbh / nseg;
  const int seg = static_cast<int>(vbh % nseg);
  const int slice = static_cast<int>(blockIdx.x % nslices);
  const int b = static_cast<int>(bh / p.H);
  const int c0 = slice * DS;
  const int ncols = min(DS, Dv - c0);
  const float scale = static_cast<float>(p.scale);
  const int Lrange = p.state_only ? Lk : Lq;  // the tokens this block walks: [tbeg, tend)
  const int tbeg = nseg > 1 ? seg * p.seg_len : 0;
  const int tend = nseg > 1 ? min(Lrange, tbeg + p.seg_len) : Lrange;

  // Feature table, initial state, constant columns.
  for (int m = tid; m < MP; m += THREADS) {
    const FeaturePair fp = feature_pair(m, D, DK);
    FeatEntry e;
    e.ab = m < M ? (fp.a | (fp.b << 16)) : (DK | (DK << 16));
    e.coef = m < M ? fc.c[fp.kind] : 0.f;
    ftab[m] = e;
  }
  {
    const float* kv0 = static_cast<const float*>(p.kv0);
    const float* ks0 = static_cast<const float*>(p.ks0);
    for (int idx = tid; idx < MP * NTO * 8; idx += THREADS) {
      const int m = idx / (NTO * 8), c = idx - m * (NTO * 8);
      float x = 0.f;
      if (m < M) {
        if (c < ncols && kv0 != nullptr) x = kv0[(vbh * M + m) * Dv + c0 + c];
        if (c == DS && ks0 != nullptr) x = ks0[vbh * M + m];
      }
      S[paired<PST>(m, c)] = x;
    }
  }
  for (int idx = tid; idx < C * 8; idx += THREADS) {
    const int r = idx / 8, c = DS + idx % 8;
    Vs[paired<PST>(r, c)] = c == DS ? 1.f : 0.f;
  }
  for (int r = tid; r < C; r += THREADS) {
    Qs[r * QST + DK] = 1.f;
    Ks[r * QST + DK] = 1.f;
  }

  // Chunk loads: fixed trip counts, so every load of the chunk is in flight before the first store.
  auto load_q = [&](int t0) {
#pragma unroll
    for (int i = 0; i < NQ; ++i) {
      const int e = tid + i * THREADS, r = e / DK, d = e % DK;
      Qs[r * QST + d] = (t0 + r < Lq && d < D) ? Elem<T>::load(q[(bh * Lq + t0 + r) * D + d]) : 0.f;
    }
  };
  auto load_kv = [&](int t0) {
#pragma unroll
    for (int i = 0; i < NQ; ++i) {
      const int e = tid + i * THREADS, r = e / DK, d = e % DK;
      Ks[r * QST + d] = (key_in(p.mask, b, t0 + r, Lk) && d < D) ? Elem<T>::load(k[(bh * Lk + t0 + r) * D + d]) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int e = tid + i * THREADS, r = e / DS, c = e % DS;
      Vs[paired<PST>(r, c)] =
          (key_in(p.mask, b, t0 + r, Lk) && c < ncols) ? Elem<T>::load(v[(bh * Lk + t0 + r) * Dv + c0 + c]) : 0.f;
    }
    const int j = t0 + tid;
    if (tid < C) keep[tid] = (j < Lk && !(p.mask != nullptr && p.mask[static_cast<index_t>(b) * Lk + j])) ? 1.f : 0.f;
  };

  // O (16 rows of this warp x NTO * 8 columns) += phi(Q) S.
  auto read_state = [&](float (&o)[NTO][4]) {
    const float* x0 = Qs + (warp * 16 + g) * QST;
    const float* x1 = x0 + 8 * QST;
    #pragma unroll 1
    for (int f0 = 0; f0 < MP; f0 += 8) {
      const FeatEntry eA = ftab[f0 + t], eB = ftab[f0 + t + 4];
      const int aA = eA.ab & 0xffff, bA = eA.ab >> 16, aB = eB.ab & 0xffff, bB = eB.ab >> 16;
      const float av[4] = {eA.coef * x0[aA] * x0[bA], eA.coef * x1[aA] * x1[bA], eB.coef * x0[aB] * x0[bB],
                           eB.coef * x1[aB] * x1[bB]};
      Frag<SPLIT, 4> fa;
      fa.set(av);
      const float* srow = S + ((f0 >> 3) * 4 + t) * (2 * PST) + 2 * g;
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) {
        const float2 bv2 = *reinterpret_cast<const float2*>(srow + 16 * nt);  // rows f0 + t, f0 + t + 4
        const float bv[2] = {bv2.x, bv2.y};
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

  // S += phi(K)^T [V | 1] over the first nvalid tokens of the chunk (masked keys weigh 0).
  auto update_state = [&](int nvalid) {
    #pragma unroll 1
    for (int mt = warp; mt < MP / 16; mt += WARPS) {
      const int m0 = mt * 16 + g, m1 = m0 + 8;
      float u[NTO][4];
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) {
        const int col = nt * 8 + 2 * t;
        u[nt][0] = S[paired<PST>(m0, col)];
        u[nt][1] = S[paired<PST>(m0, col + 1)];
        u[nt][2] = S[paired<PST>(m1, col)];
        u[nt][3] = S[paired<PST>(m1, col + 1)];
      }
      const FeatEntry e0 = ftab[m0], e1 = ftab[m1];
      const int a0 = e0.ab & 0xffff, b0 = e0.ab >> 16, a1 = e1.ab & 0xffff, b1 = e1.ab >> 16;
      #pragma unroll 1
      for (int j0 = 0; j0 < nvalid; j0 += 8) {
        const float* kA = Ks + (j0 + t) * QST;
        const float* kB = kA + 4 * QST;
        const float kpA = keep[j0 + t], kpB = keep[j0 + t + 4];
        const float av[4] = {e0.coef * kA[a0] * kA[b0] * kpA, e1.coef * kA[a1] * kA[b1] * kpA,
                             e0.coef * kB[a0] * kB[b0] * kpB, e1.coef * kB[a1] * kB[b1] * kpB};
        Frag<SPLIT, 4> fa;
        fa.set(av);
        const float* vrow = Vs + ((j0 >> 3) * 4 + t) * (2 * PST) + 2 * g;
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
          const float2 bv2 = *reinterpret_cast<const float2*>(vrow + 16 * nt);  // keys j0 + t, j0 + t + 4
          const float bv[2] = {bv2.x, bv2.y};
          Frag<SPLIT, 2> fb;
          fb.set(bv);
          mma<SPLIT>(u[nt], fa, fb);
        }
      }
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) {
        const int col = nt * 8 + 2 * t;
        S[paired<PST>(m0, col)] = u[nt][0];
        S[paired<PST>(m0, col + 1)] = u[nt][1];
        S[paired<PST>(m1, col)] = u[nt][2];
        S[paired<PST>(m1, col + 1)] = u[nt][3];
      }
    }
  };

  if (p.state_only) {
    for (int t0 = tbeg; t0 < tend; t0 += C) {
      load_kv(t0);
      LA_SYNC();
      update_state(min(C, tend - t0));
      LA_SYNC();
    }
  } else if (CAUSAL) {
    const bool want_state = p.kv_out != nullptr;
    for (int t0 = tbeg; t0 < tend; t0 += C) {
      load_q(t0);
      load_kv(t0);
      LA_SYNC();
      float o[NTO][4];
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
      const int r0 = warp * 16;
      const int nkt = 2 * warp + 2;  // key tiles of 8 up to the warp's last row
      // Key tiles are loaded as B operand of Q K^T with their 8 rows permuted, n -> key (n >> 1) + 4 (n & 1),
      // so that a lane's accumulator columns 2t, 2t + 1 hold keys t, t + 4: exactly the k positions its A
      // fragment of P V needs, and the rows of the paired V layout.
      const int pg = (g >> 1) + 4 * (g & 1);
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
        float pr[4];  // s[e]: row r0 + g + 8 (e >> 1), key kt*8 + t + 4 (e & 1)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = r0 + g + 8 * (e >> 1), j = kt * 8 + t + 4 * (e & 1);
          const float x = s[e] * scale;
          pr[e] = (j <= i && keep[j] != 0.f) ? 1.f + x + 0.5f * x * x : 0.f;
        }
        const float pv[4] = {pr[0], pr[2], pr[1], pr[3]};  // A fragment: (g, t), (g+8, t), (g, t+4), (g+8, t+4)
        Frag<SPLIT, 4> pa;
        pa.set(pv);
        const float* vrow = Vs + (kt * 4 + t) * (2 * PST) + 2 * g;
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
          const float2 bv2 = *reinterpret_cast<const float2*>(vrow + 16 * nt);  // keys kt*8 + t, kt*8 + t + 4
          const float bv[2] = {bv2.x, bv2.y};
          Frag<SPLIT, 2> fb;
          fb.set(bv);
          mma<SPLIT>(o[nt], pa, fb);
        }
      }
      read_state(o);
      write_out(o, t0);
      LA_SYNC();
      if (want_state || t0 + C < tend) update_state(min(C, tend - t0));
      LA_SYNC();
    }
  } else {
    if (nseg == 1) {  // segmented: the state over all keys comes in kv0
      for (int t0 = 0; t0 < Lk; t0 += C) {
        load_kv(t0);
        LA_SYNC();
        update_state(min(C, Lk - t0));
        LA_SYNC();
      }
    }
    for (int t0 = tbeg; t0 < tend; t0 += C) {
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

  LA_SYNC();  // the walk may have been empty (a segment past the end): order the state's init and reads
  float* kv_out = static_cast<float*>(p.kv_out);
  float* ks_out = static_cast<float*>(p.ks_out);
  if (kv_out != nullptr) {
    for (int idx = tid; idx < M * DS; idx += THREADS) {
      const int m = idx / DS, c = idx - m * DS;
      if (c < ncols) kv_out[(vbh * M + m) * Dv + c0 + c] = S[paired<PST>(m, c)];
    }
  }
  if (ks_out != nullptr && slice == 0) {
    for (int m = tid; m < M; m += THREADS) ks_out[vbh * M + m] = S[paired<PST>(m, DS)];
  }
}

// ============================================================================================= backward
//
// With gt_i = dout_i / den_i, delta_i = gt_i . out_i and the extended vectors g^_i = [gt_i | -delta_i],
// v^_j = [v_j | 1] (so that dw_ij = gt_i . v_j - delta_i = g^_i . v^_j):
//   dq_i = scale sum_{j<=i} ds_ij k_j,  dk_j = scale sum_{i>=j} ds_ij q_i,  dv_j = sum_{i>=j} w_ij gt_i,
//   ds_ij = dw_ij (1 + s_ij), over visible unmasked pairs. Chunked: inside a chunk the quadratic form; across
// chunks the linear form through the feature map's Jacobian J (dphi_m/dx_d = coef_m (x_b [a=d] + x_a [b=d])):
//   dq_i += J(q_i)^T (S g^_i),           S = sum_{earlier keys} phi(k_j) v^_j^T   (forward walk, kernel A)
//   dk_j += J(k_j)^T (R v^_j),           R = sum_{later queries} phi(q_i) g^_i^T  (backward walk, kernel B)
//   dv_j += R[:, :Dv]^T phi(k_j)
// The Jacobian products are scattered into per-warp rows in shared memory (shared atomics); the value
// columns are split in slices of DS (dq and dk then sum float32 partials over the slices; the -delta column
// lives in slice 0 only). Non-causal: the full S (R) first, then every query (key) chunk.

template <int DK, int DS>
struct BwdLayout {
  static constexpr int QST = DK + 4;
  static constexpr int NTO = DS / 8 + 1;
  static constexpr int RS = NTO * 8;       // "column-paired" rows (columns c, c + 4 of each 8 interleaved);
                                           // RS == 8 mod 16 (NTO odd) makes A/B 64-bit loads conflict-free
  static constexpr int PST = NTO * 8 + 4;  // row-paired pair-row stride, as in the forward
  static constexpr int DQS = DK + 1;       // per-warp scatter rows; column DK absorbs the x[one] slot
  static_assert(NTO % 2 == 1, "the column-paired stride needs an odd number of n-tiles");
  static size_t smem_dq(int MP) {
    return sizeof(float) * (static_cast<size_t>(MP) * RS + 2 * C * RS + 2 * C * QST + C + WARPS * 16 * DQS) +
           8 * static_cast<size_t>(MP);
  }
  static size_t smem_dkdv(int MP) {
    return sizeof(float) * (static_cast<size_t>(MP) * PST + C * RS + C * PST + 2 * C * QST + C + WARPS * 16 * DQS) +
           8 * static_cast<size_t>(MP);
  }
};

template <int RS>
LA_DEVICE int cpaired(int row, int col) {
  return row * RS + (col >> 3) * 8 + (col & 3) * 2 + ((col >> 2) & 1);
}

template <int DK, int DS>
constexpr int bwd_min_blocks() {
  return DK > 16 ? 1 : 2;
}

// Shared by both backward kernels: the feature table, loaders, and the per-warp scatter rows.
template <class T, int DK, int DS>
struct BwdCommon {
  using L = BwdLayout<DK, DS>;
  static constexpr int QST = L::QST, NTO = L::NTO, DQS = L::DQS;
  static constexpr int NQ = C * DK / THREADS, NV = C * DS / THREADS;

  const BwdParams& p;
  int tid, warp, lane, g, t, slice, b, c0, ncols, nseg, seg;
  index_t bh, vbh;

  LA_DEVICE BwdCommon(const BwdParams& p_, int nslices) : p(p_) {
    tid = threadIdx.x;
    warp = tid / 32;
    lane = tid % 32;
    g = lane / 4;
    t = lane % 4;
    nseg = p.nseg > 1 ? p.nseg : 1;
    vbh = blockIdx.x / nslices;  // (batch*head, segment)
    bh = vbh / nseg;
    seg = static_cast<int>(vbh % nseg);
    slice = static_cast<int>(blockIdx.x % nslices);
    b = static_cast<int>(bh / p.H);
    c0 = slice * DS;
    ncols = min(DS, p.Dv - c0);
  }

  // The tokens [tbeg, tend) of this block's segment out of L.
  LA_DEVICE int seg_begin() const { return nseg > 1 ? seg * p.seg_len : 0; }
  LA_DEVICE int seg_end(int L) const { return nseg > 1 ? min(L, seg_begin() + p.seg_len) : L; }

  // A state [.., M, Dv] + its extra column [.., M] of this block's (batch*head, segment) into a paired
  // layout (index(m, c)); extra column only in slice 0 when extra_slice0_only.
  template <class Index>
  LA_DEVICE void init_state(float* St, int MP, int M, const float* st0, const float* stz0, bool extra_slice0_only,
                            Index idx) const {
    constexpr int W = NTO * 8;
    for (int i = tid; i < MP * W; i += THREADS) {
      const int m = i / W, c = i - m * W;
      float x = 0.f;
      if (m < M) {
        if (c < ncols && st0 != nullptr) x = st0[(vbh * M + m) * p.Dv + c0 + c];
        if (c == DS && stz0 != nullptr && (slice == 0 || !extra_slice0_only)) x = stz0[vbh * M + m];
      }
      St[idx(m, c)] = x;
    }
  }

  LA_DEVICE void init_table(FeatEntry* ftab, const FeatureCoefs<float>& fc, int M, int MP) const {
    for (int m = tid; m < MP; m += THREADS) {
      const FeaturePair fp = feature_pair(m, p.D, DK);
      FeatEntry e;
      e.ab = m < M ? (fp.a | (fp.b << 16)) : (DK | (DK << 16));
      e.coef = m < M ? fc.c[fp.kind] : 0.f;
      ftab[m] = e;
    }
  }

  LA_DEVICE void load_rows(float* dst, const T* src, int t0, int L) const {  // q or k rows of the chunk
#pragma unroll
    for (int i = 0; i < NQ; ++i) {
      const int e = tid + i * THREADS, r = e / DK, d = e % DK;
      dst[r * QST + d] = (t0 + r < L && d < p.D) ? Elem<T>::load(src[(bh * L + t0 + r) * p.D + d]) : 0.f;
    }
  }

  LA_DEVICE void load_keys(float* dst, int t0) const {  // k rows of the chunk; padded keys load as 0
    const T* k = static_cast<const T*>(p.k);
#pragma unroll
    for (int i = 0; i < NQ; ++i) {
      const int e = tid + i * THREADS, r = e / DK, d = e % DK;
      dst[r * QST + d] = (key_in(p.mask, b, t0 + r, p.Lk) && d < p.D) ? Elem<T>::load(k[(bh * p.Lk + t0 + r) * p.D + d]) : 0.f;
    }
  }

  LA_DEVICE void load_keep(float* keep, int t0) const {
    const int j = t0 + tid;
    if (tid < C) {
      keep[tid] = (j < p.Lk && !(p.mask != nullptr && p.mask[static_cast<index_t>(b) * p.Lk + j])) ? 1.f : 0.f;
    }
  }

  // v^ data columns of the slice (columns DS.. are constant, set once)
  template <class Index>
  LA_DEVICE void load_v(float* Vh, int t0, Index idx) const {
    const T* v = static_cast<const T*>(p.v);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int e = tid + i * THREADS, r = e / DS, c = e % DS;
      Vh[idx(r, c)] = (key_in(p.mask, b, t0 + r, p.Lk) && c < ncols) ? Elem<T>::load(v[(bh * p.Lk + t0 + r) * p.Dv + c0 + c]) : 0.f;
    }
  }

  // g^ = [gt | -delta (slice 0)] of the slice (columns DS + 1.. are constant zeros, set once)
  template <class Index>
  LA_DEVICE void load_g(float* Gh, int t0, Index idx) const {
    const float* gt = static_cast<const float*>(p.gt);
    const float* delta = static_cast<const float*>(p.delta);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int e = tid + i * THREADS, r = e / DS, c = e % DS;
      Gh[idx(r, c)] = (t0 + r < p.Lq && c < ncols) ? gt[(bh * p.Lq + t0 + r) * p.Dv + c0 + c] : 0.f;
    }
    if (tid < C) Gh[idx(tid, DS)] = (slice == 0 && t0 + tid < p.Lq) ? -delta[bh * p.Lq + t0 + tid] : 0.f;
  }

  // rows[r][a] += val * x[b], rows[r][b] += val * x[a] for the 4 accumulator values of a 16 x 8 tile
  // whose columns are features f0..f0+7 (J^T of the feature map, applied to the tile's values).
  LA_DEVICE void scatter(float* rows, const float (&u)[4], int f0, const FeatEntry* ftab, const float* x_base) const {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = g + 8 * (e >> 1);
      const FeatEntry fe = ftab[f0 + 2 * t + (e & 1)];
      const int a = fe.ab & 0xffff, bb = fe.ab >> 16;
      const float* x = x_base + r * QST;
      const float val = u[e] * fe.coef;
      la_atomic_add_shared(&rows[r * DQS + a], val * x[bb]);
      la_atomic_add_shared(&rows[r * DQS + bb], val * x[a]);
    }
  }

  // rows += scale * acc (the intra-chunk mma part), then the 16 rows go to out (or a float32 partial) times
  // keep (dk: masked keys get 0), and the rows are cleared for the next chunk.
  LA_DEVICE void flush(float* rows, const float (&acc)[DK / 8][4], float scale, index_t row0, int nrows, int L,
                       void* out, float* part, int nslices, const float* keep_rows) const {
    LA_SYNCWARP();
#pragma unroll
    for (int nd = 0; nd < DK / 8; ++nd) {
      const int col = nd * 8 + 2 * t;
      rows[g * DQS + col] += scale * acc[nd][0];
      rows[g * DQS + col + 1] += scale * acc[nd][1];
      rows[(g + 8) * DQS + col] += scale * acc[nd][2];
      rows[(g + 8) * DQS + col + 1] += scale * acc[nd][3];
    }
    LA_SYNCWARP();
    const int D = p.D;
    const index_t nall = static_cast<index_t>(p.B) * p.H * L * D;
    for (int idx = lane; idx < 16 * DQS; idx += 32) {
      const int r = idx / DQS, d = idx - r * DQS;
      const float val = rows[idx];
      rows[idx] = 0.f;
      if (d < D && r < nrows) {
        const float x = keep_rows != nullptr ? val * keep_rows[r] : val;
        const index_t off = (bh * L + row0 + r) * D + d;
        if (nslices == 1) {
          static_cast<T*>(out)[off] = Elem<T>::store(x);
        } else {
          part[slice * nall + off] = x;
        }
      }
    }
    LA_SYNCWARP();
  }
};

// Kernel A: dq (and its float32 partials when the value columns are split).
template <class T, bool SPLIT, int DK, int DS, bool CAUSAL>
LA_GLOBAL void LA_LAUNCH_BOUNDS2(THREADS, (bwd_min_blocks<DK, DS>()))
    chunk_bwd_dq_kernel(BwdParams p, FeatureCoefs<float> fc, int M, int MP, int nslices, float* dq_part) {
  using L = BwdLayout<DK, DS>;
  constexpr int QST = L::QST, NTO = L::NTO, RS = L::RS, DQS = L::DQS;
  LA_DYN_SMEM(float, sm);
  float* S = sm;                                   // column-paired [MP][RS]
  float* Vh = S + MP * RS;                         // column-paired [C][RS]
  float* Gh = Vh + C * RS;                         // column-paired [C][RS]
  float* Qs = Gh + C * RS;                         // [C][QST]
  float* Ks = Qs + C * QST;                        // [C][QST]
  float* keep = Ks + C * QST;                      // [C]
  float* dqs = keep + C;                           // [WARPS][16][DQS]
  FeatEntry* ftab = reinterpret_cast<FeatEntry*>(dqs + WARPS * 16 * DQS);  // [MP]

  const BwdCommon<T, DK, DS> cm(p, nslices);
  const int tid = cm.tid, warp = cm.warp, g = cm.g, t = cm.t;
  const int Lq = p.Lq, Lk = p.Lk;
  const float scale = static_cast<float>(p.scale);
  const int r0 = warp * 16;
  float* dq_w = dqs + warp * 16 * DQS;
  auto cp = [](int r, int c) { return cpaired<RS>(r, c); };

  cm.init_table(ftab, fc, M, MP);
  cm.init_state(S, MP, M, p.s0, p.sz0, false, cp);
  for (int idx = tid; idx < C * 8; idx += THREADS) {
    const int r = idx / 8, c = DS + idx % 8;
    Vh[cp(r, c)] = c == DS ? 1.f : 0.f;
    if (c > DS) Gh[cp(r, c)] = 0.f;
  }
  for (int r = tid; r < C; r += THREADS) {
    Qs[r * QST + DK] = 1.f;
    Ks[r * QST + DK] = 1.f;
  }
  for (int idx = tid; idx < WARPS * 16 * DQS; idx += THREADS) dqs[idx] = 0.f;

  // A fragments of g^ for the warp's 16 rows, one per k-step of 8 columns.
  auto g_frags = [&](Frag<SPLIT, 4> (&fg)[NTO]) {
#pragma unroll
    for (int ks = 0; ks < NTO; ++ks) {
      const float2 x = *reinterpret_cast<const float2*>(Gh + cp(r0 + g, ks * 8 + t));
      const float2 y = *reinterpret_cast<const float2*>(Gh + cp(r0 + g + 8, ks * 8 + t));
      const float av[4] = {x.x, y.x, x.y, y.y};
      fg[ks].set(av);
    }
  };

  // dq rows += J(q)^T (S g^): U = g^ S^T one tile of 8 features at a time, scattered through J^T.
  auto inter = [&](const Frag<SPLIT, 4> (&fg)[NTO]) {
#pragma unroll 1
    for (int f0 = 0; f0 < MP; f0 += 8) {
      float u[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int ks = 0; ks < NTO; ++ks) {
        const float2 b2 = *reinterpret_cast<const float2*>(S + cp(f0 + g, ks * 8 + t));
        const float bv[2] = {b2.x, b2.y};
        Frag<SPLIT, 2> fb;
        fb.set(bv);
        mma<SPLIT>(u, fg[ks], fb);
      }
      cm.scatter(dq_w, u, f0, ftab, Qs + r0 * QST);
    }
  };

  // S += phi(K)^T v^ over the first nvalid keys of the chunk (masked keys weigh 0).
  auto update = [&](int nvalid) {
#pragma unroll 1
    for (int mt = warp; mt < MP / 16; mt += WARPS) {
      const int m0 = mt * 16 + g, m1 = m0 + 8;
      float u[NTO][4];
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) {
        const int col = nt * 8 + 2 * t;
        u[nt][0] = S[cp(m0, col)];
        u[nt][1] = S[cp(m0, col + 1)];
        u[nt][2] = S[cp(m1, col)];
        u[nt][3] = S[cp(m1, col + 1)];
      }
      const FeatEntry e0 = ftab[m0], e1 = ftab[m1];
      const int a0 = e0.ab & 0xffff, b0 = e0.ab >> 16, a1 = e1.ab & 0xffff, b1 = e1.ab >> 16;
#pragma unroll 1
      for (int j0 = 0; j0 < nvalid; j0 += 8) {
        const float* kA = Ks + (j0 + t) * QST;
        const float* kB = kA + 4 * QST;
        const float kpA = keep[j0 + t], kpB = keep[j0 + t + 4];
        const float av[4] = {e0.coef * kA[a0] * kA[b0] * kpA, e1.coef * kA[a1] * kA[b1] * kpA,
                             e0.coef * kB[a0] * kB[b0] * kpB, e1.coef * kB[a1] * kB[b1] * kpB};
        Frag<SPLIT, 4> fa;
        fa.set(av);
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
          const float bv[2] = {Vh[cp(j0 + t, nt * 8 + g)], Vh[cp(j0 + t + 4, nt * 8 + g)]};
          Frag<SPLIT, 2> fb;
          fb.set(bv);
          mma<SPLIT>(u[nt], fa, fb);
        }
      }
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) {
        const int col = nt * 8 + 2 * t;
        S[cp(m0, col)] = u[nt][0];
        S[cp(m0, col + 1)] = u[nt][1];
        S[cp(m1, col)] = u[nt][2];
        S[cp(m1, col + 1)] = u[nt][3];
      }
    }
  };

  if (CAUSAL) {
    const int pg = (g >> 1) + 4 * (g & 1);  // key permutation of the B operands, as in the forward
    const int tend = cm.seg_end(Lq);
    for (int t0 = cm.seg_begin(); t0 < tend; t0 += C) {
      cm.load_rows(Qs, static_cast<const T*>(p.q), t0, Lq);
      cm.load_keys(Ks, t0);
      cm.load_v(Vh, t0, cp);
      cm.load_g(Gh, t0, cp);
      cm.load_keep(keep, t0);
      LA_SYNC();
      Frag<SPLIT, 4> fg[NTO];
      g_frags(fg);
      float acc[DK / 8][4];
#pragma unroll
      for (int nd = 0; nd < DK / 8; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.f;
      const int nkt = 2 * warp + 2;
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
        float dw[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int ks = 0; ks < NTO; ++ks) {
          const float2 b2 = *reinterpret_cast<const float2*>(Vh + cp(kt * 8 + pg, ks * 8 + t));
          const float bv[2] = {b2.x, b2.y};
          Frag<SPLIT, 2> fb;
          fb.set(bv);
          mma<SPLIT>(dw, fg[ks], fb);
        }
        float ds[4];  // row r0 + g + 8 (e >> 1), key kt*8 + t + 4 (e & 1)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = r0 + g + 8 * (e >> 1), j = kt * 8 + t + 4 * (e & 1);
          ds[e] = (j <= i && keep[j] != 0.f) ? dw[e] * (1.f + scale * s[e]) : 0.f;
        }
        const float dv4[4] = {ds[0], ds[2], ds[1], ds[3]};
        Frag<SPLIT, 4> fa;
        fa.set(dv4);
#pragma unroll
        for (int nd = 0; nd < DK / 8; ++nd) {
          const float bv[2] = {Ks[(kt * 8 + t) * QST + nd * 8 + g], Ks[(kt * 8 + t + 4) * QST + nd * 8 + g]};
          Frag<SPLIT, 2> fb;
          fb.set(bv);
          mma<SPLIT>(acc[nd], fa, fb);
        }
      }
      inter(fg);
      cm.flush(dq_w, acc, scale, t0 + r0, min(16, Lq - t0 - r0), Lq, p.dq, dq_part, nslices, nullptr);
      LA_SYNC();
      if (t0 + C < tend) update(min(C, tend - t0));
      LA_SYNC();
    }
  } else {
    if (cm.nseg == 1) {  // segmented: the state over all keys comes in s0
      for (int t0 = 0; t0 < Lk; t0 += C) {
        cm.load_keys(Ks, t0);
        cm.load_v(Vh, t0, cp);
        cm.load_keep(keep, t0);
        LA_SYNC();
        update(min(C, Lk - t0));
        LA_SYNC();
      }
    }
    float zero_acc[DK / 8][4];
#pragma unroll
    for (int nd = 0; nd < DK / 8; ++nd) zero_acc[nd][0] = zero_acc[nd][1] = zero_acc[nd][2] = zero_acc[nd][3] = 0.f;
    const int tend = cm.seg_end(Lq);
    for (int t0 = cm.seg_begin(); t0 < tend; t0 += C) {
      cm.load_rows(Qs, static_cast<const T*>(p.q), t0, Lq);
      cm.load_g(Gh, t0, cp);
      LA_SYNC();
      Frag<SPLIT, 4> fg[NTO];
      g_frags(fg);
      inter(fg);
      cm.flush(dq_w, zero_acc, scale, t0 + r0, min(16, Lq - t0 - r0), Lq, p.dq, dq_part, nslices, nullptr);
      LA_SYNC();
    }
  }
}

// Kernel B: dk (partials when split) and dv (slice-local), walking the chunks from the last one.
template <class T, bool SPLIT, int DK, int DS, bool CAUSAL>
LA_GLOBAL void LA_LAUNCH_BOUNDS2(THREADS, (bwd_min_blocks<DK, DS>()))
    chunk_bwd_dkdv_kernel(BwdParams p, FeatureCoefs<float> fc, int M, int MP, int nslices, float* dk_part) {
  using L = BwdLayout<DK, DS>;
  constexpr int QST = L::QST, NTO = L::NTO, RS = L::RS, PST = L::PST, DQS = L::DQS;
  LA_DYN_SMEM(float, sm);
  float* R = sm;                                   // row-paired [MP][NTO * 8]
  float* Vh = R + MP * PST;                        // column-paired [C][RS]
  float* Gh = Vh + C * RS;                         // row-paired [C][NTO * 8]
  float* Qs = Gh + C * PST;                        // [C][QST]
  float* Ks = Qs + C * QST;                        // [C][QST]
  float* keep = Ks + C * QST;                      // [C]
  float* dks = keep + C;                           // [WARPS][16][DQS]
  FeatEntry* ftab = reinterpret_cast<FeatEntry*>(dks + WARPS * 16 * DQS);  // [MP]

  const BwdCommon<T, DK, DS> cm(p, nslices);
  const int tid = cm.tid, warp = cm.warp, g = cm.g, t = cm.t;
  const int Lq = p.Lq, Lk = p.Lk, Dv = p.Dv;
  const float scale = static_cast<float>(p.scale);
  const int r0 = warp * 16;
  float* dk_w = dks + warp * 16 * DQS;
  auto cp = [](int r, int c) { return cpaired<RS>(r, c); };
  auto rp = [](int r, int c) { return paired<PST>(r, c); };

  cm.init_table(ftab, fc, M, MP);
  for (int idx = tid; idx < MP * PST; idx += THREADS) R[idx] = 0.f;
  LA_SYNC();
  cm.init_state(R, MP, M, p.r0, p.rz0, true, rp);
  for (int idx = tid; idx < C * 8; idx += THREADS) {
    const int r = idx / 8, c = DS + idx % 8;
    Vh[cp(r, c)] = c == DS ? 1.f : 0.f;
    if (c > DS) Gh[rp(r, c)] = 0.f;
  }
  for (int r = tid; r < C; r += THREADS) {
    Qs[r * QST + DK] = 1.f;
    Ks[r * QST + DK] = 1.f;
  }
  for (int idx = tid; idx < WARPS * 16 * DQS; idx += THREADS) dks[idx] = 0.f;

  // A fragments of v^ for the warp's 16 key rows, one per k-step of 8 columns.
  auto v_frags = [&](Frag<SPLIT, 4> (&fv)[NTO]) {
#pragma unroll
    for (int ks = 0; ks < NTO; ++ks) {
      const float2 x = *reinterpret_cast<const float2*>(Vh + cp(r0 + g, ks * 8 + t));
      const float2 y = *reinterpret_cast<const float2*>(Vh + cp(r0 + g + 8, ks * 8 + t));
      const float av[4] = {x.x, y.x, x.y, y.y};
      fv[ks].set(av);
    }
  };

  // dv += phi(K) R[:, :DS];  dk rows += J(k)^T (v^ R^T), one tile of 8 features at a time. (The v^
  // fragments are reloaded from shared memory here rather than kept in registers: register pressure.)
  auto inter = [&](float (&dv)[DS / 8][4]) {
    const float* x0 = Ks + (r0 + g) * QST;
    const float* x1 = x0 + 8 * QST;
#pragma unroll 1
    for (int f0 = 0; f0 < MP; f0 += 8) {
      const FeatEntry eA = ftab[f0 + t], eB = ftab[f0 + t + 4];
      const int aA = eA.ab & 0xffff, bA = eA.ab >> 16, aB = eB.ab & 0xffff, bB = eB.ab >> 16;
      const float av[4] = {eA.coef * x0[aA] * x0[bA], eA.coef * x1[aA] * x1[bA], eB.coef * x0[aB] * x0[bB],
                           eB.coef * x1[aB] * x1[bB]};
      Frag<SPLIT, 4> fa;
      fa.set(av);
      const float* rrow = R + ((f0 >> 3) * 4 + t) * (2 * PST) + 2 * g;
#pragma unroll
      for (int nt = 0; nt < DS / 8; ++nt) {
        const float2 b2 = *reinterpret_cast<const float2*>(rrow + 16 * nt);  // features f0 + t, f0 + t + 4
        const float bv[2] = {b2.x, b2.y};
        Frag<SPLIT, 2> fb;
        fb.set(bv);
        mma<SPLIT>(dv[nt], fa, fb);
      }
      float w[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int ks = 0; ks < NTO; ++ks) {
        const float2 x = *reinterpret_cast<const float2*>(Vh + cp(r0 + g, ks * 8 + t));
        const float2 y = *reinterpret_cast<const float2*>(Vh + cp(r0 + g + 8, ks * 8 + t));
        const float av2[4] = {x.x, y.x, x.y, y.y};
        Frag<SPLIT, 4> fv;
        fv.set(av2);
        const float bv[2] = {R[rp(f0 + g, ks * 8 + t)], R[rp(f0 + g, ks * 8 + t + 4)]};
        Frag<SPLIT, 2> fb;
        fb.set(bv);
        mma<SPLIT>(w, fv, fb);
      }
      cm.scatter(dk_w, w, f0, ftab, Ks + r0 * QST);
    }
  };

  // R += phi(Q)^T g^ over the first nvalid queries of the chunk.
  auto update = [&](int nvalid) {
#pragma unroll 1
    for (int mt = warp; mt < MP / 16; mt += WARPS) {
      const int m0 = mt * 16 + g, m1 = m0 + 8;
      float u[NTO][4];
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) {
        const int col = nt * 8 + 2 * t;
        u[nt][0] = R[rp(m0, col)];
        u[nt][1] = R[rp(m0, col + 1)];
        u[nt][2] = R[rp(m1, col)];
        u[nt][3] = R[rp(m1, col + 1)];
      }
      const FeatEntry e0 = ftab[m0], e1 = ftab[m1];
      const int a0 = e0.ab & 0xffff, b0 = e0.ab >> 16, a1 = e1.ab & 0xffff, b1 = e1.ab >> 16;
#pragma unroll 1
      for (int j0 = 0; j0 < nvalid; j0 += 8) {
        const float* qA = Qs + (j0 + t) * QST;
        const float* qB = qA + 4 * QST;
        const float av[4] = {e0.coef * qA[a0] * qA[b0], e1.coef * qA[a1] * qA[b1], e0.coef * qB[a0] * qB[b0],
                             e1.coef * qB[a1] * qB[b1]};
        Frag<SPLIT, 4> fa;
        fa.set(av);
        const float* grow = Gh + ((j0 >> 3) * 4 + t) * (2 * PST) + 2 * g;
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
          const float2 b2 = *reinterpret_cast<const float2*>(grow + 16 * nt);  // queries j0 + t, j0 + t + 4
          const float bv[2] = {b2.x, b2.y};
          Frag<SPLIT, 2> fb;
          fb.set(bv);
          mma<SPLIT>(u[nt], fa, fb);
        }
      }
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) {
        const int col = nt * 8 + 2 * t;
        R[rp(m0, col)] = u[nt][0];
        R[rp(m0, col + 1)] = u[nt][1];
        R[rp(m1, col)] = u[nt][2];
        R[rp(m1, col + 1)] = u[nt][3];
      }
    }
  };

  // dv rows of the warp (times keep) to global memory.
  auto write_dv = [&](const float (&dv)[DS / 8][4], int t0) {
    T* dvp = static_cast<T*>(p.dv);
    const int ja = r0 + g, jb = ja + 8;
    const float ka = keep[ja], kb = keep[jb];
#pragma unroll
    for (int nt = 0; nt < DS / 8; ++nt) {
      const int col = nt * 8 + 2 * t;
      if (t0 + ja < Lk) {
        const index_t base = (cm.bh * Lk + t0 + ja) * Dv + cm.c0 + col;
        if (col < cm.ncols) dvp[base] = Elem<T>::store(dv[nt][0] * ka);
        if (col + 1 < cm.ncols) dvp[base + 1] = Elem<T>::store(dv[nt][1] * ka);
      }
      if (t0 + jb < Lk) {
        const index_t base = (cm.bh * Lk + t0 + jb) * Dv + cm.c0 + col;
        if (col < cm.ncols) dvp[base] = Elem<T>::store(dv[nt][2] * kb);
        if (col + 1 < cm.ncols) dvp[base + 1] = Elem<T>::store(dv[nt][3] * kb);
      }
    }
  };

  auto key_chunk = [&](int t0, bool intra_part) {
    float dv[DS / 8][4];
    float dk[DK / 8][4];
#pragma unroll
    for (int nt = 0; nt < DS / 8; ++nt) dv[nt][0] = dv[nt][1] = dv[nt][2] = dv[nt][3] = 0.f;
#pragma unroll
    for (int nd = 0; nd < DK / 8; ++nd) dk[nd][0] = dk[nd][1] = dk[nd][2] = dk[nd][3] = 0.f;
    if (intra_part) {
      Frag<SPLIT, 4> fv[NTO];
      v_frags(fv);
      const int pg = (g >> 1) + 4 * (g & 1);
#pragma unroll 1
      for (int qt = 2 * warp; qt < C / 8; ++qt) {  // query tiles at or after the warp's keys
        float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int k0 = 0; k0 < DK; k0 += 8) {
          const float av[4] = {Ks[(r0 + g) * QST + k0 + t], Ks[(r0 + g + 8) * QST + k0 + t],
                               Ks[(r0 + g) * QST + k0 + t + 4], Ks[(r0 + g + 8) * QST + k0 + t + 4]};
          const float bv[2] = {Qs[(qt * 8 + pg) * QST + k0 + t], Qs[(qt * 8 + pg) * QST + k0 + t + 4]};
          Frag<SPLIT, 4> fa;
          fa.set(av);
          Frag<SPLIT, 2> fb;
          fb.set(bv);
          mma<SPLIT>(s, fa, fb);
        }
        float dw[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int ks = 0; ks < NTO; ++ks) {
          const float bv[2] = {Gh[rp(qt * 8 + pg, ks * 8 + t)], Gh[rp(qt * 8 + pg, ks * 8 + t + 4)]};
          Frag<SPLIT, 2> fb;
          fb.set(bv);
          mma<SPLIT>(dw, fv[ks], fb);
        }
        float wv[4], ds[4];  // key row r0 + g + 8 (e >> 1), query qt*8 + t + 4 (e & 1)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = r0 + g + 8 * (e >> 1), i = qt * 8 + t + 4 * (e & 1);
          const bool vis = i >= j && keep[j] != 0.f && t0 + i < Lq;
          const float x = scale * s[e];
          wv[e] = vis ? 1.f + x + 0.5f * x * x : 0.f;
          ds[e] = vis ? dw[e] * (1.f + x) : 0.f;
        }
        const float wa[4] = {wv[0], wv[2], wv[1], wv[3]};
        Frag<SPLIT, 4> fw;
        fw.set(wa);
        const float* grow = Gh + (qt * 4 + t) * (2 * PST) + 2 * g;
#pragma unroll
        for (int nt = 0; nt < DS / 8; ++nt) {
          const float2 b2 = *reinterpret_cast<const float2*>(grow + 16 * nt);  // queries qt*8 + t, + t + 4
          const float bv[2] = {b2.x, b2.y};
          Frag<SPLIT, 2> fb;
          fb.set(bv);
          mma<SPLIT>(dv[nt], fw, fb);
        }
        const float da[4] = {ds[0], ds[2], ds[1], ds[3]};
        Frag<SPLIT, 4> fd;
        fd.set(da);
#pragma unroll
        for (int nd = 0; nd < DK / 8; ++nd) {
          const float bv[2] = {Qs[(qt * 8 + t) * QST + nd * 8 + g], Qs[(qt * 8 + t + 4) * QST + nd * 8 + g]};
          Frag<SPLIT, 2> fb;
          fb.set(bv);
          mma<SPLIT>(dk[nd], fd, fb);
        }
      }
    }
    inter(dv);
    write_dv(dv, t0);
    cm.flush(dk_w, dk, scale, t0 + r0, min(16, Lk - t0 - r0), Lk, p.dk, dk_part, nslices, keep + r0);
  };

  if (p.state_only) {  // this segment's r = sum phi(q) g^^T, for the suffix sums of the segmented walk
    const int tend = cm.seg_end(Lq);
    for (int t0 = cm.seg_begin(); t0 < tend; t0 += C) {
      cm.load_rows(Qs, static_cast<const T*>(p.q), t0, Lq);
      cm.load_g(Gh, t0, rp);
      LA_SYNC();
      update(min(C, tend - t0));
      LA_SYNC();
    }
    LA_SYNC();  // the walk may have been empty (a segment past the end)
    for (int i = tid; i < M * DS; i += THREADS) {
      const int m = i / DS, c = i - m * DS;
      if (c < cm.ncols) p.r_out[(cm.vbh * M + m) * Dv + cm.c0 + c] = R[rp(m, c)];
    }
    if (cm.slice == 0) {
      for (int m = tid; m < M; m += THREADS) p.rz_out[cm.vbh * M + m] = R[rp(m, DS)];
    }
  } else if (CAUSAL) {
    const int tbeg = cm.seg_begin(), tend = cm.seg_end(Lk);
    const int last = tend > tbeg ? (tend - 1) / C : -1;
    for (int c = last; c >= tbeg / C; --c) {
      const int t0 = c * C;
      cm.load_rows(Qs, static_cast<const T*>(p.q), t0, Lq);
      cm.load_keys(Ks, t0);
      cm.load_v(Vh, t0, cp);
      cm.load_g(Gh, t0, rp);
      cm.load_keep(keep, t0);
      LA_SYNC();
      key_chunk(t0, true);
      LA_SYNC();
      if (t0 > tbeg) update(min(C, Lq - t0));
      LA_SYNC();
    }
  } else {
    if (cm.nseg == 1) {  // segmented: the state over all queries comes in r0
      for (int t0 = 0; t0 < Lq; t0 += C) {
        cm.load_rows(Qs, static_cast<const T*>(p.q), t0, Lq);
        cm.load_g(Gh, t0, rp);
        LA_SYNC();
        update(min(C, Lq - t0));
        LA_SYNC();
      }
    }
    const int tend = cm.seg_end(Lk);
    for (int t0 = cm.seg_begin(); t0 < tend; t0 += C) {
      cm.load_keys(Ks, t0);
      cm.load_v(Vh, t0, cp);
      cm.load_keep(keep, t0);
      LA_SYNC();
      key_chunk(t0, false);
      LA_SYNC();
    }
  }
}

template <class T>
LA_GLOBAL void LA_LAUNCH_BOUNDS(256) sum_slices_kernel(const float* part, T* out, index_t n, int nslices) {
  const index_t i = static_cast<index_t>(blockIdx.x) * 256 + threadIdx.x;
  if (i >= n) return;
  float s = 0.f;
  for (int k = 0; k < nslices; ++k) s += part[k * n + i];
  out[i] = Elem<T>::store(s);
}

template <class T, bool SPLIT, int DK, int DS>
void launch_bwd_typed(const BwdParams& p, float* dq_part, float* dk_part, const DeviceInfo& dev,
                      la_stream_t stream) {
  using L = BwdLayout<DK, DS>;
  const int M = feature_count(p.D);
  const int MP = (M + 15) / 16 * 16;
  const int nslices = ceil_div(p.Dv, DS);
  const index_t BH = static_cast<index_t>(p.B) * p.H;
  const index_t nseg = p.nseg > 1 ? p.nseg : 1;
  const dim3 grid(static_cast<unsigned>(BH * nseg * nslices));
  const FeatureCoefs<float> fc = make_feature_coefs<float>(p.scale);
  const size_t smem_a = L::smem_dq(MP), smem_b = L::smem_dkdv(MP);
  if (p.state_only) {  // kernel B only: each segment's r
    auto kb = chunk_bwd_dkdv_kernel<T, SPLIT, DK, DS, true>;
    prepare_smem(kb, smem_b, dev, "chunked backward (segment states)");
    LA_LAUNCH(kb, grid, dim3(THREADS), smem_b, stream, p, fc, M, MP, nslices, dk_part);
    return;
  }
  if (p.causal) {
    auto ka = chunk_bwd_dq_kernel<T, SPLIT, DK, DS, true>;
    auto kb = chunk_bwd_dkdv_kernel<T, SPLIT, DK, DS, true>;
    prepare_smem(ka, smem_a, dev, "chunked backward (dq)");
    prepare_smem(kb, smem_b, dev, "chunked backward (dk, dv)");
    if (p.Lq > 0) LA_LAUNCH(ka, grid, dim3(THREADS), smem_a, stream, p, fc, M, MP, nslices, dq_part);
    if (p.Lk > 0) LA_LAUNCH(kb, grid, dim3(THREADS), smem_b, stream, p, fc, M, MP, nslices, dk_part);
  } else {
    auto ka = chunk_bwd_dq_kernel<T, SPLIT, DK, DS, false>;
    auto kb = chunk_bwd_dkdv_kernel<T, SPLIT, DK, DS, false>;
    prepare_smem(ka, smem_a, dev, "chunked backward (dq)");
    prepare_smem(kb, smem_b, dev, "chunked backward (dk, dv)");
    if (p.Lq > 0) LA_LAUNCH(ka, grid, dim3(THREADS), smem_a, stream, p, fc, M, MP, nslices, dq_part);
    if (p.Lk > 0) LA_LAUNCH(kb, grid, dim3(THREADS), smem_b, stream, p, fc, M, MP, nslices, dk_part);
  }
  if (nslices > 1 && !p.state_only) {
    auto sum = sum_slices_kernel<T>;
    const index_t nq = BH * p.Lq * p.D, nk = BH * p.Lk * p.D;
    if (nq > 0) LA_LAUNCH(sum, dim3(ceil_div(nq, 256)), dim3(256), 0, stream, dq_part, static_cast<T*>(p.dq), nq, nslices);
    if (nk > 0) LA_LAUNCH(sum, dim3(ceil_div(nk, 256)), dim3(256), 0, stream, dk_part, static_cast<T*>(p.dk), nk, nslices);
  }
}

template <class T, bool SPLIT>
void launch_bwd_dims(const BwdParams& p, int dv_slice, float* dq_part, float* dk_part, const DeviceInfo& dev,
                     la_stream_t stream) {
  if (p.D <= 16 && dv_slice == 64) {
    launch_bwd_typed<T, SPLIT, 16, 64>(p, dq_part, dk_part, dev, stream);
  } else if (p.D <= 16) {
    launch_bwd_typed<T, SPLIT, 16, 32>(p, dq_part, dk_part, dev, stream);
  } else {
    launch_bwd_typed<T, SPLIT, 32, 32>(p, dq_part, dk_part, dev, stream);
  }
}

template <class T, bool SPLIT, int DK, int DS>
void launch_typed(const AttnParams& p, const DeviceInfo& dev, la_stream_t stream) {
  const int MP = (p.M + 15) / 16 * 16;
  const size_t smem = Layout<DK, DS>::smem_bytes(MP);
  const int nslices = ceil_div(p.Dv, DS);
  const index_t nseg = p.nseg > 1 ? p.nseg : 1;
  const dim3 grid(static_cast<unsigned>(static_cast<index_t>(p.B) * p.H * nseg * nslices));
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

int chunk_dv_slice(const AttnParams& p, int setting, const DeviceInfo& dev) {
  int dv_slice = setting;
  if (dv_slice != 32 && dv_slice != 64) {  // auto: 64 columns per block (fewer feature-map evaluations per
                                           // mma) when that still gives every SM a block, else 32
    const index_t nseg = p.nseg > 1 ? p.nseg : 1;
    const index_t blocks64 = static_cast<index_t>(p.B) * p.H * nseg * ((p.Dv + 63) / 64);
    dv_slice = (p.Dv > 32 && blocks64 >= dev.sm_count) ? 64 : 32;
  }
  if (p.D > 16) dv_slice = 32;
  const size_t smem64 = tc::Layout<16, 64>::smem_bytes((p.M + 15) / 16 * 16);
  if (dv_slice == 64 && smem64 > static_cast<size_t>(dev.smem_optin)) dv_slice = 32;
  return dv_slice;
}

void launch_chunk(DType dt, const AttnParams& p, int dv_slice, const DeviceInfo& dev, la_stream_t stream) {
  TORCH_CHECK(chunk_supported(dt, p.D, p.Dv, dev), "linattn_cuda: the tensor-core chunked kernel does not support "
              "this dtype, D = ", p.D, " or this device");
  TORCH_CHECK(p.nseg <= 1 || (p.seg_len > 0 && p.seg_len % tc::C == 0),
              "linattn_cuda: segments need a length that is a multiple of ", tc::C);
  TORCH_CHECK(p.nseg <= 1 || p.causal || p.state_only || p.kv0 != nullptr,
              "linattn_cuda: non-causal segments read the state over all keys from kv0");
  if (p.B * p.H == 0 || (p.Lq == 0 && p.kv_out == nullptr)) return;
  dv_slice = chunk_dv_slice(p, dv_slice, dev);
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

bool chunk_bwd_supported(DType dt, int D, int Dv, const DeviceInfo& dev) {
  if (!chunk_supported(dt, D, Dv, dev)) return false;
  const int MP = (feature_count(D) + 15) / 16 * 16;
  const size_t smem = D <= 16 ? std::max(tc::BwdLayout<16, 32>::smem_dq(MP), tc::BwdLayout<16, 32>::smem_dkdv(MP))
                              : std::max(tc::BwdLayout<32, 32>::smem_dq(MP), tc::BwdLayout<32, 32>::smem_dkdv(MP));
  return smem <= static_cast<size_t>(dev.smem_optin);
}

int chunk_bwd_dv_slice(DType dt, const BwdParams& p, int setting, const DeviceInfo& dev) {
  if (p.D > 16) return 32;
  const int MP = (feature_count(p.D) + 15) / 16 * 16;
  const bool fits64 = tc::BwdLayout<16, 64>::smem_dkdv(MP) <= static_cast<size_t>(dev.smem_optin) &&
                      tc::BwdLayout<16, 64>::smem_dq(MP) <= static_cast<size_t>(dev.smem_optin);
  if (setting == 32 || !fits64) return 32;
  if (setting == 64) return 64;
  // one slice for Dv <= 64 (no partial sums), except fp32 whose 3xTF32 fragments spill at 64 columns
  return (p.Dv > 32 && dt != DType::F32) ? 64 : 32;
}

void launch_chunk_bwd(DType dt, const BwdParams& p, int dv_slice, float* dq_part, float* dk_part,
                      const DeviceInfo& dev, la_stream_t stream) {
  TORCH_CHECK(chunk_bwd_supported(dt, p.D, p.Dv, dev), "linattn_cuda: the tensor-core chunked backward does not "
              "support this dtype, D = ", p.D, " or this device");
  TORCH_CHECK(dv_slice == 32 || dv_slice == 64, "linattn_cuda: dv_slice must be 32 or 64");
  TORCH_CHECK(p.nseg <= 1 || (p.seg_len > 0 && p.seg_len % tc::C == 0),
              "linattn_cuda: segments need a length that is a multiple of ", tc::C);
  TORCH_CHECK(p.nseg <= 1 || p.causal || p.state_only || (p.s0 != nullptr && p.r0 != nullptr),
              "linattn_cuda: non-causal backward segments read the full states from s0 and r0");
  TORCH_CHECK(!p.state_only || (p.r_out != nullptr && p.rz_out != nullptr), "linattn_cuda: state_only needs r_out");
  if (p.B * p.H == 0) return;
  switch (dt) {
    case DType::F16:
      tc::launch_bwd_dims<__half, false>(p, dv_slice, dq_part, dk_part, dev, stream);
      break;
    case DType::BF16:
      tc::launch_bwd_dims<__nv_bfloat16, false>(p, dv_slice, dq_part, dk_part, dev, stream);
      break;
    case DType::F32:
      tc::launch_bwd_dims<float, true>(p, dv_slice, dq_part, dk_part, dev, stream);
      break;
    case DType::F64:
      break;
  }
}

}  // namespace linattn
