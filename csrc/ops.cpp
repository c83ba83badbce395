// Operator schemas of linattn_cuda (one place for all of them) and the Python module whose import runs
// the static registrations. Kernels live in csrc/cpu/ and csrc/cuda/, one TORCH_LIBRARY_IMPL each.
//
// One op family for every layout (the problem description: csrc/include/problem.h):
//   dense   q [B,H,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv], key_padding_mask [B,Lk] bool (True = padding) or None;
//   packed  q [Tq,H,D], k [Tk,Hkv,D], v [Tk,Hkv,Dv] with cu_seqlens_q / cu_seqlens_k int32 [N+1]
//           (0 = cu[0] <= ... <= cu[N] = T; sequence n is rows cu[n]:cu[n+1], attending only within itself).
//   Grouped-query attention when Hkv < H (H % Hkv == 0): query head h reads key/value head h / (H / Hkv).
//   causal: end-aligned per sequence, query i sees keys j <= i + Lk - Lq (Lq <= Lk).
//   out: q's shape with Dv, in q's dtype; den: q's shape without D, sum_j w_ij (float32; float64 for float64).
//   State of N sequences (N = B dense): kv [N,Hkv,M,Dv] = sum_j phi(k_j) v_j^T, k_sum [N,Hkv,M] = sum_j phi(k_j)
//   (M = 1 + D + D(D+1)/2, float32 or float64). An initial state kv0 / k_sum0 is seen by every query;
//   return_state gives the final state (the initial one plus every unpadded key); otherwise kv and k_sum are
//   empty. The backward takes the final state's gradient (or None) and returns the initial state's (empty
//   without one), so that a state passes gradients between calls (chunked prefill, context parallelism).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module: importing linattn_cuda._C loads this library, which registers the ops below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(linattn_cuda, m) {
  // Forward: the output, the per-query normalizer (saved for the backward) and, with return_state, the state.
  m.def("taylor_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? cu_seqlens_q, "
        "Tensor? cu_seqlens_k, Tensor? kv0, Tensor? k_sum0, bool causal, float scale, bool return_state) "
        "-> (Tensor out, Tensor den, Tensor kv, Tensor k_sum)");
  // Backward: gradients w.r.t. q, k, v and the initial state from grad_out (and the final state's gradient).
  m.def("taylor_bwd(Tensor grad_out, Tensor? grad_kv, Tensor? grad_k_sum, Tensor q, Tensor k, Tensor v, "
        "Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? kv0, Tensor? k_sum0, "
        "Tensor out, Tensor den, bool causal, float scale) "
        "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_kv0, Tensor grad_k_sum0)");
  // One decoding step: q [B,H,D], k [B,Hkv,D], v [B,Hkv,Dv]; reads the state once and writes the new state once.
  m.def("taylor_step(Tensor q, Tensor k, Tensor v, Tensor kv, Tensor k_sum, float scale) "
        "-> (Tensor out, Tensor kv_out, Tensor k_sum_out)");

  // ---- Hybrid attention (csrc/cpu/hybrid_cpu.cpp, linattn_cuda/ops/hybrid/): exp weights inside a window of
  // `window` keys (causal: i - W < j <= i; else |i - j| < W), the Taylor weight far_weight[h] (1 + s + s^2/2)
  // beyond it, one normalizer. Self-attention: q [B,H,L,D], k [B,Hkv,L,D], v [B,Hkv,L,Dv]; far_weight [H] finite
  // and positive, or None (1). lse [B,H,L] = the log of each row's normalizer (+inf for a row without keys),
  // float32 (float64 for float64 inputs), saved for the backward.
  // Packed sequences: cu_seqlens int32 [N + 1] with q [T,H,D], k [T,Hkv,D], v [T,Hkv,Dv], no key_padding_mask;
  // lse is then head-major [H,T].
  m.def("hybrid_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? far_weight, Tensor? cu_seqlens, "
        "int window, bool causal, float scale) -> (Tensor out, Tensor lse)");
  // grad_far_weight [H] (zeros when far_weight is None).
  m.def("hybrid_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? far_weight, "
        "Tensor? cu_seqlens, Tensor out, Tensor lse, int window, bool causal, float scale) "
        "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_far_weight)");
  // Causal prefill: the output and the Taylor state (kv [B,Hkv,M,Dv], k_sum [B,Hkv,M]) of the keys
  // 0 .. L - W, which no later query sees inside its window (the last W - 1 keys go to the ring buffer).
  m.def("hybrid_prefill(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? far_weight, int window, "
        "float scale) -> (Tensor out, Tensor kv, Tensor k_sum)");
  // One decoding step, updating the cache in place: q [B,H,D], k [B,Hkv,D], v [B,Hkv,Dv], key_padding_mask [B]
  // (True = the new token is padding); ring_k [B,Hkv,W-1,D] / ring_v [B,Hkv,W-1,Dv] (slot p mod (W-1) holds
  // position p), ring_pad [B,W-1] (True = padding or empty), kv, k_sum (the state of the keys before the ring),
  // position [B] int64 (tokens seen). Returns out [B,H,Dv].
  m.def("hybrid_step(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor(a!) ring_k, "
        "Tensor(b!) ring_v, Tensor(c!) ring_pad, Tensor(d!) kv, Tensor(e!) k_sum, Tensor(f!) position, "
        "Tensor? far_weight, float scale) -> Tensor");
}
