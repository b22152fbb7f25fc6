"""The strategy contract, and the two reference strategies: naive fine-tuning and joint training.

A strategy owns a pytree state and five pure hooks the engine calls inside its compiled program:
``init`` (once per run), ``begin_task``, ``train_batch`` (may replace or extend the batch the engine
drew from the current task: replay, joint training), ``penalty`` (extra loss term: EWC, SI, LwF),
``after_step`` (per-step state update: SI's path integral) and ``end_task`` (Fisher for EWC, buffer fill
for replay). Every hook is jittable and vmappable, so a strategy runs under the engine's ``scan`` over
steps and ``vmap`` over seeds without knowing about either.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import final

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from nestlearn.tasks._stream import TaskStream

Params = PyTree
ApplyFn = Callable[[Params, Float[Array, "b d"]], Float[Array, "b c"]]


@flax.struct.dataclass
class Batch:
    """A training batch: inputs, targets and the task each example comes from (for its output mask)."""

    x: Float[Array, "b d"]
    y: Int[Array, " b"]
    task: Int[Array, " b"]


class Strategy(abc.ABC):
    """What a continual-learning strategy must provide. Concrete strategies are final.

    A concrete strategy is a frozen ``flax.struct.dataclass``: its fields are its hyperparameters, the
    pytree leaves (``lam: float``), which a sweep varies per run, and its structure, static fields
    (``buffer_size: int = flax.struct.field(pytree_node=False)``), which shape arrays. Every method is
    pure: it takes the strategy's state and returns a new one; the engine threads it through
    ``lax.scan`` and ``vmap``. Defaults do nothing, so a strategy overrides only what makes it that
    method.
    """

    def init(self, params: Params, stream: TaskStream) -> PyTree:
        """State at the start of a run (a pytree of arrays; ``()`` when stateless)."""
        del params, stream
        return ()

    def begin_task(self, state: PyTree, params: Params, task: Int[Array, ""]) -> PyTree:
        """Called before the first step of each task."""
        del params, task
        return state

    def train_batch(
        self, state: PyTree, stream: TaskStream, batch: Batch, task: Int[Array, ""], key: PRNGKeyArray
    ) -> Batch:
        """The batch to train on at this step, given the one the engine drew from the current task."""
        del state, stream, task, key
        return batch

    def penalty(self, state: PyTree, params: Params, batch: Batch, apply: ApplyFn) -> Float[Array, ""]:
        """Extra loss term added to the task loss (a regulariser, a distillation term)."""
        del state, params, batch, apply
        return jnp.zeros((), jnp.float32)

    def after_step(self, state: PyTree, params: Params, grads: Params, batch: Batch) -> PyTree:
        """Called after every optimizer step with the new parameters and the step's gradients."""
        del params, grads, batch
        return state

    def end_task(
        self, state: PyTree, params: Params, stream: TaskStream, task: Int[Array, ""], key: PRNGKeyArray
    ) -> PyTree:
        """Called after the last step of each task."""
        del params, stream, task, key
        return state


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

    def train_batch(
        self, state: PyTree, stream: TaskStream, batch: Batch, task: Int[Array, ""], key: PRNGKeyArray
    ) -> Batch:
        del state
        b = batch.y.shape[0]
        k_task, k_pos = jax.random.split(key)
        tasks = jax.random.randint(k_task, (b,), 0, task + 1, dtype=jnp.int32)
        u = jax.random.uniform(k_pos, (b,))
        n = stream.train_n[tasks]
        pos = jnp.minimum((u * n.astype(jnp.float32)).astype(jnp.int32), n - 1)
        x, y = stream.train_examples(tasks, pos)
        return Batch(x=x, y=y, task=tasks)
