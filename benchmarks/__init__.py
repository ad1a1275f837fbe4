"""longax.benchmarks."""
