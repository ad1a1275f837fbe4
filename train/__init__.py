"""longax.train."""
