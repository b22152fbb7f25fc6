r"""Self-modifying Titans: keys, values, rates and gates produced by memories that themselves learn in context.

Per head, with static projections :math:`x^\square_t = x_t P_\square` for :math:`\square \in \{k, v, \eta,
\alpha\}` and a static query :math:`q_t = \mathrm{norm}(x_t P_q)`:

.. math::
  k_t = \mathrm{norm}(M_{k}(x^k_t)),\quad v_t = M_{v}(x^v_t),\quad
  \eta_t = \mathrm{lr}\,\sigma(w_\eta\cdot M_{\eta}(x^\eta_t) + b_\eta),\quad
  \alpha_t = \sigma(w_\alpha\cdot M_{\alpha}(x^\alpha_t) + b_\alpha),

where every :math:`M_\square` is a residual two-layer MLP memory with a meta-learned initial state (an
:class:`~nestlearn.nn.MemorySpec` with ``memory="mlp"``). Every memory writes its *own target*,
:math:`\hat v_{\square,t} = M_\square(v_t)`, at key :math:`k_t` with rate :math:`\eta_t` and gate
:math:`\alpha_t`; so does the main memory :math:`M` (``main_target="self"``, :math:`\hat v_t = M(v_t)`),
which is read at :math:`q_t`. The inner optimizer of every memory is Delta Gradient Descent
(``inner="dgd"``), with the gradient taken at the state that opened the token's chunk:

.. math::
  M_\square \leftarrow M_\square(\alpha_t I - \eta_t k_t k_t^\top)
  - \eta_t \nabla\mathcal L(M_\square^{\text{chunk start}}; k_t, \hat v_{\square,t}).

For the two-layer MLP memory (row convention, :math:`f(x) = x + \mathrm{silu}(xW_1)W_2`) the
:math:`k k^\top` term acts on each layer through its own input at the chunk-start state: :math:`W_1
\leftarrow (\alpha I - \eta\,k^\top k)W_1 - \eta\nabla_{W_1}`, :math:`W_2 \leftarrow (\alpha I - \eta\,
h^\top h)W_2 - \eta\nabla_{W_2}` with :math:`h = \mathrm{silu}(k W_1^{\text{chunk start}})`.
``inner="gd"`` is the earlier rule, :math:`\alpha_t M - \eta_t\nabla\mathcal L`.

Training is chunkwise (Nested Learning, HOPE section): inside a chunk the generators run at the state that
opened the chunk, and every memory's gradients are taken at that state, so a chunk is computed in parallel
with :mod:`nestlearn.nn._assoc`'s dual form (DGD: one unit lower-triangular solve per layer, as for the
delta rule). The per-token path (``path="token"``) does the same token by token with ``jax.grad`` and
agrees with it to float tolerance. The chunk position and the chunk-start weights are part of each
memory's state, so a sequence fed in pieces (or token by token) gives what it gives fed whole.

References:
  Behrouz et al. 2025, Nested Learning (arXiv 2512.24695 and the NeurIPS text): self-modifying Titans
  (Eqs. 83-90 of the arXiv version) and HOPE, whose inner optimizer is DGD. The paper gives no code;
  choices where it is silent or its versions differ: the generating memories see separate static
  projections of the input; the main memory's target is generated (Eq. 83, ``main_target="self"``;
  ``"v"`` writes :math:`v_t` itself); values are not normalised (only keys and queries are, as Titans
  does; ``normalize_values=True`` L2-normalises them, the behaviour before issue 12); the rate is the same
  :math:`\eta_t` in both DGD terms (no :math:`\eta/(1+\eta\lVert x\rVert^2)` rescaling: keys are unit
  norm and the default rates small, so :math:`\eta\lVert x\rVert^2 \le 1 + \alpha` holds); DGD with
  momentum is not defined (use ``inner="gd"`` with ``momentum=True``).
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
    _block_state,
    _chunk,
    _first_nonfinite,
    _l2_normalize,
    _Layout,
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
      momentum: whether every memory's update carries momentum (Titans' surprise momentum; needs
        ``inner="gd"``) ...
      momentum_rate: ... with this rate.
      inner: every memory's inner optimizer, ``"dgd"`` (the paper's, default) or ``"gd"``.
      main_target: what the main memory writes at :math:`k_t`: ``"self"`` (:math:`M(v_t)`, the paper's,
        default) or ``"v"`` (:math:`v_t`).
      normalize_values: L2-normalise the generated values (default ``False``, as the equations say).
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
        inner: str = "dgd",
        main_target: str = "self",
        normalize_values: bool = False,
        conv: int = 4,
        path: str = "chunk",
        rngs: nnx.Rngs,
    ) -> None:
        d_head = d_model // heads if d_head is None else d_head
        hidden = 2 * d_head if hidden is None else hidden
        if path not in ("chunk", "token"):
            raise ValueError(f"path must be 'chunk' or 'token', got {path!r}")
        if main_target not in ("self", "v"):
            raise ValueError(f"main_target must be 'self' or 'v', got {main_target!r}")
        self.spec = MemorySpec("mlp", "l2", momentum, False, chunk, stop_write_grad, inner)
        self.heads, self.d_head, self.lr, self.path = heads, d_head, lr, path
        self.main_target, self.normalize_values = main_target, normalize_values
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

    def _reset(self, batch: int) -> LayerState:
        """:meth:`init_state` without the block fields (known at trace time to sit at a chunk boundary)."""
        state = self.init_state(batch)
        memories = {name: MemoryState(m.weights, m.momentum) for name, m in state.memory.items()}
        return LayerState(memories, state.tail)

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
        state = self._reset(b) if state is None else state
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
        start = self._reset(x.shape[0])
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
        v = memory_apply(self.spec, weights["v"], proj["v"])
        if self.normalize_values:
            v = _l2_normalize(v)
        lr = self.lr * jax.nn.sigmoid(memory_apply(self.spec, weights["lr"], proj["lr"]) @ lr_read + lr_bias)
        gate = jax.nn.sigmoid(memory_apply(self.spec, weights["gate"], proj["gate"]) @ gate_read + gate_bias)
        return k, v, lr, gate

    def _targets(self, base: dict, v: Array) -> dict[str, Array]:
        """What each memory writes: its own read of the value at its chunk-start weights (the main memory's
        only with ``main_target="self"``)."""
        targets = {name: memory_apply(self.spec, base[name], v) for name in GENERATORS}
        targets["memory"] = memory_apply(self.spec, base["memory"], v) if self.main_target == "self" else v
        return targets

    def _chunked(self, state: dict, q: Array, proj: dict, reads):
        n = q.shape[0]
        lay = _Layout.of(self.spec, n, state["memory"].pos)
        log_rate = math.log(self.momentum_rate)

        def one_chunk(st, base, qc, pc, lst, a):
            k, v, lr, gate = self._generate(base, pc, reads)
            log_beta = jnp.full_like(lr, log_rate)  # read only with momentum
            if a is not None:  # an inactive token: lr 0, retention 1, momentum rate 1
                lr, gate, log_beta = lr * a, jnp.where(a > 0, gate, 1.0), log_beta * a
            log_gate = jnp.log(jnp.maximum(gate, 1e-30))
            targets = self._targets(base, v)
            mask = a if self.spec.momentum else None
            new, out, surprise = {}, None, None
            for name in MEMORIES:
                query = qc if name == "memory" else k
                inputs = (query, k, targets[name], lr, log_gate, log_beta)
                read, new[name], s = _chunk(self.spec, st[name], inputs, lst, base=base[name], active=mask)
                if name == "memory":
                    out, surprise = read, s
            return new, (out, surprise, lr, gate)

        plain = {name: MemoryState(m.weights, m.momentum) for name, m in state.items()}
        xs = (lay.place(q), {key: lay.place(z) for key, z in proj.items()}, lay.last)
        if lay.pos is None:  # from a chunk boundary: every chunk's gradients at its own start
            partial = n % self.spec.chunk != 0  # the last chunk stays open: keep its start

            def body(st, inputs):
                weights = {name: m.weights for name, m in st.items()}
                new, ys = one_chunk(st, weights, *inputs, None)
                return new, (*ys, weights if partial else None)

            new, (out, surprise, lr, gate, starts) = jax.lax.scan(body, plain, xs)
            take = (lambda w: w[-1]) if partial else (lambda w: w)  # noqa: E731
            kept = {
                name: jax.tree.map(take, starts[name] if partial else m.weights) for name, m in new.items()
            }
        else:  # inside a chunk: the first chunk's gradients at the open chunk's start (realigned)

            def body(carry, inputs):
                st, base, kept = carry
                *chunk_in, index = inputs
                new, ys = one_chunk(st, base, *chunk_in)
                kept = jax.tree.map(lambda b, o: jnp.where(index <= lay.last_chunk, b, o), base, kept)
                return (new, {name: m.weights for name, m in new.items()}, kept), ys

            first = {name: lay.first_base(m) for name, m in state.items()}
            xs = (*xs, lay.active(), jnp.arange(lay.chunks))
            (new, _, kept), (out, surprise, lr, gate) = jax.lax.scan(body, (plain, first, first), xs)
        state = {
            name: _block_state(self.spec, m.weights, m.momentum, kept[name], lay.pos_after)
            for name, m in new.items()
        }
        aux = {"surprise": lay.take(surprise), "lr": lay.take(lr), "retention": lay.take(gate)}
        return lay.take(out), state, aux

    def _scanned(self, state: dict, q: Array, proj: dict, reads):
        def step(carry, inputs):
            st, base, pos = carry
            qt, pt = inputs
            base = {name: block_base(self.spec, st[name].weights, base[name], pos) for name in MEMORIES}
            k, v, lr, gate = self._generate(base, {key: z[None] for key, z in pt.items()}, reads)
            k, v, lr, gate = k[0], v[0], lr[0], gate[0]
            targets = self._targets(base, v[None])
            new = {}
            for name in MEMORIES:
                w, m, s = token_write(
                    self.spec,
                    st[name].weights,
                    st[name].momentum,
                    base[name],
                    k,
                    targets[name][0],
                    lr,
                    gate,
                    self.momentum_rate,
                )
                new[name] = MemoryState(w, m)
            out = memory_apply(self.spec, new["memory"].weights, qt[None])[0]
            return (new, base, (pos + 1) % self.spec.chunk), (out, s, lr, gate)

        plain = {name: MemoryState(m.weights, m.momentum) for name, m in state.items()}
        base = {name: m.weights if m.base is None else m.base for name, m in state.items()}
        pos = state["memory"].pos
        pos = jnp.zeros((), jnp.int32) if pos is None else pos
        (new, base, pos), (out, surprise, lr, gate) = jax.lax.scan(step, (plain, base, pos), (q, proj))
        state = {
            name: _block_state(self.spec, m.weights, m.momentum, base[name], pos) for name, m in new.items()
        }
        return out, state, {"surprise": surprise, "lr": lr, "retention": gate}
