"""Critiques into revisions: candidate generation and selection, the likelihood judge, similarity, guidelines."""
