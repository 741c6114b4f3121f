"""Benchmarks (run as scripts: ``python bench/throughput.py``)."""
