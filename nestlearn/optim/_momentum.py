"""Momentum as a memory (Nested Learning): delta momentum and deep (MLP) momentum."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class DeltaMomentumState(NamedTuple):
    """State of :func:`delta_momentum`.

    Attributes:
      count: int32, steps taken.
      momentum: the velocity ``m`` (already scaled by the learning rate; the update is ``m``).
    """

    count: jax.Array
    momentum: optax.Updates


def delta_momentum(
    learning_rate: jax.typing.ArrayLike,
    decay: jax.typing.ArrayLike = 0.9,
    beta: jax.typing.ArrayLike = 1.0,
    *,
    normalize: bool = True,
    eps: float = 1e-12,
) -> optax.GradientTransformation:
    r"""Delta-rule momentum: the velocity forgets what it stored along the current gradient before writing it.

    Per parameter leaf, with :math:`g` the leaf's gradient flattened to a vector and :math:`m` its velocity
    (same shape), the paper's :math:`m \leftarrow m(\alpha I - g g^\top) - \eta P g` is implemented as

    .. math::
      k = g / \sqrt{\lVert g \rVert^2 + \epsilon}, \qquad
      m \leftarrow \alpha m - \beta \langle m, k \rangle k - \eta g, \qquad u = m,

    with :math:`P = I`. Choices (the paper leaves them open): :math:`g g^\top` acts on each leaf as one
    flattened vector (a matrix gradient is not split into rows: O(n) work and one key per leaf);
    the key is normalised (``normalize=True``) so that :math:`\alpha I - \beta k k^\top` has eigenvalues
    :math:`\alpha` and :math:`\alpha - \beta`, bounded whatever the gradient's scale; ``normalize=False``
    uses the paper's literal, unnormalised :math:`g`, which diverges once :math:`\lVert g\rVert^2 > 1+\alpha`.
    With ``beta = 0`` this is heavy-ball momentum, ``optax.sgd(learning_rate, momentum=decay)``.
    Written by hand (optax has no delta rule); the state follows ``optax.trace``.

    Args:
      learning_rate: :math:`\eta`.
      decay: :math:`\alpha`, the momentum's retention.
      beta: strength of the delta-rule erasure along the gradient (1 erases it fully with ``normalize``).
      normalize: keyword-only; normalise the key (see above).
      eps: keyword-only; added to :math:`\lVert g\rVert^2` before the square root.

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> tx = delta_momentum(0.1, 0.9)
      >>> p = jnp.array([1.0, 0.0]); s = tx.init(p)
      >>> u, s = tx.update(jnp.array([1.0, 0.0]), s, p); print(u)
      [-0.1  0. ]

    References:
      Behrouz et al., Nested Learning, 2025 ("optimizers as associative memories", delta momentum).
    """

    def init_fn(params):
        return DeltaMomentumState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params))

    def leaf(g, m):
        dt = g.dtype
        if normalize:
            k = g * jax.lax.rsqrt(jnp.sum(g * g) + jnp.asarray(eps, dt))
        else:
            k = g
        mk = jnp.sum(m * k)
        return (
            jnp.asarray(decay, dt) * m - jnp.asarray(beta, dt) * mk * k - jnp.asarray(learning_rate, dt) * g
        )

    def update_fn(updates, state, params=None):
        del params
        m = jax.tree.map(leaf, updates, state.momentum)
        return m, DeltaMomentumState(optax.safe_increment(state.count), m)

    return optax.GradientTransformation(init_fn, update_fn)


class DeepMomentumState(NamedTuple):
    """State of :func:`deep_momentum`.

    Attributes:
      count: int32, steps taken.
      w_in: ``[hidden]`` input weights of the momentum MLP (shared by every coordinate).
      w_out: ``[hidden]`` output weights of the momentum MLP.
    """

    count: jax.Array
    w_in: jax.Array
    w_out: jax.Array


def momentum_mlp(w_in: jax.Array, w_out: jax.Array, g: jax.Array) -> jax.Array:
    r"""The coordinate-wise momentum MLP :math:`f(g) = \sum_j w^{out}_j \tanh(w^{in}_j g)`, applied to every entry."""
    return jnp.tensordot(jnp.tanh(g[..., None] * w_in.reshape((1,) * g.ndim + (-1,))), w_out, axes=1)


def deep_momentum(
    learning_rate: jax.typing.ArrayLike,
    memory_lr: jax.typing.ArrayLike = 0.1,
    decay: jax.typing.ArrayLike = 1.0,
    *,
    hidden: int = 4,
) -> optax.GradientTransformation:
    r"""Deep momentum: the momentum is a small MLP, trained online on its own inner loss.

    The memory is a coordinate-wise MLP :math:`f_\phi(g) = \sum_j w^{out}_j \tanh(w^{in}_j g)` (one scalar
    in, ``hidden`` tanh units, one scalar out, no biases so :math:`f(0) = 0`), shared by every coordinate
    of every leaf. Each step it takes one gradient step on the reconstruction loss of the current gradient,
    then maps the gradient to the update:

    .. math::
      \ell(\phi) = \frac{1}{2n}\sum_{i=1}^{n} (f_\phi(g_i) - g_i)^2, \qquad
      \phi \leftarrow \alpha\,\phi - \eta_m \nabla_\phi \ell(\phi), \qquad
      u = -\eta\, f_{\phi}(g),

    with :math:`n` the total number of coordinates and :math:`P = I` (the value to store is the gradient
    itself). This is the paper's DMGD form :math:`m_{t+1} = \alpha m_t - \eta_m \nabla \mathcal{L}^{(2)}(m_t; g_t)`
    with :math:`W \leftarrow W - \eta\, m_{t+1}(g_t)`, for one choice of inner objective (the paper leaves
    it open). Initialisation (deterministic): :math:`w^{in}_j` geometric in [0.5, 2] and
    :math:`w^{out}_j = 1/(\text{hidden}\cdot w^{in}_j)`, so :math:`f'(0) = 1` and the first steps are close
    to SGD. Written by hand; the inner gradient is ``jax.grad`` of :math:`\ell`.

    Args:
      learning_rate: :math:`\eta`, the outer step size.
      memory_lr: :math:`\eta_m`, the memory's inner step size.
      decay: :math:`\alpha`, retention of the memory's weights (1 keeps them).
      hidden: keyword-only; width of the MLP (a Python int >= 1).

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> tx = deep_momentum(0.1, memory_lr=0.0)
      >>> u, _ = tx.update(jnp.zeros(3), tx.init(jnp.zeros(3))); bool(jnp.all(u == 0))   # f(0) = 0
      True

    References:
      Behrouz et al., Nested Learning, 2025 (deep momentum gradient descent).
    """
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be an int >= 1, got {hidden!r}")
    w_in0 = np.geomspace(0.5, 2.0, hidden) if hidden > 1 else np.ones(1)
    w_out0 = 1.0 / (hidden * w_in0)

    def init_fn(params):
        del params
        return DeepMomentumState(
            jnp.zeros([], jnp.int32), jnp.asarray(w_in0, jnp.float32), jnp.asarray(w_out0, jnp.float32)
        )

    def update_fn(updates, state, params=None):
        del params
        leaves = jax.tree.leaves(updates)
        n = sum(x.size for x in leaves)

        def inner_loss(phi):
            w_in, w_out = phi
            return sum(
                jnp.sum((momentum_mlp(w_in, w_out, g.astype(w_in.dtype)) - g.astype(w_in.dtype)) ** 2)
                for g in leaves
            ) / (2 * n)

        phi = (state.w_in, state.w_out)
        grads = jax.grad(inner_loss)(phi)
        a = jnp.asarray(decay, jnp.float32)
        lr_m = jnp.asarray(memory_lr, jnp.float32)
        w_in, w_out = (a * p - lr_m * d for p, d in zip(phi, grads))
        new_updates = jax.tree.map(
            lambda g: (
                -jnp.asarray(learning_rate, jnp.float32) * momentum_mlp(w_in, w_out, g.astype(jnp.float32))
            ).astype(g.dtype),
            updates,
        )
        return new_updates, DeepMomentumState(optax.safe_increment(state.count), w_in, w_out)

    return optax.GradientTransformation(init_fn, update_fn)
