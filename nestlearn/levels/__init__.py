"""Levels, the nested-loop abstraction: MAML, Reptile, Lookahead and the CMS rule as configurations.

A :class:`Level` names the parameters it owns, its optimizer, its period and how it learns from the
level below (``"gradient"`` from the data, ``"unroll"``, ``"first_order"`` or ``"consolidate"``). A
:class:`Nested` program is a tuple of levels, fastest first, a loss and a data schedule (:class:`Stream`
or :class:`Tasks`), run as nested ``lax.scan``\\ s over pytree state (:class:`NestedState`), with per-level
:class:`Telemetry`. :class:`NestedTrainer` runs a program for many runs (seeds x hyperparameters)
in chunks on :class:`nestlearn.engine.Engine`.
"""

from nestlearn.levels._level import LEARNS_BY, Level, Stream, Tasks
from nestlearn.levels._nested import LevelState, Nested, NestedState, Telemetry
from nestlearn.levels._trainer import NestedTrainer, NestedTrainState

__all__ = [
    "LEARNS_BY",
    "Level",
    "LevelState",
    "Nested",
    "NestedState",
    "NestedTrainState",
    "NestedTrainer",
    "Stream",
    "Tasks",
    "Telemetry",
]
