"""The Continuum Memory System as an MLP: a chain (or a bank) of MLP blocks, each block its own level.

The model only fixes the computation; what makes it a CMS is the optimizer, which updates block ``l``
once every ``C(l)`` steps by the sum of that chunk's gradients (:func:`cms_optimizer`, built on
:func:`nestlearn.optim.period_schedule`). The nested variant adds a learner rule on top (each block's
initial state meta-learned by the slower level and reset after each of its contexts); it lives in
``nestlearn.continual.nested_cms`` because it changes parameters between optimizer steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float

from nestlearn.optim import period_schedule

VARIANTS = ("sequential", "independent", "nested")
IO_LABEL = "io"


def block_label(index: int) -> str:
    """The label of block ``index`` in :func:`cms_labels` (``"block0"`` is the first block)."""
    return f"block{index}"


class CMSBlock(nnx.Module):
    """One CMS level: a two-layer ReLU MLP ``width -> hidden -> width``, ``f(h) = W_2 relu(W_1 h + b_1) + b_2``.

    Args:
      width: input and output features.
      hidden: features of the inner layer.
      rngs: random streams for the parameters.
    """

    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs) -> None:
        self.up = nnx.Linear(width, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, width, rngs=rngs)

    def __call__(self, h: Float[Array, "batch width"]) -> tuple[Float[Array, "batch width"], Array]:
        """The block's output ``f(h)`` and its inner ReLU activations."""
        inner = jax.nn.relu(self.up(h))
        return self.down(inner), inner


