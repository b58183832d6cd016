"""Benchmarks (`make bench`). Not tests: they measure, print a table and check stated targets."""
