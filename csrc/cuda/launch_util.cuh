// Launch helpers shared by taylor_simt.cu and taylor_tc.cu: a launch macro that checks every launch
// (or runs the kernel in the CPU emulator), and the opt-in for more than 48 KiB of shared memory.
#pragma once

#include "common.cuh"

#include <c10/util/Exception.h>
#ifndef LINATTN_EMULATE
#include <c10/cuda/CUDAException.h>
#endif

#ifdef LINATTN_EMULATE
#define LA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::emu::launch((grid), (block), (smem), [&]() { kernel(__VA_ARGS__); })
#else
#define LA_LAUNCH(kernel, grid, block, smem, stream, ...)        \
  do {                                                           \
    kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__);  \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                              \
  } while (0)
#endif

namespace linattn {

template <class Kernel>
inline void prepare_smem(Kernel kernel, size_t smem, const DeviceInfo& dev, const char* what) {
  TORCH_CHECK(smem <= static_cast<size_t>(dev.smem_optin), "linattn_cuda: the ", what, " kernel needs ", smem,
              " bytes of shared memory for this shape, the device allows ", dev.smem_optin);
#ifndef LINATTN_EMULATE
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
#else
  (void)kernel;
#endif
}

inline unsigned ceil_div(index_t a, index_t b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace linattn
