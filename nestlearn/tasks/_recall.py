"""Synthetic recall tasks for associative-memory sequence models, generated in JAX from a key.

Only some positions of a sequence are scored, so every task returns a :class:`RecallBatch` that names
them: ``positions[b, q]`` is a position in ``tokens[b]`` whose next-token prediction is scored and
``labels[b, q]`` the token it must predict. A model computes logits only there (the vocabulary is 8,192 by
default, so logits at every position would waste time), e.g.
``jnp.take_along_axis(hidden, batch.positions[..., None], axis=1)``.

- :func:`mqar`: multi-query associative recall, as the Zoology generator builds it (Arora et al. 2023).
- :func:`forgetting_mqar`: MQAR where some keys are written a second time with a new value; the latest
  value is the answer, which separates overwriting (delta-rule) memories from additive ones.
- :func:`passkey`: one key-value needle in filler tokens, asked for at the end (RULER's single needle).
- :func:`two_languages`: two random sparse Markov-chain languages over one vocabulary, for continual
  learning, with the Bayes-optimal next-token accuracy of each.

Every generator is pure, has static output shapes and int32 outputs, and works under ``jax.jit`` (sizes
as static arguments) and under ``jax.vmap`` over keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PRNGKeyArray

from nestlearn._errors import ConfigError

__all__ = [
    "RecallBatch",
    "TwoLanguages",
    "forgetting_mqar",
    "mqar",
    "passkey",
    "power_law_gaps",
    "two_languages",
]


class RecallBatch(NamedTuple):
    """A batch of sequences with the positions that are scored and the tokens expected there.

    Every field is an int32 array of fixed shape, so batches stack, scan and vmap.

    Attributes:
      tokens: ``[batch, length]`` input tokens.
      positions: ``[batch, queries]`` positions in ``tokens`` whose next-token prediction is scored.
      labels: ``[batch, queries]`` the correct prediction at each of those positions.
      kind: ``[batch, queries]`` a category per query, to split accuracy: in :func:`forgetting_mqar` 1 for
        a query of a reassigned key and 0 for a key written once; in :func:`two_languages` samples the
        language (0 or 1); 0 everywhere in :func:`mqar` and :func:`passkey`.
    """

    tokens: Int[Array, "batch length"]
    positions: Int[Array, "batch queries"]
    labels: Int[Array, "batch queries"]
    kind: Int[Array, "batch queries"]


# --------------------------------------------------------------------------------------------- checks


def _check_int(name: str, value, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_power(power):
    """A concrete power must be a positive finite number; a JAX array (e.g. traced) passes unchecked."""
    if isinstance(power, jax.Array):
        return power
    if isinstance(power, bool) or not isinstance(power, (int, float, np.floating, np.integer)):
        raise ConfigError(f"power must be a positive finite number, got {power!r}")
    if not (math.isfinite(power) and power > 0):
        raise ConfigError(f"power must be a positive finite number, got {power!r}")
    return float(power)


def _check_mqar(batch, length, pairs, vocab, power, *, writes: int, values: int) -> None:
    """Shared checks of MQAR-style layouts: ``writes`` key-value writes, ``values`` distinct values."""
    _check_int("batch", batch, low=1)
    _check_int("pairs", pairs, low=1)
    _check_int("vocab", vocab, low=4)
    _check_power(power)
    length = _check_int("length", length, low=2)
    if length % 2:
        raise ConfigError(f"length must be even (queries sit at even offsets), got {length}")
    need = 2 * writes + 2 * pairs
    if length < need:
        raise ConfigError(
            f"length={length} is too short: {writes} key-value writes and {pairs} query slots need "
            f"2 * {writes} + 2 * {pairs} = {need} tokens"
        )
    if vocab // 2 - 1 < pairs:
        raise ConfigError(
            f"vocab={vocab} is too small for {pairs} distinct keys: keys come from 1..{vocab // 2 - 1}"
        )
    if vocab - vocab // 2 < values:
        raise ConfigError(
            f"vocab={vocab} is too small for {values} distinct values: values come from "
            f"{vocab // 2}..{vocab - 1}"
        )


# --------------------------------------------------------------------------------------------- sampling


_ORDER = 1 << 30  # range of the random sort keys that shuffle Floyd's picks


def _int_blocks(key: PRNGKeyArray, batch: int, highs: list[np.ndarray]) -> list[Array]:
    """Independent ``[batch, len(h)]`` int32 blocks, column ``j`` of a block uniform on ``0..h[j]-1``.

    All blocks come from one ``randint`` call with per-column bounds: one PRNG call compiles much faster
    than several, which matters under vmap.
    """
    high = np.concatenate(highs).astype(np.int32)
    draws = jax.random.randint(key, (batch, high.size), 0, high[None, :], dtype=jnp.int32)
    return jnp.split(draws, np.cumsum([h.size for h in highs])[:-1].tolist(), axis=1)


def _distinct_highs(n: int, k: int) -> list[np.ndarray]:
    """The two blocks of draws :func:`_distinct` consumes: Floyd's ``k`` draws and ``k`` sort keys."""
    return [np.arange(n - k + 1, n + 1), np.full(k, _ORDER)]


