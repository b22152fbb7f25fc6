"""The meta-learner contract: what every algorithm of the MAML family provides."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PyTree

from nestlearn.meta._inner import LossFn, Params, adapt, adapt_trajectory
from nestlearn.tasks._meta import TaskBatch

MetaParams = PyTree
Metrics = dict[str, Float[Array, ""]]


class InnerProblem(NamedTuple):
    """What a learner's inner loop solves, given its meta-parameters.

    Attributes:
      loss: ``loss(inner_params, x, y)``, the inner objective (iMAML adds its proximal term here).
      start: the inner loop's starting point (θ, or ANIL's head).
      lrs: per-parameter learning rates multiplying the inner optimizer's updates, or ``None``.
      finish: maps inner parameters to the model's full parameters (ANIL puts the head back on the body).
    """

    loss: LossFn
    start: Params
    lrs: Params | None
    finish: Callable[[Params], Params]


class MetaLearner(abc.ABC):
    """What a meta-learner of the MAML family must provide. Concrete learners are final.

    A concrete learner is a frozen ``flax.struct.dataclass``: float hyperparameters (iMAML's ``lam``,
    Meta-SGD's ``init_lr``) are pytree leaves, so a sweep can vmap over them; the loss, the inner
    optimizer and the number of inner steps are static fields (``loss_fn``, ``inner_opt``, ``steps``).
    Every method is pure and jittable; ``meta_grad`` and ``evaluate`` vmap over the task axis of a
    :class:`~nestlearn.tasks._meta.TaskBatch` themselves.

    Subclasses implement :meth:`init`, :meth:`inner_problem` and :meth:`meta_grad`; :meth:`params`,
    :meth:`adapt` and :meth:`evaluate` follow from the inner problem.
    """

    loss_fn: LossFn
    inner_opt: optax.GradientTransformation
    steps: int

    @abc.abstractmethod
    def init(self, params: Params) -> MetaParams:
        """Meta-parameters that start meta-training from the model parameters ``params``."""

    @abc.abstractmethod
    def inner_problem(self, meta_params: MetaParams) -> InnerProblem:
        """The inner loop's objective, starting point, learning rates and read-out."""

    @abc.abstractmethod
    def meta_grad(self, meta_params: MetaParams, tasks: TaskBatch) -> tuple[MetaParams, Metrics]:
        """The meta-gradient averaged over the tasks, and metrics.

        Returns:
          ``(grads, metrics)``: ``grads`` has the structure of ``meta_params``, ready for any outer optax
          optimizer (descend on it); ``metrics`` holds ``loss_pre`` and ``loss_post``, the query loss
          before and after adaptation on the support set, averaged over tasks.
        """

    def params(self, meta_params: MetaParams) -> Params:
        """The model parameters the meta-parameters start every task from (the learned initialisation)."""
        prob = self.inner_problem(meta_params)
        return prob.finish(prob.start)

    def adapt(self, meta_params: MetaParams, x: Array, y: Array, steps: int | None = None) -> Params:
        """Model parameters adapted to one task's data ``(x, y)`` by ``steps`` inner steps (default
        the learner's own ``steps``)."""
        prob = self.inner_problem(meta_params)
        n = self.steps if steps is None else steps
        phi = adapt(prob.loss, prob.start, x, y, inner_opt=self.inner_opt, steps=n, lrs=prob.lrs)
        return prob.finish(phi)

    def evaluate(self, meta_params: MetaParams, tasks: TaskBatch, max_steps: int) -> Float[Array, " s"]:
        """Query loss after ``0..max_steps`` inner steps on the support set, averaged over tasks.

        One scan per task records the query loss along the way (no re-running for every step count).

        Returns:
          An array of shape ``[max_steps + 1]``; entry ``i`` is the mean query loss after ``i`` steps.
        """
        meta_params = jax.lax.stop_gradient(meta_params)

        def one(task: TaskBatch) -> Array:
            prob = self.inner_problem(meta_params)

            def metric(h):
                return self.loss_fn(prob.finish(h), task.query_x, task.query_y)

            return adapt_trajectory(
                prob.loss,
                prob.start,
                task.support_x,
                task.support_y,
                metric,
                inner_opt=self.inner_opt,
                steps=max_steps,
                lrs=prob.lrs,
            )[1]

        return jnp.mean(jax.vmap(one)(tasks), axis=0)


def identity(p: Params) -> Params:
    """The read-out of learners that adapt every parameter."""
    return p


def pre_loss(learner: MetaLearner, meta_params: MetaParams, task: TaskBatch) -> Float[Array, ""]:
    """The query loss of the learned initialisation (before adaptation), as a value only."""
    return learner.loss_fn(learner.params(jax.lax.stop_gradient(meta_params)), task.query_x, task.query_y)
