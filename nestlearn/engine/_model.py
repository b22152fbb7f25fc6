"""A Flax NNX model used as pure functions, its non-parameter state carried alongside its parameters.

``nnx.split(model, nnx.Param, ...)`` gives the graph, the parameters (what optimizers update) and the rest:
batch statistics, dropout RNG streams and any other variable. Training calls return the rest as it is after
the call (BatchNorm's running averages move, Dropout's RNG counter advances), so a run threads it through
its steps like optimizer state; evaluation calls run the model in eval mode (``model.eval()``: running
averages, no dropout) and change nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jaxtyping import PyTree


class Functional:
    """The pure-function view of a model that ``model_fn(nnx.Rngs(key))`` builds.

    Args:
      model_fn: builds the model from ``nnx.Rngs``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> f = Functional(lambda rngs: nnx.Sequential(nnx.Linear(2, 3, rngs=rngs), nnx.BatchNorm(3, rngs=rngs)))
      >>> params, rest = f.init(jax.random.key(0))
      >>> y, rest = f.train(params, rest, jnp.ones((4, 2)))
      >>> f.eval(params, rest, jnp.ones((4, 2))).shape
      (4, 3)
    """

    def __init__(self, model_fn: Callable[[nnx.Rngs], nnx.Module]) -> None:
        self.model_fn = model_fn
        abstract = jax.eval_shape(lambda: model_fn(nnx.Rngs(0)))
        self.abstract_model = abstract
        self.graphdef, self.abstract_params, self.abstract_rest = nnx.split(abstract, nnx.Param, ...)
        self.stateful = bool(jax.tree.leaves(self.abstract_rest))

    def init(self, key: Any) -> tuple[PyTree, PyTree]:
        """``(params, rest)`` of a freshly built model."""
        return nnx.split(self.model_fn(nnx.Rngs(key)), nnx.Param, ...)[1:]

    def module(self, params: PyTree, rest: PyTree, *, train: bool) -> nnx.Module:
        """The model as a module, in train or eval mode (for methods other than ``__call__``)."""
        if not self.stateful:
            return nnx.merge(self.graphdef, params)
        # Fresh variables (copy=True), so that training-mode calls may mutate them inside any transform.
        model = nnx.merge(self.graphdef, params, rest, copy=True)
        model.train() if train else model.eval()
        return model

    def train(self, params: PyTree, rest: PyTree, *args, method: str | None = None, **kwargs):
        """``(output, rest)``: one training-mode call, and the non-parameter state after it."""
        model = self.module(params, rest, train=True)
        out = (getattr(model, method) if method else model)(*args, **kwargs)
        return out, (nnx.state(model, nnx.Not(nnx.Param)) if self.stateful else rest)

    def eval(self, params: PyTree, rest: PyTree, *args, method: str | None = None, **kwargs):
        """One eval-mode call (running averages, no dropout); the state is not changed."""
        model = self.module(params, rest, train=False)
        return (getattr(model, method) if method else model)(*args, **kwargs)

    def has(self, method: str) -> bool:
        """Whether the model defines ``method`` (e.g. ``features``)."""
        return callable(getattr(self.abstract_model, method, None))
