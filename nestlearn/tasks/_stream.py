"""The task-stream contract: every task of a stream as fixed-shape arrays on device.

A stream keeps one pool of base examples and, per task, which rows of the pool the task uses, how the task
transforms an input (a sparse linear map over input features: a permutation, a rotation) and how it maps
labels. The whole stream is one pytree, so a `lax.scan` over tasks and a `vmap` over seeds see it as data;
a permuted MNIST of 10 tasks stores the images once, not ten times.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


@flax.struct.dataclass
class TaskStream:
    """A sequence of tasks as fixed-shape arrays.

    Attributes:
      train_x: base training inputs, ``[n_pool, d_in]`` float32.
      train_y: base training labels (original classes), ``[n_pool]`` int32.
      test_x, test_y: the same for the test pool.
      train_idx: rows of the training pool each task uses, ``[task, n_train]`` int32; rows past
        ``train_n[task]`` are padding and are never sampled.
      train_n: number of valid rows per task, ``[task]`` int32.
      test_idx, test_n: the same for testing; padded rows are masked out of accuracies.
      feature_idx, feature_w: the task's input transform, ``[task, d, k]``: input feature ``i`` of task
        ``t`` is ``sum_k feature_w[t, i, k] * x[feature_idx[t, i, k]]`` (``k = 1`` for permutations,
        ``k = 4`` for bilinear rotations).
      label_map: target class of each original label, per task, ``[task, n_labels]`` int32.
      class_mask: output units a task may use, ``[task, n_classes]`` bool (task-incremental heads mask
        the others to ``-inf``; all ``True`` otherwise).
      name: stream name (static).
      task_names: one short name per task (static).
      n_classes: number of output units (static).
    """

    train_x: Float[Array, "n_pool d_in"]
    train_y: Int[Array, " n_pool"]
    test_x: Float[Array, "m_pool d_in"]
    test_y: Int[Array, " m_pool"]
    train_idx: Int[Array, "task n_train"]
    train_n: Int[Array, " task"]
    test_idx: Int[Array, "task n_test"]
    test_n: Int[Array, " task"]
    feature_idx: Int[Array, "task d k"]
    feature_w: Float[Array, "task d k"]
    label_map: Int[Array, "task n_labels"]
    class_mask: Bool[Array, "task n_classes"]
    name: str = flax.struct.field(pytree_node=False, default="stream")
    task_names: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
    n_classes: int = flax.struct.field(pytree_node=False, default=10)

    @property
    def n_tasks(self) -> int:
        return self.train_idx.shape[0]

    @property
    def input_dim(self) -> int:
        return self.feature_idx.shape[1]

    @property
    def max_train(self) -> int:
        return self.train_idx.shape[1]

    def transform(self, task: Int[Array, "..."], x: Float[Array, "... d_in"]) -> Float[Array, "... d"]:
        """Applies task ``task``'s input map to raw pool inputs ``x`` (``task`` broadcasts against ``x``'s batch)."""
        idx = self.feature_idx[task]  # [..., d, k]
        w = self.feature_w[task]
        gathered = jnp.take_along_axis(x[..., None, :], idx.reshape(*idx.shape[:-2], 1, -1), axis=-1)
        return (gathered.reshape(idx.shape) * w).sum(-1)

    def train_examples(
        self, task: Int[Array, " b"], pos: Int[Array, " b"]
    ) -> tuple[Float[Array, "b d"], Int[Array, " b"]]:
        """Training example ``pos[i]`` of task ``task[i]`` (``pos`` < ``train_n[task]``), transformed and relabelled."""
        rows = self.train_idx[task, pos]
        x = self.transform(task, self.train_x[rows])
        y = self.label_map[task, self.train_y[rows]]
        return x, y

    def test_set(
        self, task: Int[Array, ""]
    ) -> tuple[Float[Array, "n_test d"], Int[Array, " n_test"], Bool[Array, " n_test"]]:
        """All test examples of one task, with the mask of valid (non-padding) rows."""
        rows = self.test_idx[task]
        x = self.transform(jnp.broadcast_to(task, rows.shape), self.test_x[rows])
        y = self.label_map[task, self.test_y[rows]]
        valid = jnp.arange(rows.shape[0]) < self.test_n[task]
        return x, y, valid


def identity_features(n_tasks: int, d: int) -> tuple[jax.Array, jax.Array]:
    """Input maps that leave every task's features unchanged: ``([T, d, 1], [T, d, 1])``."""
    idx = jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32)[None, :, None], (n_tasks, d, 1))
    return idx, jnp.ones((n_tasks, d, 1), jnp.float32)
