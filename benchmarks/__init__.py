"""keras-lora benchmarks: step-time, memory and lifecycle ratios.

`python benchmarks/run.py` runs everything and writes `docs/benchmarks.md`.
"""
