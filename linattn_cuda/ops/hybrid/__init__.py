"""Hybrid attention: exact softmax inside a sliding window, the Taylor weight beyond it, one normalizer.

    naive.py      the float64 definition (hybrid_attention_reference): the ground truth of the tests
    blocked.py    plain PyTorch, blocked, linear in L: backend "reference" (differentiable prefill too)
    cpp.py        backend "cpu": the fused C++ kernels (csrc/cpu/hybrid_cpu.cpp), fake kernels, autograd
    triton/       backend "triton": the fused Triton kernels as torch.library.triton_op
    cache.py      the decoding cache (ring buffer of the last W - 1 keys/values + Taylor state + positions)
    checks.py     argument checks
    functions.py  the public functions and the backend choice
"""
