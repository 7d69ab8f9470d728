"""Benchmarks: each prints a table, writes JSON, and compares against a baseline in the same run."""
