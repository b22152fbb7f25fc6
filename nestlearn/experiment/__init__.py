"""Experiments: typed configs, run directories, checkpoint and resume, the CLI."""

from nestlearn.experiment._config import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    SweepConfig,
    TrainSpec,
    from_dict,
    override,
    to_dict,
    validate,
)
from nestlearn.experiment._run import RunOutput, build_learner, build_stream, run_experiment, write_figures
from nestlearn.experiment._rundir import load_result, save_result, tidy_tables

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimConfig",
    "RunOutput",
    "SweepConfig",
    "TrainSpec",
    "build_learner",
    "build_stream",
    "from_dict",
    "load_result",
    "override",
    "run_experiment",
    "save_result",
    "tidy_tables",
    "to_dict",
    "validate",
    "write_figures",
]