def _distinct(floyd: Array, order: Array, n: int) -> Int[Array, "batch k"]:
    """Per row, ``k`` distinct integers from ``0..n-1``: a uniform random subset in uniform random order.

    Floyd's algorithm: for :math:`i = 0..k-1`, with :math:`j = n-k+i` and :math:`t` = ``floyd[:, i]``
    uniform on :math:`0..j`, pick :math:`t` unless it is already picked, else pick :math:`j` (never
    picked before, since every earlier pick is below :math:`j`). Every :math:`k`-subset is equally likely
    (Bentley and Floyd, "Programming pearls: a sample of brilliance", CACM 1987), for :math:`O(k^2)` work
    per row instead of :math:`O(n)` for shuffling all candidates (:math:`n` is 4,095 for the default
    vocabulary). Floyd's pick order is not uniform (:math:`j` comes late), so the picks are then sorted
    by iid sort keys ``order`` (ties, of probability below :math:`k^2 / 2^{31}`, keep the pick order).
    """
    k = floyd.shape[1]

    def pick(i, chosen):
        t = floyd[:, i]
        taken = (chosen == t[:, None]).any(axis=1)
        return chosen.at[:, i].set(jnp.where(taken, n - k + i, t))

    chosen = jax.lax.fori_loop(0, k, pick, jnp.full(floyd.shape, -1, jnp.int32))
    return jnp.take_along_axis(chosen, jnp.argsort(order, axis=1).astype(jnp.int32), axis=1)


def power_law_gaps(space: int, power: float) -> np.ndarray:
    """The gap distribution of MQAR's queries: :math:`p(g) \\propto (g + 1)^{a - 1}` on ``0..space-1``.

    .. math::
      p(g) = \\frac{(g + 1)^{a - 1}}{\\sum_{j=1}^{S} j^{a - 1}}, \\quad g = 0, \\dots, S - 1

    with :math:`a` = ``power`` and :math:`S` = ``space``. Zoology writes it as
    :math:`a\\,k^{a-1}` normalised, :math:`k = g + 1`; the factor :math:`a` cancels. With the paper's
    :math:`a = 0.01` small gaps dominate (a query tends to follow its pair soon); :math:`a = 1` is uniform.

    Args:
      space: the number of query slots.
      power: the exponent :math:`a > 0`.

    Returns:
      ``[space]`` float64 probabilities that sum to one.

    Example:
      >>> p = power_law_gaps(3, 1.0)
      >>> [round(float(x), 3) for x in p]
      [0.333, 0.333, 0.333]

    References:
      S. Arora, S. Eyuboglu et al., "Zoology: Measuring and improving recall in efficient language
      models", 2023 (arXiv 2312.04927), and its public generator ``zoology/data/multiquery_ar.py``.
    """
    space = _check_int("space", space, low=1)
    power = _check_power(power)
    w = np.arange(1, space + 1, dtype=np.float64) ** (power - 1.0)
    return w / w.sum()


def _gaps(noise: Array, power, k: int) -> Int[Array, "batch k"]:
    """``k`` distinct query slots drawn one after another from the power law, without replacement.

    Gumbel top-k: the indices of the ``k`` largest :math:`\\log p(g) + G_g` (:math:`G_g` iid Gumbel), in
    decreasing order, are distributed as successive sampling without replacement (draw one slot from
    :math:`p`, remove it, renormalise, repeat), which is what ``numpy.random.choice(replace=False, p=p)``
    draws in Zoology. So the first slot has exactly the law :math:`p`. ``noise`` is ``[batch, space]``
    iid Gumbel.
    """
    space = noise.shape[1]
    # log p(g) up to its normaliser, which does not change the top-k
    logw = (jnp.asarray(power, jnp.float32) - 1.0) * jnp.log(jnp.arange(1, space + 1, dtype=jnp.float32))
    return jax.lax.top_k(logw[None, :] + noise, k)[1].astype(jnp.int32)


