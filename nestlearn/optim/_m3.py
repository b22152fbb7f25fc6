"""M3 (multi-scale momentum Muon): Algorithm 1 of Nested Learning, and an Adam-EMA variant."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import _muon

from nestlearn.optim._clock import check_periods, level_clock

VARIANTS = ("paper", "adam_ema")
NS_COEFFS = (3.4445, -4.7750, 2.0315)


class M3State(NamedTuple):
    """State of :func:`scale_by_m3`.

    Attributes:
      count: int32, steps taken.
      mu_fast: the fast momentum :math:`M_1` (a running sum in ``"paper"``, an EMA in ``"adam_ema"``).
      mu_slow: the slow momentum :math:`M_2`, changed every ``slow_period`` steps.
      nu: the second moment :math:`V` (a running sum in ``"paper"``, an EMA in ``"adam_ema"``).
      acc: sum of the gradients since the last slow update.
      o_slow: ``"paper"`` only (``()`` otherwise): :math:`O_2 = \\mathrm{NS}(M_2)`, held between slow updates.
    """

    count: jax.Array
    mu_fast: optax.Updates
    mu_slow: optax.Updates
    nu: optax.Updates
    acc: optax.Updates
    o_slow: optax.Updates


def orthogonalize(x: jax.Array, ns_steps: int = 5) -> jax.Array:
    """Muon's Newton–Schulz map of a 2-D array (optax.contrib's, Frobenius pre-normalisation); others pass.

    The quintic iteration :math:`X \\leftarrow aX + b(XX^\\top)X + c(XX^\\top)^2X` with
    :math:`(a, b, c) = (3.4445, -4.775, 2.0315)`, ``ns_steps`` times, from :math:`X/(\\lVert X\\rVert_F + 10^{-8})`.
    Leaves that are not matrices are returned unchanged. Builds on
    ``optax.contrib._muon.orthogonalize_via_newton_schulz`` (private in optax 0.2.8; no public name).
    """
    if x.ndim != 2:
        return x
    return _muon.orthogonalize_via_newton_schulz(x, jnp.asarray(NS_COEFFS, x.dtype), ns_steps)


def scale_by_m3(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    b3: jax.typing.ArrayLike = 0.9,
    alpha: jax.typing.ArrayLike = 1.0,
    slow_period: int = 10,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    ns_steps: int = 5,
    variant: str = "paper",
) -> optax.GradientTransformation:
    r"""M3's direction (no learning rate): fast and slow Newton–Schulz momenta over a second moment.

    With step :math:`t` (from 0), gradient :math:`g`, period :math:`f` and the slow clock
    :math:`s_t = [(t+1) \bmod f = 0]` (the last step of each chunk of :math:`f` steps).

    ``variant="paper"`` (default) is Algorithm 1 of the arXiv version, literally:

    .. math::
      M_1 &\leftarrow M_1 + \beta_1 g, \qquad V \leftarrow V + \beta_2 g^2, \qquad O_1 = \mathrm{NS}(M_1), \\
      d &= (O_1 + \alpha\, O_2) / (\sqrt{V} + \epsilon), \\
      \text{if } s_t:&\quad M_2 \leftarrow M_2 + \beta_3 \textstyle\sum_{\text{chunk}} g, \quad
      O_2 \leftarrow \mathrm{NS}(M_2),

    so :math:`O_2` is computed once per chunk, from the chunk just finished, and held through the next
    chunk (the first chunk uses :math:`O_2 = 0`). :math:`M_1` and :math:`V` are running sums with no decay
    (as the algorithm writes them); :math:`\sqrt V` therefore grows like AdaGrad's and the step shrinks
    as gradients accumulate. The division by :math:`\sqrt V + \epsilon` comes *after* Newton–Schulz.

    ``variant="adam_ema"`` is this library's earlier rule, kept under its own name. It differs from
    Algorithm 1 in four ways: (1) :math:`M_1` and :math:`V` are Adam's bias-corrected EMAs,
    :math:`M_1 \leftarrow b_1 M_1 + (1-b_1) g`, :math:`V \leftarrow b_2 V + (1-b_2) g^2`, divided by
    :math:`1-b^{t+1}`; (2) the slow momentum is an (uncorrected) EMA of the chunk *mean*,
    :math:`M_2 \leftarrow M_2 + s_t (1-b_3)(\bar g_{\text{chunk}} - M_2)`; (3) it normalises *before*
    Newton–Schulz, :math:`d = \mathrm{NS}(\hat M_1/(\sqrt{\hat V}+\epsilon)) + \alpha\,\mathrm{NS}(M_2/(\sqrt{\hat V}+\epsilon))`,
    so each term has spectral norm near 1; (4) the slow term is re-orthogonalised every step (with the
    current :math:`\hat V`), and a chunk's new :math:`M_2` is used on that chunk's own last step.

    NS is :func:`orthogonalize` (optax.contrib's Muon iteration), applied to 2-D leaves only. Choice (the
    paper only treats matrices): other leaves skip it, :math:`O = M` (for ``"paper"`` that is
    :math:`d = (M_1 + \alpha M_2)/(\sqrt V + \epsilon)`; for ``"adam_ema"`` AdEMAMix's rule). Choice:
    :math:`O_2` is computed under ``lax.cond`` only on the chunk's last step (under ``vmap`` both
    branches run). The direction is added with a minus sign by :func:`m3` (or any
    ``optax.scale_by_learning_rate``), so learning-rate schedules compose.

    Args:
      b1: :math:`\beta_1`, weight of the gradient in the fast momentum.
      b2: :math:`\beta_2`, weight of the squared gradient in the second moment.
      b3: :math:`\beta_3`, weight of the chunk's gradients in the slow momentum.
      alpha: :math:`\alpha`, weight of the slow term.
      slow_period: :math:`f`, steps per chunk (int >= 1).
      eps: :math:`\epsilon`, added to :math:`\sqrt V`.
      ns_steps: keyword-only; Newton–Schulz iterations.
      variant: keyword-only; ``"paper"`` (Algorithm 1) or ``"adam_ema"`` (see above).

    Returns:
      An :class:`optax.GradientTransformation` whose updates are the direction :math:`d` (no sign flip).

    Example:
      >>> tx = scale_by_m3(b1=1.0, b2=1.0)   # one step: d = NS(g) / (|g| + eps), O2 = 0
      >>> d, _ = tx.update(jnp.diag(jnp.array([3.0, 4.0])), tx.init(jnp.zeros((2, 2))))
      >>> [round(float(v), 3) for v in jnp.diag(d) * jnp.array([3.0, 4.0])]   # NS(g): values near 1
      [0.723, 1.119]

    References:
      Behrouz et al., Nested Learning, 2025 (arXiv 2512.24695, Algorithm 1, M3); Jordan et al., Muon, 2024;
      Pagliardini et al., The AdEMAMix Optimizer, 2024.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    period = check_periods(slow_period, "slow_period")

    def init_fn(params):
        z = optax.tree.zeros_like(params)
        return M3State(jnp.zeros([], jnp.int32), z, z, z, z, z if variant == "paper" else ())

    def c(v, like):
        return jnp.asarray(v, like.dtype)

    def paper(updates, state):
        s = level_clock(period, state.count).active
        mu1 = jax.tree.map(lambda m, g: m + c(b1, g) * g, state.mu_fast, updates)
        nu = jax.tree.map(lambda v, g: v + c(b2, g) * g * g, state.nu, updates)
        direction = jax.tree.map(
            lambda m1, o2, v: (orthogonalize(m1, ns_steps) + c(alpha, m1) * o2) / (jnp.sqrt(v) + c(eps, v)),
            mu1,
            state.o_slow,
            nu,
        )
        acc = jax.tree.map(lambda a, g: a + g, state.acc, updates)

        def refresh(mu2, acc, o2):
            new = jax.tree.map(lambda m, a: m + c(b3, a) * a, mu2, acc)
            return new, optax.tree.zeros_like(acc), jax.tree.map(lambda m: orthogonalize(m, ns_steps), new)

        mu2, acc, o2 = jax.lax.cond(s, refresh, lambda m, a, o: (m, a, o), state.mu_slow, acc, state.o_slow)
        return direction, M3State(optax.safe_increment(state.count), mu1, mu2, nu, acc, o2)

    def adam_ema(updates, state):
        count = optax.safe_increment(state.count)
        s = level_clock(period, state.count).active
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
            a1 = orthogonalize(m1 / bc1.astype(m1.dtype) / denom, ns_steps)
            a2 = orthogonalize(m2 / denom, ns_steps)
            return a1 + c(alpha, m1) * a2

        return jax.tree.map(leaf, mu1, mu2, nu), M3State(count, mu1, mu2, nu, acc, ())

    def update_fn(updates, state, params=None):
        del params
        return (paper if variant == "paper" else adam_ema)(updates, state)

    return optax.GradientTransformation(init_fn, update_fn)


