"""Analyses as small pure functions over tensors and moments."""
