"""experiments/context_switch.py and experiments/char_lm.py: the task and the corpus against independent
per-sequence references, the measurements against numpy, and tiny runs through the public API."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from nestlearn import ConfigError, nn
from nestlearn.experiment import load_experiment, override, run_study
from nestlearn.experiment._cli import main

REPO = Path(__file__).resolve().parents[1]
CS = load_experiment(str(REPO / "experiments" / "context_switch.py"))[1]
LM = load_experiment(str(REPO / "experiments" / "char_lm.py"))[1]


def quiet(message):
    del message


@pytest.fixture
def standard_promotion():
    """optax's AdamW raises a float to its int32 step count, which strict promotion refuses."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def count_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# -- the in-context switch task ------------------------------------------------------------------------


def decode(tokens: np.ndarray, keys: int):
    """Reads one sequence token by token: the writes of each regime and the queries (regime, key, position)."""
    writes = {0: [], 1: []}
    queries = []
    regime, t = None, 0
    while t < len(tokens):
        tok = int(tokens[t])
        if tok in (CS.R1, CS.R2):
            regime = tok - CS.R1
            nxt = int(tokens[t + 1]) if t + 1 < len(tokens) else None
            after = int(tokens[t + 2]) if t + 2 < len(tokens) else None
            if after is None or after in (CS.R1, CS.R2):  # a query: marker, key, then the next marker
                queries.append((regime, nxt - CS.KEY0, t + 1))
                t += 2
            else:
                t += 1
            continue
        writes[regime].append((tok - CS.KEY0, int(tokens[t + 1]) - CS.KEY0 - keys))
        t += 2
    return writes, queries


@pytest.mark.parametrize("keys,values,repeats", [(3, 5, 2), (4, 2, 1)])
def test_context_switch_matches_a_per_sequence_decoder(keys, values, repeats):
    batch = CS.context_switch(jax.random.key(3), batch=6, keys=keys, values=values, repeats=repeats)
    tokens, positions, labels, kind = (np.asarray(x) for x in batch)
    assert tokens.shape == (6, 2 * (1 + 2 * keys * repeats) + 4 * keys)
    assert positions.shape == labels.shape == kind.shape == (6, 2 * keys)
    for b in range(6):
        writes, queries = decode(tokens[b], keys)
        table = {}
        for r in (0, 1):
            assert len(writes[r]) == keys * repeats
            for p in range(repeats):  # every pass writes every key once
                assert sorted(k for k, _ in writes[r][p * keys : (p + 1) * keys]) == list(range(keys))
            for k, v in writes[r]:
                assert 0 <= v < values and table.setdefault((r, k), v) == v  # one value per regime and key
        for k in range(keys):
            assert table[(0, k)] != table[(1, k)]  # the second regime overwrites every key
        assert sorted((r, k) for r, k, _ in queries) == sorted(table)  # every (regime, key) asked once
        for q, (r, k, pos) in enumerate(queries):
            assert positions[b, q] == pos and kind[b, q] == r
            assert labels[b, q] == CS.KEY0 + keys + table[(r, k)]


def test_an_ideal_memory_scores_one_and_an_overwriting_memory_zero_on_the_old_regime():
    keys = 4
    batch = CS.context_switch(jax.random.key(0), batch=16, keys=keys, values=8, repeats=2)
    tokens, positions, labels, kind = (np.asarray(x) for x in batch)
    ideal, latest = np.zeros(labels.shape, bool), np.zeros(labels.shape, bool)
    for b in range(len(tokens)):
        row, (per_regime, last, regime, t) = tokens[b], ({}, {}, None, 0)
        while t < positions[b, 0] - 1:  # the writes, before the first query: markers and (key, value)s
            tok = int(row[t])
            if tok in (CS.R1, CS.R2):
                regime, t = tok, t + 1
            else:
                per_regime[(regime, tok)] = last[tok] = int(row[t + 1])
                t += 2
        for q, pos in enumerate(positions[b]):
            ideal[b, q] = per_regime[(int(row[pos - 1]), int(row[pos]))] == labels[b, q]
            latest[b, q] = last[int(row[pos])] == labels[b, q]
    assert ideal.all()
    assert latest[kind == 0].mean() == 0.0 and latest[kind == 1].mean() == 1.0


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="values must be an int >= 2, got 1"):
        CS.context_switch(jax.random.key(0), batch=2, keys=3, values=1, repeats=1)
    with pytest.raises(ConfigError, match="unknown \\['nope'\\]"):
        override(CS.CONFIG, ["models=nope"]).validate()
    with pytest.raises(ConfigError, match="steps \\(30\\) must be a positive multiple of chunk \\(20\\)"):
        override(CS.CONFIG, ["steps=30", "chunk=20"]).validate()
    with pytest.raises(ConfigError, match="reference 'hope' must be one of models"):
        override(LM.CONFIG, ["models=titans,transformer"]).validate()
    with pytest.raises(ConfigError, match="context \\(100\\) must be a multiple of bucket \\(32\\)"):
        override(LM.CONFIG, ["context=100"]).validate()


