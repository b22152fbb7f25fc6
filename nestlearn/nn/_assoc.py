r"""The associative-memory primitive: a memory that learns key -> value maps in context, two ways to run it.

A memory :math:`M` (a matrix, :math:`f(x) = xW`, or a residual two-layer MLP,
:math:`f(x) = x + \mathrm{silu}(xW_1)W_2`) is trained *while it reads the sequence*: at token :math:`t`
it takes one gradient step on an inner objective :math:`\ell_t(M) = \ell(f_M(k_t), v_t)`, with a
per-token learning rate :math:`\eta_t`, a retention gate :math:`\alpha_t \in (0, 1]` and optionally
momentum :math:`\beta_t`, then answers the query :math:`o_t = f_{M_t}(q_t)`:

.. math::
  S_t = \beta_t S_{t-1} - \eta_t \nabla\ell_t(\bar M_t), \qquad
  M_t = \alpha_t M_{t-1} + S_t \quad(\text{without momentum } S_t = -\eta_t\nabla\ell_t(\bar M_t)).

The inner objectives are ``"l2"``, :math:`\ell = \tfrac12\lVert f(k) - v\rVert^2` (the delta rule, which
*overwrites*), and ``"dot"``, :math:`\ell = -\langle f(k), v\rangle` (Hebbian, which *adds*: with a matrix
memory and :math:`\alpha = \eta = 1` it is linear attention). :math:`\bar M_t` is where the gradient is
taken: the current state :math:`M_{t-1}` (``online=True``, exact per-token learning; matrix memories
only), or the state at the start of the token's block of ``chunk`` tokens (``online=False``,
mini-batch gradient descent as TTT and Titans train their memories).

Two paths compute the same thing:

- :func:`memory_scan`, per token: a ``lax.scan`` over tokens that calls ``jax.grad`` of the inner loss.
  It is the reference, and it is what recurrent inference looks like.
- :func:`memory_chunked`, chunkwise parallel: a ``lax.scan`` over chunks of ``chunk`` tokens; inside a
  chunk every quantity is a matrix product. The state after token :math:`i` of a chunk is

  .. math::
    M_i = a_i M_0 + s_i S_0 + \sum_{j \le i} c_{ij} u_j, \qquad u_j = -\eta_j \nabla\ell_j,

  with :math:`a_i = \prod_{l\le i}\alpha_l`, :math:`c_{ij} = \sum_{m=j}^{i} \prod_{l=m+1}^{i}\alpha_l
  \prod_{l=j+1}^{m}\beta_l` (:math:`\prod_{l=j+1}^i \alpha_l` without momentum) and
  :math:`s_i = \sum_{m\le i}\prod_{l=m+1}^{i}\alpha_l \prod_{l\le m}\beta_l`. The gradient of a dense
  layer at one token is an outer product :math:`x_j^\top \delta_j`, so a query reads the updated memory
  without ever forming it: :math:`y M_i = a_i\, y M_0 + s_i\, y S_0 - \sum_j c_{ij}\eta_j (y\cdot x_j)
  \delta_j` (the "dual form"). For the online delta rule the residuals depend on the earlier writes of
  the same chunk, :math:`r_i = k_i M_{i-1} - v_i`, which is a unit lower-triangular linear system in the
  chunk's residuals, solved with one ``solve_triangular``.

Both paths carry the state across calls, handle sequences shorter than a chunk and a partial last chunk,
and report the per-token *surprise* :math:`\lVert\nabla\ell_t\rVert` (Titans' name for it). A
mini-batch memory's state also holds its block's position and starting weights (:class:`MemoryState`),
so a sequence fed whole, in pieces of any length or token by token gives the same outputs and state.

``inner="dgd"`` replaces gradient descent by Delta Gradient Descent (Nested Learning),
:math:`W_i = (\alpha_i I - \eta_i x_i^\top x_i) W_{i-1} - \eta_i x_i^\top \delta_i` per layer with the
gradient signal :math:`\delta_i` at the block start: an online delta rule with key :math:`x_i` and value
:math:`-\delta_i`, so the chunkwise path solves one unit lower-triangular system per layer and chunk.

References:
  Katharopoulos et al. 2020 (linear attention); Schlag et al. 2021 and Yang et al. 2024 (DeltaNet and its
  chunkwise form); Sun et al. 2024 (TTT, mini-batch inner updates and the dual form); Behrouz et al. 2024
  (Titans: momentum, "surprise", retention gate); Behrouz et al. 2025 (Nested Learning).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

_TINY = 1e-30  # retention is floored here before its log, so a gate of exactly 0 stays finite


@dataclasses.dataclass(frozen=True)
class MemorySpec:
    r"""What the memory is and how it learns in context.

    Attributes:
      memory: ``"linear"`` (a ``d_key x d_value`` matrix) or ``"mlp"`` (residual two-layer SiLU MLP,
        ``d_key == d_value``).
      objective: ``"l2"`` (delta rule) or ``"dot"`` (Hebbian / linear attention).
      momentum: whether the update carries momentum ``S`` with per-token rate ``beta``.
      online: gradient at the current state (exact per-token learning; linear memories) instead of at the
        start of the block of ``chunk`` tokens (mini-batch gradient descent; required for ``"mlp"``).
      chunk: tokens per chunk of the chunkwise path, and the block of mini-batch gradient descent.
      stop_write_grad: treat what is written in context as a constant for the outer gradient (the writes
        are not backpropagated through; queries, the initial state and the read-out still learn).
      inner: the inner optimizer. ``"gd"``: gradient descent with retention, :math:`W \leftarrow \alpha W -
        \eta\nabla\ell`. ``"dgd"``: Delta Gradient Descent (Nested Learning), :math:`W \leftarrow (\alpha I -
        \eta\, x^\top x) W - \eta\nabla\ell` in the row convention ``x @ W``, with :math:`x` each layer's
        own input at the block-start state (the key for a matrix memory and for an MLP's first layer,
        :math:`\mathrm{silu}(k W_1)` for its second). Needs ``online=False`` (the gradient at the block
        start; with online gradients the L2 loss's own :math:`x^\top x W` term is already the delta rule)
        and ``momentum=False``.
    """

    memory: Literal["linear", "mlp"] = "linear"
    objective: Literal["l2", "dot"] = "l2"
    momentum: bool = False
    online: bool = True
    chunk: int = 64
    stop_write_grad: bool = False
    inner: Literal["gd", "dgd"] = "gd"

    def __post_init__(self) -> None:
        if self.memory not in ("linear", "mlp"):
            raise ValueError(f"MemorySpec.memory must be 'linear' or 'mlp', got {self.memory!r}")
        if self.objective not in ("l2", "dot"):
            raise ValueError(f"MemorySpec.objective must be 'l2' or 'dot', got {self.objective!r}")
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"MemorySpec.chunk must be a positive int, got {self.chunk!r}")
        if self.memory == "mlp" and self.online:
            raise ValueError(
                "MemorySpec.online=True needs a linear memory: an MLP memory has no exact chunkwise form of "
                "per-token learning; use online=False (mini-batch gradient descent over each chunk)"
            )
        if self.inner not in ("gd", "dgd"):
            raise ValueError(f"MemorySpec.inner must be 'gd' or 'dgd', got {self.inner!r}")
        if self.inner == "dgd" and self.online:
            raise ValueError(
                "MemorySpec.inner='dgd' needs online=False (the gradient at the block start): with online "
                "gradients of the L2 loss the x^T x W term is the delta rule's own; use inner='gd'"
            )
        if self.inner == "dgd" and self.momentum:
            raise ValueError(
                "MemorySpec.inner='dgd' with momentum=True is not defined (the paper gives DGD without "
                "momentum; where the x^T x decay would act on the momentum is open); use one or the other"
            )

    @property
    def exact_online(self) -> bool:
        """Whether gradients depend on earlier writes of the same block (online delta rule)."""
        return self.online and self.objective == "l2"


class MemoryState(flax.struct.PyTreeNode):
    """A memory's state: its weights, their momentum, and where a mini-batch block stands.

    ``weights`` is ``(W,)`` for a linear memory and ``(W1, W2)`` for an MLP memory; ``momentum`` has the
    same structure (zeros at a reset) or is ``None``. A memory whose gradient is taken at the start of a
    block of ``chunk`` tokens (``online=False``) also carries the weights that opened the current block,
    ``base``, and how many tokens of that block it has read, ``pos`` (int32, ``0 <= pos < chunk``), so a
    sequence fed in pieces of any length, or token by token, runs the same algorithm as fed whole.
    ``pos=None`` (``MemoryState(weights, momentum)``) means "at a block boundary": the next token opens
    a block at ``weights``; the chunkwise path then needs no realignment (the fast path of a reset).

    choice: ``pos`` is a traced array, not a static field, so a state can be the carry of a
    ``lax.scan`` over tokens (recurrent inference) and is vmapped like the weights; the cost is that a
    chunkwise call from a state with ``pos`` set computes one chunk more (the realignment below).
    """

    weights: tuple[Array, ...]
    momentum: tuple[Array, ...] | None = None
    base: tuple[Array, ...] | None = None
    pos: Array | None = None


def initial_state(spec: MemorySpec, weights: tuple[Array, ...]) -> MemoryState:
    """The state at a reset: the given (meta-learned) weights, zero momentum, at the start of a block.

    For ``online=False`` the block fields are filled (``base`` = the weights, ``pos`` = 0, with the
    weights' leading axes), so every state a call returns has the structure of this one (a ``lax.scan``
    carry can start here). A whole sequence from a reset runs a little faster from
    ``MemoryState(weights, momentum)``, which the chunkwise path knows at trace time to be at a boundary;
    the layers' ``apply`` without a state does that.
    """
    weights = tuple(weights)
    momentum = tuple(jnp.zeros_like(w) for w in weights) if spec.momentum else None
    if spec.online:
        return MemoryState(weights, momentum)
    return MemoryState(weights, momentum, weights, jnp.zeros(weights[0].shape[:-2], jnp.int32))


def _block_state(spec: MemorySpec, weights, momentum, base, pos) -> MemoryState:
    """The state a call returns: the block fields only for mini-batch (``online=False``) memories.

    At a boundary (``pos == 0``) the next block opens at the current weights, so ``base`` is set to them:
    one state, however the sequence was cut.
    """
    if spec.online:
        return MemoryState(weights, momentum)
    pos = jnp.asarray(pos, jnp.int32) % spec.chunk
    base = tuple(jnp.where(pos[..., None, None] == 0, w, b) for w, b in zip(weights, base, strict=True))
    return MemoryState(weights, momentum, base, pos)


# -- the memory as a function ----------------------------------------------------------------------------


def _silu_grad(z: Array) -> Array:
    s = jax.nn.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def memory_apply(spec: MemorySpec, weights: tuple[Array, ...], x: Float[Array, "n d"]) -> Float[Array, "n e"]:
    """The memory's read-out ``f_M(x)`` for rows ``x``."""
    if spec.memory == "linear":
        return x @ weights[0]
    w1, w2 = weights
    return x + jax.nn.silu(x @ w1) @ w2


def inner_loss(spec: MemorySpec, weights: tuple[Array, ...], k: Array, v: Array) -> Array:
    """The inner objective summed over rows: ``l2`` = ½‖f(k) − v‖², ``dot`` = −⟨f(k), v⟩."""
    out = memory_apply(spec, weights, k)
    if spec.objective == "l2":
        return 0.5 * jnp.sum((out - v) ** 2)
    return -jnp.sum(out * v)


def _signals(
    spec: MemorySpec, weights: tuple[Array, ...], k: Array, v: Array
) -> tuple[tuple[Array, Array], ...]:
    """Per-row ``(x_l, delta_l)`` of every layer: the gradient of row j's loss at layer l is ``x_lj^T delta_lj``."""
    out = memory_apply(spec, weights, k)
    r = out - v if spec.objective == "l2" else -v
    if spec.memory == "linear":
        return ((k, r),)
    w1, w2 = weights
    z = k @ w1
    return ((k, (r @ w2.T) * _silu_grad(z)), (jax.nn.silu(z), r))


def layer_inputs(spec: MemorySpec, weights: tuple[Array, ...], k: Array) -> tuple[Array, ...]:
    r"""Each layer's input for rows ``k``: ``(k,)`` for a matrix, ``(k, silu(k W1))`` for an MLP memory.

    These are the :math:`x` of DGD's :math:`(\alpha I - \eta\,x^\top x)` for each layer.
    """
    if spec.memory == "linear":
        return (k,)
    return (k, jax.nn.silu(k @ weights[0]))


# -- per-token path --------------------------------------------------------------------------------------


def memory_scan(
    spec: MemorySpec,
    state: MemoryState,
    q: Float[Array, "T dk"],
    k: Float[Array, "T dk"],
    v: Float[Array, "T dv"],
    lr: Float[Array, " T"],
    retention: Float[Array, " T"],
    beta: Float[Array, " T"] | None = None,
) -> tuple[Float[Array, "T dv"], MemoryState, dict[str, Array]]:
    """Run the memory token by token (the reference path; also recurrent inference).

    Args:
      spec: the memory and its learning rule.
      state: the state before the first token (:func:`initial_state` for a reset).
      q, k, v: queries, keys and values of one sequence (one head).
      lr: the inner learning rate of each token.
      retention: the retention gate of each token, in ``(0, 1]``.
      beta: the momentum rate of each token (required iff ``spec.momentum``).

    Returns:
      ``(outputs, final_state, aux)``: ``outputs[t] = f_{M_t}(q_t)`` read after token t's write, the state
      after the last token, and ``aux["surprise"]``, the norm of each token's inner gradient.
    """
    _check_inputs(spec, q, k, v, lr, retention, beta)
    beta = jnp.zeros_like(lr) if beta is None else beta

    def step(carry, inputs):
        weights, momentum, base, pos = carry
        qt, kt, vt, lrt, at, bt = inputs
        base = block_base(spec, weights, base, pos)
        weights, momentum, surprise = token_write(spec, weights, momentum, base, kt, vt, lrt, at, bt)
        out = memory_apply(spec, weights, qt[None])[0]
        return (weights, momentum, base, (pos + 1) % spec.chunk), (out, surprise)

    base = state.weights if state.base is None else state.base
    pos = jnp.zeros((), jnp.int32) if state.pos is None else state.pos
    carry = (state.weights, state.momentum, base, pos)
    (weights, momentum, base, pos), (out, surprise) = jax.lax.scan(
        step, carry, (q, k, v, lr, retention, beta)
    )
    return out, _block_state(spec, weights, momentum, base, pos), {"surprise": surprise}


def block_base(spec: MemorySpec, weights: tuple[Array, ...], base: tuple[Array, ...], pos: Array):
    """Where token ``pos`` takes its gradient: the current weights (online) or those that opened its block."""
    if spec.online:
        return weights
    fresh = pos % spec.chunk == 0
    return tuple(jnp.where(fresh, w, b) for w, b in zip(weights, base))


def token_write(spec: MemorySpec, weights, momentum, base, k: Array, v: Array, lr, retention, beta):
    """One token's write: the gradient of the inner loss at ``base`` (by ``jax.grad``), then the update.

    With ``spec.inner == "dgd"`` each layer also decays along its own input ``x`` at ``base``:
    ``W <- retention * W - lr * x^T (x W) - lr * grad``.

    Returns ``(weights, momentum, surprise)``, the surprise being the gradient's norm.
    """
    g = jax.grad(lambda w: inner_loss(spec, w, k[None], v[None]))(base)
    if spec.stop_write_grad:
        g = jax.lax.stop_gradient(g)
    surprise = jnp.sqrt(sum(jnp.sum(gi**2) for gi in g))
    if spec.inner == "dgd":
        xs = layer_inputs(spec, base, k[None])
        if spec.stop_write_grad:
            xs = jax.lax.stop_gradient(xs)
        new = tuple(retention * w - lr * (x.T @ (x @ w)) - lr * gi for w, x, gi in zip(weights, xs, g))
        return new, momentum, surprise
    if spec.momentum:
        momentum = tuple(beta * s - lr * gi for s, gi in zip(momentum, g))
        return tuple(retention * w + s for w, s in zip(weights, momentum)), momentum, surprise
    return tuple(retention * w - lr * gi for w, gi in zip(weights, g)), momentum, surprise


# -- chunkwise path --------------------------------------------------------------------------------------


def _decay_matrix(log_gate: Array) -> Array:
    """``E[..., i, j] = prod_{l=j+1..i} gate_l`` for ``j <= i``, else 0, from the cumulative log gate."""
    c = jnp.cumsum(log_gate, axis=-1)
    n = c.shape[-1]
    lower = jnp.tril(jnp.ones((n, n), bool))
    return jnp.exp(jnp.where(lower, c[..., :, None] - c[..., None, :], -jnp.inf))


def _coefficients(log_a: Array, log_b: Array | None, active: Array | None = None):
    """``(a, s, c, sb, eb)``: the chunk recurrence unrolled (see the module docstring); any leading axes.

    ``a[i]`` multiplies M_0, ``s[i]`` multiplies S_0 and ``c[i, j]`` the update u_j in M_i; ``sb[i]`` and
    ``eb[i, j]`` are the same for the momentum S_i. ``active`` (0 or 1 per token, momentum only) marks
    the real tokens of a realigned chunk: an inactive token has lr 0, retention 1 and momentum rate 1 and
    does not add its momentum, :math:`M_t = \alpha_t M_{t-1} + m_t S_t`, so it leaves M and S unchanged.
    """
    ea = _decay_matrix(log_a)
    a = jnp.exp(jnp.cumsum(log_a, axis=-1))
    if log_b is None:
        return a, None, ea, None, None
    eb = _decay_matrix(log_b)
    sb = jnp.exp(jnp.cumsum(log_b, axis=-1))
    if active is not None:
        ea = ea * active[..., None, :]
    return a, (ea @ sb[..., None])[..., 0], ea @ eb, sb, eb


def _shift_down(x: Array, first: float) -> Array:
    """Along axis -2 for matrices (-1 for vectors): row i of the result is row i-1 of ``x``; row 0 is ``first``."""
    axis = x.ndim - 2 if x.ndim >= 2 else 0
    head = jnp.full_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis), first)
    return jnp.concatenate([head, jax.lax.slice_in_dim(x, 0, x.shape[axis] - 1, axis=axis)], axis=axis)


