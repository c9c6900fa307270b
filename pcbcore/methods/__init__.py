"""The registry of merge methods: one explicit line per method, name → `MergeMethod`."""

from pcbcore.methods import dare, linear, pcb, task_arithmetic, ties
from pcbcore.methods.base import MergeMethod, combine, lambdas_of

METHODS: dict[str, MergeMethod] = {
    "linear": linear.METHOD,
    "task_arithmetic": task_arithmetic.METHOD,
    "ties": ties.METHOD,
    "dare_linear": dare.DARE_LINEAR,
    "dare_ties": dare.DARE_TIES,
    "pcb": pcb.METHOD,
}

__all__ = ["METHODS", "MergeMethod", "combine", "lambdas_of"]