@pytest.mark.parametrize("name", ["context_switch", "char_lm"])
def test_unknown_key_is_named_and_nothing_written(tmp_path, capsys, name):
    out = tmp_path / "run"
    assert main(["run", name, "--set", "no_such_key=1", "--out", str(out)]) == 2
    assert "unknown config key 'no_such_key'" in capsys.readouterr().err
    assert not out.exists()


def test_split_accuracy_matches_numpy_on_full_logits():
    model = nn.transformer(vocab=15, d_model=8, heads=2, rngs=nnx.Rngs(1))
    sample = lambda k: CS.context_switch(k, batch=4, keys=4, values=8, repeats=1)  # noqa: E731
    old, new = CS.split_accuracy(model, sample, jax.random.key(5), 3)
    hits = {0: [], 1: []}
    for i in range(3):
        b = sample(jax.random.fold_in(jax.random.key(5), i))
        logits = np.asarray(model(b.tokens))
        for row in range(4):
            for q in range(b.positions.shape[1]):
                guess = logits[row, int(b.positions[row, q])].argmax()
                hits[int(b.kind[row, q])].append(guess == int(b.labels[row, q]))
    np.testing.assert_allclose([old, new], [np.mean(hits[0]), np.mean(hits[1])], atol=1e-6)


@pytest.mark.slow  # end to end through the CLI; `make test-all` runs it, `make test` (CI) does not
def test_context_switch_run_writes_tables_and_figure(tmp_path, standard_promotion):
    sets = ["models=deltanet,transformer", "seeds=0,1", "width=8", "batch=2", "keys=2", "values=4",
            "repeats=1", "steps=2", "chunk=1", "eval_batches=2"]  # fmt: skip
    config = override(CS.CONFIG, sets)
    rundir = run_study(CS.run, config, tmp_path / "cs", experiment="context_switch", log=quiet)
    summary = pd.read_csv(rundir.results / "context_switch.csv")
    curves = pd.read_csv(rundir.results / "context_switch_curves.csv")
    assert list(summary.model) == ["deltanet", "deltanet", "transformer", "transformer"]
    for name, build in (("deltanet", nn.deltanet), ("transformer", nn.transformer)):
        heads = {"heads": 2}
        expected = count_params(build(vocab=config.vocab, d_model=8, rngs=nnx.Rngs(0), **heads))
        assert (summary[summary.model == name].params == expected).all()
    assert sorted(curves.step.unique()) == [0, 1, 2] and len(curves) == 2 * 2 * 3
    # each accuracy is hits / queries: 2 batches x 2 sequences x 2 keys = 8 queries per regime
    for col in ("acc_old", "acc_new"):
        scaled = curves[col].to_numpy() * 8
        np.testing.assert_allclose(scaled, np.round(scaled), atol=1e-4)
    final = curves[curves.step == 2].set_index(["model", "seed"])[["acc_old", "acc_new"]]
    pd.testing.assert_frame_equal(final, summary.set_index(["model", "seed"])[["acc_old", "acc_new"]])
    assert (rundir.figures / "context_switch.pdf").read_bytes()[:5] == b"%PDF-"
    assert rundir.complete and rundir.read_json("status.json")["length"] == 2 * (1 + 4) + 8


# -- the character-level language model ----------------------------------------------------------------


def test_corpus_is_pydoc_topics_in_sorted_order_as_ascii_codes():
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    data = LM.corpus()
    assert data.dtype == np.int32 and len(data) == len(text)
    outside = np.array([ord(c) >= 128 for c in text])
    assert (data[outside] == LM.SUBSTITUTE).all()
    assert "".join(chr(c) for c in data[~outside][:200]) == "".join(c for c in text if ord(c) < 128)[:200]
    train, valid = LM.split(data)
    assert len(train) == int(0.9 * len(data)) and len(train) + len(valid) == len(data)


def test_windows_are_contiguous_slices_with_next_character_labels():
    data = np.arange(200, dtype=np.int32)  # every character its own index, so a window names its start
    sample = LM.window_sampler(data, batch=16, context=10)
    b = sample(jax.random.key(2))
    tokens, labels = np.asarray(b.tokens), np.asarray(b.labels)
    starts = tokens[:, 0]
    assert (starts >= 0).all() and (starts + 10 <= 199).all()
    np.testing.assert_array_equal(tokens, starts[:, None] + np.arange(10))
    np.testing.assert_array_equal(labels, tokens + 1)
    np.testing.assert_array_equal(np.asarray(b.positions), np.broadcast_to(np.arange(10), (16, 10)))
    with pytest.raises(ValueError, match="fewer than context \\+ 1 = 201"):
        LM.window_sampler(data, batch=2, context=200)


