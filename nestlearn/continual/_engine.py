"""The compiled continual-learning engine: one program per task, called once per task of the stream.

Inside the program, a task's optimizer steps run under ``lax.scan`` in chunks of ``eval_every`` steps,
each chunk followed by an evaluation of every task of the stream (forgetting curves at step resolution);
seeds are a leading ``vmap`` axis, sharded over the devices of a ``Mesh``. The task index is a traced
argument, so the same compiled program serves every task; between calls the host may checkpoint, report
progress and write results. Nothing here loops over steps in Python.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from nestlearn._errors import ConfigError
from nestlearn.continual._result import StreamResult
from nestlearn.continual._strategy import Batch, Context, Params, Strategy
from nestlearn.engine import (
    Engine,
    Functional,
    Guard,
    Progress,
    check_seeds,
    compile_once,
    nan_unless,
    optimizer_values,
    per_run_values,
    run_grid,
    run_keys,
    shard_runs,
)
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
      evals_per_task: instead of ``eval_every``, exactly this many evaluation points per task, the last
        at the task's end, the others at evenly spaced steps (``round(k * steps_per_task / n)``).
      reset_optimizer: re-initialise the optimizer state (momenta) at the start of every task.
      blowup: a finite training loss above this counts as divergence too (``None``: only NaN and inf).
      eval_batch_size: evaluate each task's test set in batches of this many examples, one after another
        (bounds the memory of evaluating a large model on a large test set, e.g. a ResNet on CIFAR's
        10,000 test images); ``None`` evaluates a task's whole test set in one batch.
    """

    steps_per_task: int
    batch_size: int
    eval_every: int | None = None
    reset_optimizer: bool = False
    evals_per_task: int | None = None
    blowup: float | None = None
    eval_batch_size: int | None = None

    def __post_init__(self):
        for name in ("steps_per_task", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "evals_per_task", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if self.eval_every is not None and self.evals_per_task is not None:
            raise ConfigError("set eval_every (a period) or evals_per_task (a count), not both")
        Guard(blowup=self.blowup)  # checks it

    @property
    def eval_steps(self) -> tuple[int, ...]:
        """The steps inside a task after which every task is evaluated; the last is the task's end."""
        n = self.steps_per_task
        if self.evals_per_task is not None:
            k = min(self.evals_per_task, n)
            points = sorted({max(1, round(i * n / k)) for i in range(1, k + 1)})
        elif self.eval_every is not None:
            points = list(range(self.eval_every, n, self.eval_every)) + [n]
        else:
            points = [n]
        return tuple(points)

    @property
    def evals_inside_task(self) -> int:
        """Evaluation points strictly inside a task (the end-of-task evaluation is separate)."""
        return len(self.eval_steps) - 1


def steps_for_epochs(epochs: float, n_train: int | TaskStream, batch_size: int) -> int:
    """Steps that make ``epochs`` passes over ``n_train`` examples in batches of ``batch_size``.

    ``n_train`` may be a stream, whose largest task is used.
    """
    if isinstance(n_train, TaskStream):
        n_train = int(np.max(np.asarray(n_train.train_n)))
    return max(1, math.ceil(epochs * n_train / batch_size))


NORMS = ("param_norm", "chunk_update_norm")
STEP_STREAM = 0x5EED  # folded into a run's key to derive per-step keys apart from per-task keys
AUGMENT_STREAM = 0xA06  # folded into a run's key, then the step: the key of the step's augmentation


class RunState(flax.struct.PyTreeNode):
    """Everything a run carries from one task to the next; a pytree, so it checkpoints, vmaps and shards.

    Attributes:
      params: model parameters (an ``nnx.State``).
      model_state: the model's other variables (batch statistics, dropout RNG streams; empty for most
        models), carried through training steps and checkpointed with the rest.
      opt_state: the optax optimizer state.
      strategy: the strategy itself, a pytree whose leaves are its hyperparameters, so that a sweep
        gives every run its own values (vmapped, sharded and checkpointed with the rest).
      opt_hparams: the optimizer hyperparameters a sweep sets in an ``optax.inject_hyperparams``
        state, re-applied whenever the optimizer state is re-initialised (``{}`` otherwise).
      strategy_state: the strategy's state.
      key: the run's PRNG key (typed); each task and step folds its index in, never advancing it in place.
      step: global optimizer steps taken so far (int32).
      diverged_step: first global step whose loss or update was NaN or inf (or whose loss passed the
        blow-up threshold), ``-1`` while healthy (int32). A diverged run is frozen from that step.
    """

    params: Params
    model_state: PyTree
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
    norms: dict  # per span: the parameter norm at its end and the norm of its displacement {name: [points]}


class Learner:
    """A model, an optax optimizer and a strategy, compiled to run a task stream on the engine.

    A task runs as three compiled programs called by the host: its start (the strategy's ``begin_task``,
    the optimizer reset), chunks of steps up to each evaluation point (:class:`nestlearn.engine.Engine`
    with a traced step count, so every chunk length shares one program, each chunk followed by an
    evaluation of every task), and its end (``end_task`` and the evaluation that makes a row of the
    accuracy matrix). Runs (seeds, sweep points) are a vmapped leading axis, sharded over a mesh; the host
    regains control between chunks, where it reports progress.

    Args:
      model: builds the Flax NNX model from ``nnx.Rngs`` (called once per seed, under ``vmap``). Models
        with non-parameter state (``nnx.BatchNorm``, ``nnx.Dropout``) train in train mode, the state
        carried in :attr:`RunState.model_state`, and are evaluated in eval mode.
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
      >>> result = learner.run(stream, seeds=[0, 1], progress=False)
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
        self.fn = Functional(model)
        self._has_features = self.fn.has("features")
        self._init = compile_once(self._init_one, in_axes=(0, 0, 0, None, 0))
        self._evaluate_init = compile_once(self._evaluate, in_axes=(0, 0, None))
        self.engine = Engine(
            self._step,
            length=None,
            in_axes=(None, None, None),
            static=1,  # the number of reshuffled epochs (a shape)
            # Divergence is read off the loss (a NaN update shows in the next step's loss). Runs are not
            # frozen: a diverged run's metrics and accuracies are NaN from its step on, and skipping the
            # per-step select over the whole state keeps the hot loop as fast as a hand-written one.
            guard=Guard(blowup=config.blowup, freeze=False),
            telemetry=lambda start, end: {
                "param_norm": optax.tree.norm(end.params).astype(jnp.float32),
                "chunk_update_norm": optax.tree.norm(
                    jax.tree.map(jnp.subtract, end.params, start.params)
                ).astype(jnp.float32),
            },
            prepare=lambda state, stream, task, n_epochs: (
                stream,
                task,
                self._order(state, stream, task, n_epochs),
            ),
        )
        # In-task evaluation points: a separate program, so a task's last chunk is not evaluated twice
        # (its row comes from the end of the task, after end_task).
        self._evaluate_runs = jax.jit(jax.vmap(self._evaluate_if_healthy, in_axes=(0, None)))
        self._begin = jax.jit(jax.vmap(self._begin_task_one, in_axes=(0, None, None)), donate_argnums=0)
        self._end = jax.jit(jax.vmap(self._end_task_one, in_axes=(0, None, None)), donate_argnums=0)

    # -- the pure, per-run pieces ----------------------------------------------------------------

    def apply(
        self, params: Params, x: Float[Array, "b d"], model_state: PyTree = None
    ) -> Float[Array, "b c"]:
        """The model as a pure function of its parameters, in eval mode."""
        if model_state is None and self.fn.stateful:
            raise ValueError(
                "this model has non-parameter state (batch statistics, RNG streams): pass model_state"
            )
        return self.fn.eval(params, model_state, x)

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
        model_params, model_state = self.fn.init(k_model)
        params = model_params if params is None else params
        return RunState(
            params=params,
            model_state=model_state,
            opt_state=self._init_optimizer(params, opt_hparams),
            strategy=strategy,
            opt_hparams=opt_hparams,
            strategy_state=strategy.init(params, stream),
            key=k_run,
            step=jnp.zeros((), jnp.int32),
            diverged_step=jnp.full((), -1, jnp.int32),
        )

    def _evaluate(self, params: Params, model_state: PyTree, stream: TaskStream) -> Float[Array, " task"]:
        """Accuracy on every task's test set (tasks in sequence with ``lax.map`` to bound memory)."""

        n_test = stream.test_idx.shape[1]
        eb = self.config.eval_batch_size
        n_batches = 1 if eb is None or eb >= n_test else math.ceil(n_test / eb)

        def hits(task, pos):
            x, y, valid = stream.test_examples(task, pos)
            logits = jnp.where(stream.class_mask[task], self.fn.eval(params, model_state, x), -jnp.inf)
            return ((jnp.argmax(logits, -1) == y) & valid).sum()

        def one(task):
            if n_batches == 1:
                correct = hits(task, jnp.arange(n_test, dtype=jnp.int32))
            else:  # batches of eb test positions in sequence; the last is padded and masked
                starts = jnp.arange(n_batches, dtype=jnp.int32) * eb
                per = lambda s: hits(task, s + jnp.arange(eb, dtype=jnp.int32))
                correct = jax.lax.map(per, starts).sum()
            return correct / jnp.maximum(stream.test_n[task], 1)

        return jax.lax.map(one, jnp.arange(stream.n_tasks, dtype=jnp.int32)).astype(jnp.float32)

    def _evaluate_if_healthy(self, state: RunState, stream: TaskStream) -> Float[Array, " task"]:
        return nan_unless(state.diverged_step < 0, self._evaluate(state.params, state.model_state, stream))

    def _loss(self, params, model_state, strategy: Strategy, strategy_state, batch: Batch, ctx: Context):
        out, model_state = self.fn.train(params, model_state, batch.x)
        logits = jnp.where(ctx.stream.class_mask[batch.task], out, -jnp.inf)
        task_loss = batch.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch.y))
        correct = batch.mean((jnp.argmax(logits, -1) == batch.y).astype(jnp.float32))
        penalty = strategy.penalty(strategy_state, params, batch, ctx)
        return task_loss + penalty, (task_loss, correct, model_state)

    def _context(self, stream: TaskStream, task, step, key, model_state) -> Context:
        apply = lambda p, x: self.fn.eval(p, model_state, x)
        features = (
            (lambda p, x: self.fn.eval(p, model_state, x, method="features")) if self._has_features else None
        )
        return Context(stream=stream, task=task, step=step, key=key, apply=apply, features=features)

    def _order(self, state: RunState, stream: TaskStream, task, n_epochs: int):
        """Reshuffled epochs: row e lists the task's valid examples in a fresh random order (padding last).

        Example ``p`` of the task's sequence is ``order[p // n, p % n]``; the order depends only on the
        run's key and the task, so every chunk of the task recomputes the same one.
        """
        valid = jnp.arange(stream.max_train) < stream.train_n[task]
        task_key = jax.random.fold_in(state.key, task)
        sort_keys = jax.random.uniform(jax.random.fold_in(task_key, 0), (n_epochs, stream.max_train))
        return jnp.argsort(jnp.where(valid, sort_keys, 2.0), axis=1).astype(jnp.int32)

    def _begin_task_one(self, state: RunState, stream: TaskStream, task) -> RunState:
        # Keys: fold_in(key, task) for the task (then 0: epoch order, 1: begin_task, 2: end_task), and
        # fold_in(fold_in(key, STEP_STREAM), global step), split in four for the hooks of that step.
        if self.config.reset_optimizer:
            state = state.replace(opt_state=self._init_optimizer(state.params, state.opt_hparams))
        key = jax.random.fold_in(jax.random.fold_in(state.key, task), 1)
        ctx = self._context(stream, task, state.step, key, state.model_state)
        sstate = state.strategy.begin_task(state.strategy_state, state.params, ctx)
        return state.replace(strategy_state=sstate)

    def _step(self, state: RunState, stream: TaskStream, task, order):
        """One optimizer step of one run on task ``task`` (the engine guards, counts and loops it)."""
        b = self.config.batch_size
        n = stream.train_n[task]
        s = state.step - task * self.config.steps_per_task  # the step's index inside the task
        p = s * b + jnp.arange(b, dtype=jnp.int32)
        pos = order[p // n, p % n]
        x, y = stream.train_examples(jnp.full((b,), task), pos)
        keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(state.key, STEP_STREAM), state.step), 4)
        ctx = self._context(stream, task, state.step, keys[0], state.model_state)
        strategy, sstate = state.strategy, state.strategy_state
        batch = strategy.train_batch(sstate, Batch(x=x, y=y, task=jnp.full((b,), task)), ctx)
        # The stream's training augmentation (image streams; identity otherwise) acts on the batch the
        # step trains on, replayed rows included; strategies store and see the clean examples.
        aug_key = jax.random.fold_in(jax.random.fold_in(state.key, AUGMENT_STREAM), state.step)
        seen = batch.replace(x=stream.augment(aug_key, batch.x))
        (_, (task_loss, correct, model_state)), grads = jax.value_and_grad(self._loss, has_aux=True)(
            state.params, state.model_state, strategy, sstate, seen, ctx.replace(key=keys[1])
        )
        grads = strategy.transform_grads(sstate, state.params, grads, seen, ctx.replace(key=keys[2]))
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        sstate, params = strategy.after_step(sstate, params, grads, batch, ctx.replace(key=keys[3]))
        new = state.replace(
            params=params, model_state=model_state, opt_state=opt_state, strategy_state=sstate
        )
        return new, {"loss": task_loss, "acc": correct}

    def _end_task_one(self, state: RunState, stream: TaskStream, task):
        key = jax.random.fold_in(jax.random.fold_in(state.key, task), 2)
        ctx = self._context(stream, task, state.step, key, state.model_state)
        sstate, params = state.strategy.end_task(state.strategy_state, state.params, ctx)
        state = state.replace(strategy_state=sstate, params=params)
        acc = self._evaluate(state.params, state.model_state, stream)
        return state, nan_unless(state.diverged_step < 0, acc)

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
          mesh: optional one-axis mesh over which runs are sharded (see :func:`nestlearn.engine.run_mesh`).
          hparams: per-run hyperparameter values, each a sequence as long as ``seeds``: a strategy field
            by its name (``"lam"``), or an ``optax.inject_hyperparams`` hyperparameter of the optimizer
            as ``"optimizer.<name>"`` (``"optimizer.learning_rate"``); a value may be a list (a
            list-valued hyperparameter such as per-level rates).
          init_params: start from these parameters instead of the model's random initialisation (a
            meta-learned or pre-trained start): the model's parameter pytree, either one for every run or
            stacked with a leading axis of one entry per run. The seeds still drive everything else.
        """
        self._check_stream(stream)
        keys, strategies, opt_hparams = self._run_inputs(seeds, hparams or {})
        params = None if init_params is None else self._stack_init_params(init_params, len(seeds))
        state = self._init(keys, strategies, opt_hparams, stream, params)
        return shard_runs(state, mesh)

    def _check_stream(self, stream: TaskStream) -> None:
        """A clear error when the model's outputs do not fit the stream's inputs or classes."""
        x = jax.ShapeDtypeStruct((1, *stream.input_shape), jnp.float32)
        try:
            out = jax.eval_shape(self.fn.eval, self.fn.abstract_params, self.fn.abstract_rest, x)
        except Exception as e:  # noqa: BLE001 - any failure here means the shapes do not fit
            raise ConfigError(
                f"the model does not take the stream's inputs of shape {stream.input_shape}: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
        if out.ndim != 2 or out.shape[-1] != stream.n_classes:
            raise ConfigError(
                f"the model outputs {tuple(out.shape[1:])} per example but stream {stream.name!r} has "
                f"{stream.n_classes} classes: build the model with {stream.n_classes} outputs"
            )

    def _run_inputs(self, seeds: Sequence[int], hparams: Mapping[str, Sequence[float]]):
        seeds = check_seeds(seeds)
        n = len(seeds)
        fields = {f.name: f for f in dataclasses.fields(self.strategy)}
        leaves = {k for k, f in fields.items() if f.metadata.get("pytree_node", True)}
        strategy_values, opt_values = {}, {}
        for name, values in hparams.items():
            values = per_run_values(name, values, n)
            if name.startswith("optimizer."):
                opt_values[name.removeprefix("optimizer.")] = values
            elif name in leaves:
                strategy_values[name] = values
            elif name in fields:
                raise ConfigError(
                    f"{type(self.strategy).__name__}.{name} is a structural field (it shapes arrays), so it "
                    "cannot vary inside one program: run one Learner per value instead of sweeping it"
                )
            else:
                known = ", ".join(sorted(leaves)) or "none"
                raise ConfigError(
                    f"unknown hyperparameter {name!r} for {type(self.strategy).__name__} (fields: {known}; "
                    "optimizer hyperparameters are named 'optimizer.<name>')"
                )
        self._check_strength(strategy_values)
        opt_values = optimizer_values(self.optimizer, self.abstract_params(), opt_values, n)
        strategies = [
            dataclasses.replace(self.strategy, **{k: v[r] for k, v in strategy_values.items()})
            if strategy_values
            else self.strategy
            for r in range(n)
        ]
        stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x, jnp.float32) for x in xs]), *strategies)
        return run_keys(seeds), stacked, opt_values

    def _check_strength(self, strategy_values: Mapping[str, np.ndarray]) -> None:
        """The strategy's strength (its ``strength`` field) must be finite and non-negative."""
        field = getattr(type(self.strategy), "strength", None)
        if field is None:
            return
        values = strategy_values.get(field, np.asarray(getattr(self.strategy, field, 0.0), np.float32))
        values = np.asarray(values, np.float64).ravel()
        bad = [v for v in dict.fromkeys(values.tolist()) if not (np.isfinite(v) and v >= 0)]
        if bad:
            raise ConfigError(
                f"{type(self.strategy).__name__}.{field} must be finite and non-negative, got "
                f"{', '.join(repr(v) for v in bad)}"
            )

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
        return self.fn.abstract_params

    def abstract_state(
        self, stream: TaskStream, seeds: Sequence[int], hparams: Mapping[str, Sequence[float]] | None = None
    ) -> RunState:
        """Shapes and dtypes of the state of these runs, without allocating (to restore into).

        Checks what :meth:`init` checks (the model against the stream, seeds, hyperparameters) first.
        """
        self._check_stream(stream)
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
        return self._evaluate_init(state.params, state.model_state, stream)

    def run_task(
        self,
        state: RunState,
        stream: TaskStream,
        task: int,
        *,
        on_chunk: Callable[[int, int, dict], None] | None = None,
    ) -> tuple[RunState, TaskOutput]:
        """Trains every run on task ``task``: its start, one compiled chunk per evaluation point, its end.

        ``state`` is donated: use the returned state, not the argument, afterwards. ``on_chunk(done,
        total, metrics)`` is called on the host after every chunk (``done`` of ``total`` steps of the task,
        ``metrics`` the chunk's per-run means), e.g. for progress.
        """
        n_epochs = self._n_epochs(stream)
        task_ = jnp.asarray(task, jnp.int32)
        state = self._begin(state, stream, task_)
        points = self.config.eval_steps
        curve, spans = [], []
        first = 0
        for i, end in enumerate(points):
            last = i == len(points) - 1
            state, m = self.engine.run(state, stream, task_, n_epochs, count=end - first)
            if not last:
                curve.append(self._evaluate_runs(state, stream))
            spans.append(m)
            first = end
            if on_chunk is not None:
                on_chunk(end, self.config.steps_per_task, m)
        state, acc_row = self._end(state, stream, task_)
        stack = lambda k: jnp.stack([m[k] for m in spans], 1)
        n_runs = acc_row.shape[0]
        return state, TaskOutput(
            acc_row=acc_row,
            curve=jnp.stack(curve, 1) if curve else jnp.zeros((n_runs, 0, stream.n_tasks), jnp.float32),
            loss=stack("loss"),
            train_acc=stack("acc"),
            norms={k: stack(k) for k in NORMS},
        )

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
        progress: bool | None = None,
    ) -> StreamResult:
        """Runs the whole stream for every seed (and every sweep point) in one program.

        Args:
          stream: the task stream.
          seeds: the seeds; with ``sweep``, every seed runs at every combination of values.
          sweep: hyperparameter values to sweep, e.g. ``{"lam": [1, 10, 100]}`` for a strategy field or
            ``{"optimizer.learning_rate": [...]}`` (see :meth:`init`). The runs are the product of all
            value lists and the seeds, sweep-major, each a row of the result (``result.runs``).
          mesh: optional device mesh with one axis over which runs are sharded.
          on_task_end: called on the host after each task with the task index, the state and the
            results so far (rows of later tasks still zero).
          init_params: start every run (or, stacked, each run) from these parameters; see :meth:`init`.
          progress: a progress line (a bar in Jupyter) with an ETA after every chunk; ``None`` follows
            ``NESTLEARN_PROGRESS``.

        Returns:
          A :class:`StreamResult` with one row per run.
        """
        runs = run_grid(seeds, sweep or {})
        hparams = {k: [r[k] for r in runs] for k in (sweep or {})}
        state = self.init(stream, [r["seed"] for r in runs], mesh, hparams, init_params)
        recorder = Recorder(self.config, stream, runs)
        recorder.record_init(self.evaluate(state, stream))
        steps = self.config.steps_per_task
        bar = Progress(stream.n_tasks * steps, f"{type(self.strategy).__name__}", enabled=progress)
        for task in range(stream.n_tasks):
            report = task_progress(bar, task, stream.n_tasks, steps) if bar.enabled else None
            state, out = self.run_task(state, stream, task, on_chunk=report)
            recorder.record_task(task, out, state.diverged_step)
            if on_task_end is not None:
                on_task_end(task, state, recorder.result())
        return recorder.result()


