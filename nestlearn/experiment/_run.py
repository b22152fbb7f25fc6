"""Running an experiment into a run directory: build, compile once, checkpoint per task, resume exactly.

The host loop calls the compiled task program once per (strategy, task). After each call it saves an
Orbax checkpoint holding the run state and the results recorded so far, so a killed run resumes from its
last finished task and ends with results identical to an uninterrupted one.

Checkpoint ``k`` of a run holds ``k`` finished tasks (counted over the strategies in order). A preemption
notice (SIGTERM) stops the run at the next evaluation chunk, even inside a task: checkpoint ``k + 1`` then
holds task ``k + 1`` part-done (the state after the chunk, and the task's evaluations and losses so far),
and :class:`~nestlearn.Preempted` is raised; ``resume=True`` continues that task from the chunk, and the
task's end replaces the part-done checkpoint. In a multi-process run every process runs this loop on its
shards of the runs; process 0 alone writes and logs.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from nestlearn import continual, engine, nn, tasks
from nestlearn._errors import ConfigError, Preempted
from nestlearn.continual import Learner, Recorder, StreamResult, TrainConfig
from nestlearn.continual._engine import task_progress
from nestlearn.experiment import _rundir
from nestlearn.experiment._config import ExperimentConfig, validate
from nestlearn.experiment._livelog import LiveLog, both


def strategy_and_sweep(
    config: ExperimentConfig, name: str
) -> tuple[continual.Strategy, dict[str, tuple[float, ...]]]:
    """The strategy a config names, with its hyperparameters from the config section of the same name
    (``config.ewc`` for ``"ewc"``) when it has one, and the values to sweep (``config.sweep.<name>``)."""
    strategy = getattr(config, name)
    values = tuple(getattr(config.sweep, name, ()) or ())
    if not values:
        return strategy, {}
    field = getattr(type(strategy), "strength", None)
    if field is None:
        raise ConfigError(f"sweep.{name}: strategy {name!r} has no hyperparameter to sweep")
    return strategy, {field: values}


def build_stream(config: ExperimentConfig) -> tasks.TaskStream:
    """The task stream a config names (loads data; raises ConfigError or DataError on bad input)."""
    d = config.data
    path = d.mnist_path or None
    if d.stream == "permuted_mnist":
        return tasks.permuted_mnist(d.n_tasks, seed=d.seed, path=path)
    if d.stream == "rotated_mnist":
        return tasks.rotated_mnist(d.n_tasks, seed=d.seed, path=path)
    if d.stream == "split_mnist":
        return tasks.split_mnist(d.scenario, d.n_tasks, path=path)
    return tasks.split_digits(d.scenario, d.n_tasks, seed=d.seed)


def build_optimizer(config: ExperimentConfig) -> optax.GradientTransformation:
    o = config.optim
    if o.name == "sgd":
        return optax.sgd(o.lr, momentum=o.momentum or None)
    return optax.adam(o.lr)


def train_config(config: ExperimentConfig, stream: tasks.TaskStream) -> TrainConfig:
    t = config.train
    steps = t.steps_per_task or continual.steps_for_epochs(
        t.epochs, int(np.max(stream.train_n)), t.batch_size
    )
    return TrainConfig(
        steps_per_task=steps,
        batch_size=t.batch_size,
        evals_per_task=t.evals_per_task,
        reset_optimizer=config.optim.reset_per_task,
        blowup=t.blowup,
    )


def build_learner(config: ExperimentConfig, stream: tasks.TaskStream, strategy: str) -> Learner:
    m = config.model

    def model(rngs: nnx.Rngs) -> nn.MLP:
        return nn.MLP(stream.input_dim, m.hidden, stream.n_classes, init=m.init, rngs=rngs)

    instance, _ = strategy_and_sweep(config, strategy)
    return Learner(model, build_optimizer(config), instance, train_config(config, stream))


_LEARNERS: collections.OrderedDict = collections.OrderedDict()


def _cached_learner(config: ExperimentConfig, stream: tasks.TaskStream, strategy: str) -> Learner:
    """:func:`build_learner`, kept for the last few (config, strategy) pairs: a run repeated in one
    process (a resumed run, a notebook's rerun, a preemption drill) reuses its compiled programs."""
    key = (config, strategy, stream.name, stream.n_tasks, stream.input_dim, stream.n_classes)
    try:
        learner = _LEARNERS.pop(key)
    except (KeyError, TypeError):  # TypeError: a config holding something unhashable is not kept
        learner = build_learner(config, stream, strategy)
    try:
        _LEARNERS[key] = learner
    except TypeError:
        return learner
    while len(_LEARNERS) > 4:
        _LEARNERS.popitem(last=False)
    return learner


@dataclasses.dataclass(frozen=True)
class RunOutput:
    """Where a run wrote its outputs, and its results per strategy."""

    directory: Path
    results: dict[str, StreamResult]
    tables: dict[str, Path]
    figures: list[Path]


def run_experiment(
    config: ExperimentConfig,
    out: str | Path,
    *,
    experiment: str = "experiment",
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    make_figures: bool = True,
    progress: bool | None = None,
    quick: bool = False,
) -> RunOutput:
    """Runs every strategy of ``config`` for every seed and writes the run directory.

    Validates the config and loads the data before writing anything. With ``resume`` it continues from
    the last checkpoint of ``out``. ``progress`` shows a progress line with an ETA after every chunk
    (``None``: unless ``NESTLEARN_PROGRESS=0``); a line per finished task is logged either way.
    ``quick`` marks the run directory as a quick run (see :class:`RunDir`). ``out`` may be local or on
    an object store (``gs://bucket/run``).

    SIGTERM during the run is a preemption notice (:mod:`nestlearn.engine._preempt`): the run stops at
    the next evaluation chunk with a checkpoint and raises :class:`~nestlearn.Preempted`; ``resume``
    then continues it bit-identically.
    """
    log = log or _log_primary
    config = validate(config)
    stream = build_stream(config)
    seeds = list(range(config.first_seed, config.first_seed + config.seeds))
    for name in config.strategies:  # every strategy's runs checked (strengths, sweeps, model fit) first
        sweep = strategy_and_sweep(config, name)[1]
        runs = engine.run_grid(seeds, sweep)
        build_learner(config, stream, name).abstract_state(
            stream, [r["seed"] for r in runs], {k: [r[k] for r in runs] for k in sweep}
        )
    rundir = _rundir.RunDir.create(
        out, config, experiment=experiment, quick=quick, resume=resume, force=force
    )
    out = rundir.path
    n_tasks = stream.n_tasks
    total_units = n_tasks * len(config.strategies)
    results: dict[str, StreamResult] = {}
    live = _live_log(out)
    with engine.preemption.handling(), rundir.checkpoints() as manager, contextlib.closing(live):
        latest = manager.latest() if resume else None
        start = time.perf_counter()
        units_run = 0
        for si, name in enumerate(config.strategies):
            result_file = out / "results" / f"{name}.npz"
            if resume and result_file.exists() and latest is not None and latest >= (si + 1) * n_tasks:
                results[name] = _rundir.load_result(result_file)
                log(f"[{name}] already complete, loaded {result_file}")
                continue
            learner = _cached_learner(config, stream, name)
            sweep = strategy_and_sweep(config, name)[1]
            runs = engine.run_grid(seeds, sweep)
            hparams = {k: [r[k] for r in runs] for k in sweep}
            mesh = engine.run_mesh(len(runs)) if jax.device_count() > 1 else None
            recorder = Recorder(learner.config, stream, runs)
            first_task, partial = 0, None
            if latest is not None and latest > si * n_tasks:
                state, recorder.arrays = _restore(
                    manager, latest, learner, stream, runs, hparams, mesh, recorder
                )
                first_task = int(recorder.arrays["tasks_done"])
                partial = recorder.partial(first_task)
                if partial is None:
                    log(f"[{name}] resumed after task {first_task}/{n_tasks} from checkpoint {latest}")
                else:
                    log(
                        f"[{name}] resumed inside task {first_task + 1}/{n_tasks}, after chunk "
                        f"{len(partial[1])}/{len(learner.config.eval_steps)}, from checkpoint {latest}"
                    )
            else:
                state = learner.init(stream, [r["seed"] for r in runs], mesh, hparams)
                recorder.record_init(learner.evaluate(state, stream))
            steps = learner.config.steps_per_task
            live.section(name, runs)
            if first_task == 0 and partial is None:
                live.evaluation(step=0, acc=recorder.arrays["acc_init"], task=-1)
            bar = engine.Progress(n_tasks * steps, name, enabled=progress)
            for task in range(first_task, n_tasks):
                report = task_progress(bar, task, n_tasks, steps)
                unit = si * n_tasks + task + 1  # the checkpoint that holds this task

                stop_inside = _stop_inside(manager, recorder, unit, f"task {task + 1}/{n_tasks} of {name!r}")
                state, task_out = learner.run_task(
                    state,
                    stream,
                    task,
                    on_chunk=both(report, live.task_chunks(task, steps)),
                    between_chunks=stop_inside,
                    partial=partial if task == first_task else None,
                )
                recorder.record_task(task, task_out, state.diverged_step)
                live.evaluation(
                    step=(task + 1) * steps, acc=recorder.arrays["acc_matrix"][:, task], task=task
                )
                manager.save(unit, state, recorder.arrays, replace=partial is not None and task == first_task)
                units_run += 1
                done = unit
                elapsed = time.perf_counter() - start
                eta = elapsed / units_run * (total_units - done)
                diverged = int((recorder.arrays["diverged_step"] >= 0).sum())
                note = f" · {diverged} of {len(runs)} runs diverged" if diverged else ""
                log(
                    f"[{name}] task {task + 1}/{n_tasks} · {done}/{total_units} done · "
                    f"elapsed {elapsed:.1f}s · ETA {eta:.1f}s · mean acc "
                    f"{recorder.arrays['acc_matrix'][:, task, : task + 1].mean():.3f}{note}"
                )
                if done < total_units and engine.preemption.requested():
                    raise Preempted(
                        f"preempted ({_notice()}) after task {task + 1}/{n_tasks} of {name!r}; checkpoint "
                        f"{done} saved in {manager.directory}",
                        step=done,
                    )
            results[name] = recorder.result()
            _rundir.save_result(result_file, results[name])
        manager.wait()
    table_paths = rundir.write_tidy_tables(results)
    figures = (
        write_figures(rundir.figures, results) if make_figures and engine.distributed.is_primary() else []
    )
    rundir.mark_complete(strategies=list(results))
    for name, r in results.items():
        log_summary(name, r, log)
    return RunOutput(directory=out, results=results, tables=table_paths, figures=figures)


def _stop_inside(manager, recorder: Recorder, unit: int, where: str) -> Callable:
    """The ``between_chunks`` of a task: on a preemption notice, checkpoint the task part-done and stop."""

    def stop(k, state, curve, spans) -> None:
        if engine.preemption.requested():
            task = int(recorder.arrays["tasks_done"])
            recorder.record_chunks(task, curve, spans)
            manager.save(unit, state, recorder.arrays, replace=True)
            n = len(recorder.config.eval_steps)
            raise Preempted(
                f"preempted ({_notice()}) inside {where}, after chunk {k + 1}/{n}; checkpoint {unit} saved "
                f"in {manager.directory}",
                step=unit,
            )

    return stop


def _log_primary(message: str) -> None:
    """Standard error, from process 0 only."""
    if engine.distributed.is_primary():
        print(message, file=sys.stderr, flush=True)


def _notice() -> str:
    return engine.preemption.notice() or "SIGTERM to another process"


class _NoLiveLog:
    """Stands in for :class:`LiveLog` where none is written (other processes, object-store run directories)."""

    def section(self, *args, **kwargs):
        return self

    def evaluation(self, **kwargs):
        return None

    def task_chunks(self, *args, **kwargs):
        return None

    def close(self):
        return None


def _live_log(out) -> LiveLog | _NoLiveLog:
    """``<out>/live.jsonl`` (and TensorBoard files when tensorboardX is installed), written by process 0 as
    the run goes; an object store cannot append, so a ``gs://`` run directory has none."""
    if not engine.distributed.is_primary() or engine.storage.is_uri(out):
        return _NoLiveLog()
    return LiveLog(out)


def log_summary(name: str, result: StreamResult, log: Callable[[str], None]) -> None:
    """One line per strategy (per swept value in a sweep): final average accuracy over the runs that did
    not diverge, mean ± s.e.m. over seeds, and a DIVERGED line naming every diverged run and its step."""
    key = swept_key(result)
    values = [None] if key is None else list(dict.fromkeys(run[key] for run in result.runs))
    for value in values:
        rows = [i for i, run in enumerate(result.runs) if key is None or run[key] == value]
        label = name if key is None else f"{name} {key}={value:g}"
        diverged = [i for i in rows if result.diverged[i]]
        ok = [i for i in rows if not result.diverged[i]]
        if ok:
            acc = result.acc_matrix[ok, -1].mean(-1)
            sem = acc.std(ddof=1) / np.sqrt(acc.size) if acc.size > 1 else 0.0
            log(f"[{label}] final average accuracy {acc.mean():.4f} ± {sem:.4f} (s.e.m., {acc.size} seeds)")
        if diverged:
            runs = ", ".join(
                f"seed {result.runs[i]['seed']} at step {int(result.diverged_step[i])}" for i in diverged
            )
            log(f"[{label}] DIVERGED ({len(diverged)} of {len(rows)} runs, left out of the mean): {runs}")


def _restore(manager, step, learner, stream, runs, hparams, mesh, recorder):
    abstract_state = learner.abstract_state(stream, [r["seed"] for r in runs], hparams)
    if mesh is not None:
        sharding = engine.run_sharding(mesh)
        abstract_state = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract_state
        )
    return manager.restore(step, abstract_state, recorder.arrays)


