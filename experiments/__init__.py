"""Experiments reproduced from the course (see shared SPEC §3). Each lives in its own sub-package."""
