"""Second-order Taylor attention: ``naive`` (the plain PyTorch ground truth), ``reference`` (the pure-PyTorch
backend), ``cpp`` (the compiled cpu/cuda kernels of csrc/ behind torch.ops.linattn_cuda.*), ``triton``."""
