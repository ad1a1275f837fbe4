"""Mosaic GPU (Hopper) kernels: one file per op family, registered as impl="pallas"."""
