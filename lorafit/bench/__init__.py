"""Benchmarks: the original pipeline re-created faithfully, timed against lorafit's own trainer."""
