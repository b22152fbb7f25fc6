"""Models (Flax NNX)."""

from nestlearn.nn._mlp import MLP, torch_linear_init

__all__ = ["MLP", "torch_linear_init"]
