// Fused C++ CPU kernels of second-order Taylor attention (schemas in csrc/ops.cpp).
//
// Every (sequence, head) pair is an independent task -- a sequence is one batch entry of a dense [B, H, L, *]
// call or one packed sequence of a varlen call (struct Problem) -- and tasks run in parallel, longest first.
// Grouped-query attention: query head h reads key/value head h / (H / Hkv) in place; the backward and the
// prefill run a key/value head's query heads in one task, so that dk, dv and the state add up without races.
// Causal with Lq < Lk is end-aligned: the first Lk - Lq keys, seen by every query, are a prefix state.
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
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include "../include/problem.h"
#include "math.h"
#include "tasks.h"
#include "taylor_chunk.h"
#include "taylor_parallel.h"
#include "taylor_state.h"
#include "taylor_step.h"

namespace linattn_cuda {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Which algorithm and chunk size, per shape. Measured on a 2-core Xeon (Sapphire Rapids) with MKL:
// see bench/results and the README; overridable with LINATTN_CPU_CHUNK / LINATTN_CPU_QUADRATIC_MAX.

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
    // End-aligned (Lq < Lk): the first Lk - Lq keys are seen by every query; the quadratic form pays for them
    // per query, the linear form once (a state), so the FLOP rule below decides when there are any.
    const int64_t quad_max = env_int("LINATTN_CPU_QUADRATIC_MAX", 256);
    const int64_t off = s.lk - s.lq;
    const double quad = 2.0 * s.lq * (off + 0.5 * s.lq) * (s.d + dv1);
    const double lin = 2.0 * (s.lk + 2 * s.lq) * m * dv1;
    // Large head dims (M grows as D^2 / 2) make the quadratic form the cheaper one at any length seen in practice.
    const bool quadratic =
        form == 0 ? ((s.lq <= quad_max && (off == 0 || quad <= 2.0 * lin)) || 4.0 * quad <= lin) : form == 1;
    if (quadratic) return {true, static_cast<int>(std::clamp<int64_t>(s.lq, 1, 256))};
    return {false, static_cast<int>(chunk)};
  }
  // Non-causal: FLOPs of each form; the quadratic form runs closer to peak, hence the factor 2.
  const double quad = 2.0 * s.lq * s.lk * (s.d + dv1);
  const double lin = 2.0 * (s.lq + s.lk) * m * dv1;
  const bool quadratic = form == 0 ? ((s.lk <= 4096 && quad <= 2.0 * lin) || 4.0 * quad <= lin) : form == 1;
  return {quadratic, static_cast<int>(chunk)};
}

