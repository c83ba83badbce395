// Operator schemas of linattn_cuda (one place for all of them) and the Python module whose import runs
// the static registrations. Kernels live in csrc/cpu/ and csrc/cuda/, one TORCH_LIBRARY_IMPL each.
//
// Shapes (B batch, H query heads, Hkv key/value heads, Lq/Lk lengths, D q/k dim, Dv value dim,
// M = 1 + D + D(D+1)/2):
//   q [B,H,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv], key_padding_mask [B,Lk] bool (True = padding) or None.
//   Grouped-query attention when Hkv < H (H % Hkv == 0): query head h reads key/value head h / (H / Hkv).
//   causal: end-aligned, query i sees keys j <= i + Lk - Lq (Lq <= Lk).
//   out [B,H,Lq,Dv] in q's dtype; den [B,H,Lq] = sum_j w_ij (float32, float64 for float64 inputs).
//   State: kv [B,Hkv,M,Dv] = sum_j phi(k_j) v_j^T and k_sum [B,Hkv,M] = sum_j phi(k_j) (float32 / float64).
// The CUDA kernels take Hkv == H and, causal, Lq == Lk only (they check it); the CPU kernels take both.
// Packed variable-length sequences (varlen ops, CPU only for now): q [Tq,H,D], k [Tk,Hkv,D], v [Tk,Hkv,Dv],
//   cu_seqlens_q / cu_seqlens_k int32 [N+1] (0 = cu[0] <= ... <= cu[N] = T); out [Tq,H,Dv], den [H,Tq];
//   state kv [N,Hkv,M,Dv], k_sum [N,Hkv,M]. Sequence n is rows cu[n]:cu[n+1], attending only within itself.
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
  // Forward: attention output and the per-query normalizer (saved for the backward).
  m.def("taylor_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, float scale) "
        "-> (Tensor out, Tensor den)");
  // Backward: gradients w.r.t. q, k, v from grad_out and the forward's out and den.
  m.def("taylor_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor out, "
        "Tensor den, bool causal, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // Causal prefill from an optional initial state; returns the output and the final state.
  m.def("taylor_prefill(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? kv, Tensor? k_sum, "
        "float scale) -> (Tensor out, Tensor kv_out, Tensor k_sum_out)");
  // One decoding step: q, k [B,H,D], v [B,H,Dv]; reads the state once and writes the new state once.
  m.def("taylor_step(Tensor q, Tensor k, Tensor v, Tensor kv, Tensor k_sum, float scale) "
        "-> (Tensor out, Tensor kv_out, Tensor k_sum_out)");
  // The packed variable-length forms of taylor_fwd, taylor_bwd and taylor_prefill.
  m.def("taylor_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, bool causal, "
        "float scale) -> (Tensor out, Tensor den)");
  m.def("taylor_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
        "Tensor cu_seqlens_k, Tensor out, Tensor den, bool causal, float scale) "
        "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def("taylor_varlen_prefill(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "Tensor? kv, Tensor? k_sum, float scale) -> (Tensor out, Tensor kv_out, Tensor k_sum_out)");
}
