"""Pieces both experiments share: resumable verified downloads, cross-process file locks, expected errors."""
