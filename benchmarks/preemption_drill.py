"""Preemption drill: SIGTERM at random points, every resumed run compared with the uninterrupted one.

Three kinds of drill, on a small permuted-MNIST config (2 strategies x 3 tasks x 4 evaluation chunks, 4
seeds on 4 fake CPU devices):

* in-process (``--drills``, default 20): a real SIGTERM to this process at a random chunk-boundary check
  (uniform over every check of the run, plus "after the end"), then ``resume=True``; the compiled
  programs are shared between drills, so each costs about the run's own time;
* subprocess (``--cli``, default 5): ``nestlearn run`` sent SIGTERM at a random wall-clock time in
  (0, the reference run's duration), then ``nestlearn run --resume`` if it exited 4;
* multi-process (``--hosts``, default 2): two processes (2 devices each, a localhost coordinator), the
  notice sent to process 1 only at a random time; both must exit 4 at the same chunk, and a 2-process
  ``--resume`` must finish identical.

Every resumed run's arrays (accuracy matrix, curves, losses, divergence) must equal the uninterrupted
run's bit for bit. Prints one line per drill and the counts.

    python benchmarks/preemption_drill.py [--drills 20] [--cli 5] [--hosts 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("NESTLEARN_PROGRESS", "0")

import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import nestlearn  # noqa: E402
from nestlearn.engine import _preempt  # noqa: E402
from nestlearn.experiment import ExperimentConfig  # noqa: E402
from nestlearn.experiment._config import override  # noqa: E402
from nestlearn.experiment._run import run_experiment  # noqa: E402
from nestlearn.experiment._rundir import load_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETS = [
    "data.n_tasks=3", "model.hidden=32", "train.steps_per_task=24", "train.batch_size=16",
    "train.evals_per_task=4", "seeds=4", "strategies=naive,ewc",
]  # fmt: skip
FIELDS = ("acc_matrix", "acc_init", "curve_acc", "train_loss", "train_acc", "diverged_step")


def same(results, reference) -> bool:
    return all(
        np.array_equal(getattr(results[n], f), getattr(reference[n], f), equal_nan=True)
        for n in reference
        for f in FIELDS
    )


def from_dir(out: Path, names) -> dict:
    return {n: load_result(out / "results" / f"{n}.npz") for n in names}


def in_process(n: int, rng, root: Path, reference, checks: int) -> tuple[int, int, int]:
    config = override(ExperimentConfig(), SETS)
    real = _preempt.requested
    preempted = inside = identical = 0
    for d in range(n):
        at = int(rng.integers(1, checks + 2))  # checks + 1: the notice comes after the last boundary
        calls = [0]

        def requested(at=at, calls=calls):
            calls[0] += 1
            if calls[0] == at:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
                time.sleep(0.001)
            return real()

        out = root / f"drill{d}"
        _preempt.requested = requested
        try:
            results = run_experiment(config, out, make_figures=False, log=lambda m: None).results
            what = "finished before the notice"
        except nestlearn.Preempted as e:
            preempted += 1
            inside += "inside" in str(e)
            what = str(e).split(";")[0]
            _preempt.requested = real
            results = run_experiment(config, out, resume=True, make_figures=False, log=lambda m: None).results
        finally:
            _preempt.requested = real
        ok = same(results, reference)
        identical += ok
        print(f"in-process drill {d + 1:2d}: SIGTERM before check {at:2d}/{checks}: {what}; identical {ok}")
    return preempted, inside, identical


def cli(args: list[str], out: Path, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nestlearn.experiment._cli", "run", "permuted_mnist_forgetting"]
    cmd += [a for s in SETS for a in ("--set", s)] + ["--out", str(out), *args]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env or os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def subprocesses(n: int, rng, root: Path, reference) -> tuple[int, int, int]:
    t = time.perf_counter()
    ref = cli([], root / "cli-ref")
    _, err = ref.communicate()
    assert ref.returncode == 0, err
    duration = time.perf_counter() - t
    print(f"nestlearn run, uninterrupted: {duration:.1f}s wall-clock")
    preempted = inside = identical = 0
    for d in range(n):
        out = root / f"cli{d}"
        delay = float(rng.uniform(0.0, duration))
        p = cli([], out)
        time.sleep(delay)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate()
        line = err.strip().splitlines()[-1] if err.strip() else ""
        if p.returncode == 4:
            preempted += 1
            inside += "inside" in line
            r = cli(["--resume"], out)
            _, err2 = r.communicate()
            assert r.returncode == 0, err2
        elif p.returncode == -signal.SIGTERM:
            # Before the handler existed (Python still importing): nothing was written; start again.
            assert not out.exists(), f"killed before the handler, yet {out} exists"
            line = "killed while importing, nothing written; rerun"
            r = cli([], out)
            _, err2 = r.communicate()
            assert r.returncode == 0, err2
        else:
            assert p.returncode == 0, err
        ok = same(from_dir(out, reference), reference)
        identical += ok
        print(
            f"subprocess drill {d + 1}: SIGTERM at {delay:.1f}s: exit {p.returncode} ({line[:110]}); identical {ok}"
        )
    return preempted, inside, identical


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def hosts(n: int, rng, root: Path, reference) -> tuple[int, int, int]:
    def launch(out, *extra):
        port = free_port()
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        flags = ["--coordinator", f"localhost:{port}", "--num-processes", "2"]
        return [cli([*extra, *flags, "--process-id", str(i)], out, env) for i in range(2)]

    t = time.perf_counter()
    procs = launch(root / "hosts-ref")
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err
    duration = time.perf_counter() - t
    print(f"2 processes x 2 devices, uninterrupted: {duration:.1f}s; identical to 1 process x 4 devices: "
          f"{same(from_dir(root / 'hosts-ref', reference), reference)}")  # fmt: skip
    preempted = inside = identical = 0
    for d in range(n):
        out = root / f"hosts{d}"
        delay = float(rng.uniform(0.3 * duration, duration))
        procs = launch(out)
        time.sleep(delay)
        procs[1].send_signal(signal.SIGTERM)
        errs = [p.communicate()[1] for p in procs]
        codes = [p.returncode for p in procs]
        lines = [e.strip().splitlines()[-1] if e.strip() else "" for e in errs]
        if codes == [4, 4]:
            preempted += 1
            inside += "inside" in lines[0]
            for p in launch(out, "--resume"):
                _, err = p.communicate()
                assert p.returncode == 0, err
        else:
            assert codes == [0, 0], (codes, errs)
        ok = same(from_dir(out, reference), reference)
        identical += ok
        print(f"multi-process drill {d + 1}: SIGTERM to process 1 at {delay:.1f}s: exits {codes} "
              f"({lines[0][:100]}); identical {ok}")  # fmt: skip
    return preempted, inside, identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drills", type=int, default=20)
    parser.add_argument("--cli", type=int, default=5)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    config = override(ExperimentConfig(), SETS)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        reference = run_experiment(config, root / "ref", make_figures=False, log=lambda m: None).results
        print(f"uninterrupted run (compilation included): {time.perf_counter() - t:.1f}s")
        chunks = config.train.evals_per_task
        tasks_all = config.data.n_tasks * len(config.strategies)
        checks = tasks_all * (chunks - 1) + tasks_all - 1  # inside every task, and between tasks
        rows = {}
        if args.drills:
            rows["in-process"] = (args.drills, *in_process(args.drills, rng, root, reference, checks))
        if args.cli:
            rows["subprocess"] = (args.cli, *subprocesses(args.cli, rng, root, reference))
        if args.hosts:
            rows["2 processes"] = (args.hosts, *hosts(args.hosts, rng, root, reference))
    print("\n| drill | drills | preempted (exit 4) | inside a task | identical after resume |")
    print("|---|---|---|---|---|")
    for name, (n, pre, inside, ok) in rows.items():
        print(f"| {name} | {n} | {pre} | {inside} | {ok}/{n} |")


if __name__ == "__main__":
    main()
