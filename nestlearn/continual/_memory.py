"""Memory-based strategies: experience replay, A-GEM and DER++, over a reservoir buffer in device arrays.

The buffer is a pytree of fixed-size arrays and pure functions over it (:func:`reservoir_init`,
:func:`reservoir_add`, :func:`reservoir_sample`), so it lives in a strategy's state and runs under the
engine's ``scan`` over steps and ``vmap`` over runs. Rows that do not exist yet (an empty buffer) are
returned with weight 0, which the engine's weighted task loss ignores.
"""

from __future__ import annotations

from typing import ClassVar, final

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from nestlearn._errors import ConfigError
from nestlearn.continual._strategy import Batch, Context, Params, Strategy
from nestlearn.tasks._stream import TaskStream

# -- the reservoir buffer ---------------------------------------------------------------------------


@flax.struct.dataclass
class ReservoirBuffer:
    """A uniform sample of every example offered so far, of at most ``K`` examples.

    Attributes:
      x: stored inputs, ``[K, d]`` float32 (zeros in empty slots).
      y: stored targets, ``[K]`` int32.
      task: the task each stored example came from, ``[K]`` int32.
      logits: the model's outputs on each example when it was stored, ``[K, c]`` float32 (DER++), or
        ``None`` for a buffer without logits.
      seen: examples offered so far (int32 scalar); slots ``0 .. min(seen, K) - 1`` are filled.
    """

    x: Float[Array, "K d"]
    y: Int[Array, " K"]
    task: Int[Array, " K"]
    logits: Float[Array, "K c"] | None
    seen: Int[Array, ""]

    @property
    def capacity(self) -> int:
        return self.y.shape[0]

    @property
    def filled(self) -> Int[Array, ""]:
        """Number of filled slots, ``min(seen, K)``."""
        return jnp.minimum(self.seen, self.capacity)


def reservoir_init(
    capacity: int, d: int | tuple[int, ...], n_classes: int, *, with_logits: bool = False
) -> ReservoirBuffer:
    """An empty buffer of ``capacity`` examples with ``d`` features, or of shape ``d`` (a tuple, e.g. an
    image's ``(H, W, C)``), and ``n_classes`` logits if asked."""
    if capacity <= 0:
        raise ConfigError(f"buffer capacity must be a positive integer, got {capacity!r}")
    shape = tuple(d) if isinstance(d, tuple) else (d,)
    return ReservoirBuffer(
        x=jnp.zeros((capacity, *shape), jnp.float32),
        y=jnp.zeros((capacity,), jnp.int32),
        task=jnp.zeros((capacity,), jnp.int32),
        logits=jnp.zeros((capacity, n_classes), jnp.float32) if with_logits else None,
        seen=jnp.zeros((), jnp.int32),
    )


