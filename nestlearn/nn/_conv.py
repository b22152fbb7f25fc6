"""Convolutional backbones of the image benchmarks: the Conv-4 of few-shot learning and the reduced ResNet-18.

Both take images ``[batch, H, W, C]`` (NHWC, float32) or the same images flattened to ``[batch, H*W*C]``
(what a flat task stream stores), given the image shape at construction. BatchNorm layers follow
PyTorch's defaults (momentum 0.1 on the running averages, i.e. Flax ``momentum=0.9``; ``epsilon=1e-5``)
and switch between batch statistics (``model.train()``, Flax's default) and running averages
(``model.eval()``); :class:`nestlearn.engine.Functional` threads their statistics through a continual run,
and :func:`nestlearn.meta.functional` keeps the model in train mode, so an inner loop normalises with the
statistics of the batch it sees, as MAML does. Built on ``flax.nnx`` (``Conv``, ``BatchNorm``, ``Linear``,
``max_pool``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from nestlearn.nn._mlp import torch_linear_init

_BN = {"momentum": 0.9, "epsilon": 1e-5}  # PyTorch's BatchNorm2d defaults (its momentum 0.1 = 1 - 0.9)
_PAD1 = ((1, 1), (1, 1))  # PyTorch's padding=1: symmetric, also for stride 2 (Flax "SAME" pads (0, 1) there)


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, numbers.Integral) and s > 0 for s in shape):
        raise ValueError(
            f"input_shape must be (height, width, channels) of positive ints, got {input_shape!r}"
        )
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def as_images(x: Array, input_shape: tuple[int, int, int]) -> tuple[Float[Array, "n h w c"], tuple[int, ...]]:
    """``x`` as a stack of ``input_shape`` images, and the leading (batch) dimensions to restore after.

    Accepts ``[..., H, W, C]`` or ``[..., H*W*C]`` (row-major ``H, W, C``, how a flat stream stores an image).
    """
    if x.shape[-3:] == input_shape:
        lead = x.shape[:-3]
    elif x.shape[-1] == math.prod(input_shape):
        lead = x.shape[:-1]
    else:
        raise ValueError(
            f"expected images of shape {input_shape} (or flattened to {math.prod(input_shape)} features), "
            f"got inputs of shape {tuple(x.shape)}"
        )
    return x.reshape(-1, *input_shape), lead


def _init_kwargs(init: str, fan_in: int, bias: bool) -> dict:
    if init not in ("lecun", "torch"):
        raise ValueError(f"init must be 'lecun' or 'torch', got {init!r}")
    if init == "lecun":
        return {}
    u = torch_linear_init(fan_in)  # kaiming_uniform(a=sqrt 5) of nn.Conv2d / nn.Linear: U(±1/sqrt(fan_in))
    return {"kernel_init": u, "bias_init": u} if bias else {"kernel_init": u}


IMPLS = ("auto", "lax", "im2col")


class _Conv(nnx.Conv):
    """``nnx.Conv`` (same parameters) that can also run as im2col + matmul.

    ``impl="im2col"`` gathers the ``k × k`` shifted (strided) slices of the padded input along the channel
    axis and multiplies by the kernel reshaped to ``[k·k·cin, cout]``: the same function, built from
    slices, concatenations and one matmul. Its gradient is matmuls and pads too. Measured reason: XLA's CPU
    backend runs convolution *gradients* inside a ``while`` loop (``lax.scan``, which every engine chunk
    and MAML inner loop is) about 7-35x slower than outside one; the im2col form does not have that
    penalty (benchmarks/backbones.py). ``"lax"`` (``lax.conv_general_dilated``) is the right choice on
    GPU and TPU.
    """

    def __init__(self, *args, impl: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.impl = impl

    def __call__(self, x: Float[Array, "n h w cin"]) -> Float[Array, "n h2 w2 cout"]:
        impl = self.impl
        if impl == "auto":  # chosen where the program is traced: a module built on a CPU host runs on a TPU
            impl = "im2col" if jax.default_backend() == "cpu" else "lax"
        if impl == "lax":
            return super().__call__(x)
        (k, _), (s, _) = self.kernel_size, self.strides
        pad = (k - 1) // 2 if self.padding != "VALID" else 0
        n, h, w, c = x.shape
        ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
        if pad:
            x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        cols = [
            x[:, i : i + s * (ho - 1) + 1 : s, j : j + s * (wo - 1) + 1 : s, :]
            for i in range(k)
            for j in range(k)
        ]
        cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
        y = cols @ self.kernel[...].reshape(k * k * c, -1)
        return y if self.bias is None else y + self.bias[...].reshape(1, 1, 1, -1)


def _conv(
    cin: int, cout: int, k: int, stride: int, *, bias: bool, init: str, rngs: nnx.Rngs, impl: str = "auto"
) -> nnx.Conv:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return _Conv(
        cin,
        cout,
        impl=impl,
        kernel_size=(k, k),
        strides=(stride, stride),
        padding=_PAD1 if k == 3 else "VALID",
        use_bias=bias,
        rngs=rngs,
        **_init_kwargs(init, k * k * cin, bias),
    )


def _linear(din: int, dout: int, *, init: str, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, rngs=rngs, **_init_kwargs(init, din, True))


class _Conv4Body(nnx.Module):
    """Conv-4's blocks; a submodule so that the head's parameters come last in the parameter pytree."""

    def __init__(
        self, c: int, width: int, depth: int, batch_norm: bool, init: str, rngs: nnx.Rngs, impl: str
    ) -> None:
        self.convs = nnx.List(
            [
                _conv(c if i == 0 else width, width, 3, 1, bias=True, init=init, rngs=rngs, impl=impl)
                for i in range(depth)
            ]
        )
        self.norms = nnx.List(
            [nnx.BatchNorm(width, **_BN, rngs=rngs) for _ in range(depth)] if batch_norm else []
        )

    def __call__(self, x: Float[Array, "n h w c"]) -> Float[Array, "n h2 w2 width"]:
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.norms:
                x = self.norms[i](x)
            x = nnx.max_pool(jax.nn.relu(x), (2, 2), strides=(2, 2), padding="VALID")
        return x


class Conv4(nnx.Module):
    """The four-block convolutional network of few-shot learning (Matching Networks, MAML, ProtoNets).

    Each block is conv 3×3 (padding 1) → BatchNorm → ReLU → max-pool 2×2 (floor), so an ``H × W``
    image leaves the body as ``⌊…⌊H/2⌋…/2⌋`` (4 halvings) × the same in width × ``width`` features:
    64 for Omniglot's 28×28×1 with 64 filters, 5·5·32 = 800 for mini-ImageNet's 84×84×3 with MAML's 32.
    A linear head maps the flattened features to ``n_classes`` logits; ``n_classes=None`` returns the
    flattened embedding itself (Prototypical Networks' metric space).

    MAML's Omniglot network downsamples with stride-2 convolutions instead of max-pooling; this class
    uses max-pooling throughout, as Prototypical Networks and most re-implementations (learn2learn) do.
    Parameters are ``body`` (``convs``, ``norms``) then ``head``, so :class:`nestlearn.meta.ANIL`'s default
    head (the last layer) is the linear head.

    Args:
      input_shape: ``(height, width, channels)`` of an input image.
      n_classes: logits of the head (``n_way``), or ``None`` for the embedding only.
      width: filters of every convolution (64 Omniglot, 32 mini-ImageNet MAML, 64 ProtoNets).
      depth: number of blocks (4).
      batch_norm: whether each block normalises (``False``: conv → ReLU → pool).
      init: ``"lecun"`` (Flax's default) or ``"torch"`` (PyTorch's default, U(±1/sqrt(fan_in))).
      impl: how convolutions run: ``"auto"`` (default: ``"im2col"`` on the CPU backend, ``"lax"`` elsewhere),
        ``"lax"`` (``lax.conv_general_dilated``, for GPU/TPU) or ``"im2col"``
        (slices + one matmul: the same function and parameters, several times faster in training loops
        on XLA's CPU backend, whose convolution gradients are slow inside ``lax.scan``).
      rngs: random streams for the parameters.

    Example:
      >>> from flax import nnx
      >>> net = Conv4((28, 28, 1), 5, rngs=nnx.Rngs(0))
      >>> net(jnp.zeros((2, 28, 28, 1))).shape
      (2, 5)
      >>> Conv4((84, 84, 3), None, width=32, rngs=nnx.Rngs(0))(jnp.zeros((2, 84, 84, 3))).shape
      (2, 800)

    References: Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016; Finn et al.,
    "Model-Agnostic Meta-Learning", ICML 2017; Snell et al., "Prototypical Networks", NeurIPS 2017.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int | None,
        *,
        width: int = 64,
        depth: int = 4,
        batch_norm: bool = True,
        init: str = "lecun",
        impl: str = "auto",
        rngs: nnx.Rngs,
    ) -> None:
        self.input_shape = _check_shape(input_shape)
        if n_classes is not None and (not isinstance(n_classes, int) or n_classes <= 0):
            raise ValueError(f"n_classes must be a positive int or None, got {n_classes!r}")
        for name, value in (("width", width), ("depth", depth)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        h, w, c = self.input_shape
        if min(h, w) < 2**depth:
            raise ValueError(f"input_shape {self.input_shape} is too small for {depth} 2×2 poolings")
        self.body = _Conv4Body(c, width, depth, batch_norm, init, rngs, impl)
        for _ in range(depth):
            h, w = h // 2, w // 2
        self.embed_dim = h * w * width
        self.head = None if n_classes is None else _linear(self.embed_dim, n_classes, init=init, rngs=rngs)

    def embed(self, x: Float[Array, "batch ..."]) -> Float[Array, "batch embed"]:
        """The flattened features after the last block (the input of the head)."""
        x, lead = as_images(x, self.input_shape)
        return self.body(x).reshape(*lead, -1)

    def __call__(self, x: Float[Array, "batch ..."]) -> Float[Array, "batch out"]:
        z = self.embed(x)
        return z if self.head is None else self.head(z)


class BasicBlock(nnx.Module):
    """ResNet's basic block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, convs 3×3 without bias.

    The shortcut is the identity, or a 1×1 convolution with stride plus BatchNorm where the block changes
    the resolution or the number of channels (He et al.'s option B).
    """

    def __init__(
        self, cin: int, cout: int, stride: int, *, init: str = "lecun", impl: str = "auto", rngs: nnx.Rngs
    ) -> None:
        self.conv1 = _conv(cin, cout, 3, stride, bias=False, init=init, rngs=rngs, impl=impl)
        self.bn1 = nnx.BatchNorm(cout, **_BN, rngs=rngs)
        self.conv2 = _conv(cout, cout, 3, 1, bias=False, init=init, rngs=rngs, impl=impl)
        self.bn2 = nnx.BatchNorm(cout, **_BN, rngs=rngs)
        if stride != 1 or cin != cout:
            self.proj = _conv(cin, cout, 1, stride, bias=False, init=init, rngs=rngs, impl=impl)
            self.proj_bn = nnx.BatchNorm(cout, **_BN, rngs=rngs)
        else:
            self.proj = self.proj_bn = None

    def __call__(self, x: Float[Array, "n h w cin"]) -> Float[Array, "n h2 w2 cout"]:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.proj is None else self.proj_bn(self.proj(x))
        return jax.nn.relu(out + short)


class _ResNetBody(nnx.Module):
    """The stem and the stages; a submodule so that the head's parameters come last in the pytree."""

    def __init__(
        self, c: int, nf: int, blocks: tuple[int, ...], init: str, rngs: nnx.Rngs, impl: str
    ) -> None:
        self.stem = _conv(c, nf, 3, 1, bias=False, init=init, rngs=rngs, impl=impl)
        self.stem_bn = nnx.BatchNorm(nf, **_BN, rngs=rngs)
        layers, cin = [], nf
        for stage, n in enumerate(blocks):
            cout = nf * 2**stage
            for b in range(n):
                layers.append(
                    BasicBlock(cin, cout, 2 if (stage > 0 and b == 0) else 1, init=init, impl=impl, rngs=rngs)
                )
                cin = cout
        self.blocks = nnx.List(layers)

    def __call__(self, x: Float[Array, "n h w c"]) -> Float[Array, "n h2 w2 ch"]:
        x = jax.nn.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return x


class ResNet18(nnx.Module):
    """The reduced ResNet-18 of continual-learning benchmarks (GEM, A-GEM, ER, DER++, Mammoth).

    A 3×3 stem (stride 1, no max-pool) with ``nf`` filters and BatchNorm, four stages of two
    :class:`BasicBlock`\\ s with ``nf × (1, 2, 4, 8)`` filters (the last three start with stride 2), global
    average pooling and a linear head. With ``nf=20`` on 32×32×3 images and 100 classes it has 1,109,240
    parameters (GEM's "reduced ResNet-18"); ``nf=64`` is the full-width network of DER++ / Mammoth
    (11.2 M parameters with 10 classes). The global average pool is GEM's ``avg_pool2d(·, 4)`` on 32×32
    inputs and also accepts other sizes (Tiny-ImageNet's 64×64). Parameters are ``body`` (``stem``,
    ``stem_bn``, ``blocks``) then ``head``, so :class:`nestlearn.meta.ANIL`'s default head is the linear head.

    Args:
      input_shape: ``(height, width, channels)`` of an input image.
      n_classes: logits of the head, or ``None`` for the pooled ``8 nf`` features only.
      nf: filters of the stem and of the first stage (20 reduced, 64 full).
      blocks: basic blocks per stage (``(2, 2, 2, 2)`` is ResNet-18).
      init: ``"lecun"`` (Flax's default) or ``"torch"`` (PyTorch's default, U(±1/sqrt(fan_in))).
      impl: how convolutions run: ``"auto"`` (default: ``"im2col"`` on the CPU backend, ``"lax"`` elsewhere),
        ``"lax"`` (``lax.conv_general_dilated``, for GPU/TPU) or ``"im2col"``
        (slices + one matmul: the same function and parameters, several times faster in training loops
        on XLA's CPU backend, whose convolution gradients are slow inside ``lax.scan``).
      rngs: random streams for the parameters.

    Example:
      >>> from flax import nnx
      >>> net = ResNet18((32, 32, 3), 10, nf=8, rngs=nnx.Rngs(0))
      >>> net(jnp.zeros((2, 32, 32, 3))).shape
      (2, 10)

    References: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; Lopez-Paz & Ranzato,
    "Gradient Episodic Memory for Continual Learning", NeurIPS 2017; Buzzega et al., "Dark Experience for
    General Continual Learning", NeurIPS 2020.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int | None,
        *,
        nf: int = 20,
        blocks: Sequence[int] = (2, 2, 2, 2),
        init: str = "lecun",
        impl: str = "auto",
        rngs: nnx.Rngs,
    ) -> None:
        self.input_shape = _check_shape(input_shape)
        if n_classes is not None and (not isinstance(n_classes, int) or n_classes <= 0):
            raise ValueError(f"n_classes must be a positive int or None, got {n_classes!r}")
        if not isinstance(nf, int) or nf <= 0:
            raise ValueError(f"nf must be a positive int, got {nf!r}")
        if not blocks or not all(isinstance(b, int) and b > 0 for b in blocks):
            raise ValueError(f"blocks must be positive ints, one per stage, got {blocks!r}")
        self.body = _ResNetBody(self.input_shape[2], nf, tuple(blocks), init, rngs, impl)
        self.embed_dim = nf * 2 ** (len(blocks) - 1)
        self.head = None if n_classes is None else _linear(self.embed_dim, n_classes, init=init, rngs=rngs)

    def embed(self, x: Float[Array, "batch ..."]) -> Float[Array, "batch embed"]:
        """The globally average-pooled features of the last stage (the input of the head)."""
        x, lead = as_images(x, self.input_shape)
        return jnp.mean(self.body(x), axis=(1, 2)).reshape(*lead, -1)

    def __call__(self, x: Float[Array, "batch ..."]) -> Float[Array, "batch out"]:
        z = self.embed(x)
        return z if self.head is None else self.head(z)
