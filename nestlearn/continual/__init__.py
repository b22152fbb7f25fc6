"""Continual learning: the compiled engine and the strategies it runs."""

from nestlearn.continual._cms import FastSlow, FastSlowState, nested_cms
from nestlearn.continual._engine import (
    Learner,
    Recorder,
    RunState,
    TaskOutput,
    TrainConfig,
    steps_for_epochs,
)
from nestlearn.continual._memory import (
    AGEM,
    DERPP,
    EpisodicMemory,
    Replay,
    ReservoirBuffer,
    agem_project,
    reservoir_add,
    reservoir_init,
    reservoir_sample,
)
from nestlearn.continual._online import OnlineResult, run_online_regression
from nestlearn.continual._plasticity import ContinualBackprop, ShrinkAndPerturb, WeightInterpolation
from nestlearn.continual._regularization import EWC, MAS, SI, L2Init, LwF
from nestlearn.continual._result import StreamResult
from nestlearn.continual._strategy import Batch, Context, Joint, Naive, Strategy

__all__ = [
    "AGEM",
    "DERPP",
    "EWC",
    "MAS",
    "SI",
    "ContinualBackprop",
    "EpisodicMemory",
    "L2Init",
    "LwF",
    "OnlineResult",
    "Replay",
    "ReservoirBuffer",
    "ShrinkAndPerturb",
    "WeightInterpolation",
    "agem_project",
    "reservoir_add",
    "reservoir_init",
    "reservoir_sample",
    "run_online_regression",
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
    "steps_for_epochs",
]
__all__ += ["FastSlow", "FastSlowState", "nested_cms"]
