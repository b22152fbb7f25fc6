"""Tokens per second of self-modifying Titans and HOPE with plain GD against DGD inside (issue 12).

    python benchmarks/hope_tokens.py [--models self_modifying_titans hope] [--inner gd-issue6 gd dgd]
        [--paths chunk token] [--cms optimizer context] [--d-model 32] [--layers 2] [--length 256] [--batch 8] [--reps 5]
        [--legacy] [--out benchmarks/results/hope_tokens_cpu.json]

Each cell (model, inner optimizer, path) builds the model at a small size (``--d-model 32``, 2 layers,
2 heads, vocabulary 256, the models' default chunk) and times one jitted call of ``jax.value_and_grad``
of the next-token cross-entropy over every position (the training loss, forward and backward), whole
sequences from a reset. All cells are compiled first, called once to warm up, then called ``--reps`` times
in rotation (so load from other users hits every cell alike); tokens/s = batch * length / median time.

``--cms``: HOPE's CMS, ``context`` (the in-context CMS, blocks learning from the tokens every 16, 64, 256
tokens: the default since issue 12) or ``optimizer`` (the optimizer-level CMS: inside a sequence a frozen
3-block MLP chain, what HOPE had before). Models without a CMS run once (``-``).

``--inner``: ``gd`` (gradient descent with retention), ``dgd`` (Delta Gradient Descent, the default since
issue 12), and ``gd-issue6``: the whole pre-issue-12 mixer (plain GD, the main memory writing ``v``,
L2-normalised values). ``gd-issue6`` with ``--cms optimizer`` is HOPE before issue 12; ``dgd`` with
``--cms context`` is HOPE after it.

``--legacy`` times the algorithm as it was before issue 12 (plain GD, the main memory writing ``v``,
L2-normalised values) where the constructor has those switches, and any model of ``nestlearn.nn`` with a
``path`` (``ttt_mlp``, ``titans`` ...) may be named: run it with ``PYTHONPATH`` pointing at an older tree to
compare the whole-sequence-from-reset path before and after a change.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nestlearn import nn

HERE = Path(__file__).resolve().parent


def has_cms(name: str) -> bool:
    return "cms" in inspect.signature(getattr(nn, name)).parameters


def cms_kwargs(model: str, cms: str) -> dict:
    """Constructor keywords of the CMS axis."""
    return {"cms": cms} if has_cms(model) else {}


def build(name: str, inner: str, path: str, cms: str, args) -> nnx.Module:
    build_fn = getattr(nn, name)
    accepted = inspect.signature(build_fn).parameters
    kw = dict(vocab=args.vocab, d_model=args.d_model, n_layers=args.layers, heads=args.heads, path=path)
    if "inner" in accepted:
        kw["inner"] = "gd" if inner == "gd-issue6" else inner
    elif inner != "gd":
        raise ValueError(f"{name} has no inner= switch (only gd)")
    if args.legacy or inner == "gd-issue6":
        for key, value in (("main_target", "v"), ("normalize_values", True)):
            if key in accepted:
                kw[key] = value
    kw.update(cms_kwargs(name, cms))
    return build_fn(**kw, rngs=nnx.Rngs(0))


def program(model: nnx.Module, tokens):
    """The jitted training loss and gradient of ``model`` on ``tokens`` (next-token cross-entropy)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    fn = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    compiled = fn.lower(params).compile()
    return compiled, params, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["self_modifying_titans", "hope"])
    p.add_argument(
        "--inner", nargs="+", default=["gd-issue6", "gd", "dgd"], choices=["gd-issue6", "gd", "dgd"]
    )
    p.add_argument("--paths", nargs="+", default=["chunk", "token"], choices=["chunk", "token"])
    p.add_argument("--cms", nargs="+", default=["optimizer", "context"], choices=["optimizer", "context"])
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--legacy", action="store_true", help="the pre-issue-12 algorithm where switchable")
    p.add_argument("--out", default=None, help="JSON results (default: print only)")
    args = p.parse_args(argv)
    for name in ("d_model", "layers", "heads", "vocab", "batch", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.length < 2:
        p.error(f"--length must be >= 2, got {args.length}")

    tokens = jax.random.randint(
        jax.random.PRNGKey(0), (args.batch, args.length + 1), 0, args.vocab, jnp.int32
    )
    cells = {}
    for model in args.models:
        for inner in args.inner:
            for cms in args.cms if has_cms(model) else ["-"]:
                for path in args.paths:
                    compiled, params, compile_s = program(build(model, inner, path, cms, args), tokens)
                    jax.block_until_ready(compiled(params))  # warm-up
                    cells[(model, inner, cms, path)] = dict(
                        fn=compiled, params=params, compile_s=compile_s, t=[]
                    )
    for r in range(args.reps):
        order = list(cells) if r % 2 == 0 else list(reversed(cells))
        for key in order:
            c = cells[key]
            t0 = time.perf_counter()
            jax.block_until_ready(c["fn"](c["params"]))
            c["t"].append(time.perf_counter() - t0)
    rows = []
    print(f"devices {jax.devices()}, load {os.getloadavg()}, batch {args.batch} x length {args.length}")
    print("| model | inner | cms | path | tokens/s | median ms | compile s |")
    print("|---|---|---|---|---:|---:|---:|")
    for (model, inner, cms, path), c in cells.items():
        med = statistics.median(c["t"])
        tps = args.batch * args.length / med
        rows.append(dict(model=model, inner=inner, cms=cms, path=path, median_s=med, tokens_per_s=tps,
                         times_s=c["t"], compile_s=c["compile_s"]))  # fmt: skip
        print(f"| {model} | {inner} | {cms} | {path} | {tps:,.0f} | {med * 1e3:.1f} | {c['compile_s']:.1f} |")
    if args.out:
        from nestlearn.experiment import write_json

        write_json(Path(args.out), dict(settings={k: v for k, v in vars(args).items()}, rows=rows))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
