"""The one engine (nestlearn.engine): guard, chunks, runs, model state, progress, cache and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_tiny_stream
from flax import nnx

from nestlearn import ConfigError, continual, engine, nn
from nestlearn.continual import Learner, TrainConfig


class Counter(flax.struct.PyTreeNode):
    x: jax.Array
    step: jax.Array
    diverged_step: jax.Array


def counter(values):
    n = len(values)
    return Counter(jnp.asarray(values, jnp.float32), jnp.zeros(n, jnp.int32), jnp.full(n, -1, jnp.int32))


def grow(s, rate):
    # x <- rate * x; the loss reported is the value before the step, the update norm |x' - x|.
    new = s.x * rate
    return s.replace(x=new), {"loss": s.x, "update_norm": jnp.abs(new - s.x)}


def test_guard_freezes_a_diverged_run_and_nans_its_metrics():
    # Run 0: x = 1, 2, 4, 8, ... stays finite. Run 1: x = 1, then 1e30; step 1 would make it 1e60 = inf in
    # float32 (an infinite update), so step 1 is its divergence: the update is not applied, x stays 1e30,
    # step 1 still reports its loss (1e30, measured before the update) and every later metric is NaN.
    eng = engine.Engine(grow, length=5, in_axes=(0,))
    s, m = eng.run(counter([1.0, 1.0]), jnp.asarray([2.0, 1e30], jnp.float32))
    np.testing.assert_array_equal(s.diverged_step, [-1, 1])
    np.testing.assert_array_equal(s.step, [5, 5])
    np.testing.assert_allclose(s.x, [32.0, 1e30])
    np.testing.assert_allclose(m["loss"][0], [1, 2, 4, 8, 16])
    assert m["loss"][1, 0] == 1.0 and m["loss"][1, 1] == np.float32(1e30)
    assert np.isnan(m["loss"][1, 2:]).all() and np.isnan(m["update_norm"][1, 2:]).all()


def test_guard_blowup_catches_a_finite_explosion():
    # With blowup=100, run 1's loss 1e10 at step 1 is divergence although every number is finite.
    eng = engine.Engine(grow, length=4, in_axes=(0,), guard=engine.Guard(blowup=100.0))
    s, m = eng.run(counter([1.0, 1.0]), jnp.asarray([2.0, 1e10], jnp.float32))
    np.testing.assert_array_equal(s.diverged_step, [-1, 1])
    np.testing.assert_allclose(s.x, [16.0, 1e10])  # frozen before its exploding step's update
    unguarded, _ = engine.Engine(grow, length=4, in_axes=(0,)).run(
        counter([1.0, 1.0]), jnp.asarray([2.0, 1e10], jnp.float32)
    )
    np.testing.assert_array_equal(unguarded.diverged_step, [-1, 3])  # only the inf at step 3 without it
    assert np.isnan(m["loss"][1, 2:]).all()
    with pytest.raises(ConfigError, match="Guard.blowup"):
        engine.Guard(blowup=float("nan"))


def test_traced_count_chunks_share_one_program_and_equal_a_scan():
    # Chunks of 3, then 2 steps (fori_loop, traced count) equal one scan of 5; the means are hand-computed.
    loop = engine.Engine(grow, length=None, in_axes=(0,))
    s = counter([1.0, 3.0])
    s, m3 = loop.run(s, jnp.asarray([2.0, 0.5]), count=3)
    s, m2 = loop.run(s, jnp.asarray([2.0, 0.5]), count=2)
    assert loop.n_traces == 1
    np.testing.assert_allclose(m3["loss"], [(1 + 2 + 4) / 3, (3 + 1.5 + 0.75) / 3])
    np.testing.assert_allclose(m2["loss"], [(8 + 16) / 2, (0.375 + 0.1875) / 2])
    np.testing.assert_allclose(s.x, [32.0, 3 / 32])
    np.testing.assert_array_equal(s.step, [5, 5])


def test_run_grid_keys_and_errors():
    runs = engine.run_grid([0, 1], {"rates": [[0.5, 0.1], [0.2, 0.2]]})
    assert runs[0] == {"rates": (0.5, 0.1), "seed": 0} and runs[3] == {"rates": (0.2, 0.2), "seed": 1}
    np.testing.assert_array_equal(engine.stack_values(runs, ["rates"])["rates"].shape, (4, 2))
    # A typed key per seed with the bits of the raw PRNGKey of the same seed.
    np.testing.assert_array_equal(jax.random.key_data(engine.run_keys([7])[0]), jax.random.PRNGKey(7))
    with pytest.raises(ConfigError, match="at least one run"):
        engine.run_grid([], {})
    with pytest.raises(ConfigError, match=r"seed 4294967296 is outside the PRNG's range"):
        engine.run_grid([2**32], {})
    with pytest.raises(ConfigError, match="sweep 'lam': nan is not finite"):
        engine.run_grid([0], {"lam": [1.0, float("nan")]})
    with pytest.raises(ConfigError, match="same length"):
        engine.run_grid([0], {"rates": [[0.5, 0.1], [0.2]]})


class BNDropMLP(nnx.Module):
    """An MLP with batch norm and dropout: non-parameter state that changes in training."""

    def __init__(self, din, dout, *, rngs):
        self.l1 = nnx.Linear(din, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.l2 = nnx.Linear(16, dout, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def test_batchnorm_and_dropout_models_train_and_carry_their_state():
    stream = make_tiny_stream(n_tasks=2)
    config = TrainConfig(steps_per_task=12, batch_size=16, evals_per_task=3)
    learner = Learner(lambda r: BNDropMLP(6, 3, rngs=r), optax.sgd(0.1), continual.Naive(), config)
    state = learner.init(stream, [0, 1])
    before = np.asarray(state.model_state["bn"]["mean"][...])
    state, out = learner.run_task(state, stream, 0)
    # Running statistics moved and the dropout stream advanced once per step (12 steps).
    assert np.abs(np.asarray(state.model_state["bn"]["mean"][...]) - before).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(state.model_state["drop"]["rngs"]["count"][...]), [12, 12])
    assert np.isfinite(np.asarray(out.acc_row)).all()
    result = learner.run(stream, seeds=[0, 1], progress=False)
    assert result.train_loss[0, 1] > result.train_loss[0, 3]  # it learns
    # Evaluation is in eval mode: deterministic (no dropout), so evaluating twice gives the same accuracy.
    a, b = learner.evaluate(state, stream), learner.evaluate(state, stream)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_chunk_telemetry_is_the_parameter_norm_and_the_span_displacement():
    stream = make_tiny_stream(n_tasks=2)
    learner = Learner(
        lambda r: nn.MLP(6, (8,), 3, rngs=r),
        optax.sgd(0.1),
        continual.Naive(),
        TrainConfig(6, 8, evals_per_task=1),
    )
    state = learner.init(stream, [0, 1])
    before = jax.tree.map(np.asarray, state.params)
    state, out = learner.run_task(state, stream, 0)
    after = jax.tree.map(np.asarray, state.params)
    for r in range(2):
        flat = lambda tree, r=r: np.concatenate([np.ravel(x[r]) for x in jax.tree.leaves(tree)])
        np.testing.assert_allclose(out.norms["param_norm"][r, 0], np.linalg.norm(flat(after)), rtol=1e-5)
        np.testing.assert_allclose(
            out.norms["chunk_update_norm"][r, 0], np.linalg.norm(flat(after) - flat(before)), rtol=1e-4
        )
    assert float(out.norms["chunk_update_norm"][0, 0]) > 0


def test_evals_per_task_is_a_count():
    for steps, n, want in [
        (10, 5, (2, 4, 6, 8, 10)),
        (7, 5, (1, 3, 4, 6, 7)),
        (3, 5, (1, 2, 3)),
        (9, 1, (9,)),
    ]:
        assert TrainConfig(steps, 8, evals_per_task=n).eval_steps == want
    assert TrainConfig(10, 8, eval_every=4).eval_steps == (4, 8, 10)
    stream = make_tiny_stream(n_tasks=2)
    learner = Learner(
        lambda r: nn.MLP(6, (8,), 3, rngs=r),
        optax.sgd(0.1),
        continual.Naive(),
        TrainConfig(7, 8, evals_per_task=5),
    )
    result = learner.run(stream, seeds=[0], progress=False)
    np.testing.assert_array_equal(result.curve_steps, [0, 1, 3, 4, 6, 7, 8, 10, 11, 13, 14])
    assert learner.engine.n_traces == 1  # chunks of 1 and 2 steps: one program
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(7, 8, eval_every=2, evals_per_task=3)


def test_learner_errors_are_clear():
    stream = make_tiny_stream(n_tasks=2)
    mlp = lambda out: lambda r: nn.MLP(6, (8,), out, rngs=r)
    config = TrainConfig(4, 8)
    with pytest.raises(ConfigError, match="outputs \\(5,\\) per example but stream 'tiny' has 3 classes"):
        Learner(mlp(5), optax.sgd(0.1), continual.Naive(), config).run(stream, seeds=[0])
    with pytest.raises(ConfigError, match="does not take the stream's inputs of 6 features"):
        Learner(lambda r: nn.MLP(9, (8,), 3, rngs=r), optax.sgd(0.1), continual.Naive(), config).init(
            stream, [0]
        )
    naive = Learner(mlp(3), optax.sgd(0.1), continual.Naive(), config)
    with pytest.raises(ConfigError, match="at least one run"):
        naive.run(stream, seeds=[])
    with pytest.raises(ConfigError, match="3 runs do not divide over the mesh's 4 devices"):
        naive.init(stream, [0, 1, 2], mesh=jax.sharding.Mesh(np.array(jax.devices()), ("runs",)))
    replay = Learner(mlp(3), optax.sgd(0.1), continual.Replay(buffer_size=16), config)
    with pytest.raises(ConfigError, match="Replay.buffer_size is a structural field"):
        replay.run(stream, seeds=[0], sweep={"buffer_size": [8, 16]})
    for lam in (-5.0, float("nan")):
        ewc = Learner(mlp(3), optax.sgd(0.1), continual.EWC(lam=lam), config)
        with pytest.raises(ConfigError, match="EWC.lam must be finite and non-negative"):
            ewc.init(stream, [0])
    ewc = Learner(mlp(3), optax.sgd(0.1), continual.EWC(lam=1.0), config)
    with pytest.raises(ConfigError, match="EWC.lam must be finite and non-negative, got -1.0$"):
        ewc.run(stream, seeds=[0], sweep={"lam": [1.0, -1.0]})


def test_list_valued_optimizer_hyperparameter_sweeps_in_one_program():
    # A per-group rate vector swept as one hyperparameter equals runs built at each vector.
    stream = make_tiny_stream(n_tasks=2)
    config = TrainConfig(5, 8)

    def tx(rates):
        return optax.inject_hyperparams(
            lambda rates: optax.multi_transform(
                {"a": optax.sgd(rates[0]), "b": optax.sgd(rates[1])},
                lambda p: jax.tree.map(lambda x: "a" if x.ndim == 2 else "b", p),
            )
        )(rates=jnp.asarray(rates, jnp.float32))

    mlp = lambda r: nn.MLP(6, (8,), 3, rngs=r)
    swept = Learner(mlp, tx([0.1, 0.1]), continual.Naive(), config).run(
        stream, seeds=[0], sweep={"optimizer.rates": [[0.5, 0.0], [0.05, 0.2]]}, progress=False
    )
    for i, rates in enumerate([[0.5, 0.0], [0.05, 0.2]]):
        alone = Learner(mlp, tx(rates), continual.Naive(), config).run(stream, seeds=[0], progress=False)
        np.testing.assert_allclose(swept.train_loss[i], alone.train_loss[0], rtol=1e-5)
    assert not np.allclose(swept.train_loss[0, 1:], swept.train_loss[1, 1:])


def test_progress_reports_inside_tasks(capsys):
    lines = []
    bar = engine.Progress(10, "demo", enabled=True, write=lines.append, min_interval=0)
    for done in (2, 4, 10):
        bar.update(done, loss=0.5)
    assert [line.split(" · ")[0] for line in lines] == [
        "[demo] 2/10 (20%)",
        "[demo] 4/10 (40%)",
        "[demo] 10/10 (100%)",
    ]
    assert "ETA …" in lines[0] and "ETA" in lines[1] and "loss 0.5" in lines[2]
    stream = make_tiny_stream(n_tasks=2)
    learner = Learner(
        lambda r: nn.MLP(6, (8,), 3, rngs=r),
        optax.sgd(0.1),
        continual.Naive(),
        TrainConfig(6, 8, evals_per_task=3),
    )
    learner.run(stream, seeds=[0], progress=True)
    err = capsys.readouterr().err
    assert "[Naive] 2/12 (17%)" in err and "[Naive] 12/12 (100%)" in err  # every chunk, inside tasks
    learner.run(stream, seeds=[0], progress=False)
    assert capsys.readouterr().err == ""


def test_compilation_cache_serves_a_second_process(tmp_path):
    # Two fresh processes compile the same program with the cache in tmp_path; the second one reads it.
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, nestlearn, sys
        print(nestlearn.COMPILATION_CACHE)
        events = []  # JAX reports each persistent-cache hit as a monitoring event
        jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
        f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + jax.lax.fori_loop(0, 50, lambda i, a: a * 1.01, x))
        f(jnp.ones((64, 64))).block_until_ready()
        print("hits", events.count("/jax/compilation_cache/cache_hits"))
        """
    )
    env = {**os.environ, "NESTLEARN_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    env["NESTLEARN_CACHE_MIN_SECONDS"] = "0"
    first = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.split("\n")[:2] == [str(tmp_path / "cache"), "hits 0"]
    entries = list((tmp_path / "cache").iterdir())
    assert entries, "the first process wrote nothing to the cache"
    second = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0, second.stderr
    assert int(second.stdout.split("\n")[1].split()[1]) >= 1  # the program came from the first one's cache
    off = subprocess.run(
        [sys.executable, "-c", "import nestlearn; print(nestlearn.COMPILATION_CACHE)"],
        env={**env, "NESTLEARN_COMPILATION_CACHE": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert off.stdout.strip() == "None"
