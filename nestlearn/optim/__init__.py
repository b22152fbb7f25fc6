"""Multi-timescale optimizers as optax transforms: the level clock, per-group update periods (the CMS
rule), N-level fast/slow consolidation, delta and deep momentum, Delta Gradient Descent and M3.

The momentum-style optimizers come as direction-only ``scale_by_*`` transforms and as their
``optax.chain(scale_by_*(...), optax.scale_by_learning_rate(lr))`` aliases, so learning-rate schedules compose."""

from nestlearn.optim._clock import LevelClock, clock_timeline, level_clock
from nestlearn.optim._consolidation import (
    ConsolidationState,
    LevelParams,
    SlowLevelsState,
    consolidate,
    consolidated_params,
    consolidation,
    consolidation_in_state,
)
from nestlearn.optim._delta_gd import DeltaGDState, delta_gradient_descent, delta_gradient_step
from nestlearn.optim._m3 import M3State, m3, orthogonalize, scale_by_m3
from nestlearn.optim._momentum import (
    DeepMomentumState,
    DeltaMomentumState,
    deep_momentum,
    delta_momentum,
    momentum_mlp,
    scale_by_deep_momentum,
    scale_by_delta_momentum,
)
from nestlearn.optim._periodic import PeriodicState, period_schedule, periodic

__all__ = [
    "ConsolidationState",
    "DeepMomentumState",
    "DeltaGDState",
    "DeltaMomentumState",
    "LevelClock",
    "LevelParams",
    "M3State",
    "PeriodicState",
    "SlowLevelsState",
    "clock_timeline",
    "consolidate",
    "consolidated_params",
    "consolidation",
    "consolidation_in_state",
    "deep_momentum",
    "delta_gradient_descent",
    "delta_gradient_step",
    "delta_momentum",
    "level_clock",
    "m3",
    "momentum_mlp",
    "orthogonalize",
    "period_schedule",
    "periodic",
    "scale_by_deep_momentum",
    "scale_by_delta_momentum",
    "scale_by_m3",
]
