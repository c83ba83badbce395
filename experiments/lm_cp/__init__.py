"""The language model of :mod:`experiments.lm` trained with its sequences sharded across processes (context
parallelism, :mod:`linattn_cuda.distributed`): ``torchrun --standalone --nproc_per_node 2 -m experiments.lm_cp train``.
See experiments/README_lm_cp.md."""
