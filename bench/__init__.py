"""Benchmarks of linattn_cuda: scaling suites (pytest-benchmark), results tables and plots, the Q1 analysis.

    python -m bench.scaling --device cpu        # suite + bench/results/cpu_scaling.{json,md,png}
    python -m bench.q1_analysis                 # feature counts, Taylor-vs-softmax error, fitted exponents
    bash bench/gpu_check.sh                     # everything GPU-side in one script (see its header)
"""
