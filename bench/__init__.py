"""Benchmarks: side-by-side measurements that print tables (never timed unit tests)."""
