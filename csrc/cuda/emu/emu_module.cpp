// The CUDA kernels and their host code compiled for the CPU emulator (emu.h): a Python module whose
// functions take CPU tensors and run every kernel thread as a fiber. Built on demand by tests/test_cuda.py
// when LINATTN_TEST_EMULATE=1; never part of the installed extension.
#define LINATTN_EMULATE 1
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "../taylor_simt.cu"
#include "../taylor_tc.cu"
#include "../quad_tc.cuh"
#include "../taylor_host.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("taylor_fwd", &linattn::op_fwd);
  m.def("taylor_bwd", &linattn::op_bwd);
  m.def("taylor_step", &linattn::taylor_step);
  m.def("feature_pair", [](int m, int D) {
    const linattn::FeaturePair f = linattn::feature_pair(m, D, D);
    return std::make_tuple(f.a, f.b, f.kind);
  });
}