def unit_lower_inverse(m: Float[Array, "... n n"]) -> Float[Array, "... n n"]:
    r"""The inverse of unit lower-triangular matrices by recursive doubling, in matrix products only.

    For :math:`L = \begin{pmatrix} A & 0 \\ C & D \end{pmatrix}`,
    :math:`L^{-1} = \begin{pmatrix} A^{-1} & 0 \\ -D^{-1} C A^{-1} & D^{-1} \end{pmatrix}`: the diagonal
    blocks of size 1, 2, 4, ... are inverted level by level, all blocks of a level in one batched product.
    It is the classic recursive triangular inversion (as stable as forward substitution). It replaces
    ``jax.scipy.linalg.solve_triangular``, which XLA runs about 80x slower on CPU for batches of small
    matrices (measured: 64 systems of 64 x 64, 684 ms against 8 ms).
    """
    n = m.shape[-1]
    size = 1 << (n - 1).bit_length()
    batch = m.shape[:-2]
    if size != n:  # pad to a power of two with an identity block
        eye = jnp.eye(size, dtype=m.dtype)
        m = jnp.broadcast_to(eye, (*batch, size, size)).at[..., :n, :n].set(m)
    blocks = jnp.ones((*batch, size, 1, 1), m.dtype)  # the inverse's diagonal blocks, size s
    s = 1
    while s < size:
        nb = size // (2 * s)
        grid = m.reshape(*batch, nb, 2, s, nb, 2, s)
        sub = jnp.moveaxis(jnp.diagonal(grid[..., :, 1, :, :, 0, :], axis1=-4, axis2=-2), -1, -3)
        pairs = blocks.reshape(*batch, nb, 2, s, s)
        a_inv, d_inv = pairs[..., 0, :, :], pairs[..., 1, :, :]
        lower = -(d_inv @ sub @ a_inv)
        top = jnp.concatenate([a_inv, jnp.zeros_like(a_inv)], axis=-1)
        blocks = jnp.concatenate([top, jnp.concatenate([lower, d_inv], axis=-1)], axis=-2)
        s *= 2
    return blocks[..., 0, :n, :n]


