"""Verifier consumers: reward functions, signing, publishing rewards."""
