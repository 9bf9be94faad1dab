"""``c2c-bench``: times C2C fusion per backend against the research-style eager fuser.

Run ``c2c-bench`` (or ``python -m c2c_kernels.bench``) with ``--help`` for the options;
docs/benchmarks.md explains the numbers. The modules: ``workloads`` (inputs and cost model),
``runners`` (contenders and the correctness check), ``timing``, ``peaks``, ``run`` (the loop),
``report`` (table, JSON, plot), ``cli``.
"""
from .cli import main

__all__ = ["main"]
