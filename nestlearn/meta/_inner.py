"""The inner loop: a model as a function of its parameters, task losses, and differentiable adaptation."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float, PyTree

Params = PyTree
ApplyFn = Callable[[Params, Array], Array]
LossFn = Callable[[Params, Array, Array], Float[Array, ""]]

CHECKPOINT_MODES = (None, "step", "segments")


def functional(model: nnx.Module) -> tuple[ApplyFn, Params]:
    """A Flax NNX model as a pure function of its parameters: ``apply(params, x) -> model(x)``.

    The model is split (``nnx.split``) into its graph definition, its ``nnx.Param`` state and the rest
    (batch statistics, RNG counters). ``params`` is the ``nnx.Param`` state, a pytree that ``jax.grad``,
    ``jax.vmap`` and optax take as it is; ``apply`` merges the graph with the given parameters and the
    rest, which stays fixed (a model's non-parameter state is not adapted by the inner loop).

    Args:
      model: any Flax NNX module.

    Returns:
      ``(apply, params)``.

    Example:
      >>> from nestlearn.nn import MLP
      >>> apply, params = functional(MLP(1, (40, 40), 1, rngs=nnx.Rngs(0)))
      >>> apply(params, jnp.zeros((5, 1))).shape
      (5, 1)
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply(p: Params, x: Array) -> Array:
        return nnx.merge(graphdef, p, rest)(x)

    return apply, params


def mse_loss(apply: ApplyFn) -> LossFn:
    """Mean squared error ``loss(params, x, y) = mean((apply(params, x) - y)²)``.

    Prediction and target must have the same shape (regression tasks carry ``y`` as ``[k, 1]``).

    Example:
      >>> loss = mse_loss(lambda p, x: p * x)
      >>> float(loss(2.0, jnp.ones((3, 1)), jnp.zeros((3, 1))))
      4.0
    """

    def loss(params: Params, x: Array, y: Array) -> Float[Array, ""]:
        pred = apply(params, x)
        if pred.shape != y.shape:
            raise ValueError(f"mse_loss: prediction shape {pred.shape} differs from target shape {y.shape}")
        return jnp.mean(jnp.square(pred - y))

    return loss


def cross_entropy_loss(apply: ApplyFn) -> LossFn:
    """Softmax cross-entropy with integer labels, averaged: ``mean(-log softmax(apply(params, x))[y])``.

    Example:
      >>> loss = cross_entropy_loss(lambda p, x: x @ p)
      >>> round(float(loss(jnp.zeros((2, 4)), jnp.ones((3, 2)), jnp.zeros((3,), jnp.int32))), 4)
      1.3863
    """

    def loss(params: Params, x: Array, y: Array) -> Float[Array, ""]:
        logits = apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss


def plain_path(key_path: tuple) -> tuple:
    """A JAX key path as plain ``str``/``int`` keys, without the ``.value`` of NNX variables.

    ``(DictKey('layers'), DictKey(2), DictKey('kernel'), GetAttrKey('value'))`` becomes
    ``('layers', 2, 'kernel')``: the path that ANIL's head predicate and Meta-SGD users see.
    """
    out = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                out.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            out.append(k.key)
        else:  # pragma: no cover - future key types
            out.append(str(k))
    return tuple(out)


def _check(steps: int, checkpoint: str | None, truncate: int | None, segment_length: int | None) -> None:
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if checkpoint not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, got {checkpoint!r}")
    if truncate is not None and (not isinstance(truncate, int) or truncate < 0):
        raise ValueError(f"truncate must be None or a non-negative int, got {truncate!r}")
    if segment_length is not None and (not isinstance(segment_length, int) or segment_length < 1):
        raise ValueError(f"segment_length must be None or a positive int, got {segment_length!r}")


def _make_step(
    loss_fn: LossFn,
    x: Array,
    y: Array,
    inner_opt: optax.GradientTransformation,
    lrs: Params | None,
    *,
    constant: bool = False,
):
    """One inner step on ``(params, opt_state)``: ``φ ← φ + lrs ⊙ inner_opt.update(∇L(φ))``.

    ``constant``: the update is computed from ``stop_gradient`` inputs and added as a constant,
    ``φ ← φ + sg(u)``, so the step is the identity map under differentiation (a truncated step) and no
    derivative of the inner gradient is ever built.
    """

    def step(carry):
        params, opt_state = carry
        at = jax.lax.stop_gradient(params) if constant else params
        grads = jax.grad(loss_fn)(at, x, y)
        updates, opt_state = inner_opt.update(grads, opt_state, at)
        if lrs is not None:
            updates = jax.tree.map(lambda u, lr: u * lr, updates, lrs)
        if constant:
            updates, opt_state = jax.lax.stop_gradient((updates, opt_state))
        return optax.apply_updates(params, updates), opt_state

    return step


def _repeat(step, carry, n: int, checkpoint: str | None, segment_length: int | None):
    """``step`` applied ``n`` times under ``lax.scan``, with the chosen rematerialisation."""
    if n == 0:
        return carry
    if checkpoint in (None, "step"):
        one = step if checkpoint is None else jax.checkpoint(step, prevent_cse=False)
        # The first step outside the scan: its input θ is the same for every task, so under a vmap over
        # tasks its forward pass stays one matmul over all the tasks' points (a scan carry would be
        # broadcast to one copy of θ per task first), and a single step (MAML's usual case) is no loop.
        carry = one(carry)
        if n == 1:
            return carry
        return jax.lax.scan(lambda c, _: (one(c), None), carry, length=n - 1)[0]
    remat_step = jax.checkpoint(step, prevent_cse=False)

    # "segments": the sqrt(N) schedule. The outer scan keeps only the carry at each segment boundary;
    # the backward pass recomputes one segment at a time (its carries, one step's activations at a
    # time), so memory is O(N/s + s) carries instead of O(N): with s = ceil(sqrt(N)), O(sqrt(N)).
    s = segment_length if segment_length is not None else math.isqrt(n - 1) + 1  # ceil(sqrt(n))
    s = min(s, n)
    n_full, rest = divmod(n, s)

    def segment(length):
        @jax.checkpoint
        def run(c):
            return jax.lax.scan(lambda c, _: (remat_step(c), None), c, length=length)[0]

        return run

    full = segment(s)
    carry = jax.lax.scan(lambda c, _: (full(c), None), carry, length=n_full)[0]
    if rest:  # N not a multiple of s: one shorter segment, exactly ``rest`` more steps
        carry = segment(rest)(carry)
    return carry


def adapt(
    loss_fn: LossFn,
    params: Params,
    x: Array,
    y: Array,
    *,
    inner_opt: optax.GradientTransformation,
    steps: int,
    checkpoint: str | None = None,
    segment_length: int | None = None,
    truncate: int | None = None,
    lrs: Params | None = None,
) -> Params:
    """Adapt ``params`` to one task's data: ``steps`` steps of ``inner_opt`` on ``loss_fn(·, x, y)``.

    .. math::

      s_0 = \\text{init}(θ),\\quad (u_i, s_{i+1}) = \\text{update}(∇L(φ_i), s_i, φ_i),\\quad
      φ_{i+1} = φ_i + \\text{lrs} ⊙ u_i,\\quad φ_0 = θ

    The loop runs under ``lax.scan`` and is differentiable end to end, second order included: the
    gradient of a function of the result with respect to ``params`` (and ``lrs``) goes through every
    inner step (MAML). Any optax transform can be the inner optimizer; Adam must be built with
    ``eps_root > 0`` (``optax.adam(lr, eps_root=1e-8)``), since the derivative of ``sqrt(v)`` at a
    zero second moment is infinite and turns the meta-gradient into NaN.

    Args:
      loss_fn: ``loss_fn(params, x, y) -> scalar``.
      params: the starting point θ (any pytree).
      x: the task's inputs.
      y: the task's targets.
      inner_opt: the inner optimizer (``optax.sgd(α)`` is MAML's).
      steps: number of inner steps N (static).
      checkpoint: rematerialisation of the unroll, to trade compute for memory under differentiation.
        ``None``: store every step's activations and carries. ``"step"``: ``jax.checkpoint`` each step,
        so only the N carries (params, optimizer state) are stored and each step's activations are
        recomputed on the way back. ``"segments"``: the sqrt(N) schedule, an outer scan over segments
        of ``segment_length`` steps (default ⌈√N⌉) whose body is a checkpointed inner scan, so only
        ⌈N/s⌉ + s carries live at once; a last, shorter segment takes the remainder when s does not
        divide N. All three give the same numbers (up to float reassociation).
      segment_length: segment length for ``checkpoint="segments"``.
      truncate: ``k``: gradients flow through the last ``k`` steps only. The first ``N - k`` steps run
        on ``stop_gradient`` inputs and add their updates as constants, ``φ_{i+1} = φ_i + sg(u_i)``, so
        ``φ_{N-k} = θ + sg(φ_{N-k} - θ)`` in derivative and the truncated prefix counts as the identity
        map (its first-order approximation): ``truncate=0`` gives first-order MAML, ``None`` the full
        unroll.
      lrs: optional per-parameter learning rates, a pytree like ``params`` multiplying the optimizer's
        updates (Meta-SGD, with ``inner_opt=optax.sgd(1.0)``).

    Returns:
      The adapted parameters φ_N, same structure and dtypes as ``params``.

    Example:
      >>> loss = lambda p, x, y: jnp.mean((x * p - y) ** 2)
      >>> phi = adapt(loss, 0.0, jnp.ones(4), 2 * jnp.ones(4), inner_opt=optax.sgd(0.25), steps=1)
      >>> float(phi)  # 0 - 0.25 * d/dp (p - 2)² at 0 = 0 - 0.25 * (-4)
      1.0

    Reference: Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks", ICML 2017; Griewank, "Achieving logarithmic growth of temporal and spatial complexity
    in reverse automatic differentiation", 1992 (checkpointing); Shaban et al., "Truncated
    Back-propagation for Bilevel Optimization", AISTATS 2019.
    """
    _check(steps, checkpoint, truncate, segment_length)
    step = _make_step(loss_fn, x, y, inner_opt, lrs)
    carry = (params, inner_opt.init(params))
    k = steps if truncate is None else min(truncate, steps)
    if k < steps:
        # The truncated prefix: φ_{i+1} = φ_i + sg(u_i), the value of the full step and the derivative of
        # the identity, so φ_{N-k} = θ + Σ sg(u_i) (first-order MAML when k = 0, the hand-written
        # ``θ - α sg(∇L(θ))``, bit for bit).
        lr_sg = None if lrs is None else jax.lax.stop_gradient(lrs)
        sg_step = _make_step(loss_fn, x, y, inner_opt, lr_sg, constant=True)
        carry = _repeat(sg_step, (params, jax.lax.stop_gradient(carry[1])), steps - k, None, None)
    return _repeat(step, carry, k, checkpoint, segment_length)[0]


def adapt_trajectory(
    loss_fn: LossFn,
    params: Params,
    x: Array,
    y: Array,
    metric: Callable[[Params], Array],
    *,
    inner_opt: optax.GradientTransformation,
    steps: int,
    lrs: Params | None = None,
) -> tuple[Params, Array]:
    """Adapt as :func:`adapt` does and record ``metric(φ_i)`` for ``i = 0..steps`` in the same scan.

    Returns:
      ``(φ_N, metrics)`` with ``metrics[i] = metric(φ_i)``, shape ``[steps + 1, ...]``.

    Example:
      >>> loss = lambda p, x, y: jnp.mean((x * p - y) ** 2)
      >>> x, y = jnp.ones(4), 2 * jnp.ones(4)
      >>> _, curve = adapt_trajectory(loss, 0.0, x, y, lambda p: loss(p, x, y),
      ...                             inner_opt=optax.sgd(0.25), steps=2)
      >>> curve.tolist()  # φ = 0, 1, 1.5
      [4.0, 1.0, 0.25]
    """
    _check(steps, None, None, None)
    step = _make_step(loss_fn, x, y, inner_opt, lrs)

    def body(carry, _):
        return step(carry), metric(carry[0])

    (phi, _), ms = jax.lax.scan(body, (params, inner_opt.init(params)), length=steps)
    last = metric(phi)
    return phi, jnp.concatenate([ms, last[None]], axis=0)
