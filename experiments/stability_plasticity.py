"""The stability–plasticity plane on permuted MNIST: regularisers swept along their strength.

Command:  nestlearn run stability_plasticity          (--quick: 3 tasks, 2 seeds, 2 strengths each)
Runtime:  about 10 minutes on 2 CPU cores; --quick about 1 minute.
Produces: results/summary.csv (ACC, BWT, forgetting, learning accuracy per strategy, strength and
          seed) and one .npz per strategy, read by notebooks/02_stability_plasticity and by
          paper/make_figures.py for the frontier figure; figures/ as for every run.
Setup:    the bundled 5,000-image MNIST, 5 permuted tasks, MLP 784-256-256-10, SGD lr 0.01 momentum
          0.9, batch 64, 1 epoch per task, seeds 0-4. Naive and joint are the references; EWC, SI,
          L2 toward the initial weights and LwF are each swept over four strengths in one program
          (strengths x seeds as the vmapped axis); replay runs with a 500-example reservoir buffer.
"""

from nestlearn.experiment import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    SweepConfig,
    TrainSpec,
)

CONFIG = ExperimentConfig(
    data=DataConfig(stream="permuted_mnist", n_tasks=5, seed=0),
    model=ModelConfig(hidden=(256, 256)),
    optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9),
    train=TrainSpec(epochs=1.0, batch_size=64, evals_per_task=2),
    strategies=("naive", "joint", "ewc", "si", "l2init", "lwf", "replay"),
    sweep=SweepConfig(
        ewc=(1.0, 10.0, 100.0, 1000.0),
        si=(0.1, 1.0, 10.0, 100.0),
        l2init=(0.0001, 0.001, 0.01, 0.1),
        lwf=(0.1, 1.0, 10.0, 100.0),
    ),
    seeds=5,
)

QUICK = ["data.n_tasks=3", "seeds=2", "sweep.ewc=10,1000", "sweep.si=1,100", "sweep.l2init=0.001,0.1",
         "sweep.lwf=1,100", "model.hidden=64"]  # fmt: skip
