"""Triton kernels of linattn_cuda (``backend="triton"``), one file per algorithm:

    parallel.py  quadratic form, FlashAttention dataflow (forward, backward)
    chunk.py     chunked linear form, feature map on the fly, fp32 state in registers (forward with
                 optional state in/out = prefill, backward)
    step.py      fused decoding step on the symmetric-map state
    ops.py       the kernels as torch.library.triton_op custom ops (torch.ops.linattn_cuda.triton_*)
    backend.py   TritonBackend (the backend interface) and the per-shape form rule ``choose_form``
    common.py    dot precision per dtype, block sizes, LINATTN_POISON_OUTPUTS, the backward preprocess

Importing this package does not import triton; its modules do.
"""
