"""The memory models on one footing: each a :class:`SequenceModel` whose mixer is an associative memory.

Every constructor returns a causal sequence model with an embedding, ``n_layers`` pre-norm blocks (mixer,
then a position-wise channel) and a head. They differ only in the mixer:

============================  ===========  =========  ===========  ========  =======  ========
model                          memory       objective  gradient     lr        gate     momentum
============================  ===========  =========  ===========  ========  =======  ========
``linear_attention``           matrix       dot        (n/a)        1         no*      no
``deltanet``                   matrix       l2         per token    input     no**     no
``minibatch_delta``            matrix/MLP   l2         block start  input     no       no
``ttt_linear``                 x+LN(xW+c)   l2         block start  input/i   no       no
``ttt_mlp``                    x+LN(MLP)    l2         block start  input/i   no       no
``titans``                     MLP          l2         block start  input     input    input
``self_modifying_titans``      MLP x 5      l2         block start  memory    memory   optional
``hope``                       as above, followed by a CMS channel
============================  ===========  =========  ===========  ========  =======  ========

(* ``gate=True``: gated linear attention / RetNet-style decay. ** ``gate="gated_deltanet"`` (or ``True``):
Yang et al.'s Gated DeltaNet, decay before the write; ``gate="titans"``: the Titans / Nested Learning
decay beside the write; see :func:`deltanet`.) ``ttt_linear`` and ``ttt_mlp`` are Sun et al.'s TTT
layer (:class:`~nestlearn.nn.TTTLayer`: inner LayerNorm and residual, learnable token-index scale of the
inner step, "input/i"); ``minibatch_delta`` is the plain mini-batch delta rule they reduce to without those.
The Transformer and HOPE-attention references live in :mod:`nestlearn.nn._seq`. ``path`` switches every
memory between the chunkwise and the per-token computation (same numbers); ``stop_write_grad`` stops the
outer gradient at the in-context writes.
"""

from __future__ import annotations

from typing import Literal

from flax import nnx

from nestlearn.nn._assoc import AssociativeMemory
from nestlearn.nn._attention import CausalAttention
from nestlearn.nn._selfmod import MEMORIES, SelfModifyingMemory
from nestlearn.nn._seq import MLPChannel, SequenceModel, cms_channel
from nestlearn.nn._ttt import TTTLayer


def _model(vocab, d_model, n_layers, mixer, mlp_hidden, rngs) -> SequenceModel:
    hidden = 4 * d_model if mlp_hidden is None else mlp_hidden
    return SequenceModel(
        vocab=vocab,
        d_model=d_model,
        n_layers=n_layers,
        mixer=mixer,
        channel=lambda d, r: MLPChannel(d, hidden, rngs=r),
        rngs=rngs,
    )


def _memory_model(vocab, d_model, n_layers, heads, mlp_hidden, rngs, **memory) -> SequenceModel:
    mixer = lambda d, r: AssociativeMemory(d, heads=heads, rngs=r, **memory)  # noqa: E731
    return _model(vocab, d_model, n_layers, mixer, mlp_hidden, rngs)


def linear_attention(
    *, vocab: int, d_model: int, n_layers: int = 2, heads: int = 2, gate: bool = False,
    mlp_hidden: int | None = None, chunk: int = 64, path: str = "chunk", stop_write_grad: bool = False,
    rngs: nnx.Rngs,
) -> SequenceModel:  # fmt: skip
    r"""Linear attention: :math:`M_t = \alpha_t M_{t-1} + k_t^\top v_t`, :math:`o_t = q_t M_t` (Hebbian writes).

    Katharopoulos et al. 2020 (``gate=True``: a per-token decay, as in gated linear attention).
    """
    return _memory_model(
        vocab, d_model, n_layers, heads, mlp_hidden, rngs, objective="dot", lr=1.0, lr_from_input=False,
        gate=gate, chunk=chunk, path=path, stop_write_grad=stop_write_grad,
    )  # fmt: skip