def _interleave(keys: Array, values: Array) -> Array:
    """Per row, ``k0 v0 k1 v1 ...`` from ``[batch, n]`` keys and values."""
    return jnp.stack([keys, values], axis=-1).reshape(keys.shape[0], -1)


def _rows(batch: int) -> Int[Array, "batch 1"]:
    """Row indices to scatter one set of columns per row: ``x.at[_rows(b), cols].set(v)``."""
    return jnp.arange(batch, dtype=jnp.int32)[:, None]


# --------------------------------------------------------------------------------------------- MQAR


def mqar(
    key: PRNGKeyArray,
    batch: int,
    *,
    length: int = 64,
    pairs: int = 4,
    vocab: int = 8192,
    power: float = 0.01,
    random_filler: bool = True,
) -> RecallBatch:
    """Multi-query associative recall (MQAR), laid out as the Zoology generator lays it out.

    With :math:`N` = ``pairs``, :math:`L` = ``length``, :math:`V` = ``vocab`` and :math:`h = \\lfloor V/2
    \\rfloor`, each sequence, independently of the others:

    - keys :math:`k_1..k_N`: distinct, uniform from :math:`\\{1, \\dots, h-1\\}` (the lower half; token 0
      is never a key, Zoology reserves it as the filler placeholder);
    - values :math:`v_1..v_N`: distinct, uniform from :math:`\\{h, \\dots, V-1\\}` (the upper half);
    - positions :math:`0..2N-1` hold :math:`k_1 v_1 k_2 v_2 \\dots k_N v_N`;
    - the rest is :math:`S = (L - 2N)/2` query slots of two tokens; slots :math:`g_1..g_N` are drawn
      without replacement from the power law :math:`p(g) \\propto (g+1)^{a-1}` (:func:`power_law_gaps`,
      :math:`a` = ``power``), and key :math:`k_i` is written at position :math:`q_i = 2N + 2 g_i`
      (an even position);
    - query :math:`i` scores position :math:`q_i` with label :math:`v_i`: having read the key again, the
      model must predict its value. As in Zoology the value is *not* written after the query key
      (position :math:`q_i + 1` is filler), so labels never leak into the inputs;
    - every other position is filler: with ``random_filler`` (Zoology's default
      ``random_non_queries=True``) a token uniform on the whole vocabulary :math:`\\{0..V-1\\}`, so a
      filler may by chance equal a key or value; otherwise token 0.

    Query ``i`` asks for the ``i``-th pair of the context (positions are therefore not sorted).

    Args:
      key: a PRNG key.
      batch: sequences to draw (static).
      length: tokens per sequence, even, at least ``4 * pairs`` (static).
      pairs: key-value pairs per sequence, each queried once (static).
      vocab: vocabulary size; needs ``vocab // 2 - 1 >= pairs`` (static).
      power: exponent :math:`a > 0` of the gap power law; the paper uses 0.01 (may be traced, e.g. to
        vmap over a sweep; a traced value is not checked).
      random_filler: random filler tokens (Zoology's default) or token 0 (may be traced).

    Returns:
      A :class:`RecallBatch` with ``tokens [batch, length]`` and ``positions``, ``labels``, ``kind`` (all 0)
      of shape ``[batch, pairs]``, all int32.

    Example:
      >>> import jax
      >>> b = mqar(jax.random.key(0), 2, length=16, pairs=2, vocab=32)
      >>> b.tokens.shape, b.positions.shape
      ((2, 16), (2, 2))
      >>> bool((b.tokens[0, b.positions[0]] == b.tokens[0, :4:2]).all())
      True

    References:
      S. Arora, S. Eyuboglu et al., "Zoology: Measuring and improving recall in efficient language
      models", 2023 (arXiv 2312.04927); public generator ``zoology/data/multiquery_ar.py``.
    """
    _check_mqar(batch, length, pairs, vocab, power, writes=pairs, values=pairs)
    sizes = dict(batch=int(batch), length=int(length), pairs=int(pairs), vocab=int(vocab))
    return _mqar(key, power, random_filler, **sizes)


