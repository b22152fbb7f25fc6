r"""Self-modifying Titans: keys, values, rates and gates produced by memories that themselves learn in context.

Per head, with static projections :math:`x^\square_t = x_t P_\square` for :math:`\square \in \{k, v, \eta,
\alpha\}` and a static query :math:`q_t = \mathrm{norm}(x_t P_q)`:

.. math::
  k_t = \mathrm{norm}(M_{k}(x^k_t)),\quad v_t = M_{v}(x^v_t),\quad
  \eta_t = \mathrm{lr}\,\sigma(w_\eta\cdot M_{\eta}(x^\eta_t) + b_\eta),\quad
  \alpha_t = \sigma(w_\alpha\cdot M_{\alpha}(x^\alpha_t) + b_\alpha),

where every :math:`M_\square` is a residual two-layer MLP memory with a meta-learned initial state (an
:class:`~nestlearn.nn.MemorySpec` with ``memory="mlp"``). Each generating memory writes its *own target*,
:math:`\hat v_{\square,t} = M_\square(v_t)`, at key :math:`k_t` with rate :math:`\eta_t` and gate
:math:`\alpha_t`; the main memory :math:`M` writes :math:`k_t \to v_t` and is read at :math:`q_t`.

Training is chunkwise (Nested Learning, HOPE section): inside a chunk the generators run at the state that
opened the chunk, and every memory takes mini-batch gradient steps from that state, so a chunk is computed
in parallel with :mod:`nestlearn.nn._assoc`'s dual form. The per-token path (``path="token"``) does the
same token by token with ``jax.grad`` and agrees with it to float tolerance.

References:
  Behrouz et al. 2025, Nested Learning (arXiv 2512.24695): self-modifying Titans and HOPE. The paper gives
  no code; what this follows where its two versions differ: the generating memories see separate static
  projections of the input, and the main memory's target is the generated value itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from nestlearn.nn._assoc import (
    LayerState,
    MemorySpec,
    MemoryState,
    ShortConv,
    _chunk,
    _first_nonfinite,
    _l2_normalize,
    block_base,
    initial_state,
    memory_apply,
    memory_statistics,
    token_write,
    update_norm,
)

GENERATORS = ("k", "v", "lr", "gate")
MEMORIES = (*GENERATORS, "memory")


class SelfModifyingMemory(nnx.Module):
    r"""Self-modifying Titans as a causal sequence layer (see the module docstring for the equations).

    Args:
      d_model: input and output features.
      heads: heads; ``d_head`` (default ``d_model // heads``) features per head.
      hidden: hidden units of every memory MLP (default ``2 * d_head``).
      chunk: tokens per chunk (the block of every memory's mini-batch gradient steps).
      momentum: whether every memory's update carries momentum (Titans' surprise momentum) ...
      momentum_rate: ... with this rate.
      lr: the largest inner learning rate.
      stop_write_grad: treat in-context writes as constants for the outer gradient.
      conv: taps of the short convolution on the projections (:class:`~nestlearn.nn.ShortConv`; 0: none).
      path: ``"chunk"`` or ``"token"``.
      rngs: random streams.

    Example:
      >>> layer = SelfModifyingMemory(16, heads=2, chunk=8, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 12, 16))).shape
      (2, 12, 16)
    """

    def __init__(
        self,
        d_model: int,
        *,
        heads: int = 2,
        d_head: int | None = None,
        hidden: int | None = None,
        chunk: int = 16,
        momentum: bool = False,
        momentum_rate: float = 0.9,
        lr: float = 0.1,
        stop_write_grad: bool = False,
        conv: int = 4,
        path: str = "chunk",
        rngs: nnx.Rngs,
    ) -> None:
        d_head = d_model // heads if d_head is None else d_head
        hidden = 2 * d_head if hidden is None else hidden
        if path not in ("chunk", "token"):
            raise ValueError(f"path must be 'chunk' or 'token', got {path!r}")
        self.spec = MemorySpec("mlp", "l2", momentum, False, chunk, stop_write_grad)
        self.heads, self.d_head, self.lr, self.path = heads, d_head, lr, path
        self.momentum_rate = momentum_rate
        width = heads * d_head
        self.proj = nnx.Dict(
            {name: nnx.Linear(d_model, width, use_bias=False, rngs=rngs) for name in ("q", *GENERATORS)}
        )
        self.o = nnx.Linear(width, d_model, use_bias=False, rngs=rngs)
        self.norm = nnx.RMSNorm(d_head, rngs=rngs)
        self.conv = ShortConv(5 * width, conv, rngs=rngs) if conv else None
        self.lr_read = nnx.Param(0.02 * jax.random.normal(rngs.params(), (heads, d_head)))
        self.lr_bias = nnx.Param(jnp.zeros((heads,)))
        self.gate_read = nnx.Param(0.02 * jax.random.normal(rngs.params(), (heads, d_head)))
        self.gate_bias = nnx.Param(jnp.full((heads,), 6.0, jnp.float32))  # retention ~0.9975 at the start
        inits = {}
        for name in MEMORIES:
            w1 = jax.random.normal(rngs.params(), (heads, d_head, hidden)) / math.sqrt(d_head)
            w2 = 0.02 * jax.random.normal(rngs.params(), (heads, hidden, d_head))
            inits[name] = nnx.Param(jnp.stack([w1, jnp.swapaxes(w2, 1, 2)]))  # [2, heads, d_head, hidden]
        self.inits = nnx.Dict(inits)

    def _weights(self, name: str) -> tuple[Array, Array]:
        w = self.inits[name][...]
        return w[0], jnp.swapaxes(w[1], 1, 2)

    def init_state(self, batch: int) -> LayerState:
        """Every memory reset to its meta-learned initial state, for ``batch`` sequences."""
        tail = self.conv.init_tail(batch) if self.conv is not None else None
        return LayerState(self._init_memories(batch), tail)

    def _init_memories(self, batch: int) -> dict[str, MemoryState]:
        return {
            name: initial_state(
                self.spec, tuple(jnp.broadcast_to(w, (batch, *w.shape)) for w in self._weights(name))
            )
            for name in MEMORIES
        }

    def apply(
        self, x: Float[Array, "batch T d"], state: LayerState | None = None
    ) -> tuple[Float[Array, "batch T d"], LayerState, dict[str, Array]]:
        """Read and write a sequence from ``state`` (default: a reset). Returns ``(y, state, aux)``.

        ``aux`` holds per-token ``surprise`` (the main memory's), ``lr``, ``retention`` (each
        ``[batch, T, heads]``) and ``diverged_at`` per sequence (-1 when every read is finite).
        """
        b, t, _ = x.shape
        state = self.init_state(b) if state is None else state
        names = ("q", *GENERATORS)
        joint = jnp.concatenate([self.proj[name](x) for name in names], axis=-1)
        tail = state.tail
        if self.conv is not None:
            joint, tail = self.conv(joint, tail)
        proj = {
            name: jnp.swapaxes(z.reshape(b, t, self.heads, self.d_head), 1, 2)
            for name, z in zip(names, jnp.split(joint, len(names), axis=-1))
        }  # each [batch, heads, T, d_head]
        proj = {
            name: _l2_normalize(z) for name, z in proj.items()
        }  # unit-norm memory inputs keep writes bounded
        q = proj.pop("q")
        reads = (self.lr_read[...], self.lr_bias[...], self.gate_read[...], self.gate_bias[...])
        fn = self._chunked if self.path == "chunk" else self._scanned
        per_head = jax.vmap(fn)  # state, query, projections and read-outs all lead with heads
        out, memories, aux = jax.vmap(per_head, in_axes=(0, 0, 0, None))(state.memory, q, proj, reads)
        state = LayerState(memories, tail)
        aux = {key: jnp.swapaxes(val, 1, 2) for key, val in aux.items()}
        out = jnp.swapaxes(out, 1, 2)  # [batch, T, heads, d_head]
        aux["diverged_at"] = _first_nonfinite(out)
        return self.o(self.norm(out).reshape(b, t, -1)), state, aux

    def __call__(self, x: Float[Array, "batch T d"]) -> Float[Array, "batch T d"]:
        return self.apply(x)[0]

    def telemetry(self, x: Float[Array, "batch T d"]) -> tuple[Float[Array, "batch T d"], dict[str, Array]]:
        """The output and scalars: gates, surprise, divergence, and each memory's in-context update norm."""
        start = self.init_state(x.shape[0])
        y, end, aux = self.apply(x, start)
        norms = {name: update_norm(start.memory[name], end.memory[name]) for name in MEMORIES}
        stats = memory_statistics(aux, norms["memory"])
        stats.update({f"update_norm_{name}": jnp.mean(n) for name, n in norms.items() if name != "memory"})
        return y, stats

    # -- one (sequence, head) -----------------------------------------------------------------------

    def _generate(self, weights: dict, proj: dict, reads) -> tuple[Array, Array, Array, Array]:
        """Keys, values, rates and gates of rows ``proj[...]`` from the generators' ``weights``."""
        lr_read, lr_bias, gate_read, gate_bias = reads
        k = _l2_normalize(memory_apply(self.spec, weights["k"], proj["k"]))
        v = _l2_normalize(memory_apply(self.spec, weights["v"], proj["v"]))
        lr = self.lr * jax.nn.sigmoid(memory_apply(self.spec, weights["lr"], proj["lr"]) @ lr_read + lr_bias)
        gate = jax.nn.sigmoid(memory_apply(self.spec, weights["gate"], proj["gate"]) @ gate_read + gate_bias)
        return k, v, lr, gate

    def _chunked(self, state: dict, q: Array, proj: dict, reads):
        n = q.shape[0]
        size = min(self.spec.chunk, n)
        chunks = math.ceil(n / size)
        pad = chunks * size - n

        def split(z: Array) -> Array:
            z = jnp.pad(z, [(0, pad)] + [(0, 0)] * (z.ndim - 1))
            return z.reshape(chunks, size, *z.shape[1:])

        last = jnp.full((chunks,), size - 1, jnp.int32).at[-1].set((n - 1) % size)

        def body(st, inputs):
            qc, pc, lst = inputs
            weights = {name: st[name].weights for name in MEMORIES}
            k, v, lr, gate = self._generate(weights, pc, reads)
            log_gate = jnp.log(jnp.maximum(gate, 1e-30))
            log_beta = jnp.full_like(lr, math.log(self.momentum_rate))  # read only with momentum
            new = {}
            for name in GENERATORS:
                target = memory_apply(self.spec, weights[name], v)  # the memory's own target
                _, new[name], _ = _chunk(self.spec, st[name], (k, k, target, lr, log_gate, log_beta), lst)
            out, new["memory"], surprise = _chunk(
                self.spec, st["memory"], (qc, k, v, lr, log_gate, log_beta), lst
            )
            return new, (out, surprise, lr, gate)

        state, (out, surprise, lr, gate) = jax.lax.scan(
            body, state, (split(q), {key: split(z) for key, z in proj.items()}, last)
        )
        flat = lambda z: z.reshape(chunks * size, *z.shape[2:])[:n]  # noqa: E731
        return flat(out), state, {"surprise": flat(surprise), "lr": flat(lr), "retention": flat(gate)}

    def _scanned(self, state: dict, q: Array, proj: dict, reads):
        def step(carry, inputs):
            st, base, pos = carry
            qt, pt = inputs
            base = {name: block_base(self.spec, st[name].weights, base[name], pos) for name in MEMORIES}
            k, v, lr, gate = self._generate(base, {key: z[None] for key, z in pt.items()}, reads)
            k, v, lr, gate = k[0], v[0], lr[0], gate[0]
            new = {}
            for name in MEMORIES:
                target = v if name == "memory" else memory_apply(self.spec, base[name], v[None])[0]
                w, m, s = token_write(
                    self.spec,
                    st[name].weights,
                    st[name].momentum,
                    base[name],
                    k,
                    target,
                    lr,
                    gate,
                    self.momentum_rate,
                )
                new[name] = MemoryState(w, m)
            out = memory_apply(self.spec, new["memory"].weights, qt[None])[0]
            return (new, base, pos + 1), (out, s, lr, gate)

        base = {name: state[name].weights for name in MEMORIES}
        (state, _, _), (out, surprise, lr, gate) = jax.lax.scan(
            step, (state, base, jnp.zeros((), jnp.int32)), (q, proj)
        )
        return out, state, {"surprise": surprise, "lr": lr, "retention": gate}
