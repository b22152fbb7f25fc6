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

__all__ = [
    "average_accuracy",
    "backward_transfer",
    "backward_transfer_continuum",
    "forgetting",
    "forgetting_avalanche",
    "forgetting_mammoth",
    "forward_transfer",
    "learning_accuracy",
    "summary",
]
