"""Meta-learners that differentiate through the inner loop: MAML (and first-order MAML), Meta-SGD, ANIL."""

from __future__ import annotations

from collections.abc import Callable
from typing import final

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PyTree

from nestlearn.meta._base import InnerProblem, MetaLearner, MetaParams, Metrics, identity, pre_loss
from nestlearn.meta._inner import LossFn, Params, adapt, plain_path
from nestlearn.tasks._meta import TaskBatch


def _unrolled_meta_grad(
    learner: MAML | MetaSGD | ANIL, meta_params: MetaParams, tasks: TaskBatch, truncate: int | None
) -> tuple[MetaParams, Metrics]:
    """∇ of the mean over tasks of ``L_query(finish(adapt(start)))`` through the unrolled inner loop."""

    def task_loss(mp: MetaParams, task: TaskBatch):
        prob = learner.inner_problem(mp)
        phi = adapt(
            prob.loss,
            prob.start,
            task.support_x,
            task.support_y,
            inner_opt=learner.inner_opt,
            steps=learner.steps,
            checkpoint=learner.checkpoint,
            segment_length=learner.segment_length,
            truncate=truncate,
            lrs=prob.lrs,
        )
        post = learner.loss_fn(prob.finish(phi), task.query_x, task.query_y)
        return post, pre_loss(learner, mp, task)

    def mean_loss(mp: MetaParams):
        post, pre = jax.vmap(task_loss, in_axes=(None, 0))(mp, tasks)
        return jnp.mean(post), jnp.mean(pre)

    (post, pre), grads = jax.value_and_grad(mean_loss, has_aux=True)(meta_params)
    return grads, {"loss_pre": pre, "loss_post": post}


