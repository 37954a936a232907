"""Benchmarks of sglang-crosspool: trace generation, HTTP replay, the pool-mode experiment.

Run the tools from the repository root as modules, e.g. `python -m benchmark.experiment`.
"""
