"""longax.layers."""