def swept_key(result: StreamResult) -> str | None:
    """The hyperparameter a result was swept over (a key of its runs other than the seed), if any."""
    keys = [k for k in result.runs[0] if k != "seed"]
    return keys[0] if keys else None


def representative(name: str, result: StreamResult) -> tuple[str, StreamResult]:
    """A swept result's best value by final average accuracy (diverged runs excluded), for curve panels."""
    key = swept_key(result)
    if key is None:
        return name, result
    best, best_acc = None, -np.inf
    for (value,), group in result.groups(key).items():
        ok = ~group.diverged
        acc = group.acc_matrix[ok, -1].mean() if ok.any() else -np.inf
        if acc > best_acc:
            best, best_acc = value, acc
    return f"{name} ({key}={best:g}, best of the sweep)", result.select(**{key: best})


def write_figures(directory: Path, results: dict[str, StreamResult]) -> list[Path]:
    """Forgetting curves, average accuracy, accuracy matrices and, with sweeps, the trade-off plane."""
    import matplotlib.pyplot as plt

    from nestlearn import metrics, plot

    shown = dict(representative(name, r) for name, r in results.items())
    paths = []
    with plot.style():
        n = len(shown)
        fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 2.8), sharey=True, squeeze=False)
        for k, (ax, (name, r)) in enumerate(zip(axes[0], shown.items())):
            plot.forgetting_curves(r, ax=ax, legend=k == n - 1)
            ax.set_title(name)
        paths += _rundir.save_figure(fig, directory / "forgetting_curves")
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(3.4, 2.6))
        for name, r in shown.items():
            plot.average_accuracy_curve(r, ax=ax, label=name)
        ax.legend()
        paths += _rundir.save_figure(fig, directory / "average_accuracy")
        plt.close(fig)
        for (name, r), title in zip(shown.items(), results):
            fig, ax = plt.subplots(figsize=(3.6, 3.2))
            plot.accuracy_matrix(r.acc_matrix[~r.diverged], ax=ax, task_names=r.task_names, title=name)
            paths += _rundir.save_figure(fig, directory / f"accuracy_matrix_{title}")
            plt.close(fig)
        swept = {name: swept_key(r) for name, r in results.items() if swept_key(r)}
        if swept and results[next(iter(results))].n_tasks >= 2:
            fig, ax = plt.subplots(figsize=(4.5, 3.4))
            plot.stability_plasticity(metrics.tradeoff_points(results, swept=swept), ax=ax)
            paths += _rundir.save_figure(fig, directory / "stability_plasticity")
            plt.close(fig)
    return paths
