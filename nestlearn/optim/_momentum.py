"""Momentum as a memory (Nested Learning): delta momentum and deep momentum, with and without Newton–Schulz."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nestlearn.optim._m3 import orthogonalize

PRECONDITIONERS = ("identity", "adam")
OBJECTIVES = ("dot", "reconstruct")
MEMORIES = ("mlp", "linear")


class DeltaMomentumState(NamedTuple):
    """State of :func:`scale_by_delta_momentum`.

    Attributes:
      count: int32, steps taken.
      momentum: the memory ``m`` (unscaled by the learning rate; the direction is ``m``).
      nu: the EMA of squared gradients of ``precondition="adam"`` (``()`` otherwise).
    """

    count: jax.Array
    momentum: optax.Updates
    nu: optax.Updates


def scale_by_delta_momentum(
    decay: jax.typing.ArrayLike = 0.9,
    beta: jax.typing.ArrayLike = 1.0,
    *,
    normalize: bool = True,
    eps: float = 1e-12,
    precondition: str | Callable[[jax.Array], jax.Array] = "identity",
    b2: jax.typing.ArrayLike = 0.999,
    precondition_eps: jax.typing.ArrayLike = 1e-8,
) -> optax.GradientTransformation:
    r"""Delta-rule momentum's direction (no learning rate): forget along the gradient, then write :math:`Pg`.

    Per parameter leaf, with :math:`g` the leaf's gradient flattened to a vector and :math:`m` its memory
    (same shape), the paper's :math:`m \leftarrow m(\alpha I - g g^\top) - \eta P g` is run as

    .. math::
      k = g / \sqrt{\lVert g \rVert^2 + \epsilon}, \qquad
      m \leftarrow \alpha m - \beta \langle m, k \rangle k + P g, \qquad d = m,

    and the update is :math:`-\eta\, d` (:func:`delta_momentum`); with a constant :math:`\eta` this is the
    paper's recursion for :math:`-\eta m` exactly (it is linear in :math:`m`), and with a schedule the rate
    applies at the output, as in ``optax.sgd``. The preconditioner :math:`P`:

    - ``"identity"`` (default): :math:`P g = g`.
    - ``"adam"``: Adam's diagonal second moment, :math:`v \leftarrow b_2 v + (1-b_2) g^2`,
      :math:`P g = g / (\sqrt{v / (1-b_2^{t+1})} + \epsilon_P)` (bias-corrected as Adam's).
    - a callable ``P(g_leaf) -> leaf``, applied to each leaf (stateless; e.g. a fixed diagonal). Under
      ``optax.inject_hyperparams`` name it in ``static_args`` (optax treats callables as schedules).

    Choices (the paper leaves them open): :math:`g g^\top` acts on each leaf as one flattened vector (a
    matrix gradient is not split into rows: O(n) work and one key per leaf); the erasure uses the raw
    gradient :math:`g` (the paper's :math:`g g^\top`), not :math:`P g`; the key is normalised
    (``normalize=True``) so that :math:`\alpha I - \beta k k^\top` has eigenvalues :math:`\alpha` and
    :math:`\alpha - \beta`, bounded whatever the gradient's scale; ``normalize=False`` uses the literal,
    unnormalised :math:`g`, which diverges once :math:`\lVert g\rVert^2 > 1+\alpha`. With ``beta = 0``
    and :math:`P = I` this is ``optax.trace(decay)`` (heavy ball). Written by hand (optax has no delta
    rule); the state follows ``optax.trace`` and the ``"adam"`` moment ``optax.scale_by_adam``.

    Args:
      decay: :math:`\alpha`, the memory's retention.
      beta: strength of the delta-rule erasure along the gradient (1 erases it fully with ``normalize``).
      normalize: keyword-only; normalise the key (see above).
      eps: keyword-only; added to :math:`\lVert g\rVert^2` before the square root.
      precondition: keyword-only; ``"identity"``, ``"adam"`` or a callable (see above).
      b2: keyword-only; the second moment's rate for ``"adam"``.
      precondition_eps: keyword-only; :math:`\epsilon_P` for ``"adam"``.

    Returns:
      An :class:`optax.GradientTransformation` whose updates are the direction :math:`d = m`.

    Example:
      >>> tx = scale_by_delta_momentum(0.9)
      >>> d, _ = tx.update(jnp.array([1.0, 0.0]), tx.init(jnp.zeros(2))); print(d)
      [1. 0.]

    References:
      Behrouz et al., Nested Learning, 2025 ("optimizers as associative memories", delta momentum).
    """
    adam = precondition == "adam"
    if not callable(precondition) and precondition not in PRECONDITIONERS:
        raise ValueError(f"precondition must be one of {PRECONDITIONERS} or a callable, got {precondition!r}")

    def init_fn(params):
        z = optax.tree.zeros_like(params)
        return DeltaMomentumState(jnp.zeros([], jnp.int32), z, z if adam else ())

    def leaf(g, m, pg):
        dt = g.dtype
        k = g * jax.lax.rsqrt(jnp.sum(g * g) + jnp.asarray(eps, dt)) if normalize else g
        return jnp.asarray(decay, dt) * m - jnp.asarray(beta, dt) * jnp.sum(m * k) * k + pg

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        nu = state.nu
        if adam:
            nu = jax.tree.map(
                lambda v, g: jnp.asarray(b2, g.dtype) * v + (1 - jnp.asarray(b2, g.dtype)) * g * g,
                nu,
                updates,
            )
            bc = 1 - jnp.asarray(b2, jnp.float32) ** count.astype(jnp.float32)
            pg = jax.tree.map(
                lambda g, v: g / (jnp.sqrt(v / bc.astype(v.dtype)) + jnp.asarray(precondition_eps, v.dtype)),
                updates,
                nu,
            )
        elif callable(precondition):
            pg = jax.tree.map(lambda g: jnp.asarray(precondition(g), g.dtype), updates)
        else:
            pg = updates
        m = jax.tree.map(leaf, updates, state.momentum, pg)
        return m, DeltaMomentumState(count, m, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def delta_momentum(
    learning_rate: optax.ScalarOrSchedule,
    decay: jax.typing.ArrayLike = 0.9,
    beta: jax.typing.ArrayLike = 1.0,
    *,
    normalize: bool = True,
    eps: float = 1e-12,
    precondition: str | Callable[[jax.Array], jax.Array] = "identity",
    b2: jax.typing.ArrayLike = 0.999,
    precondition_eps: jax.typing.ArrayLike = 1e-8,
) -> optax.GradientTransformation:
    r"""Delta-rule momentum: ``optax.chain(scale_by_delta_momentum(...), optax.scale_by_learning_rate(lr))``.

    The update is :math:`-\eta_t m` with :math:`m \leftarrow \alpha m - \beta\langle m, k\rangle k + Pg`
    (:func:`scale_by_delta_momentum`, where every option is described). With ``beta = 0`` and no
    preconditioner this is ``optax.sgd(learning_rate, momentum=decay)``.

    Args:
      learning_rate: :math:`\eta`, a number or an optax schedule of the step count.
      decay, beta: see :func:`scale_by_delta_momentum`.
      normalize, eps, precondition, b2, precondition_eps: keyword-only; see :func:`scale_by_delta_momentum`.

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> tx = delta_momentum(0.1, 0.9)
      >>> p = jnp.array([1.0, 0.0]); s = tx.init(p)
      >>> u, s = tx.update(jnp.array([1.0, 0.0]), s, p); print(u)
      [-0.1 -0. ]

    References:
      Behrouz et al., Nested Learning, 2025 ("optimizers as associative memories", delta momentum).
    """
    return optax.chain(
        scale_by_delta_momentum(
            decay,
            beta,
            normalize=normalize,
            eps=eps,
            precondition=precondition,
            b2=b2,
            precondition_eps=precondition_eps,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


class DeepMomentumState(NamedTuple):
    """State of :func:`scale_by_deep_momentum`.

    Attributes:
      count: int32, steps taken.
      memory: the memory's weights, ``{"m": tree}`` (``memory="linear"``) or ``{"m": tree, "a": tree,
        "b": tree}`` (``memory="mlp"``), each tree shaped as the parameters (``a`` and ``b`` with a
        trailing ``hidden`` axis on every leaf).
    """

    count: jax.Array
    memory: Any


def momentum_mlp(m: jax.Array, a: jax.Array | None, b: jax.Array | None, g: jax.Array) -> jax.Array:
    r"""One leaf's memory read at its gradient, coordinate-wise: :math:`f(g) = m + \sum_j b_j \tanh(a_j g)`.

    ``a`` and ``b`` have the leaf's shape plus a trailing ``hidden`` axis; a linear memory passes
    ``None`` for both and reads :math:`f(g) = m`.
    """
    if a is None:
        return m
    return m + jnp.sum(b * jnp.tanh(a * g[..., None]), -1)


def scale_by_deep_momentum(
    memory_lr: jax.typing.ArrayLike = 1.0,
    decay: jax.typing.ArrayLike = 0.9,
    *,
    objective: str = "dot",
    memory: str = "mlp",
    hidden: int = 4,
    orthogonalize_output: bool = False,
    ns_steps: int = 5,
) -> optax.GradientTransformation:
    r"""Deep momentum's direction (no learning rate): the momentum is a memory trained on its own inner loss.

    The paper's DMGD: :math:`\phi \leftarrow \alpha\,\phi - \eta_m \nabla_\phi \mathcal{L}^{(2)}(\phi; g)`, then
    :math:`d = f_\phi(g)` (or :math:`\mathrm{NS}(f_\phi(g))`), the update being :math:`-\eta\, d`
    (:func:`deep_momentum`). The memory, per coordinate :math:`i` of every leaf:

    - ``memory="linear"``: :math:`f(g)_i = m_i` (the key-less linear memory: the momentum buffer itself).
    - ``memory="mlp"`` (default): :math:`f(g)_i = m_i + \sum_{j=1}^{h} b_{ij}\tanh(a_{ij} g_i)`, a residual
      one-hidden-layer MLP of the coordinate's gradient with its own weights per coordinate
      (``hidden`` = :math:`h`; state :math:`(2h+1)\times` the parameters).

    The inner objective, summed over every coordinate of every leaf:

    - ``objective="dot"`` (default, the paper's dot-product objective):
      :math:`\mathcal{L}^{(2)} = -\sum_i f(g)_i\, g_i`. Its gradient in :math:`m` is :math:`-g`, so
      :math:`m \leftarrow \alpha m + \eta_m g` stores the gradient history: with the linear memory this *is*
      heavy-ball momentum, ``optax.trace(decay)`` scaled by :math:`\eta_m` (exactly ``optax.sgd(lr,
      momentum=decay)`` at ``memory_lr=1``). The MLP adds :math:`b_{ij} \leftarrow \alpha b_{ij} +
      \eta_m \tanh(a_{ij} g_i) g_i` (a bounded record of gradient magnitudes, read through the current
      gradient's sign-like :math:`\tanh`), and :math:`a_{ij}` moves by
      :math:`\eta_m b_{ij}(1-\tanh^2(a_{ij}g_i)) g_i^2`. The objective is linear in the memory's output,
      hence unbounded below: ``decay < 1`` is what keeps the memory bounded.
    - ``objective="reconstruct"`` (this library's earlier rule):
      :math:`\mathcal{L}^{(2)} = \tfrac12 \sum_i (f(g)_i - g_i)^2`. Its minimiser reproduces the *current*
      gradient, :math:`f(g) = g`: the memory stores no history, and under a constant gradient the step
      settles at plain SGD's (:math:`-\eta g`; heavy ball's is :math:`-\eta g/(1-\alpha)`). With the
      linear memory it is an EMA of gradients with rate :math:`\eta_m` (``decay = 1``).

    ``orthogonalize_output=True`` applies Muon's Newton–Schulz map (:func:`~nestlearn.optim.orthogonalize`,
    optax.contrib's iteration) to the read of every 2-D leaf: Muon as a deep optimizer. With the linear
    memory, ``objective="dot"``, ``decay = β`` and ``memory_lr = 1 - β`` this equals
    ``optax.contrib.muon(lr, beta=β, nesterov=False)`` on 2-D leaves whose first dimension is at least the
    second (Muon's width factor :math:`\sqrt{\max(1, n_{out}/n_{in})}` is then 1, and its bias correction
    cancels in the Frobenius pre-normalisation up to its :math:`10^{-8}`).

    Choices (the paper leaves them open): the memory is coordinate-wise with weights per coordinate (so
    it can store a history of the whole gradient at O(n) cost; a memory shared by every coordinate cannot);
    initialisation :math:`m = b = 0` and :math:`a_{ij}` geometric in [0.5, 2] over :math:`j` (the MLP
    starts as the linear memory); the retention :math:`\alpha` applies to every memory weight; one
    inner step per outer step, the memory updated before it is read (the paper's
    :math:`W \leftarrow W + m_{t+1}(g_t)`). Written by hand; the inner gradient is ``jax.grad``.

    Args:
      memory_lr: :math:`\eta_m`, the memory's inner step size.
      decay: :math:`\alpha`, retention of the memory's weights.
      objective: keyword-only; ``"dot"`` or ``"reconstruct"``.
      memory: keyword-only; ``"mlp"`` or ``"linear"``.
      hidden: keyword-only; hidden units per coordinate of the MLP memory (a Python int >= 1).
      orthogonalize_output: keyword-only; Newton–Schulz on the read of 2-D leaves (Muon).
      ns_steps: keyword-only; Newton–Schulz iterations.

    Returns:
      An :class:`optax.GradientTransformation` whose updates are the direction :math:`d`.

    Example:
      >>> tx = scale_by_deep_momentum(1.0, 0.5, memory="linear")   # heavy ball: d = 0.5 d + g
      >>> s = tx.init(jnp.zeros(1)); _, s = tx.update(jnp.ones(1), s); d, _ = tx.update(jnp.ones(1), s)
      >>> d.tolist()
      [1.5]

    References:
      Behrouz et al., Nested Learning, 2025 (deep momentum gradient descent; Muon as its Newton–Schulz
      output); Jordan et al., Muon, 2024.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if memory not in MEMORIES:
        raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be an int >= 1, got {hidden!r}")
    a0 = np.geomspace(0.5, 2.0, hidden) if hidden > 1 else np.ones(1)

    def init_fn(params):
        mem = {"m": optax.tree.zeros_like(params)}
        if memory == "mlp":
            mem["a"] = jax.tree.map(
                lambda p: jnp.broadcast_to(jnp.asarray(a0, p.dtype), (*p.shape, hidden)), params
            )
            mem["b"] = jax.tree.map(lambda p: jnp.zeros((*p.shape, hidden), p.dtype), params)
        return DeepMomentumState(jnp.zeros([], jnp.int32), mem)

    def read(mem, grads):
        if memory == "linear":
            return mem["m"]
        return jax.tree.map(momentum_mlp, mem["m"], mem["a"], mem["b"], grads)

    def inner_loss(mem, grads):
        def one(f, g):
            return -jnp.sum(f * g) if objective == "dot" else 0.5 * jnp.sum((f - g) ** 2)

        return sum(jax.tree.leaves(jax.tree.map(one, read(mem, grads), grads)))

    def update_fn(updates, state, params=None):
        del params
        grads = jax.grad(inner_loss)(state.memory, updates)
        mem = jax.tree.map(
            lambda p, d: jnp.asarray(decay, p.dtype) * p - jnp.asarray(memory_lr, p.dtype) * d,
            state.memory,
            grads,
        )
        direction = read(mem, updates)
        if orthogonalize_output:
            direction = jax.tree.map(lambda x: orthogonalize(x, ns_steps), direction)
        return direction, DeepMomentumState(optax.safe_increment(state.count), mem)

    return optax.GradientTransformation(init_fn, update_fn)


def deep_momentum(
    learning_rate: optax.ScalarOrSchedule,
    memory_lr: jax.typing.ArrayLike = 1.0,
    decay: jax.typing.ArrayLike = 0.9,
    *,
    objective: str = "dot",
    memory: str = "mlp",
    hidden: int = 4,
    orthogonalize_output: bool = False,
    ns_steps: int = 5,
) -> optax.GradientTransformation:
    r"""Deep momentum: ``optax.chain(scale_by_deep_momentum(...), optax.scale_by_learning_rate(lr))``.

    The update is :math:`-\eta_t f_\phi(g)` (or :math:`-\eta_t \mathrm{NS}(f_\phi(g))`) with the memory
    :math:`f_\phi` trained one step per outer step on its inner objective; see
    :func:`scale_by_deep_momentum` for the memories, the objectives (``"dot"``, the paper's, stores the
    gradient history; ``"reconstruct"`` converges to plain SGD) and the Muon output.

    Args:
      learning_rate: :math:`\eta`, a number or an optax schedule of the step count.
      memory_lr, decay: see :func:`scale_by_deep_momentum`.
      objective, memory, hidden, orthogonalize_output, ns_steps: keyword-only; see
        :func:`scale_by_deep_momentum`.

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> tx = deep_momentum(0.1)
      >>> u, _ = tx.update(jnp.zeros(3), tx.init(jnp.zeros(3))); bool(jnp.all(u == 0))   # f(0) = 0
      True

    References:
      Behrouz et al., Nested Learning, 2025 (deep momentum gradient descent).
    """
    return optax.chain(
        scale_by_deep_momentum(
            memory_lr,
            decay,
            objective=objective,
            memory=memory,
            hidden=hidden,
            orthogonalize_output=orthogonalize_output,
            ns_steps=ns_steps,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
