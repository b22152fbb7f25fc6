"""Task families for meta-learning: batches of few-shot tasks as fixed-shape arrays."""

from __future__ import annotations

import flax.struct
from jaxtyping import Array


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
