"""Kill and resume, family by family: a real process is SIGKILLed after a chunk's checkpoint, rerun, and
must end with results bit-identical to an uninterrupted run (engine.run_chunks under every host loop).

Covered here: sequence training (``nn.SeqTrainer.run_seeds``), nested levels (``levels.NestedTrainer.run``)
and meta-training (``meta.MetaTrainer.train``). The continual family (per task) and online regression (per
bin, through loss_of_plasticity) are drilled in test_experiment.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import xla_flags

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import jax, jax.numpy as jnp, numpy as np, optax
    from nestlearn import engine, levels, meta, nn, tasks

    family, ckpt, out = sys.argv[1], sys.argv[2], sys.argv[3]

    def log(info):
        print("chunk", info["chunk"], flush=True)
        if info["chunk"] >= 1:
            time.sleep(0.5)  # room for the test to kill the process after a saved chunk

    fast = {"xla_backend_optimization_level": 0}
    with engine.Checkpoints(ckpt, keep=2) as checkpoints:
        if family == "seq":
            sample = lambda key: tasks.mqar(key, 4, length=16, pairs=2, vocab=16)
            trainer = nn.SeqTrainer(
                lambda rngs: nn.transformer(vocab=16, d_model=8, n_layers=1, heads=2, rngs=rngs),
                optax.sgd(0.1, momentum=0.9), sample, steps=8, chunk=2, eval_batches=2, compiler_options=fast,
            )
            res = trainer.run_seeds([0, 1], log=log, progress=False, checkpoints=checkpoints)
            arrays = {k: res[k] for k in ("loss", "acc", "eval_acc", "eval_loss", "diverged_step")}
        elif family == "meta":
            apply, params = meta.functional(nn.MLP(1, (8,), 1, rngs=__import__("flax").nnx.Rngs(0)))
            maml = meta.MAML(meta.mse_loss(apply), optax.sgd(0.01), steps=1)
            sines = tasks.Sinusoid(k_support=5, k_query=5)
            trainer = meta.MetaTrainer(maml, optax.sgd(1e-2), lambda key: sines.sample(key, 4), n_iters=3,
                                       compiler_options=fast)
            states = jax.vmap(trainer.init)(jax.tree.map(lambda p: jnp.stack([p, p * 0.5]), maml.init(params)))
            states, m = trainer.train(
                states, engine.run_keys([0, 1]), 4, checkpoints=checkpoints, progress=False,
                on_chunk=lambda c, s, mm: log({"chunk": c}),
            )
            arrays = {"loss_post": m["loss_post"], "grad_norm": m["grad_norm"],
                      **{str(i): x for i, x in enumerate(jax.tree.leaves(states.meta_params))}}
        else:
            x = jax.random.normal(jax.random.key(5), (12, 4, 3))
            y = x @ jnp.arange(3.0)
            loss = lambda p, xb, yb: jnp.mean((xb @ p - yb) ** 2)
            prog = levels.Nested(
                (levels.Level("fast", optax.sgd(0.05)),
                 levels.Level("slow", period=2, learns_by="consolidate", rate=0.5)),
                loss,
            )
            trainer = levels.NestedTrainer(
                prog, lambda key: jax.random.normal(key, (3,)),
                lambda key, i: (jax.lax.dynamic_slice_in_dim(x, 2 * (i % 6), 2),
                                jax.lax.dynamic_slice_in_dim(y, 2 * (i % 6), 2)),
                steps=8, chunk=2, compiler_options=fast,
            )
            res = trainer.run([0, 1], sweep={"slow.rate": [0.5, 0.8]}, log=log, progress=False,
                              checkpoints=checkpoints)
            arrays = {"loss": res["loss"], "params": res["params"], "level_update_norm": res["level_update_norm"]}
    np.savez(out, **arrays)
    print("done", flush=True)
    """
)


def _run(args, env, kill_after=None):
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if kill_after is not None and line.strip() == kill_after:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=300)
    return proc.returncode, lines, proc.stderr.read()


@pytest.mark.parametrize("family", ["seq", "nested", "meta"])
def test_killed_after_a_chunk_resumes_bit_identically(family, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "NESTLEARN_PROGRESS": "0"}
    env["XLA_FLAGS"] = xla_flags(1)  # one device: the runs are not sharded here
    full = tmp_path / "full.npz"
    code, lines, err = _run([family, str(tmp_path / "ckpt_full"), str(full)], env)
    assert code == 0, err
    assert lines[-1] == "done" and lines.count("chunk 3") == 1

    part = tmp_path / "part.npz"
    code, lines, _ = _run([family, str(tmp_path / "ckpt"), str(part)], env, kill_after="chunk 1")
    assert code == -signal.SIGKILL and not part.exists()
    saved = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert saved and saved[-1] in (2, 3)  # checkpoints after chunk 1 (and perhaps 2), never all 4

    code, lines, err = _run([family, str(tmp_path / "ckpt"), str(part)], env)
    assert code == 0, err
    assert "chunk 0" not in lines and "chunk 3" in lines  # resumed: the first chunks did not run again
    with np.load(full) as a, np.load(part) as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        assert np.isfinite(a["loss" if "loss" in a.files else "loss_post"]).all()