@functools.partial(jax.jit, static_argnames=("batch", "length", "pairs", "vocab"))
def _mqar(key, power, random_filler, *, batch, length, pairs, vocab) -> RecallBatch:
    half = vocab // 2
    space = (length - 2 * pairs) // 2

    k_int, k_gap = jax.random.split(key)
    highs = [*_distinct_highs(half - 1, pairs), *_distinct_highs(vocab - half, pairs), np.full(length, vocab)]
    f_key, o_key, f_val, o_val, fill = _int_blocks(k_int, batch, highs)
    keys = 1 + _distinct(f_key, o_key, half - 1)
    values = half + _distinct(f_val, o_val, vocab - half)
    positions = 2 * pairs + 2 * _gaps(jax.random.gumbel(k_gap, (batch, space)), power, pairs)
    tokens = jnp.where(random_filler, fill, 0)
    tokens = tokens.at[:, : 2 * pairs].set(_interleave(keys, values)).at[_rows(batch), positions].set(keys)
    return RecallBatch(tokens, positions, values, jnp.zeros((batch, pairs), jnp.int32))


def forgetting_mqar(
    key: PRNGKeyArray,
    batch: int,
    *,
    length: int = 128,
    pairs: int = 8,
    reassign: int = 4,
    vocab: int = 8192,
    power: float = 0.01,
    random_filler: bool = True,
) -> RecallBatch:
    """MQAR where ``reassign`` of the keys are written again with new values; the latest value is the answer.

    The layout follows Zoology's ``forgetting_mqar`` generator. With :math:`N` = ``pairs``, :math:`R` =
    ``reassign`` and :math:`h = \\lfloor V/2 \\rfloor`:

    - keys :math:`k_1..k_N` distinct from :math:`\\{1..h-1\\}`; :math:`N + R` distinct values from
      :math:`\\{h..V-1\\}`: the first :math:`N` are the original values :math:`v_1..v_N`, the last
      :math:`R` the new values :math:`w_1..w_R` (so a new value differs from every original value, and
      from the reassigned key's own original value in particular);
    - positions :math:`0..2N-1`: the first writes :math:`k_1 v_1 \\dots k_N v_N`;
    - positions :math:`2N..2(N+R)-1`: the second writes :math:`k_{r_1} w_1 \\dots k_{r_R} w_R`, where
      :math:`r_1..r_R` are distinct pair indices drawn uniformly (in random order);
    - the remaining :math:`S = (L - 2(N+R))/2` two-token query slots: as in :func:`mqar`, slot
      :math:`g_i` from the power law and key :math:`k_i` at position :math:`q_i = 2(N+R) + 2 g_i`, which
      is after every write of every key;
    - label of query :math:`i`: the latest value of :math:`k_i`, :math:`w_j` if :math:`i = r_j`, else
      :math:`v_i`; ``kind`` is 1 for reassigned keys, 0 for keys written once;
    - filler elsewhere, as in :func:`mqar`.

    An additive memory (linear attention) holds :math:`k \\otimes v + k \\otimes w` for a reassigned key
    and answers with a blend; a delta-rule memory overwrites :math:`v` with :math:`w`. Split accuracy
    by ``kind`` to see it. ``reassign=0`` is :func:`mqar` with ``length`` and ``pairs``.

    Args:
      key: a PRNG key.
      batch: sequences to draw (static).
      length: tokens per sequence, even, at least ``2 * (pairs + reassign) + 2 * pairs`` (static).
      pairs: distinct keys per sequence, each queried once (static).
      reassign: keys written a second time, ``0 <= reassign <= pairs`` (static).
      vocab: vocabulary size; needs ``vocab // 2 - 1 >= pairs`` and ``vocab - vocab // 2 >= pairs +
        reassign`` (static).
      power: exponent :math:`a > 0` of the gap power law (may be traced).
      random_filler: random filler tokens (Zoology's default) or token 0 (may be traced).

    Returns:
      A :class:`RecallBatch`: ``tokens [batch, length]``; ``positions``, ``labels``, ``kind`` of shape
      ``[batch, pairs]``, all int32.

    Example:
      >>> import jax
      >>> b = forgetting_mqar(jax.random.key(0), 3, length=32, pairs=4, reassign=2, vocab=64)
      >>> b.labels.shape, [int(n) for n in b.kind.sum(1)]
      ((3, 4), [2, 2, 2])

    References:
      S. Arora, S. Eyuboglu et al., "Zoology", 2023; public generator ``zoology/data/forgetting_mqar.py``.
    """
    if isinstance(reassign, bool) or not isinstance(reassign, (int, np.integer)) or reassign < 0:
        raise ConfigError(f"reassign must be an int >= 0, got {reassign!r}")
    if isinstance(pairs, (int, np.integer)) and not isinstance(pairs, bool) and reassign > pairs:
        raise ConfigError(f"reassign must be <= pairs ({pairs}), got {reassign}")
    _check_mqar(batch, length, pairs, vocab, power, writes=pairs + reassign, values=pairs + reassign)
    sizes = dict(
        batch=int(batch), length=int(length), pairs=int(pairs), reassign=int(reassign), vocab=int(vocab)
    )
    return _forgetting_mqar(key, power, random_filler, **sizes)


