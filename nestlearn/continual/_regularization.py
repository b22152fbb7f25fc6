"""Regularisation strategies: quadratic anchors weighted by an importance (EWC, SI, MAS, L2 to the initial
parameters) and distillation from the previous model (LwF).

Importances are estimated at a task's end from per-example gradients on the task's first training examples,
in chunks under ``lax.scan`` so that memory stays ``chunk x parameters`` whatever the sample count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple, final

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int, PyTree

from nestlearn.continual._strategy import Batch, Context, Params, Strategy
from nestlearn.tasks._stream import TaskStream

ExampleFn = Callable[[Params, Float[Array, " d"], Int[Array, ""], Int[Array, ""]], Float[Array, ""]]


def _sum(tree: PyTree) -> Float[Array, ""]:
    """The sum of every element of every leaf."""
    return sum((leaf.sum() for leaf in jax.tree.leaves(tree)), jnp.zeros((), jnp.float32))


def _log_p(ctx: Context) -> ExampleFn:
    """``log p(y | x)`` of one example under the masked head of its task."""

    def log_p(params, x, y, task):
        logits = ctx.logits(params, x[None], task[None])
        return -optax.softmax_cross_entropy_with_integer_labels(logits, y[None])[0]

    return log_p


def _sq_output_norm(ctx: Context) -> ExampleFn:
    """``||f(x)||^2`` of one example's unmasked outputs (MAS)."""

    def sq_norm(params, x, y, task):
        del y, task
        return jnp.sum(ctx.apply(params, x[None]) ** 2)

    return sq_norm


