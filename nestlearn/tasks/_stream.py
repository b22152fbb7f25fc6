"""The task-stream contract: every task of a stream as fixed-shape arrays on device.

A stream keeps one pool of base examples and, per task, which rows of the pool the task uses, how the task
transforms an input (a sparse linear map over input features: a permutation, a rotation) and how it maps
labels. The whole stream is one pytree, so a `lax.scan` over tasks and a `vmap` over seeds see it as data;
a permuted MNIST of 10 tasks stores the images once, not ten times.

Image streams (split CIFAR, ...) keep their pool as uint8 ``[n, H, W, C]`` on device (a quarter of the
float32 bytes) and hand models float32 NHWC inputs: pixels are scaled to ``[0, 1]`` and normalised per
channel when a batch is gathered, inside the compiled program, and :meth:`TaskStream.augment` applies the
stream's training augmentation (random crop after zero padding, horizontal flip) per example from a key.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray


@flax.struct.dataclass
class TaskStream:
    """A sequence of tasks as fixed-shape arrays.

    Attributes:
      train_x: base training inputs, ``[n_pool, d_in]`` float32, or, for an image stream, ``[n_pool, H, W, C]``
        uint8 pixels (or float32 values) that :meth:`train_examples` scales and normalises.
      train_y: base training labels (original classes), ``[n_pool]`` int32.
      test_x, test_y: the same for the test pool.
      train_idx: rows of the training pool each task uses, ``[task, n_train]`` int32; rows past
        ``train_n[task]`` are padding and are never sampled.
      train_n: number of valid rows per task, ``[task]`` int32.
      test_idx, test_n: the same for testing; padded rows are masked out of accuracies.
      feature_idx, feature_w: the task's input transform, ``[task, d, k]``: input feature ``i`` of task
        ``t`` is ``sum_k feature_w[t, i, k] * x[feature_idx[t, i, k]]`` (``k = 1`` for permutations,
        ``k = 4`` for bilinear rotations). ``None`` (both) leaves every task's inputs as they are; an
        image stream's maps, if any, act on the flattened ``H * W * C`` pixels.
      label_map: target class of each original label, per task, ``[task, n_labels]`` int32.
      class_mask: output units a task may use, ``[task, n_classes]`` bool (task-incremental heads mask
        the others to ``-inf``; all ``True`` otherwise).
      name: stream name (static).
      task_names: one short name per task (static).
      n_classes: number of output units (static).
      mean, std: per-feature (flat streams, ``[d]``) or per-channel (image streams, ``[C]``) normalisation,
        applied after uint8 pixels are scaled to ``[0, 1]``: ``x = (x - mean) / std``; ``None``: none.
      image_shape: ``(H, W, C)`` of an image stream, whose inputs are ``[batch, H, W, C]`` (static);
        ``()`` for a flat stream, whose inputs are ``[batch, d]``.
      crop_padding: training augmentation of an image stream (static): pad every side by this many
        pixels of value 0 (before normalisation) and crop a random ``H x W`` window; ``0``: no crop.
      flip: training augmentation (static): mirror each image left-right with probability 1/2.
    """

    train_x: Float[Array, "n_pool d_in"]
    train_y: Int[Array, " n_pool"]
    test_x: Float[Array, "m_pool d_in"]
    test_y: Int[Array, " m_pool"]
    train_idx: Int[Array, "task n_train"]
    train_n: Int[Array, " task"]
    test_idx: Int[Array, "task n_test"]
    test_n: Int[Array, " task"]
    feature_idx: Int[Array, "task d k"] | None
    feature_w: Float[Array, "task d k"] | None
    label_map: Int[Array, "task n_labels"]
    class_mask: Bool[Array, "task n_classes"]
    name: str = flax.struct.field(pytree_node=False, default="stream")
    task_names: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
    n_classes: int = flax.struct.field(pytree_node=False, default=10)
    mean: Float[Array, " c"] | None = None
    std: Float[Array, " c"] | None = None
    image_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    crop_padding: int = flax.struct.field(pytree_node=False, default=0)
    flip: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def n_tasks(self) -> int:
        return self.train_idx.shape[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input: ``(H, W, C)`` for an image stream, ``(d,)`` for a flat one."""
        if self.image_shape:
            return tuple(self.image_shape)
        if self.feature_idx is not None:
            return (self.feature_idx.shape[1],)
        return (math.prod(self.train_x.shape[1:]),)

    @property
    def input_dim(self) -> int:
        """Number of input features (``H * W * C`` for an image stream)."""
        return math.prod(self.input_shape)

    @property
    def max_train(self) -> int:
        return self.train_idx.shape[1]

    def transform(self, task: Int[Array, "..."], x: Float[Array, "... d_in"]) -> Float[Array, "... d"]:
        """Applies task ``task``'s input map to raw pool inputs ``x`` (``task`` broadcasts against ``x``'s batch)."""
        if self.feature_idx is None:
            return x
        idx = self.feature_idx[task]  # [..., d, k]
        w = self.feature_w[task]
        gathered = jnp.take_along_axis(x[..., None, :], idx.reshape(*idx.shape[:-2], 1, -1), axis=-1)
        return (gathered.reshape(idx.shape) * w).sum(-1)

    def inputs(self, task: Int[Array, " b"], raw: Array) -> Float[Array, "b ..."]:
        """Model inputs from raw pool rows: float32, scaled (uint8 / 255), task-mapped and normalised."""
        x = raw.astype(jnp.float32)
        if raw.dtype == jnp.uint8:
            x = x / 255.0
        if self.feature_idx is not None:
            x = self.transform(task, x.reshape(x.shape[0], -1))
        x = x.reshape(x.shape[0], *self.input_shape)
        if self.mean is not None:
            at = (1,) * (x.ndim - 1) + (-1,)  # per channel (or feature): the last axis
            x = (x - self.mean.reshape(at)) / self.std.reshape(at)
        return x

    def augment(self, key: PRNGKeyArray, x: Float[Array, "b H W C"]) -> Float[Array, "b H W C"]:
        """The stream's training augmentation of a batch of inputs, one draw per example (jittable).

        Each image is padded on every side by ``crop_padding`` pixels of raw value 0 (``-mean / std``
        after normalisation, so the result is that of padding the raw image), a window of the original
        size is cut at an offset drawn uniformly from ``{0, ..., 2 * crop_padding}`` in each direction,
        and, with ``flip``, mirrored left-right with probability 1/2: the usual CIFAR augmentation
        (``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``). A flat stream, or one without
        augmentation, returns ``x`` unchanged.

        Args:
          key: the draw's key (the engine folds the run's key and the step into it).
          x: ``[b, H, W, C]`` inputs from :meth:`train_examples`.

        Returns:
          The augmented inputs, same shape and dtype.
        """
        if not self.image_shape or (self.crop_padding == 0 and not self.flip):
            return x
        k_row, k_col, k_flip = jax.random.split(key, 3)
        b, (h, w, c) = x.shape[0], self.image_shape
        p = self.crop_padding
        if p:
            fill = jnp.zeros((c,), jnp.float32) if self.mean is None else -self.mean / self.std
            padded = jnp.broadcast_to(fill, (b, h + 2 * p, w + 2 * p, c)).astype(x.dtype)
            padded = padded.at[:, p : p + h, p : p + w].set(x)
            rows = jax.random.randint(k_row, (b,), 0, 2 * p + 1)
            cols = jax.random.randint(k_col, (b,), 0, 2 * p + 1)
            zero = jnp.zeros((), rows.dtype)
            cut = lambda img, r, q: jax.lax.dynamic_slice(img, (r, q, zero), (h, w, c))
            x = jax.vmap(cut)(padded, rows, cols)
        if self.flip:
            mirror = jax.random.bernoulli(k_flip, 0.5, (b,))
            x = jnp.where(mirror[:, None, None, None], x[:, :, ::-1], x)
        return x

    def train_examples(
        self, task: Int[Array, " b"], pos: Int[Array, " b"]
    ) -> tuple[Float[Array, "b ..."], Int[Array, " b"]]:
        """Training example ``pos[i]`` of task ``task[i]`` (``pos`` < ``train_n[task]``), transformed and relabelled.

        Inputs come un-augmented (``[b, *input_shape]`` float32); the engine applies :meth:`augment` to
        the batch a step trains on, so replay buffers and Fisher estimates see clean examples.
        """
        rows = self.train_idx[task, pos]
        x = self.inputs(task, self.train_x[rows])
        y = self.label_map[task, self.train_y[rows]]
        return x, y

    def test_set(
        self, task: Int[Array, ""]
    ) -> tuple[Float[Array, "n_test ..."], Int[Array, " n_test"], Bool[Array, " n_test"]]:
        """All test examples of one task, with the mask of valid (non-padding) rows (never augmented)."""
        return self.test_examples(task, jnp.arange(self.test_idx.shape[1], dtype=jnp.int32))

    def test_examples(
        self, task: Int[Array, ""], pos: Int[Array, " b"]
    ) -> tuple[Float[Array, "b ..."], Int[Array, " b"], Bool[Array, " b"]]:
        """Test examples ``pos`` of one task (a slice of :meth:`test_set`), with their validity mask.

        Positions at or past ``test_n[task]`` (padding, or past the end) are masked out; positions past
        the padded width read row 0 of the task.
        """
        inside = pos < self.test_idx.shape[1]
        rows = self.test_idx[task, jnp.where(inside, pos, 0)]
        x = self.inputs(jnp.broadcast_to(task, rows.shape), self.test_x[rows])
        y = self.label_map[task, self.test_y[rows]]
        valid = inside & (pos < self.test_n[task])
        return x, y, valid


def identity_features(n_tasks: int, d: int) -> tuple[jax.Array, jax.Array]:
    """Input maps that leave every task's features unchanged: ``([T, d, 1], [T, d, 1])``."""
    idx = jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32)[None, :, None], (n_tasks, d, 1))
    return idx, jnp.ones((n_tasks, d, 1), jnp.float32)