@final
@flax.struct.dataclass
class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning: learn an initialisation θ from which a few inner steps fit a task.

    .. math::

      φ_t = \\text{adapt}(θ; \\mathcal{D}^{s}_t),\\qquad
      ∇_θ \\frac1T \\sum_t L(φ_t; \\mathcal{D}^{q}_t) = \\frac1T \\sum_t
      \\Big(\\frac{∂φ_t}{∂θ}\\Big)^{\\!⊤} ∇L(φ_t; \\mathcal{D}^{q}_t)

    With SGD inner steps ``∂φ/∂θ = Π_i (I − α ∇²L(φ_i))`` (second order, exact through the unroll).
    ``first_order=True`` is first-order MAML (FOMAML): ``∂φ/∂θ`` is replaced by the identity, the
    meta-gradient is ``∇L(φ_t; 𝒟^q_t)``; it equals ``truncate=0``.

    Meta-parameters are the model parameters themselves (``init`` is the identity).

    Attributes:
      loss_fn: ``loss_fn(params, x, y) -> scalar`` (static).
      inner_opt: the inner optimizer, e.g. ``optax.sgd(0.01)``; Adam needs ``eps_root > 0`` (static).
      steps: inner steps during meta-training (static).
      first_order: drop the second-order terms (static).
      checkpoint: rematerialisation of the inner loop under the meta-gradient: ``None``, ``"step"`` or
        ``"segments"`` (the sqrt(N) schedule), see :func:`nestlearn.meta.adapt` (static).
      segment_length: segment length for ``checkpoint="segments"`` (default ⌈√steps⌉) (static).
      truncate: backpropagate through the last ``truncate`` inner steps only (``None``: all) (static).

    Example:
      >>> from flax import nnx
      >>> from nestlearn.nn import MLP
      >>> from nestlearn.meta import functional, mse_loss
      >>> apply, params = functional(MLP(1, (40, 40), 1, rngs=nnx.Rngs(0)))
      >>> maml = MAML(mse_loss(apply), optax.sgd(0.01), steps=1)
      >>> meta_params = maml.init(params)   # then maml.meta_grad(meta_params, tasks)

    Reference: Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks", ICML 2017.
    """

    loss_fn: LossFn = flax.struct.field(pytree_node=False)
    inner_opt: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    steps: int = flax.struct.field(pytree_node=False, default=1)
    first_order: bool = flax.struct.field(pytree_node=False, default=False)
    checkpoint: str | None = flax.struct.field(pytree_node=False, default=None)
    segment_length: int | None = flax.struct.field(pytree_node=False, default=None)
    truncate: int | None = flax.struct.field(pytree_node=False, default=None)

    def init(self, params: Params) -> Params:
        return params

    def inner_problem(self, meta_params: Params) -> InnerProblem:
        return InnerProblem(self.loss_fn, meta_params, None, identity)

    def meta_grad(self, meta_params: Params, tasks: TaskBatch) -> tuple[Params, Metrics]:
        return _unrolled_meta_grad(self, meta_params, tasks, 0 if self.first_order else self.truncate)


class MetaSGDParams(flax.struct.PyTreeNode):
    """Meta-SGD's meta-parameters: the initialisation and the unconstrained log inner learning rates.

    ``log_lr`` has the structure of ``params``; the inner rate of each parameter is ``exp(log_lr)``.
    """

    params: PyTree
    log_lr: PyTree


@final
@flax.struct.dataclass
class MetaSGD(MetaLearner):
    """Meta-SGD: learn the initialisation and a learning rate for every parameter.

    .. math::

      φ_t = θ − \\exp(\\log α) ⊙ ∇L(θ; \\mathcal{D}^{s}_t)

    (one step; ``steps`` repeats it), meta-trained by differentiating the query loss with respect to
    both θ and ``log α`` through the unroll. The rates are stored as ``log_lr`` (unconstrained, so any
    outer optimizer keeps them positive). The inner direction comes from ``inner_opt``, whose updates
    are multiplied by the rates: the default ``optax.sgd(1.0)`` gives the paper's rule.

    Attributes:
      loss_fn: ``loss_fn(params, x, y) -> scalar`` (static).
      steps: inner steps (static).
      init_lr: the inner rate every parameter starts with (a pytree leaf).
      inner_opt: the inner update direction (static), ``optax.sgd(1.0)`` by default.
      checkpoint: rematerialisation of the inner loop under the meta-gradient: ``None``, ``"step"`` or
        ``"segments"`` (the sqrt(N) schedule), see :func:`nestlearn.meta.adapt` (static).
      segment_length: segment length for ``checkpoint="segments"`` (default ⌈√steps⌉) (static).
      truncate: backpropagate through the last ``truncate`` inner steps only (``None``: all) (static).

    Example:
      >>> msgd = MetaSGD(lambda p, x, y: jnp.mean((x * p - y) ** 2), steps=1, init_lr=0.01)
      >>> mp = msgd.init(jnp.zeros(3))
      >>> bool(jnp.allclose(jnp.exp(mp.log_lr), 0.01))
      True

    Reference: Li, Zhou, Chen, Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017.
    """

    loss_fn: LossFn = flax.struct.field(pytree_node=False)
    steps: int = flax.struct.field(pytree_node=False, default=1)
    init_lr: float = 0.01
    inner_opt: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=optax.sgd(1.0))
    checkpoint: str | None = flax.struct.field(pytree_node=False, default=None)
    segment_length: int | None = flax.struct.field(pytree_node=False, default=None)
    truncate: int | None = flax.struct.field(pytree_node=False, default=None)

    def init(self, params: Params) -> MetaSGDParams:
        log_lr = jax.tree.map(lambda p: jnp.full_like(p, jnp.log(jnp.asarray(self.init_lr, p.dtype))), params)
        return MetaSGDParams(params=params, log_lr=log_lr)

    def inner_problem(self, meta_params: MetaSGDParams) -> InnerProblem:
        return InnerProblem(
            self.loss_fn, meta_params.params, jax.tree.map(jnp.exp, meta_params.log_lr), identity
        )

    def meta_grad(self, meta_params: MetaSGDParams, tasks: TaskBatch) -> tuple[MetaSGDParams, Metrics]:
        return _unrolled_meta_grad(self, meta_params, tasks, self.truncate)


HeadFn = Callable[[tuple], bool]


def _head_mask(params: Params, head: HeadFn | None) -> list[bool]:
    paths = [plain_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if head is None:  # the last layer: every leaf sharing the parent path of the last leaf
        last = paths[-1][:-1]
        mask = [p[:-1] == last for p in paths]
    else:
        mask = [bool(head(p)) for p in paths]
    if not any(mask) or all(mask):
        raise ValueError(
            f"ANIL head must select some but not all parameters; it selected {sum(mask)} of {len(mask)} "
            f"(paths: {paths})"
        )
    return mask


@final
@flax.struct.dataclass
class ANIL(MetaLearner):
    """Almost No Inner Loop: adapt only the head; meta-learn body and head through the unroll.

    .. math::

      h_t = \\text{adapt}(h;\\, L(b, ·\\,; \\mathcal{D}^{s}_t)),\\qquad
      ∇_{(b, h)} \\frac1T \\sum_t L((b, h_t); \\mathcal{D}^{q}_t)

    The body ``b`` is fixed inside the inner loop but receives its meta-gradient through the adapted
    head (second order, unless ``first_order``). The inner optimizer sees the head's parameters only.

    Attributes:
      loss_fn: ``loss_fn(params, x, y) -> scalar`` (static).
      inner_opt: the inner optimizer of the head (static).
      steps: inner steps (static).
      head: predicate on a parameter's plain path (``('layers', 2, 'kernel')``: str/int keys, see
        :func:`nestlearn.meta.plain_path`) that is true for head parameters (static). ``None``: the last
        layer, i.e. the leaves sharing the parent path of the last leaf in pytree order (the output
        ``Linear`` of ``nestlearn.nn.MLP``).
      first_order: drop the second-order terms (static).
      checkpoint: rematerialisation of the inner loop under the meta-gradient: ``None``, ``"step"`` or
        ``"segments"`` (the sqrt(N) schedule), see :func:`nestlearn.meta.adapt` (static).
      segment_length: segment length for ``checkpoint="segments"`` (default ⌈√steps⌉) (static).
      truncate: backpropagate through the last ``truncate`` inner steps only (``None``: all) (static).

    Example:
      >>> loss = lambda p, x, y: jnp.mean((x * p["w"] + p["b"] - y) ** 2)
      >>> anil = ANIL(loss, optax.sgd(0.25), steps=1, head=lambda path: path[0] == "w")
      >>> phi = anil.adapt({"w": jnp.zeros(()), "b": jnp.zeros(())}, jnp.ones(4), 2 * jnp.ones(4))
      >>> float(phi["w"]), float(phi["b"])  # only the head "w" moved: 0 - 0.25 * (-4)
      (1.0, 0.0)

    Reference: Raghu, Raghu, Bengio, Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding
    the Effectiveness of MAML", ICLR 2020.
    """

    loss_fn: LossFn = flax.struct.field(pytree_node=False)
    inner_opt: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    steps: int = flax.struct.field(pytree_node=False, default=1)
    head: HeadFn | None = flax.struct.field(pytree_node=False, default=None)
    first_order: bool = flax.struct.field(pytree_node=False, default=False)
    checkpoint: str | None = flax.struct.field(pytree_node=False, default=None)
    segment_length: int | None = flax.struct.field(pytree_node=False, default=None)
    truncate: int | None = flax.struct.field(pytree_node=False, default=None)

    def init(self, params: Params) -> Params:
        _head_mask(params, self.head)
        return params

    def inner_problem(self, meta_params: Params) -> InnerProblem:
        leaves, treedef = jax.tree.flatten(meta_params)
        mask = _head_mask(meta_params, self.head)
        head = [leaf for leaf, m in zip(leaves, mask) if m]

        def finish(h: list[Array]) -> Params:
            it = iter(h)
            return jax.tree.unflatten(treedef, [next(it) if m else leaf for leaf, m in zip(leaves, mask)])

        def loss(h, x, y):
            return self.loss_fn(finish(h), x, y)

        return InnerProblem(loss, head, None, finish)

    def meta_grad(self, meta_params: Params, tasks: TaskBatch) -> tuple[Params, Metrics]:
        return _unrolled_meta_grad(self, meta_params, tasks, 0 if self.first_order else self.truncate)