def _prepare(spec: MemorySpec, k: Array, lr: Array, log_a: Array, log_b: Array, active: Array | None = None):
    """What a chunk needs that does not depend on the state: coefficients and, for the online delta rule,
    the inverse of the chunk's triangular system. Any leading axes (all chunks at once)."""
    coeffs = _coefficients(log_a, log_b if spec.momentum else None, active if spec.momentum else None)
    if not spec.exact_online:
        return coeffs, None
    c = coeffs[2]
    kk = k @ jnp.swapaxes(k, -1, -2)
    coupling = _shift_down(c, 0.0) * lr[..., None, :] * kk  # strictly lower triangular
    eye = jnp.eye(k.shape[-2], dtype=k.dtype)
    return coeffs, unit_lower_inverse(jnp.broadcast_to(eye, coupling.shape) + coupling)


def _dgd_residual(x: Array, delta: Array, w0: Array, a: Array, c: Array, lr: Array) -> Array:
    r"""One layer's DGD writes in a chunk, as an online delta rule with key ``x`` and value ``-delta``.

    :math:`W_i = \alpha_i W_{i-1} - \eta_i x_i^\top d_i` with :math:`d_i = x_i W_{i-1} + \delta_i`
    (:math:`\delta_i` the gradient signal at the block start). Unrolled, :math:`x_i W_{i-1} = a_{i-1} x_i
    W_0 - \sum_{j<i} c_{i-1,j}\eta_j (x_i\cdot x_j) d_j`, so :math:`(I + L) d = \mathrm{diag}(a_{i-1}) X W_0
    + \Delta` with :math:`L` strictly lower triangular: one :func:`unit_lower_inverse`. The dual form then
    reads :math:`W_i = a_i W_0 - \sum_j c_{ij}\eta_j x_j^\top d_j` with ``(x, d)`` as its signals.
    """
    coupling = _shift_down(c, 0.0) * lr[None, :] * (x @ x.T)
    eye = jnp.eye(x.shape[0], dtype=x.dtype)
    return unit_lower_inverse(eye + coupling) @ (_shift_down(a, 1.0)[:, None] * (x @ w0) + delta)


