"""The compiled continual-learning engine: one program per task, called once per task of the stream.

Inside the program, a task's optimizer steps run under ``lax.scan`` in chunks of ``eval_every`` steps,
each chunk followed by an evaluation of every task of the stream (forgetting curves at step resolution);
seeds are a leading ``vmap`` axis, sharded over the devices of a ``Mesh``. The task index is a traced
argument, so the same compiled program serves every task; between calls the host may checkpoint, report
progress and write results. Nothing here loops over steps in Python.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from nestlearn._errors import ConfigError
from nestlearn.continual._result import StreamResult
from nestlearn.continual._strategy import Batch, Context, Params, Strategy
from nestlearn.tasks._stream import TaskStream


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How each task is trained.

    Attributes:
      steps_per_task: optimizer steps on each task. Batches walk through the task's examples in
        reshuffled epochs, so ``ceil(epochs * n_train / batch_size)`` steps is ``epochs`` passes.
      batch_size: examples per step.
      eval_every: evaluate every task of the stream every this many steps inside a task (and always at a
        task's end); ``None`` evaluates only at task ends.
      reset_optimizer: re-initialise the optimizer state (momenta) at the start of every task.
    """

    steps_per_task: int
    batch_size: int
    eval_every: int | None = None
    reset_optimizer: bool = False

    def __post_init__(self):
        for name in ("steps_per_task", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.eval_every is not None and (not isinstance(self.eval_every, int) or self.eval_every <= 0):
            raise ConfigError(f"eval_every must be a positive integer or None, got {self.eval_every!r}")

    @property
    def evals_inside_task(self) -> int:
        """Evaluation points strictly inside a task (the end-of-task evaluation is separate)."""
        if self.eval_every is None:
            return 0
        return (self.steps_per_task - 1) // self.eval_every


def steps_for_epochs(epochs: float, n_train: int | TaskStream, batch_size: int) -> int:
    """Steps that make ``epochs`` passes over ``n_train`` examples in batches of ``batch_size``.

    ``n_train`` may be a stream, whose largest task is used.
    """
    if isinstance(n_train, TaskStream):
        n_train = int(np.max(np.asarray(n_train.train_n)))
    return max(1, math.ceil(epochs * n_train / batch_size))


STEP_STREAM = 0x5EED  # folded into a run's key to derive per-step keys apart from per-task keys


class RunState(flax.struct.PyTreeNode):
    """Everything a run carries from one task to the next; a pytree, so it checkpoints, vmaps and shards.

    Attributes:
      params: model parameters (an ``nnx.State``).
      opt_state: the optax optimizer state.
      strategy: the strategy itself, a pytree whose leaves are its hyperparameters, so that a sweep
        gives every run its own values (vmapped, sharded and checkpointed with the rest).
      opt_hparams: the optimizer hyperparameters a sweep sets in an ``optax.inject_hyperparams``
        state, re-applied whenever the optimizer state is re-initialised (``{}`` otherwise).
      strategy_state: the strategy's state.
      key: the run's PRNG key; each task and step folds its index in, never advancing it in place.
      step: global optimizer steps taken so far (int32).
      diverged_step: first global step whose loss was NaN or inf, ``-1`` while finite (int32).
    """

    params: Params
    opt_state: optax.OptState
    strategy: Strategy
    opt_hparams: dict[str, Array]
    strategy_state: PyTree
    key: PRNGKeyArray
    step: Int[Array, ""]
    diverged_step: Int[Array, ""]


class TaskOutput(flax.struct.PyTreeNode):
    """What one call of the task program returns (per seed)."""

    acc_row: Float[Array, " task"]  # accuracy on every task after this task's training
    curve: Float[Array, "evals task"]  # accuracy on every task at the in-task evaluation points
    loss: Float[Array, " points"]  # mean training loss since the previous evaluation point
    train_acc: Float[Array, " points"]  # mean accuracy on the training batches, measured before each update


class Learner:
    """A model, an optax optimizer and a strategy, compiled to run a task stream.

    Args:
      model: builds the Flax NNX model from ``nnx.Rngs`` (called once per seed, under ``vmap``).
      optimizer: any ``optax.GradientTransformation``.
      strategy: a :class:`Strategy` (``Naive()``, ``Joint()``, ...).
      config: a :class:`TrainConfig`.

    Example:
      >>> import optax
      >>> from flax import nnx
      >>> from nestlearn import continual, nn, tasks
      >>> stream = tasks.split_digits("task")
      >>> learner = continual.Learner(lambda rngs: nn.MLP(64, (32,), 10, rngs=rngs),
      ...     optax.sgd(0.1), continual.Naive(), continual.TrainConfig(steps_per_task=20, batch_size=32))
      >>> result = learner.run(stream, seeds=[0, 1])
      >>> result.acc_matrix.shape
      (2, 5, 5)
    """

    def __init__(
        self,
        model: Callable[[nnx.Rngs], nnx.Module],
        optimizer: optax.GradientTransformation,
        strategy: Strategy,
        config: TrainConfig,
    ) -> None:
        if not dataclasses.is_dataclass(strategy) or jax.tree.leaves(strategy) == [strategy]:
            raise TypeError(
                f"strategy {type(strategy).__name__} must be a flax.struct.dataclass (a pytree whose leaves "
                "are its hyperparameters)"
            )
        self.model = model
        self.optimizer = optimizer
        self.strategy = strategy
        self.config = config
        abstract_model = jax.eval_shape(lambda: model(nnx.Rngs(0)))
        self._graphdef = nnx.split(abstract_model)[0]
        self._has_features = callable(getattr(abstract_model, "features", None))
        # Initialisation runs once per run: compile it without LLVM's optimisations on CPU, where they
        # cost about two seconds (threefry for every parameter) and save a few milliseconds of run time.
        fast_compile = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
        self._init = jax.jit(
            jax.vmap(self._init_one, in_axes=(0, 0, 0, None, 0)), compiler_options=fast_compile
        )
        self._evaluate_init = jax.jit(jax.vmap(self._evaluate, in_axes=(0, None)))
        self._task = jax.jit(
            lambda state, stream, task, n_epochs: jax.vmap(
                functools.partial(self._run_task_one, n_epochs=n_epochs), in_axes=(0, None, None)
            )(state, stream, task),
            static_argnums=3,
            donate_argnums=0,
        )

    # -- the pure, per-seed pieces --------------------------------------------------------------

    def apply(self, params: Params, x: Float[Array, "b d"]) -> Float[Array, "b c"]:
        """The model as a pure function of its parameters."""
        return nnx.merge(self._graphdef, params)(x)

    def _init_optimizer(self, params: Params, opt_hparams: dict[str, Array]) -> optax.OptState:
        opt_state = self.optimizer.init(params)
        return optax.tree_utils.tree_set(opt_state, **opt_hparams) if opt_hparams else opt_state

    def _init_one(
        self,
        key: PRNGKeyArray,
        strategy: Strategy,
        opt_hparams: dict[str, Array],
        stream: TaskStream,
        params: Params | None = None,
    ) -> RunState:
        k_model, k_run = jax.random.split(key)
        if params is None:
            params = nnx.split(self.model(nnx.Rngs(k_model)))[1]
        return RunState(
            params=params,
            opt_state=self._init_optimizer(params, opt_hparams),
            strategy=strategy,
            opt_hparams=opt_hparams,
            strategy_state=strategy.init(params, stream),
            key=k_run,
            step=jnp.zeros((), jnp.int32),
            diverged_step=jnp.full((), -1, jnp.int32),
        )

    def _evaluate(self, params: Params, stream: TaskStream) -> Float[Array, " task"]:
        """Accuracy on every task's test set (tasks in sequence with ``lax.map`` to bound memory)."""

        def one(task):
            x, y, valid = stream.test_set(task)
            logits = jnp.where(stream.class_mask[task], self.apply(params, x), -jnp.inf)
            hit = (jnp.argmax(logits, -1) == y) & valid
            return hit.sum() / jnp.maximum(valid.sum(), 1)

        return jax.lax.map(one, jnp.arange(stream.n_tasks, dtype=jnp.int32)).astype(jnp.float32)

    def _loss(self, params, strategy: Strategy, strategy_state, batch: Batch, ctx: Context):
        logits = ctx.logits(params, batch.x, batch.task)
        task_loss = batch.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch.y))
        correct = batch.mean((jnp.argmax(logits, -1) == batch.y).astype(jnp.float32))
        return task_loss + strategy.penalty(strategy_state, params, batch, ctx), (task_loss, correct)

    def _features(self, params: Params, x):
        return nnx.merge(self._graphdef, params).features(x)

    def _context(self, stream: TaskStream, task, step, key) -> Context:
        features = self._features if self._has_features else None
        return Context(stream=stream, task=task, step=step, key=key, apply=self.apply, features=features)

    def _run_task_one(self, state: RunState, stream: TaskStream, task: Int[Array, ""], *, n_epochs: int):
        cfg = self.config
        b = cfg.batch_size
        task = jnp.asarray(task, jnp.int32)
        # Keys: fold_in(key, task) for the task (then 0: epoch order, 1: begin_task, 2: end_task), and
        # fold_in(fold_in(key, STEP_STREAM), global step), split in four for the hooks of that step.
        task_key = jax.random.fold_in(state.key, task)
        n = stream.train_n[task]
        # Reshuffled epochs: row e of `order` lists the task's valid examples in a fresh random order
        # (padding rows sort last). Example p of the task's sequence is order[p // n, p % n].
        valid = jnp.arange(stream.max_train) < n
        sort_keys = jax.random.uniform(jax.random.fold_in(task_key, 0), (n_epochs, stream.max_train))
        order = jnp.argsort(jnp.where(valid, sort_keys, 2.0), axis=1).astype(jnp.int32)

        if cfg.reset_optimizer:
            state = state.replace(opt_state=self._init_optimizer(state.params, state.opt_hparams))
        ctx = self._context(stream, task, state.step, jax.random.fold_in(task_key, 1))
        state = state.replace(
            strategy_state=state.strategy.begin_task(state.strategy_state, state.params, ctx)
        )

        def step(state: RunState, s):
            p = s * b + jnp.arange(b, dtype=jnp.int32)
            pos = order[p // n, p % n]
            x, y = stream.train_examples(jnp.full((b,), task), pos)
            step_key = jax.random.fold_in(jax.random.fold_in(state.key, STEP_STREAM), state.step)
            keys = jax.random.split(step_key, 4)
            ctx = self._context(stream, task, state.step, keys[0])
            strategy, sstate = state.strategy, state.strategy_state
            batch = strategy.train_batch(sstate, Batch(x=x, y=y, task=jnp.full((b,), task)), ctx)
            (_, (task_loss, correct)), grads = jax.value_and_grad(self._loss, has_aux=True)(
                state.params, strategy, sstate, batch, ctx.replace(key=keys[1])
            )
            grads = strategy.transform_grads(sstate, state.params, grads, batch, ctx.replace(key=keys[2]))
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            sstate, params = strategy.after_step(sstate, params, grads, batch, ctx.replace(key=keys[3]))
            finite = jnp.isfinite(task_loss)
            new = state.replace(
                params=params,
                opt_state=opt_state,
                strategy_state=sstate,
                step=state.step + 1,
                diverged_step=jnp.where((state.diverged_step < 0) & ~finite, state.step, state.diverged_step),
            )
            return new, (task_loss, correct)

        def run_steps(state, first, count):
            state, (losses, correct) = jax.lax.scan(step, state, first + jnp.arange(count, dtype=jnp.int32))
            return state, (losses.mean(), correct.mean())

        n_inside = cfg.evals_inside_task
        curve = jnp.zeros((0, stream.n_tasks), jnp.float32)
        chunk_losses = jnp.zeros((0,), jnp.float32)
        chunk_acc = jnp.zeros((0,), jnp.float32)
        if n_inside:

            def chunk(state, c):
                state, (loss, acc) = run_steps(state, c * cfg.eval_every, cfg.eval_every)
                return state, (self._evaluate(state.params, stream), loss, acc)

            state, (curve, chunk_losses, chunk_acc) = jax.lax.scan(
                chunk, state, jnp.arange(n_inside, dtype=jnp.int32)
            )
        done = n_inside * (cfg.eval_every or 0)
        state, (last_loss, last_acc) = run_steps(state, done, cfg.steps_per_task - done)
        ctx = self._context(stream, task, state.step, jax.random.fold_in(task_key, 2))
        sstate, params = state.strategy.end_task(state.strategy_state, state.params, ctx)
        state = state.replace(strategy_state=sstate, params=params)
        acc_row = self._evaluate(state.params, stream)
        return state, TaskOutput(
            acc_row=acc_row,
            curve=curve,
            loss=jnp.concatenate([chunk_losses, last_loss[None]]),
            train_acc=jnp.concatenate([chunk_acc, last_acc[None]]),
        )

    # -- the host side ---------------------------------------------------------------------------

    def init(
        self,
        stream: TaskStream,
        seeds: Sequence[int],
        mesh: Mesh | None = None,
        hparams: Mapping[str, Sequence[float]] | None = None,
        init_params: Params | None = None,
    ) -> RunState:
        """The state of every run before training, the run axis sharded over ``mesh`` if given.

        Args:
          stream: the task stream.
          seeds: the seed of each run.
          mesh: optional mesh with a ``"seeds"`` axis (see :func:`seed_mesh`).
          hparams: per-run hyperparameter values, each a sequence as long as ``seeds``: a strategy field
            by its name (``"lam"``), or an ``optax.inject_hyperparams`` hyperparameter of the optimizer
            as ``"optimizer.<name>"`` (``"optimizer.learning_rate"``).
          init_params: start from these parameters instead of the model's random initialisation (a
            meta-learned or pre-trained start): the model's parameter pytree, either one for every run or
            stacked with a leading axis of one entry per run. The seeds still drive everything else.
        """
        keys, strategies, opt_hparams = self._run_inputs(seeds, hparams or {})
        params = None if init_params is None else self._stack_init_params(init_params, len(seeds))
        state = self._init(keys, strategies, opt_hparams, stream, params)
        if mesh is not None:
            state = jax.device_put(state, seed_sharding(mesh))
        return state

    def _run_inputs(self, seeds: Sequence[int], hparams: Mapping[str, Sequence[float]]):
        n = len(seeds)
        fields = (
            {f.name for f in dataclasses.fields(self.strategy)}
            if dataclasses.is_dataclass(self.strategy)
            else set()
        )
        strategy_values, opt_values = {}, {}
        for name, values in hparams.items():
            values = np.asarray(values, np.float32)
            if values.shape != (n,):
                raise ConfigError(
                    f"hyperparameter {name!r} needs one value per run ({n}), got shape {values.shape}"
                )
            if name.startswith("optimizer."):
                opt_values[name.removeprefix("optimizer.")] = jnp.asarray(values)
            elif name in fields:
                strategy_values[name] = values
            else:
                known = ", ".join(sorted(fields)) or "none"
                raise ConfigError(
                    f"unknown hyperparameter {name!r} for {type(self.strategy).__name__} (fields: {known}; "
                    "optimizer hyperparameters are named 'optimizer.<name>')"
                )
        if opt_values:
            probe = jax.eval_shape(self.optimizer.init, self.abstract_params())
            missing = object()
            for name in opt_values:
                if optax.tree_utils.tree_get(probe, name, default=missing) is missing:
                    raise ConfigError(
                        f"optimizer has no hyperparameter {name!r}; wrap it in optax.inject_hyperparams to sweep it"
                    )
        strategies = [
            dataclasses.replace(self.strategy, **{k: v[r] for k, v in strategy_values.items()})
            if strategy_values
            else self.strategy
            for r in range(n)
        ]
        stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x, jnp.float32) for x in xs]), *strategies)
        keys = jax.vmap(jax.random.PRNGKey)(
            jnp.asarray(np.asarray(seeds, np.uint32))
        )  # raw keys checkpoint as arrays
        return keys, stacked, opt_values

    def _stack_init_params(self, init_params: Params, n: int) -> Params:
        """``init_params`` with a leading run axis of ``n``; a clear error if it is not the model's pytree."""
        want = self.abstract_params()
        if jax.tree.structure(init_params) != jax.tree.structure(want):
            raise ConfigError(
                "init_params must have the structure of the model's parameters "
                f"({jax.tree.structure(want)}), got {jax.tree.structure(init_params)}"
            )
        leaves, wants = jax.tree.leaves(init_params), jax.tree.leaves(want)
        if all(jnp.shape(a) == w.shape for a, w in zip(leaves, wants)):
            return jax.tree.map(
                lambda a, w: jnp.broadcast_to(jnp.asarray(a, w.dtype), (n, *w.shape)), init_params, want
            )
        if all(jnp.shape(a) == (n, *w.shape) for a, w in zip(leaves, wants)):
            return jax.tree.map(lambda a, w: jnp.asarray(a, w.dtype), init_params, want)
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(want)[0]]
        bad = next(
            (path, jnp.shape(a), w.shape)
            for path, a, w in zip(paths, leaves, wants)
            if jnp.shape(a) not in (w.shape, (n, *w.shape))
        )
        raise ConfigError(
            f"init_params{bad[0]} has shape {bad[1]}; expected {bad[2]} (one start for every run) or "
            f"{(n, *bad[2])} (one per run)"
        )

    def abstract_params(self) -> Params:
        """Shapes and dtypes of the model's parameters."""
        return nnx.split(jax.eval_shape(lambda: self.model(nnx.Rngs(0))))[1]

    def abstract_state(
        self, stream: TaskStream, seeds: Sequence[int], hparams: Mapping[str, Sequence[float]] | None = None
    ) -> RunState:
        """Shapes and dtypes of the state of these runs, without allocating (to restore into)."""
        keys, strategies, opt_hparams = self._run_inputs(seeds, hparams or {})
        return jax.eval_shape(
            jax.vmap(self._init_one, in_axes=(0, 0, 0, None, None)),
            keys,
            strategies,
            opt_hparams,
            stream,
            None,
        )

    def evaluate(self, state: RunState, stream: TaskStream) -> Float[Array, "seed task"]:
        """Accuracy of every seed on every task (used for the accuracies before training)."""
        return self._evaluate_init(state.params, stream)

    def run_task(self, state: RunState, stream: TaskStream, task: int) -> tuple[RunState, TaskOutput]:
        """Trains every seed on task ``task`` with one call of the compiled program.

        ``state`` is donated: use the returned state, not the argument, afterwards.
        """
        return self._task(state, stream, jnp.asarray(task, jnp.int32), self._n_epochs(stream))

    def _n_epochs(self, stream: TaskStream) -> int:
        """Reshuffled epochs a task can need: enough for the smallest task (a static shape)."""
        return math.ceil(self.config.steps_per_task * self.config.batch_size / int(np.min(stream.train_n)))

    def run(
        self,
        stream: TaskStream,
        seeds: Sequence[int],
        *,
        sweep: Mapping[str, Sequence[float]] | None = None,
        mesh: Mesh | None = None,
        on_task_end: Callable[[int, RunState, StreamResult], None] | None = None,
        init_params: Params | None = None,
    ) -> StreamResult:
        """Runs the whole stream for every seed (and every sweep point) in one program.

        Args:
          stream: the task stream.
          seeds: the seeds; with ``sweep``, every seed runs at every combination of values.
          sweep: hyperparameter values to sweep, e.g. ``{"lam": [1, 10, 100]}`` for a strategy field or
            ``{"optimizer.learning_rate": [...]}`` (see :meth:`init`). The runs are the product of all
            value lists and the seeds, sweep-major, each a row of the result (``result.runs``).
          mesh: optional device mesh with one axis named ``"seeds"`` over which runs are sharded.
          on_task_end: called on the host after each task with the task index, the state and the
            results so far (rows of later tasks still zero).
          init_params: start every run (or, stacked, each run) from these parameters; see :meth:`init`.

        Returns:
          A :class:`StreamResult` with one row per run.
        """
        runs = sweep_runs(seeds, sweep or {})
        hparams = {k: [r[k] for r in runs] for k in (sweep or {})}
        state = self.init(stream, [r["seed"] for r in runs], mesh, hparams, init_params)
        recorder = Recorder(self.config, stream, runs)
        recorder.record_init(self.evaluate(state, stream))
        for task in range(stream.n_tasks):
            state, out = self.run_task(state, stream, task)
            recorder.record_task(task, out, state.diverged_step)
            if on_task_end is not None:
                on_task_end(task, state, recorder.result())
        return recorder.result()


