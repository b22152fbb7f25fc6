"""The slowly-changing regression problem of Dohare et al. 2024, a stream of examples for online learning.

Each input is ``n_flipping`` slowly changing bits, ``n_bits - n_flipping`` fresh random bits and a
constant 1 (a bias input); the target is the output of a fixed random network of linear threshold units
(LTUs). Because the slowly changing bits move rarely, the learner faces a sequence of related regression
problems with no announced boundaries: a small learner must keep tracking the target, which plain
backprop slowly loses the ability to do.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from nestlearn._errors import ConfigError

_FLIPS = ("one", "all")


@flax.struct.dataclass
class RegressionState:
    """The stream's state: the fixed target network, the current slow bits and the examples drawn so far.

    Attributes:
      target_in: ``[n_bits + 1, target_hidden]`` input weights of the target's LTUs, each +1 or -1 (the
        last row weighs the bias input).
      threshold: ``[target_hidden]`` the LTUs' thresholds :math:`\\theta_j = \\beta m - S_j`.
      target_out: ``[target_hidden]`` output weights, each +1 or -1.
      bits: ``[n_flipping]`` current values (0 or 1) of the slowly changing bits.
      step: examples drawn so far (int32).
    """

    target_in: Float[Array, "m hidden"]
    threshold: Float[Array, " hidden"]
    target_out: Float[Array, " hidden"]
    bits: Float[Array, " flipping"]
    step: Int[Array, ""]


@dataclasses.dataclass(frozen=True)
class SlowlyChangingRegression:
    """Slowly-changing regression (Dohare et al. 2024, after Sutton & Whitehead 1993), as a pure stream.

    An input is :math:`x = (f_1..f_F,\\ r_1..r_R,\\ 1)` with :math:`F` = ``n_flipping`` slow bits,
    :math:`R` = ``n_bits - n_flipping`` bits drawn fresh and uniformly from {0, 1} for every example, and
    a constant bias input, so :math:`m` = ``n_bits + 1`` inputs. The target network has ``target_hidden``
    linear threshold units with input weights :math:`w_{ij} \\in \\{-1, +1\\}` and output weights
    :math:`v_j \\in \\{-1, +1\\}`, all drawn uniformly once per stream:

    .. math::
      h_j = \\mathbb{1}\\Big[\\sum_{i=1}^{m} w_{ij} x_i > \\theta_j\\Big], \\quad
      \\theta_j = \\beta m - S_j, \\quad y = \\sum_j v_j h_j

    with :math:`S_j` the number of negative input weights of LTU :math:`j` (the bias weight counted).
    For 0/1 inputs :math:`\\sum_i w_{ij} x_i + S_j` is the number of inputs that agree with the sign
    pattern of the unit's weights (1 where the weight is +1, 0 where it is -1), so an LTU fires when
    more than a fraction :math:`\\beta` of its inputs match its pattern (Sutton & Whitehead's definition,
    which Dohare et al. follow; the threshold is our reading of it, since REFERENCES gives only β).

    The slow bits start uniform and change every ``flip_every`` examples: the example with index ``t``
    (from 0) sees bits changed ``t // flip_every`` times. ``flip="one"`` flips one slow bit chosen
    uniformly, as the paper's text and figure caption describe; ``flip="all"`` redraws all slow bits
    uniformly (a redrawn bit may keep its value), as the main configurations of the paper's public code
    do. The default is ``"one"``, the published description: it is the "slowly changing" problem, where
    consecutive targets stay related, whereas redrawing all bits makes each period a nearly new problem.

    Attributes:
      n_bits: input bits (slow and fresh), not counting the bias input.
      n_flipping: slow bits, the first inputs.
      flip_every: examples between changes of the slow bits.
      target_hidden: LTUs of the target network.
      beta: the LTUs' threshold parameter :math:`\\beta`.
      flip: ``"one"`` or ``"all"`` (see above).

    Example:
      >>> import jax
      >>> problem = SlowlyChangingRegression(flip_every=100)
      >>> state = problem.init(jax.random.key(0))
      >>> x, y, state = problem.sample(state, jax.random.key(1))
      >>> x.shape, y.shape, int(state.step)
      ((21,), (), 1)

    References:
      S. Dohare et al., "Loss of plasticity in deep continual learning", Nature 632, 2024.
      R. S. Sutton and S. D. Whitehead, "Online learning with random representations", ICML 1993.
    """

    n_bits: int = 20
    n_flipping: int = 15
    flip_every: int = 10_000
    target_hidden: int = 100
    beta: float = 0.7
    flip: str = "one"

    def __post_init__(self):
        for name in ("n_bits", "flip_every", "target_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.n_flipping, int) or not 0 < self.n_flipping <= self.n_bits:
            raise ConfigError(
                f"n_flipping must be an int in 1..n_bits ({self.n_bits}), got {self.n_flipping!r}"
            )
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta must be in [0, 1], got {self.beta!r}")
        if self.flip not in _FLIPS:
            raise ConfigError(f"flip must be one of {_FLIPS}, got {self.flip!r}")

    @property
    def n_inputs(self) -> int:
        """Inputs of an example: the bits and the bias input."""
        return self.n_bits + 1

    def init(self, key: PRNGKeyArray) -> RegressionState:
        """A stream: a random target network and random initial slow bits, no example drawn yet."""
        k_in, k_out, k_bits = jax.random.split(key, 3)
        m = self.n_inputs
        target_in = jnp.where(jax.random.bernoulli(k_in, 0.5, (m, self.target_hidden)), 1.0, -1.0)
        negatives = (target_in < 0).sum(0).astype(jnp.float32)
        return RegressionState(
            target_in=target_in.astype(jnp.float32),
            threshold=jnp.float32(self.beta * m) - negatives,
            target_out=jnp.where(jax.random.bernoulli(k_out, 0.5, (self.target_hidden,)), 1.0, -1.0).astype(
                jnp.float32
            ),
            bits=jax.random.bernoulli(k_bits, 0.5, (self.n_flipping,)).astype(jnp.float32),
            step=jnp.zeros((), jnp.int32),
        )

    def target(self, state: RegressionState, x: Float[Array, "*b m"]) -> Float[Array, "*b"]:
        """The target network's output for inputs ``x`` (a deterministic function of ``x``)."""
        h = (x @ state.target_in > state.threshold).astype(jnp.float32)
        return h @ state.target_out

    def sample(
        self, state: RegressionState, key: PRNGKeyArray
    ) -> tuple[Float[Array, " m"], Float[Array, ""], RegressionState]:
        """The next example ``(x, y)`` of the stream and the state after it (a pure function)."""
        k_flip, k_fresh = jax.random.split(key)
        due = (state.step > 0) & (state.step % self.flip_every == 0)
        if self.flip == "one":
            which = jax.random.randint(k_flip, (), 0, self.n_flipping)
            changed = jnp.where(jnp.arange(self.n_flipping) == which, 1.0 - state.bits, state.bits)
        else:
            changed = jax.random.bernoulli(k_flip, 0.5, (self.n_flipping,)).astype(jnp.float32)
        bits = jnp.where(due, changed, state.bits)
        fresh = jax.random.bernoulli(k_fresh, 0.5, (self.n_bits - self.n_flipping,)).astype(jnp.float32)
        x = jnp.concatenate([bits, fresh, jnp.ones((1,), jnp.float32)])
        return x, self.target(state, x), state.replace(bits=bits, step=state.step + 1)
