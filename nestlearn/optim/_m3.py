"""M3: fast and slow Newton-Schulz momenta over an Adam-style second moment."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import _muon

from nestlearn.optim._clock import check_periods, level_clock


class M3State(NamedTuple):
    """State of :func:`m3`.

    Attributes:
      count: int32, steps taken.
      mu_fast: EMA of gradients (rate ``b1``), updated every step.
      mu_slow: EMA of period-mean gradients (rate ``b3``), updated every ``slow_period`` steps.
      nu: EMA of squared gradients (rate ``b2``).
      acc: sum of the gradients since the last slow update.
    """

    count: jax.Array
    mu_fast: optax.Updates
    mu_slow: optax.Updates
    nu: optax.Updates
    acc: optax.Updates


def _orthogonalize(x, ns_steps):
    coeffs = jnp.asarray((3.4445, -4.7750, 2.0315), x.dtype)
    return _muon.orthogonalize_via_newton_schulz(x, coeffs, ns_steps)


def m3(
    learning_rate: jax.typing.ArrayLike,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    b3: jax.typing.ArrayLike = 0.9,
    alpha: jax.typing.ArrayLike = 1.0,
    slow_period: int = 10,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    ns_steps: int = 5,
) -> optax.GradientTransformation:
    r"""M3 (multi-scale momentum Muon): fast and slow orthogonalised momenta, scaled by a second moment.

    With step :math:`t` (from 0), gradient :math:`g`, and the slow clock :math:`s = [(t+1) \bmod f = 0]`:

    .. math::
      m_1 &\leftarrow b_1 m_1 + (1-b_1) g, \quad v \leftarrow b_2 v + (1-b_2) g^2, \quad a \leftarrow a + g, \\
      m_2 &\leftarrow m_2 + s\,(1-b_3)(a/f - m_2), \quad a \leftarrow (1-s)\,a, \\
      u &= -\eta\big(\mathrm{NS}(\hat m_1 / (\sqrt{\hat v}+\epsilon)) + \alpha\,\mathrm{NS}(m_2 / (\sqrt{\hat v}+\epsilon))\big),

    :math:`\hat m_1, \hat v` bias-corrected as Adam's; :math:`m_2` not corrected (as AdEMAMix's slow
    EMA). NS is optax.contrib's Muon Newton–Schulz (quintic, coefficients (3.4445, −4.775, 2.0315),
    Frobenius pre-normalisation), applied to 2-D leaves; other leaves skip it
    (:math:`u = -\eta(\hat m_1 + \alpha m_2)/(\sqrt{\hat v}+\epsilon)`, AdEMAMix). Choices: the slow momentum
    averages the chunk's gradients (a mean, so :math:`m_1` and :math:`m_2` have one scale); the second
    moment divides *before* the orthogonalisation, so each term's spectral norm stays near 1 (dividing
    the orthogonalised momenta by :math:`\sqrt{v}` would blow up as :math:`v \to 0`). Builds on
    ``optax.contrib._muon.orthogonalize_via_newton_schulz`` (a private
    optax module; no public name exists in optax 0.2.8).

    Args:
      learning_rate: :math:`\eta`.
      b1: fast momentum rate.
      b2: second-moment rate.
      b3: slow momentum rate (per slow update).
      alpha: weight of the slow momentum.
      slow_period: :math:`f`, steps between slow updates (int >= 1).
      eps: added to :math:`\sqrt{\hat v}`.
      ns_steps: keyword-only; Newton–Schulz iterations.

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> tx = m3(0.1, slow_period=2)
      >>> p = jnp.ones((2, 2)); u, _ = tx.update(jnp.eye(2), tx.init(p), p)
      >>> bool(jnp.allclose(u, -0.1 * jnp.eye(2), atol=0.05))
      True

    References:
      Behrouz et al., Nested Learning, 2025 (M3); Jordan et al., Muon, 2024; Pagliardini et al., The
      AdEMAMix Optimizer, 2024.
    """
    period = check_periods(slow_period, "slow_period")

    def init_fn(params):
        z = optax.tree.zeros_like(params)
        return M3State(jnp.zeros([], jnp.int32), z, z, z, z)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        s = level_clock(period, state.count).active

        def c(v, like):
            return jnp.asarray(v, like.dtype)

        mu1 = jax.tree.map(lambda m, g: c(b1, g) * m + (1 - c(b1, g)) * g, state.mu_fast, updates)
        nu = jax.tree.map(lambda v, g: c(b2, g) * v + (1 - c(b2, g)) * g * g, state.nu, updates)
        acc = jax.tree.map(lambda a, g: a + g, state.acc, updates)
        mu2 = jax.tree.map(
            lambda m, a: m + s.astype(a.dtype) * (1 - c(b3, a)) * (a / period.astype(a.dtype) - m),
            state.mu_slow,
            acc,
        )
        acc = jax.tree.map(lambda a: (1 - s.astype(a.dtype)) * a, acc)
        bc1 = 1 - jnp.asarray(b1, jnp.float32) ** count.astype(jnp.float32)
        bc2 = 1 - jnp.asarray(b2, jnp.float32) ** count.astype(jnp.float32)

        def leaf(m1, m2, v):
            denom = jnp.sqrt(v / bc2.astype(v.dtype)) + c(eps, v)
            a1 = m1 / bc1.astype(m1.dtype) / denom
            a2 = m2 / denom
            if m1.ndim == 2:
                a1, a2 = _orthogonalize(a1, ns_steps), _orthogonalize(a2, ns_steps)
            return -c(learning_rate, m1) * (a1 + c(alpha, m1) * a2)

        new_updates = jax.tree.map(leaf, mu1, mu2, nu)
        return new_updates, M3State(count, mu1, mu2, nu, acc)

    return optax.GradientTransformation(init_fn, update_fn)