@functools.partial(jax.jit, static_argnames=("batch", "length", "pairs", "reassign", "vocab"))
def _forgetting_mqar(key, power, random_filler, *, batch, length, pairs, reassign, vocab) -> RecallBatch:
    half = vocab // 2
    context = 2 * (pairs + reassign)
    space = (length - context) // 2

    rows = _rows(batch)
    k_int, k_gap = jax.random.split(key)
    highs = [
        *_distinct_highs(half - 1, pairs),
        *_distinct_highs(vocab - half, pairs + reassign),
        *_distinct_highs(pairs, reassign),
        np.full(length, vocab),
    ]
    f_key, o_key, f_val, o_val, f_which, o_which, fill = _int_blocks(k_int, batch, highs)
    keys = 1 + _distinct(f_key, o_key, half - 1)
    values = half + _distinct(f_val, o_val, vocab - half)
    first, new = values[:, :pairs], values[:, pairs:]
    which = _distinct(f_which, o_which, pairs)  # indices of the reassigned pairs, in write order
    latest = first.at[rows, which].set(new)
    kind = jnp.zeros((batch, pairs), jnp.int32).at[rows, which].set(1)
    second = _interleave(jnp.take_along_axis(keys, which, axis=1), new)
    writes = jnp.concatenate([_interleave(keys, first), second], axis=1)
    positions = context + 2 * _gaps(jax.random.gumbel(k_gap, (batch, space)), power, pairs)
    tokens = jnp.where(random_filler, fill, 0)
    tokens = tokens.at[:, :context].set(writes).at[rows, positions].set(keys)
    return RecallBatch(tokens, positions, latest, kind)


# --------------------------------------------------------------------------------------------- passkey


def passkey(
    key: PRNGKeyArray,
    batch: int,
    *,
    length: int = 256,
    vocab: int = 8192,
    filler_vocab: int | None = None,
    value_length: int = 1,
    depth: float | None = None,
) -> RecallBatch:
    """Passkey retrieval: one key-value needle hidden in filler, asked for at the end (RULER single needle).

    The vocabulary is cut into three disjoint ranges, with :math:`F` = ``filler_vocab`` (default
    :math:`\\lfloor V/2 \\rfloor`) and :math:`c = F + \\lfloor (V - F)/2 \\rfloor`: filler tokens
    :math:`\\{0..F-1\\}`, needle keys :math:`\\{F..c-1\\}`, value tokens :math:`\\{c..V-1\\}`. With
    :math:`m` = ``value_length`` and :math:`L` = ``length``, a sequence is

    .. math::
      \\underbrace{f \\dots f}_{d}\\; K\\, u_1 \\dots u_m\\; f \\dots f\\; K\\, u_1 \\dots u_{m-1}

    with filler :math:`f` iid uniform on the filler range, the key :math:`K` uniform on the key range,
    values :math:`u_j` iid uniform on the value range, and the needle's start :math:`d` uniform on
    :math:`\\{0..L-2m-1\\}` (or :math:`d = \\mathrm{round}(\\text{depth} \\cdot (L-2m-1))` (half to even) for a fixed
    ``depth`` in [0, 1], as RULER sweeps the needle's depth). The last :math:`m` positions are scored:
    position :math:`L-m+j` (reading :math:`K` then :math:`u_1..u_j`) must predict :math:`u_{j+1}`, the
    value read back token by token. The needle always ends before the final query. The needle's
    position is the first key-range token of ``tokens``.

    Args:
      key: a PRNG key.
      batch: sequences to draw (static).
      length: tokens per sequence, at least ``2 * value_length + 1`` (static).
      vocab: vocabulary size (static).
      filler_vocab: size of the filler range ``0..filler_vocab-1``; ``vocab - filler_vocab`` must leave
        at least two tokens for keys and values (static).
      value_length: tokens of the value (static).
      depth: the needle's relative depth in [0, 1], or ``None`` for a uniform start; a float may be
        traced (unchecked), ``None`` or not is static.

    Returns:
      A :class:`RecallBatch`: ``tokens [batch, length]``; ``positions``, ``labels`` and ``kind`` (all 0)
      of shape ``[batch, value_length]``, all int32.

    Example:
      >>> import jax
      >>> b = passkey(jax.random.key(0), 2, length=32, vocab=64, value_length=2)
      >>> [int(p) for p in b.positions[0]]
      [30, 31]

    References:
      C.-P. Hsieh et al., "RULER: What's the real context size of your long-context language models?",
      2024 (arXiv 2404.06654); A. Mohtashami and M. Jaggi, "Landmark attention", 2023 (the passkey task).
    """
    _check_int("batch", batch, low=1)
    vocab = _check_int("vocab", vocab, low=3)
    m = _check_int("value_length", value_length, low=1)
    length = _check_int("length", length, low=1)
    if length < 2 * m + 1:
        raise ConfigError(f"length must be >= 2 * value_length + 1 = {2 * m + 1}, got {length}")
    f = vocab // 2 if filler_vocab is None else filler_vocab
    f = _check_int("filler_vocab", f, low=1)
    if vocab - f < 2:
        raise ConfigError(
            f"filler_vocab={f} leaves {vocab - f} tokens of vocab={vocab}; keys and values need at least 2"
        )
    if depth is not None and not isinstance(depth, jax.Array):
        if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
            raise ConfigError(f"depth must be a number in [0, 1] or None, got {depth!r}")
    fixed = jnp.asarray(0.0 if depth is None else depth, jnp.float32)
    sizes = dict(batch=int(batch), length=length, vocab=vocab, f=f, m=m)
    return _passkey(key, fixed, depth is None, **sizes)