// ---------------------------------------------------------------------------------------------------------
// Forward for one (sequence, head) and the value columns [c0, c0 + s.dv) of a value matrix with rows ld apart
// (v and out point at column c0; ld = s.dv unless the value columns are split across tasks, see run_forward).
// den may be null (a task that is not the first of its head). s0 (M x (Dv+1), or null) is an initial state: every
// query sees it. s_out (causal linear form only, or null) receives the final state (s0 plus every key); it may be
// s0 itself. Causal with Lq < Lk is end-aligned: query i sees the keys j <= i + Lk - Lq.
template <typename T>
void forward_one(const T* q, const T* k, const T* v, const bool* pad, T* out, T* den, const Shape& s, bool causal,
                 double scale, const Plan& plan, const T* s0, T* s_out, int ld) {
  if (plan.quadratic) {
    TORCH_CHECK(s_out == nullptr, "internal: the quadratic form builds no state");
    forward_quadratic(q, k, v, pad, out, den, s, causal, scale, plan, s0, ld);
  } else {
    forward_chunked(q, k, v, pad, out, den, s, causal, scale, plan, s0, s_out, ld);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward for one (sequence, head) and the value columns [c0, c0 + s.dv) of value matrices with rows ld apart
// (g, out, v and dv_out point at the head's column 0; ld = s.dv unless the columns are split across tasks, see
// run_backward). dq, dk and dv_out (zero-initialised by the caller) receive this block's share, added: dw_ij
// sums over the value columns (and the normalizer column, which the block with `norm` carries), so the blocks'
// dq and dk add up to the gradients; dv_out receives the block's own columns. Adding also sums dk and dv over
// the query heads that share a key/value head (grouped-query attention: the caller runs them one after another).
// An initial state's part of the gradients is left to the state passes (run_state_backward).
template <typename T>
void backward_one(const T* g, const T* q, const T* k, const T* v, const bool* pad, const T* out, const T* den,
                  T* dq, T* dk, T* dv_out, const Shape& s, bool causal, double scale, const Plan& plan, int ld = -1,
                  int c0 = 0, bool norm = true) {
  const int d = static_cast<int>(s.d), dv = static_cast<int>(s.dv), dv1 = dv + 1;
  if (ld < 0) ld = dv;
  const int lq = static_cast<int>(s.lq), lk = static_cast<int>(s.lk);
  v += c0;
  dv_out += c0;
  std::vector<T> gaug(static_cast<size_t>(lq) * dv1);
  build_gaug(g, out, den, lq, dv, ld, c0, norm, gaug.data());
  if (plan.quadratic) {
    backward_quadratic(gaug.data(), q, k, v, pad, dq, dk, dv_out, s, causal, scale, plan, ld, norm);
  } else {
    backward_chunked(gaug.data(), q, k, v, pad, dq, dk, dv_out, s, causal, scale, plan, ld, norm);
  }
  if (pad != nullptr) {  // padded keys get no gradient
    for (int j = 0; j < lk; ++j) {
      if (!pad[j]) continue;
      std::fill(dk + static_cast<int64_t>(j) * d, dk + static_cast<int64_t>(j + 1) * d, T(0));
      std::fill(dv_out + static_cast<int64_t>(j) * ld, dv_out + static_cast<int64_t>(j) * ld + dv, T(0));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The kernels over a call's tasks. q, k, v (and grad_out, out, den) are head-major buffers in the accumulation
// type; mask is a dense problem's [B, Lk] key padding mask or undefined. A state travels as one
// [N, Hkv, M, Dv + 1] "aug" tensor (kv columns, then k_sum); a column block of width w uses the [.., w + 1]
// tensor of its columns and k_sum (state_block).

at::Tensor state_block(const at::Tensor& aug, int64_t c0, int64_t w) {
  const int64_t dv = aug.size(-1) - 1;
  return at::cat({aug.narrow(-1, c0, w), aug.narrow(-1, dv, 1)}, -1).contiguous();
}

// The aug tensor of every column block of cs (empty when there is no state).
std::vector<at::Tensor> state_blocks(const at::Tensor& aug, const ColumnSplit& cs) {
  std::vector<at::Tensor> blocks;
  if (!aug.defined()) return blocks;
  for (int64_t block = 0; block < cs.count; ++block) blocks.push_back(state_block(aug, cs.start(block), cs.size(block)));
  return blocks;
}

// The [N, Hkv, M, Dv + 1] aug tensor from the blocks of cs (each carries k_sum; block 0's is kept).
at::Tensor join_state_blocks(const std::vector<at::Tensor>& blocks, const ColumnSplit& cs) {
  std::vector<at::Tensor> parts;
  for (int64_t block = 0; block < cs.count; ++block) parts.push_back(blocks[block].narrow(-1, 0, cs.size(block)));
  parts.push_back(blocks[0].narrow(-1, cs.size(0), 1));
  return at::cat(parts, -1).contiguous();
}

template <typename T>
T* state_ptr(const std::vector<at::Tensor>& blocks, int64_t block, int64_t n, int64_t hk, int64_t kv_heads) {
  if (blocks.empty()) return nullptr;
  const at::Tensor& b = blocks[block];
  return b.data_ptr<T>() + (n * kv_heads + hk) * b.size(2) * b.size(3);
}

// out [rows, Dv], den [rows] of the query rows; s0: the initial state (aug) or undefined.
void run_forward(const Tasks& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                 const at::Tensor& s0, const at::Tensor& out, const at::Tensor& den, bool causal, double scale) {
  if (out.numel() == 0) {
    if (den.numel() > 0 && !s0.defined()) den.zero_();  // Dv == 0: no output columns, the normalizer still defined
    if (den.numel() == 0 || !s0.defined()) return;
  }
  // With fewer tasks than threads, split the value columns too: each task owns a block of output columns
  // (and recomputes the normalizer, written by the first block only). Blocks of >= 16 columns.
  const ColumnSplit cs = column_split(p.seqs * p.heads, p.dv);
  const std::vector<at::Tensor> s0b = state_blocks(s0, cs);
  const int64_t group = p.group();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "taylor_fwd_cpu", [&] {
    for_each_task(p, p.heads, cs, [&](int64_t n, int64_t h, int64_t block) {
      const int64_t qr = p.q.row(n, h), kr = p.k.row(n, h / group), c0 = cs.start(block);
      const Shape part = p.shape(n, cs.size(block));
      scalar_t* o = out.data_ptr<scalar_t>() + qr * p.dv + c0;
      scalar_t* z = block == 0 ? den.data_ptr<scalar_t>() + qr : nullptr;
      const scalar_t* st = state_ptr<scalar_t>(s0b, block, n, h / group, p.kv_heads);
      if (part.lk == 0 && st == nullptr) {  // no key: defined as 0
        for (int64_t i = 0; i < part.lq; ++i) std::fill(o + i * p.dv, o + i * p.dv + part.dv, scalar_t(0));
        if (z != nullptr) std::fill(z, z + part.lq, scalar_t(0));
        return;
      }
      if (part.lq == 0) return;
      forward_one<scalar_t>(q.data_ptr<scalar_t>() + qr * p.d, k.data_ptr<scalar_t>() + kr * p.d,
                            v.data_ptr<scalar_t>() + kr * p.dv + c0, mask_ptr(mask, n, part.lk), o, z, part, causal,
                            scale, make_plan(p.shape(n, p.dv), causal), st, nullptr, static_cast<int>(p.dv));
    });
  });
}

// Causal forward that also returns the final state of every (sequence, key/value head) (aug, in the accumulation
// type), from the initial state s0 (aug) or zeros; out [rows, Dv], den [rows].
at::Tensor run_prefill(const Tasks& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& mask, const at::Tensor& s0, const at::Tensor& out, const at::Tensor& den,
                       double scale) {
  const int64_t m = 1 + p.d + p.d * (p.d + 1) / 2, group = p.group();
  // A task per (sequence, key/value head, column block), as in the backward: the state belongs to the key/value
  // head, so the group's query heads run one after another and the last one builds the final state.
  const ColumnSplit cs = column_split(p.seqs * p.kv_heads, p.dv);
  const std::vector<at::Tensor> s0b = state_blocks(s0, cs);
  std::vector<at::Tensor> states;
  for (int64_t block = 0; block < cs.count; ++block)
    states.push_back(at::empty({p.seqs, p.kv_heads, m, cs.size(block) + 1}, q.options()));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "taylor_prefill_cpu", [&] {
    for_each_task(p, p.kv_heads, cs, [&](int64_t n, int64_t hk, int64_t block) {
      const Shape part = p.shape(n, cs.size(block));
      const int64_t w = part.dv, kr = p.k.row(n, hk), c0 = cs.start(block);
      Plan plan = make_plan(p.shape(n, p.dv), true);
      plan.quadratic = false;
      plan.chunk = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(plan.chunk, part.lk)));
      scalar_t* st = state_ptr<scalar_t>(states, block, n, hk, p.kv_heads);
      const scalar_t* init = state_ptr<scalar_t>(s0b, block, n, hk, p.kv_heads);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const bool last = h == (hk + 1) * group - 1;
        if (!last && part.lq == 0) continue;
        const int64_t qr = p.q.row(n, h);
        forward_one<scalar_t>(q.data_ptr<scalar_t>() + qr * p.d, k.data_ptr<scalar_t>() + kr * p.d,
                              v.data_ptr<scalar_t>() + kr * p.dv + c0, mask_ptr(mask, n, part.lk),
                              out.data_ptr<scalar_t>() + qr * p.dv + c0,
                              block == 0 ? den.data_ptr<scalar_t>() + qr : nullptr, part, true, scale, plan, init,
                              last ? st : nullptr, static_cast<int>(p.dv));
      }
      (void)w;
    });
  });
  return join_state_blocks(states, cs);
}