def reservoir_add(
    buffer: ReservoirBuffer,
    x: Float[Array, "b d"],
    y: Int[Array, " b"],
    task: Int[Array, " b"],
    key: PRNGKeyArray,
    logits: Float[Array, "b c"] | None = None,
    valid: Bool[Array, " b"] | None = None,
) -> ReservoirBuffer:
    """Offers a batch to the buffer, one example after another, by reservoir sampling (Algorithm R).

    Example number ``i`` (0-based, counting every example ever offered) goes to slot ``i`` while
    ``i < K``; after that a slot ``j ~ U{0, ..., i}`` is drawn and the example replaces slot ``j`` if
    ``j < K``, else it is dropped. After ``n >= K`` offers every example offered is in the buffer with
    probability ``K / n``, and the buffer holds a uniform sample without replacement of them.

    Args:
      buffer: the buffer.
      x, y, task: the batch (``x`` ``[b, d]``, ``y`` and ``task`` ``[b]``).
      key: a PRNG key (one draw per example, element ``i`` of ``randint(key, (b,), 0, n + 1)``).
      logits: ``[b, c]`` outputs to store with the examples; required iff the buffer has logits.
      valid: which examples are offered (``None``: all); the others are neither stored nor counted.

    Returns:
      The new buffer.

    Reference: Vitter, "Random sampling with a reservoir", ACM TOMS 1985.
    """
    if (logits is None) != (buffer.logits is None):
        raise ValueError("logits must be given exactly when the buffer stores logits")
    b = y.shape[0]
    valid = jnp.ones((b,), bool) if valid is None else valid
    k = buffer.capacity
    # Vectorised Algorithm R, equal to offering the examples one after another: example i of the batch is
    # offer number n_i = seen + (valid examples before it); it draws j_i ~ U{0, ..., n_i} (element i of
    # one randint call with per-element bounds) and goes to slot n_i if n_i < K, else to slot j_i if j_i < K. When two examples of the batch land in
    # the same slot the later one overwrites the earlier, so an example is written only if no later valid
    # example of the batch targets its slot; the surviving slots are distinct and one scatter writes them.
    count = valid.astype(jnp.int32)
    offer = buffer.seen + jnp.cumsum(count) - count
    drawn = jax.random.randint(key, (b,), 0, offer + 1, dtype=jnp.int32)  # element i: U{0, ..., n_i}
    slot = jnp.where(offer < k, offer, drawn)
    lands = valid & (slot < k)
    later = jnp.arange(b)[None, :] > jnp.arange(b)[:, None]
    overwritten = (later & lands[None, :] & (slot[None, :] == slot[:, None])).any(axis=1)
    slot = jnp.where(lands & ~overwritten, slot, k)  # index k is out of bounds: dropped by the scatter

    def put(store, value):
        return store.at[slot].set(value.astype(store.dtype), mode="drop", unique_indices=False)

    return buffer.replace(
        x=put(buffer.x, x),
        y=put(buffer.y, y),
        task=put(buffer.task, task),
        logits=None if logits is None else put(buffer.logits, logits),
        seen=buffer.seen + count.sum(),
    )


def reservoir_sample(
    buffer: ReservoirBuffer, key: PRNGKeyArray, n: int
) -> tuple[
    Float[Array, "n d"], Int[Array, " n"], Int[Array, " n"], Float[Array, "n c"] | None, Float[Array, " n"]
]:
    """``n`` examples drawn uniformly, with replacement, from the filled slots of the buffer.

    Returns:
      ``(x, y, task, logits, weight)``: ``logits`` is ``None`` for a buffer without logits; ``weight``
      is 1 for every row, or 0 for every row when the buffer is empty (the rows are then slot 0's zeros).
    """
    filled = buffer.filled
    idx = jax.random.randint(key, (n,), 0, jnp.maximum(filled, 1), dtype=jnp.int32)
    weight = jnp.broadcast_to((filled > 0).astype(jnp.float32), (n,))
    logits = None if buffer.logits is None else buffer.logits[idx]
    return buffer.x[idx], buffer.y[idx], buffer.task[idx], logits, weight


def _weighted_mean(values: Float[Array, " b"], weight: Float[Array, " b"]) -> Float[Array, ""]:
    return (values * weight).sum() / jnp.maximum(weight.sum(), 1e-12)


def _placeholder_labels(
    stream: TaskStream, y: Int[Array, " b"], task: Int[Array, " b"], weight: Float[Array, " b"]
) -> Int[Array, " b"]:
    """Targets of weight-0 rows replaced by a unit their task may use, so their (ignored) loss is finite.

    A masked unit's logit is ``-inf``; a target there would make the loss ``inf`` and ``0 * inf`` NaN.
    """
    allowed = jnp.argmax(stream.class_mask[task], axis=-1).astype(jnp.int32)
    return jnp.where(weight > 0, y, allowed)


# -- experience replay ------------------------------------------------------------------------------


