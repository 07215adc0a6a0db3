"""Benchmarks, each run as a module, such as `python -m bench.delivery`."""