// The state of every (sequence, key/value head) after all its keys: s0 (aug) or zeros plus phi(K)^T [V | 1].
at::Tensor run_state(const Tasks& p, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                     const at::Tensor& s0, double scale) {
  const int64_t m = 1 + p.d + p.d * (p.d + 1) / 2;
  const ColumnSplit cs = column_split(p.seqs * p.kv_heads, p.dv);
  std::vector<at::Tensor> states = state_blocks(s0, cs);
  if (states.empty()) {
    for (int64_t block = 0; block < cs.count; ++block)
      states.push_back(at::zeros({p.seqs, p.kv_heads, m, cs.size(block) + 1}, k.options()));
  }
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "taylor_state_cpu", [&] {
    for_each_task(p, p.kv_heads, cs, [&](int64_t n, int64_t hk, int64_t block) {
      const int lk = static_cast<int>(p.k.len[n]), w = static_cast<int>(cs.size(block));
      if (lk == 0) return;
      const int c = std::min(lk, static_cast<int>(env_int("LINATTN_CPU_CHUNK", 64)));
      const FeatureMap<scalar_t> fm(static_cast<int>(p.d), scale);
      FeatureScratch<scalar_t> fs(c, fm.d, fm.m);
      std::vector<scalar_t> vscratch(mask.defined() ? static_cast<size_t>(c) * w : 0);
      const int64_t kr = p.k.row(n, hk);
      const bool* pad = mask_ptr(mask, n, lk);
      scalar_t* st = state_ptr<scalar_t>(states, block, n, hk, p.kv_heads);
      for (int r0 = 0; r0 < lk; r0 += c)
        keys_into_state(fm, k.data_ptr<scalar_t>() + (kr + r0) * p.d,
                        v.data_ptr<scalar_t>() + (kr + r0) * p.dv + cs.start(block), pad ? pad + r0 : nullptr,
                        std::min(c, lk - r0), w, static_cast<int>(p.dv), st, fs, vscratch.data());
    });
  });
  return join_state_blocks(states, cs);
}