def sweep_runs(seeds: Sequence[int], sweep: Mapping[str, Sequence[float]]) -> list[dict[str, float | int]]:
    """The runs of a sweep: every combination of the values (in order), times every seed.

    Example:
      >>> sweep_runs([0, 1], {"lam": [1.0, 10.0]})
      [{'lam': 1.0, 'seed': 0}, {'lam': 1.0, 'seed': 1}, {'lam': 10.0, 'seed': 0}, {'lam': 10.0, 'seed': 1}]
    """
    for name, values in sweep.items():
        if len(values) == 0:
            raise ConfigError(f"sweep {name!r} has no values")
    names = list(sweep)
    combos = itertools.product(*(sweep[k] for k in names))
    return [
        {**dict(zip(names, (float(v) for v in combo))), "seed": int(s)} for combo in combos for s in seeds
    ]


class Recorder:
    """Accumulates task outputs on the host into the arrays of a :class:`StreamResult`.

    Its arrays are plain numpy, so they checkpoint with the run state and restore exactly.
    """

    def __init__(self, config: TrainConfig, stream: TaskStream, runs: Sequence[dict]) -> None:
        self.config = config
        self.runs = tuple(runs)
        n_seeds = len(self.runs)
        self.task_names = stream.task_names or tuple(f"task {t}" for t in range(stream.n_tasks))
        t, per = stream.n_tasks, config.evals_inside_task + 1
        steps_in_task = [(i + 1) * (config.eval_every or 0) for i in range(per - 1)] + [config.steps_per_task]
        self.curve_steps = np.array(
            [0] + [task * config.steps_per_task + s for task in range(t) for s in steps_in_task], np.int64
        )
        self.curve_task = np.array([-1] + [task for task in range(t) for _ in range(per)], np.int64)
        self.arrays = {
            "acc_matrix": np.zeros((n_seeds, t, t), np.float32),
            "acc_init": np.zeros((n_seeds, t), np.float32),
            "curve_acc": np.zeros((n_seeds, 1 + t * per, t), np.float32),
            "train_loss": np.full((n_seeds, 1 + t * per), np.nan, np.float32),
            "train_acc": np.full((n_seeds, 1 + t * per), np.nan, np.float32),
            "diverged_step": np.full((n_seeds,), -1, np.int64),
            "tasks_done": np.zeros((), np.int64),
        }

    def record_init(self, acc: Float[Array, "seed task"]) -> None:
        self.arrays["acc_init"][:] = np.asarray(acc)
        self.arrays["curve_acc"][:, 0] = np.asarray(acc)

    def record_task(self, task: int, out: TaskOutput, diverged_step: Int[Array, " seed"]) -> None:
        per = self.config.evals_inside_task + 1
        sl = slice(1 + task * per, 1 + (task + 1) * per)
        self.arrays["acc_matrix"][:, task] = np.asarray(out.acc_row)
        self.arrays["curve_acc"][:, sl] = np.concatenate(
            [np.asarray(out.curve), np.asarray(out.acc_row)[:, None]], 1
        )
        self.arrays["train_loss"][:, sl] = np.asarray(out.loss)
        self.arrays["train_acc"][:, sl] = np.asarray(out.train_acc)
        self.arrays["diverged_step"][:] = np.asarray(diverged_step)
        self.arrays["tasks_done"] = np.asarray(task + 1, np.int64)

    def result(self) -> StreamResult:
        a = self.arrays
        return StreamResult(
            acc_matrix=a["acc_matrix"].copy(),
            acc_init=a["acc_init"].copy(),
            curve_steps=self.curve_steps,
            curve_task=self.curve_task,
            curve_acc=a["curve_acc"].copy(),
            train_loss=a["train_loss"].copy(),
            train_acc=a["train_acc"].copy(),
            diverged_step=a["diverged_step"].copy(),
            steps_per_task=self.config.steps_per_task,
            task_names=self.task_names,
            runs=self.runs,
        )


def seed_mesh(n_seeds: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh named ``"seeds"`` over as many devices as evenly divide ``n_seeds``.

    Every device gets the same number of seeds, so with 5 seeds on 4 devices the mesh has one device
    (a warning says so); choose a seed count divisible by the device count to use them all.
    """
    devices = list(jax.devices() if devices is None else devices)
    k = max(d for d in range(1, len(devices) + 1) if n_seeds % d == 0)
    if k < len(devices):
        warnings.warn(
            f"{n_seeds} seeds shard evenly over {k} of {len(devices)} devices; "
            f"use a multiple of {len(devices)} seeds to use them all",
            stacklevel=2,
        )
    return Mesh(np.array(devices[:k]), ("seeds",))


def seed_sharding(mesh: Mesh) -> NamedSharding:
    """Shards the leading (seed) axis over the mesh's ``"seeds"`` axis."""
    return NamedSharding(mesh, PartitionSpec("seeds"))
