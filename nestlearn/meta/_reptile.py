"""Reptile: move the initialisation toward the parameters each task adapts to."""

from __future__ import annotations

from typing import final

import flax.struct
import jax
import jax.numpy as jnp
import optax

from nestlearn.meta._base import InnerProblem, MetaLearner, Metrics, identity, pre_loss
from nestlearn.meta._inner import LossFn, Params, adapt
from nestlearn.tasks._meta import TaskBatch


@final
@flax.struct.dataclass
class Reptile(MetaLearner):
    """Reptile: the meta-gradient is the displacement of adaptation, ``θ − φ``, averaged over tasks.

    .. math::

      φ_t = \\text{adapt}(θ; \\mathcal{D}^{s}_t),\\qquad g = \\frac1T \\sum_t (θ − φ_t)

    ``meta_grad`` returns the pseudo-gradient ``g``, so any outer optax optimizer applies it:
    ``optax.sgd(ε)`` gives the paper's update ``θ ← θ + ε (\\bar φ − θ)``. No derivative of the inner
    loop is taken. The inner loop adapts on the support set (full batch at every step); the query set
    only serves the metrics ``loss_pre`` and ``loss_post``.

    Attributes:
      loss_fn: ``loss_fn(params, x, y) -> scalar`` (static).
      inner_opt: the inner optimizer, e.g. ``optax.sgd(0.02)`` or ``optax.adam(1e-3)`` (static).
      steps: inner steps per task (static).

    Example:
      >>> reptile = Reptile(lambda p, x, y: jnp.mean((p - y) ** 2), optax.sgd(0.25), steps=1)
      >>> from nestlearn.tasks._meta import TaskBatch
      >>> y = 2 * jnp.ones((1, 4))
      >>> g, _ = reptile.meta_grad(jnp.zeros(()), TaskBatch(y, y, y, y))
      >>> float(g)  # θ − φ with φ = 0 − 0.25 · (−4)
      -1.0

    Reference: Nichol, Achiam, Schulman, "On First-Order Meta-Learning Algorithms", 2018.
    """

    loss_fn: LossFn = flax.struct.field(pytree_node=False)
    inner_opt: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    steps: int = flax.struct.field(pytree_node=False, default=5)

    def init(self, params: Params) -> Params:
        return params

    def inner_problem(self, meta_params: Params) -> InnerProblem:
        return InnerProblem(self.loss_fn, meta_params, None, identity)

    def meta_grad(self, meta_params: Params, tasks: TaskBatch) -> tuple[Params, Metrics]:
        theta = jax.lax.stop_gradient(meta_params)

        def one(task: TaskBatch):
            phi = adapt(
                self.loss_fn,
                theta,
                task.support_x,
                task.support_y,
                inner_opt=self.inner_opt,
                steps=self.steps,
            )
            post = self.loss_fn(phi, task.query_x, task.query_y)
            pre = pre_loss(self, theta, task)
            return jax.tree.map(lambda a, b: a - b, theta, phi), post, pre

        disp, post, pre = jax.vmap(one)(tasks)
        grads = jax.tree.map(lambda d: jnp.mean(d, axis=0), disp)
        return grads, {"loss_pre": jnp.mean(pre), "loss_post": jnp.mean(post)}