// dq, dk, dv zero-initialised, head-major like q, k, v.
void run_backward(const Tasks& p, const at::Tensor& g, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& mask, const at::Tensor& out, const at::Tensor& den,
                  const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, bool causal, double scale) {
  if (q.numel() == 0 || k.numel() == 0 || out.numel() == 0) return;
  // A task per (sequence, key/value head, column block): it owns that head's dk and dv and runs the query heads
  // of its group one after another, so that their dk and dv add up without races. With fewer tasks than
  // threads the value columns are split as in the forward: each block adds its share of dq and dk to a buffer
  // of its own (block 0: dq, dk), summed after.
  const ColumnSplit cs = column_split(p.seqs * p.kv_heads, p.dv);
  const int64_t group = p.group();
  at::Tensor dq_part, dk_part;
  if (cs.count > 1) {
    dq_part = at::zeros({cs.count - 1, dq.numel()}, dq.options());
    dk_part = at::zeros({cs.count - 1, dk.numel()}, dk.options());
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "taylor_bwd_cpu", [&] {
    for_each_task(p, p.kv_heads, cs, [&](int64_t n, int64_t hk, int64_t block) {
      const Shape part = p.shape(n, cs.size(block));
      if (part.lq == 0 || part.lk == 0) return;  // no query or no key: zero gradients
      const Plan plan = make_plan(p.shape(n, p.dv), causal);
      scalar_t* dq_out = block == 0 ? dq.data_ptr<scalar_t>() : dq_part.data_ptr<scalar_t>() + (block - 1) * dq.numel();
      scalar_t* dk_out = block == 0 ? dk.data_ptr<scalar_t>() : dk_part.data_ptr<scalar_t>() + (block - 1) * dk.numel();
      const int64_t kr = p.k.row(n, hk);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const int64_t qr = p.q.row(n, h);
        backward_one<scalar_t>(g.data_ptr<scalar_t>() + qr * p.dv, q.data_ptr<scalar_t>() + qr * p.d,
                               k.data_ptr<scalar_t>() + kr * p.d, v.data_ptr<scalar_t>() + kr * p.dv,
                               mask_ptr(mask, n, part.lk), out.data_ptr<scalar_t>() + qr * p.dv,
                               den.data_ptr<scalar_t>() + qr, dq_out + qr * p.d, dk_out + kr * p.d,
                               dv.data_ptr<scalar_t>() + kr * p.dv, part, causal, scale, plan, static_cast<int>(p.dv),
                               static_cast<int>(cs.start(block)), block == 0);
      }
    });
  });
  if (cs.count > 1) {
    dq.view(-1).add_(dq_part.sum(0));
    dk.view(-1).add_(dk_part.sum(0));
  }
}

