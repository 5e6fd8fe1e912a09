"""Benchmarks of diffkd against the baselines a user would otherwise run (see benchmarks/README in the main README).

Run the scripts directly (``python benchmarks/bench_ddim.py``) or as modules (``python -m benchmarks.bench_ddim``);
both work from the repository root.
"""
