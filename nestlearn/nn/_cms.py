"""The Continuum Memory System as an MLP: a chain (or a bank) of MLP blocks, each block its own level.

The model only fixes the computation; what makes it a CMS is the optimizer, which updates block ``l``
once every ``C(l)`` steps by the sum of that chunk's gradients (:func:`cms_optimizer`, built on
:func:`nestlearn.optim.period_schedule`). The nested variant adds a learner rule on top (each block's
initial state meta-learned by the slower level and reset after each of its contexts); it lives in
``nestlearn.continual.nested_cms`` because it changes parameters between optimizer steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
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
    labels them ``"io"`` (updated every step by :func:`cms_optimizer` unless told otherwise).

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
    io_period: jax.typing.ArrayLike = 1,
    use_grad_mean: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""The CMS update rule for a :class:`CMSMLP`: block :math:`\ell` steps once every :math:`C(\ell)` steps.

    .. math::
      \theta_\ell \leftarrow \theta_\ell + \mathrm{inner}\Big(\sum_{s=t-C(\ell)+1}^{t} g_s\Big)
      \quad\text{when } (t+1) \bmod C(\ell) = 0,

    each block with its own copy of ``inner``'s state; the embedding, head and aggregate (label ``"io"``)
    step every ``io_period`` steps. ``periods = (1, ..., 1)`` switches CMS off: every group then runs
    ``inner`` every step, which is ``inner`` on the whole model (bit for bit for stateless-per-leaf
    optimizers such as SGD, momentum and Adam). Periods may be traced (``optax.inject_hyperparams``),
    so a sweep over them is one program. Built on :func:`nestlearn.optim.period_schedule`
    (``optax.partition`` of ``periodic`` groups) with :func:`cms_labels`.

    Args:
      inner: the optimizer every group runs (each group keeps its own state).
      periods: one period per block, fastest block first (ints >= 1, or traced arrays).
      io_period: keyword-only; the period of the non-block parameters (default 1).
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
    labels = [block_label(i) for i in range(len(periods))] + [IO_LABEL]
    return period_schedule(
        {label: inner for label in labels},
        dict(zip(labels, (*periods, io_period))),
        cms_labels,
        use_grad_mean=use_grad_mean,
    )


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


def level_num_updates(opt_state, periods: Sequence[int], *, io_period: int = 1) -> dict[str, jax.Array]:
    r"""Updates applied by each level of a :func:`cms_optimizer` state: :math:`\lfloor t / C(\ell) \rfloor`.

    Args:
      opt_state: the state of :func:`cms_optimizer` (possibly wrapped, see :func:`level_steps`).
      periods: the blocks' periods given to :func:`cms_optimizer`.
      io_period: keyword-only; the ``io`` group's period.

    Returns:
      ``{label: int32 number of updates}``.

    Example:
      >>> params = nnx.split(CMSMLP(2, 4, 2, levels=2, rngs=nnx.Rngs(0)))[1]
      >>> tx = cms_optimizer(optax.sgd(0.1), (1, 3)); s = tx.init(params)
      >>> for _ in range(7):
      ...   _, s = tx.update(params, s, params)
      >>> {k: int(v) for k, v in level_num_updates(s, (1, 3)).items()}
      {'block0': 7, 'block1': 2, 'io': 7}
    """
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
