r"""Sun et al.'s TTT layer: a hidden state that is a small model, trained on each block of the sequence.

Per head, the inner model is :math:`f(x; \theta) = x + \mathrm{LN}(f_{\mathrm{res}}(x; \theta))` with
:math:`f_{\mathrm{res}}(x) = xW + c` (TTT-linear) or :math:`f_{\mathrm{res}}(x) = \mathrm{gelu}(xW_1 +
c_1)W_2 + c_2` (TTT-MLP), and ``LN`` a layer norm whose per-head scale and bias are outer parameters
(meta-learned, never written in context). Token :math:`t` brings a training view :math:`k_t`, a label view
:math:`v_t` and a test view :math:`q_t` (projections of the input) and the loss
:math:`\ell_t(\theta) = \tfrac12\lVert f(k_t;\theta) - v_t\rVert^2`. The sequence is cut into blocks of
``b`` tokens; inside a block every gradient is taken at the weights :math:`\theta_0` that opened the block
(mini-batch gradient descent), and the weights that token :math:`i` (position :math:`1 \le i \le b` in its
block) reads with are

.. math::
  \theta_i = \theta_0 - s_i \sum_{j \le i} \eta_j \nabla\ell_j(\theta_0), \qquad
  o_i = f(q_i; \theta_i), \qquad s_i = \max(0, \sigma_i),\ \sigma_i \text{ learnable, initialised } 1/i,

with the per-token rate :math:`\eta_j = \mathrm{lr}\,\mathrm{sigmoid}(w_\eta x_j + b_\eta) / d_{\text{head}}`.
At :math:`s_i = 1/i` the state read at token :math:`i` is the block's *mean* gradient so far, the
token-index scaling of Sun et al.; the block's last position gives the next block's
:math:`\theta_0 = \theta_b`. The gradients are outer products (:math:`\nabla_W \ell_j = x_j^\top\delta_j`,
:math:`\nabla_c \ell_j = \delta_j`), so a block is computed in parallel in the dual form,
:math:`y W_i + c_i = y W_0 + c_0 - s_i \sum_{j\le i}\eta_j (y\cdot x_j + 1)\,\delta_j`, without forming
any :math:`\theta_i`; blocks follow each other in a ``lax.scan`` (:func:`ttt_chunked`). :func:`ttt_scan`
computes the same per token with ``jax.grad`` of the inner loss (the reference; recurrent inference).

State and streaming: the state is :class:`TTTState`, the weights that opened the current block, the sum
:math:`\sum_j \eta_j\nabla\ell_j(\theta_0)` of the block's tokens so far and the position in the block,
so a sequence fed in pieces of any length (one token at a time included) gives the numbers of one call.

Choices the paper leaves open or this library makes:
  - choice: the learnable token scale is one vector of ``b`` entries shared by all heads and clipped at 0,
    as in Sun et al.'s released layer; it is stored as the scale itself, initialised :math:`1/i` (their
    code adds a learnable offset, initialised 0, to a fixed :math:`1/i`: the same function, parametrised
    differently). ``token_scale=False`` fixes :math:`s_i = 1` (the plain sum of the block's gradients).
  - choice: the rate's division by ``d_head`` follows the released code (which writes the loss as
    :math:`\mathrm{LN}(f_{\mathrm{res}}(k))` fit to :math:`v - k`, the same loss); the per-head rate gate
    is Sun et al.'s learnable :math:`\eta(x)`.
  - choice: queries, keys and values pass the same short causal convolution as
    :class:`~nestlearn.nn.AssociativeMemory` and the reads are RMS-normalised before the output
    projection, so the TTT layer differs from the other memory layers only in its memory.
  - choice: inner weights start at :math:`\mathcal N(0, 0.02^2)` with zero biases, the MLP is 4x wide
    with tanh-approximated GELU, and the inner layer norm uses :math:`\epsilon = 10^{-6}`, as Sun et al.
  - choice: keys are not L2-normalised (Sun et al. do not); the rate's ``1 / d_head`` keeps steps small.

References:
  Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with Expressive Hidden States" (TTT-linear,
  TTT-MLP, mini-batch TTT, the dual form, the learnable token-index scale, the inner LN and residual).
"""

