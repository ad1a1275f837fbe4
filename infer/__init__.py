"""longax.infer."""
