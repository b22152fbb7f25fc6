"""What verified checkpoints cost: the SHA-256 manifest on save and the verification on restore.

The checkpoint is the largest one of the benchmark workloads: the permuted-MNIST run state of 5 seeds
(MLP 784-256-256-10, SGD momentum) under DER++ (a 500-example buffer with logits per seed) and under EWC,
with the run's record. Each is saved and restored ``--repeats`` times in a fresh directory; the table gives
the median time of Orbax's save and restore, and of the manifest and verification on top of them.

Command:  .venv/bin/python benchmarks/checkpoint_overhead.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from nestlearn import engine
from nestlearn.engine._checkpoint import verify, write_manifest
from nestlearn.experiment import ExperimentConfig
from nestlearn.experiment._config import override
from nestlearn.experiment._run import build_learner, build_stream


def measure(strategy: str, repeats: int) -> dict[str, float]:
    config = override(ExperimentConfig(), [f"strategies={strategy}"])
    stream = build_stream(config)
    learner = build_learner(config, stream, strategy)
    seeds = list(range(config.seeds))
    state = learner.init(stream, seeds, None, {})
    record = {"acc": np.zeros((5, 10, 10), np.float32)}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    size = sum(x.nbytes for x in jax.tree.leaves((state, record)))
    times = {"orbax save": [], "manifest": [], "orbax restore": [], "verify": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as d:
            ck = engine.Checkpoints(Path(d) / "c", report=print)
            t0 = time.perf_counter()
            ck.manager.save(1, args=_args(state, record))
            ck.manager.wait_until_finished()
            t1 = time.perf_counter()
            write_manifest(ck.directory / "1")
            t2 = time.perf_counter()
            assert verify(ck.directory / "1") is None
            t3 = time.perf_counter()
            restored, _ = ck.restore(1, abstract, record)  # verifies again, then Orbax restores
            jax.block_until_ready(restored)
            t4 = time.perf_counter()
            ck.close()
        times["orbax save"].append(t1 - t0)
        times["manifest"].append(t2 - t1)
        times["verify"].append(t3 - t2)
        times["orbax restore"].append(t4 - t3 - (t3 - t2))
    out = {k: statistics.median(v) for k, v in times.items()}
    out["MiB"] = size / 2**20
    return out


def _args(state, record):
    import orbax.checkpoint as ocp

    from nestlearn.engine._checkpoint import _to_storable

    return ocp.args.Composite(
        state=ocp.args.StandardSave(_to_storable(state)), record=ocp.args.StandardSave(record)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print("| workload | checkpoint | Orbax save | + manifest | Orbax restore | + verify |")
    print("|---|---|---|---|---|---|")
    for strategy in ("derpp", "ewc"):
        m = measure(strategy, args.repeats)
        print(
            f"| permuted MNIST, 5 seeds, {strategy} | {m['MiB']:.1f} MiB | {1e3 * m['orbax save']:.0f} ms | "
            f"{1e3 * m['manifest']:.1f} ms ({100 * m['manifest'] / m['orbax save']:.1f}%) | "
            f"{1e3 * m['orbax restore']:.0f} ms | {1e3 * m['verify']:.1f} ms "
            f"({100 * m['verify'] / m['orbax restore']:.1f}%) |"
        )


if __name__ == "__main__":
    main()