def _chunk(
    spec: MemorySpec, state: MemoryState, chunk_inputs, last: Array, prepared=None, *, base=None, active=None
):
    """One chunk: outputs of every token, the state after token ``last``, and each token's surprise.

    ``base``: the weights where mini-batch gradients are taken (default the chunk's starting weights; a
    block resumed in the middle differs). ``active``: 0/1 per token for a realigned chunk with momentum
    (see :func:`_coefficients`). The returned state has no block fields (the caller sets them).
    """
    q, k, v, lr, log_a, log_b = chunk_inputs
    (a, s, c, sb, eb), inverse = _prepare(spec, k, lr, log_a, log_b, active) if prepared is None else prepared
    w0, s0 = state.weights, state.momentum
    base = w0 if base is None else base

    if spec.exact_online:  # delta rule, linear memory: residuals depend on this chunk's earlier writes
        (w,) = w0
        rhs = _shift_down(a, 1.0)[:, None] * (k @ w) - v
        if spec.momentum:
            rhs = rhs + _shift_down(s, 0.0)[:, None] * (k @ s0[0])
        signals = ((k, inverse @ rhs),)
    else:
        signals = _signals(spec, base, k, v)
    if spec.stop_write_grad:
        signals = jax.lax.stop_gradient(signals)
    surprise = jnp.sqrt(sum(jnp.sum(x**2, 1) * jnp.sum(d**2, 1) for x, d in signals))
    if spec.inner == "dgd":
        signals = tuple((x, _dgd_residual(x, d, w, a, c, lr)) for (x, d), w in zip(signals, w0, strict=True))

    coef = c * lr[None, :]  # the weight of write j (its -lr_j grad) in the state after token i

    def read(layer: int, y: Array) -> Array:  # y M_i for every row i of y (the dual form)
        x, d = signals[layer]
        out = a[:, None] * (y @ w0[layer]) - (coef * (y @ x.T)) @ d
        if spec.momentum:
            out = out + s[:, None] * (y @ s0[layer])
        return out

    if spec.memory == "linear":
        out = read(0, q)
    else:
        out = q + read(1, jax.nn.silu(read(0, q)))

    weights = tuple(
        a[last] * w - x.T @ (coef[last][:, None] * d) for w, (x, d) in zip(w0, signals, strict=True)
    )
    momentum = None
    if spec.momentum:
        weights = tuple(w + s[last] * m for w, m in zip(weights, s0))
        momentum = tuple(
            sb[last] * m - x.T @ ((eb[last] * lr)[:, None] * d) for m, (x, d) in zip(s0, signals, strict=True)
        )
    return out, MemoryState(weights, momentum), surprise


