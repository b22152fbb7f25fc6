"""La-MAML: look-ahead meta-learning with learned per-parameter rates for online continual learning."""

from __future__ import annotations

from typing import final

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from nestlearn._errors import ConfigError
from nestlearn.continual._memory import ReservoirBuffer, reservoir_add, reservoir_init, reservoir_sample
from nestlearn.meta._inner import LossFn, Params

Metrics = dict[str, Float[Array, ""]]


class LaMAMLState(flax.struct.PyTreeNode):
    """La-MAML's state: weights, learned rates, the replay buffer, a key and the step (int32).

    Attributes:
      params: the weights θ.
      alpha: per-parameter learning rates α, same structure as ``params`` (unconstrained; only their
        positive part moves the weights).
      buffer: the reservoir replay buffer (device arrays).
      key: PRNG key, folded with ``step`` at each step.
      step: batches seen so far.
    """

    params: PyTree
    alpha: PyTree
    buffer: ReservoirBuffer
    key: PRNGKeyArray
    step: Int[Array, ""]


@final
@flax.struct.dataclass
class LaMAML:
    """Look-ahead MAML (Gupta, Yadav, Paull 2020): online-aware meta-learning with learned rates.

    For an incoming batch :math:`(x_1, y_1), ..., (x_b, y_b)` and a replay sample :math:`M` drawn from the
    buffer, the look-ahead runs one SGD step per incoming example with the learned rates α,

    .. math::
      θ_0 = θ, \\quad θ_i = θ_{i-1} - α ⊙ ∇ℓ(θ_{i-1}; x_i, y_i), \\qquad
      L_{meta}(θ, α) = \\frac1b \\sum_{i=1}^{b} ℓ(θ_i;\\ \\{x\\} ∪ M),

    the meta-loss of every look-ahead point on the batch plus the replay sample, averaged (as the public
    code does). The rates then take an SGD step on their meta-gradient, and the weights a step with the
    new rates clipped at zero:

    .. math::
      α ← α - η_α ∇_α L_{meta}, \\qquad θ ← θ - \\max(α, 0) ⊙ ∇_θ L_{meta}.

    A parameter whose rate is ≤ 0 does not move. With ``second_order=False`` (the default, the
    first-order variant the paper uses for speed) the inner gradients are constants in the meta-gradient:
    :math:`∂θ_i/∂θ = I` and :math:`∂θ_i/∂α = -\\sum_{j \\le i} ∇ℓ(θ_{j-1}; x_j)`; ``second_order=True``
    differentiates through them. The inner steps use α as it is (the paper's Algorithm 1);
    ``clip_inner=True`` uses :math:`\\max(α, 0)` there too, as the public code does. The incoming examples
    are then offered to the reservoir buffer, after the replay sample was drawn. Replay rows of an empty
    buffer get weight 0. Labels are int32 (the buffer stores class labels): La-MAML's benchmarks are
    classification streams.

    Attributes:
      loss_fn: ``loss_fn(params, x, y) -> scalar``, a mean over the rows of ``x`` (static).
      capacity: replay buffer size (static).
      replay_batch: replay rows in each meta-loss (static).
      alpha_init: initial rate of every parameter (leaf).
      alpha_lr: η_α, the rates' own learning rate (leaf).
      second_order: differentiate through the inner gradients (static).
      clip_inner: clip α at 0 in the look-ahead steps too (static).

    Example:
      >>> lamaml = LaMAML(lambda p, x, y: jnp.mean((x @ p - y) ** 2), capacity=20, replay_batch=4)
      >>> # state = lamaml.init(params, key, n_features); state = lamaml.step(state, (x, y))

    Reference: G. Gupta, K. Yadav, L. Paull, "La-MAML: Look-ahead Meta Learning for Continual Learning",
    NeurIPS 2020.
    """

    loss_fn: LossFn = flax.struct.field(pytree_node=False)
    capacity: int = flax.struct.field(pytree_node=False, default=200)
    replay_batch: int = flax.struct.field(pytree_node=False, default=10)
    alpha_init: float = 0.1
    alpha_lr: float = 0.3
    second_order: bool = flax.struct.field(pytree_node=False, default=False)
    clip_inner: bool = flax.struct.field(pytree_node=False, default=False)

    def init(self, params: Params, key: PRNGKeyArray, n_features: int) -> LaMAMLState:
        """Initial state: ``params``, every rate ``alpha_init``, an empty buffer of ``n_features`` inputs."""
        if (
            isinstance(self.replay_batch, bool)
            or not isinstance(self.replay_batch, int)
            or self.replay_batch < 1
        ):
            raise ConfigError(f"replay_batch must be a positive int, got {self.replay_batch!r}")
        alpha = jax.tree.map(lambda p: jnp.full_like(p, self.alpha_init), params)
        return LaMAMLState(
            params=params,
            alpha=alpha,
            buffer=reservoir_init(self.capacity, n_features, 1),
            key=key,
            step=jnp.zeros((), jnp.int32),
        )

    def _example_losses(self, params: Params, x: Array, y: Array) -> Float[Array, " n"]:
        return jax.vmap(lambda xi, yi: self.loss_fn(params, xi[None], yi[None]))(x, y)

    def meta_loss(
        self,
        params: Params,
        alpha: Params,
        x: Float[Array, "b d"],
        y: Int[Array, " b"],
        meta_x: Float[Array, "n d"],
        meta_y: Int[Array, " n"],
        meta_w: Float[Array, " n"],
    ) -> Float[Array, ""]:
        """:math:`L_{meta}(θ, α)`: the look-ahead over ``(x, y)``, scored on the weighted meta batch."""

        def inner(theta, example):
            xi, yi = example
            g = jax.grad(self.loss_fn)(theta, xi[None], yi[None])
            if not self.second_order:
                g = jax.lax.stop_gradient(g)
            rate = jax.tree.map(lambda a: jnp.maximum(a, 0.0), alpha) if self.clip_inner else alpha
            theta = jax.tree.map(lambda t, a, gi: t - a * gi, theta, rate, g)
            losses = self._example_losses(theta, meta_x, meta_y)
            return theta, jnp.sum(losses * meta_w) / jnp.maximum(jnp.sum(meta_w), 1e-12)

        _, meta_losses = jax.lax.scan(inner, params, (x, y))
        return jnp.mean(meta_losses)

    def step(
        self, state: LaMAMLState, batch: tuple[Float[Array, "b d"], Int[Array, " b"]]
    ) -> tuple[LaMAMLState, Metrics]:
        """One La-MAML update on an incoming batch ``(x, y)``; pure, jittable, vmappable over states.

        The replay sample is ``reservoir_sample(buffer, k_replay, replay_batch)`` and the buffer update
        ``reservoir_add(buffer, x, y, 0, k_add)`` with ``k_replay, k_add = split(fold_in(key, step))``.

        Returns:
          ``(state, metrics)``: ``loss_meta`` (the meta-loss before the update) and ``alpha_mean``.
        """
        x, y = batch
        k_replay, k_add = jax.random.split(jax.random.fold_in(state.key, state.step))
        rx, ry, _, _, rw = reservoir_sample(state.buffer, k_replay, self.replay_batch)
        meta_x = jnp.concatenate([x, rx], axis=0)
        meta_y = jnp.concatenate([y.astype(ry.dtype), ry], axis=0)
        meta_w = jnp.concatenate([jnp.ones(y.shape, jnp.float32), rw], axis=0)
        loss, (g_theta, g_alpha) = jax.value_and_grad(self.meta_loss, argnums=(0, 1))(
            state.params, state.alpha, x, y, meta_x, meta_y, meta_w
        )
        alpha = jax.tree.map(lambda a, g: a - self.alpha_lr * g, state.alpha, g_alpha)
        params = jax.tree.map(lambda p, a, g: p - jnp.maximum(a, 0.0) * g, state.params, alpha, g_theta)
        buffer = reservoir_add(state.buffer, x, y, jnp.zeros(y.shape, jnp.int32), k_add)
        leaves = jax.tree.leaves(alpha)
        alpha_mean = sum(jnp.sum(a) for a in leaves) / sum(a.size for a in leaves)
        new = state.replace(params=params, alpha=alpha, buffer=buffer, step=state.step + 1)
        return new, {"loss_meta": loss, "alpha_mean": alpha_mean}
