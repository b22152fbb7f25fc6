"""Task streams as arrays on device: permuted, rotated and split MNIST, split digits, and their data."""

from nestlearn.tasks._builders import permuted_mnist, rotated_mnist, split_digits, split_mnist
from nestlearn.tasks._data import MnistData, load_digits, load_mnist, read_idx
from nestlearn.tasks._meta import (
    FewShotClassification,
    IncrementalSine,
    SineParams,
    SineTrajectory,
    Sinusoid,
    TaskBatch,
    few_shot_digits,
    few_shot_mnist,
)
from nestlearn.tasks._plasticity import RegressionState, SlowlyChangingRegression
from nestlearn.tasks._recall import (
    RecallBatch,
    TwoLanguages,
    forgetting_mqar,
    mqar,
    passkey,
    power_law_gaps,
    two_languages,
)
from nestlearn.tasks._stream import TaskStream, identity_features

__all__ = [
    "FewShotClassification",
    "IncrementalSine",
    "SineParams",
    "SineTrajectory",
    "Sinusoid",
    "TaskBatch",
    "few_shot_digits",
    "few_shot_mnist",
    "RegressionState",
    "SlowlyChangingRegression",
    "RecallBatch",
    "TwoLanguages",
    "forgetting_mqar",
    "mqar",
    "passkey",
    "power_law_gaps",
    "two_languages",
    "MnistData",
    "TaskStream",
    "identity_features",
    "load_digits",
    "load_mnist",
    "permuted_mnist",
    "read_idx",
    "rotated_mnist",
    "split_digits",
    "split_mnist",
]
