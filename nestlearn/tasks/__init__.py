"""Task streams as arrays on device: permuted, rotated and split MNIST, split digits, split CIFAR, streams
and few-shot families from a user's arrays, and loaders for the usual on-disk formats."""

from nestlearn.tasks._arrays import stream_from_pool, stream_from_tasks
from nestlearn.tasks._builders import permuted_mnist, rotated_mnist, split_digits, split_mnist
from nestlearn.tasks._data import MnistData, load_digits, load_mnist, read_idx
from nestlearn.tasks._fewshot import (
    few_shot_tasks,
    labelled_arrays,
    mini_imagenet_few_shot,
    omniglot_few_shot,
)
from nestlearn.tasks._formats import (
    ImageData,
    LabelledImages,
    load_cifar10,
    load_cifar100,
    load_fashion_mnist,
    load_image_folder,
    load_kmnist,
    load_mini_imagenet,
    load_omniglot,
    load_tiny_imagenet,
)
from nestlearn.tasks._images import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    channel_stats,
    incremental_cifar100,
    split_cifar10,
    split_cifar100,
)
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
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "ImageData",
    "LabelledImages",
    "channel_stats",
    "few_shot_tasks",
    "incremental_cifar100",
    "labelled_arrays",
    "load_cifar10",
    "load_cifar100",
    "load_fashion_mnist",
    "load_image_folder",
    "load_kmnist",
    "load_mini_imagenet",
    "load_omniglot",
    "load_tiny_imagenet",
    "mini_imagenet_few_shot",
    "omniglot_few_shot",
    "split_cifar10",
    "split_cifar100",
    "stream_from_pool",
    "stream_from_tasks",
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
