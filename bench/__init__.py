"""Benchmarks that print figures; run them by hand, never as part of the test suite."""
