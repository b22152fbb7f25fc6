"""Script experiments and studies in Python: a typed config and ``run(config, rundir)``.

An experiment file under ``experiments/`` either sets ``CONFIG = ExperimentConfig(...)`` (the continual
family, run by :func:`run_experiment`) or defines

* ``CONFIG``: an instance of a frozen dataclass, its full-size settings (``--set key=value`` overrides a
  field, dotted for nested dataclasses; a ``validate(self)`` method, if the class has one, raises
  ``ConfigError`` naming a bad field, and runs after every override, before anything is written);
* ``QUICK``: a list of ``key=value`` overrides that make the small ``--quick`` version;
* ``run(config, rundir)``: runs it into a :class:`RunDir`, skipping parts that ``rundir.done(part)``
  says are finished and resuming within a part from ``rundir.checkpoints(part)``.

:func:`run_study` runs any such ``run`` function, so a study written in Python (its own model, strategy
or sweep) writes the same run directory as the CLI.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nestlearn._errors import ConfigError
from nestlearn.experiment._config import check_values, override
from nestlearn.experiment._rundir import RunDir


def quick_config(config: Any, quick: list[str] | tuple[str, ...]) -> Any:
    """``config`` shrunk by the ``QUICK`` overrides of an experiment."""
    return override(config, list(quick))


def run_study(
    run: Callable[[Any, RunDir], Any],
    config: Any,
    out: str | Path,
    *,
    experiment: str | None = None,
    quick: bool = False,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> RunDir:
    """Runs ``run(config, rundir)`` into the run directory ``out`` and marks it complete.

    Args:
      run: the study, ``run(config, rundir)``; it writes results and figures through ``rundir``.
      config: a frozen dataclass instance, stored in ``config.json`` (and compared on resume); its
        ``validate()`` method, if it has one, is called first.
      out: the run directory.
      experiment: the name stored with the config.
      quick: mark the run as a quick one (paper figures refuse it unless told otherwise).
      resume: continue an unfinished run of the same config (see :meth:`RunDir.create`).
        A study preempted by SIGTERM (its :func:`nestlearn.engine.run_chunks` loops raise
        :class:`~nestlearn.Preempted` after a checkpoint) continues this way.
      force: replace an existing directory.
      log: where progress messages go (default: stderr).

    Returns:
      The :class:`RunDir`, complete.

    Example:
      >>> import dataclasses, tempfile, pandas as pd
      >>> @dataclasses.dataclass(frozen=True)
      ... class Sweep:
      ...     lrs: tuple[float, ...] = (0.1, 0.3)
      >>> def study(config, rundir):
      ...     rundir.write_table("final", pd.DataFrame({"lr": config.lrs, "loss": [1.0, 0.5]}))
      >>> rd = run_study(study, Sweep(), tempfile.mkdtemp() + "/sweep", experiment="sweep")
      >>> rd.complete, rd.read_table("final")["loss"].tolist()
      (True, [1.0, 0.5])
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ConfigError(f"experiment {experiment!r}: CONFIG must be a dataclass instance, got {config!r}")
    check_values(config)
    if callable(getattr(config, "validate", None)):
        config.validate()
    rundir = RunDir.create(
        out, config, experiment=experiment, quick=quick, resume=resume, force=force, log=log
    )
    from nestlearn.engine import _preempt

    with _preempt.handling():  # SIGTERM: the run's loops stop at the next chunk with a checkpoint
        run(config, rundir)
    if not rundir.complete:
        rundir.mark_complete()
    return rundir
