"""Experiments: typed configs, run directories, checkpoint and resume, the CLI.

Public run-directory API (a study in Python writes what ``nestlearn run`` writes):

* :class:`RunDir`: ``config.json``, ``results/`` tables and arrays, ``figures/``, ``checkpoints/``
  (``engine.Checkpoints``), finished parts and ``status.json``; created with resume/force semantics.
* :func:`run_study`: runs ``run(config, rundir)`` for a frozen dataclass config, the contract of a
  script experiment (``CONFIG``, ``QUICK``, ``run``) in ``experiments/``.
* :func:`run_experiment`: the continual family (``CONFIG = ExperimentConfig(...)``).
"""

from nestlearn.experiment._cli import load_experiment
from nestlearn.experiment._config import (
    REGISTRY,
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
from nestlearn.experiment._livelog import LiveLog, both, read_live, run_label, tail_live
from nestlearn.experiment._run import (
    RunOutput,
    build_learner,
    build_stream,
    representative,
    run_experiment,
    swept_key,
    write_figures,
)
from nestlearn.experiment._rundir import (
    RunDir,
    atomic_write,
    load_result,
    save_figure,
    save_result,
    tidy_tables,
    write_json,
    write_tables,
)
from nestlearn.experiment._study import quick_config, run_study

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "LiveLog",
    "ModelConfig",
    "OptimConfig",
    "REGISTRY",
    "RunDir",
    "RunOutput",
    "SweepConfig",
    "TrainSpec",
    "atomic_write",
    "both",
    "build_learner",
    "build_stream",
    "from_dict",
    "load_experiment",
    "load_result",
    "override",
    "quick_config",
    "read_live",
    "representative",
    "run_experiment",
    "run_label",
    "run_study",
    "save_figure",
    "save_result",
    "swept_key",
    "tail_live",
    "tidy_tables",
    "to_dict",
    "validate",
    "write_figures",
    "write_json",
    "write_tables",
]
