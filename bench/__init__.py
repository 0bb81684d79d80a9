"""Benchmark harness of gpuad: ``python -m bench --help`` from the repository root.

Modules: ``ops`` (op cases, inputs, counting, checks, implementations), ``harness``
(devices, ceilings, timing, records, table), ``plot`` (one PNG per op), ``__main__`` (CLI).
"""
