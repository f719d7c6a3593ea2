"""Benchmark suite of dancegrpo: fused ops per backend and size, and the trainer end to end.

Run everything with `python -m bench` (add --short for a quick pass); see bench/README.md.
"""
