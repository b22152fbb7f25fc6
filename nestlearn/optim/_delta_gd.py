"""Delta Gradient Descent: a gradient step that first forgets what the layer maps its current input to."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def delta_gradient_step(
    kernel: jax.Array, x: jax.Array, delta: jax.Array, learning_rate: jax.typing.ArrayLike
) -> jax.Array:
    r"""One Delta Gradient Descent step of a linear layer ``y = x @ kernel`` (Flax layout ``[din, dout]``).

    In the paper's layout :math:`W = K^\top` (``y = W x``), the rule is
    :math:`W \leftarrow W(I - \eta' x x^\top) - \eta' \delta x^\top`; for the kernel
    :math:`K \leftarrow K - \eta' x (x^\top K + \delta^\top)`, with :math:`\eta' = \eta / (1 + \eta\lVert x\rVert^2)`.
    For a batch ``x: [B, din]``, ``delta: [B, dout]``, the step is the batch mean of the per-example terms
    with one :math:`\eta' = \eta / (1 + \eta\,\overline{\lVert x_b\rVert^2})` (mean squared norm):

    .. math::
      K \leftarrow K - \eta' \tfrac{1}{B}\textstyle\sum_b x_b (x_b^\top K + \delta_b^\top),

    exactly the paper's rule when B = 1.

    Args:
      kernel: ``[din, dout]``.
      x: the layer's input, ``[din]`` or ``[B, din]``.
      delta: the loss's derivative with respect to the layer's output for each example, ``[dout]`` or
        ``[B, dout]`` (for a mean-reduced loss, ``B`` times what ``jax.grad`` gives for the output).
      learning_rate: :math:`\eta`.

    Returns:
      The new kernel.

    Example:
      >>> k = delta_gradient_step(jnp.zeros((2, 1)), jnp.array([1.0, 0.0]), jnp.array([-1.0]), 1.0)
      >>> k.tolist()   # eta' = 1 / (1 + 1) = 0.5
      [[0.5], [0.0]]

    References:
      Behrouz et al., Nested Learning, 2025 (Delta Gradient Descent).
    """
    x2 = jnp.atleast_2d(x)
    d2 = jnp.atleast_2d(delta)
    _check(kernel, x2, d2)
    grad = x2.T @ d2 / x2.shape[0]
    return kernel + _dgd_update(kernel, x2, grad, learning_rate)


def _check(kernel, x, delta=None):
    if kernel.ndim != 2 or x.ndim != 2 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"inputs must be [batch, {kernel.shape[0] if kernel.ndim == 2 else 'din'}] for a [din, dout] "
            f"kernel, got inputs {x.shape} for kernel {kernel.shape}"
        )
    if delta is not None and (delta.shape[0] != x.shape[0] or delta.shape[-1] != kernel.shape[1]):
        raise ValueError(f"delta must be [{x.shape[0]}, {kernel.shape[1]}], got {delta.shape}")


def _dgd_update(kernel, x, grad, learning_rate):
    dt = kernel.dtype
    lr = jnp.asarray(learning_rate, dt)
    b = x.shape[0]
    lr_eff = lr / (1 + lr * jnp.sum(x * x) / b)
    return -lr_eff * (x.T @ (x @ kernel) / b + grad)


class DeltaGDState(NamedTuple):
    """State of :func:`delta_gradient_descent`.

    Attributes:
      count: int32, steps taken.
    """

    count: jax.Array


def delta_gradient_descent(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    r"""Delta Gradient Descent as an optax transform; the layer inputs come in as the extra argument ``inputs``.

    The gradient of a linear layer is :math:`G = \frac{1}{B}\sum_b x_b \delta_b^\top`, so the rule of
    :func:`delta_gradient_step` needs only the inputs beside the ordinary gradient:

    .. math::
      u_K = -\eta' \big(\tfrac{1}{B} X^\top X K + G\big), \qquad
      \eta' = \frac{\eta}{1 + \eta\,\overline{\lVert x_b \rVert^2}} .

    ``update(grads, state, params, inputs=...)``: ``inputs`` has the structure of ``params`` with, at each
    ``[din, dout]`` kernel, the layer's input ``[B, din]`` for this batch, and ``None`` elsewhere; leaves
    with ``None`` (biases, or layers without a recorded input) take a plain step :math:`-\eta G`.
    ``grads`` is the gradient of the *mean* loss (as ``jax.grad`` gives it). The inputs are collected,
    e.g., from ``nnx`` intermediates or by returning them as the auxiliary value of
    ``jax.value_and_grad(..., has_aux=True)``. Written by hand: optax has no input-dependent step.
    The rate enters :math:`\eta'` nonlinearly, so it cannot be split off as ``optax.scale_by_learning_rate``;
    a schedule is evaluated here instead, at the step count (:math:`\eta_t`, from 0, as optax's).

    Args:
      learning_rate: :math:`\eta`, a number or an optax schedule of the step count.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires ``inputs``.

    Example:
      >>> tx = delta_gradient_descent(1.0)
      >>> p = {"k": jnp.zeros((2, 1)), "b": jnp.zeros(1)}
      >>> g = {"k": jnp.array([[-3.0], [-3.0]]), "b": jnp.array([-3.0])}   # x = [1, 1], delta = -3
      >>> u, _ = tx.update(g, tx.init(p), p, inputs={"k": jnp.array([[1.0, 1.0]]), "b": None})
      >>> u["k"].ravel().tolist(), u["b"].tolist()   # eta' = 1/3: -(1/3) (x x^T K + G)
      ([1.0, 1.0], [3.0])

    References:
      Behrouz et al., Nested Learning, 2025 (Delta Gradient Descent).
    """

    def init_fn(params):
        del params
        return DeltaGDState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, inputs: Any = None, **extra_args):
        del extra_args
        if params is None or inputs is None:
            raise ValueError("delta_gradient_descent needs params and the extra argument inputs=")
        treedef = jax.tree.structure(params)
        try:
            xs = treedef.flatten_up_to(inputs)
        except (ValueError, TypeError) as e:
            raise ValueError(f"inputs must have the structure of params (None where unused): {e}") from e
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        out = []
        for k, g, x in zip(jax.tree.leaves(params), treedef.flatten_up_to(updates), xs):
            if x is None:
                out.append(-jnp.asarray(lr, g.dtype) * g)
            else:
                x = jnp.asarray(x, k.dtype)
                _check(k, x)
                out.append(_dgd_update(k, x, g, lr).astype(g.dtype))
        return jax.tree.unflatten(treedef, out), DeltaGDState(optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
