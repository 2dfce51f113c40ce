"""Allocation: cost table + budget + strategy -> Plan."""

from .budget import SCOPES, Budget
from .heuristic import RULES
from .plan import Plan, allocate, load_plan
from .sensitivity import add_kl_scaled
from .solvers import Problem, greedy, ilp, random_split, uniform

STRATEGIES = ("uniform", "greedy", "heuristic", "ilp", "evolution")

__all__ = ["Budget", "Plan", "Problem", "RULES", "SCOPES", "STRATEGIES", "add_kl_scaled", "allocate", "greedy", "ilp",
           "load_plan", "random_split", "uniform"]