def memory_chunked(
    spec: MemorySpec,
    state: MemoryState,
    q: Float[Array, "T dk"],
    k: Float[Array, "T dk"],
    v: Float[Array, "T dv"],
    lr: Float[Array, " T"],
    retention: Float[Array, " T"],
    beta: Float[Array, " T"] | None = None,
) -> tuple[Float[Array, "T dv"], MemoryState, dict[str, Array]]:
    """Run the memory chunk by chunk, each chunk in parallel; same arguments and results as :func:`memory_scan`.

    The sequence is cut into chunks of ``min(spec.chunk, T)`` tokens; a partial last chunk is padded and
    its state read after its last real token, so padding never touches the state.

    Example:
      >>> spec = MemorySpec("linear", "l2", chunk=4)
      >>> state = initial_state(spec, (jnp.zeros((3, 2)),))
      >>> q = k = jnp.eye(3)[jnp.array([0, 1, 2, 0, 1])]; v = jnp.ones((5, 2)); g = jnp.ones(5)
      >>> out, state, aux = memory_chunked(spec, state, q, k, v, 0.5 * g, g)
      >>> out.shape, aux["surprise"].shape
      ((5, 2), (5,))
    """
    _check_inputs(spec, q, k, v, lr, retention, beta)
    n = q.shape[0]
    lay = _Layout.of(spec, n, state.pos)
    log_a = jnp.log(jnp.maximum(retention, _TINY))
    log_b = jnp.log(jnp.maximum(beta, _TINY)) if beta is not None else jnp.zeros_like(lr)
    chunk_inputs = tuple(lay.place(x) for x in (q, k, v, lr, log_a, log_b))
    active = lay.active() if spec.momentum else None
    prepared = _prepare(spec, chunk_inputs[1], chunk_inputs[3], chunk_inputs[4], chunk_inputs[5], active)
    plain = MemoryState(state.weights, state.momentum)
    parallel = spec.memory == "linear" and not spec.momentum and not spec.stop_write_grad

    if lay.pos is None:  # from a block boundary (or online): the chunk's gradients at its own start
        partial = not spec.online and lay.n % spec.chunk != 0  # the last block stays open: keep its start

        def body(st, inputs):
            *chunk_in, lst, prep = inputs
            out, new, surprise = _chunk(spec, st, chunk_in, lst, prep)
            return new, (out, surprise, st.weights if partial else None)

        if parallel and spec.inner == "gd":
            out, new, surprise, start = _linear_parallel(spec, plain, chunk_inputs[:4], lay.last, prepared)
        else:
            new, (out, surprise, starts) = jax.lax.scan(body, plain, (*chunk_inputs, lay.last, prepared))
            start = tuple(w[-1] for w in starts) if partial else new.weights
        state = _block_state(spec, new.weights, new.momentum, start, lay.pos_after)
        return lay.take(out), state, {"surprise": lay.take(surprise)}

    # inside a block: the first chunk's gradients at the open block's start (realigned chunks)
    def mini_body(carry, inputs):
        st, base, kept = carry
        *chunk_in, lst, prep, act, index = inputs
        out, st, surprise = _chunk(spec, st, chunk_in, lst, prep, base=base, active=act)
        kept = jax.tree.map(lambda b, o: jnp.where(index <= lay.last_chunk, b, o), base, kept)
        return (st, st.weights, kept), (out, surprise)

    first = lay.first_base(state)
    xs = (*chunk_inputs, lay.last, prepared, active, jnp.arange(lay.chunks))
    (new, _, kept), (out, surprise) = jax.lax.scan(mini_body, (plain, first, first), xs)
    state = _block_state(spec, new.weights, new.momentum, kept, lay.pos_after)
    return lay.take(out), state, {"surprise": lay.take(surprise)}


class _Layout:
    """How a call's ``n`` tokens sit in chunks of the mini-batch blocks.

    At a block boundary (``pos is None``) the tokens are cut into chunks of ``min(chunk, n)`` from the
    first (a partial last chunk padded and its state read at its last real token), as before. From a
    state inside a block (``pos`` traced), chunks of ``chunk`` are aligned with the blocks: the tokens
    are placed at offset ``pos`` of ``ceil((n + chunk - 1) / chunk)`` chunks with
    ``dynamic_update_slice``, and the slots before and after them are inactive tokens (lr 0, retention 1,
    momentum rate 1) that leave the state unchanged, so the state after the last chunk is the state after
    the last real token.
    """

    def __init__(self, spec: MemorySpec, n: int, pos: Array | None) -> None:
        self.n, self.pos = n, pos
        if pos is None:
            self.size = min(spec.chunk, n)
            self.chunks = math.ceil(n / self.size)
            self.last = jnp.full((self.chunks,), self.size - 1, jnp.int32).at[-1].set((n - 1) % self.size)
            self.last_chunk = self.chunks - 1
            self.pos_after = n % spec.chunk
        else:
            self.size = spec.chunk
            self.chunks = math.ceil((n + self.size - 1) / self.size)
            self.last = jnp.full((self.chunks,), self.size - 1, jnp.int32)
            self.last_chunk = (pos + n - 1) // self.size
            self.pos_after = (pos + n) % self.size

    @classmethod
    def of(cls, spec: MemorySpec, n: int, pos: Array | None) -> _Layout:
        return cls(spec, n, None if spec.online else pos)

    def place(self, x: Array) -> Array:
        """``[n, ...] -> [chunks, size, ...]``, zeros in the padding / inactive slots."""
        total = self.chunks * self.size
        if self.pos is None:
            x = jnp.pad(x, [(0, total - self.n)] + [(0, 0)] * (x.ndim - 1))
        else:
            zeros = jnp.zeros((total, *x.shape[1:]), x.dtype)
            x = jax.lax.dynamic_update_slice(zeros, x, (self.pos,) + (0,) * (x.ndim - 1))
        return x.reshape(self.chunks, self.size, *x.shape[1:])

    def active(self) -> Array:
        """1 for the real tokens, 0 for the padding, ``[chunks, size]``."""
        return self.place(jnp.ones((self.n,)))

    def take(self, y: Array) -> Array:
        """``[chunks, size, ...] -> [n, ...]``: the rows of the real tokens."""
        y = y.reshape(self.chunks * self.size, *y.shape[2:])
        if self.pos is None:
            return y[: self.n]
        return jax.lax.dynamic_slice_in_dim(y, self.pos, self.n)

    def first_base(self, state: MemoryState) -> tuple[Array, ...]:
        """Where the first chunk's gradients are taken: the open block's base, or the weights at a boundary."""
        if self.pos is None or state.base is None:
            return state.weights
        return tuple(jnp.where(self.pos == 0, w, b) for w, b in zip(state.weights, state.base))