from __future__ import annotations

import math
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from nestlearn.nn._assoc import LayerState, ShortConv, _first_nonfinite, memory_statistics

_LN_EPS = 1e-6


class TTTState(flax.struct.PyTreeNode):
    """A TTT memory's state between tokens.

    Attributes:
      weights: the inner model's parameters that opened the current block, ``(W, c)`` for TTT-linear and
        ``(W1, c1, W2, c2)`` for TTT-MLP.
      grad_sum: ``sum_j eta_j grad l_j(weights)`` over the tokens of the current block seen so far (same
        structure; zeros at a block start).
      pos: how many tokens of the current block have been seen (int32, ``0 <= pos < block``).
    """

    weights: tuple[Array, ...]
    grad_sum: tuple[Array, ...]
    pos: Array


def ttt_initial_state(weights: tuple[Array, ...]) -> TTTState:
    """The state at a reset: the (meta-learned) weights, nothing summed, at a block start."""
    zeros = tuple(jnp.zeros_like(w) for w in weights)
    return TTTState(tuple(weights), zeros, jnp.zeros(weights[0].shape[:-2], jnp.int32))


def current_weights(state: TTTState, scale: Float[Array, " b"]) -> tuple[Array, ...]:
    """The weights the last token read with: ``weights - s_pos * grad_sum`` (``weights`` at a block start)."""
    s = jnp.where(state.pos > 0, jnp.maximum(scale[jnp.maximum(state.pos - 1, 0)], 0.0), 0.0)
    return tuple(w - _expand(s, g) * g for w, g in zip(state.weights, state.grad_sum, strict=True))


def _expand(s: Array, like: Array) -> Array:
    """``s`` (leading axes of ``like``, one per sequence / head) broadcast against a leaf of the state."""
    lead = s.ndim
    return s.reshape(s.shape + (1,) * (like.ndim - lead))


def layer_norm(z: Array, ln: tuple[Array, Array] | None) -> Array:
    """The inner layer norm over the last axis with scale and bias ``ln`` (identity when ``ln`` is None)."""
    if ln is None:
        return z
    mu = jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.mean((z - mu) ** 2, axis=-1, keepdims=True)
    return (z - mu) * jax.lax.rsqrt(var + _LN_EPS) * ln[0][None] + ln[1][None]


def _residual(weights: tuple[Array, ...], x: Array) -> Array:
    """``f_res(x)``: ``x W + c`` (two weights) or ``gelu(x W1 + c1) W2 + c2`` (four)."""
    if len(weights) == 2:
        return x @ weights[0] + weights[1][None]
    w1, c1, w2, c2 = weights
    return jax.nn.gelu(x @ w1 + c1[None]) @ w2 + c2[None]


def ttt_apply(weights: tuple[Array, ...], ln: tuple[Array, Array] | None, x: Float[Array, "n d"]) -> Array:
    """The inner model ``f(x) = x + LN(f_res(x))`` for rows ``x``."""
    return x + layer_norm(_residual(weights, x), ln)


def ttt_loss(weights: tuple[Array, ...], ln, k: Array, v: Array) -> Array:
    """The inner loss summed over rows, ``1/2 ||f(k) - v||^2``."""
    return 0.5 * jnp.sum((ttt_apply(weights, ln, k) - v) ** 2)


def _check(block, state, q, k, v, lr, scale) -> None:
    n = q.shape[0]
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if n == 0:
        raise ValueError("the sequence is empty (q has 0 rows)")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {q.shape}, got {x.shape}")
    if lr.shape != (n,):
        raise ValueError(f"lr must have shape ({n},), got {lr.shape}")
    if scale.shape != (block,):
        raise ValueError(
            f"scale must have shape ({block},) (one entry per block position), got {scale.shape}"
        )
    if len(state.weights) not in (2, 4):
        raise ValueError(f"state.weights must hold 2 (linear) or 4 (MLP) arrays, got {len(state.weights)}")


# -- per-token path --------------------------------------------------------------------------------------