def deltanet(
    *, vocab: int, d_model: int, n_layers: int = 2, heads: int = 2,
    gate: bool | Literal["gated_deltanet", "titans"] = False, mlp_hidden: int | None = None, chunk: int = 64,
    path: str = "chunk", stop_write_grad: bool = False, rngs: nnx.Rngs,
) -> SequenceModel:  # fmt: skip
    r"""DeltaNet: :math:`M_t = M_{t-1} - \beta_t k_t^\top(k_t M_{t-1} - v_t)` with :math:`\beta_t` from the input.

    Args:
      gate: ``False``: no forgetting (DeltaNet, Schlag et al. 2021; Yang et al. 2024's chunkwise
        training). ``"gated_deltanet"`` (or ``True``): Gated DeltaNet (Yang et al. 2024), the retention
        :math:`\alpha_t` decays the state *before* the delta-rule write,
        :math:`S_t = \alpha_t(I - \beta_t k_t k_t^\top)S_{t-1} + \beta_t k_t v_t^\top`.
        ``"titans"``: the Titans / Nested Learning decay beside the write,
        :math:`M_t = \alpha_t M_{t-1} - \beta_t k_t^\top(k_t M_{t-1} - v_t)`, which removes
        :math:`\beta_t(1-\alpha_t)k_t^\top k_t M_{t-1}` more of the old state along :math:`k_t` than
        Gated DeltaNet (it decays that part and also erases it undecayed). This form was ``gate=True``
        until ``True`` came to mean Gated DeltaNet.
      the rest: as :func:`linear_attention` (``chunk`` tokens per chunk of the chunkwise path).
    """
    if gate not in (False, True, "gated_deltanet", "titans"):
        raise ValueError(f"gate must be False, True, 'gated_deltanet' or 'titans', got {gate!r}")
    decay = "gated_deltanet" if gate in (True, "gated_deltanet") else "titans"
    return _memory_model(
        vocab, d_model, n_layers, heads, mlp_hidden, rngs, objective="l2", lr=1.0, gate=bool(gate),
        decay=decay, chunk=chunk, path=path, stop_write_grad=stop_write_grad,
    )  # fmt: skip


def minibatch_delta(
    *, vocab: int, d_model: int, n_layers: int = 2, heads: int = 2,
    memory: Literal["linear", "mlp"] = "linear", mlp_hidden: int | None = None,
    memory_hidden: int | None = None, lr: float | None = None, chunk: int = 16, path: str = "chunk",
    stop_write_grad: bool = False, rngs: nnx.Rngs,
) -> SequenceModel:  # fmt: skip
    r"""The mini-batch delta rule: a memory trained by gradient descent on ½‖f(k) − v‖², per block.

    Every gradient of a block of ``chunk`` tokens is taken at the state that opened the block, and token
    :math:`i` reads :math:`M_0 - \sum_{j \le i}\eta_j\nabla\ell_j(M_0)`; ``memory="linear"``:
    :math:`f(k) = kW`, ``"mlp"``: :math:`f(k) = k + \mathrm{silu}(kW_1)W_2`; L2-normalised queries and keys;
    ``lr`` defaults to 1.0 (linear) and 0.1 (MLP). This is what ``ttt_linear`` / ``ttt_mlp`` computed
    before they became Sun et al.'s TTT layer: TTT's mini-batch gradient descent without its inner
    LayerNorm and residual and without its token-index scale (see :func:`ttt_linear`).
    """
    if memory not in ("linear", "mlp"):
        raise ValueError(f"memory must be 'linear' or 'mlp', got {memory!r}")
    lr = (1.0 if memory == "linear" else 0.1) if lr is None else lr
    return _memory_model(
        vocab, d_model, n_layers, heads, mlp_hidden, rngs, memory=memory, hidden=memory_hidden,
        objective="l2", online=False, lr=lr, gate=False, chunk=chunk, path=path,
        stop_write_grad=stop_write_grad,
    )  # fmt: skip


def _ttt_model(vocab, d_model, n_layers, heads, mlp_hidden, rngs, **ttt) -> SequenceModel:
    mixer = lambda d, r: TTTLayer(d, heads=heads, rngs=r, **ttt)  # noqa: E731
    return _model(vocab, d_model, n_layers, mixer, mlp_hidden, rngs)


