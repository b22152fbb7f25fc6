"""Hand-written JAX reference of the permuted-MNIST benchmark: one process, timed from its first line.

    python benchmarks/jax_permuted.py --data DATA.npz --seeds 5 --out RESULT.json [--repeats 3] [--cache DIR]

The workload of ``nestlearn_permuted.py`` written directly in JAX, without nestlearn: the arrays the
driver materialised (10 permuted tasks, 4,000 training and 1,000 test images each), MLP 784-256-256-10
ReLU drawn as PyTorch's ``nn.Linear`` draws it, SGD 0.01 momentum 0.9 (optax, never reset between
tasks), batch 64, 2 epochs per task (``ceil(2 * 4000 / 64)`` = 125 steps, examples in a fresh random
order each epoch), all tasks' test sets evaluated after each task; steps under ``scan`` inside a
``scan`` over tasks, seeds under ``vmap``, one ``jit``. ``--cache DIR`` turns on JAX's persistent
compilation cache the way nestlearn does (entries from 0.2 s of compilation), so that cold and warm
starts compare with nestlearn's. Writes the accuracy matrix, the final average accuracy per seed, the
time the results were written and, after them, ``--repeats`` timings of the compiled program.
"""

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

WIDTHS = (784, 256, 256, 10)
BATCH, EPOCHS = 64, 2


def init_params(key):
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        k_w, k_b = jax.random.split(jax.random.fold_in(key, i))
        bound = fan_in**-0.5
        layers.append(
            (
                jax.random.uniform(k_w, (fan_in, fan_out), minval=-bound, maxval=bound),
                jax.random.uniform(k_b, (fan_out,), minval=-bound, maxval=bound),
            )
        )
    return layers


def net(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def program(n_train: int):
    """``run(keys, train_x, train_y, test_x, test_y) -> R [seeds, tasks, tasks]``, jitted."""
    opt = optax.sgd(0.01, momentum=0.9)
    steps = math.ceil(EPOCHS * n_train / BATCH)
    epochs = math.ceil(steps * BATCH / n_train)

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(net(p, x), y).mean()

    def run(key, train_x, train_y, test_x, test_y):
        def accuracies(p):
            correct = jnp.argmax(jax.vmap(net, (None, 0))(p, test_x), -1) == test_y
            return jnp.mean(correct.astype(jnp.float32), axis=-1)

        def task(carry, t):
            p, s = carry
            k = jax.random.fold_in(key, t)
            order = jnp.concatenate(
                [jax.random.permutation(jax.random.fold_in(k, e), n_train) for e in range(epochs)]
            )
            batches = order[: steps * BATCH].reshape(steps, BATCH)
            x_t, y_t = train_x[t], train_y[t]

            def step(c, idx):
                p, s = c
                g = jax.grad(loss)(p, x_t[idx], y_t[idx])
                u, s = opt.update(g, s, p)
                return (optax.apply_updates(p, u), s), None

            (p, s), _ = jax.lax.scan(step, (p, s), batches)
            return (p, s), accuracies(p)

        p = init_params(jax.random.fold_in(key, 10_000))
        _, acc = jax.lax.scan(task, (p, opt.init(p)), jnp.arange(train_x.shape[0]))
        return acc

    return jax.jit(jax.vmap(run, in_axes=(0, None, None, None, None)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=0)
    p.add_argument("--cache", default=None)
    args = p.parse_args()
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    with np.load(args.data) as z:
        data = [jnp.asarray(z[k]) for k in ("train_x", "train_y", "test_x", "test_y")]
    data[1], data[3] = data[1].astype(jnp.int32), data[3].astype(jnp.int32)
    run = program(int(data[0].shape[1]))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(args.seeds))
    acc = np.asarray(run(keys, *data))
    out = {
        "peer": "hand-written JAX",
        "acc_matrix": acc.tolist(),
        "final_avg_acc": acc[:, -1].mean(-1).tolist(),
        "total_seconds": time.perf_counter() - T0,
        "results_written_at": time.time(),
    }
    with open(args.out, "w") as f:
        json.dump(out, f)
    repeats = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(run(keys, *data))
        repeats.append(time.perf_counter() - t)
    out["compiled_seconds"] = repeats
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