// The gradient's state parts, after run_backward: with an initial state s0 (aug), dq += J_phi(q)^T (S0_aug G) and
// dS0 = sum over the group's queries of phi(q) G^T; with the gradient dsf (aug) of the final state (s0 plus every
// key), dk, dv += its part (the keys as if read by one more query) and dS0 += dsf. Returns dS0 (aug) or undefined.
at::Tensor run_state_backward(const Tasks& p, const at::Tensor& g, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& mask, const at::Tensor& out, const at::Tensor& den,
                              const at::Tensor& s0, const at::Tensor& dsf, const at::Tensor& dq, const at::Tensor& dk,
                              const at::Tensor& dv, double scale) {
  const int64_t m = 1 + p.d + p.d * (p.d + 1) / 2, group = p.group(), dv1 = p.dv + 1;
  at::Tensor ds0 = s0.defined() ? at::zeros({p.seqs, p.kv_heads, m, dv1}, q.options()) : at::Tensor();
  const ColumnSplit whole{1, p.dv, p.dv};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "taylor_state_bwd_cpu", [&] {
    for_each_task(p, p.kv_heads, whole, [&](int64_t n, int64_t hk, int64_t) {
      const int lq = static_cast<int>(p.q.len[n]), lk = static_cast<int>(p.k.len[n]), d = static_cast<int>(p.d);
      const int dvi = static_cast<int>(p.dv);
      const int c = std::max(1, std::min(std::max(lq, lk), static_cast<int>(env_int("LINATTN_CPU_CHUNK", 64))));
      const FeatureMap<scalar_t> fm(d, scale);
      FeatureScratch<scalar_t> fs(c, d, fm.m);
      std::vector<scalar_t> u(static_cast<size_t>(c) * fm.m), vaug(static_cast<size_t>(c) * dv1);
      const int64_t off = (n * p.kv_heads + hk) * m * dv1;
      if (s0.defined() && lq > 0) {
        std::vector<scalar_t> gaug(static_cast<size_t>(lq) * dv1);
        const scalar_t* s0p = s0.data_ptr<scalar_t>() + off;
        scalar_t* r = ds0.data_ptr<scalar_t>() + off;
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const int64_t qr = p.q.row(n, h);
          build_gaug(g.data_ptr<scalar_t>() + qr * p.dv, out.data_ptr<scalar_t>() + qr * p.dv,
                     den.data_ptr<scalar_t>() + qr, lq, dvi, dvi, 0, true, gaug.data());
          for (int r0 = 0; r0 < lq; r0 += c)
            queries_against_state(fm, q.data_ptr<scalar_t>() + (qr + r0) * p.d, gaug.data() + static_cast<int64_t>(r0) * dv1,
                                  std::min(c, lq - r0), dvi, s0p, dq.data_ptr<scalar_t>() + (qr + r0) * p.d, r, fs,
                                  u.data());
        }
      }
      if (dsf.defined()) {
        const scalar_t* dsp = dsf.data_ptr<scalar_t>() + off;
        const int64_t kr = p.k.row(n, hk);
        const bool* pad = mask_ptr(mask, n, lk);
        for (int r0 = 0; r0 < lk; r0 += c)
          keys_against_state(fm, k.data_ptr<scalar_t>() + (kr + r0) * p.d, v.data_ptr<scalar_t>() + (kr + r0) * p.dv,
                             pad ? pad + r0 : nullptr, std::min(c, lk - r0), dvi, dvi, scalar_t(1), dsp,
                             dk.data_ptr<scalar_t>() + (kr + r0) * p.d, dv.data_ptr<scalar_t>() + (kr + r0) * p.dv, fs,
                             vaug.data(), u.data());
        if (ds0.defined()) {
          scalar_t* r = ds0.data_ptr<scalar_t>() + off;
          for (int64_t i = 0; i < m * dv1; ++i) r[i] += dsp[i];
        }
      }
    });
  });
  return ds0;
}

// ---------------------------------------------------------------------------------------------------------
// The ops (schemas in csrc/ops.cpp). Dense [B, H, L, *] inputs are used as they are (made contiguous in the
// accumulation type); packed [T, H, *] ones are transposed to head-major [H, T, *] buffers (one copy each).

