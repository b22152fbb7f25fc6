"""Continual learning: the compiled engine and the strategies it runs."""

from nestlearn.continual._engine import (
    Learner,
    Recorder,
    RunState,
    TaskOutput,
    TrainConfig,
    masked_cross_entropy,
    seed_mesh,
    seed_sharding,
    steps_for_epochs,
    sweep_runs,
)
from nestlearn.continual._result import StreamResult
from nestlearn.continual._strategy import Batch, Context, Joint, Naive, Strategy

__all__ = [
    "Batch",
    "Context",
    "Joint",
    "Learner",
    "Naive",
    "Recorder",
    "RunState",
    "Strategy",
    "StreamResult",
    "TaskOutput",
    "TrainConfig",
    "masked_cross_entropy",
    "seed_mesh",
    "seed_sharding",
    "steps_for_epochs",
    "sweep_runs",
]