@final
@flax.struct.dataclass
class Replay(Strategy):
    """Experience replay with a reservoir buffer over the whole stream.

    Each step trains on the engine's batch of ``B`` examples of the current task followed by
    ``replay_batch`` examples drawn uniformly (with replacement) from the buffer; the loss is the mean
    over all ``B + replay_batch`` rows. While the buffer is empty the replayed rows have weight 0, so the
    step equals plain fine-tuning. After each step the ``B`` new examples (the first rows of the batch,
    never the replayed ones) are offered to the buffer by reservoir sampling, so the buffer is a uniform
    sample of every example trained on so far.

    Attributes:
      buffer_size: examples the buffer holds (static).
      replay_batch: replayed examples per step (static); 0 means as many as the engine's batch.

    Example:
      >>> import optax
      >>> from nestlearn import continual, nn, tasks
      >>> stream = tasks.split_digits("task")
      >>> learner = continual.Learner(lambda rngs: nn.MLP(64, (32,), 10, rngs=rngs), optax.sgd(0.1),
      ...     continual.Replay(buffer_size=200), continual.TrainConfig(steps_per_task=20, batch_size=32))
      >>> learner.run(stream, seeds=[0]).acc_matrix.shape
      (1, 5, 5)

    Reference: Chaudhry et al., "On tiny episodic memories in continual learning", 2019.
    """

    buffer_size: int = flax.struct.field(pytree_node=False)
    replay_batch: int = flax.struct.field(pytree_node=False, default=0)

    def __post_init__(self):
        _check_sizes(self, buffer_size=self.buffer_size, replay_batch=(self.replay_batch, 0))

    def init(self, params: Params, stream: TaskStream) -> ReservoirBuffer:
        del params
        return reservoir_init(self.buffer_size, stream.input_shape, stream.n_classes)

    def _n_replay(self, b: int) -> int:
        return self.replay_batch or b

    def train_batch(self, state: ReservoirBuffer, batch: Batch, ctx: Context) -> Batch:
        b = batch.y.shape[0]
        x, y, task, _, w = reservoir_sample(state, ctx.key, self._n_replay(b))
        y = _placeholder_labels(ctx.stream, y, task, w)
        own = jnp.ones((b,), jnp.float32) if batch.weight is None else batch.weight
        return Batch(
            x=jnp.concatenate([batch.x, x]),
            y=jnp.concatenate([batch.y, y]),
            task=jnp.concatenate([batch.task, task]),
            weight=jnp.concatenate([own, w]),
        )

    def after_step(
        self, state: ReservoirBuffer, params: Params, grads: Params, batch: Batch, ctx: Context
    ) -> tuple[ReservoirBuffer, Params]:
        del grads
        total = batch.y.shape[0]
        b = total - self.replay_batch if self.replay_batch else total // 2  # the engine's rows come first
        valid = None if batch.weight is None else batch.weight[:b] > 0
        state = reservoir_add(state, batch.x[:b], batch.y[:b], batch.task[:b], ctx.key, valid=valid)
        return state, params


# -- A-GEM ------------------------------------------------------------------------------------------


@flax.struct.dataclass
class EpisodicMemory:
    """A-GEM's memory: ``per_task`` slots for each task, filled when the task ends.

    Attributes:
      x, y, task: stored examples, ``[T * per_task, ...]``; task ``t`` owns rows ``t * per_task ..``.
      valid: which rows hold an example, ``[T * per_task]`` bool.
    """

    x: Float[Array, "M d"]
    y: Int[Array, " M"]
    task: Int[Array, " M"]
    valid: Bool[Array, " M"]


def agem_project(grads: Params, ref_grads: Params) -> Params:
    """A-GEM's projection of the gradient ``g`` against the reference gradient ``g_ref``.

    .. math::
      \\tilde g = g - \\frac{g^\\top g_{ref}}{g_{ref}^\\top g_{ref}} g_{ref}
      \\quad\\text{if } g^\\top g_{ref} < 0, \\text{ else } g,

    with the dot products over the whole flattened pytree. The projected gradient then has
    ``g~ . g_ref = 0``: the step no longer increases the memory loss to first order. A zero ``g_ref``
    (empty memory) leaves ``g`` unchanged.
    """
    dot = optax.tree.vdot(grads, ref_grads)
    ref_sq = optax.tree.vdot(ref_grads, ref_grads)
    coeff = jnp.where(dot < 0, dot / jnp.maximum(ref_sq, jnp.finfo(jnp.float32).tiny), 0.0)
    return jax.tree.map(lambda g, r: g - (coeff * r).astype(g.dtype), grads, ref_grads)


