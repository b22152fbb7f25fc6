import time

T0 = time.perf_counter()

# Imports deliberately follow the timer start and the torch thread settings.
#
# learn2learn peer for nestlearn's meta-learning speed benchmark (issue 4): MAML on sinusoid
# regression with learn2learn 0.2.0's ``MAML`` wrapper, torch limited to 2 threads.
#
# Setup (REFERENCES.md, Finn et al. 2017): amplitude ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5],
# y = A sin(x - phase), K = 10 support and 10 query points per task, MSE loss, network 1-40-40-1
# ReLU (torch's default nn.Linear initialisation), one inner SGD step with lr 0.01, meta-batch 25
# tasks, Adam with lr 1e-3 on the initialisation.
#
# The meta-step is written the way learn2learn's own examples write it: a Python loop over the
# tasks of the meta-batch; for each task ``learner = maml.clone()``, ``learner.adapt(support_loss)``,
# then the query loss of the adapted learner is back-propagated into the initialisation's ``.grad``;
# after the loop the gradients are divided by the meta-batch size and Adam steps. ``--order 2``
# differentiates through the inner step (``MAML(..., first_order=False)``), ``--order 1`` is
# first-order MAML (``first_order=True``).
#
# Task sampling: one batched torch draw per meta-iteration (25 amplitudes, 25 phases, 25 x 20
# inputs, their sines), split into support and query; it is inside the timed region and costs a
# few tens of microseconds, small next to the meta-step.
#
# Timing: ``--warmup`` meta-iterations first (not timed), then ``--blocks`` blocks of
# ``--iters-per-block`` meta-iterations, each timed with time.perf_counter; each block gives
# meta-iterations per second, and the JSON reports them and their median. Training goes on across
# blocks (one continuous meta-training run).
#
# Install the peer (learn2learn 0.2.0 needs its Cython sources regenerated on Python 3.11)::
#
#     bash benchmarks/peers/install_learn2learn.sh PEER_VENV/bin/python
#
# Usage::
#
#     PEER_VENV/bin/python benchmarks/peers/l2l_maml_sinusoid.py --order 2 --warmup 20 --blocks 5 \
#         --iters-per-block 50 [--seed 0] [--threads 2] --json RESULT.json
#
# JSON written::
#
#     {"peer": "learn2learn", "version": "0.2.0", "torch": "2.14.1+...", "order": 2,
#      "block_iters_per_s": [...], "median_iters_per_s": float,
#      "final_query_mse": float,   # mean post-adaptation query MSE over the last block's tasks
#      "threads": 2, "seed": 0, "warmup": 20, "blocks": 5, "iters_per_block": 50,
#      "meta_batch": 25, "k_support": 10, "k_query": 10, "inner_lr": 0.01, "inner_steps": 1,
#      "outer_lr": 0.001, "setup_seconds": float, "total_seconds": float}

import argparse
import json
import os
import random
import statistics
import sys
import tempfile


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description="learn2learn MAML on sinusoid regression (speed peer).")
    p.add_argument(
        "--order", type=int, choices=(1, 2), default=2, help="1: first-order MAML, 2: second order"
    )
    p.add_argument("--warmup", type=int, default=20, help="untimed meta-iterations before the blocks")
    p.add_argument("--blocks", type=int, default=5, help="number of timing blocks")
    p.add_argument("--iters-per-block", type=int, default=50, help="meta-iterations per timing block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--json", required=True, help="path of the result JSON")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.blocks < 1:
        p.error(f"--blocks must be >= 1, got {args.blocks}")
    if args.iters_per_block < 1:
        p.error(f"--iters-per-block must be >= 1, got {args.iters_per_block}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


ARGS = _parse_args()

import torch

torch.set_num_threads(ARGS.threads)
torch.set_num_interop_threads(1)

import learn2learn as l2l
import numpy as np
from torch import nn

AMP_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, float(np.pi))
X_RANGE = (-5.0, 5.0)
K_SUPPORT = 10
K_QUERY = 10
HIDDEN = 40
INNER_LR = 0.01
INNER_STEPS = 1
META_BATCH = 25
OUTER_LR = 1e-3


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_model():
    return nn.Sequential(
        nn.Linear(1, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, 1),
    )


def sample_tasks(n_tasks):
    """One meta-batch of sinusoid tasks: support and query (x, y), each [n_tasks, K, 1]."""
    amp = torch.empty(n_tasks, 1, 1, device=ARGS.device).uniform_(*AMP_RANGE)
    phase = torch.empty(n_tasks, 1, 1, device=ARGS.device).uniform_(*PHASE_RANGE)
    x = torch.empty(n_tasks, K_SUPPORT + K_QUERY, 1, device=ARGS.device).uniform_(*X_RANGE)
    y = amp * torch.sin(x - phase)
    return x[:, :K_SUPPORT], y[:, :K_SUPPORT], x[:, K_SUPPORT:], y[:, K_SUPPORT:]


def meta_iteration(maml, opt, loss_fn):
    """One MAML meta-step in learn2learn's example style; returns the mean query MSE of the batch."""
    xs, ys, xq, yq = sample_tasks(META_BATCH)
    opt.zero_grad()
    query_total = 0.0
    for t in range(META_BATCH):
        learner = maml.clone()
        for _ in range(INNER_STEPS):
            learner.adapt(loss_fn(learner(xs[t]), ys[t]))
        query_loss = loss_fn(learner(xq[t]), yq[t])
        query_loss.backward()
        query_total += query_loss.item()
    for p in maml.parameters():
        p.grad.mul_(1.0 / META_BATCH)
    opt.step()
    return query_total / META_BATCH


def write_json_atomic(path, obj):
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main():
    seed_everything(ARGS.seed)
    maml = l2l.algorithms.MAML(make_model().to(ARGS.device), lr=INNER_LR, first_order=ARGS.order == 1)
    opt = torch.optim.Adam(maml.parameters(), lr=OUTER_LR)
    loss_fn = nn.MSELoss()
    setup_seconds = time.perf_counter() - T0

    for _ in range(ARGS.warmup):
        meta_iteration(maml, opt, loss_fn)

    block_rates, last_block_mse = [], []
    for b in range(ARGS.blocks):
        mses = []
        t = time.perf_counter()
        for _ in range(ARGS.iters_per_block):
            mses.append(meta_iteration(maml, opt, loss_fn))
        dt = time.perf_counter() - t
        block_rates.append(ARGS.iters_per_block / dt)
        last_block_mse = mses
        print(
            f"[learn2learn] order {ARGS.order} block {b}: {block_rates[-1]:.2f} it/s, "
            f"query mse {float(np.mean(mses)):.4f}",
            file=sys.stderr,
            flush=True,
        )

    result = {
        "peer": "learn2learn",
        "version": l2l.__version__,
        "torch": torch.__version__,
        "order": ARGS.order,
        "block_iters_per_s": block_rates,
        "median_iters_per_s": statistics.median(block_rates),
        "final_query_mse": float(np.mean(last_block_mse)),
        "threads": ARGS.threads,
        "seed": ARGS.seed,
        "warmup": ARGS.warmup,
        "blocks": ARGS.blocks,
        "iters_per_block": ARGS.iters_per_block,
        "meta_batch": META_BATCH,
        "k_support": K_SUPPORT,
        "k_query": K_QUERY,
        "inner_lr": INNER_LR,
        "inner_steps": INNER_STEPS,
        "outer_lr": OUTER_LR,
        "setup_seconds": setup_seconds,
        "total_seconds": time.perf_counter() - T0,
    }
    write_json_atomic(ARGS.json, result)


if __name__ == "__main__":
    main()
