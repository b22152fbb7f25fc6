"""Continual-learning metrics of the accuracy matrix ``R[..., i, j]``, one function per convention."""

from nestlearn.metrics._matrix import (
    average_accuracy,
    backward_transfer,
    backward_transfer_continuum,
    forgetting,
    forgetting_avalanche,
    forgetting_mammoth,
    forward_transfer,
    learning_accuracy,
    summary,
)
from nestlearn.metrics._plasticity import dead_unit_fraction, effective_rank, stable_rank, weight_magnitude
from nestlearn.metrics._tradeoff import pareto_front, tradeoff_points

__all__ = [
    "dead_unit_fraction",
    "effective_rank",
    "stable_rank",
    "weight_magnitude",
    "average_accuracy",
    "backward_transfer",
    "backward_transfer_continuum",
    "forgetting",
    "forgetting_avalanche",
    "forgetting_mammoth",
    "forward_transfer",
    "learning_accuracy",
    "pareto_front",
    "summary",
    "tradeoff_points",
]