@functools.partial(jax.jit, static_argnames=("batch", "length", "vocab", "f", "m"))
def _passkey(key, depth, random_depth, *, batch, length, vocab, f, m) -> RecallBatch:
    cut = f + (vocab - f) // 2
    last_start = length - 2 * m - 1

    # one randint call with per-column bounds: filler, the needle's key, its values, its start
    low = np.array([0] * length + [f] + [cut] * m + [0], np.int32)
    high = np.array([f] * length + [cut] + [vocab] * m + [last_start + 1], np.int32)
    draws = jax.random.randint(key, (batch, length + m + 2), low[None, :], high[None, :], dtype=jnp.int32)
    tokens, needle, drawn = draws[:, :length], draws[:, length : length + m + 1], draws[:, length + m + 1 :]
    values = needle[:, 1:]
    fixed = jnp.clip(jnp.round(depth * last_start), 0, last_start).astype(jnp.int32)
    start = jnp.where(random_depth, drawn, fixed)
    tokens = tokens.at[_rows(batch), start + jnp.arange(m + 1, dtype=jnp.int32)[None, :]].set(needle)
    tokens = tokens.at[:, length - m :].set(needle[:, :m])
    positions = jnp.broadcast_to(jnp.arange(length - m, length, dtype=jnp.int32), (batch, m))
    return RecallBatch(tokens, positions, values, jnp.zeros((batch, m), jnp.int32))


# --------------------------------------------------------------------------------------------- languages


def _stationary(successors: np.ndarray, probs: np.ndarray, *, tol: float = 1e-13) -> np.ndarray:
    """Stationary distribution of a sparse chain by power iteration on the lazy chain (P + I) / 2.

    The lazy chain has the same stationary distributions as P and is aperiodic, so the iteration from the
    uniform distribution converges (to the unique one when P is irreducible).
    """
    v = successors.shape[0]
    pi = np.full(v, 1.0 / v)
    for _ in range(200_000):
        step = np.bincount(successors.ravel(), weights=(pi[:, None] * probs).ravel(), minlength=v)
        new = 0.5 * pi + 0.5 * step
        if np.abs(new - pi).sum() < tol:
            return new / new.sum()
        pi = new
    return pi / pi.sum()