def ttt_scan(
    block: int,
    state: TTTState,
    q: Float[Array, "T d"],
    k: Float[Array, "T d"],
    v: Float[Array, "T d"],
    lr: Float[Array, " T"],
    scale: Float[Array, " b"],
    ln: tuple[Array, Array] | None,
    stop_write_grad: bool = False,
) -> tuple[Float[Array, "T d"], TTTState, dict[str, Array]]:
    """Run one head's TTT memory token by token (the reference path; also recurrent inference).

    Args:
      block: tokens per mini-batch block ``b``.
      state: the state before the first token (:func:`ttt_initial_state` for a reset).
      q, k, v: test, training and label views of one sequence.
      lr: each token's inner rate ``eta_j``.
      scale: the token-index scale ``s_i`` of each block position (clipped at 0 here).
      ln: the inner layer norm's ``(scale, bias)``, or ``None`` for none.
      stop_write_grad: treat the in-context gradients as constants for the outer gradient.

    Returns:
      ``(outputs, final_state, aux)``: ``outputs[t] = f(q_t; theta_t)``, the state after the last token
      and ``aux["surprise"]``, the norm of each token's inner gradient at its block-start weights.
    """
    _check(block, state, q, k, v, lr, scale)
    s_all = jnp.maximum(scale, 0.0)

    def step(carry, inputs):
        base, gsum, pos = carry
        qt, kt, vt, eta = inputs
        g = jax.grad(lambda w: ttt_loss(w, ln, kt[None], vt[None]))(base)
        if stop_write_grad:
            g = jax.lax.stop_gradient(g)
        surprise = jnp.sqrt(sum(jnp.sum(gi**2) for gi in g))
        gsum = tuple(a + eta * gi for a, gi in zip(gsum, g, strict=True))
        weights = tuple(w - s_all[pos] * a for w, a in zip(base, gsum, strict=True))
        out = ttt_apply(weights, ln, qt[None])[0]
        done = pos == block - 1
        base = tuple(jnp.where(done, w, b) for w, b in zip(weights, base, strict=True))
        gsum = tuple(jnp.where(done, 0.0, a) for a in gsum)
        return (base, gsum, jnp.where(done, 0, pos + 1)), (out, surprise)

    carry = (state.weights, state.grad_sum, state.pos)
    (base, gsum, pos), (out, surprise) = jax.lax.scan(step, carry, (q, k, v, lr))
    return out, TTTState(base, gsum, pos), {"surprise": surprise}


# -- chunkwise path (one block in parallel, the dual form) ----------------------------------------------


def _signals(weights: tuple[Array, ...], ln, k: Array, v: Array) -> tuple[tuple[Array, Array], ...]:
    """Per row and layer ``(x_l, delta_l)``: row j's gradients are ``x_lj^T delta_lj`` and ``delta_lj`` (bias)."""
    target = v - k

    def loss(pre):  # the pre-activations of every layer, so one grad gives every delta
        return 0.5 * jnp.sum((layer_norm(pre[-1], ln) - target) ** 2)

    if len(weights) == 2:
        (d,) = jax.grad(loss)((k @ weights[0] + weights[1][None],))
        return ((k, d),)
    w1, c1, w2, c2 = weights
    z1 = k @ w1 + c1[None]
    h = jax.nn.gelu(z1)

    def loss2(pre):
        return loss((pre[0], jax.nn.gelu(pre[0]) @ w2 + c2[None] + pre[1]))

    d1, d2 = jax.grad(loss2)((z1, jnp.zeros_like(k)))
    return ((k, d1), (h, d2))