class CMSMLP(nnx.Module):
    r"""An MLP whose middle is a Continuum Memory System: ``levels`` MLP blocks, one per update frequency.

    ``x -> h_0 = relu(E x) -> CMS -> logits = H h_L``, with blocks :math:`f_\ell` (:class:`CMSBlock`):

    - ``"sequential"`` (and ``"nested"``, the same computation): the blocks in a chain,
      :math:`h_{\ell+1} = h_\ell + f_\ell(h_\ell)` (``residual=True``) or
      :math:`h_{\ell+1} = \mathrm{relu}(f_\ell(h_\ell))` (``residual=False``);
    - ``"independent"``: the blocks in parallel on :math:`h_0`, combined by learned aggregate weights
      :math:`a` (a parameter, initialised to :math:`1/L`):
      :math:`h_L = h_0 + \sum_\ell a_\ell f_\ell(h_0)` (residual) or
      :math:`h_L = \sum_\ell a_\ell\,\mathrm{relu}(f_\ell(h_0))` (plain).

    So with one block, ``residual=False`` and :math:`a = 1`, every variant is the plain
    ``nn.MLP(din, (width, hidden, width), dout)`` with the same weights. The ``"nested"`` variant differs
    in how it learns, not in what it computes: pair it with ``continual.nested_cms`` (each block's
    initial state meta-learned by the next slower block and reset after each of that block's periods).
    The embedding ``E``, the head ``H`` and the aggregate ``a`` are not CMS levels; :func:`cms_labels`
    labels them ``"io"`` (updated with the slowest block by :func:`cms_optimizer` unless told otherwise).

    Args:
      din: input features.
      width: features between blocks (the CMS's model width).
      dout: output units (logits).
      levels: number of CMS blocks (>= 1), fastest first by the convention of :func:`cms_optimizer`.
      hidden: inner width of each block (default ``width``).
      variant: ``"sequential"``, ``"independent"`` or ``"nested"``.
      residual: keyword-only; residual blocks (default) or a plain chain.
      rngs: random streams for the parameters.

    Example:
      >>> model = CMSMLP(784, 64, 10, levels=3, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 784))).shape
      (2, 10)

    References:
      Behrouz et al., Nested Learning: The Illusion of Deep Learning Architectures, 2025 (the Continuum
      Memory System and its sequential, independent and nested variants).
    """

    def __init__(
        self,
        din: int,
        width: int,
        dout: int,
        *,
        levels: int,
        hidden: int | None = None,
        variant: str = "sequential",
        residual: bool = True,
        rngs: nnx.Rngs,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
            raise ValueError(f"levels must be an int >= 1, got {levels!r}")
        for name, value in (("din", din), ("width", width), ("dout", dout), ("hidden", hidden or width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.variant = variant
        self.residual = residual
        self.embed = nnx.Linear(din, width, rngs=rngs)
        self.blocks = nnx.List([CMSBlock(width, hidden or width, rngs=rngs) for _ in range(levels)])
        self.head = nnx.Linear(width, dout, rngs=rngs)
        if variant == "independent":
            self.mix = nnx.Param(jnp.full((levels,), 1.0 / levels, jnp.float32))

    def __call__(self, x: Float[Array, "batch din"]) -> Float[Array, "batch dout"]:
        return self.features(x)[0]

    def features(self, x: Float[Array, "batch din"]) -> tuple[Float[Array, "batch dout"], tuple[Array, ...]]:
        """The logits and the ReLU activations: the embedding's, then each block's inner layer, in order.

        Plasticity measures (dead units, effective rank) and the CKA telemetry read these.
        """
        h0 = jax.nn.relu(self.embed(x))
        hidden = [h0]
        if self.variant == "independent":
            outs = []
            for block in self.blocks:
                f, inner = block(h0)
                outs.append(f if self.residual else jax.nn.relu(f))
                hidden.append(inner)
            mixed = jnp.einsum("l,lbw->bw", self.mix[...], jnp.stack(outs))
            h = h0 + mixed if self.residual else mixed
        else:
            h = h0
            for block in self.blocks:
                f, inner = block(h)
                h = h + f if self.residual else jax.nn.relu(f)
                hidden.append(inner)
        return self.head(h), tuple(hidden)


def cms_labels(params) -> object:
    """The CMS level of every parameter: ``"block<l>"`` for block ``l``'s, ``"io"`` for the rest.

    Works on any parameter pytree whose paths name ``blocks`` then an index (``CMSMLP``'s ``nnx.State``,
    or a plain dict ``{"blocks": {0: ...}}``); the result has the parameters' structure, ready as
    ``param_labels`` of :func:`nestlearn.optim.period_schedule`.

    Example:
      >>> params = nnx.split(CMSMLP(4, 8, 2, levels=2, rngs=nnx.Rngs(0)))[1]
      >>> sorted(set(jax.tree.leaves(cms_labels(params))))
      ['block0', 'block1', 'io']
    """

    def label(path, _):
        keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
        for a, b in zip(keys[:-1], keys[1:]):
            if a == "blocks":
                return block_label(int(b))
        return IO_LABEL

    return jax.tree_util.tree_map_with_path(label, params)


def cms_optimizer(
    inner: optax.GradientTransformation,
    periods: Sequence[jax.typing.ArrayLike],
    *,
    io_period: jax.typing.ArrayLike | None = None,
    use_grad_mean: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""The optimizer-level CMS: block :math:`\ell` steps once every :math:`C(\ell)` outer optimizer steps.

    .. math::
      \theta_\ell \leftarrow \theta_\ell + \mathrm{inner}\Big(\sum_{s=t-C(\ell)+1}^{t} g_s\Big)
      \quad\text{when } (t+1) \bmod C(\ell) = 0,

    each block with its own copy of ``inner``'s state; the embedding, head and aggregate (label ``"io"``)
    step every ``io_period`` steps, by default the slowest period :math:`\max_\ell C(\ell)`: the paper
    puts embeddings and output projections in the slowest level (choice: ``io_period=1``, the fastest,
    was this function's default before; pass it to keep that).

    This is the *optimizer-level CMS*: the blocks change between training batches only, so inside a
    sequence and at test time they are a fixed MLP chain. The paper's CMS learns from the tokens of the
    input every :math:`C(\ell)` tokens: :class:`ContextCMS` (the two can be combined). ``periods = (1, ..., 1)`` switches CMS off: every group then runs
    ``inner`` every step, which is ``inner`` on the whole model (bit for bit for stateless-per-leaf
    optimizers such as SGD, momentum and Adam). Periods may be traced (``optax.inject_hyperparams``),
    so a sweep over them is one program. Built on :func:`nestlearn.optim.period_schedule`
    (``optax.partition`` of ``periodic`` groups) with :func:`cms_labels`.

    Args:
      inner: the optimizer every group runs (each group keeps its own state).
      periods: one period per block, fastest block first (ints >= 1, or traced arrays).
      io_period: keyword-only; the period of the non-block parameters (default ``max(periods)``; with
        traced periods, their traced maximum).
      use_grad_mean: keyword-only; apply each chunk's mean gradient instead of its sum (the paper's rule).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` over the model's parameters.

    Example:
      >>> tx = cms_optimizer(optax.sgd(0.01), (1, 4, 16))

    References:
      Behrouz et al., Nested Learning, 2025 (CMS: block l changes every C(l) steps by the sum of its
      chunk's gradients).
    """
    periods = tuple(periods)
    if not periods:
        raise ValueError("periods must name one period per CMS block, got an empty sequence")
    io_period = _slowest(periods) if io_period is None else io_period
    labels = [block_label(i) for i in range(len(periods))] + [IO_LABEL]
    return period_schedule(
        {label: inner for label in labels},
        dict(zip(labels, (*periods, io_period))),
        cms_labels,
        use_grad_mean=use_grad_mean,
    )


def _slowest(periods: Sequence[jax.typing.ArrayLike]) -> jax.typing.ArrayLike:
    """``max(periods)``: a Python int when every period is one, else a (possibly traced) array."""
    if all(isinstance(p, int) for p in periods):
        return max(periods)
    return functools.reduce(jnp.maximum, periods)


# -- per-level telemetry ---------------------------------------------------------------------------


def _groups(params) -> dict[str, list]:
    """Leaves of ``params`` grouped by their :func:`cms_labels` label, in leaf order."""
    groups: dict[str, list] = {}
    for label, leaf in zip(jax.tree.leaves(cms_labels(params)), jax.tree.leaves(params)):
        groups.setdefault(label, []).append(leaf)
    return groups


def level_steps(opt_state) -> dict[str, jax.Array]:
    """Steps seen by each group of a :func:`cms_optimizer` state (its ``periodic`` counter).

    Args:
      opt_state: the state of :func:`cms_optimizer`, possibly inside ``optax.inject_hyperparams`` or a
        chain; the first ``optax.PartitionState`` found is read.

    Returns:
      ``{label: int32 steps seen}``; :func:`level_num_updates` turns them into updates applied.
    """
    partition = _find_partition(opt_state)
    return {
        str(label): jax.tree.leaves(masked.inner_state.count)[0]
        for label, masked in partition.inner_states.items()
    }


def level_num_updates(
    opt_state, periods: Sequence[int], *, io_period: int | None = None
) -> dict[str, jax.Array]:
    r"""Updates applied by each level of a :func:`cms_optimizer` state: :math:`\lfloor t / C(\ell) \rfloor`.

    Args:
      opt_state: the state of :func:`cms_optimizer` (possibly wrapped, see :func:`level_steps`).
      periods: the blocks' periods given to :func:`cms_optimizer`.
      io_period: keyword-only; the ``io`` group's period (default ``max(periods)``, as in
        :func:`cms_optimizer`).

    Returns:
      ``{label: int32 number of updates}``.

    Example:
      >>> params = nnx.split(CMSMLP(2, 4, 2, levels=2, rngs=nnx.Rngs(0)))[1]
      >>> tx = cms_optimizer(optax.sgd(0.1), (1, 3)); s = tx.init(params)
      >>> for _ in range(7):
      ...   _, s = tx.update(params, s, params)
      >>> {k: int(v) for k, v in level_num_updates(s, (1, 3)).items()}
      {'block0': 7, 'block1': 2, 'io': 2}
    """
    io_period = _slowest(tuple(periods)) if io_period is None else io_period
    steps = level_steps(opt_state)
    table = {block_label(i): p for i, p in enumerate(periods)} | {IO_LABEL: io_period}
    return {label: t // jnp.asarray(table[label], t.dtype) for label, t in steps.items()}


def _find_partition(opt_state):
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.PartitionState))
        if isinstance(s, optax.PartitionState)
    ]
    if not found:
        raise ValueError(
            f"opt_state holds no optax.PartitionState (is it a cms_optimizer state?), got {type(opt_state).__name__}"
        )
    return found[0]


def level_update_norms(before, after) -> dict[str, jax.Array]:
    r"""How far each level moved: :math:`\|\theta_\ell^{\text{after}} - \theta_\ell^{\text{before}}\|_2` per label.

    The norm is over all of the level's parameters flattened together (kernels and biases). Call it with
    the parameters at the start and end of a task for the per-task update norm of every level.

    Args:
      before: parameters (a :class:`CMSMLP`'s ``nnx.State``).
      after: parameters of the same structure.

    Returns:
      ``{label: float norm}`` (``"block<l>"`` and ``"io"``).
    """
    g0, g1 = _groups(before), _groups(after)
    return {
        label: jnp.sqrt(sum(jnp.sum(jnp.square(b - a)) for a, b in zip(g0[label], g1[label]))) for label in g0
    }


def block_cosine(params) -> jax.Array:
    r"""Cosine similarity between every pair of blocks' flattened weights, an ``[L, L]`` matrix.

    :math:`S_{ij} = \langle w_i, w_j\rangle / (\|w_i\|\,\|w_j\|)` with :math:`w_\ell` the concatenation
    of block :math:`\ell`'s parameters (in leaf order: ``down`` bias and kernel, ``up`` bias and kernel).
    All blocks of a :class:`CMSMLP` have the same shapes, so the vectors align entry by entry.

    Args:
      params: a :class:`CMSMLP`'s parameters.

    Returns:
      float ``[levels, levels]``, ones on the diagonal.
    """
    groups = _groups(params)
    blocks = sorted((k for k in groups if k != IO_LABEL), key=lambda k: int(k.removeprefix("block")))
    w = jnp.stack([jnp.concatenate([jnp.ravel(x) for x in groups[k]]) for k in blocks])
    w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
    return w @ w.T


def linear_cka(x: Float[Array, "n d1"], y: Float[Array, "n d2"]) -> jax.Array:
    r"""Linear centred kernel alignment of two representations of the same ``n`` examples.

    With column-centred :math:`X, Y`:
    :math:`\mathrm{CKA}(X, Y) = \|Y^\top X\|_F^2 / (\|X^\top X\|_F\,\|Y^\top Y\|_F)`, in [0, 1],
    invariant to rotations and isotropic scaling of either representation.

    Args:
      x: ``[n, d1]`` activations.
      y: ``[n, d2]`` activations.

    Returns:
      A float scalar (0 when either representation is constant).

    References:
      Kornblith et al., Similarity of Neural Network Representations Revisited, 2019.
    """
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    num = jnp.sum(jnp.square(y.T @ x))
    den = jnp.linalg.norm(x.T @ x) * jnp.linalg.norm(y.T @ y)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def block_cka(hidden: Sequence[Array]) -> jax.Array:
    """Linear CKA between every pair of blocks' inner activations, ``[L, L]``.

    Args:
      hidden: the activations :meth:`CMSMLP.features` returns on a probe batch (the embedding's first,
        then one per block); the embedding's are skipped.

    Returns:
      float ``[levels, levels]``.
    """
    acts = list(hidden)[1:]
    return jnp.stack([jnp.stack([linear_cka(a, b) for b in acts]) for a in acts])


# -- in-context CMS (blocks that learn from the tokens of the input) -------------------------------

Theta = tuple[
    Array, Array, Array, Array
]  # one block's weights (w1, b1, w2, b2), each with a leading batch axis


def block_forward(theta: Theta, h: Float[Array, "batch n d"]) -> Float[Array, "batch n d"]:
    r"""One CMS block with per-sequence weights: :math:`f(\theta; h) = W_2\,\mathrm{gelu}(W_1 h + b_1) + b_2`.

    ``theta = (w1 [B, d, hidden], b1 [B, hidden], w2 [B, hidden, d], b2 [B, d])``, one copy per sequence.
    """
    w1, b1, w2, b2 = theta
    u = jnp.einsum("bnd,bdh->bnh", h, w1) + b1[:, None, :]
    return jnp.einsum("bnh,bhd->bnd", jax.nn.gelu(u), w2) + b2[:, None, :]


def next_step_loss(
    pred: Float[Array, "batch n d"], key: Float[Array, "batch n d"], value: Float[Array, "batch n d"]
) -> Float[Array, "batch n"]:
    r"""The default inner error signal: block :math:`\ell` predicts its next input, per token ``[batch, n]``.

    .. math::
      \ell_t(\theta) = \tfrac12\,\big\|\,h_{t-1} + f(\theta; h_{t-1}) - h_t\,\big\|^2,

    with :math:`h_t` the block's input at token :math:`t`: ``key`` holds :math:`h_{t-1}`, ``pred`` the
    block's residual map at it, :math:`h_{t-1} + f(\theta; h_{t-1})`, and ``value`` :math:`h_t`. The
    residual map :math:`h \mapsto h + f(h)` learns, from the stream itself, to carry a token's
    representation toward the next one's.
    """
    del key
    err = pred - value
    return 0.5 * jnp.sum(err * err, axis=-1)


class ContextCMSState(flax.struct.PyTreeNode):
    """What an in-context CMS carries from one token (or call) to the next, for a batch of sequences.

    Attributes:
      params: per level, the block's current weights ``(w1, b1, w2, b2)``, each with a leading batch axis.
      grads: per level, the sum of the inner gradients since the level's last update (same structure).
      prev: ``[batch, levels, d]``, each block's input at the last token seen (the key of the next pair).
      pos: int32 scalar, tokens seen so far (the same for every sequence of the batch).
    """

    params: tuple[Theta, ...]
    grads: tuple[Theta, ...]
    prev: Array
    pos: Array


class ContextCMS(nnx.Module):
    r"""The in-context Continuum Memory System: a chain of MLP blocks that learn from the tokens of the input.

    A channel (position-wise part) of a sequence block. Block :math:`\ell` (:func:`block_forward`) has
    per-sequence weights :math:`\theta^{(\ell)}`, initialised from meta-learned parameters and updated
    every :math:`C(\ell)` tokens by the sum of an inner error signal over that chunk (Eqs. 30-31 of the
    NeurIPS text):

    .. math::
      h_{0,t} = x_t,\quad h_{\ell+1,t} = h_{\ell,t} + f(\theta^{(\ell)}_t; h_{\ell,t}),\quad y_t = h_{L,t} - x_t,

      \theta^{(\ell)} \leftarrow \theta^{(\ell)} - \eta_\ell \sum_{t \in \text{chunk}}
      \nabla_\theta\, \ell_t(\theta^{(\ell)})
      \quad\text{after every token } t \text{ with } (t+1) \bmod C(\ell) = 0 .

    Within a chunk the weights are constant, so a token's output depends only on earlier tokens (the
    weights it sees were updated from chunks that ended before it) and the forward over a chunk is
    parallel over its tokens. The computation is a ``lax.scan`` over sub-chunks of
    :math:`g = \gcd_\ell C(\ell)` tokens; level :math:`\ell` accumulates its sub-chunk gradients
    (taken at its constant weights, so their sum is the chunk's sum) and applies them when its period
    divides the position (chunks are aligned to the sequence's start). Per sub-chunk and level, one
    pass of the block over the sub-chunk (and the carried last input) serves both the output and,
    through its pullback, the inner gradient. The outer optimizer trains the initial weights (and the
    rates) through these updates, a second-order gradient. :meth:`apply` carries :class:`ContextCMSState` across calls: one call on a sequence, calls
    on any pieces of it, or one call per token give the same outputs and state.

    Choices the paper leaves open:

    - *inner error signal*: choice: :func:`next_step_loss`, block :math:`\ell`'s residual map predicts
      the block's input at the next token from the one at this token,
      :math:`\tfrac12\|h_{\ell,t-1} + f(h_{\ell,t-1}) - h_{\ell,t}\|^2` (the first token of a sequence
      has no pair), because it is local (no backward pass through the rest of the model, so each level
      learns at test time from the stream alone), self-supervised (needs no labels), causal, and is
      the representation-space analogue of the next-token objective the model is trained on. Pass
      ``inner_loss(pred, key, value) -> [batch, n]`` to use another loss of the residual map's output
      ``pred = key + f(key)`` on the same pairs (the gradient reaches the weights through ``pred``).
    - *inner rates*: choice: one rate per level, :math:`\eta_\ell = \exp(\text{log\_lr}_\ell)`, an
      ``nnx.Param`` the outer optimizer learns (unconstrained in log space), initialised to
      :math:`\mathrm{lr} / (C(\ell)\, d)` (default ``lr = 0.1``): divided by :math:`C(\ell)` because
      the update is the chunk's *sum* (as in the paper), which grows with the period, and by the width
      :math:`d` because the channel's inputs are layer-normalised (squared norm about :math:`d`) and a
      delta-rule step is stable only for :math:`\eta\|h\|^2 < 2` (the normalised-LMS scaling). Larger
      rates diverge, as any delta rule does (``lr = 0.5`` with periods of one token at ``d = 32`` did on
      random inputs; ``lr = 0.2`` did not). ``lr`` as a sequence gives each :math:`\eta_\ell` directly; ``learn_lr=False`` keeps the
      rates fixed.
    - *periods*: fastest first; ``(1, ..., 1)`` updates every block after every token.

    The blocks' initial weights live under ``blocks[l]`` (``up``, ``down``, as in :class:`CMSChannel`),
    so with rates 0 the channel computes what :class:`CMSChannel` with the same weights does, and
    :func:`cms_labels` labels them ``"block<l>"``.

    Args:
      d_model: features in and out.
      hidden: inner width of every block.
      periods: the update period :math:`C(\ell)` of each block in tokens, fastest first (ints >= 1).
      lr: keyword-only; the base inner rate, scaled per level as above, or the rates themselves (one per
        level).
      learn_lr: keyword-only; make the rates outer-learned parameters (default) or constants.
      inner_loss: keyword-only; the per-token inner loss (default :func:`next_step_loss`).
      rngs: random streams for the parameters.

    Example:
      >>> cms = ContextCMS(8, 16, (2, 4), rngs=nnx.Rngs(0))
      >>> x = jnp.ones((3, 10, 8))
      >>> y, state = cms.apply(x, cms.init_state(3))
      >>> y.shape, int(state.pos)
      ((3, 10, 8), 10)

    References:
      Behrouz et al., Nested Learning: The Illusion of Deep Learning Architectures, NeurIPS 2025
      (Eqs. 30-31: CMS blocks updated from the input's tokens every C(l) tokens).
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        periods: Sequence[int],
        *,
        lr: float | Sequence[float] = 0.1,
        learn_lr: bool = True,
        inner_loss=None,
        rngs: nnx.Rngs,
    ) -> None:
        for name, value in (("d_model", d_model), ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        periods = tuple(periods) if isinstance(periods, Sequence) else periods
        if (
            not isinstance(periods, tuple)
            or not periods
            or any(not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in periods)
        ):
            raise ValueError(f"periods must be a non-empty sequence of ints >= 1, got {periods!r}")
        if isinstance(lr, Sequence):
            rates = tuple(float(r) for r in lr)
            if len(rates) != len(periods):
                raise ValueError(f"lr must be one float or one per level ({len(periods)}), got {lr!r}")
        else:
            rates = tuple(float(lr) / (p * d_model) for p in periods)
        if any(not math.isfinite(r) or r < 0 for r in rates):
            raise ValueError(f"lr must be finite and >= 0, got {lr!r}")
        if inner_loss is not None and not callable(inner_loss):
            raise ValueError(
                f"inner_loss must be a function (theta, key, value) -> [batch, n], got {inner_loss!r}"
            )
        self.d_model, self.periods = d_model, periods
        self.sub = math.gcd(*periods)
        self.inner_loss = next_step_loss if inner_loss is None else inner_loss
        self.blocks = nnx.List([_Block(d_model, hidden, rngs=rngs) for _ in periods])
        with np.errstate(divide="ignore"):
            log_lr = np.log(np.asarray(rates, np.float32))
        self.learn_lr = learn_lr
        self.log_lr = nnx.Param(jnp.asarray(log_lr)) if learn_lr else nnx.Variable(jnp.asarray(log_lr))

    @property
    def levels(self) -> int:
        return len(self.periods)

    def rates(self) -> Float[Array, " levels"]:
        r"""The inner rates :math:`\eta_\ell`, one per level."""
        return jnp.exp(self.log_lr[...])

    def init_state(self, batch: int) -> ContextCMSState:
        """Every block reset to its meta-learned initial weights, for ``batch`` sequences, at position 0."""
        params = tuple(
            tuple(jnp.broadcast_to(w, (batch, *w.shape)) for w in blk.weights()) for blk in self.blocks
        )
        grads = jax.tree.map(jnp.zeros_like, params)
        prev = jnp.zeros((batch, self.levels, self.d_model), jnp.float32)
        return ContextCMSState(params, grads, prev, jnp.zeros((), jnp.int32))

    def __call__(self, x: Float[Array, "batch T d"]) -> Float[Array, "batch T d"]:
        return self.apply(x)[0]

    def apply(
        self, x: Float[Array, "batch T d"], state: ContextCMSState | None = None
    ) -> tuple[Float[Array, "batch T d"], ContextCMSState]:
        """Read and learn from a piece of the stream, starting from ``state`` (default: a reset at position 0).

        Returns ``(y, state)``: the blocks' summed contribution ``h_L - x`` at every token (the sequence
        block adds its own residual) and the state after the piece.
        """
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [batch, T, {self.d_model}], got shape {x.shape}")
        b, t, d = x.shape
        g = self.sub
        fresh = state is None
        state = self.init_state(b) if fresh else state
        # Lay the piece on the grid of sub-chunks aligned to absolute positions: pad `off` tokens on
        # the left (the part of the current sub-chunk already seen) and fill the last one on the right.
        off = jnp.zeros((), jnp.int32) if fresh else state.pos % g
        n = -(-t // g) if fresh else -(-(t + g - 1) // g)
        buf = jax.lax.dynamic_update_slice(jnp.zeros((b, n * g, d), x.dtype), x, (0, off, 0))
        idx = jnp.arange(n * g, dtype=jnp.int32)
        valid = (idx >= off) & (idx < off + t)
        base = state.pos - off
        ends = base + g * jnp.arange(1, n + 1, dtype=jnp.int32)
        xs = (jnp.swapaxes(buf.reshape(b, n, g, d), 0, 1), valid.reshape(n, g), ends)
        carry = (state.params, state.grads, state.prev)
        (params, grads, prev), ys = jax.lax.scan(self._subchunk, carry, xs)
        y = jnp.swapaxes(ys, 0, 1).reshape(b, n * g, d)
        y = jax.lax.dynamic_slice(y, (0, off, 0), (b, t, d))
        return y, ContextCMSState(params, grads, prev, state.pos + t)

    def _subchunk(self, carry, inputs):
        params, grads, prev = carry
        x, valid, end = inputs  # [B, g, d], [g] bool, int32: the absolute position after the sub-chunk
        g = x.shape[1]
        pos = end - g + jnp.arange(g, dtype=jnp.int32)
        pair = (valid & (pos > 0)).astype(x.dtype)
        after_pad = jnp.concatenate([jnp.zeros((1,), bool), valid[:-1]])  # token t-1 is in this call
        last = jnp.max(jnp.where(valid, jnp.arange(g, dtype=jnp.int32), -1))
        complete = valid[-1]  # the sub-chunk's last token is in this call: its boundary is reached
        rates = self.rates()
        h = x
        new_params, new_grads, new_prev = [], [], []
        for level, period in enumerate(self.periods):
            theta, before = params[level], prev[:, level]
            # One pass of the block over [before, h_0 .. h_{g-1}]: rows 1.. are the outputs f(h_t), and
            # the key of token t's pair is h_{t-1} (row t) or, after left padding, the carried input
            # (row 0). Its pullback gives level l's gradient summed over the sub-chunk's pairs, at the
            # level's (constant) current weights; each sequence's weights get only their own tokens'.
            rows = jnp.concatenate([before[:, None], h], axis=1)
            out, pullback = jax.vjp(lambda th, rows=rows: block_forward(th, rows), theta)
            use_row = after_pad[None, :, None]
            key = jnp.where(use_row, rows[:, :-1], before[:, None])
            f_key = jnp.where(use_row, out[:, :-1], out[:, :1])
            loss = lambda f, key=key, value=h: jnp.sum(self.inner_loss(key + f, key, value) * pair[None])  # noqa: E731
            d_f = jax.grad(loss)(f_key)
            d_out = jnp.concatenate([jnp.where(use_row, d_f, 0.0), jnp.zeros_like(d_f[:, :1])], axis=1)
            d_out = d_out.at[:, 0].add(jnp.sum(jnp.where(use_row, 0.0, d_f), axis=1))
            acc = jax.tree.map(jnp.add, grads[level], pullback(d_out)[0])
            new_prev.append(jnp.where(last >= 0, h[:, jnp.maximum(last, 0)], before))
            h = h + out[:, 1:]
            # At the boundary: one step with the chunk's summed gradient, then start a new sum.
            step = complete & (end % period == 0)
            eta = jnp.where(step, rates[level], 0.0)
            new_params.append(jax.tree.map(lambda w, a, eta=eta: w - eta * a, theta, acc))
            new_grads.append(jax.tree.map(lambda a, step=step: jnp.where(step, jnp.zeros_like(a), a), acc))
        return (tuple(new_params), tuple(new_grads), jnp.stack(new_prev, axis=1)), h - x


class _Block(nnx.Module):
    """A CMS block's meta-learned initial weights: ``up`` (``d -> hidden``) and ``down`` (``hidden -> d``)."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs) -> None:
        self.up = nnx.Linear(d_model, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, d_model, rngs=rngs)

    def weights(self) -> Theta:
        return (self.up.kernel[...], self.up.bias[...], self.down.kernel[...], self.down.bias[...])
