"""Benchmarks run by hand (`python -m tests.bench.booking`); pytest never collects them."""
