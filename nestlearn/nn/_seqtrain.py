"""One trainer for every sequence model: chunks of steps in one ``jit``, seeds as a vmapped leading axis.

The task is a sampler ``sample(key) -> batch`` with fields ``tokens [B, T]``, ``positions [B, Q]`` and
``labels [B, Q]`` (int32; :class:`nestlearn.tasks.RecallBatch` is one), and only the query positions
carry a loss: the model's :meth:`~nestlearn.nn._seq.SequenceModel.logits_at` computes logits there only.
A label ``< 0`` marks a padding query, left out of loss and accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PRNGKeyArray

from nestlearn.engine import (
    Checkpoints,
    Engine,
    check_seeds,
    compile_once,
    nan_unless,
    norms,
    optimizer_values,
    run_chunks,
    run_keys,
    shard_runs,
)

Sampler = Callable[[PRNGKeyArray], Any]

# Streams folded into a run's key: the model's initialisation, training batches, evaluation batches and
# telemetry batches never share a key.
_MODEL, _DATA, _EVAL, _TELEMETRY = 0, 1, 2, 3


class SeqTrainState(flax.struct.PyTreeNode):
    """What a training run carries from one step (and one chunk) to the next.

    Attributes:
      params: the model's ``nnx.Param`` state, what the optimizer updates.
      opt_state: the optimizer's state.
      buffers: the model's other state (non-``Param`` variables), carried unchanged; usually empty.
      step: steps done so far (int32); step ``s`` trains on ``sample(fold_in(data_key, s))``.
      diverged_step: the first step whose loss or update was not finite, ``-1`` while none was (int32).
        From that step on the run's parameters stay frozen (its optimizer state is no longer
        meaningful).
    """

    params: nnx.State
    opt_state: optax.OptState
    buffers: nnx.State
    step: Int[Array, ""]
    diverged_step: Int[Array, ""]


def query_loss(
    logits: Float[Array, "batch queries vocab"], labels: Int[Array, "batch queries"]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    r"""Mean cross-entropy and accuracy over the valid queries (``labels >= 0``).

    .. math::
      \ell = \frac{1}{|V|}\sum_{(b,q)\in V} -\log \mathrm{softmax}(z_{bq})_{y_{bq}},\qquad
      \mathrm{acc} = \frac{1}{|V|}\sum_{(b,q)\in V} [\arg\max z_{bq} = y_{bq}].

    Args:
      logits: ``[batch, queries, vocab]``.
      labels: int ``[batch, queries]``; negative entries are ignored.

    Returns:
      ``(loss, accuracy)``, float32 scalars (0 when no query is valid).
    """
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    n = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    loss = jnp.where(valid, ce, 0.0).sum() / n
    hit = valid & (jnp.argmax(logits, -1) == safe)
    return loss.astype(jnp.float32), (hit.sum().astype(jnp.float32) / n)


class SeqTrainer:
    r"""Trains a sequence model on a sampled task for ``steps`` steps, ``chunk`` steps per compiled call.

    Step ``s`` of a run draws ``batch = sample(fold_in(data_key, s))``, takes the gradient of the mean
    query cross-entropy (:func:`query_loss` on ``model.logits_at(batch.tokens, batch.positions)``) and
    applies ``optimizer``. The steps of a chunk run under ``lax.scan`` inside one ``jit``; seeds (and
    optionally per-run optimizer hyperparameters) are a vmapped leading axis, so :meth:`run_seeds` is one
    program called ``steps / chunk`` times, with host control (logging) only between chunks.

    A run whose loss or update is not finite (or whose update norm overflows float32) records that step
    in ``diverged_step`` and is frozen from then on (the engine's policy, :class:`nestlearn.engine.Guard`):
    its state keeps its last finite values and its recorded losses and evaluation are NaN. Results keep every seed's numbers with a ``diverged`` mask; :func:`finite_mean`
    averages the others and says how many it left out.

    Keys: seed ``i`` gives ``key = jax.random.key(i)``; the model is built from ``fold_in(key, 0)``,
    training batches from ``fold_in(key, 1)``, evaluation from ``fold_in(key, 2)`` and telemetry from
    ``fold_in(key, 3)``, so evaluation batches are never training batches (up to sampler collisions).

    Built on :class:`nestlearn.engine.Engine` (chunks of steps under ``lax.scan`` in one ``jit``, runs
    vmapped, the state donated between chunks, ``diverged_step`` recorded) and optax.

    Args:
      model_fn: ``model_fn(rngs) -> SequenceModel`` (anything with ``logits_at``; ``telemetry`` optional).
      optimizer: any ``optax.GradientTransformation`` over the model's ``nnx.Param`` state, e.g.
        ``optax.adam(1e-3)`` or ``nestlearn.nn.cms_optimizer(optax.adam(1e-3), (1, 4, 16))``.
      sample: ``sample(key) -> batch``, jittable, a training batch.
      steps: keyword-only; training steps per run.
      chunk: keyword-only; steps per compiled call (default ``min(steps, 100)``); must divide ``steps``.
      eval_batches: keyword-only; fresh batches for the final evaluation (default 8).
      eval_sample: keyword-only; the evaluation sampler (default ``sample``), e.g. another task setting.
      telemetry: keyword-only; record ``model.telemetry(tokens)`` on one batch at the end of every chunk
        (needs a model with ``telemetry``; default ``False``).
      compiler_options: keyword-only; passed to ``jax.jit`` for the chunk.

    Attributes:
      n_traces: how many times the chunk has been traced; it grows only when a new number of runs (or
        new shapes) forces a recompilation, never from one chunk to the next.

    Example:
      >>> trainer = SeqTrainer(lambda rngs: transformer(vocab=64, d_model=32, rngs=rngs),
      ...     optax.adam(3e-3), sample, steps=1000, chunk=100)          # doctest: +SKIP
      >>> res = trainer.run_seeds([0, 1, 2])                            # doctest: +SKIP
      >>> finite_mean(res["eval_acc"], res["diverged"])                 # doctest: +SKIP
      (0.97, 0)
    """

    def __init__(
        self,
        model_fn: Callable[[nnx.Rngs], nnx.Module],
        optimizer: optax.GradientTransformation,
        sample: Sampler,
        *,
        steps: int,
        chunk: int | None = None,
        eval_batches: int = 8,
        eval_sample: Sampler | None = None,
        telemetry: bool = False,
        compiler_options: dict | None = None,
    ) -> None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        chunk = min(steps, 100) if chunk is None else chunk
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1 or steps % chunk:
            raise ValueError(f"chunk must be a positive int dividing steps={steps}, got {chunk!r}")
        if not isinstance(eval_batches, int) or isinstance(eval_batches, bool) or eval_batches < 1:
            raise ValueError(f"eval_batches must be a positive int, got {eval_batches!r}")
        abstract = jax.eval_shape(lambda: model_fn(nnx.Rngs(0)))
        if not callable(getattr(abstract, "logits_at", None)):
            raise ValueError(
                f"model_fn must build a model with logits_at(tokens, positions), got {type(abstract).__name__}"
            )
        if telemetry and not callable(getattr(abstract, "telemetry", None)):
            raise ValueError(
                f"telemetry=True needs a model with telemetry(tokens); {type(abstract).__name__} has none"
            )
        self.model_fn = model_fn
        self.optimizer = optimizer
        self.sample = sample
        self.eval_sample = sample if eval_sample is None else eval_sample
        self.steps = steps
        self.chunk = chunk
        self.eval_batches = eval_batches
        self.record_telemetry = telemetry
        self._graphdef = nnx.split(abstract, nnx.Param, ...)[0]
        # The engine runs the steps: a guarded step under lax.scan, vmapped over runs, jit with donation;
        # the model's statistics on one batch are read after every chunk when telemetry is on.
        self.engine = Engine(
            self.step,
            length=chunk,
            in_axes=(0,),
            evaluate=self._chunk_telemetry if telemetry else None,
            compiler_options=compiler_options,
        )
        self._chunk = self.engine._runs
        self._init = compile_once(self.init_one)
        self._evaluate = compile_once(
            lambda params, buffers, key: self.evaluate(
                params, self.eval_sample, key, self.eval_batches, buffers=buffers
            )
        )

    @property
    def n_traces(self) -> int:
        """Times the chunk was traced (a retrace means a recompilation)."""
        return self.engine.n_traces

    # -- the pure, per-run pieces ----------------------------------------------------------------

    def apply(self, params: nnx.State, buffers: nnx.State | None = None) -> nnx.Module:
        """The model with these parameters (``nnx.merge``), to call inside a pure function."""
        if buffers is None:
            return nnx.merge(self._graphdef, params)
        return nnx.merge(self._graphdef, params, buffers)

    def loss(self, params: nnx.State, buffers: nnx.State | None, batch) -> tuple[Array, Array]:
        """``(loss, accuracy)`` of the model on ``batch`` (:func:`query_loss` at the query positions)."""
        logits = self.apply(params, buffers).logits_at(batch.tokens, batch.positions)
        return query_loss(logits, batch.labels)

    def init_one(self, key: PRNGKeyArray, hparams: Mapping[str, Array]) -> SeqTrainState:
        """One run's state before training: the model from ``fold_in(key, 0)``, the optimizer's state.

        ``hparams`` are set into an ``optax.inject_hyperparams`` state by name (``{}`` for none).
        """
        model = self.model_fn(nnx.Rngs(jax.random.fold_in(key, _MODEL)))
        _, params, buffers = nnx.split(model, nnx.Param, ...)
        opt_state = self.optimizer.init(params)
        if hparams:
            opt_state = optax.tree_utils.tree_set(opt_state, **hparams)
        return SeqTrainState(
            params=params,
            opt_state=opt_state,
            buffers=buffers,
            step=jnp.zeros((), jnp.int32),
            diverged_step=jnp.full((), -1, jnp.int32),
        )

    def step(self, s: SeqTrainState, key: PRNGKeyArray) -> tuple[SeqTrainState, dict[str, Array]]:
        """One training step of one run (pure; the engine guards it and counts it).

        Returns the new state and the step's ``loss`` and ``acc`` (measured before its update) with the
        global norm of its update, ``update_norm`` (a non-finite one is divergence).
        """
        batch = self.sample(jax.random.fold_in(jax.random.fold_in(key, _DATA), s.step))
        (loss, acc), grads = jax.value_and_grad(self.loss, has_aux=True)(s.params, s.buffers, batch)
        updates, opt_state = self.optimizer.update(grads, s.opt_state, s.params)
        params = optax.apply_updates(s.params, updates)
        return s.replace(params=params, opt_state=opt_state), {
            "loss": loss,
            "acc": acc,
            **norms(updates=updates),
        }

    def _chunk_telemetry(self, state: SeqTrainState, key: PRNGKeyArray) -> dict[str, Any]:
        batch = self.sample(jax.random.fold_in(jax.random.fold_in(key, _TELEMETRY), state.step))
        return {"telemetry": self.apply(state.params, state.buffers).telemetry(batch.tokens)}

    def chunk_one(self, state: SeqTrainState, key: PRNGKeyArray) -> tuple[SeqTrainState, dict[str, Any]]:
        """``chunk`` training steps of one run (pure, unjitted; :meth:`run_seeds` compiles it vmapped).

        Returns:
          The new state and the per-step metrics of :meth:`step`, each ``[chunk]`` (NaN once the run has
          diverged), plus ``"telemetry"`` (the model's statistics on one batch after the chunk) when the
          trainer records telemetry.
        """
        return self.engine.chunk(state, key)

    def evaluate(
        self,
        params: nnx.State,
        sample: Sampler,
        key: PRNGKeyArray,
        batches: int,
        *,
        buffers: nnx.State | None = None,
    ) -> dict[str, Array]:
        """Mean query accuracy and loss of one run on ``batches`` batches ``sample(fold_in(key, i))``.

        Pure and jittable (``sample`` and ``batches`` static); the batches run in sequence
        (``lax.map``) to bound memory.

        Returns:
          ``{"acc": float32, "loss": float32}``, each the mean over the batches.
        """

        def one(i):
            return self.loss(params, buffers, sample(jax.random.fold_in(key, i)))

        loss, acc = jax.lax.map(one, jnp.arange(batches, dtype=jnp.int32))
        return {"acc": acc.mean(), "loss": loss.mean()}

    # -- the host side ---------------------------------------------------------------------------

    def init(
        self,
        seeds: Sequence[int],
        *,
        hparams: Mapping[str, Sequence[float]] | None = None,
        mesh: Mesh | None = None,
    ) -> SeqTrainState:
        """The state of every run (leading seed axis), sharded over ``mesh``'s ``"seeds"`` axis if given."""
        keys = self._keys(seeds)
        return shard_runs(self._init(keys, self._hparams(hparams, len(seeds))), mesh)

    def run_chunk(self, state: SeqTrainState, seeds: Sequence[int]) -> tuple[SeqTrainState, dict[str, Any]]:
        """One compiled chunk for every run; ``state`` is donated (use the returned one)."""
        return self._chunk(state, self._keys(seeds))

    def run_seeds(
        self,
        seeds: Sequence[int],
        *,
        hparams: Mapping[str, Sequence[float]] | None = None,
        mesh: Mesh | None = None,
        log: Callable[[dict[str, Any]], None] | None = None,
        progress: bool | None = None,
        checkpoints: Checkpoints | None = None,
    ) -> dict[str, Any]:
        """Trains one run per seed, all in one program, and evaluates them.

        Args:
          seeds: the seed of each run (ints).
          hparams: keyword-only; per-run optimizer hyperparameters, ``{name: one value per run}``, set in
            an ``optax.inject_hyperparams`` state (e.g. ``{"learning_rate": [1e-3, 3e-3]}``).
          mesh: keyword-only; a mesh with a ``"seeds"`` axis to shard the runs over.
          log: keyword-only; called after every chunk with ``{"chunk", "step", "loss", "acc",
            "diverged"}`` (per-run chunk means of the training loss and accuracy, and the diverged mask).
          progress: keyword-only; a progress line (a bar in Jupyter) with an ETA after every chunk;
            ``None`` follows ``NESTLEARN_PROGRESS``.
          checkpoints: keyword-only; a :class:`nestlearn.engine.Checkpoints`: the state and the per-step
            losses so far are saved after every chunk (step = chunks done), and a run that finds
            checkpoints there resumes after the newest one, with results identical to an uninterrupted
            run (:func:`nestlearn.engine.run_chunks`).

        Returns:
          A dict of numpy arrays, one row per run: ``seeds [S]``; ``loss`` and ``acc`` ``[S, steps]``
          (per step, NaN after divergence); ``curve_step [C]``, ``curve_loss`` and ``curve_acc`` ``[S, C]``
          (chunk means, the learning curve); ``eval_acc`` and ``eval_loss`` ``[S]`` (on
          ``eval_batches`` fresh batches of ``eval_sample``); ``diverged_step [S]`` and ``diverged [S]``;
          ``telemetry`` (``{name: [S, C, ...]}``, empty unless recorded); and ``state``, the final
          :class:`SeqTrainState` (device arrays, to continue or evaluate elsewhere).
        """
        seeds = check_seeds(seeds)
        keys = self._keys(seeds)
        n_chunks = self.steps // self.chunk

        state, chunks = run_chunks(
            self.engine,
            self.init(seeds, hparams=hparams, mesh=mesh),
            keys,
            n_chunks=n_chunks,
            steps_per_chunk=self.chunk,
            checkpoints=checkpoints,
            mesh=mesh,
            progress=progress,
            desc=type(self).__name__,
            log=log,
        )
        loss = np.concatenate([m["loss"] for m in chunks], 1)
        acc = np.concatenate([m["acc"] for m in chunks], 1)
        telemetry = [m["telemetry"] for m in chunks if "telemetry" in m]
        ev = self._evaluate(
            state.params, state.buffers, jax.vmap(lambda k: jax.random.fold_in(k, _EVAL))(keys)
        )
        diverged_step = np.asarray(state.diverged_step)
        ev = nan_unless(diverged_step < 0, jax.tree.map(np.asarray, ev))  # a diverged run has no score
        return {
            "seeds": np.asarray(seeds),
            "loss": loss,
            "acc": acc,
            "curve_step": np.arange(1, n_chunks + 1) * self.chunk,
            "curve_loss": loss.reshape(len(seeds), n_chunks, self.chunk).mean(2),
            "curve_acc": acc.reshape(len(seeds), n_chunks, self.chunk).mean(2),
            "eval_acc": np.asarray(ev["acc"]),
            "eval_loss": np.asarray(ev["loss"]),
            "diverged_step": diverged_step,
            "diverged": diverged_step >= 0,
            "telemetry": {k: np.stack([t[k] for t in telemetry], 1) for k in telemetry[0]}
            if telemetry
            else {},
            "state": state,
        }

    @staticmethod
    def _keys(seeds: Sequence[int]) -> PRNGKeyArray:
        return run_keys(seeds)

    def _hparams(self, hparams: Mapping[str, Sequence[float]] | None, n: int) -> dict[str, Array]:
        abstract_params = nnx.split(jax.eval_shape(lambda: self.model_fn(nnx.Rngs(0))), nnx.Param, ...)[1]
        return optimizer_values(self.optimizer, abstract_params, hparams or {}, n)


def _abstract(tree: Any, mesh: Mesh | None) -> Any:
    """Shapes and dtypes of a state, with its sharding on a mesh (the target to restore a checkpoint into)."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding if mesh is not None else None),
        tree,
    )


def finite_mean(values: np.ndarray, diverged: np.ndarray) -> tuple[np.ndarray, int]:
    """The mean over runs (axis 0) of the runs that did not diverge, and how many were left out.

    Args:
      values: per-run values, ``[S, ...]`` (e.g. ``results["eval_acc"]`` or ``results["curve_loss"]``).
      diverged: bool ``[S]``, ``results["diverged"]``.

    Returns:
      ``(mean, n_left_out)``; the mean is NaN (never a number) when every run diverged.

    Example:
      >>> finite_mean(np.array([0.9, 0.1, 0.7]), np.array([False, True, False]))
      (np.float64(0.8), 1)
    """
    values, diverged = np.asarray(values), np.asarray(diverged, bool)
    if diverged.shape != values.shape[:1]:
        raise ValueError(f"diverged must have shape {values.shape[:1]} (one per run), got {diverged.shape}")
    kept = values[~diverged]
    mean = kept.mean(0) if len(kept) else np.full(values.shape[1:], np.nan)
    return mean, int(diverged.sum())