def example_grad_stat(
    fn: ExampleFn,
    stat: Callable[[Array], Array],
    params: Params,
    ctx: Context,
    task: Int[Array, ""],
    n_samples: int,
    chunk: int,
    per_example: bool = True,
) -> Params:
    """Mean over the first training examples of ``task`` of ``stat(grad fn)``, leaf by leaf.

    Uses positions ``0 .. min(train_n[task], n_samples) - 1`` of the task (padding rows are never read),
    ``chunk`` examples at a time under ``lax.scan``: per-example gradients are ``vmap(grad(fn))`` over a
    chunk, so memory is ``chunk x parameters``. With ``per_example=False`` the statistic is taken of the
    gradient of each chunk's mean of ``fn`` and averaged over the (non-empty) chunks instead.
    """
    n_used = min(ctx.stream.max_train, n_samples)
    n_chunks = max(1, math.ceil(n_used / chunk))
    count = jnp.minimum(ctx.stream.train_n[task], n_used)
    tasks = jnp.full((chunk,), task, jnp.int32)
    grad_one = jax.vmap(jax.grad(fn), in_axes=(None, 0, 0, 0))

    def body(acc, c):
        pos = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
        valid = pos < count
        x, y = ctx.stream.train_examples(tasks, jnp.where(valid, pos, 0))
        w = valid.astype(jnp.float32)
        if per_example:
            grads = grad_one(params, x, y, tasks)
            add = jax.tree.map(lambda g: jnp.tensordot(w, stat(g), axes=1), grads)
            return jax.tree.map(jnp.add, acc, add), None
        # One gradient of the chunk's mean (a minibatch estimate), counted once if the chunk has examples.
        mean_fn = lambda p: (
            jax.vmap(fn, in_axes=(None, 0, 0, 0))(p, x, y, tasks) @ w / jnp.maximum(w.sum(), 1.0)
        )
        has = (w.sum() > 0).astype(jnp.float32)
        grads = jax.grad(mean_fn)(params)
        return jax.tree.map(lambda a, g: a + has * stat(g), acc, grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, _ = jax.lax.scan(body, zeros, jnp.arange(n_chunks, dtype=jnp.int32))
    if per_example:
        denom = jnp.maximum(count, 1).astype(jnp.float32)
    else:
        denom = jnp.maximum((count + chunk - 1) // chunk, 1).astype(jnp.float32)
    return jax.tree.map(lambda t: t / denom, total)


def empirical_fisher(
    params: Params, ctx: Context, task: Int[Array, ""], n_samples: int, chunk: int, per_example: bool = True
) -> Params:
    """Diagonal empirical Fisher ``mean_n (d log p(y_n | x_n) / d theta)^2`` on ``task``'s first examples."""
    return example_grad_stat(_log_p(ctx), jnp.square, params, ctx, task, n_samples, chunk, per_example)


class EWCState(NamedTuple):
    """State of :class:`EWC`: one quadratic ``sum_i F_i (theta_i - m_i)^2 + offset``.

    Attributes:
      fisher: separate EWC: the summed Fisher ``A = sum_t F_t``; online EWC: the running Fisher.
      anchor: separate EWC: the Fisher-weighted centre ``m = sum_t F_t theta*_t / A`` (where ``A > 0``);
        online EWC: the parameters at the end of the last task.
      filled: whether any task has finished (scalar).
      offset: separate EWC: ``sum_t F_t theta*_t^2 - A m^2`` summed over parameters, the constant that
        makes the value equal the per-task sum; ``0`` for online EWC.
    """

    fisher: Params
    anchor: Params
    filled: Bool[Array, ""]
    offset: Float[Array, ""]


@final
@flax.struct.dataclass
class EWC(Strategy):
    """Elastic weight consolidation: a quadratic pull to past solutions, weighted by the diagonal Fisher.

    Separate EWC (Kirkpatrick et al. 2017) keeps a Fisher ``F_t`` and an anchor ``theta*_t`` for every
    finished task ``t``::

      penalty = lam / 2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2

    Online EWC (Schwarz et al. 2018) keeps one running Fisher and the last anchor::

      F <- gamma * F + F_new,   theta* <- theta,   penalty = lam / 2 * sum_i F_i (theta_i - theta*_i)^2

    Separate EWC is stored in constant memory: a sum of quadratics is one quadratic,
    ``sum_t F_t (theta - theta*_t)^2 = A (theta - m)^2 + c`` with ``A = sum_t F_t``,
    ``m = sum_t F_t theta*_t / A`` and a constant ``c``, so the penalty and its gradient cost the same
    for 2 tasks as for 200 (not ``2 * n_tasks`` copies of the parameters read every step).

    Both carry the factor 1/2 of the Laplace approximation, as the papers and van de Ven et al.'s code do:
    their ``lam`` values carry over unchanged. The Fisher is the *empirical* one,
    ``F_i = mean_n (d log p(y_n | x_n) / d theta_i)^2`` with the true labels, from per-example gradients
    (``vmap`` of ``grad``) over the first ``min(train_n, fisher_samples)`` training examples of the task
    just finished, with the task's output mask. Avalanche's EWC instead squares the gradient of each
    *minibatch's* mean loss and averages over minibatches, a smaller, different estimate (cross terms
    between examples cancel); ``per_example=False`` computes that one, minibatches of ``fisher_batch``,
    to compare like with like.

    Args:
      lam: strength of the penalty (van de Ven et al.: 1e5 task-, 1e10 domain-, 1e9 class-incremental
        on split MNIST).
      online: online EWC (one running Fisher) instead of one term per task (static).
      gamma: decay of the running Fisher in online EWC (``1.0``: a plain sum); unused otherwise.
      fisher_samples: at most this many training examples of the task estimate the Fisher (static).
      fisher_batch: examples per chunk of per-example gradients, which bounds memory (static).
      per_example: square per-example gradients (the empirical Fisher, ``True``) or minibatch gradients
        (Avalanche's estimate, ``False``) (static).

    Example:
      >>> learner = continual.Learner(model, optax.sgd(0.1), EWC(lam=100.0), config)
      >>> result = learner.run(stream, seeds=[0, 1], sweep={"lam": [1.0, 100.0, 1e4]})

    References:
      Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017.
      Schwarz et al., "Progress & Compress: A scalable framework for continual learning", ICML 2018.
    """

    strength: ClassVar[str] = "lam"  # the hyperparameter a stability-plasticity sweep varies

    lam: float
    online: bool = flax.struct.field(pytree_node=False, default=False)
    gamma: float = 1.0
    fisher_samples: int = flax.struct.field(pytree_node=False, default=1024)
    fisher_batch: int = flax.struct.field(pytree_node=False, default=64)
    per_example: bool = flax.struct.field(pytree_node=False, default=True)

    def init(self, params: Params, stream: TaskStream) -> EWCState:
        del stream
        zeros = jax.tree.map(jnp.zeros_like, params)
        return EWCState(
            fisher=zeros, anchor=params, filled=jnp.zeros((), bool), offset=jnp.zeros((), jnp.float32)
        )

    def penalty(self, state: EWCState, params: Params, batch: Batch, ctx: Context) -> Float[Array, ""]:
        del batch, ctx
        fisher, anchor, offset = jax.lax.stop_gradient((state.fisher, state.anchor, state.offset))
        terms = jax.tree.map(lambda f, a, p: f * (p - a) ** 2, fisher, anchor, params)
        return self.lam / 2 * jnp.where(state.filled, _sum(terms) + offset, 0.0)

    def end_task(self, state: EWCState, params: Params, ctx: Context) -> tuple[EWCState, Params]:
        new = empirical_fisher(
            params, ctx, ctx.task, self.fisher_samples, self.fisher_batch, self.per_example
        )
        if self.online:
            fisher = jax.tree.map(lambda f, g: self.gamma * f + g, state.fisher, new)
            return state._replace(fisher=fisher, anchor=params, filled=jnp.ones((), bool)), params
        # Completing the square: A' = A + F, m' = (A m + F theta) / A', and the constant grows by
        # A m^2 + F theta^2 - A' m'^2, so that A' (x - m')^2 + c' = A (x - m)^2 + c + F (x - theta)^2.
        fisher = jax.tree.map(jnp.add, state.fisher, new)
        anchor = jax.tree.map(
            lambda a, m, f, p, a2: jnp.where(a2 > 0, (a * m + f * p) / jnp.where(a2 > 0, a2, 1.0), p),
            state.fisher, state.anchor, new, params, fisher,
        )  # fmt: skip
        grow = _sum(
            jax.tree.map(lambda a, m, f, p: a * m**2 + f * p**2, state.fisher, state.anchor, new, params)
        )
        offset = state.offset + grow - _sum(jax.tree.map(lambda a, m: a * m**2, fisher, anchor))
        return EWCState(fisher=fisher, anchor=anchor, filled=jnp.ones((), bool), offset=offset), params


class SIState(NamedTuple):
    """State of :class:`SI`.

    Attributes:
      omega: the path integral of the current task so far, ``sum_steps -g * delta_theta``.
      importance: ``Omega``, the consolidated importance of the finished tasks.
      start: the parameters at the start of the current task, which are the anchor ``theta*``.
      prev: the parameters before the next step (to measure each step's change).
    """

    omega: Params
    importance: Params
    start: Params
    prev: Params


@final
@flax.struct.dataclass
class SI(Strategy):
    """Synaptic intelligence: importance from each parameter's contribution to the drop of the loss.

    During a task, after every step with gradient ``g`` and parameter change ``delta``::

      omega_i += -g_i * delta_i

    At the task's end, with ``Delta`` the parameters' change over the whole task::

      Omega_i += omega_i / (Delta_i^2 + xi),   omega <- 0,   theta* <- theta

    and while training later tasks::

      penalty = c * sum_i Omega_i (theta_i - theta*_i)^2

    ``g`` is the gradient the engine passes to ``after_step``: that of the total loss (task loss plus
    this penalty) before ``transform_grads``, where Zenke et al. use the task loss alone; the two agree on
    the first task and differ by the penalty's pull on later ones (van de Ven et al.'s code uses the
    total loss's gradient too). ``delta`` is the actual change the optimizer made, so with Adam or
    momentum ``-g * delta`` is not ``lr * g^2``.

    Args:
      c: strength of the penalty (van de Ven et al.: 10 task-, 5e4 domain-, 5e3 class-incremental on
        split MNIST).
      xi: damping of the normaliser, keeps it finite for parameters that did not move.

    Example:
      >>> learner = continual.Learner(model, optax.adam(1e-3), SI(c=10.0), config)

    References:
      Zenke, Poole & Ganguli, "Continual learning through synaptic intelligence", ICML 2017.
    """

    strength: ClassVar[str] = "c"  # the hyperparameter a stability-plasticity sweep varies

    c: float
    xi: float = 0.1

    def init(self, params: Params, stream: TaskStream) -> SIState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return SIState(omega=zeros, importance=zeros, start=params, prev=params)

    def begin_task(self, state: SIState, params: Params, ctx: Context) -> SIState:
        return state._replace(start=params, prev=params)

    def penalty(self, state: SIState, params: Params, batch: Batch, ctx: Context) -> Float[Array, ""]:
        importance, anchor = jax.lax.stop_gradient((state.importance, state.start))
        return self.c * _sum(jax.tree.map(lambda w, a, p: w * (p - a) ** 2, importance, anchor, params))

    def after_step(
        self, state: SIState, params: Params, grads: Params, batch: Batch, ctx: Context
    ) -> tuple[SIState, Params]:
        omega = jax.tree.map(lambda o, g, p, q: o - g * (p - q), state.omega, grads, params, state.prev)
        return state._replace(omega=omega, prev=params), params

    def end_task(self, state: SIState, params: Params, ctx: Context) -> tuple[SIState, Params]:
        importance = jax.tree.map(
            lambda big, o, p, s: big + o / ((p - s) ** 2 + self.xi),
            state.importance,
            state.omega,
            params,
            state.start,
        )
        zeros = jax.tree.map(jnp.zeros_like, params)
        return SIState(omega=zeros, importance=importance, start=params, prev=params), params


class AnchorState(NamedTuple):
    """An importance per parameter and the parameters it anchors to."""

    importance: Params
    anchor: Params


@final
@flax.struct.dataclass
class MAS(Strategy):
    """Memory aware synapses: importance is the sensitivity of the squared output norm to each parameter.

    At the end of each task, over its first ``min(train_n, mas_samples)`` training examples::

      Omega_i += mean_n | d ||f(x_n)||_2^2 / d theta_i |,   theta* <- theta

    with ``f`` the model's unmasked outputs (every head), per-example gradients in chunks of
    ``mas_batch``. Importances of successive tasks are *summed* (as SI's are), so the pull of a task does
    not shrink as more tasks arrive; while training later tasks::

      penalty = lam * sum_i Omega_i (theta_i - theta*_i)^2

    Args:
      lam: strength of the penalty.
      mas_samples: at most this many training examples of the task estimate the importance (static).
      mas_batch: examples per chunk of per-example gradients, which bounds memory (static).

    Example:
      >>> learner = continual.Learner(model, optax.sgd(0.1), MAS(lam=1.0), config)

    References:
      Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget", ECCV 2018.
    """

    strength: ClassVar[str] = "lam"  # the hyperparameter a stability-plasticity sweep varies

    lam: float
    mas_samples: int = flax.struct.field(pytree_node=False, default=1024)
    mas_batch: int = flax.struct.field(pytree_node=False, default=64)

    def init(self, params: Params, stream: TaskStream) -> AnchorState:
        return AnchorState(importance=jax.tree.map(jnp.zeros_like, params), anchor=params)

    def penalty(self, state: AnchorState, params: Params, batch: Batch, ctx: Context) -> Float[Array, ""]:
        importance, anchor = jax.lax.stop_gradient((state.importance, state.anchor))
        return self.lam * _sum(jax.tree.map(lambda w, a, p: w * (p - a) ** 2, importance, anchor, params))

    def end_task(self, state: AnchorState, params: Params, ctx: Context) -> tuple[AnchorState, Params]:
        new = example_grad_stat(
            _sq_output_norm(ctx), jnp.abs, params, ctx, ctx.task, self.mas_samples, self.mas_batch
        )
        importance = jax.tree.map(jnp.add, state.importance, new)
        return AnchorState(importance=importance, anchor=params), params


@final
@flax.struct.dataclass
class L2Init(Strategy):
    """A quadratic pull toward the initial parameters, uniform over parameters.

    ::

      penalty = lam * ||theta - theta_0||^2

    with ``theta_0`` the parameters at the start of the run. A baseline for the importance-weighted
    penalties, and a remedy for loss of plasticity.

    Args:
      lam: strength of the penalty.

    Example:
      >>> learner = continual.Learner(model, optax.sgd(0.1), L2Init(lam=1e-3), config)

    References:
      Kumar, Marklund & Van Roy, "Maintaining Plasticity in Continual Learning via Regenerative
      Regularization", CoLLAs 2024.
    """

    strength: ClassVar[str] = "lam"  # the hyperparameter a stability-plasticity sweep varies

    lam: float

    def init(self, params: Params, stream: TaskStream) -> Params:
        return params

    def penalty(self, state: Params, params: Params, batch: Batch, ctx: Context) -> Float[Array, ""]:
        init = jax.lax.stop_gradient(state)
        return self.lam * _sum(jax.tree.map(lambda a, p: (p - a) ** 2, init, params))


class LwFState(NamedTuple):
    """State of :class:`LwF`: the parameters at the end of the last finished task, and whether one has."""

    old: Params
    has_old: Bool[Array, ""]


@final
@flax.struct.dataclass
class LwF(Strategy):
    """Learning without forgetting: distil the previous model's outputs on the current batch.

    With ``z`` the new model's logits and ``z_old`` those of the model at the end of the last task
    (frozen), and ``p^T = softmax(z / T)`` over the units of a head ``s``::

      penalty = alpha * T^2 * mean_batch mean_{s < task} KL(p_old^T_s || p^T_s)

    averaged over the heads of the tasks before the current one (``class_mask[s]``). In a stream whose
    tasks share their output units (domain- or class-incremental: every mask alike) this is one KL over
    those units, the same as with each example's own mask; with task-incremental heads it distils every
    old head, as Li & Hoiem do (the current task's head has no old knowledge to keep). The penalty is zero
    until the first task ends. Li & Hoiem write the cross-entropy ``-sum p_old^T log p^T``, which differs
    from the KL by the old model's entropy, a constant: same gradients. The ``T^2`` (Hinton et al. 2015)
    keeps the gradient's scale independent of ``T``; van de Ven et al.'s code uses it too.

    Args:
      alpha: weight of the distillation term.
      temperature: softmax temperature ``T`` of both models.

    Example:
      >>> learner = continual.Learner(model, optax.sgd(0.1), LwF(alpha=1.0), config)

    References:
      Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017.
    """

    strength: ClassVar[str] = "alpha"  # the hyperparameter a stability-plasticity sweep varies

    alpha: float
    temperature: float = 2.0

    def init(self, params: Params, stream: TaskStream) -> LwFState:
        return LwFState(old=params, has_old=jnp.zeros((), bool))

    def penalty(self, state: LwFState, params: Params, batch: Batch, ctx: Context) -> Float[Array, ""]:
        t = self.temperature
        z = ctx.apply(params, batch.x) / t
        z_old = jax.lax.stop_gradient(ctx.apply(state.old, batch.x)) / t
        masks = ctx.stream.class_mask  # [tasks, c]
        heads = (jnp.arange(masks.shape[0]) < ctx.task).astype(jnp.float32)

        def kl(mask):  # per example, over one head's units; masked units contribute exactly 0
            mask = mask[None]
            logp = jax.nn.log_softmax(jnp.where(mask, z, -1e9), axis=-1)
            logq = jax.nn.log_softmax(jnp.where(mask, z_old, -1e9), axis=-1)
            return jnp.sum(jnp.where(mask, jnp.exp(logq) * (logq - logp), 0.0), axis=-1)

        per_head = jax.vmap(kl)(masks)  # [tasks, b]
        per_example = heads @ per_head / jnp.maximum(heads.sum(), 1.0)
        on = state.has_old.astype(jnp.float32)
        return on * self.alpha * t**2 * batch.mean(per_example)

    def end_task(self, state: LwFState, params: Params, ctx: Context) -> tuple[LwFState, Params]:
        return LwFState(old=params, has_old=jnp.ones((), bool)), params
