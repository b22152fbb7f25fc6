"""The strategy contract, and the two reference strategies: naive fine-tuning and joint training.

A strategy owns a pytree state and pure hooks the engine calls inside its compiled program: ``init``
(once per run), ``begin_task``, ``train_batch`` (replace or extend the batch the engine drew from the
current task: replay, joint training), ``penalty`` (extra loss term: EWC, SI, LwF), ``transform_grads``
(A-GEM's projection), ``after_step`` (SI's path integral; parameter surgery such as continual backprop)
and ``end_task`` (Fisher for EWC, buffer fill for replay, weight interpolation). Each hook receives a
:class:`Context` (the stream, the task, the step, a fresh key, the model as a function). Every hook is
jittable and vmappable, so a strategy runs under the engine's ``scan`` over steps and ``vmap`` over
runs without knowing about either.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import final

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from nestlearn.tasks._stream import TaskStream

Params = PyTree
ApplyFn = Callable[[Params, Float[Array, "b d"]], Float[Array, "b c"]]


@flax.struct.dataclass
class Batch:
    """A training batch: inputs, targets, the task of each example (for its output mask), and weights.

    ``weight`` scales each example's loss (``None``: all ones); the task loss is the weighted mean, so a
    strategy can append examples that may not exist yet (an empty replay buffer) with weight 0.
    """

    x: Float[Array, "b d"]
    y: Int[Array, " b"]
    task: Int[Array, " b"]
    weight: Float[Array, " b"] | None = None

    def mean(self, values: Float[Array, " b"]) -> Float[Array, ""]:
        """The weighted mean of per-example ``values`` (the plain mean without weights)."""
        if self.weight is None:
            return values.mean()
        # Rows of weight 0 (placeholders) count for nothing, even when their value is inf or NaN.
        weighted = jnp.where(self.weight > 0, values * self.weight, 0.0)
        return weighted.sum() / jnp.maximum(self.weight.sum(), 1e-12)


@flax.struct.dataclass
class Context:
    """What the engine tells a strategy hook: where in the stream it is and how to run the model.

    Attributes:
      stream: the task stream (all of its tasks, as arrays); ``None`` in online runs whose data are
        generated step by step (``run_online_regression``).
      task: the task being trained (int32 scalar).
      step: global optimizer steps taken so far (int32 scalar).
      key: a PRNG key of this hook call's own (every hook call gets a fresh one).
      apply: the model as a pure function ``apply(params, x) -> logits`` (static).
      features: ``features(params, x) -> (logits, hidden activations)`` when the model has a
        ``features`` method (``nn.MLP`` does), else ``None`` (static).
    """

    stream: TaskStream | None
    task: Int[Array, ""]
    step: Int[Array, ""]
    key: PRNGKeyArray
    apply: ApplyFn = flax.struct.field(pytree_node=False)
    features: Callable | None = flax.struct.field(pytree_node=False, default=None)

    def logits(self, params: Params, x: Float[Array, "b d"], task: Int[Array, " b"]) -> Float[Array, "b c"]:
        """The model's outputs with the units each example's task may not use masked to ``-inf``."""
        return jnp.where(self.stream.class_mask[task], self.apply(params, x), -jnp.inf)

    def losses(self, params: Params, batch: Batch) -> Float[Array, " b"]:
        """Per-example cross-entropy over the units of each example's task (the engine's task loss)."""
        logits = self.logits(params, batch.x, batch.task)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)

    def loss(self, params: Params, batch: Batch) -> Float[Array, ""]:
        """Weighted mean of :meth:`losses`: the loss the engine minimises before any strategy penalty."""
        return batch.mean(self.losses(params, batch))


class Strategy(abc.ABC):
    """What a continual-learning strategy must provide. Concrete strategies are final.

    A concrete strategy is a frozen ``flax.struct.dataclass``: its fields are its hyperparameters, the
    pytree leaves (``lam: float``), which a sweep varies per run, and its structure, static fields
    (``buffer_size: int = flax.struct.field(pytree_node=False)``), which shape arrays. Every method is
    pure: it takes the strategy's state and returns a new one; the engine threads it through
    ``lax.scan`` and ``vmap``. Defaults do nothing, so a strategy overrides only what makes it that
    method. At every step the engine calls, in order: ``train_batch``, ``penalty`` (inside the
    gradient), ``transform_grads``, the optimizer, ``after_step``.
    """

    def init(self, params: Params, stream: TaskStream) -> PyTree:
        """State at the start of a run (a pytree of arrays; ``()`` when stateless)."""
        del params, stream
        return ()

    def begin_task(self, state: PyTree, params: Params, ctx: Context) -> PyTree:
        """Called before the first step of each task."""
        del params, ctx
        return state

    def train_batch(self, state: PyTree, batch: Batch, ctx: Context) -> Batch:
        """The batch to train on at this step, given the one the engine drew from the current task.

        It may have another size than the engine's (replay appends memory samples).
        """
        del state, ctx
        return batch

    def penalty(self, state: PyTree, params: Params, batch: Batch, ctx: Context) -> Float[Array, ""]:
        """Extra loss term added to the task loss (a regulariser, a distillation term)."""
        del state, params, batch, ctx
        return jnp.zeros((), jnp.float32)

    def transform_grads(
        self, state: PyTree, params: Params, grads: Params, batch: Batch, ctx: Context
    ) -> Params:
        """The gradient the optimizer receives (A-GEM projects it here)."""
        del state, params, batch, ctx
        return grads

    def after_step(
        self, state: PyTree, params: Params, grads: Params, batch: Batch, ctx: Context
    ) -> tuple[PyTree, Params]:
        """Called after every optimizer step with the new parameters and the step's gradients.

        Returns the new state and the parameters to continue from (changed by e.g. continual backprop).
        """
        del grads, batch, ctx
        return state, params

    def end_task(self, state: PyTree, params: Params, ctx: Context) -> tuple[PyTree, Params]:
        """Called after the last step of each task; returns the new state and parameters."""
        del ctx
        return state, params


@final
@flax.struct.dataclass
class Naive(Strategy):
    """Fine-tuning: train on each task in turn and nothing else; the lower bound of every comparison."""


@final
@flax.struct.dataclass
class Joint(Strategy):
    """Cumulative joint training, the usual upper bound.

    While task ``t`` trains, every example of every batch is drawn uniformly from tasks ``0..t`` (a task
    uniformly, then an example of that task uniformly), so the run sees all data so far at the same
    number of steps and the same batch size as the other strategies.
    """

    def train_batch(self, state: PyTree, batch: Batch, ctx: Context) -> Batch:
        del state
        b = batch.y.shape[0]
        k_task, k_pos = jax.random.split(ctx.key)
        tasks = jax.random.randint(k_task, (b,), 0, ctx.task + 1, dtype=jnp.int32)
        u = jax.random.uniform(k_pos, (b,))
        n = ctx.stream.train_n[tasks]
        pos = jnp.minimum((u * n.astype(jnp.float32)).astype(jnp.int32), n - 1)
        x, y = ctx.stream.train_examples(tasks, pos)
        return Batch(x=x, y=y, task=tasks)