def task_progress(bar: Progress, task: int, n_tasks: int, steps_per_task: int) -> Callable:
    """The ``on_chunk`` callback of :meth:`Learner.run_task` that reports a task's chunks to ``bar``."""

    def report(done: int, total: int, metrics: dict) -> None:
        bar.update(task * steps_per_task + done, task=f"{task + 1}/{n_tasks}", loss=_mean(metrics["loss"]))

    return report


def _mean(values) -> float:
    """The mean over runs that have a value (NaN when none has)."""
    values = np.asarray(values, np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


class Recorder:
    """Accumulates task outputs on the host into the arrays of a :class:`StreamResult`.

    Its arrays are plain numpy, so they checkpoint with the run state and restore exactly.
    """

    def __init__(self, config: TrainConfig, stream: TaskStream, runs: Sequence[dict]) -> None:
        self.config = config
        self.runs = tuple(runs)
        n_seeds = len(self.runs)
        self.task_names = stream.task_names or tuple(f"task {t}" for t in range(stream.n_tasks))
        steps_in_task = config.eval_steps
        t, per = stream.n_tasks, len(steps_in_task)
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
            **{f"norm_{k}": np.full((n_seeds, 1 + t * per), np.nan, np.float32) for k in NORMS},
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
        for k in NORMS:
            self.arrays[f"norm_{k}"][:, sl] = np.asarray(out.norms[k])
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
            norms={k: a[f"norm_{k}"].copy() for k in NORMS},
        )
