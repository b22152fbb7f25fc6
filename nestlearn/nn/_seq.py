"""Causal sequence models on one footing: an embedding, pre-norm residual blocks (mixer, channel), a head.

Every sequence model of nestlearn (a softmax Transformer, linear attention, DeltaNet, TTT, Titans,
self-modifying Titans, HOPE, HOPE-attention) is a :class:`SequenceModel` whose blocks differ only in the
*mixer* (the part that moves information along time) and the *channel* (the position-wise part: an MLP,
a Continuum Memory System, or nothing).

The mixer protocol: any ``nnx.Module`` with ``__call__(x: [B, T, d]) -> [B, T, d]`` whose output at
``t`` depends on inputs ``<= t``. A mixer may also define ``telemetry(x) -> (y, dict[str, Array])``
returning its output together with statistics (gate means, update norms, ...);
:meth:`SequenceModel.telemetry` collects them per layer.

Streaming: a mixer that carries state defines ``init_state(batch)`` and ``apply(x, state) -> (y, state,
aux)`` (:class:`~nestlearn.nn.AssociativeMemory`, :class:`~nestlearn.nn.SelfModifyingMemory`); a channel
that carries state defines ``init_state(batch)`` and ``apply(x, state) -> (y, state)``
(:class:`~nestlearn.nn.ContextCMS`). :meth:`SequenceModel.init_state` and :meth:`SequenceModel.apply`
carry every layer's state across calls, so a sequence can be fed in pieces or token by token.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from nestlearn.nn._attention import CausalAttention
from nestlearn.nn._cms import ContextCMS

CMS_MODES = ("context", "optimizer", None)

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
    r"""The optimizer-level CMS channel: ``levels`` residual GELU MLP blocks that change only between batches.

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

    This is the *optimizer-level CMS*: the blocks change every ``C(l)`` outer optimizer steps (training
    batches), never inside a sequence or at test time. The paper's CMS, whose blocks learn from the
    input's tokens every ``C(l)`` tokens, is :class:`nestlearn.nn.ContextCMS`.

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

    def init_state(self, batch: int) -> tuple:
        """``(mixer state, channel state)`` at the start of ``batch`` sequences (``None`` for a stateless channel).

        Raises:
          ValueError: if the mixer keeps no state (softmax attention: no key-value cache is kept).
        """
        if not callable(getattr(self.mixer, "init_state", None)):
            raise ValueError(
                f"mixer {type(self.mixer).__name__} defines no init_state/apply, so the model cannot be run "
                "in pieces (softmax attention keeps no key-value cache); call the model on whole sequences"
            )
        channel = self.channel
        stateful = channel is not None and callable(getattr(channel, "init_state", None))
        return self.mixer.init_state(batch), channel.init_state(batch) if stateful else None

    def apply(
        self, h: Float[Array, "batch time d"], state: tuple
    ) -> tuple[Float[Array, "batch time d"], tuple]:
        """The block on a piece of the stream from ``state`` (:meth:`init_state`); returns ``(h, state)``."""
        mixer_state, channel_state = state
        y, mixer_state, _ = self.mixer.apply(self.mixer_norm(h), mixer_state)
        h = h + y
        if self.channel is not None:
            u = self.channel_norm(h)
            if channel_state is None:
                y = self.channel(u)
            else:
                y, channel_state = self.channel.apply(u, channel_state)
            h = h + y
        return h, (mixer_state, channel_state)


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

    def init_state(self, batch: int) -> tuple:
        """Every layer's state at the start of ``batch`` sequences: ``((mixer, channel), ...)``, a pytree.

        The memories reset to their meta-learned initial states, an in-context CMS to its initial blocks
        at position 0.

        Raises:
          ValueError: if a layer's mixer keeps no state (softmax attention: the model runs only on whole
            sequences, through ``model(tokens)``).
        """
        _check_positive(batch=batch)
        return tuple(layer.init_state(batch) for layer in self.layers)

    def apply(
        self, tokens: Int[Array, "batch time"], state: tuple | None = None
    ) -> tuple[Float[Array, "batch time vocab"], tuple]:
        """The logits of a piece of the stream, starting from ``state`` (default :meth:`init_state`), and the state after it.

        ``model(tokens)`` equals ``model.apply(tokens)[0]``. Feeding a sequence whole or in pieces gives
        the same logits and final state when every layer continues exactly across a cut: the in-context
        CMS does at any cut (its state holds its position within its chunks), and so do the exact
        per-token memories (DeltaNet, linear attention); a memory that takes its gradients at the
        state that opened a chunk (TTT, Titans, self-modifying Titans, so HOPE's mixer) starts a new
        chunk at every call, so it agrees only when each piece but the last is a whole number of its
        chunks (or with ``chunk=1``).

        Example:
          >>> from nestlearn.nn import hope
          >>> model = hope(vocab=16, d_model=8, cms_periods=(2, 4), rngs=nnx.Rngs(0))
          >>> tokens = jnp.zeros((3, 5), jnp.int32)
          >>> logits, state = model.apply(tokens[:, :2], model.init_state(3))
          >>> logits, state = model.apply(tokens[:, 2:], state)
          >>> logits.shape
          (3, 3, 16)
        """
        state = self.init_state(tokens.shape[0]) if state is None else state
        if len(state) != len(self.layers):
            raise ValueError(f"state must hold one entry per layer ({len(self.layers)}), got {len(state)}")
        h = self.embed(tokens)
        new = []
        for layer, layer_state in zip(self.layers, state):
            h, layer_state = layer.apply(h, layer_state)
            new.append(layer_state)
        return self.head(self.final_norm(h)), tuple(new)

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


