"""Measuring model quality and size: perplexity, divergence from a reference, measured bytes."""

from .footprint import Footprint, active_params, measure_footprint
from .metrics import ComparisonResult, PerplexityResult, compare_to_reference, perplexity
from .report import EvalReport, evaluate

__all__ = [
    "ComparisonResult",
    "EvalReport",
    "Footprint",
    "active_params",
    "PerplexityResult",
    "compare_to_reference",
    "evaluate",
    "measure_footprint",
    "perplexity",
]