@final
@flax.struct.dataclass
class AGEM(Strategy):
    """Averaged gradient episodic memory: never step against the loss on a memory of past tasks.

    Memory: ``memory_size // n_tasks`` slots per task (the remainder unused). When task ``t`` ends, its
    slots are filled with a uniformly random subset, without replacement, of its training examples (all
    of them if it has fewer). At every step, ``transform_grads`` draws a random subset of
    ``sample_size`` filled rows (the whole memory if it holds no more), takes the gradient ``g_ref`` of
    the task loss on it at the current parameters and projects the step's gradient with
    :func:`agem_project`. While the memory is empty (the first task) the gradient passes unchanged.

    Attributes:
      memory_size: total memory slots (static).
      sample_size: memory rows per reference gradient (static).

    Reference: Chaudhry et al., "Efficient lifelong learning with A-GEM", ICLR 2019.
    """

    memory_size: int = flax.struct.field(pytree_node=False)
    sample_size: int = flax.struct.field(pytree_node=False, default=256)

    def __post_init__(self):
        _check_sizes(self, memory_size=self.memory_size, sample_size=self.sample_size)

    def _per_task(self, n_tasks: int) -> int:
        per = self.memory_size // n_tasks
        if per == 0:
            raise ConfigError(
                f"AGEM memory_size ({self.memory_size}) must be at least the number of tasks ({n_tasks})"
            )
        return per

    def init(self, params: Params, stream: TaskStream) -> EpisodicMemory:
        del params
        m = self._per_task(stream.n_tasks) * stream.n_tasks
        return EpisodicMemory(
            x=jnp.zeros((m, *stream.input_shape), jnp.float32),
            y=jnp.zeros((m,), jnp.int32),
            task=jnp.zeros((m,), jnp.int32),
            valid=jnp.zeros((m,), bool),
        )

    def end_task(self, state: EpisodicMemory, params: Params, ctx: Context) -> tuple[EpisodicMemory, Params]:
        stream = ctx.stream
        per = self._per_task(stream.n_tasks)
        k = min(per, stream.max_train)  # slots beyond the pool's width stay empty
        n = stream.train_n[ctx.task]
        in_task = jnp.arange(stream.max_train) < n
        order = jnp.argsort(jnp.where(in_task, jax.random.uniform(ctx.key, (stream.max_train,)), 2.0))
        valid = jnp.arange(k) < n
        pos = jnp.where(valid, order[:k], 0).astype(jnp.int32)
        x, y = stream.train_examples(jnp.full((k,), ctx.task), pos)
        start = ctx.task * per

        def put(store, value):
            return jax.lax.dynamic_update_slice_in_dim(store, value.astype(store.dtype), start, axis=0)

        state = EpisodicMemory(
            x=put(state.x, x),
            y=put(state.y, y),
            task=put(state.task, jnp.full((k,), ctx.task)),
            valid=put(state.valid, valid),
        )
        return state, params

    def reference_batch(self, state: EpisodicMemory, ctx: Context) -> Batch:
        """The memory rows of one reference gradient: a uniform subset of the filled rows, weights 0/1."""
        s = min(self.sample_size, state.y.shape[0])
        score = jnp.where(state.valid, jax.random.uniform(ctx.key, state.valid.shape), -1.0)
        _, idx = jax.lax.top_k(score, s)
        w = state.valid[idx].astype(jnp.float32)
        task = state.task[idx]
        return Batch(
            x=state.x[idx], y=_placeholder_labels(ctx.stream, state.y[idx], task, w), task=task, weight=w
        )

    def transform_grads(
        self, state: EpisodicMemory, params: Params, grads: Params, batch: Batch, ctx: Context
    ) -> Params:
        del batch
        ref_grads = jax.grad(ctx.loss)(params, self.reference_batch(state, ctx))
        projected = agem_project(grads, ref_grads)
        any_memory = state.valid.any()
        return jax.tree.map(lambda p, g: jnp.where(any_memory, p, g), projected, grads)