def cms_channel(
    cms: str | None,
    d_model: int,
    *,
    levels: int | None = None,
    periods: tuple[int, ...] | None = None,
    hidden: int | None = None,
    lr: float = 0.1,
) -> Factory:
    r"""The channel factory of a HOPE block for a CMS mode (what :func:`hope` and :func:`hope_attention` build).

    - ``"context"`` (the paper's CMS): a :class:`~nestlearn.nn.ContextCMS` whose block ``l`` learns from
      the input's tokens every ``periods[l]`` tokens; ``periods`` defaults to
      :math:`C(\ell) = 16 \cdot 4^\ell` tokens for ``levels`` levels (default 3: 16, 64, 256 tokens).
      Choice: the paper's ablation uses 512/2K/8K/32K-token chunks for long-context models; these
      defaults are that geometric ratio of 4 scaled to the short sequences of the recall tasks.
    - ``"optimizer"`` (the optimizer-level CMS): a :class:`CMSChannel` of ``levels`` blocks (default 3),
      to be trained with :func:`nestlearn.nn.cms_optimizer`; ``periods`` belong to that optimizer.
    - ``None``: no CMS, the plain :class:`MLPChannel`.

    Args:
      cms: ``"context"``, ``"optimizer"`` or ``None``.
      d_model: model width.
      levels: keyword-only; number of CMS blocks (default ``len(periods)``, else 3).
      periods: keyword-only; the context CMS's token periods, fastest first.
      hidden: keyword-only; inner width of each block (default ``4 * d_model``).
      lr: keyword-only; the context CMS's base inner rate (see :class:`~nestlearn.nn.ContextCMS`).

    Returns:
      ``channel(d_model, rngs) -> nnx.Module``.
    """
    if cms not in CMS_MODES:
        raise ValueError(f"cms must be one of {CMS_MODES}, got {cms!r}")
    hidden = 4 * d_model if hidden is None else hidden
    _check_positive(d_model=d_model, cms_hidden=hidden)
    if periods is not None and cms != "context":
        raise ValueError(
            f"cms_periods are token periods of the in-context CMS (cms='context'), got cms={cms!r} with "
            f"cms_periods={periods!r}; the optimizer-level CMS takes its periods in cms_optimizer"
        )
    if levels is not None:
        _check_positive(cms_levels=levels)
        if periods is not None and len(tuple(periods)) != levels:
            raise ValueError(
                f"cms_levels ({levels}) must equal len(cms_periods), got cms_periods={periods!r}"
            )
    if periods is None:
        periods = tuple(16 * 4**level for level in range(3 if levels is None else levels))
    if cms == "context":
        return lambda d, r: ContextCMS(d, hidden, periods, lr=lr, rngs=r)
    if cms == "optimizer":
        return lambda d, r: CMSChannel(d, hidden, 3 if levels is None else levels, rngs=r)
    return lambda d, r: MLPChannel(d, hidden, rngs=r)


def hope_attention(
    *,
    vocab: int,
    d_model: int,
    n_layers: int = 2,
    heads: int = 4,
    cms: str | None = "context",
    cms_levels: int | None = None,
    cms_periods: tuple[int, ...] | None = None,
    cms_hidden: int | None = None,
    cms_lr: float = 0.1,
    rope: bool = True,
    rngs: nnx.Rngs,
) -> SequenceModel:
    """HOPE-attention: :class:`CausalAttention` (RoPE) followed by a Continuum Memory System in every block.

    ``cms="context"`` (default, the paper's CMS): a :class:`~nestlearn.nn.ContextCMS` whose blocks learn
    from the tokens of the input every ``cms_periods`` tokens, inside a sequence and at test time.
    ``cms="optimizer"``: a :class:`CMSChannel`; train it with :func:`nestlearn.nn.cms_optimizer`
    (block ``l`` of every layer every ``C(l)`` optimizer steps). ``cms=None``: a Transformer. See
    :func:`cms_channel` for the defaults. Attention keeps no key-value cache, so the model runs on whole
    sequences (``model(tokens)``), not through :meth:`SequenceModel.apply` in pieces.

    Args:
      vocab: number of token ids.
      d_model: model width.
      n_layers: keyword-only; blocks (default 2).
      heads: keyword-only; attention heads (default 4).
      cms: keyword-only; ``"context"``, ``"optimizer"`` or ``None``.
      cms_levels: keyword-only; CMS blocks per layer (default ``len(cms_periods)``, else 3).
      cms_periods: keyword-only; the in-context CMS's token periods, fastest first (default 16, 64, 256).
      cms_hidden: keyword-only; inner width of each CMS block (default ``4 * d_model``).
      cms_lr: keyword-only; the in-context CMS's base inner rate.
      rope: keyword-only; rotary embedding in attention (default ``True``).
      rngs: random streams for the parameters.

    Returns:
      A :class:`SequenceModel`.

    Example:
      >>> model = hope_attention(vocab=64, d_model=32, cms_periods=(4, 16), rngs=nnx.Rngs(0))

    References:
      Behrouz et al., Nested Learning, 2025 (HOPE-attention: the HOPE block with softmax attention in
      place of the self-modifying memory).
    """
    _check_positive(d_model=d_model, heads=heads)
    channel = cms_channel(cms, d_model, levels=cms_levels, periods=cms_periods, hidden=cms_hidden, lr=cms_lr)
    return SequenceModel(
        vocab=vocab,
        d_model=d_model,
        n_layers=n_layers,
        mixer=lambda d, r: CausalAttention(d, heads, rope=rope, rngs=r),
        channel=channel,
        rngs=rngs,
    )
