"""Plasticity measures of a network's units and weights (Dohare et al. 2024, "Loss of plasticity in deep
continual learning", Nature 632).

All are ``jax.numpy`` functions, so they run inside a compiled training program (the online runner
measures them per bin) as well as on numpy arrays on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree


def dead_unit_fraction(
    hidden_activations: Float[Array, "batch units"] | Sequence[Float[Array, "batch units"]],
) -> Float[Array, ""]:
    """Fraction of units whose activation is zero for every example of a batch.

    .. math::
      \\text{dead} = \\frac{1}{U} \\sum_{j=1}^{U} \\mathbb{1}\\left[\\forall b: h_{bj} = 0\\right]

    A ReLU unit that is dead on a batch passes no gradient to its incoming weights for any example of
    it, the failure mode Dohare et al. count as lost plasticity.

    Args:
      hidden_activations: one layer's activations ``[batch, units]``, or a sequence of them (the hidden
        tuple of ``MLP.features``), whose units are then pooled (every unit of every layer counts once).

    Returns:
      A float32 scalar in ``[0, 1]``.

    Example:
      >>> h = jnp.array([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
      >>> float(dead_unit_fraction(h))  # only unit 0 is zero on both examples
      0.3333333432674408
    """
    layers = (
        (hidden_activations,) if not isinstance(hidden_activations, (tuple, list)) else hidden_activations
    )
    dead = jnp.concatenate([jnp.all(jnp.asarray(h) == 0, axis=0).reshape(-1) for h in layers])
    return dead.astype(jnp.float32).mean()


def _singular_values(features: Float[Array, "n d"]) -> Float[Array, " k"]:
    return jnp.linalg.svd(jnp.asarray(features, jnp.float32), compute_uv=False)


def effective_rank(features: Float[Array, "n d"]) -> Float[Array, ""]:
    """Effective rank of a feature matrix (Roy & Vetterli 2007), as Dohare et al. 2024 measure it.

    .. math::
      p_k = \\frac{\\sigma_k}{\\sum_i \\sigma_i}, \\qquad
      \\operatorname{erank}(\\Phi) = \\exp\\Big(-\\sum_k p_k \\log p_k\\Big)

    with :math:`\\sigma_k` the singular values of ``features`` (examples by units) and :math:`0 \\log 0 =
    0`. It lies between 1 (one direction carries everything) and ``min(n, d)`` (all singular values equal);
    a matrix of ``r`` equal non-zero singular values has effective rank ``r``. An all-zero matrix gives 1.

    Args:
      features: ``[n, d]`` activations of a layer on ``n`` examples.

    Returns:
      A float32 scalar.

    Example:
      >>> float(effective_rank(jnp.eye(3)))
      3.0
    """
    s = _singular_values(features)
    total = s.sum()
    p = s / jnp.where(total > 0, total, 1.0)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return jnp.exp(-plogp.sum())


def stable_rank(features: Float[Array, "n d"]) -> Float[Array, ""]:
    """Stable (numerical) rank: squared Frobenius norm over squared spectral norm.

    .. math::
      \\operatorname{srank}(\\Phi) = \\frac{\\sum_k \\sigma_k^2}{\\sigma_1^2}

    Between 1 and the rank; ``r`` for ``r`` equal non-zero singular values; 0 for an all-zero matrix.

    Args:
      features: ``[n, d]``.

    Returns:
      A float32 scalar.

    Example:
      >>> float(stable_rank(jnp.diag(jnp.array([2.0, 1.0]))))  # (4 + 1) / 4
      1.25
    """
    s = _singular_values(features)
    top = s.max() ** 2
    return (s**2).sum() / jnp.where(top > 0, top, 1.0)


def weight_magnitude(params: PyTree) -> Float[Array, ""]:
    """Mean absolute value over every entry of every parameter array (weights and biases alike).

    .. math::
      \\bar{|w|} = \\frac{1}{N} \\sum_{\\text{leaves}} \\sum_i |w_i|

    with ``N`` the total number of entries; growing weights are one of the correlates of lost plasticity
    that Dohare et al. 2024 report.

    Args:
      params: any pytree of arrays (an ``nnx.State``, a dict).

    Returns:
      A float32 scalar.

    Example:
      >>> float(weight_magnitude({"kernel": jnp.array([[1.0, -3.0]]), "bias": jnp.array([0.0, 2.0])}))
      1.5
    """
    leaves = jax.tree.leaves(params)
    total = sum(jnp.abs(jnp.asarray(x, jnp.float32)).sum() for x in leaves)
    count = sum(int(jnp.size(x)) for x in leaves)
    return jnp.asarray(total, jnp.float32) / max(count, 1)
