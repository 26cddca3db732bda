"""Measuring: activation capture, row alignment, CKA, linear algebra, the token budget."""
