"""Benchmark, profiling and study scripts (not tests). Run each from the repository root as a module, e.g.

    python -m benchmarks.bench_scan_gpu --out scan_gpu.json

so that it imports this checkout's `nnunet_segmamba` and its sibling scripts (`from benchmarks.bench_scan_gpu
import ...`) with no sys.path edits.
"""
