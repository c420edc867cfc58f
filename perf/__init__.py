"""Benchmarks; each writes a CSV and a plot to artifacts/."""
