"""longax.infer: generation over the decode cache. CLI: `python -m longax.infer`."""

from longax.infer.generate import generate, sample

__all__ = ["generate", "sample"]
