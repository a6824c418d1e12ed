"""Benchmarks of distckpt (see benchmarks/README.md)."""