def ttt_linear(
    *, vocab: int, d_model: int, n_layers: int = 2, heads: int = 2, mlp_hidden: int | None = None,
    lr: float = 1.0, chunk: int = 16, layer_norm: bool = True, token_scale: bool = True, path: str = "chunk",
    stop_write_grad: bool = False, rngs: nnx.Rngs,
) -> SequenceModel:  # fmt: skip
    r"""TTT-linear (Sun et al. 2024): an inner model :math:`f(x) = x + \mathrm{LN}(xW + c)` trained in context.

    Mini-batch gradient descent over blocks of ``chunk`` tokens (16 in the paper), gradients at the block
    start, the inner step of token :math:`i` of a block scaled by a learnable :math:`s_i` (initialised
    :math:`1/i`); see :class:`~nestlearn.nn.TTTLayer`. ``layer_norm=False`` / ``token_scale=False`` are
    ablations; the plain mini-batch delta rule is :func:`minibatch_delta`.
    """
    return _ttt_model(
        vocab, d_model, n_layers, heads, mlp_hidden, rngs, memory="linear", lr=lr, block=chunk,
        layer_norm=layer_norm, token_scale=token_scale, path=path, stop_write_grad=stop_write_grad,
    )  # fmt: skip


def ttt_mlp(
    *, vocab: int, d_model: int, n_layers: int = 2, heads: int = 2, mlp_hidden: int | None = None,
    memory_hidden: int | None = None, lr: float = 0.1, chunk: int = 16, layer_norm: bool = True,
    token_scale: bool = True, path: str = "chunk", stop_write_grad: bool = False, rngs: nnx.Rngs,
) -> SequenceModel:  # fmt: skip
    r"""TTT-MLP (Sun et al. 2024): :math:`f(x) = x + \mathrm{LN}(\mathrm{gelu}(xW_1 + c_1)W_2 + c_2)` in context.

    As :func:`ttt_linear` with a two-layer inner MLP (``memory_hidden``, default ``4 * d_head``) and base
    rate 0.1 (the paper's).
    """
    return _ttt_model(
        vocab, d_model, n_layers, heads, mlp_hidden, rngs, memory="mlp", hidden=memory_hidden, lr=lr,
        block=chunk, layer_norm=layer_norm, token_scale=token_scale, path=path,
        stop_write_grad=stop_write_grad,
    )  # fmt: skip


def titans(
    *, vocab: int, d_model: int, n_layers: int = 2, heads: int = 2, mlp_hidden: int | None = None,
    memory_hidden: int | None = None, lr: float = 0.1, chunk: int = 16, path: str = "chunk",
    stop_write_grad: bool = False, rngs: nnx.Rngs,
) -> SequenceModel:  # fmt: skip
    r"""Titans' neural memory as the mixer: an MLP memory with surprise momentum and a forgetting gate.

    :math:`S_t = \beta_t S_{t-1} - \eta_t\nabla\ell_t`, :math:`M_t = \alpha_t M_{t-1} + S_t`, all three rates
    from the input; gradients per chunk of ``chunk`` tokens. Behrouz et al. 2024 (the memory alone, used
    as a layer: Titans' "MAL" arrangement without its attention branch).
    """
    return _memory_model(
        vocab, d_model, n_layers, heads, mlp_hidden, rngs, memory="mlp", hidden=memory_hidden,
        objective="l2", online=False, momentum=True, lr=lr, gate=True, chunk=chunk, path=path,
        stop_write_grad=stop_write_grad,
    )  # fmt: skip


def self_modifying_titans(
    *, vocab: int, d_model: int, n_layers: int = 2, heads: int = 2, mlp_hidden: int | None = None,
    memory_hidden: int | None = None, lr: float = 0.1, momentum: bool = False, chunk: int = 16,
    path: str = "chunk", stop_write_grad: bool = False, inner: str = "dgd", main_target: str = "self",
    normalize_values: bool = False, rngs: nnx.Rngs,
) -> SequenceModel:  # fmt: skip
    """Self-modifying Titans (:class:`SelfModifyingMemory`) with an MLP channel (Behrouz et al. 2025).

    ``inner`` (``"dgd"``, the paper's, or ``"gd"``), ``main_target`` (``"self"`` or ``"v"``) and
    ``normalize_values`` are :class:`SelfModifyingMemory`'s; ``momentum=True`` needs ``inner="gd"``.
    """
    mixer = lambda d, r: SelfModifyingMemory(  # noqa: E731
        d, heads=heads, hidden=memory_hidden, chunk=chunk, momentum=momentum, lr=lr,
        stop_write_grad=stop_write_grad, inner=inner, main_target=main_target,
        normalize_values=normalize_values, path=path, rngs=r,
    )  # fmt: skip
    return _model(vocab, d_model, n_layers, mixer, mlp_hidden, rngs)