def m3(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    b3: jax.typing.ArrayLike = 0.9,
    alpha: jax.typing.ArrayLike = 1.0,
    slow_period: int = 10,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    ns_steps: int = 5,
    variant: str = "paper",
) -> optax.GradientTransformation:
    r"""M3 (multi-scale momentum Muon): ``optax.chain(scale_by_m3(...), optax.scale_by_learning_rate(lr))``.

    The update is :math:`u = -\eta_t\, d`, with :math:`d` the direction of :func:`scale_by_m3`; by default
    (``variant="paper"``) Algorithm 1 of Nested Learning,
    :math:`\theta \leftarrow \theta - \eta\,(O_1 + \alpha O_2)/(\sqrt V + \epsilon)`. ``variant="adam_ema"``
    is the earlier Adam-style rule (bias-corrected EMAs, chunk mean, normalisation before Newton–Schulz,
    slow term refreshed every step; listed in :func:`scale_by_m3`). Because :math:`V` is a running sum in
    Algorithm 1, the paper variant needs a larger :math:`\eta` than the EMA variant for the same progress.

    Args:
      learning_rate: :math:`\eta`, a number or an optax schedule of the step count.
      b1, b2, b3, alpha, slow_period, eps: see :func:`scale_by_m3`.
      ns_steps: keyword-only; Newton–Schulz iterations.
      variant: keyword-only; ``"paper"`` or ``"adam_ema"``.

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> tx = m3(0.1, variant="adam_ema")
      >>> p = jnp.ones((2, 2)); u, _ = tx.update(jnp.eye(2), tx.init(p), p)
      >>> bool(jnp.allclose(u, -0.1 * jnp.eye(2), atol=0.05))
      True

    References:
      Behrouz et al., Nested Learning, 2025 (arXiv 2512.24695, Algorithm 1).
    """
    return optax.chain(
        scale_by_m3(b1, b2, b3, alpha, slow_period, eps, ns_steps=ns_steps, variant=variant),
        optax.scale_by_learning_rate(learning_rate),
    )