@dataclasses.dataclass(frozen=True, eq=False)
class TwoLanguages:
    """Two first-order Markov-chain languages over one vocabulary, for continual next-token learning.

    Language :math:`\\ell \\in \\{0, 1\\}` moves from token :math:`s` to ``successors[ℓ, s, j]`` with
    probability ``probs[ℓ, s, j]``; the first token is drawn from the chain's stationary distribution
    :math:`\\pi_\\ell` (so every position's marginal is :math:`\\pi_\\ell`). The Bayes-optimal predictor
    names the most likely successor of the current token, and its accuracy at every scored position is

    .. math::
      \\mathrm{acc}^*_\\ell = \\sum_s \\pi_\\ell(s) \\max_j P_\\ell(s, j)

    Build random languages with :func:`two_languages`, or give hand-made tables.

    Attributes:
      successors: ``[2, vocab, branching]`` int, the successors of each token, distinct within a row.
      probs: ``[2, vocab, branching]`` float, their probabilities; each row sums to one.
      stationary: ``[2, vocab]`` float64, :math:`\\pi_\\ell` (computed; not an argument).

    Example:
      >>> import jax
      >>> langs = two_languages(0, vocab=16, branching=2)
      >>> b = langs.sample(jax.random.key(0), 1, batch=4, length=10)
      >>> b.tokens.shape, b.positions.shape, 0.5 <= langs.optimal_accuracy(1) <= 1.0
      ((4, 10), (4, 9), True)
    """

    successors: np.ndarray
    probs: np.ndarray
    stationary: np.ndarray = dataclasses.field(init=False)

    def __post_init__(self):
        succ = np.asarray(self.successors)
        probs = np.asarray(self.probs, dtype=np.float64)
        if succ.ndim != 3 or succ.shape[0] != 2 or succ.shape[2] < 1:
            raise ConfigError(f"successors must have shape [2, vocab, branching], got {succ.shape}")
        if probs.shape != succ.shape:
            raise ConfigError(f"probs must have the shape of successors {succ.shape}, got {probs.shape}")
        if not np.issubdtype(succ.dtype, np.integer):
            raise ConfigError(f"successors must be integers, got dtype {succ.dtype}")
        v = succ.shape[1]
        if succ.min() < 0 or succ.max() >= v:
            raise ConfigError(f"successors must lie in 0..{v - 1}, got values in {succ.min()}..{succ.max()}")
        if (np.diff(np.sort(succ, axis=-1), axis=-1) == 0).any():
            raise ConfigError("successors must be distinct within each row")
        if not np.isfinite(probs).all() or (probs < 0).any():
            raise ConfigError("probs must be finite and non-negative")
        sums = probs.sum(-1)
        if not np.allclose(sums, 1.0, atol=1e-6):
            worst = np.unravel_index(np.argmax(np.abs(sums - 1.0)), sums.shape)
            raise ConfigError(f"probs rows must sum to 1; row {tuple(map(int, worst))} sums to {sums[worst]}")
        probs = probs / sums[..., None]
        object.__setattr__(self, "successors", succ.astype(np.int32))
        object.__setattr__(self, "probs", probs)
        object.__setattr__(self, "stationary", np.stack([_stationary(succ[i], probs[i]) for i in range(2)]))

    @property
    def vocab(self) -> int:
        """Vocabulary size."""
        return int(self.successors.shape[1])

    def transition_matrix(self, language: int) -> np.ndarray:
        """The dense ``[vocab, vocab]`` float64 transition matrix :math:`P_\\ell` of a language."""
        language = self._check_language(language)
        p = np.zeros((self.vocab, self.vocab))
        np.put_along_axis(p, self.successors[language], self.probs[language], axis=1)
        return p

    def optimal_accuracy(self, language: int) -> float:
        """Bayes-optimal next-token accuracy :math:`\\sum_s \\pi_\\ell(s) \\max_j P_\\ell(s, j)`."""
        language = self._check_language(language)
        return float(self.stationary[language] @ self.probs[language].max(-1))

    def sample(
        self, key: PRNGKeyArray, language: int | Int[Array, ""], batch: int, length: int
    ) -> RecallBatch:
        """``batch`` sequences of ``length`` tokens of one language, every next token scored.

        Args:
          key: a PRNG key.
          language: 0 or 1; may be a traced int32 (e.g. the task index of a scan).
          batch: sequences (static).
          length: tokens per sequence, at least 2 (static).

        Returns:
          A :class:`RecallBatch` with ``tokens [batch, length]``, ``positions`` = ``0..length-2`` and
          ``labels`` = ``tokens[:, 1:]`` of shape ``[batch, length - 1]``, and ``kind`` = the language.
        """
        _check_int("batch", batch, low=1)
        _check_int("length", length, low=2)
        if not isinstance(language, jax.Array):
            self._check_language(language)
        tables = (self.successors, self.probs.astype(np.float32), self.stationary.astype(np.float32))
        return _markov_sample(key, jnp.asarray(language, jnp.int32), *tables, int(batch), int(length))

    @staticmethod
    def _check_language(language) -> int:
        if (
            isinstance(language, bool)
            or not isinstance(language, (int, np.integer))
            or language not in (0, 1)
        ):
            raise ConfigError(f"language must be 0 or 1, got {language!r}")
        return int(language)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _markov_sample(key, lang, successors, probs, stationary, batch, length) -> RecallBatch:
    # Categorical draws as argmax(log p + Gumbel), all the noise from one PRNG call.
    succ = successors[lang]
    logp = jnp.log(probs[lang])
    vocab, branching = succ.shape
    noise = jax.random.gumbel(key, (batch, vocab + (length - 1) * branching))
    first = jnp.argmax(jnp.log(stationary[lang])[None, :] + noise[:, :vocab], axis=1).astype(jnp.int32)
    steps = noise[:, vocab:].reshape(batch, length - 1, branching).transpose(1, 0, 2)

    def step(tok, g):
        j = jnp.argmax(logp[tok] + g, axis=1)
        nxt = jnp.take_along_axis(succ[tok], j[:, None], axis=1)[:, 0]
        return nxt, nxt

    _, rest = jax.lax.scan(step, first, steps)
    tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
    positions = jnp.broadcast_to(jnp.arange(length - 1, dtype=jnp.int32), (batch, length - 1))
    kind = jnp.broadcast_to(lang, (batch, length - 1))
    return RecallBatch(tokens, positions, tokens[:, 1:], kind)


