"""Benchmarks layer: real Teachers shipped by optional packages, and what runs on them."""
