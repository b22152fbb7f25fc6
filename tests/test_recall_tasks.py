"""Recall tasks: layouts recomputed in numpy from the tokens, the gap law against its closed form, Markov
samples against their tables, optimal accuracy on hand-built chains, jit / vmap, and argument checks."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nestlearn.tasks import RecallBatch, TwoLanguages, _recall, forgetting_mqar, mqar, passkey, two_languages


def _np(batch: RecallBatch):
    for field in batch:
        assert field.dtype == jnp.int32
    return [np.asarray(x) for x in batch]


def _within(freq: float, p: float, n: int, sds: float = 4.5) -> bool:
    """``freq`` of ``n`` Bernoulli(p) draws within ``sds`` binomial standard deviations of ``p``."""
    return abs(freq - p) <= sds * np.sqrt(p * (1 - p) / n) + 1e-12


# --------------------------------------------------------------------------------------------- MQAR


def test_mqar_layout_recomputed_from_tokens():
    n, length, pairs, vocab = 64, 64, 4, 8192
    tokens, positions, labels, kind = _np(mqar(jax.random.key(0), n, length=length, pairs=pairs))
    assert tokens.shape == (n, length) and positions.shape == labels.shape == kind.shape == (n, pairs)
    keys, values = tokens[:, 0 : 2 * pairs : 2], tokens[:, 1 : 2 * pairs : 2]
    # Zoology: keys in 1..vocab/2-1 (token 0 reserved), values in vocab/2..vocab-1
    assert keys.min() >= 1 and keys.max() < vocab // 2
    assert values.min() >= vocab // 2 and values.max() < vocab
    for b in range(n):
        assert len(set(keys[b])) == pairs and len(set(values[b])) == pairs
        assert len(set(positions[b])) == pairs
        value_of = dict(zip(keys[b], values[b]))
        for q in range(pairs):
            p = positions[b, q]
            assert p >= 2 * pairs and p % 2 == 0 and p < length  # query slots: even, after the pairs
            assert tokens[b, p] == keys[b, q]  # query q asks for pair q
            assert labels[b, q] == value_of[tokens[b, p]]
    assert (kind == 0).all()


def test_mqar_zero_filler_and_random_filler_range():
    n, length, pairs, vocab = 6000, 64, 4, 64  # the sizes of the power-law test: one compilation
    tokens, positions, _, _ = _np(
        mqar(jax.random.key(1), n, length=length, pairs=pairs, vocab=vocab, random_filler=False)
    )
    filler = np.ones_like(tokens, bool)
    filler[:, : 2 * pairs] = False
    np.put_along_axis(filler, positions, False, axis=1)
    assert (tokens[filler] == 0).all() and (tokens[~filler] != 0).all()
    # Random filler is uniform on 0..vocab-1 (Zoology's random_non_queries): mean (V-1)/2, s.d. of the
    # mean V/sqrt(12 m) for m filler tokens; and it takes the zero-filler's place only.
    tokens_r, positions_r, labels_r, _ = _np(
        mqar(jax.random.key(2), n, length=length, pairs=pairs, vocab=vocab)
    )
    filler = np.ones_like(tokens_r, bool)
    filler[:, : 2 * pairs] = False
    np.put_along_axis(filler, positions_r, False, axis=1)
    fill = tokens_r[filler].astype(np.float64)
    assert abs(fill.mean() - (vocab - 1) / 2) < 4.5 * vocab / np.sqrt(12 * fill.size)
    assert fill.min() == 0 and fill.max() == vocab - 1
    assert labels_r.min() >= vocab // 2


def test_mqar_gap_power_law_against_closed_form():
    # length 64, 4 pairs: space S = (64 - 8) / 2 = 28 query slots. Zoology's law p(g) = (g+1)^(a-1) / Z,
    # Z = sum_{k=1}^{28} k^(a-1), a = 0.01; slots are drawn without replacement one after another, so the
    # first query's slot has law p exactly, and the second is slot 0 with probability
    # sum_{j != 0} p_j * p_0 / (1 - p_j) (first draw j, then 0 among the rest).
    n, length, pairs, a = 6000, 64, 4, 0.01
    space = (length - 2 * pairs) // 2
    p = np.arange(1, space + 1, dtype=np.float64) ** (a - 1)
    p /= p.sum()
    # by hand: k^-0.99 = k^-1 * exp(0.01 ln k) ≈ (1 + 0.01 ln k) / k, so
    # Z ≈ H_28 + 0.01 * sum_k ln k / k ≈ 3.927 + 0.055 = 3.982 and p_0 ≈ 0.2511
    assert abs(p[0] - 0.2511) < 1e-3
    _, positions, _, _ = _np(mqar(jax.random.key(3), n, length=length, pairs=pairs, vocab=64, power=a))
    gaps = (positions - 2 * pairs) // 2
    for g in range(6):
        assert _within(np.mean(gaps[:, 0] == g), p[g], n), g
    assert _within(np.mean(gaps[:, 0] >= 14), p[14:].sum(), n)
    second = np.sum(np.delete(p, 0) * p[0] / (1 - np.delete(p, 0)))
    assert _within(np.mean(gaps[:, 1] == 0), second, n)
    np.testing.assert_allclose(_recall.power_law_gaps(space, a), p, rtol=1e-12)
    # power 1 is uniform: each slot 1/28
    _, positions, _, _ = _np(mqar(jax.random.key(4), n, length=length, pairs=pairs, vocab=64, power=1.0))
    assert _within(np.mean(positions[:, 0] == 2 * pairs), 1 / space, n)


def test_mqar_keys_and_values_are_uniform_subsets_in_uniform_order():
    # The sizes of the power-law test (one compilation): keys from 1..31, values from 32..63, 4 of each.
    # A uniform 4-subset in uniform order: each slot's key is uniform on 31 values (1/31 each); the largest
    # of the 4 keys sits in each slot with probability 1/4 (Floyd's algorithm alone puts it late); and
    # slot 0 < slot 1 with probability 1/2.
    n = 6000
    tokens, _, _, _ = _np(mqar(jax.random.key(14), n, length=64, pairs=4, vocab=64))
    keys, values = tokens[:, 0:8:2], tokens[:, 1:8:2]
    for slot in range(4):
        for k in (1, 16, 31):
            assert _within(np.mean(keys[:, slot] == k), 1 / 31, n), (slot, k)
        assert _within(np.mean(np.argmax(keys, 1) == slot), 0.25, n), slot
        assert _within(np.mean(np.argmax(values, 1) == slot), 0.25, n), slot
    assert _within(np.mean(keys[:, 0] < keys[:, 1]), 0.5, n)
    # the count of each key over all slots: 4/31 per row in expectation
    counts = np.bincount(keys.ravel(), minlength=32)[1:]
    assert (np.abs(counts / n - 4 / 31) < 4.5 * np.sqrt(4 / 31 * (27 / 31) / n)).all()


# --------------------------------------------------------------------------------------------- forgetting


def test_forgetting_mqar_labels_are_latest_writes():
    n, length, pairs, reassign, vocab = 64, 128, 8, 4, 8192
    tokens, positions, labels, kind = _np(
        forgetting_mqar(jax.random.key(5), n, length=length, pairs=pairs, reassign=reassign, vocab=vocab)
    )
    context = 2 * (pairs + reassign)
    for b in range(n):
        writes = tokens[b, :context].reshape(-1, 2)
        first = writes[:pairs]
        assert len(set(first[:, 0])) == pairs and first[:, 0].min() >= 1 and first[:, 0].max() < vocab // 2
        assert writes[:, 1].min() >= vocab // 2 and len(set(writes[:, 1])) == pairs + reassign
        latest, last_pos, count = {}, {}, {}
        for i, (k, v) in enumerate(writes):
            latest[k], last_pos[k], count[k] = v, 2 * i, count.get(k, 0) + 1
        assert sorted(count.values()) == [1] * (pairs - reassign) + [2] * reassign
        assert sorted(tokens[b, positions[b]]) == sorted(first[:, 0])  # every key queried once
        for q in range(pairs):
            k = tokens[b, positions[b, q]]
            assert positions[b, q] > last_pos[k] + 1 and positions[b, q] % 2 == 0
            assert labels[b, q] == latest[k]
            assert kind[b, q] == (count[k] == 2)
            if count[k] == 2:  # the new value differs from the key's first value
                assert labels[b, q] != first[first[:, 0] == k, 1][0]


# --------------------------------------------------------------------------------------------- passkey


@pytest.mark.parametrize("m", [1, 3])
def test_passkey_label_is_the_needle_value(m):
    n, length, vocab, fv = 200, 40, 96, 48
    cut = fv + (vocab - fv) // 2
    tokens, positions, labels, _ = _np(
        passkey(jax.random.key(7), n, length=length, vocab=vocab, filler_vocab=fv, value_length=m)
    )
    np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(length - m, length), (n, m)))
    starts = []
    for b in range(n):
        at_key = np.flatnonzero((tokens[b] >= fv) & (tokens[b] < cut))
        assert len(at_key) == 2 and at_key[1] == length - m  # the needle's key and the final query's
        d = at_key[0]
        starts.append(d)
        assert d + m < length - m  # the needle ends before the query
        np.testing.assert_array_equal(tokens[b, d + 1 : d + 1 + m], labels[b])
        np.testing.assert_array_equal(tokens[b, length - m + 1 :], labels[b, : m - 1])
        assert labels[b].min() >= cut and labels[b].max() < vocab
        rest = np.delete(tokens[b], np.r_[d : d + 1 + m, length - m : length])
        assert rest.max() < fv  # filler range only
    # start uniform on 0..L-2m-1: mean (L-2m-1)/2, variance ((L-2m)^2 - 1)/12
    top = length - 2 * m - 1
    assert abs(np.mean(starts) - top / 2) < 4.5 * np.sqrt(((top + 1) ** 2 - 1) / 12 / n)
    for depth, want in [(0.0, 0), (1.0, top), (0.5, round(0.5 * top))]:
        t, *_ = _np(
            passkey(
                jax.random.key(8), n, length=length, vocab=vocab, filler_vocab=fv, value_length=m, depth=depth
            )
        )
        assert (t[:, want] >= fv).all() and (t[:, want] < cut).all()


# --------------------------------------------------------------------------------------------- languages


def test_markov_samples_follow_the_table():
    langs = two_languages(3, vocab=6, branching=3)
    assert not np.array_equal(langs.successors[0], langs.successors[1])
    for language in (0, 1):
        p = langs.transition_matrix(language)
        pi = langs.stationary[language]
        np.testing.assert_allclose(pi @ p, pi, atol=1e-10)  # stationary: pi P = pi
        n, length = 1000, 30
        tokens, positions, labels, kind = _np(langs.sample(jax.random.key(9 + language), language, n, length))
        np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(length - 1), (n, length - 1)))
        np.testing.assert_array_equal(labels, tokens[:, 1:])
        assert (kind == language).all()
        counts = np.zeros((6, 6))
        np.add.at(counts, (tokens[:, :-1].ravel(), tokens[:, 1:].ravel()), 1)
        assert (counts[p == 0] == 0).all()  # only listed successors occur
        for s in range(6):
            for t in np.flatnonzero(p[s]):
                assert _within(counts[s, t] / counts[s].sum(), p[s, t], int(counts[s].sum()), 5.0), (s, t)
        # first tokens follow the stationary law
        for s in range(6):
            assert _within(np.mean(tokens[:, 0] == s), pi[s], n, 5.0)


def test_optimal_accuracy_on_hand_built_chains():
    # Language 0: P = [[0, .7, .3], [.3, 0, .7], [.7, .3, 0]] is doubly stochastic, so pi is uniform and
    # acc* = (.7 + .7 + .7) / 3 = 0.7.
    # Language 1: 0 -> {1: .5, 2: .5}, 1 -> {0: 1, 2: 0}, 2 -> {0: 1, 1: 0}. pi = pi P gives
    # pi0 = pi1 + pi2, pi1 = pi2 = pi0 / 2, so pi = (1/2, 1/4, 1/4) (the chain has period 2, the lazy
    # iteration still finds it) and acc* = 1/2 * .5 + 1/4 * 1 + 1/4 * 1 = 0.75.
    succ = np.array([[[1, 2], [2, 0], [0, 1]], [[1, 2], [0, 2], [0, 1]]])
    probs = np.array([[[0.7, 0.3], [0.7, 0.3], [0.7, 0.3]], [[0.5, 0.5], [1.0, 0.0], [1.0, 0.0]]])
    langs = TwoLanguages(succ, probs)
    np.testing.assert_allclose(langs.stationary, [[1 / 3] * 3, [0.5, 0.25, 0.25]], atol=1e-9)
    assert langs.optimal_accuracy(0) == pytest.approx(0.7, abs=1e-9)
    assert langs.optimal_accuracy(1) == pytest.approx(0.75, abs=1e-9)
    # The Bayes predictor's empirical accuracy on independent two-token sequences matches acc*.
    best = np.array([[1, 2, 0], [1, 0, 0]])  # argmax successor per language and token
    n = 4000
    for language, want in [(0, 0.7), (1, 0.75)]:
        tokens, _, labels, _ = _np(langs.sample(jax.random.key(20 + language), language, n, 2))
        assert _within(np.mean(best[language][tokens[:, 0]] == labels[:, 0]), want, n)


def test_two_languages_deterministic_and_seeded():
    a, b = two_languages(0, vocab=8), two_languages(0, vocab=8)
    np.testing.assert_array_equal(a.successors, b.successors)
    np.testing.assert_array_equal(a.probs, b.probs)
    c = two_languages(1, vocab=8)
    assert not np.array_equal(a.successors, c.successors)
    assert two_languages(0, vocab=8, branching=1).optimal_accuracy(1) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize(
    "fn, kwargs, traced",
    [
        # the sizes of the docstring examples, so the eager programs are compiled once
        (mqar, dict(length=16, pairs=2, vocab=32), "power"),
        (forgetting_mqar, dict(length=32, pairs=4, reassign=2, vocab=64), "power"),
        (passkey, dict(length=32, vocab=64, value_length=2), "depth"),
    ],
)
def test_jit_and_vmap_agree_with_eager(fn, kwargs, traced):
    # One program: jit with the sizes static, vmapped over keys and over a traced sweep argument (the
    # gap law's power, the needle's depth); each slice must equal the eager call with concrete values.
    batch = {mqar: 2, forgetting_mqar: 3, passkey: 2}[fn]
    jitted = jax.jit(fn, static_argnames=("batch", *kwargs))
    keys = jax.random.split(jax.random.key(11), 4)
    sweep = [0.01, 0.5, 1.0, 2.0] if traced == "power" else [0.0, 0.3, 0.5, 1.0]
    mapped = jax.vmap(lambda k, a: jitted(k, batch, **kwargs, **{traced: a}))(
        keys, jnp.array(sweep, jnp.float32)
    )
    for i in range(4):
        for x, y in zip(fn(keys[i], batch, **kwargs, **{traced: sweep[i]}), mapped):
            np.testing.assert_array_equal(x, y[i])
    assert not np.array_equal(mapped.tokens[0], mapped.tokens[1])  # different keys, different sequences


def test_language_sample_jits_with_traced_language():
    langs = two_languages(0, vocab=8)
    f = jax.jit(lambda k, lang: langs.sample(k, lang, 4, 10))
    key = jax.random.key(12)
    for language in (0, 1):
        eager = langs.sample(key, language, 4, 10)
        traced = f(key, jnp.int32(language))
        for x, y in zip(eager, traced):
            np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: mqar(jax.random.key(0), 2, length=15, pairs=2, vocab=64), "length must be even"),
        (lambda: mqar(jax.random.key(0), 2, length=14, pairs=4, vocab=64), "length=14 is too short"),
        (lambda: mqar(jax.random.key(0), 2, length=64, pairs=4, vocab=8), "vocab=8 is too small"),
        (lambda: mqar(jax.random.key(0), 0, length=64), "batch"),
        (lambda: mqar(jax.random.key(0), 2, pairs=0), "pairs"),
        (lambda: mqar(jax.random.key(0), 2, power=0.0), "power"),
        (lambda: mqar(jax.random.key(0), 2, power=float("nan")), "power"),
        (lambda: mqar(jax.random.key(0), 2.0), "batch"),
        (lambda: forgetting_mqar(jax.random.key(0), 2, pairs=4, reassign=5), "reassign must be <= pairs"),
        (lambda: forgetting_mqar(jax.random.key(0), 2, reassign=-1), "reassign"),
        (lambda: forgetting_mqar(jax.random.key(0), 2, length=38, pairs=8, reassign=4), "length=38"),
        (lambda: forgetting_mqar(jax.random.key(0), 2, length=64, pairs=4, reassign=4, vocab=14), "values"),
        (
            lambda: passkey(jax.random.key(0), 2, length=4, value_length=2),
            r"length must be >= 2 \* value_length \+ 1 = 5",
        ),
        (lambda: passkey(jax.random.key(0), 2, vocab=64, filler_vocab=63), "filler_vocab=63"),
        (lambda: passkey(jax.random.key(0), 2, depth=1.5), "depth"),
        (lambda: passkey(jax.random.key(0), 2, value_length=0), "value_length"),
        (lambda: two_languages(0, vocab=4, branching=5), "branching"),
        (lambda: two_languages(0, concentration=0.0), "concentration"),
        (lambda: two_languages(0, vocab=1), "vocab"),
        (lambda: two_languages(0).sample(jax.random.key(0), 2, 2, 4), "language must be 0 or 1"),
        (lambda: two_languages(0).sample(jax.random.key(0), 0, 2, 1), "length"),
        (lambda: two_languages(0).optimal_accuracy(3), "language"),
        (lambda: TwoLanguages(np.zeros((2, 3, 2), int), np.full((2, 3, 2), 0.5)), "distinct"),
        (lambda: TwoLanguages(np.array([[[1, 2]] * 3] * 2), np.full((2, 3, 2), 0.4)), "sum to 1"),
        (lambda: TwoLanguages(np.array([[[1, 3]] * 3] * 2), np.full((2, 3, 2), 0.5)), "successors must lie"),
        (lambda: TwoLanguages(np.zeros((3, 3, 1), int), np.ones((3, 3, 1))), "shape"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_docstring_examples_run():
    result = doctest.testmod(_recall, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 6 and result.failed == 0
