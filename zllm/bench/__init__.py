"""Benchmarks: programs that print a table, write JSON and append to docs/benchmarks.md."""