# -- DER++ ------------------------------------------------------------------------------------------


@final
@flax.struct.dataclass
class DERPP(Strategy):
    """Dark experience replay++: match stored logits and labels of a reservoir buffer.

    .. math::
      \\text{penalty} = \\alpha\\, \\overline{\\lVert f_\\theta(x_1) - z_1 \\rVert^2 / c}
      + \\beta\\, \\overline{\\mathrm{CE}(f_\\theta(x_2), y_2)}

    for two independent samples ``(x_1, z_1)`` and ``(x_2, y_2)`` from the buffer (keys
    ``split(ctx.key)``, in that order), each of ``replay_batch`` rows; the squared error is over all
    ``c`` raw output units (no task mask), the cross-entropy over the units of the example's task.
    The penalty is 0 while the buffer is empty.

    Stored logits: the engine hands ``after_step`` the parameters after the update, not the forward
    pass of the step, so the logits stored with an example are ``f(x)`` under the parameters just
    after the step that trained on it (the paper stores those of the forward pass one update earlier).
    Every example of each training batch is then offered to the buffer by reservoir sampling.

    Attributes:
      buffer_size: examples the buffer holds (static).
      alpha: weight of the logit-matching term.
      beta: weight of the replayed cross-entropy.
      replay_batch: rows of each of the two buffer samples (static); 0 means the engine's batch size.

    Reference: Buzzega et al., "Dark experience for general continual learning: a strong, simple
    baseline", NeurIPS 2020.
    """

    strength: ClassVar[str] = "alpha"  # the hyperparameter a stability-plasticity sweep varies

    buffer_size: int = flax.struct.field(pytree_node=False)
    alpha: float = 0.1
    beta: float = 0.5
    replay_batch: int = flax.struct.field(pytree_node=False, default=0)

    def __post_init__(self):
        _check_sizes(self, buffer_size=self.buffer_size, replay_batch=(self.replay_batch, 0))

    def init(self, params: Params, stream: TaskStream) -> ReservoirBuffer:
        del params
        return reservoir_init(self.buffer_size, stream.input_shape, stream.n_classes, with_logits=True)

    def penalty(self, state: ReservoirBuffer, params: Params, batch: Batch, ctx: Context) -> Float[Array, ""]:
        n = self.replay_batch or batch.y.shape[0]
        k1, k2 = jax.random.split(ctx.key)
        x1, _, _, z1, w1 = reservoir_sample(state, k1, n)
        mse = _weighted_mean(jnp.mean((ctx.apply(params, x1) - z1) ** 2, axis=-1), w1)
        x2, y2, t2, _, w2 = reservoir_sample(state, k2, n)
        replayed = Batch(x=x2, y=_placeholder_labels(ctx.stream, y2, t2, w2), task=t2, weight=w2)
        return self.alpha * mse + self.beta * ctx.loss(params, replayed)

    def after_step(
        self, state: ReservoirBuffer, params: Params, grads: Params, batch: Batch, ctx: Context
    ) -> tuple[ReservoirBuffer, Params]:
        del grads
        logits = ctx.apply(params, batch.x)
        valid = None if batch.weight is None else batch.weight > 0
        state = reservoir_add(state, batch.x, batch.y, batch.task, ctx.key, logits=logits, valid=valid)
        return state, params


def _check_sizes(strategy: Strategy, **sizes: int | tuple[int, int]) -> None:
    """Raises ConfigError unless each size is an int at least its minimum (1, or the tuple's second)."""
    for name, value in sizes.items():
        value, least = value if isinstance(value, tuple) else (value, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(
                f"{type(strategy).__name__}.{name} must be an integer >= {least}, got {value!r}"
            )
