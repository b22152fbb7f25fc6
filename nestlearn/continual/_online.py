"""Online learning on a stream of single examples: the loss-of-plasticity setting of Dohare et al. 2024.

A one-hidden-layer ReLU network learns the slowly-changing regression stream by SGD, one example per
step, with an optional plasticity strategy (continual backprop, shrink-and-perturb) acting after every
step. One bin of steps runs on :class:`nestlearn.engine.Engine` (``lax.scan`` in one compiled program,
called once per bin; seeds a ``vmap`` axis). Nothing loops over steps in Python.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from nestlearn._errors import ConfigError
from nestlearn.continual._strategy import Batch, Context, Naive, Params, Strategy
from nestlearn.engine import Checkpoints, Engine, check_seeds, compile_once, run_chunks, run_keys
from nestlearn.metrics._plasticity import dead_unit_fraction, weight_magnitude
from nestlearn.nn._mlp import MLP
from nestlearn.tasks._plasticity import RegressionState, SlowlyChangingRegression


@dataclasses.dataclass(frozen=True)
class OnlineResult:
    """Per-bin measures of online runs, one row per seed (numpy arrays).

    Attributes:
      error: ``[seed, bin]`` squared error :math:`(\\hat y - y)^2` of each step's example, measured before
        the step's update (online error), averaged over the bin.
      dead_fraction: ``[seed, bin]`` fraction of hidden units that were zero on every example of the bin
        (:func:`~nestlearn.metrics._plasticity.dead_unit_fraction` of the bin's activations).
      weight_magnitude: ``[seed, bin]`` mean absolute parameter value at the end of the bin.
      bin_end: ``[bin]`` steps taken at the end of each bin.
      seeds: the seed of each row.
      diverged_step: ``[seed]`` the first step whose error was not finite (``-1``: none); a diverged run is
        frozen from there and its later bins are NaN.
    """

    error: np.ndarray
    dead_fraction: np.ndarray
    weight_magnitude: np.ndarray
    bin_end: np.ndarray
    seeds: tuple[int, ...]
    diverged_step: np.ndarray | None = None


class _Carry(flax.struct.PyTreeNode):
    params: Params
    opt_state: optax.OptState
    strategy_state: PyTree
    problem: RegressionState
    key: PRNGKeyArray
    step: Int[Array, ""]
    diverged_step: Int[Array, ""]


def run_online_regression(
    problem: SlowlyChangingRegression,
    strategy: Strategy | None = None,
    *,
    hidden: int = 5,
    lr: float = 0.01,
    steps: int = 10_000,
    seeds: Sequence[int] = (0,),
    bin: int = 1_000,
    progress: bool | None = False,
    checkpoints: Checkpoints | None = None,
) -> OnlineResult:
    """Trains a ``n_inputs -> hidden -> 1`` ReLU network online on ``problem``, one example per step.

    Each step draws the next example of the seed's stream, takes one SGD step on
    :math:`(\\hat y - y)^2` (plus the strategy's ``penalty``, through its ``transform_grads``) and then
    calls the strategy's ``after_step``. The network is ``nn.MLP(problem.n_inputs, (hidden,), 1,
    init="torch")``, whose initial distribution is the one continual backprop re-initialises from. The
    strategy's ``begin_task`` runs once before the first step and ``end_task`` never: the stream has no
    task boundaries the learner is told about, so only strategies that act in ``after_step`` do anything
    (``ShrinkAndPerturb`` needs ``every > 0``). Hooks receive a :class:`Context` whose ``stream`` is
    ``None`` (there is no task stream; ``ctx.logits`` and ``ctx.loss`` are unavailable), ``task`` 0, the
    global step, a fresh key, and the network's ``apply`` and ``features``; the :class:`Batch` holds the
    one example with a float32 target in ``y``.

    Dohare et al. 2024 train 5 hidden units with step sizes 0.01, 0.003 or 0.001 for millions of steps
    and average the error in bins of 20,000; the defaults here are small enough for a test.

    Args:
      problem: the stream's configuration.
      strategy: a plasticity strategy, or ``None`` for plain backprop.
      hidden: hidden units.
      lr: SGD step size.
      steps: steps per seed, a multiple of ``bin``.
      seeds: one run per seed (its stream, target network and initialisation).
      bin: steps per bin (and per compiled call).
      progress: report progress with an ETA after every bin (``None``: unless ``NESTLEARN_PROGRESS=0``).
      checkpoints: an :class:`nestlearn.engine.Checkpoints` (of this configuration only): after every bin
        the carry and the measures so far are saved as checkpoint ``bins done``, and a run that finds
        a checkpoint there continues from the latest one, ending with the same result as an
        uninterrupted run.

    Returns:
      An :class:`OnlineResult`.

    Example:
      >>> from nestlearn.tasks._plasticity import SlowlyChangingRegression
      >>> r = run_online_regression(SlowlyChangingRegression(), steps=2_000, bin=1_000)
      >>> r.error.shape
      (1, 2)
    """
    for name, value in (("hidden", hidden), ("steps", steps), ("bin", bin)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if steps % bin:
        raise ConfigError(f"steps ({steps}) must be a multiple of bin ({bin})")
    strategy = Naive() if strategy is None else strategy
    seeds = tuple(check_seeds(seeds))

    init, engine = _programs(problem, hidden, float(lr), bin, jax.tree.structure(strategy))
    keys = run_keys(seeds)
    n_bins = steps // bin
    latest = checkpoints.latest() if checkpoints is not None else None
    if latest is not None and not 0 < latest <= n_bins:
        raise ConfigError(f"checkpoint {latest} does not fit a run of {n_bins} bins")
    # One compiled bin per call on the engine's host loop (progress, checkpoint per bin, exact resume).
    carry, bins = run_chunks(
        engine,
        init(keys, strategy),
        strategy,
        n_chunks=n_bins,
        checkpoints=checkpoints,
        progress=progress,
        desc="online regression",
    )
    arrays = {k: np.stack([m[k] for m in bins], 1) for k in ("error", "dead_fraction", "weight_magnitude")}
    return OnlineResult(
        error=arrays["error"],
        dead_fraction=arrays["dead_fraction"],
        weight_magnitude=arrays["weight_magnitude"],
        bin_end=bin * np.arange(1, n_bins + 1, dtype=np.int64),
        seeds=seeds,
        diverged_step=np.asarray(carry.diverged_step),
    )


@functools.lru_cache(maxsize=16)
def _programs(problem: SlowlyChangingRegression, hidden: int, lr: float, bin: int, strategy_structure):
    """The compiled initialisation and bin of a configuration, kept so that a repeated run reuses them.

    ``strategy_structure`` (the strategy's class and static fields) keys the cache; the strategy itself,
    with its hyperparameters, is an argument of both programs.
    """
    del strategy_structure

    def model(rngs: nnx.Rngs) -> MLP:
        return MLP(problem.n_inputs, (hidden,), 1, init="torch", rngs=rngs)

    graphdef = nnx.split(jax.eval_shape(lambda: model(nnx.Rngs(0))))[0]
    optimizer = optax.sgd(lr)

    def apply(params: Params, x: Float[Array, "b d"]) -> Float[Array, "b 1"]:
        return nnx.merge(graphdef, params)(x)

    def features(params: Params, x: Float[Array, "b d"]):
        return nnx.merge(graphdef, params).features(x)

    def context(step, key) -> Context:
        return Context(
            stream=None, task=jnp.zeros((), jnp.int32), step=step, key=key, apply=apply, features=features
        )

    def init_one(key: PRNGKeyArray, strategy: Strategy) -> _Carry:
        k_problem, k_model, k_run = jax.random.split(key, 3)
        params = nnx.split(model(nnx.Rngs(k_model)))[1]
        step = jnp.zeros((), jnp.int32)
        sstate = strategy.init(params, None)
        sstate = strategy.begin_task(sstate, params, context(step, jax.random.fold_in(k_run, 1)))
        return _Carry(
            params=params,
            opt_state=optimizer.init(params),
            strategy_state=sstate,
            problem=problem.init(k_problem),
            key=jax.random.fold_in(k_run, 0),
            step=step,
            diverged_step=jnp.full((), -1, jnp.int32),
        )

    def one_step(carry: _Carry, strategy: Strategy):
        k_data, k_grad, k_after = jax.random.split(jax.random.fold_in(carry.key, carry.step), 3)
        x, y, problem_state = problem.sample(carry.problem, k_data)
        batch = Batch(x=x[None], y=y[None], task=jnp.zeros((1,), jnp.int32))
        sstate = carry.strategy_state
        ctx = context(carry.step, k_grad)

        def loss(params):
            out, hidden_acts = features(params, batch.x)
            err = jnp.square(out[:, 0] - batch.y).mean()
            return err + strategy.penalty(sstate, params, batch, ctx), (err, hidden_acts)

        (_, (err, hidden_acts)), grads = jax.value_and_grad(loss, has_aux=True)(carry.params)
        grads = strategy.transform_grads(sstate, carry.params, grads, batch, ctx)
        updates, opt_state = optimizer.update(grads, carry.opt_state, carry.params)
        params = optax.apply_updates(carry.params, updates)
        sstate, params = strategy.after_step(sstate, params, grads, batch, ctx.replace(key=k_after))
        new = carry.replace(params=params, opt_state=opt_state, strategy_state=sstate, problem=problem_state)
        return new, {"loss": err, "active": tuple(h[0] != 0 for h in hidden_acts)}

    def per_bin(metrics):
        dead = dead_unit_fraction(tuple(a.astype(jnp.float32) for a in metrics["active"]))
        return {"error": metrics["loss"].mean(), "dead_fraction": dead}

    def magnitude(carry: _Carry, strategy: Strategy):
        return {"weight_magnitude": weight_magnitude(carry.params)}

    # The engine runs a bin: the guarded step under lax.scan, seeds vmapped, the bin's measures reduced
    # inside the program; the strategy (its hyperparameters) is shared by every seed.
    engine = Engine(one_step, length=bin, in_axes=(None,), reduce=per_bin, evaluate=magnitude)
    init = compile_once(init_one, in_axes=(0, None))
    return init, engine
