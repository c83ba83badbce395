"""A small causal byte-level language model on real English text, with softmax, Taylor or hybrid attention.

``python -m experiments.lm {train,report,generate} ...`` (see :mod:`.__main__` and ``experiments/README_lm.md``).
One concern per module: :mod:`.data` (corpus, split, windows), :mod:`.model` (the transformer and its
attention kinds), :mod:`.train` (AdamW, evaluation, checkpoints, resume), :mod:`.report` (tables and plots),
:mod:`.generate` (greedy or sampled generation with each kind's decoding cache).
"""
