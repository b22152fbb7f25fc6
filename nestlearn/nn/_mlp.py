"""Multi-layer perceptron, the workhorse model of continual-learning benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float


def torch_linear_init(fan_in: int) -> nnx.Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default for ``nn.Linear`` weights and biases.

    Offered so that a run can start from the same distribution as a PyTorch baseline.
    """
    bound = 1.0 / fan_in**0.5

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def flatten_trailing(x: Array, din: int) -> Array:
    """``x`` with the trailing dimensions whose product is ``din`` merged into one (``x`` itself if its last is).

    ``[batch, 28, 28, 1]`` with ``din = 784`` becomes ``[batch, 784]``; ``[batch, time, din]`` is kept. The
    leading dimension is never merged (a batch of the wrong width is an error, not one long example).
    """
    if x.ndim and x.shape[-1] == din:
        return x
    size = 1
    for k in range(1, x.ndim):
        size *= x.shape[-k]
        if size == din:
            return x.reshape(*x.shape[:-k], din)
        if size > din:
            break
    raise ValueError(
        f"MLP takes inputs whose trailing dimensions hold {din} values, got shape {tuple(x.shape)}"
    )


class MLP(nnx.Module):
    """Fully connected ReLU network ``din -> hidden... -> dout``.

    Args:
      din: input features.
      hidden: widths of the hidden layers.
      dout: output units (logits).
      init: ``"lecun"`` (Flax's default: LeCun-normal weights, zero biases) or ``"torch"`` (PyTorch's
        ``nn.Linear`` default, uniform in ±1/sqrt(fan_in) for weights and biases).
      rngs: random streams for the parameters.

    Example:
      >>> from flax import nnx
      >>> mlp = MLP(784, (256, 256), 10, rngs=nnx.Rngs(0))
      >>> mlp(jnp.zeros((2, 784))).shape
      (2, 10)
      >>> mlp(jnp.zeros((2, 28, 28, 1))).shape  # images are flattened
      (2, 10)
    """

    def __init__(
        self, din: int, hidden: Sequence[int], dout: int, *, init: str = "lecun", rngs: nnx.Rngs
    ) -> None:
        if init not in ("lecun", "torch"):
            raise ValueError(f"MLP init must be 'lecun' or 'torch', got {init!r}")
        widths = (din, *hidden, dout)
        layers = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            if init == "torch":
                u = torch_linear_init(fan_in)
                layers.append(nnx.Linear(fan_in, fan_out, kernel_init=u, bias_init=u, rngs=rngs))
            else:
                layers.append(nnx.Linear(fan_in, fan_out, rngs=rngs))
        self.layers = nnx.List(layers)

    def __call__(self, x: Float[Array, "batch ..."]) -> Float[Array, "batch dout"]:
        return self.features(x)[0]

    def features(self, x: Float[Array, "batch din"]) -> tuple[Float[Array, "batch dout"], tuple[Array, ...]]:
        """The logits and the activations of every hidden layer (after the ReLU), input to output.

        Plasticity measures (dead units, effective rank) and continual backprop's unit utilities read
        these. Inputs whose trailing dimensions hold ``din`` values together (images ``[batch, H, W, C]``
        with ``din = H*W*C``) are flattened first.
        """
        x = flatten_trailing(x, self.layers[0].in_features)
        hidden = []
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
            hidden.append(x)
        return self.layers[-1](x), tuple(hidden)
