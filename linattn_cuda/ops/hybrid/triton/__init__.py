"""Triton kernels of the hybrid attention: far.py (the Taylor part beyond the window, chunked), band.py (the
window's exact softmax and the one normalizer), step.py (one decoding step, in place); ops.py registers them as
custom ops, backend.py adapts them to linattn_cuda.ops.hybrid.functions."""