def hope(
    *, vocab: int, d_model: int, n_layers: int = 2, heads: int = 2, cms: str | None = "context",
    cms_levels: int | None = None, cms_periods: tuple[int, ...] | None = None, cms_hidden: int | None = None,
    cms_lr: float = 0.1, memory_hidden: int | None = None, lr: float = 0.1, momentum: bool = False,
    chunk: int = 16, path: str = "chunk", stop_write_grad: bool = False, inner: str = "dgd",
    main_target: str = "self", normalize_values: bool = False, rngs: nnx.Rngs,
) -> SequenceModel:  # fmt: skip
    """HOPE: self-modifying Titans followed by a Continuum Memory System (Behrouz et al. 2025, Nested Learning).

    The mixer's ``inner``, ``main_target`` and ``normalize_values`` are as in :func:`self_modifying_titans`
    (DGD and a self-generated main target by default, as the paper's HOPE).

    ``cms`` picks the CMS (:func:`nestlearn.nn._seq.cms_channel`):

    - ``"context"`` (default, as the paper describes it): a :class:`~nestlearn.nn.ContextCMS`, block ``l``
      learning from the input's tokens every ``cms_periods[l]`` tokens (default 16, 64, 256), inside a
      sequence and at test time, with base inner rate ``cms_lr``;
    - ``"optimizer"``: the optimizer-level CMS, a :class:`~nestlearn.nn.CMSChannel` of ``cms_levels``
      blocks that change only between batches: train with :func:`nestlearn.nn.cms_optimizer` so block
      ``l`` steps every ``C(l)`` optimizer steps;
    - ``None``: :func:`self_modifying_titans` (a plain MLP channel).

    The model streams: :meth:`SequenceModel.apply` carries the memories and the CMS across calls.
    """
    channel = cms_channel(cms, d_model, levels=cms_levels, periods=cms_periods, hidden=cms_hidden, lr=cms_lr)
    return SequenceModel(
        vocab=vocab,
        d_model=d_model,
        n_layers=n_layers,
        mixer=lambda d, r: SelfModifyingMemory(
            d,
            heads=heads,
            hidden=memory_hidden,
            chunk=chunk,
            momentum=momentum,
            lr=lr,
            stop_write_grad=stop_write_grad,
            inner=inner,
            main_target=main_target,
            normalize_values=normalize_values,
            path=path,
            rngs=r,
        ),  # fmt: skip
        channel=channel,
        rngs=rngs,
    )


def state_size(model: SequenceModel, length: int) -> int:
    """Floats of recurrent state the model carries per sequence after ``length`` tokens, over all layers.

    A matrix memory holds ``heads * d_head^2`` (plus as much momentum), an MLP memory its two weight
    matrices per head, self-modifying Titans five MLP memories, a TTT layer its inner model's weights and
    biases twice (the block-start weights and the block's running gradient sum, both needed between two
    tokens of a block; its int position is not counted), and each short convolution its last
    inputs; softmax attention's state is its key-value
    cache, ``2 * length * d_model``, which grows with the sequence (Zoology's convention for the x axis
    of recall against state size).
    """
    total = 0
    for layer in model.layers:
        mixer = layer.mixer
        if isinstance(mixer, AssociativeMemory | SelfModifyingMemory):
            state = mixer.init_state(1)
            memories = (
                [state.memory]
                if isinstance(mixer, AssociativeMemory)
                else [state.memory[n] for n in MEMORIES]
            )
            per = sum(w[0].size for m in memories for w in m.weights)
            total += per * (2 if mixer.spec.momentum else 1)
            total += 0 if state.tail is None else state.tail[0].size
        elif isinstance(mixer, TTTLayer):
            state = mixer.init_state(1)
            total += sum(w[0].size for w in (*state.memory.weights, *state.memory.grad_sum))
            total += 0 if state.tail is None else state.tail[0].size
        elif isinstance(mixer, CausalAttention):
            total += 2 * length * mixer.query.in_features
        else:
            raise ValueError(f"state_size does not know the mixer {type(mixer).__name__}")
    return int(total)