at::ScalarType compute_type(const Problem& desc) {
  return desc.dtype == at::kDouble || desc.state_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor to_buffer(const Problem& desc, const at::Tensor& x, at::ScalarType acc) {
  return desc.packed ? head_major(x, acc) : x.to(acc).contiguous();
}

at::Tensor from_buffer(const Problem& desc, const at::Tensor& x, at::ScalarType dt) {
  return desc.packed ? token_major(x, dt) : x.to(dt);
}

Tasks make_tasks(const Problem& desc, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const c10::optional<at::Tensor>& cu_q, const c10::optional<at::Tensor>& cu_k) {
  return desc.packed ? packed_tasks(q, k, v, *cu_q, *cu_k, desc.causal) : dense_tasks(q, k, v);
}

// [N, Hkv, M, Dv + 1] from a state (kv, k_sum) or undefined.
at::Tensor join_state(const c10::optional<at::Tensor>& kv, const c10::optional<at::Tensor>& k_sum, at::ScalarType acc) {
  if (!kv.has_value()) return at::Tensor();
  return at::cat({kv->to(acc), k_sum->to(acc).unsqueeze(-1)}, -1).contiguous();
}

std::tuple<at::Tensor, at::Tensor> split_state(const at::Tensor& aug, at::ScalarType dt) {
  const int64_t dv = aug.size(-1) - 1;
  return {aug.narrow(-1, 0, dv).to(dt).contiguous(), aug.select(-1, dv).to(dt).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> taylor_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const c10::optional<at::Tensor>& mask_in,
    const c10::optional<at::Tensor>& cu_q, const c10::optional<at::Tensor>& cu_k, const c10::optional<at::Tensor>& kv0,
    const c10::optional<at::Tensor>& k_sum0, bool causal, double scale, bool return_state) {
  const Problem desc = describe_problem(q_in, k_in, v_in, mask_in, cu_q, cu_k, kv0, k_sum0, causal, scale, kCpuLimits);
  const Tasks tasks = make_tasks(desc, q_in, k_in, v_in, cu_q, cu_k);
  const auto acc = compute_type(desc);
  const at::Tensor q = to_buffer(desc, q_in, acc), k = to_buffer(desc, k_in, acc), v = to_buffer(desc, v_in, acc);
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const at::Tensor s0 = join_state(kv0, k_sum0, acc);
  // head-major buffers: out [.., Lq, Dv] (dense) / [H, Tq, Dv] (packed), den [.., Lq] / [H, Tq]
  const auto opt = q.options();
  at::Tensor out = desc.packed ? at::empty({desc.heads, desc.lq, desc.dv}, opt) : at::empty(desc.out_shape(), opt);
  at::Tensor den = desc.packed ? at::empty({desc.heads, desc.lq}, opt) : at::empty(desc.den_shape(), opt);
  at::Tensor state;
  if (return_state && causal) {
    state = run_prefill(tasks, q, k, v, mask, s0, out, den, scale);
  } else {
    run_forward(tasks, q, k, v, mask, s0, out, den, causal, scale);
    if (return_state) state = run_state(tasks, k, v, mask, s0, scale);
  }
  const auto den_acc = accumulate_type(desc.dtype);
  at::Tensor den_out = (desc.packed ? den.t() : den).to(den_acc).contiguous();
  at::Tensor kv_out = at::empty({0}, opt.dtype(desc.state_dtype)), ks_out = at::empty({0}, opt.dtype(desc.state_dtype));
  if (state.defined()) std::tie(kv_out, ks_out) = split_state(state, desc.state_dtype);
  return {from_buffer(desc, out, desc.dtype), den_out, kv_out, ks_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> taylor_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_kv, const c10::optional<at::Tensor>& grad_k_sum,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const c10::optional<at::Tensor>& mask_in,
    const c10::optional<at::Tensor>& cu_q, const c10::optional<at::Tensor>& cu_k, const c10::optional<at::Tensor>& kv0,
    const c10::optional<at::Tensor>& k_sum0, const at::Tensor& out_in, const at::Tensor& den_in, bool causal,
    double scale) {
  const Problem desc = describe_problem(q_in, k_in, v_in, mask_in, cu_q, cu_k, kv0, k_sum0, causal, scale, kCpuLimits);
  check_backward(desc, q_in, grad_out, out_in, den_in, grad_kv, grad_k_sum);
  const Tasks tasks = make_tasks(desc, q_in, k_in, v_in, cu_q, cu_k);
  const auto acc = compute_type(desc);
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  at::Tensor q = to_buffer(desc, q_in, acc), k = to_buffer(desc, k_in, acc), v = to_buffer(desc, v_in, acc);
  if (mask.defined()) {  // padded keys hold anything (NaN, inf): zero them, so that 0 * x stays 0 below
    const at::Tensor pad = mask.view({mask.size(0), 1, mask.size(1), 1});
    k = k.masked_fill(pad, 0);
    v = v.masked_fill(pad, 0);
  }
  const at::Tensor g = to_buffer(desc, grad_out, acc), out = to_buffer(desc, out_in, acc);
  const at::Tensor den = (desc.packed ? den_in.t() : den_in).to(acc).contiguous();
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  run_backward(tasks, g, q, k, v, mask, out, den, dq, dk, dv, causal, scale);
  const at::Tensor s0 = join_state(kv0, k_sum0, acc), dsf = join_state(grad_kv, grad_k_sum, acc);
  at::Tensor ds0;
  if (s0.defined() || dsf.defined())
    ds0 = run_state_backward(tasks, g, q, k, v, mask, out, den, s0, dsf, dq, dk, dv, scale);
  // Contiguous gradients, as the CUDA kernels and the fake kernel (linattn_cuda/ops/taylor/registration.py) give.
  const auto dt = desc.dtype;
  at::Tensor dkv0 = at::empty({0}, q.options().dtype(desc.state_dtype)), dks0 = at::empty_like(dkv0);  // no aliasing
  if (ds0.defined()) std::tie(dkv0, dks0) = split_state(ds0, desc.state_dtype);
  return {from_buffer(desc, dq, dt), from_buffer(desc, dk, dt), from_buffer(desc, dv, dt), dkv0, dks0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> taylor_step_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                               const at::Tensor& v_in, const at::Tensor& kv_in,
                                                               const at::Tensor& k_sum_in, double scale) {
  const Problem desc = describe_step(q_in, k_in, v_in, kv_in, k_sum_in, scale, kCpuLimits);
  const int64_t b = desc.seqs, h = desc.heads, hk = desc.kv_heads, d = desc.d, dv = desc.dv;
  const int64_t m = desc.features(), group = desc.group();
  const auto acc = kv_in.scalar_type();
  const at::Tensor q = q_in.to(acc).contiguous(), k = k_in.to(acc).contiguous(), v = v_in.to(acc).contiguous();
  const at::Tensor kv = kv_in.contiguous(), k_sum = k_sum_in.contiguous();
  at::Tensor kv_out = at::empty_like(kv), k_sum_out = at::empty_like(k_sum);
  at::Tensor out = at::empty({b, h, dv}, q.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "taylor_step_cpu", [&] {
    at::parallel_for(0, b * hk, std::max<int64_t>(1, 16 / group), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> fq(group * m), fk(m), z(group);
      const FeatureMap<scalar_t> fm(static_cast<int>(d), scale);
      for (int64_t bk = begin; bk < end; ++bk) {  // (batch, key/value head); its query heads are bk*group + g
        for (int64_t g = 0; g < group; ++g) fm.build(q.data_ptr<scalar_t>() + (bk * group + g) * d, 1, fq.data() + g * m);
        fm.build(k.data_ptr<scalar_t>() + bk * d, 1, fk.data());
        step_one(kv.data_ptr<scalar_t>() + bk * m * dv, kv_out.data_ptr<scalar_t>() + bk * m * dv,
                 k_sum.data_ptr<scalar_t>() + bk * m, k_sum_out.data_ptr<scalar_t>() + bk * m, fq.data(),
                 static_cast<int>(group), fk.data(), v.data_ptr<scalar_t>() + bk * dv, static_cast<int>(m),
                 static_cast<int>(dv), out.data_ptr<scalar_t>() + bk * group * dv, z.data());
      }
    });
  });
  return {out.to(q_in.scalar_type()), kv_out, k_sum_out};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(linattn_cuda, CPU, m) {
  m.impl("taylor_fwd", &cpu::taylor_fwd_cpu);
  m.impl("taylor_bwd", &cpu::taylor_bwd_cpu);
  m.impl("taylor_step", &cpu::taylor_step_cpu);
}

}  // namespace linattn_cuda
