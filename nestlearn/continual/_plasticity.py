"""Strategies against loss of plasticity: shrink-and-perturb, weight interpolation, continual backprop.

Each is a final strategy of the engine's contract (:class:`~nestlearn.continual.Strategy`): it changes
the parameters in ``after_step`` or ``end_task``, all jittable and vmappable with static shapes.
:class:`ContinualBackprop` reads the hidden activations from ``ctx.features`` and the parameter layout of
:class:`nestlearn.nn.MLP` (``params["layers"][i]["kernel"]`` of shape ``[in, out]`` and ``["bias"]``).
"""

from __future__ import annotations

from typing import ClassVar, final

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from nestlearn.continual._strategy import Batch, Context, Params, Strategy
from nestlearn.tasks._stream import TaskStream


def _perturbed(params: Params, shrink, noise, key: PRNGKeyArray) -> Params:
    """``shrink * p + noise * eps`` for every parameter array ``p``, ``eps ~ N(0, 1)`` of its own."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = [
        jnp.asarray(shrink, x.dtype) * x
        + jnp.asarray(noise, x.dtype) * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys)
    ]
    return jax.tree.unflatten(treedef, out)


@final
@flax.struct.dataclass
class ShrinkAndPerturb(Strategy):
    """Shrink-and-perturb (Ash & Adams 2020): scale every parameter down and add Gaussian noise.

    .. math::
      \\theta \\leftarrow \\lambda\\,\\theta + \\sigma\\,\\varepsilon, \\qquad \\varepsilon \\sim
      \\mathcal{N}(0, I)

    applied to every parameter array (weights and biases), with unit-variance noise scaled by ``noise``
    alone (not by each layer's initialisation scale, so ``noise`` is in the units of the weights). With
    ``every == 0`` it is applied once at the end of every task (Ash & Adams' warm-starting setting);
    with ``every > 0`` after every ``every``-th optimizer step of the run (global steps ``every``,
    ``2 * every``, ...; a jittable mask on the step counter, no Python branch on traced values), the
    per-step form Dohare et al. 2024 compare against continual backprop.

    Attributes:
      shrink: the factor :math:`\\lambda` (1 keeps the weights' scale).
      noise: the noise standard deviation :math:`\\sigma`.
      every: 0 for task ends, else the period in optimizer steps (static).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> s = ShrinkAndPerturb(shrink=0.5, noise=0.0)
      >>> ctx = Context(stream=None, task=jnp.int32(0), step=jnp.int32(9), key=jax.random.key(0),
      ...               apply=lambda p, x: x)
      >>> s.end_task((), {"w": jnp.array([2.0, -4.0])}, ctx)[1]["w"]
      Array([ 1., -2.], dtype=float32)

    References:
      J. Ash and R. P. Adams, "On Warm-Starting Neural Network Training", NeurIPS 2020.
    """

    strength: ClassVar[str] = "shrink"  # the hyperparameter a stability-plasticity sweep varies

    shrink: float
    noise: float
    every: int = flax.struct.field(pytree_node=False, default=0)

    def after_step(
        self, state: PyTree, params: Params, grads: Params, batch: Batch, ctx: Context
    ) -> tuple[PyTree, Params]:
        del grads, batch
        if self.every <= 0:
            return state, params
        due = (ctx.step + 1) % self.every == 0  # ctx.step counts the steps before this one
        new = _perturbed(params, self.shrink, self.noise, ctx.key)
        return state, jax.tree.map(lambda p, q: jnp.where(due, q, p), params, new)

    def end_task(self, state: PyTree, params: Params, ctx: Context) -> tuple[PyTree, Params]:
        if self.every > 0:
            return state, params
        return state, _perturbed(params, self.shrink, self.noise, ctx.key)


@final
@flax.struct.dataclass
class WeightInterpolation(Strategy):
    """Interpolates, at the end of every task after the first, between the weights before and after it.

    .. math::
      \\theta \\leftarrow \\alpha\\,\\theta_{\\text{old}} + (1 - \\alpha)\\,\\theta

    with :math:`\\theta_{\\text{old}}` the parameters at the start of the task (remembered in
    ``begin_task``). ``alpha = 0`` is fine-tuning; ``alpha = 1`` undoes each task's training. The first
    task is left alone: its :math:`\\theta_{\\text{old}}` is the random initialisation, not a solution
    worth keeping. This is model averaging between consecutive task solutions, as in WiSE-FT's
    interpolation between a pre-trained and a fine-tuned model (Wortsman et al. 2022) and in continual
    learning with weight interpolation (Kozal et al. 2024, which also permutes units to align the two
    models first; not done here; Stojanovski et al. 2022 interpolate towards a momentum average
    instead).

    Attributes:
      alpha: weight of the old parameters, in ``[0, 1]``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> s = WeightInterpolation(alpha=0.25)
      >>> ctx = Context(stream=None, task=jnp.int32(1), step=jnp.int32(0), key=jax.random.key(0),
      ...               apply=lambda p, x: x)
      >>> old = s.begin_task(None, {"w": jnp.array([1.0])}, ctx)
      >>> s.end_task(old, {"w": jnp.array([5.0])}, ctx)[1]["w"]  # 0.25 * 1 + 0.75 * 5
      Array([4.], dtype=float32)

    References:
      M. Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022.
      J. Kozal, J. Wasilewski, B. Krawczyk, M. Woźniak, "Continual Learning with Weight
      Interpolation", CVPR Workshops 2024.
      Z. Stojanovski, K. Roth, Z. Akata, "Momentum-based Weight Interpolation of Neural Networks for
      Continual Learning", 2022.
    """

    strength: ClassVar[str] = "alpha"  # the hyperparameter a stability-plasticity sweep varies

    alpha: float

    def init(self, params: Params, stream: TaskStream) -> Params:
        del stream
        return jax.tree.map(jnp.asarray, params)

    def begin_task(self, state: Params, params: Params, ctx: Context) -> Params:
        del state, ctx
        return jax.tree.map(jnp.asarray, params)

    def end_task(self, state: Params, params: Params, ctx: Context) -> tuple[Params, Params]:
        def mix(old, new):
            a = jnp.asarray(self.alpha, new.dtype)
            return jnp.where(ctx.task > 0, a * old + (1 - a) * new, new)

        return state, jax.tree.map(mix, state, params)


# -- continual backprop -------------------------------------------------------------------------------


@flax.struct.dataclass
class ContinualBackpropState:
    """Per hidden layer of an MLP: each unit's running utility and age, and the replacement accumulator.

    Attributes:
      utility: one ``[units]`` float32 array per hidden layer, the running contribution utility.
      age: one ``[units]`` int32 array per hidden layer, steps since the unit was (re-)initialised.
      to_replace: ``[hidden layers]`` float32, the fractional number of units owed for replacement.
    """

    utility: tuple[Float[Array, " units"], ...]
    age: tuple[Int[Array, " units"], ...]
    to_replace: Float[Array, " layers"]


def _layer_array(params: Params, layer: int, name: str) -> Array:
    return jnp.asarray(params["layers"][layer][name][...])


def _with_layer_arrays(params: Params, new: dict[tuple[int, str], Array]) -> Params:
    """``params`` with ``params["layers"][i][name]`` replaced by ``new[(i, name)]`` (same structure)."""

    def pick(path, leaf):
        keys = tuple(getattr(k, "key", None) for k in path[:3])
        if len(keys) == 3 and keys[0] == "layers" and (keys[1], keys[2]) in new:
            return new[(keys[1], keys[2])].astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(pick, params)


@final
@flax.struct.dataclass
class ContinualBackprop(Strategy):
    """Continual backprop (Dohare et al. 2024): keep re-initialising the least useful hidden units.

    For every hidden unit :math:`j` of every hidden layer, after each optimizer step:

    .. math::
      u_j \\leftarrow \\eta\\,u_j + (1 - \\eta)\\,\\overline{|h_j|}\\sum_k |w_{jk}|, \\qquad
      a_j \\leftarrow a_j + 1

    with :math:`\\overline{|h_j|}` the unit's absolute activation averaged over the step's batch
    (weighted by ``batch.weight`` if any; recomputed with the updated parameters through
    ``ctx.features``), :math:`w_{jk}` its outgoing weights and :math:`\\eta` = ``decay``. This is the plain
    *contribution utility* of the Nature paper, not the mean-corrected, input-weight-normalised utility
    of the earlier preprint. Per layer, an accumulator :math:`r \\leftarrow r + \\rho\\,|\\{j : a_j >
    m\\}|` (``replacement_rate`` :math:`\\rho`, ``maturity`` :math:`m`) owes :math:`\\lfloor r \\rfloor`
    replacements: that many mature units of lowest utility (ties: lower index first) are replaced and
    :math:`r` drops by :math:`\\lfloor r \\rfloor`. A replaced unit gets fresh incoming weights drawn from
    :math:`U(\\pm 1/\\sqrt{\\text{fan\\_in}})` (``nn.MLP(init="torch")``'s distribution; with the default
    LeCun init the fresh units are drawn differently from the originals), a zero bias and zero outgoing
    weights, so a fresh unit adds nothing to the output until its outgoing weights have learned; its
    utility and age restart at 0. (Where a unit of the next layer is replaced in the same step, its
    fresh incoming weight from a replaced unit is zero as well.) Units are chosen with a rank mask
    (argsort), so shapes are static under ``jit`` and ``vmap``. Layers are processed input to output.

    Optimizer state is not touched (the engine does not pass it to strategies), so with momentum or Adam
    a replaced unit keeps its old moments; Dohare et al. reset them. Plain SGD is unaffected.

    Attributes:
      replacement_rate: :math:`\\rho`, units replaced per mature unit per step (paper: 1e-6 to 1e-2).
      decay: :math:`\\eta`, the utility's decay rate (paper: 0.99).
      maturity: :math:`m`, steps a unit is protected after (re-)initialisation (static; paper: 100).

    Example:
      >>> from flax import nnx
      >>> from nestlearn import nn
      >>> params = nnx.split(nn.MLP(4, (8, 6), 2, init="torch", rngs=nnx.Rngs(0)))[1]
      >>> state = ContinualBackprop(replacement_rate=1e-3).init(params, None)
      >>> [u.shape for u in state.utility]
      [(8,), (6,)]

    References:
      S. Dohare, J. F. Hernandez-Garcia, Q. Lan, P. Rahman, A. R. Mahmood, R. S. Sutton, "Loss of
      plasticity in deep continual learning", Nature 632, 768-774, 2024.
    """

    strength: ClassVar[str] = "replacement_rate"  # the hyperparameter a stability-plasticity sweep varies

    replacement_rate: float = 1e-4
    decay: float = 0.99
    maturity: int = flax.struct.field(pytree_node=False, default=100)

    def init(self, params: Params, stream: TaskStream | None) -> ContinualBackpropState:
        del stream
        n_layers = len(params["layers"])
        widths = [_layer_array(params, i, "kernel").shape[1] for i in range(n_layers - 1)]
        return ContinualBackpropState(
            utility=tuple(jnp.zeros((w,), jnp.float32) for w in widths),
            age=tuple(jnp.zeros((w,), jnp.int32) for w in widths),
            to_replace=jnp.zeros((len(widths),), jnp.float32),
        )

    def after_step(
        self, state: ContinualBackpropState, params: Params, grads: Params, batch: Batch, ctx: Context
    ) -> tuple[ContinualBackpropState, Params]:
        del grads
        if ctx.features is None:
            raise ValueError("ContinualBackprop needs a model with a features method (nn.MLP)")
        _, hidden = ctx.features(params, batch.x)
        return self.replace_units(state, params, hidden, batch.weight, ctx.key)

    def replace_units(
        self,
        state: ContinualBackpropState,
        params: Params,
        hidden: tuple[Float[Array, "b units"], ...],
        weight: Float[Array, " b"] | None,
        key: PRNGKeyArray,
    ) -> tuple[ContinualBackpropState, Params]:
        """One step of utility update and replacement, given the hidden activations of a batch."""
        keys = jax.random.split(key, max(len(hidden), 1))
        arrays: dict[tuple[int, str], Array] = {}

        def get(i, name):
            return arrays[(i, name)] if (i, name) in arrays else _layer_array(params, i, name)

        utilities, ages, owed = [], [], []
        prev_replace = None
        for i, h in enumerate(hidden):
            w_in, b_in, w_out = get(i, "kernel"), get(i, "bias"), get(i + 1, "kernel")
            abs_h = jnp.abs(h).astype(jnp.float32)
            if weight is None:
                mean_h = abs_h.mean(0)
            else:
                w = weight.astype(jnp.float32)
                weighted = jnp.where(
                    w[:, None] > 0, abs_h * w[:, None], 0.0
                )  # placeholders count for nothing
                mean_h = weighted.sum(0) / jnp.maximum(w.sum(), 1e-12)
            contribution = mean_h * jnp.abs(w_out).astype(jnp.float32).sum(1)
            decay = jnp.asarray(self.decay, jnp.float32)
            u = decay * state.utility[i] + (1 - decay) * contribution
            age = state.age[i] + 1
            mature = age > self.maturity
            acc = state.to_replace[i] + jnp.asarray(self.replacement_rate, jnp.float32) * mature.sum().astype(
                jnp.float32
            )
            n_replace = jnp.floor(acc)
            rank = jnp.argsort(jnp.argsort(jnp.where(mature, u, jnp.inf)))
            replace = mature & (rank < n_replace.astype(jnp.int32))
            fan_in = w_in.shape[0]
            bound = 1.0 / fan_in**0.5
            fresh = jax.random.uniform(keys[i], w_in.shape, jnp.float32, -bound, bound)
            if prev_replace is not None:  # outgoing weights of units replaced below stay zero
                fresh = jnp.where(prev_replace[:, None], 0.0, fresh)
            prev_replace = replace
            arrays[(i, "kernel")] = jnp.where(replace[None, :], fresh.astype(w_in.dtype), w_in)
            arrays[(i, "bias")] = jnp.where(replace, jnp.zeros_like(b_in), b_in)
            arrays[(i + 1, "kernel")] = jnp.where(replace[:, None], jnp.zeros_like(w_out), w_out)
            utilities.append(jnp.where(replace, 0.0, u))
            ages.append(jnp.where(replace, 0, age))
            owed.append(acc - n_replace)
        new_state = ContinualBackpropState(
            utility=tuple(utilities),
            age=tuple(ages),
            to_replace=jnp.stack(owed) if owed else state.to_replace,
        )
        return new_state, _with_layer_arrays(params, arrays)
