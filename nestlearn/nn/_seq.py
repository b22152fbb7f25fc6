"""Causal sequence models on one footing: an embedding, pre-norm residual blocks (mixer, channel), a head.

Every sequence model of nestlearn (a softmax Transformer, linear attention, DeltaNet, TTT, Titans,
self-modifying Titans, HOPE, HOPE-attention) is a :class:`SequenceModel` whose blocks differ only in the
*mixer* (the part that moves information along time) and the *channel* (the position-wise part: an MLP,
a Continuum Memory System, or nothing).

The mixer protocol: any ``nnx.Module`` with ``__call__(x: [B, T, d]) -> [B, T, d]`` whose output at
``t`` depends on inputs ``<= t``. A mixer may also define ``telemetry(x) -> (y, dict[str, Array])``
returning its output together with statistics (gate means, update norms, ...);
:meth:`SequenceModel.telemetry` collects them per layer.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from nestlearn.nn._attention import CausalAttention

Factory = Callable[[int, nnx.Rngs], nnx.Module]


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class MLPChannel(nnx.Module):
    r"""The position-wise GELU MLP of a Transformer block, :math:`f(x) = W_2\,\mathrm{gelu}(W_1 x + b_1) + b_2`.

    Args:
      d_model: features in and out.
      hidden: features of the inner layer.
      rngs: random streams for the parameters.

    Example:
      >>> MLPChannel(8, 32, rngs=nnx.Rngs(0))(jnp.zeros((2, 3, 8))).shape
      (2, 3, 8)
    """

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs) -> None:
        _check_positive(d_model=d_model, hidden=hidden)
        self.up = nnx.Linear(d_model, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, d_model, rngs=rngs)

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        return self.down(jax.nn.gelu(self.up(x)))


class CMSChannel(nnx.Module):
    r"""A Continuum Memory System as the channel of a sequence block: ``levels`` residual GELU MLP blocks.

    .. math::
      h_0 = x,\qquad h_{\ell+1} = h_\ell + W_2^\ell\,\mathrm{gelu}(W_1^\ell h_\ell + b_1^\ell) + b_2^\ell,
      \qquad f(x) = h_L - x .

    The channel returns the blocks' summed contribution :math:`h_L - x`, because the sequence block adds
    its own residual (``h + channel(norm(h))``); so with one level it is :class:`MLPChannel` with the same
    weights. Block ``l``'s parameters live under ``blocks[l]``, which is what
    :func:`nestlearn.nn.cms_labels` reads: in a whole :class:`SequenceModel` block ``l`` of every layer is
    labelled ``"block<l>"`` and every other parameter ``"io"``, so
    :func:`nestlearn.nn.cms_optimizer` updates block ``l`` every ``C(l)`` steps. What makes it a CMS is
    that optimizer; the computation is a residual MLP chain.

    Args:
      d_model: features in and out.
      hidden: inner width of every block.
      levels: number of blocks (>= 1), fastest first by :func:`nestlearn.nn.cms_optimizer`'s convention.
      rngs: random streams for the parameters.

    Example:
      >>> cms = CMSChannel(8, 16, 3, rngs=nnx.Rngs(0))
      >>> cms(jnp.zeros((2, 5, 8))).shape
      (2, 5, 8)

    References:
      Behrouz et al., Nested Learning: The Illusion of Deep Learning Architectures, 2025 (HOPE: a
      self-modifying memory followed by a CMS; HOPE-attention: softmax attention followed by a CMS).
    """

    def __init__(self, d_model: int, hidden: int, levels: int, *, rngs: nnx.Rngs) -> None:
        _check_positive(d_model=d_model, hidden=hidden, levels=levels)
        self.blocks = nnx.List([MLPChannel(d_model, hidden, rngs=rngs) for _ in range(levels)])

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        h = x
        for block in self.blocks:
            h = h + block(h)
        return h - x


class SequenceBlock(nnx.Module):
    """One pre-norm residual block: ``h + mixer(norm(h))``, then ``h + channel(norm(h))`` if a channel.

    Args:
      d_model: features.
      mixer: ``mixer(d_model, rngs)`` builds the causal mixer.
      channel: ``channel(d_model, rngs)`` builds the position-wise channel, or ``None`` for none.
      rngs: random streams for the parameters.
    """

    def __init__(self, d_model: int, mixer: Factory, channel: Factory | None, *, rngs: nnx.Rngs) -> None:
        self.mixer_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.mixer = mixer(d_model, rngs)
        if channel is None:
            self.channel_norm = None
            self.channel = None
        else:
            self.channel_norm = nnx.LayerNorm(d_model, rngs=rngs)
            self.channel = channel(d_model, rngs)

    def __call__(self, h: Float[Array, "batch time d"]) -> Float[Array, "batch time d"]:
        return self.telemetry(h, record=False)[0]

    def telemetry(
        self, h: Float[Array, "batch time d"], *, record: bool = True
    ) -> tuple[Float[Array, "batch time d"], dict[str, Array]]:
        """The block's output and its mixer's telemetry (``{}`` if the mixer defines none)."""
        x = self.mixer_norm(h)
        stats: dict[str, Array] = {}
        if record and callable(getattr(self.mixer, "telemetry", None)):
            y, stats = self.mixer.telemetry(x)
        else:
            y = self.mixer(x)
        h = h + y
        if self.channel is not None:
            h = h + self.channel(self.channel_norm(h))
        return h, dict(stats)


class SequenceModel(nnx.Module):
    r"""A causal sequence model: token embedding, pre-norm residual blocks, final norm, linear head.

    .. math::
      h^0 = E[\text{tokens}],\quad
      u^\ell = h^{\ell} + \mathrm{mixer}_\ell(\mathrm{LN}(h^\ell)),\quad
      h^{\ell+1} = u^\ell + \mathrm{channel}_\ell(\mathrm{LN}(u^\ell)),\quad
      \text{logits} = W_{\text{head}}\,\mathrm{LN}(h^{L}),

    with an untied head (no bias). The embedding carries no position: the mixers that need one (softmax
    attention) add it themselves (rotary embedding); memory mixers are ordered by their recurrence.

    Args:
      vocab: number of token ids (>= 1).
      d_model: model width.
      n_layers: number of blocks (>= 1).
      mixer: ``mixer(d_model, rngs) -> nnx.Module``, the causal mixer of every block (see the module
        docstring for the protocol).
      channel: ``channel(d_model, rngs) -> nnx.Module`` for the position-wise part, or ``None``.
      rngs: random streams for the parameters.

    Example:
      >>> model = SequenceModel(vocab=16, d_model=8, n_layers=2,
      ...     mixer=lambda d, rngs: CausalAttention(d, 2, rngs=rngs),
      ...     channel=lambda d, rngs: MLPChannel(d, 32, rngs=rngs), rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((3, 5), jnp.int32)).shape
      (3, 5, 16)
    """

    def __init__(
        self,
        *,
        vocab: int,
        d_model: int,
        n_layers: int,
        mixer: Factory,
        channel: Factory | None,
        rngs: nnx.Rngs,
    ) -> None:
        _check_positive(vocab=vocab, d_model=d_model, n_layers=n_layers)
        if not callable(mixer):
            raise ValueError(f"mixer must be a factory mixer(d_model, rngs), got {mixer!r}")
        if channel is not None and not callable(channel):
            raise ValueError(f"channel must be a factory channel(d_model, rngs) or None, got {channel!r}")
        self.vocab = vocab
        self.embed = nnx.Embed(vocab, d_model, rngs=rngs)
        self.layers = nnx.List([SequenceBlock(d_model, mixer, channel, rngs=rngs) for _ in range(n_layers)])
        self.final_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab, use_bias=False, rngs=rngs)

    def hidden(self, tokens: Int[Array, "batch time"]) -> Float[Array, "batch time d"]:
        """The head's input at every position: the last block's output after the final norm."""
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.final_norm(h)

    def __call__(self, tokens: Int[Array, "batch time"]) -> Float[Array, "batch time vocab"]:
        return self.head(self.hidden(tokens))

    def logits_at(
        self, tokens: Int[Array, "batch time"], positions: Int[Array, "batch queries"]
    ) -> Float[Array, "batch queries vocab"]:
        """Logits at ``positions`` only: ``self(tokens)[b, positions[b, q]]``, the head applied after the gather.

        With a large vocabulary this avoids the ``[B, T, V]`` logits. A position outside ``[0, T)``
        gives NaN logits (JAX's out-of-bounds gather fill), so it cannot pass unnoticed.
        """
        h = self.hidden(tokens)
        picked = jnp.take_along_axis(h, positions[:, :, None], axis=1)
        return self.head(picked)

    def telemetry(self, tokens: Int[Array, "batch time"]) -> dict[str, Array]:
        """Statistics of every mixer that defines ``telemetry``, keyed ``"layer<i>/<name>"``."""
        h = self.embed(tokens)
        out: dict[str, Array] = {}
        for i, layer in enumerate(self.layers):
            h, stats = layer.telemetry(h)
            out.update({f"layer{i}/{name}": value for name, value in stats.items()})
        return out


def transformer(
    *,
    vocab: int,
    d_model: int,
    n_layers: int = 2,
    heads: int = 4,
    mlp_hidden: int | None = None,
    rope: bool = True,
    rngs: nnx.Rngs,
) -> SequenceModel:
    """A small softmax Transformer: :class:`CausalAttention` (RoPE) and an :class:`MLPChannel` per block.

    Args:
      vocab: number of token ids.
      d_model: model width.
      n_layers: keyword-only; blocks (default 2).
      heads: keyword-only; attention heads (default 4).
      mlp_hidden: keyword-only; the MLP's inner width (default ``4 * d_model``).
      rope: keyword-only; rotary embedding in attention (default ``True``).
      rngs: random streams for the parameters.

    Returns:
      A :class:`SequenceModel`.

    Example:
      >>> model = transformer(vocab=64, d_model=32, rngs=nnx.Rngs(0))
    """
    hidden = 4 * d_model if mlp_hidden is None else mlp_hidden
    _check_positive(d_model=d_model, heads=heads, mlp_hidden=hidden)
    return SequenceModel(
        vocab=vocab,
        d_model=d_model,
        n_layers=n_layers,
        mixer=lambda d, r: CausalAttention(d, heads, rope=rope, rngs=r),
        channel=lambda d, r: MLPChannel(d, hidden, rngs=r),
        rngs=rngs,
    )


def hope_attention(
    *,
    vocab: int,
    d_model: int,
    n_layers: int = 2,
    heads: int = 4,
    cms_levels: int = 3,
    cms_hidden: int | None = None,
    rope: bool = True,
    rngs: nnx.Rngs,
) -> SequenceModel:
    """HOPE-attention: :class:`CausalAttention` (RoPE) followed by a :class:`CMSChannel` in every block.

    Train it with :func:`nestlearn.nn.cms_optimizer` (block ``l`` of every layer every ``C(l)`` steps);
    with any other optimizer it is a Transformer whose MLP is a residual chain of ``cms_levels`` MLPs.

    Args:
      vocab: number of token ids.
      d_model: model width.
      n_layers: keyword-only; blocks (default 2).
      heads: keyword-only; attention heads (default 4).
      cms_levels: keyword-only; CMS blocks per layer (default 3).
      cms_hidden: keyword-only; inner width of each CMS block (default ``4 * d_model``).
      rope: keyword-only; rotary embedding in attention (default ``True``).
      rngs: random streams for the parameters.

    Returns:
      A :class:`SequenceModel`.

    Example:
      >>> model = hope_attention(vocab=64, d_model=32, cms_levels=2, rngs=nnx.Rngs(0))

    References:
      Behrouz et al., Nested Learning, 2025 (HOPE-attention: the HOPE block with softmax attention in
      place of the self-modifying memory).
    """
    hidden = 4 * d_model if cms_hidden is None else cms_hidden
    _check_positive(d_model=d_model, heads=heads, cms_levels=cms_levels, cms_hidden=hidden)
    return SequenceModel(
        vocab=vocab,
        d_model=d_model,
        n_layers=n_layers,
        mixer=lambda d, r: CausalAttention(d, heads, rope=rope, rngs=r),
        channel=lambda d, r: CMSChannel(d, hidden, cms_levels, rngs=r),
        rngs=rngs,
    )
