// CUDA kernels of the linattn_cuda ops (schemas in csrc/ops.cpp), registered for the CUDA dispatch key.
// Kernels: taylor_simt.cu (CUDA cores, every dtype), taylor_tc.cu (tensor cores, chunked linear form) and
// quad_tc.cuh (tensor cores, quadratic forward; compiled here); the op family's checks: csrc/include/problem.h;
// form choice and launches: taylor_host.h. Design notes: README.md in this folder.
#include <torch/library.h>

#include "quad_tc.cuh"
#include "taylor_host.h"

TORCH_LIBRARY_IMPL(linattn_cuda, CUDA, m) {
  m.impl("taylor_fwd", &linattn::op_fwd);
  m.impl("taylor_bwd", &linattn::op_bwd);
  m.impl("taylor_step", &linattn::taylor_step);
}