def _linear_parallel(spec: MemorySpec, state: MemoryState, chunk_inputs, last: Array, prepared):
    r"""Every chunk of a linear memory (no momentum) at once; only a ``d_k x d_k`` recurrence is sequential.

    Within a chunk the residuals are affine in the chunk's starting state,
    :math:`R = \tilde K M_0 - \tilde V` (dot: :math:`\tilde K = 0, \tilde V = V`; mini-batch:
    :math:`\tilde K = K, \tilde V = V`; online delta rule: :math:`\tilde K = T\,\mathrm{diag}(a_{i-1}) K`,
    :math:`\tilde V = T V` with :math:`T` the inverted triangular system), so the state after the chunk is
    :math:`M_{\text{end}} = A M_0 + B` with :math:`A = a_{\text{last}} I - K^\top \mathrm{diag}(c_{\text{last}})
    \tilde K` and :math:`B = K^\top \mathrm{diag}(c_{\text{last}}) \tilde V`. ``A`` and ``B`` of all chunks
    are batched products; a scan over chunks chains them; the outputs of all chunks are batched products
    again. This is the chunkwise-parallel form of linear attention and DeltaNet (the UT / WY
    representation of Yang et al. 2024); the per-chunk loop of :func:`_chunk` gives the same numbers.
    """
    q, k, v, lr = chunk_inputs
    (a, _, c, _, _), inverse = prepared
    coef = c * lr[:, None, :]  # [n, C, C]
    rows = jnp.arange(a.shape[0])
    coef_last, a_last = coef[rows, last], a[rows, last]  # [n, C], [n]
    if spec.objective == "dot":
        k_tilde, v_tilde = None, v
    elif spec.exact_online:
        k_tilde, v_tilde = inverse @ (_shift_down(a.T, 1.0).T[..., None] * k), inverse @ v
    else:
        k_tilde, v_tilde = k, v
    weighted = k * coef_last[..., None]  # diag(c_last) K
    b = jnp.swapaxes(weighted, 1, 2) @ v_tilde  # K^T diag(c_last) V~
    eye = jnp.eye(k.shape[-1], dtype=k.dtype)
    if k_tilde is None:
        step = lambda w, ab: (ab[0][..., None, None] * w + ab[1], w)  # noqa: E731
        xs = (a_last, b)
    else:
        a_mat = a_last[:, None, None] * eye[None] - jnp.swapaxes(weighted, 1, 2) @ k_tilde
        step = lambda w, ab: (ab[0] @ w + ab[1], w)  # noqa: E731
        xs = (a_mat, b)
    (w_end,) = state.weights
    w_end, w_start = jax.lax.scan(step, w_end, xs)  # w_start[i]: the state that opens chunk i
    r = -v_tilde if k_tilde is None else k_tilde @ w_start - v_tilde
    out = a[..., None] * (q @ w_start) - (coef * (q @ jnp.swapaxes(k, 1, 2))) @ r
    surprise = jnp.sqrt(jnp.sum(k**2, -1) * jnp.sum(r**2, -1))
    return out, MemoryState((w_end,), None), surprise, (w_start[-1],)


