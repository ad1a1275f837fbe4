"""longax.models."""
