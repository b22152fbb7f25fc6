"""Causal softmax self-attention with rotary position embedding, the reference mixer of the sequence models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

ROPE_BASE = 10_000.0


def rotary(
    x: Float[Array, "batch time heads dh"], *, base: float = ROPE_BASE
) -> Float[Array, "batch time heads dh"]:
    r"""Rotary position embedding, the "rotate half" form: feature pairs ``(i, i + dh/2)`` turn by ``t * w_i``.

    .. math::
      w_i = \mathrm{base}^{-2i/d_h},\quad
      \begin{pmatrix} y_i \\ y_{i+d_h/2} \end{pmatrix}_t =
      \begin{pmatrix} \cos t w_i & -\sin t w_i \\ \sin t w_i & \cos t w_i \end{pmatrix}
      \begin{pmatrix} x_i \\ x_{i+d_h/2} \end{pmatrix}_t,

    so the dot product of a rotated query at ``t`` and a rotated key at ``s`` depends on ``t - s`` only.

    Args:
      x: queries or keys, ``[batch, time, heads, dh]`` with ``dh`` even; position ``t`` is the index on
        axis 1.
      base: keyword-only; the wavelength base (10,000 as in the paper).

    Returns:
      The rotated array, same shape and dtype.

    References:
      Su et al., RoFormer: Enhanced Transformer with Rotary Position Embedding, 2021.
    """
    t, dh = x.shape[1], x.shape[-1]
    half = dh // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) * (2.0 / dh))
    angle = jnp.arange(t, dtype=jnp.float32)[:, None] * freq[None, :]  # [time, half]
    cos = jnp.cos(angle)[None, :, None, :].astype(x.dtype)
    sin = jnp.sin(angle)[None, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class CausalAttention(nnx.Module):
    r"""Multi-head causal softmax self-attention, with rotary position embedding on queries and keys.

    Per head :math:`h` with :math:`q = \mathrm{RoPE}(x W_q^h)`, :math:`k = \mathrm{RoPE}(x W_k^h)`,
    :math:`v = x W_v^h` (head width :math:`d_h = d/H`):

    .. math::
      o^h_t = \sum_{s \le t} \frac{\exp(q_t \cdot k_s / \sqrt{d_h})}{\sum_{r \le t} \exp(q_t \cdot k_r /
      \sqrt{d_h})}\, v_s, \qquad y_t = [o^1_t, \dots, o^H_t]\, W_o .

    Projections have no biases. Output ``t`` depends on inputs ``<= t`` only, so it is a mixer of
    :class:`nestlearn.nn._seq.SequenceModel`.

    Args:
      d_model: features in and out.
      heads: number of heads; must divide ``d_model`` (and leave an even head width when ``rope``).
      rope: keyword-only; apply :func:`rotary` to queries and keys (default ``True``; without it the
        model has no notion of position).
      rngs: random streams for the parameters.

    Example:
      >>> attn = CausalAttention(32, 4, rngs=nnx.Rngs(0))
      >>> attn(jnp.zeros((2, 5, 32))).shape
      (2, 5, 32)

    References:
      Vaswani et al., Attention Is All You Need, 2017; Su et al., RoFormer, 2021 (rotary embedding).
    """

    def __init__(self, d_model: int, heads: int, *, rope: bool = True, rngs: nnx.Rngs) -> None:
        for name, value in (("d_model", d_model), ("heads", heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % heads:
            raise ValueError(f"heads must divide d_model, got heads={heads} for d_model={d_model}")
        if rope and (d_model // heads) % 2:
            raise ValueError(
                f"rope needs an even head width, got d_model // heads = {d_model // heads} "
                f"(d_model={d_model}, heads={heads})"
            )
        self.heads = heads
        self.rope = rope
        self.query = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)
        self.key = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)
        self.value = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)

    def __call__(self, x: Float[Array, "batch time d"]) -> Float[Array, "batch time d"]:
        b, t, d = x.shape
        dh = d // self.heads
        q, k, v = (proj(x).reshape(b, t, self.heads, dh) for proj in (self.query, self.key, self.value))
        if self.rope:
            q, k = rotary(q), rotary(k)
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.asarray(dh, x.dtype))
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal[None, None], scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        o = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(b, t, d)
        return self.out(o)
