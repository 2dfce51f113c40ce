"""Measuring model quality: perplexity and divergence from a reference model."""

from .metrics import ComparisonResult, PerplexityResult, compare_to_reference, perplexity

__all__ = ["ComparisonResult", "PerplexityResult", "compare_to_reference", "perplexity"]