def two_languages(
    seed: int, *, vocab: int = 64, branching: int = 2, concentration: float = 1.0
) -> TwoLanguages:
    """Two random sparse Markov-chain languages over one vocabulary, with different tables.

    Language :math:`\\ell` is drawn from ``numpy.random.default_rng([seed, ℓ])``: each token :math:`s`
    gets ``branching`` distinct successors, the first of them :math:`\\sigma(s)` for a random cyclic
    permutation :math:`\\sigma` of the vocabulary (which makes the chain irreducible, so its stationary
    distribution is unique), the others uniform among the remaining tokens; their probabilities are a
    :math:`\\mathrm{Dirichlet}(\\alpha, \\dots, \\alpha)` draw, :math:`\\alpha` = ``concentration``, fixed
    per token. A smaller :math:`\\alpha` makes the chains more predictable (higher optimal accuracy).

    Train on language 0, then on language 1, and measure how much of language 0 survives; compare with
    :meth:`TwoLanguages.optimal_accuracy`.

    Args:
      seed: an int; the two languages come from its two sub-seeds.
      vocab: tokens shared by both languages, at least 2.
      branching: successors per token, ``1 <= branching <= vocab``.
      concentration: Dirichlet parameter of the successor probabilities, positive.

    Returns:
      A :class:`TwoLanguages`.

    Example:
      >>> langs = two_languages(0, vocab=8, branching=1)
      >>> langs.optimal_accuracy(0)  # deterministic successors
      1.0
    """
    seed = _check_int("seed", seed, low=0)
    vocab = _check_int("vocab", vocab, low=2)
    branching = _check_int("branching", branching, low=1)
    if branching > vocab:
        raise ConfigError(f"branching must be <= vocab ({vocab}), got {branching}")
    if isinstance(concentration, bool) or not (
        isinstance(concentration, (int, float)) and math.isfinite(concentration) and concentration > 0
    ):
        raise ConfigError(f"concentration must be a positive finite number, got {concentration!r}")
    succs, probs = [], []
    for language in range(2):
        rng = np.random.default_rng([seed, language])
        order = rng.permutation(vocab)
        cycle = np.empty(vocab, np.int64)
        cycle[order] = np.roll(order, -1)
        rows = []
        for s in range(vocab):
            others = np.delete(np.arange(vocab), cycle[s])
            rows.append(np.concatenate([[cycle[s]], rng.choice(others, branching - 1, replace=False)]))
        succs.append(np.stack(rows))
        probs.append(rng.dirichlet(np.full(branching, float(concentration)), size=vocab))
    return TwoLanguages(np.stack(succs), np.stack(probs))
