"""Benchmark harness and the fake upstream it (and the test suite) drives."""
