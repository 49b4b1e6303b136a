"""Scripts and helpers for tests, benchmarks, training and data (not part of the wheel)."""
