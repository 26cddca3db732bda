"""Shared ground: errors, strict JSON, progress, typed parameters, paths, outputs, data files."""
