"""Evaluation: perplexity, task scores, before/after, interference, attribution, go / no-go rules."""