def test_position_loss_matches_a_per_token_numpy_cross_entropy():
    model = nn.transformer(vocab=LM.VOCAB, d_model=8, heads=2, rngs=nnx.Rngs(0))
    windows = LM.validation_windows(LM.corpus()[:5000], 12, 20)  # 20 windows -> 16, a multiple of 8
    assert windows.shape == (16, 13)
    got = np.asarray(LM.position_loss(model, jnp.asarray(windows)))
    logits = np.asarray(model(jnp.asarray(windows[:, :-1])), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, windows[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(got, (logz - picked).mean(0), rtol=1e-5)


def test_carried_state_reads_a_long_window_as_the_whole_sequence_for_an_exact_memory():
    model = nn.deltanet(vocab=LM.VOCAB, d_model=8, chunk=4, rngs=nnx.Rngs(0))
    if not LM.streams(model):
        pytest.skip("this SequenceModel has no init_state/apply: nothing to carry")
    assert not LM.streams(nn.transformer(vocab=LM.VOCAB, d_model=8, heads=2, rngs=nnx.Rngs(0)))
    windows = jnp.asarray(LM.validation_windows(LM.corpus()[:5000], 24, 8))  # 3 pieces of 8 (2 chunks each)
    carried = np.asarray(LM.carried_position_loss(model, windows, 8))
    np.testing.assert_allclose(carried, np.asarray(LM.position_loss(model, windows)), rtol=2e-5, atol=2e-5)


def test_matched_width_is_the_closest_parameter_count():
    build = LM.MODELS["transformer"].build
    shaped = lambda b, d: count_params(nnx.eval_shape(lambda: b(vocab=LM.VOCAB, d_model=d, rngs=nnx.Rngs(0))))  # noqa: E731
    target = shaped(LM.MODELS["titans"].build, 20)
    brute = min(range(8, 65, 4), key=lambda d: (abs(shaped(build, d) - target), d))
    assert LM.matched_width(build, target) == brute
    own = count_params(build(vocab=LM.VOCAB, d_model=24, rngs=nnx.Rngs(0)))
    assert LM.matched_width(build, own) == 24


@pytest.mark.slow  # end to end through the CLI; `make test-all` runs it, `make test` (CI) does not
def test_char_lm_run_writes_matched_tables_and_figure(tmp_path, standard_promotion):
    sets = ["models=transformer,deltanet", "reference=transformer", "seeds=0,1", "width=8", "context=16",
            "bucket=8", "batch=2", "steps=2", "chunk=1", "eval_windows=8", "long_context=32"]  # fmt: skip
    rundir = run_study(LM.run, override(LM.CONFIG, sets), tmp_path / "lm", experiment="char_lm", log=quiet)
    summary = pd.read_csv(rundir.results / "char_lm.csv")
    params = pd.read_csv(rundir.results / "params.csv").set_index("model")
    target = count_params(nn.transformer(vocab=LM.VOCAB, d_model=8, heads=2, rngs=nnx.Rngs(0)))
    assert params.loc["transformer", "params"] == target
    d = int(params.loc["deltanet", "width"])
    count = lambda w: count_params(nn.deltanet(vocab=LM.VOCAB, d_model=w, rngs=nnx.Rngs(0)))  # noqa: E731
    assert params.loc["deltanet", "params"] == count(d)
    assert all(abs(count(d) - target) <= abs(count(w) - target) for w in range(8, 41, 4))
    positions = pd.read_csv(rundir.results / "char_lm_positions.csv")
    assert sorted(positions.position.unique()) == [0, 8] and len(positions) == 2 * 2 * 2
    # the bucket means average to the whole-window mean (equal bucket sizes)
    per_run = positions.groupby(["model", "seed"], sort=False).bpc.mean().to_numpy()
    np.testing.assert_allclose(per_run, summary.val_bpc.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(summary.val_ppl, np.exp(summary.val_bpc * np.log(2)), rtol=1e-5)
    assert (summary.val_bpc > 0).all() and (summary.windows == 8).all()
    long = pd.read_csv(rundir.results / "char_lm_long.csv")
    assert sorted(long.position.unique()) == [0, 8, 16, 24] and len(long) == 2 * 2 * 4
    for name, build in (("transformer", nn.transformer), ("deltanet", nn.deltanet)):
        expected = "carried" if LM.streams(build(vocab=LM.VOCAB, d_model=8, rngs=nnx.Rngs(0))) else "whole"
        assert (long[long.model == name]["mode"] == expected).all()
    beyond = long[long.position >= 16].groupby(["model", "seed"], sort=False).bpc.mean().to_numpy()
    np.testing.assert_allclose(beyond, summary.long_bpc_beyond.to_numpy(), rtol=1e-6)
    assert (rundir.figures / "char_lm.pdf").read_bytes()[:5] == b"%PDF-"
