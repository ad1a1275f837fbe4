"""longax.configs."""