def _block(ln, s: Array, stop_write_grad: bool, carry, inputs):
    """One block of ``b`` tokens: every read in parallel, then the state after the block."""
    base, gsum = carry
    q, k, v, eta, complete = inputs
    signals = _signals(base, ln, k, v)
    if stop_write_grad:
        signals = jax.lax.stop_gradient(signals)
    surprise = jnp.sqrt(sum((jnp.sum(x**2, 1) + 1.0) * jnp.sum(d**2, 1) for x, d in signals))
    writes = tuple((x, eta[:, None] * d) for x, d in signals)
    n = q.shape[0]
    causal = jnp.tril(jnp.ones((n, n), q.dtype))

    def read(layer: int, y: Array) -> Array:  # y W_i + c_i for every block position i (the dual form)
        x, u = writes[layer]
        w, c, gw, gc = base[2 * layer], base[2 * layer + 1], gsum[2 * layer], gsum[2 * layer + 1]
        acc = y @ gw + gc[None] + ((y @ x.T + 1.0) * causal) @ u
        return y @ w + c[None] - s[:, None] * acc

    z = read(0, q) if len(base) == 2 else read(1, jax.nn.gelu(read(0, q)))
    out = q + layer_norm(z, ln)
    summed = []
    for layer, (x, u) in enumerate(writes):
        summed += [gsum[2 * layer] + x.T @ u, gsum[2 * layer + 1] + jnp.sum(u, axis=0)]
    closed = tuple(w - s[-1] * a for w, a in zip(base, summed, strict=True))
    base = tuple(jnp.where(complete, c, w) for c, w in zip(closed, base, strict=True))
    gsum = tuple(jnp.where(complete, 0.0, a) for a in summed)
    return (base, gsum), (out, surprise)


