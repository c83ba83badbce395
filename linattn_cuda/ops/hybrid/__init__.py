"""Hybrid attention: exact softmax inside a sliding window, the Taylor weight beyond it, one normalizer."""
