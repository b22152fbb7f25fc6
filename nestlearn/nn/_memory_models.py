"""The memory models on one footing: each a :class:`SequenceModel` whose mixer is an associative memory.

Every constructor returns a causal sequence model with an embedding, ``n_layers`` pre-norm blocks (mixer,
then a position-wise channel) and a head. They differ only in the mixer's :class:`MemorySpec` and gates:

============================  ========  =========  =========  ========  ======  ===========
model                          memory    objective  gradient   lr        gate    momentum
============================  ========  =========  =========  ========  ======  ===========
``linear_attention``           matrix    dot        (n/a)      1         no*     no
``deltanet``                   matrix    l2         per token  input     no*     no
``ttt_linear``                 matrix    l2         chunk      input     no      no
``ttt_mlp``                    MLP       l2         chunk      input     no      no
``titans``                     MLP       l2         chunk      input     input   input
``self_modifying_titans``      MLP x 5   l2         chunk      memory    memory  optional
``hope``                       as above, followed by a CMS channel
============================  ========  =========  =========  ========  ======  ===========

(* ``gate=True`` gives the gated variants: gated linear attention / RetNet-style decay, Gated DeltaNet.)
The Transformer and HOPE-attention references live in :mod:`nestlearn.nn._seq`. ``path`` switches every
memory between the chunkwise and the per-token computation (same numbers); ``stop_write_grad`` stops the
outer gradient at the in-context writes.
"""

from __future__ import annotations

from flax import nnx

from nestlearn.nn._assoc import AssociativeMemory
from nestlearn.nn._attention import CausalAttention
from nestlearn.nn._selfmod import MEMORIES, SelfModifyingMemory
from nestlearn.nn._seq import CMSChannel, MLPChannel, SequenceModel


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
    *, vocab: int, d_model: int, n_layers: int = 2, heads: int = 2, gate: bool = False,
    mlp_hidden: int | None = None, chunk: int = 64, path: str = "chunk", stop_write_grad: bool = False,
    rngs: nnx.Rngs,
) -> SequenceModel:  # fmt: skip
    r"""DeltaNet: :math:`M_t = \alpha_t M_{t-1} - \beta_t k_t^\top(k_t M_{t-1} - v_t)` with :math:`\beta_t` from the input.

    Schlag et al. 2021; Yang et al. 2024 (chunkwise training); ``gate=True`` is Gated DeltaNet's decay.
    """
    return _memory_model(
        vocab, d_model, n_layers, heads, mlp_hidden, rngs, objective="l2", lr=1.0, gate=gate, chunk=chunk,
        path=path, stop_write_grad=stop_write_grad,
    )  # fmt: skip


def ttt_linear(
    *, vocab: int, d_model: int, n_layers: int = 2, heads: int = 2, mlp_hidden: int | None = None,
    chunk: int = 16, path: str = "chunk", stop_write_grad: bool = False, rngs: nnx.Rngs,
) -> SequenceModel:  # fmt: skip
    """TTT-linear: a matrix memory trained by mini-batch gradient descent on the L2 loss, blocks of ``chunk``.

    Sun et al. 2024 (mini-batch size 16 in the paper; the dual form computes a block in parallel).
    """
    return _memory_model(
        vocab, d_model, n_layers, heads, mlp_hidden, rngs, objective="l2", online=False, lr=1.0, gate=False,
        chunk=chunk, path=path, stop_write_grad=stop_write_grad,
    )  # fmt: skip


def ttt_mlp(
    *, vocab: int, d_model: int, n_layers: int = 2, heads: int = 2, mlp_hidden: int | None = None,
    memory_hidden: int | None = None, lr: float = 0.1, chunk: int = 16, path: str = "chunk",
    stop_write_grad: bool = False, rngs: nnx.Rngs,
) -> SequenceModel:  # fmt: skip
    """TTT-MLP: a residual two-layer MLP memory trained by mini-batch gradient descent (Sun et al. 2024)."""
    return _memory_model(
        vocab, d_model, n_layers, heads, mlp_hidden, rngs, memory="mlp", hidden=memory_hidden,
        objective="l2", online=False, lr=lr, gate=False, chunk=chunk, path=path,
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
    *, vocab: int, d_model: int, n_layers: int = 2, heads: int = 2, cms_levels: int = 3,
    cms_hidden: int | None = None, memory_hidden: int | None = None, lr: float = 0.1, momentum: bool = False,
    chunk: int = 16, path: str = "chunk", stop_write_grad: bool = False, inner: str = "dgd",
    main_target: str = "self", normalize_values: bool = False, rngs: nnx.Rngs,
) -> SequenceModel:  # fmt: skip
    """HOPE: self-modifying Titans followed by a Continuum Memory System (a :class:`CMSChannel`).

    The mixer's ``inner``, ``main_target`` and ``normalize_values`` are as in :func:`self_modifying_titans`
    (DGD and a self-generated main target by default, as the paper's HOPE).

    Train with :func:`nestlearn.nn.cms_optimizer` so CMS block ``l`` steps every ``C(l)`` steps; the CMS
    switched off is :func:`self_modifying_titans` (a plain MLP channel), or periods all 1. Behrouz et al.
    2025, Nested Learning.
    """
    hidden = 4 * d_model if cms_hidden is None else cms_hidden
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
        channel=lambda d, r: CMSChannel(d, hidden, cms_levels, rngs=r),
        rngs=rngs,
    )


def state_size(model: SequenceModel, length: int) -> int:
    """Floats of recurrent state the model carries per sequence after ``length`` tokens, over all layers.

    A matrix memory holds ``heads * d_head^2`` (plus as much momentum), an MLP memory its two weight
    matrices per head, self-modifying Titans five MLP memories, and each short convolution its last
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
        elif isinstance(mixer, CausalAttention):
            total += 2 * length * mixer.query.in_features
        else:
            raise ValueError(f"state_size does not know the mixer {type(mixer).__name__}")
    return int(total)