def ttt_chunked(
    block: int,
    state: TTTState,
    q: Float[Array, "T d"],
    k: Float[Array, "T d"],
    v: Float[Array, "T d"],
    lr: Float[Array, " T"],
    scale: Float[Array, " b"],
    ln: tuple[Array, Array] | None,
    stop_write_grad: bool = False,
    at_block_start: bool = False,
) -> tuple[Float[Array, "T d"], TTTState, dict[str, Array]]:
    """Run one head's TTT memory block by block, each block in parallel; same results as :func:`ttt_scan`.

    The tokens are laid out on the block grid at the state's position ``state.pos``: the slots before it
    (the part of the block already seen in an earlier call) and after the last token are padding with rate
    0, which writes nothing. ``at_block_start=True`` promises ``state.pos == 0`` (a reset state), which
    saves the one extra block the grid needs for an arbitrary start.

    Example:
      >>> d, b = 3, 4
      >>> st = ttt_initial_state((jnp.zeros((d, d)), jnp.zeros(d)))
      >>> x = jnp.ones((6, d)); scale = 1.0 / jnp.arange(1, b + 1)
      >>> out, st, aux = ttt_chunked(b, st, x, x, x, jnp.ones(6), scale, None)
      >>> out.shape, int(st.pos)
      ((6, 3), 2)
    """
    _check(block, state, q, k, v, lr, scale)
    n = q.shape[0]
    s = jnp.maximum(scale, 0.0)
    if at_block_start:
        slots, start = math.ceil(n / block) * block, 0
    else:
        slots, start = math.ceil((n + block - 1) / block) * block, state.pos

    def place(x: Array) -> Array:
        grid = jnp.zeros((slots, *x.shape[1:]), x.dtype)
        grid = jax.lax.dynamic_update_slice_in_dim(grid, x, start, axis=0)
        return grid.reshape(slots // block, block, *x.shape[1:])

    blocks = slots // block
    complete = (jnp.arange(blocks, dtype=jnp.int32) + 1) * block <= start + n
    body = lambda c, xs: _block(ln, s, stop_write_grad, c, xs)  # noqa: E731
    (base, gsum), (out, surprise) = jax.lax.scan(
        body, (state.weights, state.grad_sum), (*(place(x) for x in (q, k, v, lr)), complete)
    )
    out = jax.lax.dynamic_slice_in_dim(out.reshape(slots, -1), start, n, axis=0)
    surprise = jax.lax.dynamic_slice_in_dim(surprise.reshape(slots), start, n, axis=0)
    pos = jnp.asarray((start + n) % block, jnp.int32)
    return out, TTTState(base, gsum, pos), {"surprise": surprise}


# -- the layer (Flax NNX) --------------------------------------------------------------------------------


class TTTLayer(nnx.Module):
    r"""Sun et al.'s TTT layer (TTT-linear or TTT-MLP) as a causal multi-head sequence layer.

    Per head, :math:`q_t, k_t, v_t` are linear projections of :math:`x_t` (after a short causal
    convolution), :math:`\eta_t = \mathrm{lr}\,\mathrm{sigmoid}(w_\eta x_t + b_\eta)/d_{\text{head}}`;
    the inner model learns in context as the module docstring says; the reads are RMS-normalised and
    projected back to ``d_model``. Outer (meta-learned) parameters: the projections, the rate gate, the
    inner model's initial weights, the inner layer norm's per-head scale and bias, the token scale.

    Args:
      d_model: input and output features.
      heads: heads; ``d_head`` (default ``d_model // heads``) features per head.
      memory: ``"linear"`` (:math:`f_{\mathrm{res}}(x) = xW + c`) or ``"mlp"`` (two layers, GELU).
      hidden: hidden units of the ``"mlp"`` inner model (default ``4 * d_head``, as Sun et al.).
      block: the mini-batch size ``b`` (16 in the paper).
      lr: the base inner rate (Sun et al.: 1.0 for TTT-linear, 0.1 for TTT-MLP).
      layer_norm: the inner ``x + LN(f_res(x))``; ``False`` gives ``x + f_res(x)`` (an ablation).
      token_scale: the learnable token-index scale (init :math:`1/i`); ``False`` fixes :math:`s_i = 1`.
      conv: taps of the :class:`~nestlearn.nn.ShortConv` on queries, keys and values (0: none).
      path: ``"chunk"`` (block-parallel dual form) or ``"token"`` (per-token scan); the results agree.
      stop_write_grad: treat in-context gradients as constants for the outer gradient.
      rngs: random streams for the parameters.

    Example:
      >>> layer = TTTLayer(16, heads=2, block=4, rngs=nnx.Rngs(0))
      >>> y, state, aux = layer.apply(jnp.ones((3, 10, 16)))
      >>> y.shape, state.memory.weights[0].shape, state.memory.pos.shape
      ((3, 10, 16), (3, 2, 8, 8), (3, 2))
    """

    def __init__(
        self,
        d_model: int,
        *,
        heads: int = 2,
        d_head: int | None = None,
        memory: Literal["linear", "mlp"] = "linear",
        hidden: int | None = None,
        block: int = 16,
        lr: float = 1.0,
        layer_norm: bool = True,
        token_scale: bool = True,
        conv: int = 4,
        path: str = "chunk",
        stop_write_grad: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        d_head = d_model // heads if d_head is None else d_head
        if heads < 1 or d_head < 1:
            raise ValueError(f"heads ({heads}) and d_head ({d_head}) must be >= 1")
        if memory not in ("linear", "mlp"):
            raise ValueError(f"memory must be 'linear' or 'mlp', got {memory!r}")
        if not isinstance(block, int) or isinstance(block, bool) or block < 1:
            raise ValueError(f"block must be a positive int, got {block!r}")
        if path not in ("chunk", "token"):
            raise ValueError(f"path must be 'chunk' or 'token', got {path!r}")
        self.heads, self.d_head, self.memory, self.block, self.path = heads, d_head, memory, block, path
        self.lr, self.layer_norm, self.token_scale = lr, layer_norm, token_scale
        self.stop_write_grad = stop_write_grad
        width = heads * d_head
        self.q = nnx.Linear(d_model, width, use_bias=False, rngs=rngs)
        self.k = nnx.Linear(d_model, width, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(d_model, width, use_bias=False, rngs=rngs)
        self.o = nnx.Linear(width, d_model, use_bias=False, rngs=rngs)
        self.norm = nnx.RMSNorm(d_head, rngs=rngs)
        self.conv = ShortConv(3 * width, conv, rngs=rngs) if conv else None
        small = nnx.initializers.normal(0.02)
        self.lr_proj = nnx.Linear(d_model, heads, kernel_init=small, rngs=rngs)
        if memory == "linear":
            shapes = [(d_head, d_head), (d_head,)]
        else:
            hidden = 4 * d_head if hidden is None else hidden
            shapes = [(d_head, hidden), (hidden,), (hidden, d_head), (d_head,)]
        keys = jax.random.split(rngs.params(), len(shapes))
        self.inner = nnx.List(
            nnx.Param(
                0.02 * jax.random.normal(key, (heads, *shape))
                if len(shape) == 2
                else jnp.zeros((heads, *shape))
            )
            for key, shape in zip(keys, shapes, strict=True)
        )
        if layer_norm:
            self.ln_scale = nnx.Param(jnp.ones((heads, d_head)))
            self.ln_bias = nnx.Param(jnp.zeros((heads, d_head)))
        if token_scale:
            self.scale = nnx.Param(1.0 / jnp.arange(1, block + 1, dtype=jnp.float32))

    def _init_weights(self) -> tuple[Array, ...]:
        return tuple(w[...] for w in self.inner)

    def token_scales(self) -> Float[Array, " b"]:
        """The scale ``s_i`` of each block position (before the clip at 0)."""
        return self.scale[...] if self.token_scale else jnp.ones((self.block,))

    def init_state(self, batch: int) -> LayerState:
        """The memory reset to its (meta-learned) initial weights, for ``batch`` sequences."""
        weights = tuple(jnp.broadcast_to(w, (batch, *w.shape)) for w in self._init_weights())
        tail = self.conv.init_tail(batch) if self.conv is not None else None
        return LayerState(ttt_initial_state(weights), tail)

    def apply(
        self, x: Float[Array, "batch T d"], state: LayerState | None = None
    ) -> tuple[Float[Array, "batch T d"], LayerState, dict[str, Array]]:
        """Read and write a sequence, starting from ``state`` (default: a reset); carry the result onward.

        Returns ``(y, state, aux)``; ``aux`` holds per-token ``surprise`` and ``lr`` (``[batch, T,
        heads]``) and ``diverged_at``, per sequence the first token whose read is not finite (-1 if none).
        """
        b, t, _ = x.shape
        fresh = state is None
        state = self.init_state(b) if state is None else state
        qkv = jnp.concatenate([self.q(x), self.k(x), self.v(x)], axis=-1)
        tail = state.tail
        if self.conv is not None:
            qkv, tail = self.conv(qkv, tail)
        q, k, v = (
            jnp.swapaxes(z.reshape(b, t, self.heads, self.d_head), 1, 2) for z in jnp.split(qkv, 3, -1)
        )
        lr = self.lr * jax.nn.sigmoid(self.lr_proj(x)) / self.d_head  # [b, T, heads]
        scale = self.token_scales()
        ln = (self.ln_scale[...], self.ln_bias[...]) if self.layer_norm else None

        def one(st, qh, kh, vh, lrh, lnh):
            if self.path == "token":
                return ttt_scan(self.block, st, qh, kh, vh, lrh, scale, lnh, self.stop_write_grad)
            return ttt_chunked(self.block, st, qh, kh, vh, lrh, scale, lnh, self.stop_write_grad, fresh)

        per_head = jax.vmap(one, in_axes=(0, 0, 0, 0, 0, 0 if ln is not None else None))
        out, memory, aux = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, None))(
            state.memory, q, k, v, jnp.swapaxes(lr, 1, 2), ln
        )
        out = jnp.swapaxes(out, 1, 2)  # [b, T, heads, d_head]
        aux = {
            "surprise": jnp.swapaxes(aux["surprise"], 1, 2),
            "lr": lr,
            "diverged_at": _first_nonfinite(out),
        }
        return self.o(self.norm(out).reshape(b, t, -1)), LayerState(memory, tail), aux

    def __call__(self, x: Float[Array, "batch T d"]) -> Float[Array, "batch T d"]:
        return self.apply(x)[0]

    def telemetry(self, x: Float[Array, "batch T d"]) -> tuple[Float[Array, "batch T d"], dict[str, Array]]:
        """The output and scalar statistics: rate, surprise, in-context update norm, divergence."""
        y, end, aux = self.apply(x)
        moved = current_weights(end.memory, self.token_scales())
        start = self.init_state(x.shape[0]).memory.weights
        sq = sum(
            jnp.sum((e - s0).reshape(*e.shape[:2], -1) ** 2, -1) for e, s0 in zip(moved, start, strict=True)
        )
        return y, memory_statistics(aux, jnp.sqrt(sq))