def _check_inputs(spec, q, k, v, lr, retention, beta) -> None:
    n = q.shape[0]
    for name, x, nd in (("q", q, 2), ("k", k, 2), ("v", v, 2), ("lr", lr, 1), ("retention", retention, 1)):
        if x.ndim != nd or x.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n}{', d' if nd == 2 else ''}), got {x.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {q.shape}, got {k.shape}")
    if spec.momentum and (beta is None or beta.shape != (n,)):
        raise ValueError(
            f"beta must have shape ({n},) for a memory with momentum, got {getattr(beta, 'shape', None)}"
        )
    if not spec.momentum and beta is not None:
        raise ValueError("beta was given but the MemorySpec has momentum=False")
    if n == 0:
        raise ValueError("the sequence is empty (q has 0 rows)")


# -- the memory as a sequence layer (Flax NNX) -----------------------------------------------------------


def _l2_normalize(x: Array) -> Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def _first_nonfinite(x: Float[Array, "batch T ..."]) -> Array:
    """Per batch row, the first token whose entries are not all finite, or -1."""
    bad = ~jnp.all(jnp.isfinite(x.reshape(*x.shape[:2], -1)), axis=-1)
    return jnp.where(jnp.any(bad, axis=1), jnp.argmax(bad, axis=1), -1).astype(jnp.int32)


def run_memory(spec: MemorySpec, path: str, state: MemoryState, q, k, v, lr, retention, beta=None):
    """:func:`memory_chunked` (``path="chunk"``) or :func:`memory_scan` (``"token"``) over batch and heads.

    Inputs are ``[batch, T, heads, d]`` (gates ``[batch, T, heads]``); the state's leaves lead with
    ``[batch, heads]``. Returns outputs ``[batch, T, heads, d_value]``, the state, and the surprise
    ``[batch, T, heads]``.
    """
    if path not in ("chunk", "token"):
        raise ValueError(f"path must be 'chunk' or 'token', got {path!r}")
    fn = memory_chunked if path == "chunk" else memory_scan

    def one(st, *xs):
        if beta is None:
            xs = (*xs, None)
        out, st, aux = fn(spec, st, *xs)
        return out, st, aux["surprise"]

    # [batch, T, heads, ...] -> [batch, heads, T, ...]: one sequence per (batch row, head)
    per_head = [jnp.swapaxes(x, 1, 2) for x in (q, k, v, lr, retention)]
    if beta is not None:
        per_head.append(jnp.swapaxes(beta, 1, 2))
    out, state, surprise = jax.vmap(jax.vmap(one))(state, *per_head)
    return jnp.swapaxes(out, 1, 2), state, jnp.swapaxes(surprise, 1, 2)


class ShortConv(nnx.Module):
    r"""A depthwise causal convolution over time, :math:`y_t = \mathrm{silu}(\sum_{j<K} w_j \odot x_{t-j})`.

    The short convolution that DeltaNet, Mamba and Titans put on their queries, keys and values: it lets a
    position see the few tokens before it, which a memory without positional encoding cannot otherwise
    do (MQAR needs the key next to each value). Its state is the last ``K - 1`` inputs, carried across
    calls like the memory.

    Args:
      width: channels.
      kernel: taps ``K`` (>= 1).
      rngs: random streams (weights uniform in ±1/sqrt(K), PyTorch's default for a depthwise conv).
    """

    def __init__(self, width: int, kernel: int, *, rngs: nnx.Rngs) -> None:
        if kernel < 1:
            raise ValueError(f"conv kernel must be >= 1, got {kernel}")
        bound = 1.0 / math.sqrt(kernel)
        self.weight = nnx.Param(
            jax.random.uniform(rngs.params(), (kernel, width), minval=-bound, maxval=bound)
        )
        self.kernel, self.width = kernel, width

    def init_tail(self, batch: int) -> Array:
        """The state at a reset: ``K - 1`` zero inputs."""
        return jnp.zeros((batch, self.kernel - 1, self.width))

    def __call__(self, x: Float[Array, "batch T c"], tail: Array) -> tuple[Float[Array, "batch T c"], Array]:
        t = x.shape[1]
        xp = jnp.concatenate([tail, x], axis=1)
        w = self.weight[...]
        out = sum(xp[:, j : j + t] * w[None, None, self.kernel - 1 - j] for j in range(self.kernel))
        return jax.nn.silu(out), xp[:, xp.shape[1] - (self.kernel - 1) :]


class LayerState(flax.struct.PyTreeNode):
    """A memory layer's state: its memory (or memories) and the short convolution's last inputs."""

    memory: object
    tail: Array | None = None


class AssociativeMemory(nnx.Module):
    r"""A causal sequence layer whose state is an associative memory learning in context (multi-head).

    Per head, :math:`q_t, k_t, v_t` are linear projections of :math:`x_t` (``q``, ``k`` L2-normalised when
    ``normalize``); the learning rate :math:`\eta_t = \mathrm{lr}\,\sigma(w_\eta x_t + b_\eta)` (or the
    constant ``lr``), the retention gate :math:`\alpha_t = \sigma(w_\alpha x_t + b_\alpha)` (or 1) and
    the momentum rate :math:`\beta_t = \sigma(w_\beta x_t + b_\beta)` come from the input. The memory
    learns as :class:`MemorySpec` says; the heads' reads are RMS-normalised and projected back to
    ``d_model``. The initial memory (``w_init``, ``w2_init``) is a parameter: the outer loop meta-learns it, and
    :meth:`init_state` resets to it.

    Args:
      d_model: input and output features.
      heads: memory heads; ``d_head`` (default ``d_model // heads``) features per head.
      memory, objective, momentum, online, chunk, stop_write_grad, inner: the :class:`MemorySpec`
        (``inner="dgd"``: Delta Gradient Descent, for ``online=False`` memories without momentum).
      hidden: hidden units of an ``"mlp"`` memory (default ``2 * d_head``).
      lr: the inner learning rate (its maximum when ``lr_from_input``).
      lr_from_input: make the rate a per-token gate of the input; else constant ``lr``.
      gate: a per-token retention gate from the input (initialised near 1); else no forgetting.
      decay: where the retention acts in a delta-rule write. ``"titans"``: on the state, beside the
        gradient step taken at the undecayed state, :math:`M_t = \alpha_t M_{t-1} - \eta_t
        \nabla\ell_t(M_{t-1})` (Titans, Nested Learning). ``"gated_deltanet"``: decay first, then the delta
        rule at the decayed state, :math:`M_t = \alpha_t M_{t-1} - \eta_t k_t^\top(\alpha_t k_t M_{t-1} -
        v_t)`, i.e. :math:`S_t = \alpha_t(I - \eta_t k_t k_t^\top) S_{t-1} + \eta_t k_t v_t^\top` (Yang et
        al. 2024, Gated DeltaNet). The two differ by :math:`\eta_t(1 - \alpha_t) k_t^\top k_t M_{t-1}`.
        The Gated DeltaNet write is the Titans write with rate :math:`\alpha_t\eta_t` and target
        :math:`v_t / \alpha_t`, which is how it runs on the same primitive (both paths); choice: the
        retention is clipped at ``1e-6`` in this form, so the target never divides by ~0 (a retention of
        ``1e-6`` already erases the memory). Needs a matrix memory, the ``"l2"`` objective, per-token
        gradients and no momentum; its ``surprise`` is the gradient's norm at the decayed state.
      normalize: L2-normalise queries and keys (keeps the delta rule stable for ``lr <= 1``).
      conv: taps of the :class:`ShortConv` on queries, keys and values (0: none).
      path: ``"chunk"`` (chunkwise parallel) or ``"token"`` (per-token scan); the results agree.
      rngs: random streams for the parameters.

    Example:
      >>> mem = AssociativeMemory(16, heads=2, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((3, 10, 16))
      >>> y, state, aux = mem.apply(x, mem.init_state(3))
      >>> y.shape, state.memory.weights[0].shape
      ((3, 10, 16), (3, 2, 8, 8))
    """

    def __init__(
        self,
        d_model: int,
        *,
        heads: int = 2,
        d_head: int | None = None,
        memory: Literal["linear", "mlp"] = "linear",
        hidden: int | None = None,
        objective: Literal["l2", "dot"] = "l2",
        momentum: bool = False,
        online: bool = True,
        chunk: int = 64,
        stop_write_grad: bool = False,
        inner: Literal["gd", "dgd"] = "gd",
        lr: float = 1.0,
        lr_from_input: bool = True,
        gate: bool = True,
        decay: Literal["titans", "gated_deltanet"] = "titans",
        normalize: bool = True,
        conv: int = 4,
        path: str = "chunk",
        rngs: nnx.Rngs,
    ) -> None:
        d_head = d_model // heads if d_head is None else d_head
        if heads < 1 or d_head < 1:
            raise ValueError(f"heads ({heads}) and d_head ({d_head}) must be >= 1")
        if path not in ("chunk", "token"):
            raise ValueError(f"path must be 'chunk' or 'token', got {path!r}")
        if decay not in ("titans", "gated_deltanet"):
            raise ValueError(f"decay must be 'titans' or 'gated_deltanet', got {decay!r}")
        plain_delta = memory == "linear" and objective == "l2" and not momentum and online
        if decay == "gated_deltanet" and not plain_delta:
            raise ValueError(
                "decay='gated_deltanet' needs memory='linear', objective='l2', momentum=False, online=True, "
                f"got {memory!r}, {objective!r}, {momentum!r}, {online!r}"
            )
        self.spec = MemorySpec(memory, objective, momentum, online, chunk, stop_write_grad, inner)
        self.decay = decay
        self.heads, self.d_head, self.path = heads, d_head, path
        self.lr, self.lr_from_input, self.gate, self.normalize = lr, lr_from_input, gate, normalize
        width = heads * d_head
        self.q = nnx.Linear(d_model, width, use_bias=False, rngs=rngs)
        self.k = nnx.Linear(d_model, width, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(d_model, width, use_bias=False, rngs=rngs)
        self.o = nnx.Linear(width, d_model, use_bias=False, rngs=rngs)
        self.norm = nnx.RMSNorm(d_head, rngs=rngs)
        self.conv = ShortConv(3 * width, conv, rngs=rngs) if conv else None
        small = nnx.initializers.normal(0.02)
        if lr_from_input:
            self.lr_proj = nnx.Linear(d_model, heads, kernel_init=small, rngs=rngs)
        if gate:  # bias 6: retention sigma(6) ~ 0.9975 at the start, so early training does not forget
            self.gate_proj = nnx.Linear(
                d_model, heads, kernel_init=small, bias_init=nnx.initializers.constant(6.0), rngs=rngs
            )
        if momentum:
            self.momentum_proj = nnx.Linear(d_model, heads, kernel_init=small, rngs=rngs)
        if memory == "linear":
            self.w_init = nnx.Param(jnp.zeros((heads, d_head, d_head)))
        else:
            hidden = 2 * d_head if hidden is None else hidden
            k1, k2 = jax.random.split(rngs.params())
            self.w_init = nnx.Param(jax.random.normal(k1, (heads, d_head, hidden)) / math.sqrt(d_head))
            self.w2_init = nnx.Param(0.02 * jax.random.normal(k2, (heads, hidden, d_head)))

    def _init_weights(self) -> tuple[Array, ...]:
        if self.spec.memory == "linear":
            return (self.w_init[...],)
        return (self.w_init[...], self.w2_init[...])

    def init_state(self, batch: int) -> LayerState:
        """The memory reset to its (meta-learned) initial state, for ``batch`` sequences.

        Its structure is that of every state :meth:`apply` returns (a ``lax.scan`` carry can start here).
        """
        weights = tuple(jnp.broadcast_to(w, (batch, *w.shape)) for w in self._init_weights())
        tail = self.conv.init_tail(batch) if self.conv is not None else None
        return LayerState(initial_state(self.spec, weights), tail)

    def _reset(self, batch: int) -> LayerState:
        """:meth:`init_state` without the block fields: known at trace time to sit at a block boundary,
        so the chunkwise path needs no realignment (what :meth:`apply` without a state uses)."""
        state = self.init_state(batch)
        return LayerState(MemoryState(state.memory.weights, state.memory.momentum), state.tail)

    def gates(self, x: Float[Array, "batch T d"]) -> tuple[Array, Array, Array | None]:
        """Per-token learning rate, retention and momentum rate, each ``[batch, T, heads]``."""
        shape = (*x.shape[:2], self.heads)
        lr = self.lr * jax.nn.sigmoid(self.lr_proj(x)) if self.lr_from_input else jnp.full(shape, self.lr)
        retention = jax.nn.sigmoid(self.gate_proj(x)) if self.gate else jnp.ones(shape)
        beta = jax.nn.sigmoid(self.momentum_proj(x)) if self.spec.momentum else None
        return lr, retention, beta

    def apply(
        self, x: Float[Array, "batch T d"], state: LayerState | None = None
    ) -> tuple[Float[Array, "batch T d"], LayerState, dict[str, Array]]:
        """Read and write a sequence, starting from ``state`` (default: a reset); carry the result onward.

        Returns ``(y, state, aux)``; ``aux`` holds per-token ``surprise``, ``lr``, ``retention`` (and
        ``beta``), each ``[batch, T, heads]``, and ``diverged_at``, per sequence the first token whose
        read is not finite (-1 when none).
        """
        b, t, _ = x.shape
        state = self._reset(b) if state is None else state
        split = lambda z: z.reshape(b, t, self.heads, self.d_head)  # noqa: E731
        qkv = jnp.concatenate([self.q(x), self.k(x), self.v(x)], axis=-1)
        tail = state.tail
        if self.conv is not None:
            qkv, tail = self.conv(qkv, tail)
        q, k, v = (split(z) for z in jnp.split(qkv, 3, axis=-1))
        if self.normalize:
            q, k = _l2_normalize(q), _l2_normalize(k)
        lr, retention, beta = self.gates(x)
        write_lr, write_v = lr, v
        if self.decay == "gated_deltanet":  # a M - a lr k^T(k M - v / a): the delta rule at the decayed a M
            retention = jnp.maximum(retention, 1e-6)
            write_lr, write_v = lr * retention, v / retention[..., None]
        out, memory, surprise = run_memory(
            self.spec, self.path, state.memory, q, k, write_v, write_lr, retention, beta
        )
        if self.decay == "gated_deltanet":
            surprise = surprise * retention  # || k^T (a k M - v) ||
        state = LayerState(memory, tail)
        aux = {"surprise": surprise, "lr": lr, "retention": retention, "diverged_at": _first_nonfinite(out)}
        if beta is not None:
            aux["beta"] = beta
        return self.o(self.norm(out).reshape(b, t, -1)), state, aux

    def __call__(self, x: Float[Array, "batch T d"]) -> Float[Array, "batch T d"]:
        return self.apply(x)[0]

    def telemetry(self, x: Float[Array, "batch T d"]) -> tuple[Float[Array, "batch T d"], dict[str, Array]]:
        """The output and scalar statistics: gates, surprise, in-context update norm, divergence."""
        start = self._reset(x.shape[0])
        y, end, aux = self.apply(x, start)
        return y, memory_statistics(aux, update_norm(start.memory, end.memory))


def update_norm(start: MemoryState, end: MemoryState) -> Array:
    """How far a memory moved in context: the Frobenius norm of ``end - start`` over all its weights."""
    return jnp.sqrt(sum(jnp.sum((e - s) ** 2, axis=(-2, -1)) for e, s in zip(end.weights, start.weights)))


def memory_statistics(aux: dict[str, Array], update_norm: Array) -> dict[str, Array]:
    """Scalars from a memory's ``aux``: mean/min gates, mean/max surprise, update norm, first divergence.

    ``diverged_at`` is the earliest token at which any sequence's read stopped being finite, or -1; the
    means are over finite entries only, so one diverged sequence cannot hide in an average.
    """
    stats = {}
    for name in ("lr", "retention", "beta"):
        if name in aux:
            stats[f"{name}_mean"] = jnp.mean(aux[name])
            stats[f"{name}_min"] = jnp.min(aux[name])
    s = aux["surprise"]
    finite = jnp.isfinite(s)
    stats["surprise_mean"] = jnp.sum(jnp.where(finite, s, 0.0)) / jnp.maximum(jnp.sum(finite), 1).astype(
        s.dtype
    )
    stats["surprise_max"] = jnp.max(jnp.where(finite, s, 0.0))
    stats["update_norm"] = jnp.mean(update_norm)
    bad = aux["diverged_at"]
    stats["diverged_at"] = jnp.where(
        jnp.any(bad >= 0), jnp.min(jnp.where(bad >= 0, bad, jnp.iinfo(jnp.int32).max)), -1
    )
    return stats
