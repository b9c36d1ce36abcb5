"""Experiments that reproduce the paper's tables in miniature."""
