"""Benchmarks: the machine's own peaks and end-to-end runs."""
