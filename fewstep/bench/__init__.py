"""Benchmarks and analytic references."""
